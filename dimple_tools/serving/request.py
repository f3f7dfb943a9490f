"""The chat-completion request body: OpenAI's fields and the Dimple decoding settings a request may add."""

from __future__ import annotations

import math
from typing import Any, Optional


from litserve.specs.openai import (
    ChatCompletionRequest,
)
from pydantic import BaseModel, ConfigDict, StrictBool, field_validator
from pydantic_core import PydanticCustomError


#: Dimple's decoding settings a request may give in its body (the OpenAI client's `extra_body`).
DIMPLE_SETTINGS = ("steps", "alg", "alg_p_threshold", "block_length", "dual_cache", "stop_at_eos", "open_ended")
RANDOM_ALGORITHMS = ("origin", "origin-ratio")  # choose positions at random
MAX_STOP_STRINGS = 4
REFUSED_FIELDS = {  # OpenAI fields this server cannot honour: refused rather than silently ignored
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "logprobs": "log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned",
    "response_format": "only plain text responses are supported",
}
#: OpenAI's ranges (a value outside gives garbage or overflows, so it is refused rather than decoded)
NUMBER_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}


def asks_for_unsupported(name: str, value) -> bool:
    """Whether a REFUSED_FIELDS value asks for something: an empty or false value, `tool_choice: "none"` and
    `response_format: {"type": "text"}` ask for what the server does anyway."""
    if name == "tool_choice":
        return value is not None and value != "none"
    if name == "response_format":
        return bool(value) and getattr(value, "type", None) != "text"
    return bool(value)


class StreamOptions(BaseModel):
    include_usage: Optional[StrictBool] = None


class DimpleChatRequest(ChatCompletionRequest):
    """LitServe's chat-completions request, with the fields it leaves out that Dimple uses (`seed`, and
    Dimple's decoding settings from the OpenAI client's `extra_body`). Values are checked in the worker, which
    names the field of any bad one; the schema checks only what pydantic would otherwise coerce silently
    (`true` as 1) and OpenAI's ranges."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None  # required, as OpenAI's: checked by the spec (a 400 naming it, not pydantic's)
    tool_choice: Optional[Any] = None  # refused whatever its form (LitServe's enum would misname the choices)
    logprobs: Optional[Any] = None
    top_logprobs: Optional[Any] = None
    stream_options: Optional[StreamOptions] = None
    seed: Optional[Any] = None
    steps: Optional[Any] = None
    alg: Optional[Any] = None
    alg_p_threshold: Optional[Any] = None
    block_length: Optional[Any] = None
    dual_cache: Optional[Any] = None
    stop_at_eos: Optional[Any] = None
    open_ended: Optional[Any] = None
    dimple_request_id: Optional[str] = None  # set by the server (client values are replaced)

    @field_validator("n", "max_tokens", "max_completion_tokens", mode="before")
    @classmethod
    def _no_boolean_integer(cls, value):
        if isinstance(value, bool):  # pydantic reads true as 1
            raise PydanticCustomError("int_type", f"must be an integer, not a boolean (got {value!r})")
        return value

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _no_boolean_number(cls, value):
        if isinstance(value, bool):
            raise PydanticCustomError("float_type", f"must be a number, not a boolean (got {value!r})")
        return value

    @field_validator("temperature", "top_p")
    @classmethod
    def _in_openai_range(cls, value, info):
        low, high = NUMBER_RANGES[info.field_name]
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            # formatted here: pydantic's templates take no format specs
            raise PydanticCustomError("range", f"must be a number from {low:g} to {high:g}, got {value!r}")
        return value
