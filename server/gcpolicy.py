"""Full garbage collections on a clock, not on allocation counts (``apportion serve`` only).

With 4,000 workers connected the server holds ~440,000 objects that live as long as
their streams (sessions, coroutines, tasks, futures). CPython's collector scans every
one of them in each generation-2 collection: ~330 ms on this machine, every ~15 s
under load, freeing nothing, while every call in flight waits (bench/streams.py).

The policy: the objects that survive a full collection are frozen (``gc.freeze``:
automatic collections never scan them again), and every :data:`FULL_INTERVAL_S` the
heap is unfrozen, collected once and frozen again, so a cycle that became garbage
while frozen (a worker that left) is freed within that interval. A full collection
that CPython starts by itself (the live objects grew) is followed by a freeze too.
The cost is one full pause per interval instead of one every few seconds, and at most
an interval's worth of cyclic garbage kept.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

log = logging.getLogger("apportion.server")

FULL_INTERVAL_S = 300.0


class Collector:
    def __init__(self, interval_s: float = FULL_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._full_done = threading.Event()  # set by the callback after an automatic full collection
        self._thread = threading.Thread(target=self._run, name="apportion-gc", daemon=True)

    def start(self) -> None:
        gc.callbacks.append(self._on_collection)
        self.collect_and_freeze()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._full_done.set()
        self._thread.join(5)
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        gc.unfreeze()  # back to CPython's own policy

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info.get("generation") == 2:
            self._full_done.set()  # freeze in the thread, not inside the collector

    def collect_and_freeze(self) -> None:
        """Unfreeze, collect everything, freeze the survivors."""
        start = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        log.debug(
            "full collection",
            extra={
                "freed": freed,
                "frozen": gc.get_freeze_count(),
                "ms": round(1000 * (time.perf_counter() - start)),
            },
        )

    def _run(self) -> None:
        next_full = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            if self._full_done.wait(max(0.0, next_full - time.monotonic())):
                self._full_done.clear()
                if self._stop.is_set():
                    return
                gc.freeze()  # the survivors of CPython's own full collection
                continue
            self.collect_and_freeze()
            next_full = time.monotonic() + self.interval_s
