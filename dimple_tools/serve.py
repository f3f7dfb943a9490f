"""An OpenAI-compatible chat-completions server for Dimple, built on LitServe.

    dimple-serve --model tiny-dimple                       # http://127.0.0.1:8000/v1/chat/completions
    dimple-serve --model rp-yu/Dimple-7B --device cuda --max-batch-size 16 --batch-timeout 0.02

LitServe (`OpenAISpec`) gives the HTTP layer, the chat-completions schema, the request queue, the batch
window (`max_batch_size`, `batch_timeout`) and the worker processes (`workers_per_device` on every device).
This module adds what is Dimple's:

* `DimpleAPI` (the inference worker): turns each request into the processor's inputs (text and `image_url`
  parts: base64 `data:` URLs, and local files under `--image-folder`; remote URLs are refused since the server
  fetches nothing), groups the requests of a batch that decode alike (same canvas and settings) into one
  `diffusion_generate` call, and follows every row after each step: the answer's settled text (committed
  tokens left of the first mask, up to the end-of-text) is sent as it grows, a row ends as soon as its answer
  is settled, a `stop` string is met, or its client went away, and its remaining masks are then never
  decoded. Requests that sample (temperature > 0, or a random `alg` such as `origin`) with a `seed` decode
  alone with their own generator, so the answer does not depend on the batch.
* `DimpleOpenAISpec` (the HTTP side): the Dimple settings of the request body, 400 errors in OpenAI's format
  naming the field, `usage.forward_passes`, `finish_reason`, `/v1/models`, `/metrics`, and client
  disconnects (a closed stream or connection) marked for the worker, which stops that row at its next step.

Every row of a batch decodes as it would alone (Dimple's decisions are per row); greedy decoding is the default
(a request's `temperature` applies only when given).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextvars
import io
import json
import logging
import math
import multiprocessing
import os
import pathlib
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

try:
    import litserve as ls
    from fastapi import BackgroundTasks, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from litserve.specs.openai import (
        ChatCompletionChunk,
        ChatCompletionRequest,
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatCompletionStreamingChoice,
        ChatMessage,
        ChoiceDelta,
        ImageContent,
        OpenAISpec,
        TextContent,
        UsageInfo,
    )
    from litserve.utils import LitAPIStatus
    from pydantic import ConfigDict
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        f"dimple-serve needs the `serve` extra (LitServe): pip install -e '.[serve]' ({error})"
    ) from error

logger = logging.getLogger("dimple.serve")

#: Dimple's decoding settings a request may give in its body (the OpenAI client's `extra_body`).
DIMPLE_SETTINGS = ("steps", "alg", "alg_p_threshold", "block_length", "dual_cache", "stop_at_eos")
RANDOM_ALGORITHMS = ("origin", "origin-ratio")  # choose positions at random
MAX_STOP_STRINGS = 4
REFUSED_FIELDS = {  # OpenAI fields this server cannot honour: refused rather than silently ignored
    "tools": "tool calls are not supported",
    "logprobs": "log-probabilities are not returned",
    "response_format": "only plain text responses are supported",
}


# --------------------------------------------------------------------------------------------------
# Errors in OpenAI's format
# --------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the server refuses: status 400 (unless told), a message naming the field (`param`)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def as_dict(self) -> dict:
        return {"message": self.message, "param": self.param, "code": self.code, "status": self.status}

    @classmethod
    def from_dict(cls, values: dict) -> "RequestError":
        return cls(values["message"], values.get("param"), values.get("code"), values.get("status", 400))


def error_body(message: str, status: int, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.status, error.param, error.code), status_code=error.status)


async def _request_error_handler(request, error: RequestError):
    return error_response(error)


async def _validation_error_handler(request, error: RequestValidationError):
    """FastAPI's 422 for a body that does not fit the schema, as OpenAI's 400 naming the field."""
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request body"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else f"invalid request body: {first.get('msg')}"
    return error_response(RequestError(message, param, "invalid_value"))


async def _http_error_handler(request, error: StarletteHTTPException):
    return JSONResponse(error_body(str(error.detail), error.status_code), status_code=error.status_code,
                        headers=getattr(error, "headers", None))


# --------------------------------------------------------------------------------------------------
# The request body
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# State shared by the HTTP processes and the inference workers
# --------------------------------------------------------------------------------------------------


class SharedState:
    """Cancelled request ids (written by the HTTP side, read by the workers at every step) and the workers'
    counters (written by each worker under its own keys, summed by `/metrics`). Two dicts of a
    `multiprocessing.Manager`, whose proxies travel to LitServe's spawned workers and forked HTTP servers."""

    COUNTERS = ("decoding_steps", "batches", "rows_decoded", "rows_cancelled", "rows_stopped")

    def __init__(self, manager):
        self.cancelled = manager.dict()
        self.counters = manager.dict()

    def cancel(self, request_id: str) -> None:
        now = time.time()
        try:
            self.cancelled[request_id] = now
            # a request that ended in the worker just before its client left stays listed: drop old entries
            if len(self.cancelled) > 1024:
                for key, when in list(self.cancelled.items()):
                    if now - when > 600:
                        self.cancelled.pop(key, None)
        except (OSError, EOFError, BrokenPipeError):  # shutting down
            pass

    def totals(self) -> dict:
        totals = dict.fromkeys(self.COUNTERS, 0)
        for key, value in dict(self.counters).items():
            name = key.split("/", 1)[-1]
            if name in totals:
                totals[name] += value
        return totals


# --------------------------------------------------------------------------------------------------
# Messages -> the processor's conversation
# --------------------------------------------------------------------------------------------------


def _open_image_bytes(data: bytes, param: str):
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
            return image.copy() if image is opened else image
    except Exception as error:  # noqa: BLE001 (PIL raises many kinds)
        raise RequestError(f"{param}: the image does not decode ({error})", param, "invalid_image") from error


def load_image_url(url: str, param: str, image_folder: Optional[str]):
    """A PIL image from an `image_url`: a base64 `data:` URL, or a local file under `image_folder` (a path or a
    `file://` URL). Remote URLs are refused: the server fetches nothing."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param}: expected a data: URL or a file path", param, "invalid_image_url")
    lowered = url[:16].lower()
    if lowered.startswith(("http://", "https://", "ftp://")):
        raise RequestError(
            f"{param}: remote image URLs are not fetched by this server; send the image as a base64 "
            "data: URL (data:image/png;base64,...)", param, "remote_url_refused",
        )
    if lowered.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise RequestError(f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param,
                               "invalid_image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(f"{param}: the data: URL is not valid base64 ({error})", param,
                               "invalid_image_url") from error
        return _open_image_bytes(data, param)
    if image_folder is None:
        raise RequestError(
            f"{param}: local image paths are not allowed by this server (start it with --image-folder); send "
            "the image as a base64 data: URL", param, "local_path_refused",
        )
    path = url[len("file://"):] if lowered.startswith("file://") else url
    if "://" in path:
        raise RequestError(f"{param}: unsupported URL scheme in {url[:40]!r}", param, "invalid_image_url")
    root = os.path.realpath(image_folder)
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root:
        raise RequestError(f"{param}: {path!r} is outside the server's image folder", param, "local_path_refused")
    if not os.path.isfile(resolved):
        raise RequestError(f"{param}: no image file {path!r} in the server's image folder", param, "invalid_image")
    with open(resolved, "rb") as file:
        return _open_image_bytes(file.read(), param)


def to_conversation(messages, image_folder: Optional[str]) -> list:
    """OpenAI messages -> the processor's conversation (images opened). Raises RequestError naming the part."""
    if not messages:
        raise RequestError("messages: at least one message is required", "messages", "invalid_value")
    conversation = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.role
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}.role: must be 'system', 'user' or 'assistant', got {message.role!r}",
                               f"{where}.role", "invalid_value")
        if message.tool_calls or message.tool_call_id:
            raise RequestError(f"{where}: tool calls are not supported", f"{where}.tool_calls", "unsupported")
        content = message.content
        if content is None:
            raise RequestError(f"{where}.content: is required", f"{where}.content", "invalid_value")
        if isinstance(content, str):
            conversation.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        items = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            if isinstance(part, TextContent) and part.type == "text":
                items.append({"type": "text", "text": part.text})
            elif isinstance(part, ImageContent) and part.type == "image_url":
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                items.append({"type": "image", "image": load_image_url(url, f"{param}.image_url", image_folder)})
            else:
                kind = getattr(part, "type", type(part).__name__)
                raise RequestError(f"{param}.type: must be 'text' or 'image_url', got {kind!r}", f"{param}.type",
                                   "invalid_value")
        conversation.append({"role": role, "content": items})
    return conversation


# --------------------------------------------------------------------------------------------------
# The worker: requests -> rows of a batch -> settled text
# --------------------------------------------------------------------------------------------------


def stop_holdback(text: str, stops: tuple) -> int:
    """How many characters at the end of `text` could begin a stop string (held back while streaming)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


@dataclass
class Row:
    """One request in a worker: its inputs, settings, and the answer as it settles."""

    request_id: str
    inputs: Optional[dict] = None  # the processor's output (batch 1)
    settings: dict = field(default_factory=dict)  # diffusion_generate keyword arguments
    stops: tuple = ()
    seed: Optional[int] = None
    random: bool = False  # decoding draws random numbers (sampling or a random alg)
    error: Optional[RequestError] = None
    prompt_tokens: int = 0
    # the answer
    settled: int = 0  # tokens settled (left of the first mask, before the end-of-text)
    text: str = ""  # the settled text (cut at a stop string)
    sent: int = 0  # characters of `text` sent
    finished: bool = False
    finish_reason: Optional[str] = None
    forward_passes: int = 0
    reported: bool = False  # the final item was yielded
    cancelled: bool = False
    error_info: Optional[dict] = None  # a decoding failure (500)

    def group_key(self):
        if self.random and self.seed is not None:
            return ("seeded", self.request_id)  # decodes alone, with its own generator
        return tuple(sorted((k, repr(v)) for k, v in self.settings.items()))


class DimpleAPI(ls.LitAPI):
    """LitServe's inference worker for Dimple (one per device and `workers_per_device`)."""

    def __init__(self, model_path: str, shared: SharedState, dtype: str = "auto", image_folder: Optional[str] = None,
                 threads: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.model_path, self.shared, self.dtype_name = model_path, shared, dtype
        self.image_folder, self.threads = image_folder, threads

    # ---- setup
    def setup(self, device):
        from dimple.modeling_dimple import DimpleModel
        from dimple.processing_dimple import DimpleProcessor

        if self.threads:
            torch.set_num_threads(self.threads)
        self.device = device
        dtype = {"auto": torch.bfloat16 if str(device).startswith("cuda") else torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[self.dtype_name]
        self.processor = DimpleProcessor.from_pretrained(self.model_path, trust_remote_code=True)
        self.model = DimpleModel.from_pretrained(self.model_path, dtype=dtype).to(device).eval()
        tokenizer = self.processor.tokenizer
        self.tokenizer = tokenizer
        self.answer_end_ids = {tokenizer.pad_token_id, tokenizer.eos_token_id} - {None}  # as decode_answers
        config = self.model.config
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(
            getattr(config, "text_config", None), "max_position_embeddings", None)
        self.worker_key = f"{os.getpid()}"
        self.totals = dict.fromkeys(SharedState.COUNTERS, 0)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _count(self, **increments) -> None:
        for name, value in increments.items():
            self.totals[name] += value
        try:  # one round trip to the manager
            self.shared.counters.update({f"{self.worker_key}/{name}": self.totals[name] for name in increments})
        except (OSError, EOFError, BrokenPipeError):
            pass

    def _cancelled_ids(self) -> set:
        try:
            return set(self.shared.cancelled.keys())
        except (OSError, EOFError, BrokenPipeError):
            return set()

    # ---- requests
    def decode_request(self, request):
        """The request as a `Row`; never raises (a batch must not fail for one bad request): a bad request is a
        row holding its error."""
        row = Row(request_id=getattr(request, "dimple_request_id", None) or uuid.uuid4().hex)
        try:
            self._prepare(row, request)
        except RequestError as error:
            row.error = error
        except Exception as error:  # noqa: BLE001
            logger.exception("could not prepare request %s", row.request_id)
            row.error = RequestError(f"could not prepare the request: {error}", None, "internal_error", 500)
        return row

    def _settings(self, request) -> tuple[dict, bool]:
        """The decode's settings: the checkpoint's generation config, overlaid with what the request gives,
        checked by the decoder's own `DimpleGenerationConfig.validate` (its message names the setting)."""
        from dimple.generation_utils import DimpleGenerationConfig, fields_set_by

        given = request.model_fields_set
        settings = {}
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        if max_tokens is not None:
            settings["max_new_tokens"] = max_tokens
        if "temperature" in given and request.temperature is not None:
            settings["temperature"] = request.temperature
        if "top_p" in given and request.top_p is not None:
            settings["top_p"] = request.top_p
        for key in DIMPLE_SETTINGS:
            value = getattr(request, key, None)
            if value is not None:
                settings[key] = value
        values = fields_set_by(self.model.generation_config) if self.model.generation_config is not None else {}
        values.update(settings)
        try:
            config = DimpleGenerationConfig(**values)
            config.validate()
        except (ValueError, TypeError) as error:
            message = str(error)
            name = re.match(r"`(\w+)`", message)
            param = name.group(1) if name else None
            if param == "max_new_tokens":
                param, message = "max_tokens", message.replace("`max_new_tokens`", "`max_tokens`")
            raise RequestError(message, param, "invalid_value") from error
        resolved = {key: getattr(config, key) for key in ("max_new_tokens", "temperature", "top_p") + DIMPLE_SETTINGS}
        random = bool(config.temperature) or config.alg in RANDOM_ALGORITHMS or bool(config.alg_temp)
        return resolved, random

    def _prepare(self, row: Row, request) -> None:
        if request.n not in (None, 1):
            raise RequestError(f"n: only 1 choice per request is supported, got {request.n}", "n", "invalid_value")
        for name, reason in REFUSED_FIELDS.items():
            value = getattr(request, name, None)
            if value and not (name == "response_format" and getattr(value, "type", None) == "text"):
                raise RequestError(f"{name}: {reason}", name, "unsupported")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(request, name, None)
            if value:
                raise RequestError(f"{name}: not supported by diffusion decoding (must be 0)", name, "unsupported")
        seed = request.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise RequestError(f"seed: must be an integer in [0, 2**63), got {seed!r}", "seed", "invalid_value")
        stops = request.stop
        stops = (stops,) if isinstance(stops, str) else tuple(stops or ())
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise RequestError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings, got {list(stops)!r}", "stop",
                               "invalid_value")
        row.settings, row.random = self._settings(request)
        row.seed, row.stops = seed, stops
        conversation = to_conversation(request.messages, self.image_folder)
        try:
            inputs = self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                split_special_tokens=True,  # the users' text is plain text: no special tokens from it
            )
        except ValueError as error:
            raise RequestError(f"messages: {error}", "messages", "invalid_value") from error
        row.prompt_tokens = int(inputs["input_ids"].shape[1])
        canvas = row.settings["max_new_tokens"]
        if self.max_positions is not None and row.prompt_tokens + canvas > self.max_positions:
            if canvas >= self.max_positions:
                raise RequestError(f"max_tokens: {canvas} leaves no room for the prompt in the model's "
                                   f"{self.max_positions} positions", "max_tokens", "invalid_value")
            raise RequestError(
                f"messages: the prompt is too long: {row.prompt_tokens} tokens + max_tokens {canvas} exceed the "
                f"model's {self.max_positions} positions", "messages", "context_length_exceeded",
            )
        row.inputs = dict(inputs)

    def batch(self, inputs):
        return list(inputs)

    # ---- decoding
    def predict(self, x):
        """Yields, for every row, one item per update: first an acceptance (or the row's error), then the new
        settled text, then a final item with the usage. A list of items when batching, else one item."""
        batched = isinstance(x, list)
        rows = x if batched else [x]

        def items(make):
            values = [make(row) for row in rows]
            return values if batched else values[0]

        yield items(lambda row: {"role": "assistant", "content": "", "dimple_error": row.error.as_dict()}
                    if row.error else {"role": "assistant", "content": ""})
        live = [row for row in rows if row.error is None]
        groups: dict = {}
        for row in live:
            groups.setdefault(row.group_key(), []).append(row)
        for group in groups.values():
            cancelled = self._cancelled_ids()
            for row in group:
                if row.request_id in cancelled:
                    row.cancelled = row.finished = True
            group = [row for row in group if not row.cancelled]
            if not group:
                continue
            updates: queue.Queue = queue.Queue()
            thread = threading.Thread(target=self._decode_group, args=(group, updates), daemon=True)
            thread.start()
            while True:
                changed = updates.get()  # {row: item} after a step (in step order), None at the end
                if changed is None:
                    break
                out = [changed.get(id(row)) or {"role": "assistant", "content": ""} for row in rows]
                yield out if batched else out[0]
            thread.join()
        for row in live:
            if row.cancelled:
                try:
                    self.shared.cancelled.pop(row.request_id, None)
                except (OSError, EOFError, BrokenPipeError):
                    pass

    def _take(self, row: Row) -> dict:
        """The row's item now: its unsent settled text, and the usage once it has finished."""
        if row.error is not None or row.reported or row.cancelled:
            return {"role": "assistant", "content": ""}
        text = row.text
        if not row.finished:
            end = len(text) - stop_holdback(text, row.stops)
            while end > row.sent and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
            text = text[:end]
        delta = text[row.sent:]
        row.sent = max(row.sent, len(text))
        if not row.finished:
            return {"role": "assistant", "content": delta}
        row.reported = True
        if row.finish_reason == "error":
            return {"role": "assistant", "content": delta, "dimple_error": row.error_info}
        return {
            "role": "assistant", "content": delta,
            "prompt_tokens": row.prompt_tokens, "completion_tokens": row.settled,
            "total_tokens": row.prompt_tokens + row.settled,
            "dimple": {"forward_passes": row.forward_passes, "finish_reason": row.finish_reason},
        }

    def _collate(self, group: list) -> dict:
        """The rows' processor outputs as one left-padded batch (images in row order)."""
        width = max(row.inputs["input_ids"].shape[1] for row in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, row in enumerate(group):
            n = row.inputs["input_ids"].shape[1]
            ids[i, width - n:] = row.inputs["input_ids"][0]
            mask[i, width - n:] = row.inputs["attention_mask"][0] if "attention_mask" in row.inputs else 1
        batch = {"input_ids": ids, "attention_mask": mask}
        with_images = [row.inputs for row in group if row.inputs.get("pixel_values") is not None]
        if with_images:
            batch["pixel_values"] = torch.cat([inputs["pixel_values"] for inputs in with_images])
            batch["image_grid_thw"] = torch.cat([inputs["image_grid_thw"] for inputs in with_images])
        batch = {key: value.to(self.model.device) for key, value in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return batch

    def _decode_group(self, group: list, updates: queue.Queue) -> None:
        """One `diffusion_generate` call for rows that decode alike (run in a thread; `predict` yields what it
        puts in `updates`: after every step, the items of the rows whose answer grew or ended). After every step
        the decoder asks `stopping_criteria`, which reads each row's settled answer from the canvas (one host
        copy per step) and marks done the rows that have ended (answer settled, stop string, client gone): their
        masks are never scored again, and decoding ends once every row is done."""

        def send():
            items = {id(row): self._take(row) for row in group}
            items = {key: item for key, item in items.items() if item.get("content") or len(item) > 2}
            if items:
                updates.put(items)

        try:
            inputs = self._collate(group)
            prompt_width = inputs["input_ids"].shape[1]
            mask_id = self.model.generation_config.mask_token_id or self.model.config.mask_token_id
            generator = None
            if group[0].random:
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(group[0].seed if group[0].seed is not None else secrets.randbits(63))
            passes = 0

            def rows_done(sequences, scores):
                nonlocal passes
                passes += 1
                canvases = sequences[:, prompt_width:].cpu().tolist()
                cancelled = self._cancelled_ids()
                for row, canvas in zip(group, canvases):
                    if row.finished:
                        continue
                    self._follow(row, canvas, mask_id, passes)
                    if not row.finished and row.request_id in cancelled:
                        row.cancelled = row.finished = True
                        row.finish_reason = "cancelled"
                        self._count(rows_cancelled=1)
                self._count(decoding_steps=1)
                send()
                return torch.tensor([row.finished for row in group], device=sequences.device)

            self._count(batches=1, rows_decoded=len(group))
            self.model.diffusion_generate(
                **inputs, **group[0].settings, generator=generator, stopping_criteria=rows_done,
                return_dict_in_generate=True,
            )
            for row in group:  # cannot happen with `dim` (it decodes until no mask is left): a safeguard
                if not row.finished:
                    row.finished, row.finish_reason, row.forward_passes = True, "length", passes
        except Exception as error:  # noqa: BLE001
            logger.exception("decoding failed")
            for row in group:
                if not row.finished:
                    row.finished, row.finish_reason = True, "error"
                    row.error_info = RequestError(f"decoding failed: {error}", None, "internal_error", 500).as_dict()
        finally:
            try:
                send()
            finally:
                updates.put(None)

    def _follow(self, row: Row, canvas: list, mask_id: int, passes: int) -> None:
        """Reads a row's answer canvas after a step: its settled tokens (left of the first mask, up to the first
        end-of-text) as text; the row ends when that answer can no longer change or a stop string appears."""
        end_ids = self.answer_end_ids
        first = next((i for i, token in enumerate(canvas) if token == mask_id or token in end_ids), len(canvas))
        complete = first == len(canvas) or canvas[first] in end_ids  # nothing left of the end is a mask
        if first > row.settled:
            row.settled = first
            text = self.tokenizer.decode(canvas[:first], skip_special_tokens=True)
            hits = [text.find(stop) for stop in row.stops if stop in text]
            if hits:
                row.text = text[: min(hits)]
                row.finished, row.finish_reason, row.forward_passes = True, "stop", passes
                self._count(rows_stopped=1)
                return
            row.text = text
        if complete:
            row.finished, row.forward_passes = True, passes
            row.finish_reason = "stop" if first < len(canvas) else "length"

    def encode_response(self, output):
        yield from output  # items are dicts already; the HTTP side (DimpleOpenAISpec) reads them


# --------------------------------------------------------------------------------------------------
# The HTTP side
# --------------------------------------------------------------------------------------------------


class DimpleUsage(UsageInfo):
    forward_passes: int = 0


class DimpleChatCompletionChunk(ChatCompletionChunk):
    usage: Optional[DimpleUsage] = None


class DimpleChatCompletionResponse(ChatCompletionResponse):
    usage: DimpleUsage


# (Starlette request, Dimple request id) of the chat completion being handled: get_from_queues and
# non_streaming_completion, which LitServe's chat_completion calls, watch that client for a disconnect.
_HTTP_REQUEST: contextvars.ContextVar = contextvars.ContextVar("dimple_http_request", default=(None, None))


class _ClientGone(Exception):
    pass


class _Pipe:
    """A request's stream of items from the worker (LitServe's response buffer entry), released when done."""

    def __init__(self, spec: "DimpleOpenAISpec", uid, stream):
        self.spec, self.uid, self.stream, self.pending = spec, uid, stream, []

    async def next(self, http_request: Optional[Request] = None):
        """The next (data, status), or None at the end. With `http_request`, raises _ClientGone when its client
        disconnects meanwhile (checked every 0.1 s)."""
        if self.pending:
            return self.pending.pop(0)
        task = asyncio.ensure_future(self.stream.__anext__())
        try:
            while True:
                finished, _ = await asyncio.wait({task}, timeout=0.1)
                if finished:
                    try:
                        return task.result()
                    except StopAsyncIteration:
                        return None
                if http_request is not None and await http_request.is_disconnected():
                    raise _ClientGone()
        finally:
            if not task.done():
                task.cancel()

    def close(self):
        self.spec.response_buffer.pop(self.uid, None)


def _item(data, status) -> dict:
    """A worker item (JSON) as a dict; a worker failure as a 500 error item."""
    if status == LitAPIStatus.ERROR:
        detail = getattr(data, "detail", None) or "internal server error"
        return {"content": "", "dimple_error": {"message": str(detail), "code": "internal_error",
                                                 "status": getattr(data, "status_code", 500) or 500}}
    return json.loads(data)


class DimpleOpenAISpec(OpenAISpec):
    """LitServe's `OpenAISpec` with Dimple's request fields, OpenAI-format errors (400 naming the field),
    `usage.forward_passes` and `finish_reason`, client disconnects passed on to the worker, `/v1/models` and
    `/metrics`."""

    def __init__(self, model_id: str, shared: SharedState, model_info: Optional[dict] = None):
        super().__init__()
        self.model_id, self.shared, self.model_info = model_id, shared, dict(model_info or {})
        self.created = int(time.time())

    def pre_setup(self, lit_api):
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        self.add_endpoint("/metrics", self.metrics, ["GET"])

    async def list_models(self):
        entry = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dimple",
                 **self.model_info}
        return {"object": "list", "data": [entry]}

    async def metrics(self):
        totals = await asyncio.to_thread(self.shared.totals)
        lines = []
        for name, value in totals.items():
            lines += [f"# TYPE dimple_{name}_total counter", f"dimple_{name}_total {value}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    def _cancel(self, request_id: Optional[str]) -> None:
        if request_id:
            self.shared.cancel(request_id)

    async def chat_completion(self, request: DimpleChatRequest, background_tasks: BackgroundTasks,
                              http_request: Request):
        if request.model and request.model != self.model_id:
            raise RequestError(f"model: this server serves {self.model_id!r}, not {request.model!r}", "model",
                               "model_not_found")
        if request.n not in (None, 1):
            raise RequestError(f"n: only 1 choice per request is supported, got {request.n}", "n", "invalid_value")
        request.model = self.model_id
        request.dimple_request_id = uuid.uuid4().hex
        _HTTP_REQUEST.set((http_request, request.dimple_request_id))
        return await super().chat_completion(request, background_tasks)

    async def get_from_queues(self, uids) -> list:
        """LitServe's per-request streams, after the worker's first item: a refused request raises its 400 here,
        before any response (streaming or not) has started."""
        http_request, request_id = _HTTP_REQUEST.get()
        pipes = [_Pipe(self, uid, self.data_streamer(q, event, send_status=True))
                 for uid, q, event in zip(uids, self.queues, self.events)]
        for pipe in pipes:
            try:
                first = await pipe.next(http_request)
            except _ClientGone:  # it left while its request waited: the worker skips it
                for p in pipes:
                    p.close()
                self._cancel(request_id)
                raise RequestError("client disconnected", None, "client_disconnected", 499)
            if first is not None:
                item = _item(*first)
                if "dimple_error" in item:
                    for p in pipes:
                        p.close()
                    raise RequestError.from_dict(item["dimple_error"])
                pipe.pending.append(first)
        return pipes

    async def streaming_completion(self, request: DimpleChatRequest, pipes: list):
        pipe, completed, first = pipes[0], False, True
        stream_id = f"chatcmpl-{request.dimple_request_id}"  # one id for all chunks, as OpenAI's
        try:
            while True:
                got = await pipe.next()
                if got is None:
                    break
                item = _item(*got)
                if "dimple_error" in item:
                    error = item["dimple_error"]
                    yield "data: " + json.dumps(error_body(error["message"], error.get("status", 500),
                                                           error.get("param"), error.get("code"))) + "\n\n"
                    completed = True
                    return
                content = item.get("content") or ""
                if content or first:
                    delta = ChoiceDelta(role="assistant", content=content) if first else ChoiceDelta(content=content)
                    chunk = DimpleChatCompletionChunk(
                        id=stream_id, model=self.model_id, usage=None,
                        choices=[ChatCompletionStreamingChoice(index=0, delta=delta, finish_reason=None)])
                    yield f"data: {chunk.model_dump_json(by_alias=True)}\n\n"
                    first = False
                if "dimple" in item:
                    usage = DimpleUsage(prompt_tokens=item["prompt_tokens"],
                                        completion_tokens=item["completion_tokens"],
                                        total_tokens=item["total_tokens"],
                                        forward_passes=item["dimple"]["forward_passes"])
                    last = DimpleChatCompletionChunk(
                        id=stream_id, model=self.model_id, usage=usage,
                        choices=[ChatCompletionStreamingChoice(index=0, delta=ChoiceDelta(),
                                                               finish_reason=item["dimple"]["finish_reason"])])
                    yield f"data: {last.model_dump_json(by_alias=True)}\n\n"
                    yield "data: [DONE]\n\n"
                    completed = True
                    return
            yield "data: " + json.dumps(error_body("the worker ended the stream without an answer", 500)) + "\n\n"
            completed = True
        finally:  # the client went away (Starlette cancels this generator) or the stream ended
            pipe.close()
            if not completed:
                self._cancel(request.dimple_request_id)

    async def non_streaming_completion(self, request: DimpleChatRequest, pipes: list):
        pipe, parts, final = pipes[0], [], None
        http_request, _ = _HTTP_REQUEST.get()
        try:
            while final is None:
                got = await pipe.next(http_request)
                if got is None:
                    break
                item = _item(*got)
                if "dimple_error" in item:
                    raise RequestError.from_dict(item["dimple_error"])
                parts.append(item.get("content") or "")
                if "dimple" in item:
                    final = item
        except _ClientGone:
            self._cancel(request.dimple_request_id)
            raise RequestError("client disconnected", None, "client_disconnected", 499)
        finally:
            pipe.close()
        if final is None:
            raise RequestError("the worker ended the request without an answer", None, "internal_error", 500)
        response = DimpleChatCompletionResponse(
            id=f"chatcmpl-{request.dimple_request_id}", model=self.model_id,
            choices=[ChatCompletionResponseChoice(
                index=0, message=ChatMessage(role="assistant", content="".join(parts)),
                finish_reason=final["dimple"]["finish_reason"])],
            usage=DimpleUsage(prompt_tokens=final["prompt_tokens"], completion_tokens=final["completion_tokens"],
                              total_tokens=final["total_tokens"],
                              forward_passes=final["dimple"]["forward_passes"]),
        )
        return JSONResponse(response.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimple-serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"),
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="default auto: bfloat16 on the GPU, float32 on the CPU")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="most requests decoded together (1: one at a time)")
    parser.add_argument("--batch-timeout", type=float, default=0.02,
                        help="seconds a worker waits for a batch to fill")
    parser.add_argument("--workers-per-device", type=int, default=1,
                        help="model copies per device (one per GPU is usual; a batch keeps a GPU busy)")
    parser.add_argument("--image-folder", default=None,
                        help="folder local image paths (or file:// URLs) may be read from (default: none allowed)")
    parser.add_argument("--queue-timeout", type=float, default=600,
                        help="seconds a request may wait in the queue before a 504")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per CPU worker (default: the cores / workers-per-device)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return parser


def check_args(parser, args) -> None:
    if not 1024 <= args.port <= 65535:
        parser.error(f"--port must be in [1024, 65535], got {args.port}")
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not (math.isfinite(args.batch_timeout) and args.batch_timeout >= 0):
        parser.error(f"--batch-timeout must be a number >= 0, got {args.batch_timeout}")
    if args.workers_per_device < 1:
        parser.error(f"--workers-per-device must be >= 1, got {args.workers_per_device}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        parser.error(f"--image-folder must be a folder, got {args.image_folder!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")


def model_info(model_path: str) -> dict:
    """What /v1/models says about the checkpoint: its context size and decoding defaults (local folders)."""
    info = {}
    folder = pathlib.Path(model_path)
    try:
        config = json.loads((folder / "config.json").read_text())
        info["max_model_len"] = config.get("max_position_embeddings")
        info["decoding_defaults"] = json.loads((folder / "generation_config.json").read_text())
        info["decoding_defaults"].pop("transformers_version", None)
    except (OSError, ValueError):
        pass
    return info


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads
    if device == "cpu" and threads is None:
        threads = max(1, (os.cpu_count() or 1) // args.workers_per_device)
    model_id = args.served_model_name or pathlib.Path(args.model.rstrip("/")).name or args.model
    logging.basicConfig(level=getattr(logging, args.log_level.upper()))

    manager = multiprocessing.Manager()
    shared = SharedState(manager)
    spec = DimpleOpenAISpec(model_id, shared, model_info(args.model))
    api = DimpleAPI(args.model, shared, dtype=args.dtype, image_folder=args.image_folder, threads=threads,
                    max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, spec=spec)
    # fast_queue: LitServe's ZeroMQ transport from the workers to the HTTP servers (the default goes through a
    # multiprocessing manager: a round trip per streamed item)
    server = ls.LitServer(api, accelerator=device, devices="auto", workers_per_device=args.workers_per_device,
                          timeout=args.queue_timeout, model_metadata={"model": model_id}, fast_queue=True)
    server.app.add_exception_handler(RequestError, _request_error_handler)
    server.app.add_exception_handler(RequestValidationError, _validation_error_handler)
    server.app.add_exception_handler(StarletteHTTPException, _http_error_handler)

    main_pid = os.getpid()

    def terminate(signum, frame):  # SIGTERM (docker stop, kill): LitServe's graceful shutdown, as on Ctrl-C
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked HTTP server inherited this handler: just exit
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, terminate)
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level=args.log_level)
    finally:
        manager.shutdown()


# --------------------------------------------------------------------------------------------------
# A server in a subprocess (tests, the load script)
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`dimple-serve` in its own process group on 127.0.0.1 and a free port; `with ServerProcess(...) as s:`
    waits until /health answers and always kills the whole group (LitServe's workers included) at the end."""

    def __init__(self, *args: str, startup_timeout: float = 180, log_path: Optional[str] = None, env=None):
        self.port = free_port()
        self.args = [sys.executable, "-m", "dimple_tools.serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.startup_timeout, self.log_path, self.env = startup_timeout, log_path, env
        self.process = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=self.env)
        finally:
            if self.log_path:
                log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dimple-serve exited with {self.process.returncode} before it was ready"
                                   + (f" (log: {self.log_path})" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"dimple-serve was not ready within {self.startup_timeout} s")

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return response.read().decode()

    def metric(self, name: str) -> int:
        match = re.search(rf"^dimple_{name}_total (\d+)$", self.get("/metrics"), re.MULTILINE)
        return int(match.group(1))

    def stop(self) -> None:
        """SIGTERM to the process group (LitServe's graceful shutdown), then SIGKILL to whatever is left."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        self.process = None

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    # `python -m dimple_tools.serve`: run the imported module's main, so that the classes LitServe pickles for its
    # spawned workers are `dimple_tools.serve.*`, not `__main__.*`.
    from dimple_tools.serve import main as _main

    _main()
