"""The server's collection policy (server.gcpolicy): survivors frozen, cycles still freed."""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

from server.gcpolicy import Collector


class Node:
    def __init__(self) -> None:
        self.other: Any = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_survivors_are_frozen_and_a_frozen_cycle_is_freed_by_the_next_full_collection() -> None:
    collector = Collector(interval_s=2.0)  # the first periodic one comes well after the checks below
    try:
        collector.start()
        assert gc.get_freeze_count() > 0  # start-up's survivors: out of automatic collections
        dead_later = cycle()
        keep = dead_later()
        collector.collect_and_freeze()  # the cycle is alive: frozen with the rest
        del keep  # now it is garbage, but frozen
        gc.collect()
        assert dead_later() is not None  # a frozen object is not collected, even when garbage
        deadline = time.monotonic() + 10
        while dead_later() is not None:
            assert time.monotonic() < deadline, "the periodic full collection did not free the cycle"
            time.sleep(0.05)
    finally:
        collector.stop()
    assert gc.get_freeze_count() == 0
    assert collector._on_collection not in gc.callbacks


def test_a_full_collection_cpython_starts_is_followed_by_a_freeze() -> None:
    collector = Collector(interval_s=3600)
    try:
        collector.start()
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        gc.collect()  # generation 2, as CPython's own would be
        deadline = time.monotonic() + 5
        while gc.get_freeze_count() == 0:
            assert time.monotonic() < deadline, "no freeze after a full collection"
            time.sleep(0.05)
    finally:
        collector.stop()
