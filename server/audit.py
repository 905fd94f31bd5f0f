"""The audit trail: every mutating request -- who, what, when, and how it ended.

As a multi-tenant service keeps one (Kubernetes' audit log): each answered call of
:data:`AUDITED` becomes an :class:`AuditEntry`, appended to ``<db>.audit`` (an SQLite
file of its own beside the store) and, as a JSON line, to ``<db>.audit.jsonl`` (for
log shippers; rotated once past 100 MiB). Refused calls are recorded too (a tenant
probing another tenant's workloads shows as NOT_FOUND or PERMISSION_DENIED entries),
and so are unauthenticated ones
(principal ``unauthenticated``). The admin reads it with ``Allocator.Audit``
(``apportion audit``).

Writing. Entries are buffered and written by a thread of their own every
:data:`FLUSH_S` (or at :data:`FLUSH_AT` entries), in one transaction, so a request
never waits for its audit entry and the store's commits (which every submit waits
for) carry none of it: kept in the store's own file, the trail cost 10-17% of the
submit throughput (1,081-1,137/s without it, 947-983/s with it), and a JSON log line
per request formatted on the RPC thread cost as much again (830-883/s): both are now
written by the trail's thread (1,058-1,079/s, the same as without a trail within this
machine's noise). A crash loses at
most the last :data:`FLUSH_S` of entries. The file keeps the newest ``max_entries``
entries of at most ``max_age_s``; older ones are deleted at each :data:`PRUNE_EVERY`-th
flush.

What an entry names: the ids the request carried (workload, node, GPU type and
tenant names), each cut at 253 characters, at most :data:`MAX_IDS` of them; the
error's message cut at :data:`MAX_MESSAGE` characters. Never a token: the principal is
its name (``tenant:NAME#FPRINT``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.message import Message

if TYPE_CHECKING:
    from server.auth import Principal

__all__ = ["AUDITED", "AuditEntry", "AuditTrail", "ids_of"]

log = logging.getLogger("apportion.audit")

AUDITED = frozenset(
    {"SubmitWorkload", "UpdateWorkload", "CancelWorkload", "UpsertNodes", "DrainNode", "Register"}
)
MAX_IDS = 1000
MAX_MESSAGE = 300
MAX_ID_CHARS = 253
FLUSH_S = 0.2
FLUSH_AT = 5000
PRUNE_EVERY = 100  # flushes
JSONL_MAX_BYTES = 100 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, principal TEXT NOT NULL,
    tenant TEXT NOT NULL, method TEXT NOT NULL, ids TEXT NOT NULL, code TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
"""


@dataclass(frozen=True)
class AuditEntry:
    """One mutating request: who, what, when, and how it ended."""

    seq: int  # 0 until written
    time: float
    principal: str
    tenant: str
    method: str
    ids: tuple[str, ...]
    code: str
    message: str


def ids_of(method: str, request: Any) -> tuple[str, ...]:
    """The ids a request of ``method`` names (see the module docstring); none for request
    bytes that did not parse (``server.aio.Undecodable``)."""
    if not isinstance(request, Message):
        return ()
    request = cast(Any, request)
    if method in ("SubmitWorkload", "UpdateWorkload"):
        ids = [request.workload.id]
    elif method in ("CancelWorkload", "DrainNode"):
        ids = [request.id]
    elif method == "UpsertNodes":
        ids = [t.name for t in request.gpu_types] + [n.id for n in request.nodes]
        ids += [t.name for t in request.tenants]
    elif method == "Register":
        ids = [request.node.id]
    else:
        ids = []
    return tuple(i[:MAX_ID_CHARS] for i in ids[:MAX_IDS])


def path_for(db: Path) -> Path:
    """The trail's file beside the store ``db``."""
    return db.with_name(db.name + ".audit")


class AuditTrail:
    """The trail in an SQLite file, written by a thread of its own."""

    def __init__(self, path: Path, *, max_entries: int = 1_000_000, max_age_s: float = 90 * 86400.0) -> None:
        if max_entries < 1 or max_age_s <= 0:
            raise ValueError("max_entries must be >= 1 and max_age_s > 0")
        self.path = path
        self.jsonl = path.with_name(path.name + ".jsonl")
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._conn = self._connect()
        self._conn.executescript(_SCHEMA)
        self._conn_lock = threading.Lock()  # the writer thread's transactions and readers
        self._buffer: list[AuditEntry] = []
        self._cond = threading.Condition()
        self._closed = False
        self._flushes = 0
        self._thread = threading.Thread(target=self._run, name="apportion-audit", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def record(self, method: str, principal: Principal | None, request: Any, code: str, message: str) -> None:
        """Append one entry (written within :data:`FLUSH_S`) and log it as a JSON line."""
        entry = AuditEntry(
            seq=0,
            time=time.time(),
            principal=principal.name if principal is not None else "unauthenticated",
            tenant=(principal.tenant or "") if principal is not None else "",
            method=method,
            ids=ids_of(method, request),
            code=code,
            message=message[:MAX_MESSAGE],
        )
        with self._cond:
            if self._closed:
                return
            self._buffer.append(entry)
            if len(self._buffer) >= FLUSH_AT:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._buffer) < FLUSH_AT:
                    self._cond.wait(FLUSH_S)
                entries, self._buffer = self._buffer, []
                closed = self._closed
            if entries:
                try:
                    self._write(entries)
                except sqlite3.Error:
                    log.exception("cannot write the audit trail", extra={"lost": len(entries)})
            if closed:
                return

    def _append_lines(self, entries: list[AuditEntry]) -> None:
        """The entries as JSON lines in ``<trail>.jsonl`` (renamed to ``.jsonl.1`` past
        :data:`JSONL_MAX_BYTES`, the previous one dropped)."""
        lines = "".join(
            json.dumps(
                {"time": e.time, "principal": e.principal, "tenant": e.tenant, "method": e.method,
                 "ids": list(e.ids), "code": e.code, "message": e.message},
                separators=(",", ":"),
            ) + "\n"
            for e in entries
        )  # fmt: skip
        try:
            if self.jsonl.exists() and self.jsonl.stat().st_size > JSONL_MAX_BYTES:
                self.jsonl.replace(self.jsonl.with_name(self.jsonl.name + ".1"))
            with self.jsonl.open("a", encoding="utf-8") as f:
                f.write(lines)
        except OSError:
            log.exception("cannot write the audit trail's JSON lines", extra={"path": str(self.jsonl)})

    def _write(self, entries: list[AuditEntry]) -> None:
        self._append_lines(entries)
        rows = [
            (e.time, e.principal, e.tenant, e.method, json.dumps(e.ids), e.code, e.message) for e in entries
        ]
        self._flushes += 1
        with self._conn_lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO audit (time, principal, tenant, method, ids, code, message) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                if self._flushes % PRUNE_EVERY == 0:
                    self._conn.execute("DELETE FROM audit WHERE time < ?", (time.time() - self.max_age_s,))
                    self._conn.execute(
                        "DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?", (self.max_entries,)
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def flush(self) -> None:
        """Write what is buffered now (tests; ``close``)."""
        with self._cond:
            entries, self._buffer = self._buffer, []
        if entries:
            self._write(entries)

    def entries(
        self,
        *,
        principal: str = "",
        id: str = "",
        since: float = 0.0,
        until: float = 0.0,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """Entries after ``after_seq``, oldest first, filtered (empty/0: any)."""
        where: list[str] = ["seq > ?"]
        params: list[Any] = [after_seq]
        if principal:
            where.append("principal = ?")
            params.append(principal)
        if id:
            where.append("EXISTS (SELECT 1 FROM json_each(audit.ids) WHERE json_each.value = ?)")
            params.append(id)
        if since:
            where.append("time >= ?")
            params.append(since)
        if until:
            where.append("time <= ?")
            params.append(until)
        sql = (
            "SELECT seq, time, principal, tenant, method, ids, code, message FROM audit "
            f"WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        )
        with self._conn_lock:
            rows = self._conn.execute(sql, (*params, limit)).fetchall()
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), r[6], r[7]) for r in rows]

    def close(self) -> None:
        """Write what is buffered and stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(10)
        self.flush()
        with self._conn_lock:
            self._conn.close()
