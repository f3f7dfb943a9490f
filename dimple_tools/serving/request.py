"""The chat-completion request body: OpenAI's fields and the Dimple decoding settings a request may add."""

from __future__ import annotations

from typing import Any, Optional


from litserve.specs.openai import (
    ChatCompletionRequest,
)
from pydantic import ConfigDict


#: Dimple's decoding settings a request may give in its body (the OpenAI client's `extra_body`).
DIMPLE_SETTINGS = ("steps", "alg", "alg_p_threshold", "block_length", "dual_cache", "stop_at_eos")
RANDOM_ALGORITHMS = ("origin", "origin-ratio")  # choose positions at random
MAX_STOP_STRINGS = 4
REFUSED_FIELDS = {  # OpenAI fields this server cannot honour: refused rather than silently ignored
    "tools": "tool calls are not supported",
    "logprobs": "log-probabilities are not returned",
    "response_format": "only plain text responses are supported",
}


class DimpleChatRequest(ChatCompletionRequest):
    """LitServe's chat-completions request, with the fields it leaves out that Dimple uses (`seed`, and
    Dimple's decoding settings from the OpenAI client's `extra_body`). Values are checked in the worker, which
    names the field of any bad one."""

    model_config = ConfigDict(extra="allow")
    seed: Optional[Any] = None
    steps: Optional[Any] = None
    alg: Optional[Any] = None
    alg_p_threshold: Optional[Any] = None
    block_length: Optional[Any] = None
    dual_cache: Optional[Any] = None
    stop_at_eos: Optional[Any] = None
    dimple_request_id: Optional[str] = None  # set by the server (client values are replaced)
