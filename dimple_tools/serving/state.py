"""State shared by the HTTP processes and the inference workers: cancellations and counters."""

from __future__ import annotations

import time


class SharedState:
    """Cancelled request ids (written by the HTTP side, read by the workers at every step) and the workers'
    counters (written by each worker under its own keys, summed by `/metrics`). Two dicts of a
    `multiprocessing.Manager`, whose proxies travel to LitServe's spawned workers and forked HTTP servers."""

    COUNTERS = ("decoding_steps", "batches", "rows_decoded", "rows_cancelled", "rows_stopped", "rows_timed_out",
                "image_cache_hits", "image_cache_misses")

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
