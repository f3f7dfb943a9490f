"""Step-level continuous batching for `dimple-serve --batching continuous`.

LitServe's `ContinuousBatchingLoop` drives the worker: between two denoising passes it hands over the requests
that arrived (`add_request`), then calls `step`, whose outputs it streams to each request's client. The worker
holds one `RunningDecodeBatch` (generation_utils.py): a request joins it at the next pass, each row decodes at
its own step, and a row leaves as soon as its answer is settled, a stop string is met, its client went away or
its deadline passed, freeing its slot for the next request. Every row's tokens are those of decoding it alone.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time

import torch

from litserve.loops import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus

from dimple_tools.serving.errors import RequestError
from dimple_tools.serving.worker import DimpleAPI, Row

logger = logging.getLogger("dimple.serve")

ACCEPTED = {"role": "assistant", "content": ""}
IDLE_POLL_SECONDS = 0.002


class DimpleContinuousLoop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop, idle without spinning: LitServe calls `run` again at once while
    nothing decodes, which keeps a core busy (and the worker's GIL) between requests."""

    async def run(self, lit_api, *args, **kwargs):
        if not lit_api.has_active_requests():
            await asyncio.sleep(IDLE_POLL_SECONDS)
            return
        await super().run(lit_api, *args, **kwargs)


class ContinuousDimpleAPI(DimpleAPI):
    """`DimpleAPI` whose requests join and leave one running batch between passes (`max_batch_size` rows)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("loop", DimpleContinuousLoop())
        super().__init__(*args, **kwargs)

    def setup(self, device):
        super().setup(device)
        self.running = self.model.running_batch(max_rows=self.max_batch_size)
        self.mask_id = self.model.generation_config.mask_token_id or self.model.config.mask_token_id
        self.live: dict = {}  # uid -> Row, in the running batch
        self.joining: list = []  # (uid, Row) decoded by `add_request`, joining at the next step
        self.outbox: list = []  # Outputs of requests that never joined (refused)
        self.admitted = 0  # rows joining or in the running batch: the slots taken
        self.lock = threading.Lock()  # `add_request` runs on the loop's event-loop thread, `step` in another
        # The loop sends each step's items as they are (LitServe's OpenAISpec wants a generator at start-up).
        self.encode_response = lambda item: item

    # ---- the loop's protocol
    def has_capacity(self) -> bool:
        with self.lock:
            return self.admitted < self.max_batch_size

    def has_active_requests(self) -> bool:
        with self.lock:
            return bool(self.live or self.joining or self.outbox)

    def add_request(self, uid, request) -> None:
        row = self.decode_request(request)  # parsing, images and tokenization here, beside the running passes
        with self.lock:
            if row.error is not None:
                self.outbox += [Output(uid, {**ACCEPTED, "dimple_error": row.error.as_dict()}, LitAPIStatus.OK),
                                Output(uid, "", LitAPIStatus.FINISH_STREAMING)]
            else:
                self.joining.append((uid, row))
                self.admitted += 1

    def _settings(self, request) -> tuple[dict, bool]:
        """As `DimpleAPI`'s, with a fixed canvas: a request without max_tokens gets the checkpoint's
        (a running batch does not carry open-ended decoding, whose passes change shape block by block)."""
        if request.open_ended is True:
            raise RequestError("open_ended: not supported by this server's continuous batching (--batching "
                               "continuous); give max_tokens", "open_ended", "unsupported")
        if request.max_tokens is None and request.max_completion_tokens is None:
            request.max_tokens = self.model.generation_config.max_new_tokens
        return super()._settings(request)

    def step(self, prev_outputs) -> list:
        with self.lock:
            outputs, self.outbox = self.outbox, []
            joining, self.joining = self.joining, []
        for uid, row in joining:
            outputs += self._join(uid, row)
        outputs += self._leave_early()
        if len(self.running):
            with torch.inference_mode():
                updates = self.running.step()
            self._count(decoding_steps=1)
            for update in updates:
                outputs += self._follow_update(update)
            if not outputs and self.live:
                # LitServe's loop sleeps 10 ms after a step without outputs: one empty item (no chunk reaches the
                # client) keeps passes back to back while no answer grew.
                outputs.append(Output(next(iter(self.live)), dict(ACCEPTED), LitAPIStatus.OK))
        self._count_image_cache()
        return outputs

    # ---- rows
    def _join(self, uid, row: Row) -> list:
        inputs = self._collate([row])
        generator = None
        if row.random:
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(row.seed if row.seed is not None else secrets.randbits(63))
        try:
            self.running.add(uid, inputs, generator=generator, **row.settings)
        except ValueError as error:
            failure = RequestError(str(error), None, "invalid_value")
        except Exception:  # noqa: BLE001 (the client sees no internals: the log has them, by request id)
            logger.exception("could not start decoding request %s", row.request_id)
            failure = RequestError(f"decoding failed (request id {row.request_id}; the server's log has the cause)",
                                   None, "internal_error", 500)
        else:
            with self.lock:
                self.live[uid] = row
            self._count(batches=1, rows_decoded=1)
            return [Output(uid, dict(ACCEPTED), LitAPIStatus.OK)]
        with self.lock:
            self.admitted -= 1
        return [Output(uid, {**ACCEPTED, "dimple_error": failure.as_dict()}, LitAPIStatus.OK),
                Output(uid, "", LitAPIStatus.FINISH_STREAMING)]

    def _leave_early(self) -> list:
        """Rows whose client went away or whose deadline passed leave the batch before the pass."""
        outputs, cancelled, now = [], self._cancelled_ids(), time.monotonic()
        for uid, row in list(self.live.items()):
            if row.request_id in cancelled:
                row.cancelled = row.finished = True
                row.finish_reason = "cancelled"
                self._count(rows_cancelled=1)
                try:
                    self.shared.cancelled.pop(row.request_id, None)
                except (OSError, EOFError, BrokenPipeError):
                    pass
            elif now > row.deadline:
                self._time_out(row, row.forward_passes)
            else:
                continue
            outputs += self._finish(uid, row)
        return outputs

    def _follow_update(self, update) -> list:
        row = self.live[update.key]
        row.forward_passes = update.passes  # its own passes so far (the usage of an answer that ends early)
        if update.error is not None:
            logger.error("decoding failed (request %s): %s", row.request_id, update.error)
            row.finished, row.finish_reason = True, "error"
            row.error_info = RequestError(f"decoding failed (request id {row.request_id}): {update.error}", None,
                                          "internal_error", 500).as_dict()
        else:
            self._follow(row, update.canvas.tolist(), self.mask_id, update.passes)
            if update.finished and not row.finished:  # its steps are spent with masks left (a safeguard)
                row.finished, row.finish_reason, row.forward_passes = True, "length", update.passes
        if row.finished:
            return self._finish(update.key, row)
        item = self._take(row)
        return [Output(update.key, item, LitAPIStatus.OK)] if item.get("content") else []

    def _finish(self, uid, row: Row) -> list:
        """The row leaves the batch (if still in it): its last item, then the end of its stream."""
        if uid in self.running:
            self.running.remove(uid)
        with self.lock:
            if self.live.pop(uid, None) is not None:
                self.admitted -= 1
        outputs = [] if row.cancelled else [Output(uid, self._take(row), LitAPIStatus.OK)]
        return outputs + [Output(uid, "", LitAPIStatus.FINISH_STREAMING)]

    def _count_image_cache(self) -> None:
        hits, misses = self.image_cache.hits, self.image_cache.misses
        counted_hits, counted_misses = self.image_cache_counted
        if (hits, misses) != (counted_hits, counted_misses):
            self.image_cache_counted = (hits, misses)
            self._count(image_cache_hits=hits - counted_hits, image_cache_misses=misses - counted_misses)
