"""The durable state of ``apportion serve``: an embedded SQLite database in WAL mode.

The store keeps plain JSON-able dicts (the canonical proto JSON mapping of the
``apportion.v1`` messages, produced by ``server/convert.py``); it never sees
protobuf or solver types. Its callers are the servicers, the control loop and
the worker protocol; domain errors are :mod:`server.errors` exceptions.

Design decisions
================

Durability. The database runs in WAL mode with ``synchronous=FULL``: a commit
fsyncs the write-ahead log before it returns, and a write call returns only
after the commit of the transaction that holds it. Killing the process at any
moment (SIGKILL, power loss on a disk that honours fsync) and reopening loses
nothing that a write call returned for; SQLite recovers the WAL on open.

One writer, group commit. All writes go through one writer thread and one
connection. A caller turns its write into an operation (a function of the
open transaction), enqueues it and blocks on a future. The writer takes every
queued operation (at most :data:`MAX_BATCH`), runs each inside its own
``SAVEPOINT`` in one ``BEGIN IMMEDIATE`` transaction, commits once (one fsync
for the whole batch), and only then resolves the futures. An operation that
raises (a :class:`~server.errors.ServiceError`, or anything else) is rolled
back to its savepoint alone and its caller gets the exception; the others in
the batch commit. If the commit itself fails, every caller of the batch gets
that error and nothing of the batch is kept. Under load the batches grow, so
fsyncs per second stay bounded while writes per second scale with the queue.

Reads. Each reading thread has its own connection (``query_only``, autocommit);
WAL lets readers run beside the writer without blocking it. Every read is one
statement whose rows are fetched at once, so each read is a consistent
snapshot and starts a fresh read transaction: a read sees every write that has
returned, in any thread.

Revisions. Every change appends a row to ``events`` in the same transaction
(and the same savepoint) as the change; the event's ``INTEGER PRIMARY KEY
AUTOINCREMENT`` id is the revision. The writer numbers events itself (committed
revision + 1, + 2, ...; a rolled-back operation gives its numbers back), so
revisions are gap-free and never reused, also after compaction
(``sqlite_sequence`` remembers the highest). A row's ``revision`` is the
revision of the last event that changed it, and an event's ``data`` is the row
as that event left it (for a deletion: the row as it was). The current revision
is also kept in memory, under a condition that :meth:`Store.wait_for_change`
waits on; it is advanced after the commit and before the futures resolve.

Event kinds: ``workload`` (data: the :class:`WorkloadRow` as a dict), ``node``
(the :class:`NodeRow`), ``inventory`` (``{"gpu_type": spec}`` or
``{"tenant": spec}``, id = the name), ``plan`` (a summary: status, gap,
objective, placed, unplaced, solve_s; id = the revision as a string). Node,
inventory and plan events have an empty tenant. In :meth:`Store.apply_plan` the
workload events come before the plan event, so a watcher that sees a plan has
already seen everything it changed.

Compaction. Only the newest ``event_history`` events are kept: once the log
holds :func:`compaction slack <_slack>` more than that, the oldest are deleted
inside a writer transaction (at most :data:`MAX_COMPACT` rows per batch, so a
compaction never stalls writes). :meth:`Store.oldest_revision` is the smallest
revision still kept (``revision() + 1`` while none is); a watcher resuming after
revision ``r`` has the complete history iff ``r >= oldest_revision() - 1``, and
:meth:`Store.events_after` raises FailedPrecondition otherwise. Only the newest
``plan_history`` plans are kept.

Idempotency. ``requests`` maps a client request key to the operation
(``submit``/``update``) and the workload id it was first used for. Repeating a
key returns the workload's *current* row and creates nothing (submit says so
with ``created=False``); a key reused for another operation or another
workload id is a client bug and raises FailedPrecondition. Keys are global and
kept forever: the servicer namespaces them (e.g. by tenant) if tenants may
collide.

Workload states. PENDING (version 1 at submit) -> PLACED / RUNNING by plans and
workers -> SUCCEEDED, FAILED or CANCELLED (terminal: no change afterwards but
the no-op of cancelling a cancelled workload). Entering a terminal state clears
the placement and the reasons. An update makes a new version and keeps state
and placement: the control loop decides what the new version needs.
:meth:`Store.apply_plan` changes a workload only if its version is still the
one the plan was solved for and it is not terminal; others changed while the
plan was solved and are skipped silently (the next plan sees them).

Observations. A workload's ``observed`` (a JSON column, ``{}`` until the
workers report) is what was measured of it while it ran:
``{"work_done": 120.0, "throughput": {GPU_TYPE: {"gpus", "work_per_s",
"samples_per_s", "seconds", "at"}}}`` — the work units done (the runtime's
step) and, per GPU type it ran on, the smoothed work units/s of the whole gang
(the dispatcher measures them, :mod:`server.workers`; the control loop plans
with them, :mod:`server.control`). :meth:`Store.set_workload_state` merges an
:class:`Observation` in, in the same write as the progress message. An update
keeps them, except the rates when the runtime or the gang sizes change (they
measured another job). Schema 2 added the column; opening a schema 1 database
adds it (``{}`` for every workload).

Schema. ``meta.schema_version`` records the schema; a database written by a
newer schema, a file that is not SQLite, or an SQLite file that is not an
Apportion store, is refused with :class:`StoreError`. One process at a time:
``open`` takes an exclusive ``flock`` on ``<path>.lock`` (the in-memory
revision and the single writer assume it), and a second process is refused
with :class:`StoreError`.

Gets (:meth:`Store.get_workload`, :meth:`Store.get_node`) raise NotFound for an
unknown id; lists are ordered by id and paginated by ``after_id``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from server.aio import Wakeup
from server.errors import AlreadyExists, FailedPrecondition, NotFound
from server.reconcile import Claim, settle
from server.usage import Usage, placement_use

__all__ = [
    "ACTIVE",
    "CANCELLED",
    "FAILED",
    "PENDING",
    "PLACED",
    "RUNNING",
    "SCHEMA_VERSION",
    "STATES",
    "SUCCEEDED",
    "TERMINAL",
    "Assignment",
    "Event",
    "NodeRow",
    "Observation",
    "PlanRow",
    "Snapshot",
    "Store",
    "StoreError",
    "WorkloadRow",
    "read_snapshot",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
JSONDict = dict[str, Any]

PENDING: Final = "PENDING"
PLACED: Final = "PLACED"
RUNNING: Final = "RUNNING"
WITHDRAWN: Final = (
    "admitted at once into free capacity, then withdrawn: the plan solved meanwhile needs "
    "these GPUs for work of the same or a higher priority; the next plan places it again"
)
SUCCEEDED: Final = "SUCCEEDED"
FAILED: Final = "FAILED"
CANCELLED: Final = "CANCELLED"
STATES: Final = (PENDING, PLACED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL: Final = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE: Final = frozenset({PENDING, PLACED, RUNNING})
KINDS: Final = ("training", "inference")

SCHEMA_VERSION: Final = 3
MAX_BATCH: Final = 1024  # operations per writer transaction
MAX_COMPACT: Final = 10_000  # events deleted per writer transaction

EventKind = Literal["workload", "node", "plan", "inventory"]
EventAction = Literal["created", "updated", "deleted"]


class StoreError(Exception):
    """The database cannot be used: newer schema, not a store, locked by another process, closed."""


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class WorkloadRow:
    id: str
    tenant: str
    kind: str  # "training" | "inference"
    state: str
    version: int
    spec: JSONDict
    placement: JSONDict | None
    reasons: list[JSONDict]
    message: str
    created_at: float
    updated_at: float
    revision: int
    observed: JSONDict = dataclasses.field(default_factory=dict)  # what the workers measured

    def as_dict(self) -> JSONDict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Observation:
    """What the workers measured of a running training workload (see "Observations")."""

    work_done: float  # work units done (the runtime's step)
    gpu_type: str = ""  # with a rate: the GPU type it was measured on
    gpus: int = 0  # GPUs of the gang it was measured on
    work_per_s: float | None = None  # smoothed work units/s of the whole gang; None: no rate yet
    samples_per_s: float = 0.0
    seconds: float = 0.0  # how long the rate has been measured in total


@dataclass(frozen=True)
class NodeRow:
    id: str
    spec: JSONDict
    revision: int
    updated_at: float

    def as_dict(self) -> JSONDict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PlanRow:
    revision: int
    created_at: float
    plan: JSONDict
    status: str
    gap: float | None
    solve_s: float
    based_on: int  # the store revision the plan's input snapshot was read at


@dataclass(frozen=True)
class Event:
    revision: int
    time: float
    kind: str  # EventKind
    action: str  # EventAction
    id: str
    tenant: str
    data: JSONDict


@dataclass(frozen=True)
class Assignment:
    """A plan's decision for one workload, valid only for the version it was solved for."""

    version: int
    state: str
    placement: JSONDict | None
    reasons: list[JSONDict]


@dataclass(frozen=True)
class Snapshot:
    """The state a plan is computed from, read in one read transaction."""

    revision: int  # the revision of the last change it includes
    rows: tuple[WorkloadRow, ...]  # the active workloads, by id
    gpu_types: tuple[JSONDict, ...]
    tenants: tuple[JSONDict, ...]
    nodes: tuple[JSONDict, ...]


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read what planning needs from the store at ``path``, consistently, from any
    process: the control loop's solver process reads it itself, so the server's
    process does not spend its time decoding every workload of every round. (A
    read-only connection beside the server's writer: WAL readers never block it.)"""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("BEGIN")  # one read transaction: one consistent snapshot
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        rows = conn.execute(
            f"SELECT {_WORKLOAD_COLS} FROM workloads WHERE state IN (?, ?, ?) ORDER BY id", sorted(ACTIVE)
        ).fetchall()
        specs = {
            table: tuple(json.loads(r[0]) for r in conn.execute(f"SELECT spec FROM {table} ORDER BY {key}"))
            for table, key in (("gpu_types", "name"), ("tenants", "name"), ("nodes", "id"))
        }
        conn.execute("COMMIT")
    finally:
        conn.close()
    return Snapshot(
        revision=0 if seq is None else int(seq[0]),
        rows=tuple(_workload(r) for r in rows),
        gpu_types=specs["gpu_types"],
        tenants=specs["tenants"],
        nodes=specs["nodes"],
    )


# --------------------------------------------------------------------------- schema

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL, kind TEXT NOT NULL, action TEXT NOT NULL,
    id TEXT NOT NULL, tenant TEXT NOT NULL, data TEXT NOT NULL
);
CREATE TABLE workloads (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    version INTEGER NOT NULL, spec TEXT NOT NULL, placement TEXT, reasons TEXT NOT NULL,
    message TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, revision INTEGER NOT NULL,
    observed TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX workloads_tenant ON workloads (tenant, id);
CREATE INDEX workloads_state ON workloads (state, id);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, revision INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE gpu_types (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, revision INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE tenants (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, revision INTEGER NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE plans (
    revision INTEGER PRIMARY KEY, created_at REAL NOT NULL, plan TEXT NOT NULL, status TEXT NOT NULL,
    gap REAL, solve_s REAL NOT NULL, based_on INTEGER NOT NULL
);
CREATE TABLE requests (
    request_key TEXT PRIMARY KEY, op TEXT NOT NULL, workload_id TEXT NOT NULL,
    revision INTEGER NOT NULL, created_at REAL NOT NULL, digest TEXT NOT NULL DEFAULT ''
);
"""

# Migrations from schema N to N + 1, run in the opening transaction.
_MIGRATIONS: dict[int, str] = {
    1: "ALTER TABLE workloads ADD COLUMN observed TEXT NOT NULL DEFAULT '{}'",  # measured throughput
    2: "ALTER TABLE requests ADD COLUMN digest TEXT NOT NULL DEFAULT ''",  # what a request id was sent with
}

_WORKLOAD_FIELDS = tuple(f.name for f in dataclasses.fields(WorkloadRow))
_WORKLOAD_COLS = (
    "id, tenant, kind, state, version, spec, placement, reasons, message, created_at, updated_at, revision, "
    "observed"
)
_EVENT_COLS = "revision, time, kind, action, id, tenant, data"
_PLAN_COLS = "revision, created_at, plan, status, gap, solve_s, based_on"


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _workload(row: Sequence[Any]) -> WorkloadRow:
    return WorkloadRow(
        id=row[0],
        tenant=row[1],
        kind=row[2],
        state=row[3],
        version=row[4],
        spec=json.loads(row[5]),
        placement=None if row[6] is None else json.loads(row[6]),
        reasons=json.loads(row[7]),
        message=row[8],
        created_at=row[9],
        updated_at=row[10],
        revision=row[11],
        observed=json.loads(row[12]),
    )


def _node(row: Sequence[Any]) -> NodeRow:
    return NodeRow(id=row[0], spec=json.loads(row[1]), revision=row[2], updated_at=row[3])


def _event(row: Sequence[Any]) -> Event:
    return Event(
        revision=row[0],
        time=row[1],
        kind=row[2],
        action=row[3],
        id=row[4],
        tenant=row[5],
        data=json.loads(row[6]),
    )


def _plan(row: Sequence[Any]) -> PlanRow:
    return PlanRow(
        revision=row[0],
        created_at=row[1],
        plan=json.loads(row[2]),
        status=row[3],
        gap=row[4],
        solve_s=row[5],
        based_on=row[6],
    )


def _measured_shape(spec: Mapping[str, Any]) -> Any:
    """What a measured throughput depends on besides the GPU type: the runtime and the gang sizes."""
    training = spec.get("training") or {}
    shapes = sorted(int(s.get("gpus", 0)) for s in training.get("elastic") or [])
    return (spec.get("runtime"), training.get("gpus"), shapes)


def _observe(observed: JSONDict, obs: Observation) -> JSONDict:
    """``observed`` with ``obs`` merged in (a new dict)."""
    out = dict(observed)
    out["work_done"] = obs.work_done
    if obs.work_per_s is not None and obs.gpu_type:
        rates = dict(out.get("throughput") or {})
        rates[obs.gpu_type] = {
            "gpus": obs.gpus,
            "work_per_s": obs.work_per_s,
            "samples_per_s": obs.samples_per_s,
            "seconds": obs.seconds,
            "at": time.time(),
        }
        out["throughput"] = rates
    merged: JSONDict = json.loads(_dumps(out))  # as it reads back: equal rows compare equal
    return merged


def _taken(id: str, tenant: str, holder: str, state: str) -> str:
    """Why ``id`` cannot be submitted: it exists (its state only to its own tenant)."""
    if holder != tenant:
        return f"workload {id!r} already exists"
    if state in TERMINAL:
        return (
            f"workload {id!r} already exists and is {state}: an id is never reused "
            "(its history stays); submit it again under a new id"
        )
    return f"workload {id!r} already exists and is {state}: to change it, update it"


def _slack(event_history: int) -> int:
    """How far past ``event_history`` the log may grow before it is compacted."""
    return max(1, min(1000, event_history // 100))


# --------------------------------------------------------------------------- the writer's transaction


class _Tx:
    """The writer's open transaction, as an operation sees it: the connection and the revision counter."""

    def __init__(self, conn: sqlite3.Connection, revision: int) -> None:
        self.conn = conn
        self.revision = revision

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.execute(sql, params)
        return rows[0] if rows else None

    @property
    def next_revision(self) -> int:
        """The revision the next event of this transaction will get."""
        return self.revision + 1

    def event(
        self, kind: EventKind, action: EventAction, id: str, tenant: str, data: JSONDict, now: float
    ) -> int:
        revision = self.revision + 1
        self.conn.execute(
            f"INSERT INTO events ({_EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (revision, now, kind, action, id, tenant, _dumps(data)),
        )
        self.revision = revision
        return revision

    # ---- workloads

    def workload(self, id: str) -> WorkloadRow:
        row = self.one(f"SELECT {_WORKLOAD_COLS} FROM workloads WHERE id = ?", (id,))
        if row is None:
            raise NotFound(f"no workload {id!r}")
        return _workload(row)

    def write_workload(
        self, row: WorkloadRow, action: EventAction, spec_json: str | None = None
    ) -> WorkloadRow:
        """Store ``row`` (built with ``revision=next_revision``) and append its event
        (``spec_json``: ``row.spec`` already encoded)."""
        assert row.revision == self.next_revision
        if spec_json is None:
            spec_json = _dumps(row.spec)
        self.conn.execute(
            f"INSERT OR REPLACE INTO workloads ({_WORKLOAD_COLS}) VALUES ({_marks(13)})",
            (
                row.id,
                row.tenant,
                row.kind,
                row.state,
                row.version,
                spec_json,
                None if row.placement is None else _dumps(row.placement),
                _dumps(row.reasons),
                row.message,
                row.created_at,
                row.updated_at,
                row.revision,
                _dumps(row.observed),
            ),
        )
        # the event's data is the row as a dict; encoded without copying it first (asdict would)
        data = {name: getattr(row, name) for name in _WORKLOAD_FIELDS}
        self.event("workload", action, row.id, row.tenant, data, row.updated_at)
        return row

    def request(self, key: str | None, op: str, workload_id: str, digest: str = "") -> WorkloadRow | None:
        """The current row of the workload that request ``key`` was for, or None for a new
        key. The same key with another request (``digest`` of what was sent, where both
        have one) is AlreadyExists: a retry must send what it sent."""
        if key is None:
            return None
        seen = self.one("SELECT op, workload_id, digest FROM requests WHERE request_key = ?", (key,))
        if seen is None:
            return None
        if (seen[0], seen[1]) != (op, workload_id):
            raise FailedPrecondition(
                f"request key {key!r} was already used to {seen[0]} workload {seen[1]!r}, "
                f"not to {op} workload {workload_id!r}"
            )
        if digest and seen[2] and digest != seen[2]:
            raise AlreadyExists(
                f"request id {key.rsplit('/', 1)[-1]!r} was already used to {op} workload {workload_id!r} "
                f"with another spec: a retry sends the same request; a new request needs a new id"
            )
        return self.workload(workload_id)

    def remember(self, key: str | None, op: str, workload_id: str, now: float, digest: str = "") -> None:
        if key is not None:
            self.conn.execute(
                "INSERT INTO requests (request_key, op, workload_id, revision, created_at, digest) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, op, workload_id, self.revision, now, digest),
            )

    # ---- nodes

    def node(self, id: str) -> NodeRow:
        row = self.one("SELECT id, spec, revision, updated_at FROM nodes WHERE id = ?", (id,))
        if row is None:
            raise NotFound(f"no node {id!r}")
        return _node(row)

    def write_node(self, id: str, spec: JSONDict, action: EventAction, now: float) -> NodeRow:
        row = NodeRow(id=id, spec=spec, revision=self.next_revision, updated_at=now)
        self.conn.execute(
            "INSERT OR REPLACE INTO nodes (id, spec, revision, updated_at) VALUES (?, ?, ?, ?)",
            (id, _dumps(spec), row.revision, now),
        )
        self.event("node", action, id, "", row.as_dict(), now)
        return row


# --------------------------------------------------------------------------- the store


class Store:
    """The server's state in the SQLite database at ``path`` (created if missing).

    Thread-safe: any thread may read or write. Writes block until durable.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, plan_history: int = 100, event_history: int = 1_000_000
    ):
        if plan_history < 1 or event_history < 1:
            raise ValueError("plan_history and event_history must be >= 1")
        self.path = Path(path)
        self.plan_history = plan_history
        self.event_history = event_history
        self._inventory_lock = threading.Lock()
        self._inventory_generation = 0
        self._inventory_cache: dict[str, list[JSONDict]] = {}
        # workload id -> the revision an admission placed it at (Store.admit), until a
        # plan solved after it is applied: what Store.apply_plan must not overwrite
        self._admitted: dict[str, int] = {}
        self._lock_fd = self._take_lock()
        try:
            self._conn = self._connect()
            self._revision, self._oldest = self._open_schema()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._cond = threading.Condition()
        self.changed = Wakeup()  # fired after each commit: what coroutines (Watch) await
        self._queue: queue.SimpleQueue[tuple[Callable[[_Tx], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._close_lock = threading.Lock()
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = threading.Thread(target=self._run, name=f"store-writer:{self.path.name}", daemon=True)
        self._writer.start()

    # ---- opening and closing

    def _take_lock(self) -> int:
        lock_path = f"{self.path}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path}: the store is open in another process or Store") from None
        return fd

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path}: not an Apportion store ({exc})") from None
        if mode != "wal":
            conn.close()
            raise StoreError(f"{self.path}: cannot use WAL mode (journal_mode is {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def _open_schema(self) -> tuple[int, int]:
        """Create or check (and migrate) the schema; the current and the oldest kept revision."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif "meta" not in tables:
                raise StoreError(f"{self.path}: not an Apportion store (no meta table)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: written by a newer Apportion (store schema {version}); "
                    f"this version reads schema {SCHEMA_VERSION} and older"
                )
            if version < 1:
                raise StoreError(f"{self.path}: not an Apportion store (schema version {version})")
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                version += 1
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            revision = int(seq[0]) if seq else 0
            low = conn.execute("SELECT min(revision) FROM events").fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        return revision, (revision + 1 if low is None else int(low))

    def close(self) -> None:
        """Finish the queued writes, stop the writer, close every connection. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._writer.join()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._conn.close()  # the last connection: checkpoints and removes the WAL
        os.close(self._lock_fd)
        with self._cond:
            self._cond.notify_all()
        self.changed.fire()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the writer

    def _write(self, op: Callable[[_Tx], T]) -> T:
        future: Future[T] = Future()
        with self._close_lock:
            if self._closed:
                raise StoreError(f"{self.path}: the store is closed")
            self._queue.put((op, future))
        return future.result()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[tuple[Callable[[_Tx], Any], Future[Any]]] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                    break
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Callable[[_Tx], Any], Future[Any]]]) -> None:
        conn = self._conn
        tx = _Tx(conn, self._revision)
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        oldest = self._oldest
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                start = tx.revision
                conn.execute("SAVEPOINT op")
                try:
                    result = op(tx)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    tx.revision = start
                    outcomes.append((future, None, exc))
                else:
                    conn.execute("RELEASE op")
                    outcomes.append((future, result, None))
            oldest = self._compact(tx, oldest)
            conn.execute("COMMIT")
        except Exception as exc:
            log.exception("store: a write transaction failed")
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("store: rollback failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        with self._cond:
            self._revision = tx.revision
            self._oldest = oldest
            self._cond.notify_all()
        self.changed.fire()
        for future, result, error in outcomes:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _compact(self, tx: _Tx, oldest: int) -> int:
        """Delete the oldest events past ``event_history``; the new oldest kept revision."""
        if tx.revision < oldest:  # no event kept at all
            return tx.revision + 1
        kept = tx.revision - oldest + 1
        if kept - self.event_history < _slack(self.event_history):
            return oldest
        new_oldest = min(tx.revision - self.event_history + 1, oldest + MAX_COMPACT)
        tx.conn.execute("DELETE FROM events WHERE revision < ?", (new_oldest,))
        return new_oldest

    # ---- reads

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreError(f"{self.path}: the store is closed")
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA busy_timeout = 10000")
            with self._readers_lock:
                if self._closed:
                    conn.close()
                    raise StoreError(f"{self.path}: the store is closed")
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement, all rows fetched: a consistent snapshot, and no read transaction left open."""
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        return self._reader().execute(sql, params).fetchall()

    def revision(self) -> int:
        """The revision of the last committed change (0 for a new store)."""
        with self._cond:
            return self._revision

    def oldest_revision(self) -> int:
        """The smallest revision still in the event log; ``revision() + 1`` while the log is empty."""
        with self._cond:
            return self._oldest

    def wait_for_change(self, after_revision: int, timeout: float | None) -> int:
        """Block until ``revision() > after_revision``, the timeout passes or the store closes.

        Returns the current revision.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._revision > after_revision or self._closed, timeout)
            return self._revision

    def get_workload(self, id: str) -> WorkloadRow:
        rows = self._query(f"SELECT {_WORKLOAD_COLS} FROM workloads WHERE id = ?", (id,))
        if not rows:
            raise NotFound(f"no workload {id!r}")
        return _workload(rows[0])

    def tenants_of(self, ids: Iterable[str]) -> dict[str, str]:
        """The tenant of each id that names a stored workload (others are left out)."""
        wanted = sorted(set(ids))
        out: dict[str, str] = {}
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self._query(f"SELECT id, tenant FROM workloads WHERE id IN ({marks})", chunk))
        return out

    def list_workloads(
        self,
        *,
        tenant: str | None = None,
        kind: str | None = None,
        state: str | Iterable[str] | None = None,
        after_id: str = "",
        limit: int = 100,
    ) -> list[WorkloadRow]:
        """Workloads with ``id > after_id`` that match every filter given, ordered by id, at most ``limit``.

        ``state`` is one state or several.
        """
        where = ["id > ?"]
        params: list[Any] = [after_id]
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        params.append(limit)
        sql = f"SELECT {_WORKLOAD_COLS} FROM workloads WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        return [_workload(r) for r in self._query(sql, params)]

    def active_workloads(self) -> list[WorkloadRow]:
        """Every workload that is not terminal (PENDING, PLACED, RUNNING), ordered by id."""
        return self.workloads_in(ACTIVE)

    def workloads_in(self, states: Iterable[str]) -> list[WorkloadRow]:
        """The workloads in ``states``, ordered by id (the state column is indexed)."""
        wanted = sorted(set(states))
        marks = ", ".join("?" * len(wanted))
        sql = f"SELECT {_WORKLOAD_COLS} FROM workloads WHERE state IN ({marks}) ORDER BY id"
        return [_workload(r) for r in self._query(sql, wanted)] if wanted else []

    def counts_by_state(self) -> dict[str, int]:
        """Number of workloads per state; every state is a key, with 0 where none."""
        counts = dict.fromkeys(STATES, 0)
        for state, n in self._query("SELECT state, count(*) FROM workloads GROUP BY state"):
            counts[state] = n
        return counts

    def get_node(self, id: str) -> NodeRow:
        rows = self._query("SELECT id, spec, revision, updated_at FROM nodes WHERE id = ?", (id,))
        if not rows:
            raise NotFound(f"no node {id!r}")
        return _node(rows[0])

    def list_nodes(self, *, after_id: str = "", limit: int = 100) -> list[NodeRow]:
        sql = "SELECT id, spec, revision, updated_at FROM nodes WHERE id > ? ORDER BY id LIMIT ?"
        return [_node(r) for r in self._query(sql, (after_id, limit))]

    def all_nodes(self) -> list[NodeRow]:
        return [_node(r) for r in self._query("SELECT id, spec, revision, updated_at FROM nodes ORDER BY id")]

    def node_gpus(self) -> dict[str, int]:
        """Every node's GPU count, by id (read in SQLite, no spec decoded: the dispatcher asks
        after every change, and a cluster of 4,000 workers registering is 4,000 changes)."""
        rows = self._query("SELECT id, CAST(json_extract(spec, '$.gpus') AS INTEGER) FROM nodes")
        return {id: int(gpus or 0) for id, gpus in rows}

    def gpu_types(self) -> list[JSONDict]:
        """The GPU type specs, ordered by name (cached: treat them as read-only)."""
        return self._inventory_table("gpu_types")

    def tenants(self) -> list[JSONDict]:
        """The tenant specs, ordered by name (cached: treat them as read-only)."""
        return self._inventory_table("tenants")

    def _inventory_table(self, table: str) -> list[JSONDict]:
        """GPU types and tenants are read on every submission and change rarely, so
        they are cached until :meth:`upsert_inventory` changes them. A reader fills
        the cache only if no inventory write returned while it read, so the cache
        never keeps what an acknowledged write replaced."""
        cached = self._inventory_cache.get(table)
        if cached is not None:
            return cached
        generation = self._inventory_generation
        value = [json.loads(r[0]) for r in self._query(f"SELECT spec FROM {table} ORDER BY name")]
        with self._inventory_lock:
            if generation == self._inventory_generation:
                self._inventory_cache[table] = value
        return value

    def _inventory_changed(self) -> None:
        with self._inventory_lock:
            self._inventory_generation += 1
            self._inventory_cache.clear()

    def latest_plan(self) -> PlanRow | None:
        rows = self._query(f"SELECT {_PLAN_COLS} FROM plans ORDER BY revision DESC LIMIT 1")
        return _plan(rows[0]) if rows else None

    def events_after(self, revision: int, limit: int = 1000) -> list[Event]:
        """The events with revision > ``revision``, oldest first, at most ``limit``.

        Raises FailedPrecondition if some of them were compacted away (``revision <
        oldest_revision() - 1``): the caller must start over from a full read.
        """
        if revision < 0:
            raise ValueError(f"revision must be >= 0, not {revision}")
        rows = self._query(
            f"SELECT {_EVENT_COLS} FROM events WHERE revision > ? ORDER BY revision LIMIT ?",
            (revision, limit),
        )
        # Revisions are gap-free and compaction keeps the newest events: the first row
        # is revision + 1 unless events were compacted. No row means nothing newer exists.
        if rows and rows[0][0] != revision + 1:
            raise FailedPrecondition(
                f"revision {revision} is compacted: the oldest event kept is revision {rows[0][0]}"
            )
        return [_event(r) for r in rows]

    # ---- writes: workloads

    def submit_workload(
        self,
        id: str,
        tenant: str,
        kind: str,
        spec: JSONDict,
        *,
        request_key: str | None,
        request_digest: str = "",
        now: float | None = None,
        reasons: list[JSONDict] | None = None,
    ) -> tuple[WorkloadRow, bool]:
        """Create workload ``id`` (PENDING, version 1, with ``reasons`` it waits for, if
        known already); the row and whether it was created now.

        A ``request_key`` seen before returns the current row of the workload that request
        created, and False; with another ``request_digest`` (what the caller sent) it is
        AlreadyExists. AlreadyExists if ``id`` is taken (in any state).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        spec_json = _dumps(spec)  # fail early (in the caller) on a value JSON cannot hold

        def op(tx: _Tx) -> tuple[WorkloadRow, bool]:
            seen = tx.request(request_key, "submit", id, request_digest)
            if seen is not None:
                return seen, False
            taken = tx.one("SELECT tenant, state FROM workloads WHERE id = ?", (id,))
            if taken is not None:
                raise AlreadyExists(_taken(id, tenant, taken[0], taken[1]))
            t = time.time() if now is None else now
            row = WorkloadRow(
                id=id,
                tenant=tenant,
                kind=kind,
                state=PENDING,
                version=1,
                spec=json.loads(spec_json),
                placement=None,
                reasons=list(reasons or []),
                message="",
                created_at=t,
                updated_at=t,
                revision=tx.next_revision,
            )
            tx.write_workload(row, "created", spec_json)
            tx.remember(request_key, "submit", id, t, request_digest)
            return row, True

        return self._write(op)

    def update_workload(
        self, id: str, spec: JSONDict, *, request_key: str | None = None, request_digest: str = ""
    ) -> WorkloadRow:
        """A new version of workload ``id`` with ``spec``; state and placement are kept.

        NotFound; FailedPrecondition if it is terminal. A ``request_key`` seen before
        returns the workload's current row and changes nothing (AlreadyExists with another
        ``request_digest``).
        """
        spec_json = _dumps(spec)

        def op(tx: _Tx) -> WorkloadRow:
            seen = tx.request(request_key, "update", id, request_digest)
            if seen is not None:
                return seen
            old = tx.workload(id)
            if old.state in TERMINAL:
                raise FailedPrecondition(f"workload {id!r} is {old.state}: it cannot be updated")
            t = time.time()
            new_spec = json.loads(spec_json)
            observed = old.observed
            if observed.get("throughput") and _measured_shape(old.spec) != _measured_shape(new_spec):
                observed = {k: v for k, v in observed.items() if k != "throughput"}  # measured another job
            row = dataclasses.replace(
                old,
                version=old.version + 1,
                spec=new_spec,
                observed=observed,
                updated_at=t,
                revision=tx.next_revision,
            )
            tx.write_workload(row, "updated")
            tx.remember(request_key, "update", id, t, request_digest)
            return row

        return self._write(op)

    def cancel_workload(self, id: str) -> WorkloadRow:
        """Cancel workload ``id``: CANCELLED, placement cleared.

        A cancelled workload is returned unchanged; NotFound; FailedPrecondition if it
        SUCCEEDED or FAILED.
        """

        def op(tx: _Tx) -> WorkloadRow:
            old = tx.workload(id)
            if old.state == CANCELLED:
                return old
            if old.state in TERMINAL:
                raise FailedPrecondition(f"workload {id!r} is {old.state}: it cannot be cancelled")
            return self._set_state(tx, old, CANCELLED, old.message)

        return self._write(op)

    def set_workload_state(
        self, id: str, state: str, message: str = "", *, observation: Observation | None = None
    ) -> WorkloadRow:
        """Set the state (and message) of workload ``id``, as the workers report it, and
        merge ``observation`` into what was measured of it (see "Observations").

        A terminal state clears placement and reasons. NotFound; FailedPrecondition if the
        workload is terminal already (setting the same state and message is a no-op).
        """
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, not {state!r}")

        def op(tx: _Tx) -> WorkloadRow:
            old = tx.workload(id)
            observed = old.observed if observation is None else _observe(old.observed, observation)
            if (old.state, old.message, old.observed) == (state, message, observed):
                return old
            if old.state in TERMINAL:
                raise FailedPrecondition(f"workload {id!r} is {old.state}: its state cannot change")
            return self._set_state(tx, old, state, message, observed)

        return self._write(op)

    @staticmethod
    def _set_state(
        tx: _Tx, old: WorkloadRow, state: str, message: str, observed: JSONDict | None = None
    ) -> WorkloadRow:
        terminal = state in TERMINAL
        row = dataclasses.replace(
            old,
            state=state,
            message=message,
            observed=old.observed if observed is None else observed,
            placement=None if terminal else old.placement,
            reasons=[] if terminal else old.reasons,
            updated_at=time.time(),
            revision=tx.next_revision,
        )
        return tx.write_workload(row, "updated")

    # ---- writes: inventory

    def upsert_inventory(
        self,
        *,
        gpu_types: Sequence[JSONDict] = (),
        nodes: Sequence[JSONDict] = (),
        tenants: Sequence[JSONDict] = (),
    ) -> list[NodeRow]:
        """Create or replace GPU types and tenants (by ``name``) and nodes (by ``id``).

        One event per item that is new or changed; an unchanged item keeps its row and
        revision. Returns the rows of ``nodes``, in their order. Nothing is removed.
        """
        for what, items, key in (
            ("gpu type", gpu_types, "name"),
            ("tenant", tenants, "name"),
            ("node", nodes, "id"),
        ):
            for item in items:
                if not isinstance(item.get(key), str) or not item[key]:
                    raise ValueError(f"every {what} needs a non-empty {key!r}: {item!r}")
        payload = json.loads(_dumps([list(gpu_types), list(tenants), list(nodes)]))  # private copies

        def op(tx: _Tx) -> list[NodeRow]:
            t = time.time()
            for table, field, items in (
                ("gpu_types", "gpu_type", payload[0]),
                ("tenants", "tenant", payload[1]),
            ):
                for spec in items:
                    name = spec["name"]
                    old = tx.one(f"SELECT spec FROM {table} WHERE name = ?", (name,))
                    if old is not None and json.loads(old[0]) == spec:
                        continue
                    tx.conn.execute(
                        f"INSERT OR REPLACE INTO {table} (name, spec, revision, updated_at) "
                        "VALUES (?, ?, ?, ?)",
                        (name, _dumps(spec), tx.next_revision, t),
                    )
                    tx.event("inventory", "created" if old is None else "updated", name, "", {field: spec}, t)
            rows: dict[str, NodeRow] = {}
            for spec in payload[2]:
                id = spec["id"]
                try:
                    current = tx.node(id)
                except NotFound:
                    rows[id] = tx.write_node(id, spec, "created", t)
                    continue
                rows[id] = current if current.spec == spec else tx.write_node(id, spec, "updated", t)
            return [rows[spec["id"]] for spec in payload[2]]

        try:
            return self._write(op)
        finally:
            if payload[0] or payload[1]:
                self._inventory_changed()

    def drain_node(self, id: str) -> NodeRow:
        """Mark node ``id`` draining (``spec["state"] = "draining"``); NotFound."""

        def op(tx: _Tx) -> NodeRow:
            old = tx.node(id)
            if old.spec.get("state") == "draining":
                return old
            return tx.write_node(id, {**old.spec, "state": "draining"}, "updated", time.time())

        return self._write(op)

    def delete_node(self, id: str) -> NodeRow:
        """Remove node ``id``; the row it had. NotFound."""

        def op(tx: _Tx) -> NodeRow:
            old = tx.node(id)
            tx.conn.execute("DELETE FROM nodes WHERE id = ?", (id,))
            tx.event("node", "deleted", id, "", old.as_dict(), time.time())
            return old

        return self._write(op)

    # ---- writes: plans

    def apply_plan(
        self,
        plan: JSONDict | str,
        *,
        status: str,
        gap: float | None,
        solve_s: float,
        based_on: int,
        assignments: Mapping[str, Assignment],
        summary: Mapping[str, Any] | None = None,
        usage: Usage | None = None,
    ) -> int:
        """Store ``plan`` and apply its assignments in one transaction; the plan's revision.

        A workload is changed only if it exists, is not terminal and its version is still
        ``assignment.version`` (else it changed while the plan was solved, and is skipped),
        and gets an event only if its state, placement or reasons change. The plan's own
        event comes last.

        Workloads admitted (:meth:`admit`) after the plan's state (``based_on``) keep
        their admission; where they and the plan's placements (``usage``: what the
        whole plan holds) overflow a node or a quota, the lowest priority gives way
        (``server.reconcile``): an admission is withdrawn, or a plan's placement of a
        workload that held nothing is not applied.

        ``plan`` may come already encoded as JSON (from the process that made it);
        then ``summary`` gives its ``objective``, ``placed`` and ``unplaced``.
        """
        if isinstance(plan, str):
            if summary is None:
                raise ValueError("a plan given as JSON text needs its summary")
            plan_json = plan
            counts = dict(summary)
        else:
            plan_json = _dumps(plan)
            counts = {
                "objective": plan.get("objective", 0.0),
                "placed": len(plan.get("placements", ())),
                "unplaced": len(plan.get("unplaced", ())),
            }
        for id, a in assignments.items():
            if a.state not in ACTIVE:
                raise ValueError(f"assignment of {id!r}: a plan cannot set state {a.state!r}")
        changes = json.loads(_dumps({id: [a.placement, a.reasons] for id, a in assignments.items()}))

        def op(tx: _Tx) -> int:
            t = time.time()
            admitted = sorted(id for id, rev in self._admitted.items() if rev > based_on)
            for id in [id for id, rev in self._admitted.items() if rev <= based_on]:
                del self._admitted[id]  # every later plan is solved from a state that has them
            keep, withdrawn = self._settle_admissions(tx, admitted, assignments, changes, usage)
            for id in withdrawn:
                old = tx.workload(id)
                tx.write_workload(
                    dataclasses.replace(
                        old,
                        state=PENDING,
                        placement=None,
                        reasons=[{"code": "CAPACITY", "message": WITHDRAWN}],
                        updated_at=t,
                        revision=tx.next_revision,
                    ),
                    "updated",
                )
            for id, a in assignments.items():
                if id in keep or id in withdrawn:
                    continue
                try:
                    old = tx.workload(id)
                except NotFound:
                    continue
                if old.version != a.version or old.state in TERMINAL:
                    continue
                placement, reasons = changes[id]
                if (old.state, old.placement, old.reasons) == (a.state, placement, reasons):
                    continue
                row = dataclasses.replace(
                    old,
                    state=a.state,
                    placement=placement,
                    reasons=reasons,
                    updated_at=t,
                    revision=tx.next_revision,
                )
                tx.write_workload(row, "updated")
            revision = tx.next_revision
            tx.conn.execute(
                f"INSERT INTO plans ({_PLAN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (revision, t, plan_json, status, gap, solve_s, based_on),
            )
            summary = {
                "status": status,
                "gap": gap,
                "objective": counts.get("objective", 0.0),
                "placed": counts.get("placed", 0),
                "unplaced": counts.get("unplaced", 0),
                "solve_s": solve_s,
            }
            tx.event("plan", "created", str(revision), "", summary, t)
            tx.conn.execute(
                "DELETE FROM plans WHERE revision < (SELECT min(revision) FROM "
                "(SELECT revision FROM plans ORDER BY revision DESC LIMIT ?))",
                (self.plan_history,),
            )
            return revision

        return self._write(op)

    def _settle_admissions(
        self,
        tx: _Tx,
        admitted: list[str],
        assignments: Mapping[str, Assignment],
        changes: Mapping[str, Any],
        usage: Usage | None,
    ) -> tuple[set[str], set[str]]:
        """Inside :meth:`apply_plan`: (the workloads whose assignments are not applied,
        the admissions withdrawn)."""
        rows = {}
        for id in admitted:
            with contextlib.suppress(NotFound):
                row = tx.workload(id)
                if row.state in (PLACED, RUNNING) and row.placement:
                    rows[id] = row
        if not rows:
            return set(), set()
        total = Usage() if usage is None else copy.deepcopy(usage)
        claims: list[Claim] = []
        for id, row in rows.items():
            planned = changes[id][0] if id in assignments else None
            if planned:  # the plan's own copy of it gives way to the admission
                total.add(row.tenant, planned.get("gpu_type", ""), placement_use(row.spec, planned), -1.0)
            placement = row.placement or {}
            held = placement_use(row.spec, placement)
            total.add(row.tenant, placement.get("gpu_type", ""), held)
            priority = int(row.spec.get("priority", 0) or 0)
            claims.append(Claim(id, priority, row.tenant, placement.get("gpu_type", ""), held, True))
        touched = {n for c in claims for n in c.held}
        tenants = {c.tenant for c in claims}
        for id, a in assignments.items():
            placement = changes[id][0]
            if id in rows or not placement or a.state != PLACED:
                continue
            try:
                old = tx.workload(id)
            except NotFound:
                continue
            if old.placement or old.state != PENDING or old.version != a.version:
                continue  # a move of placed work (never undone), or not applied anyway
            held = placement_use(old.spec, placement)
            if touched.isdisjoint(held) and old.tenant not in tenants:
                continue
            priority = int(old.spec.get("priority", 0) or 0)
            claims.append(Claim(id, priority, old.tenant, placement.get("gpu_type", ""), held, False))
        nodes = {}
        for n in touched:
            with contextlib.suppress(NotFound):
                nodes[n] = tx.node(n).spec
        docs = (json.loads(r[0]) for r in tx.execute("SELECT spec FROM tenants"))
        quotas = {name: t for t in docs if (name := str(t.get("name", ""))) in tenants}
        gone = settle(total, claims, nodes, quotas)
        withdrawn = {c.id for c in claims if c.admitted and c.id in gone}
        return set(rows) | {c.id for c in claims if not c.admitted and c.id in gone}, withdrawn

    def admit(self, placements: Mapping[str, tuple[int, JSONDict]], seen_revision: int) -> list[WorkloadRow]:
        """Place pending workloads at once (``server.admission``): id -> (the version
        it was admitted at, its placement). Nothing is written if a plan, a node or the
        inventory changed after ``seen_revision`` (the capacity it was computed from may
        be gone; the caller looks again); a workload that is no longer PENDING at that
        version, or holds a placement, is skipped. The rows as admitted."""
        changes = json.loads(_dumps({id: p for id, (_v, p) in placements.items()}))

        def op(tx: _Tx) -> list[WorkloadRow]:
            moved = tx.one(
                "SELECT 1 FROM events WHERE revision > ? AND kind IN ('plan', 'node', 'inventory') LIMIT 1",
                (seen_revision,),
            )
            if moved is not None:
                return []
            t = time.time()
            out = []
            for id, (version, _p) in placements.items():
                try:
                    old = tx.workload(id)
                except NotFound:
                    continue
                if old.state != PENDING or old.version != version or old.placement:
                    continue
                row = dataclasses.replace(
                    old,
                    state=PLACED,
                    placement=changes[id],
                    reasons=[],
                    updated_at=t,
                    revision=tx.next_revision,
                )
                out.append(tx.write_workload(row, "updated"))
                self._admitted[id] = row.revision
            return out

        return self._write(op)
