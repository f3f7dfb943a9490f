"""The inference worker (`DimpleAPI`): requests -> rows of a batch -> settled text, streamed per step."""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

import litserve as ls

from dimple_tools.serving.request import (DIMPLE_SETTINGS, MAX_STOP_STRINGS, RANDOM_ALGORITHMS, REFUSED_FIELDS,
                                          asks_for_unsupported)
from dimple_tools.length import DEFAULT_BOUND, open_ended_settings
from dimple_tools.serving.errors import RequestError
from dimple_tools.serving.image_cache import IMAGE_CACHE_SIZE, ImageFeatureCache
from dimple_tools.serving.state import SharedState
from dimple_tools.serving.messages import MAX_IMAGE_PIXELS, MAX_IMAGES, plain_text, to_conversation

# The bound of an answer whose request gives no max_tokens (decoded open-ended); `dimple-serve --open-ended-max-tokens`.
OPEN_ENDED_MAX_TOKENS = DEFAULT_BOUND
# Largest max_tokens and steps a request may ask for (`--max-tokens-limit`, `--max-steps`): one request with 512
# steps would otherwise hold a worker for minutes while the requests behind it wait.
MAX_TOKENS_LIMIT = 1024
MAX_REQUEST_STEPS = 1024
# Seconds a request may decode (`--request-timeout`); one still decoding then ends with a 504 error.
REQUEST_TIMEOUT = 300.0

logger = logging.getLogger("dimple.serve")


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
    completion_tokens: int = 0  # the tokens of `text` (a stop string's cut drops those after it)
    sent: int = 0  # characters of `text` sent
    finished: bool = False
    finish_reason: Optional[str] = None
    forward_passes: int = 0
    reported: bool = False  # the final item was yielded
    cancelled: bool = False
    error_info: Optional[dict] = None  # a decoding failure (500) or the deadline (504)
    deadline: float = float("inf")  # time.monotonic() by which the answer must be decoded

    def group_key(self):
        if self.random and self.seed is not None:
            return ("seeded", self.request_id)  # decodes alone, with its own generator
        return tuple(sorted((k, repr(v)) for k, v in self.settings.items()))


class DimpleAPI(ls.LitAPI):
    """LitServe's inference worker for Dimple (one per device and `workers_per_device`)."""

    def __init__(self, model_path: str, shared: SharedState, dtype: str = "auto", image_folder: Optional[str] = None,
                 threads: Optional[int] = None, open_ended_max_tokens: int = OPEN_ENDED_MAX_TOKENS,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_images: int = MAX_IMAGES,
                 max_tokens_limit: int = MAX_TOKENS_LIMIT, max_steps: int = MAX_REQUEST_STEPS,
                 image_cache_size: int = IMAGE_CACHE_SIZE, decode_timeout: float = REQUEST_TIMEOUT, **kwargs):
        super().__init__(**kwargs)
        self.model_path, self.shared, self.dtype_name = model_path, shared, dtype
        self.image_folder, self.threads = image_folder, threads
        self.open_ended_max_tokens = open_ended_max_tokens
        self.max_image_pixels, self.max_images = max_image_pixels, max_images
        self.max_tokens_limit, self.max_steps = max_tokens_limit, max_steps
        self.image_cache_size = image_cache_size
        self.decode_timeout = decode_timeout  # not `request_timeout`: LitServer sets that attribute to its queue timeout

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
        self.image_cache = ImageFeatureCache(self.image_cache_size)
        if self.image_cache_size > 0:
            self.image_cache.install(self.model)
        self.image_cache_counted = (0, 0)
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
        row = Row(request_id=getattr(request, "dimple_request_id", None) or uuid.uuid4().hex,
                  deadline=time.monotonic() + self.decode_timeout)
        try:
            self._prepare(row, request)
        except RequestError as error:
            row.error = error
        except Exception:  # noqa: BLE001 (the client sees no internals: the log has them, by request id)
            logger.exception("could not prepare request %s", row.request_id)
            row.error = RequestError(f"the server failed to prepare the request (request id {row.request_id}; "
                                     "the server's log has the cause)", None, "internal_error", 500)
        return row

    def _settings(self, request) -> tuple[dict, bool]:
        """The decode's settings: the checkpoint's generation config, overlaid with what the request gives,
        checked by the decoder's own `DimpleGenerationConfig.validate` (its message names the setting)."""
        from dimple.generation_utils import DimpleGenerationConfig, fields_set_by

        given = request.model_fields_set
        settings = {}
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        if max_tokens is not None:
            if isinstance(max_tokens, int) and max_tokens > self.max_tokens_limit:
                name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
                raise RequestError(f"{name}: at most {self.max_tokens_limit} on this server (--max-tokens-limit), got "
                                   f"{max_tokens}", name, "invalid_value")
            settings["max_new_tokens"] = max_tokens
        if isinstance(request.steps, int) and not isinstance(request.steps, bool) and request.steps > self.max_steps:
            raise RequestError(f"steps: at most {self.max_steps} on this server (--max-steps), got {request.steps}",
                               "steps", "invalid_value")
        checkpoint = fields_set_by(self.model.generation_config) if self.model.generation_config is not None else {}
        if max_tokens is None and request.open_ended in (None, True):
            # No max_tokens: as long as the answer needs, up to the server's bound (a request's `steps` still wins)
            settings.update(open_ended_settings(self.model.generation_config, self.open_ended_max_tokens))
            if request.steps is not None:
                settings.pop("steps", None)
        if "temperature" in given and request.temperature is not None:
            settings["temperature"] = request.temperature
        if "top_p" in given and request.top_p is not None:
            settings["top_p"] = request.top_p
        for key in DIMPLE_SETTINGS:
            value = getattr(request, key, None)
            if value is not None:
                settings[key] = value
        values = dict(checkpoint)
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
        if config.open_ended and config.stop_at_eos is False and "stop_at_eos" in settings:
            raise RequestError("stop_at_eos: must not be false for an open-ended answer (no max_tokens, or open_ended "
                               "true: the answer ends at its end-of-text); give max_tokens for a fixed canvas",
                               "stop_at_eos", "invalid_value")
        resolved = {key: getattr(config, key) for key in ("max_new_tokens", "temperature", "top_p") + DIMPLE_SETTINGS}
        if resolved["open_ended"]:
            resolved["stop_at_eos"] = True  # implied (the config's default False would be an explicit contradiction)
        random = bool(config.temperature) or config.alg in RANDOM_ALGORITHMS or bool(config.alg_temp)
        return resolved, random

    def _prepare(self, row: Row, request) -> None:
        if request.n not in (None, 1):
            raise RequestError(f"n: only 1 choice per request is supported, got {request.n}", "n", "invalid_value")
        for name, reason in REFUSED_FIELDS.items():
            if asks_for_unsupported(name, getattr(request, name, None)):
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
        for stop in stops:
            plain_text(stop, "stop", "stop string")
        row.settings, row.random = self._settings(request)
        row.seed, row.stops = seed, stops
        conversation = to_conversation(request.messages, self.image_folder, self.max_image_pixels, self.max_images)
        try:
            inputs = self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                split_special_tokens=True,  # the users' text is plain text: no special tokens from it
            )
        except ValueError as error:
            raise RequestError(f"messages: {error}", "messages", "invalid_value") from error
        row.prompt_tokens = int(inputs["input_ids"].shape[1])
        canvas = row.settings["max_new_tokens"]
        if row.settings["open_ended"] and self.max_positions is not None:  # a bound: what the positions leave
            canvas = row.settings["max_new_tokens"] = max(1, min(canvas, self.max_positions - row.prompt_tokens))
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
            "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens,
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
                cancelled, now = self._cancelled_ids(), time.monotonic()
                for row, canvas in zip(group, canvases):
                    if row.finished:
                        continue
                    self._follow(row, canvas, mask_id, passes)
                    if not row.finished and row.request_id in cancelled:
                        row.cancelled = row.finished = True
                        row.finish_reason = "cancelled"
                        self._count(rows_cancelled=1)
                    elif not row.finished and now > row.deadline:  # its masks are not scored again
                        self._time_out(row, passes)
                self._count(decoding_steps=1)
                send()
                return torch.tensor([row.finished for row in group], device=sequences.device)

            self._count(batches=1, rows_decoded=len(group))
            self.model.diffusion_generate(
                **inputs, **group[0].settings, generator=generator, stopping_criteria=rows_done,
                return_dict_in_generate=True,
            )
            hits, misses = self.image_cache.hits, self.image_cache.misses
            counted_hits, counted_misses = self.image_cache_counted
            self.image_cache_counted = (hits, misses)
            self._count(image_cache_hits=hits - counted_hits, image_cache_misses=misses - counted_misses)
            for row in group:  # cannot happen with `dim` (it decodes until no mask is left): a safeguard
                if not row.finished:
                    row.finished, row.finish_reason, row.forward_passes = True, "length", passes
        except Exception:  # noqa: BLE001
            logger.exception("decoding failed (requests %s)", ", ".join(row.request_id for row in group))
            for row in group:
                if not row.finished:
                    row.finished, row.finish_reason = True, "error"
                    row.error_info = RequestError(
                        f"decoding failed (request id {row.request_id}; the server's log has the cause)", None,
                        "internal_error", 500).as_dict()
        finally:
            try:
                send()
            finally:
                updates.put(None)

    def _time_out(self, row: Row, passes: int) -> None:
        """The row ends with a 504 `request_timeout`: it was still decoding at its deadline."""
        row.finished, row.finish_reason, row.forward_passes = True, "error", passes
        row.error_info = RequestError(
            f"the request was still decoding after --request-timeout ({self.decode_timeout:g} s; request id "
            f"{row.request_id})", None, "request_timeout", 504, "timeout").as_dict()
        self._count(rows_timed_out=1)

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
                row.completion_tokens = self._tokens_up_to(canvas[:first], min(hits))
                row.finished, row.finish_reason, row.forward_passes = True, "stop", passes
                self._count(rows_stopped=1)
                return
            row.text, row.completion_tokens = text, first
        if complete:
            row.finished, row.forward_passes = True, passes
            row.finish_reason = "stop" if first < len(canvas) else "length"

    def _tokens_up_to(self, tokens: list, length: int) -> int:
        """How many of `tokens` have text within the first `length` characters of their decoded text (a token cut
        by a stop string counts): the fewest whose text reaches `length`. A binary search, since the decoded
        length grows with the tokens (a trailing half UTF-8 character, one replacement mark, is not counted)."""
        low, high = 0, len(tokens)
        while low < high:
            middle = (low + high) // 2
            text = self.tokenizer.decode(tokens[:middle], skip_special_tokens=True)
            if len(text.rstrip("\ufffd")) >= length:
                high = middle
            else:
                low = middle + 1
        return low

    def encode_response(self, output):
        yield from output  # items are dicts already; the HTTP side (DimpleOpenAISpec) reads them
