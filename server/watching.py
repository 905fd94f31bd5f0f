"""The newest events of the store, read once for every ``Watch``.

Every commit wakes every open ``Watch`` (``Store.changed``); if each read the
event log itself, 100 watches made 100 SQLite queries per commit, and 4,000
workers registering (a commit each) kept the stream threads busy for minutes.
:class:`EventTail` keeps the newest events in memory: after a commit the first
watch to ask reads what is new (one query, while the others wait for it) and
every watch slices what it needs. A watch further behind than the tail (a
client resuming from an old revision) reads the store itself until it catches
up. Revisions are gap-free, so a slice is index arithmetic, not a scan. An
event is converted and serialized once for every watch that sees it unchanged
(the admin's; a tenant's is redacted for it).
"""

from __future__ import annotations

import asyncio

from server import convert
from server.errors import FailedPrecondition
from server.store import Event, Store

TAIL_EVENTS = 4096  # kept; trimmed to this when twice as many
READ_BATCH = 1000  # events read from the store at a time


class EventTail:
    def __init__(self, store: Store, keep: int = TAIL_EVENTS) -> None:
        self._store = store
        self._keep = keep
        self._events: list[Event] = []
        self._encoded: dict[int, bytes] = {}  # revision -> the serialized apportion.v1.Event
        self._end = store.revision()  # the revision of the newest event read
        self._lock: asyncio.Lock | None = None

    def _first(self) -> int:
        """The revision of the oldest event kept (``_end + 1`` when none is)."""
        return self._events[0].revision if self._events else self._end + 1

    async def after(self, revision: int, limit: int) -> list[Event]:
        """At most ``limit`` events with revisions above ``revision``, oldest first (empty:
        none yet). Raises FailedPrecondition where the store compacted some of them away."""
        if revision + 1 < self._first():
            return await asyncio.to_thread(self._store.events_after, revision, limit)
        await self._catch_up()
        start = revision + 1 - self._first()
        return self._events[start : start + limit]

    async def _catch_up(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while self._store.revision() > self._end:
                try:
                    fresh = await asyncio.to_thread(self._store.events_after, self._end, READ_BATCH)
                except FailedPrecondition:  # fell behind compaction (not in practice): start over
                    self._events, self._end = [], self._store.revision()
                    return
                if not fresh:
                    return
                self._events.extend(fresh)
                self._end = fresh[-1].revision
                if len(self._events) > 2 * self._keep:
                    del self._events[: len(self._events) - self._keep]
                    first = self._events[0].revision
                    self._encoded = {r: b for r, b in self._encoded.items() if r >= first}

    def encoded(self, event: Event) -> bytes:
        """``event`` as the serialized message an admin's Watch sends (made once, shared)."""
        data = self._encoded.get(event.revision)
        if data is None:
            data = convert.event_message(event).SerializeToString()
            if self._events and event.revision >= self._events[0].revision:
                self._encoded[event.revision] = data
        return data
