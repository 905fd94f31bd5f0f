"""The server's copy of each training workload's latest checkpoint, so training resumes on any node.

Workers do not need a shared file system: the agent (``worker.agent``, see
``worker.checkpoint_sync``) uploads every new checkpoint its training runtime's
rank 0 writes (``Workers.PutCheckpoint``) and, before it launches a shard of a
``train-lm`` job (or a ``serve-lm`` whose ``APPORTION_SERVE_FROM`` names a
training workload), downloads the stored one if it is newer than what its own
work directory holds (``Workers.GetCheckpoint``).

Layout, next to the SQLite database (``--db state.db`` -> ``state.db.checkpoints/``)::

    state.db.checkpoints/
        .incoming/<uuid>/            an upload in progress (removed at start-up)
        .trash/<uuid>/               a checkpoint being deleted (removed at start-up)
        <escaped id>/<step>-<uuid>/  a stored checkpoint: ``data`` (the file the
                                     worker sent) and ``meta.json`` (workload_id,
                                     step, name, size, sha256, stored_at)

``<escaped id>`` is the workload id with every byte outside ``[A-Za-z0-9_-]``
written ``%XX`` (ids longer than 120 bytes: ``#`` and their SHA-256).

Decisions:

* Atomic. An upload is written to ``.incoming/<uuid>/`` while its SHA-256 is
  computed; only when every byte has arrived, the size and digest match the
  header and both files are fsync'd is the directory renamed into place, and
  then the workload's older directories are removed. A reader takes the
  highest ``<step>-*`` directory, so it sees the old checkpoint or the new one,
  never part of one. An upload that breaks mid-way (the worker dies, the
  stream is cancelled, the digest does not match) leaves nothing visible: its
  ``.incoming`` directory is removed at once (or at the next start after a
  server crash). One latest checkpoint is kept per workload.
* Steps. A checkpoint with a lower step than the stored one is refused
  (FAILED_PRECONDITION: a slow upload from a worker that was replaced must not
  roll a job back); the same or a higher step replaces it. The step is checked
  before the data is received and again when it is committed.
* Integrity. A size or SHA-256 that does not match the data received is
  DATA_LOSS, nothing is stored. Every chunk is at most :data:`CHUNK_BYTES`
  (INVALID_ARGUMENT otherwise).
* Size. A checkpoint larger than :data:`MAX_CHECKPOINT_BYTES` (4 GiB) is
  RESOURCE_EXHAUSTED; the upload is stopped as soon as it goes past. There is
  no quota over all workloads.
* What may be stored. Only a training workload the store knows (NOT_FOUND
  otherwise; an inference workload is FAILED_PRECONDITION) that is not
  CANCELLED. Who: the admin, or a node (its node token) for the workloads the
  dispatcher sent it: it uploads only those whose shards it was sent, and
  downloads only those and the training workload a service it runs serves from
  (a training workload of the service's own tenant; see :mod:`server.workers`).
  Anyone else is PERMISSION_DENIED, whether the checkpoint exists or not.
* Deletion. A checkpoint is deleted when its workload is CANCELLED (the user
  asked for the job to be dropped: its half-trained model goes with it) or is
  no longer in the store. A SUCCEEDED workload keeps its checkpoint (it is
  the trained model, what ``serve-lm`` loads); a FAILED one keeps it too (the
  progress it made can still be served or inspected). A sweeper thread looks
  whenever the store changes (at most every :data:`SWEEP_EVERY_S`); the
  server never deletes workloads, so an operator reclaims the space of old
  ones by removing their directories (never an in-progress upload's).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc

from apportion.v1 import workers_pb2 as wpb
from server.auth import Principal
from server.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted, Upstream
from server.rpc import Shared, stream, unary
from server.store import CANCELLED
from server.workers import Dispatcher, WorkersServicer
from solver import ValidationError, Violation

log = logging.getLogger("apportion.server.checkpoints")

CHUNK_BYTES = 1024 * 1024  # most data in one CheckpointChunk (sent and accepted)
MAX_CHECKPOINT_BYTES = 4 * 1024**3
SWEEP_EVERY_S = 2.0
INCOMING = ".incoming"
TRASH = ".trash"
DATA = "data"
META = "meta.json"
_SAFE = re.compile(rb"[A-Za-z0-9_-]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_STEP_DIR = re.compile(r"^(\d{12,})-[0-9a-f]{32}$")


class DataLoss(Upstream):
    """The data received does not match its header's size or SHA-256 (DATA_LOSS)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, message)


def root_for(db: Path) -> Path:
    """The checkpoint directory of the database ``db``: ``<db>.checkpoints``."""
    return db.with_name(db.name + ".checkpoints")


def escape(workload_id: str) -> str:
    """A directory name for ``workload_id`` (see the module docstring)."""
    raw = workload_id.encode()
    if len(raw) > 120:
        return "#" + hashlib.sha256(raw).hexdigest()
    return "".join(chr(b) if _SAFE.fullmatch(bytes([b])) else f"%{b:02X}" for b in raw)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Stored:
    """A stored checkpoint: its header and the path of its data."""

    workload_id: str
    step: int
    name: str
    size: int
    sha256: str
    path: Path

    def header(self) -> wpb.CheckpointChunk:
        return wpb.CheckpointChunk(
            workload_id=self.workload_id, step=self.step, name=self.name, size=self.size, sha256=self.sha256
        )


class CheckpointStore:
    """The files under ``root``: one latest checkpoint per workload (thread-safe)."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = MAX_CHECKPOINT_BYTES if max_bytes is None else max_bytes
        self._lock = threading.Lock()  # commits, deletions and the choice of what to read
        root.mkdir(parents=True, exist_ok=True)
        for leftover in (INCOMING, TRASH):  # uploads and deletions a crash interrupted
            shutil.rmtree(root / leftover, ignore_errors=True)
            (root / leftover).mkdir()
        for d in root.iterdir():
            if not d.name.startswith("."):
                with self._lock:
                    self._prune(d, keep=self._latest_dir(d))

    # -- reading -----------------------------------------------------------------

    @staticmethod
    def _latest_dir(workload_dir: Path) -> Path | None:
        try:
            found = [
                (int(m.group(1)), p.name) for p in workload_dir.iterdir() if (m := _STEP_DIR.match(p.name))
            ]
        except OSError:
            return None
        return workload_dir / max(found)[1] if found else None

    @staticmethod
    def _read(step_dir: Path) -> Stored:
        meta = json.loads((step_dir / META).read_text())
        return Stored(
            workload_id=str(meta["workload_id"]),
            step=int(meta["step"]),
            name=str(meta["name"]),
            size=int(meta["size"]),
            sha256=str(meta["sha256"]),
            path=step_dir / DATA,
        )

    def latest(self, workload_id: str) -> Stored | None:
        """The stored checkpoint of ``workload_id`` (None when there is none)."""
        with self._lock:
            step_dir = self._latest_dir(self.root / escape(workload_id))
            return self._read(step_dir) if step_dir is not None else None

    def open(self, workload_id: str) -> tuple[Stored, IO[bytes]] | None:
        """The stored checkpoint and its data, opened (a later replacement or deletion
        does not change what this reads); None when there is none."""
        with self._lock:
            step_dir = self._latest_dir(self.root / escape(workload_id))
            if step_dir is None:
                return None
            stored = self._read(step_dir)
            return stored, stored.path.open("rb")

    def workloads(self) -> list[str]:
        """The ids of the workloads that have a stored checkpoint."""
        ids = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith("."):
                continue
            with self._lock:
                step_dir = self._latest_dir(d)
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if step_dir is not None:
                        ids.append(self._read(step_dir).workload_id)
        return ids

    # -- writing -----------------------------------------------------------------

    def put(self, header: wpb.CheckpointChunk, chunks: Iterator[wpb.CheckpointChunk]) -> int:
        """Store the checkpoint whose first message is ``header`` (its data, then that of
        ``chunks``); the step stored. Raises (and stores nothing) as the module says."""
        self._check_header(header)
        stored = self.latest(header.workload_id)
        if stored is not None and stored.step > header.step:
            raise FailedPrecondition(self._older(header, stored))
        incoming = self.root / INCOMING / uuid.uuid4().hex
        incoming.mkdir(parents=True)
        try:
            received, digest = self._receive(header, chunks, incoming / DATA)
            if received != header.size:
                raise DataLoss(f"received {received} bytes; the header says {header.size}")
            if digest != header.sha256:
                raise DataLoss(f"the data's sha256 is {digest}; the header says {header.sha256}")
            meta = {
                "workload_id": header.workload_id,
                "step": header.step,
                "name": header.name,
                "size": header.size,
                "sha256": header.sha256,
                "stored_at": time.time(),
            }
            with (incoming / META).open("w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync(incoming)
            self._commit(header, incoming)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)  # gone already when committed
        log.info("checkpoint stored", extra={"workload": header.workload_id, "step": header.step})
        return int(header.step)

    def _check_header(self, header: wpb.CheckpointChunk) -> None:
        problems = []
        if not header.workload_id:
            problems.append(Violation("workload_id", "must not be empty"))
        if header.step < 0:
            problems.append(Violation("step", "must be ≥ 0"))
        if header.size < 0:
            problems.append(Violation("size", "must be ≥ 0"))
        if not _SHA256.match(header.sha256):
            problems.append(Violation("sha256", "must be 64 lower-case hex digits"))
        if not _NAME.match(header.name):
            problems.append(
                Violation("name", "must be a plain file name ([A-Za-z0-9._-], not starting with '.')")
            )
        if problems:
            raise ValidationError(problems)
        if header.size > self.max_bytes:
            raise ResourceExhausted(
                f"a checkpoint of {header.size} bytes is over the limit of {self.max_bytes}"
            )

    def _receive(
        self, header: wpb.CheckpointChunk, chunks: Iterator[wpb.CheckpointChunk], path: Path
    ) -> tuple[int, str]:
        h = hashlib.sha256()
        received = 0
        with path.open("wb") as f:
            for msg in itertools.chain([header], chunks):
                if len(msg.data) > CHUNK_BYTES:
                    raise ValidationError(
                        [Violation("data", f"a chunk has {len(msg.data)} bytes; at most {CHUNK_BYTES}")]
                    )
                received += len(msg.data)
                if received > header.size:
                    raise DataLoss(f"more than the {header.size} bytes the header says")
                h.update(msg.data)
                f.write(msg.data)
            f.flush()
            os.fsync(f.fileno())
        return received, h.hexdigest()

    @staticmethod
    def _older(header: wpb.CheckpointChunk, stored: Stored) -> str:
        return (
            f"workload {header.workload_id!r} has a checkpoint of step {stored.step} stored; "
            f"step {header.step} is older"
        )

    def _commit(self, header: wpb.CheckpointChunk, incoming: Path) -> None:
        workload_dir = self.root / escape(header.workload_id)
        with self._lock:
            current = self._latest_dir(workload_dir)
            if current is not None:
                stored = self._read(current)
                if stored.step > header.step:
                    raise FailedPrecondition(self._older(header, stored))
            workload_dir.mkdir(exist_ok=True)
            final = workload_dir / f"{header.step:012d}-{incoming.name}"
            os.rename(incoming, final)
            _fsync(workload_dir)
            self._prune(workload_dir, keep=final)

    def _prune(self, workload_dir: Path, keep: Path | None) -> None:
        """Remove every checkpoint directory of ``workload_dir`` but ``keep`` (under the lock)."""
        with contextlib.suppress(OSError):
            for d in workload_dir.iterdir():
                if d != keep:
                    self._trash(d)

    def _trash(self, path: Path) -> None:
        # a rename first, so the directory disappears at once and whole
        target = self.root / TRASH / uuid.uuid4().hex
        try:
            os.rename(path, target)
        except OSError:
            return
        shutil.rmtree(target, ignore_errors=True)

    def delete(self, workload_id: str) -> bool:
        """Delete the stored checkpoint of ``workload_id``; whether there was one."""
        with self._lock:
            workload_dir = self.root / escape(workload_id)
            if not workload_dir.exists():
                return False
            self._trash(workload_dir)
        log.info("checkpoint deleted", extra={"workload": workload_id})
        return True


class CheckpointsServicer(WorkersServicer):
    """The ``Workers`` service: ``server.workers.WorkersServicer`` (Register, Connect) with
    ``PutCheckpoint`` and ``GetCheckpoint``, and the sweeper thread that deletes the
    checkpoints of CANCELLED workloads."""

    def __init__(
        self, shared: Shared, dispatcher: Dispatcher, store: CheckpointStore, *, sweep: bool = True
    ) -> None:
        super().__init__(shared, dispatcher)
        self.checkpoints = store
        if sweep:
            threading.Thread(target=self._sweep_loop, name="apportion-checkpoints", daemon=True).start()

    @classmethod
    def for_db(cls, shared: Shared, dispatcher: Dispatcher, db: Path) -> CheckpointsServicer:
        """The servicer with its checkpoints next to the database ``db``."""
        return cls(shared, dispatcher, CheckpointStore(root_for(db)))

    # -- the RPCs ----------------------------------------------------------------

    @unary
    def PutCheckpoint(
        self, request_iterator: Iterator[wpb.CheckpointChunk], context: grpc.ServicerContext, who: Principal
    ) -> wpb.PutCheckpointResponse:
        header = next(request_iterator, None)
        if header is None:
            raise ValidationError([Violation("", "an upload needs at least its header")])
        if not self.dispatcher.may_upload(who, header.workload_id):
            raise PermissionDenied(
                f"storing a checkpoint of {header.workload_id!r} needs the admin or the node running it; "
                f"the caller is {who.name}"
            )
        self._check_workload(header.workload_id)
        step = self.checkpoints.put(header, request_iterator)
        return wpb.PutCheckpointResponse(step=step)

    @stream
    def GetCheckpoint(
        self, request: wpb.GetCheckpointRequest, context: grpc.ServicerContext, who: Principal
    ) -> Iterator[wpb.CheckpointChunk]:
        if not self.dispatcher.may_download(who, request.workload_id):
            raise PermissionDenied(
                f"reading the checkpoint of {request.workload_id!r} needs the admin or a node running it "
                f"(or a service of its tenant that serves from it); the caller is {who.name}"
            )
        opened = self.checkpoints.open(request.workload_id)
        if opened is None:
            raise NotFound(f"no checkpoint of workload {request.workload_id!r}")
        stored, f = opened
        with f:
            yield stored.header()
            if request.HasField("newer_than") and stored.step <= request.newer_than:
                return
            while data := f.read(CHUNK_BYTES):
                yield wpb.CheckpointChunk(data=data)

    def _check_workload(self, workload_id: str) -> None:
        row = self.shared.store.get_workload(workload_id)  # NotFound
        if row.kind != "training":
            raise FailedPrecondition(f"workload {workload_id!r} is a service: only training has checkpoints")
        if row.state == CANCELLED:
            raise FailedPrecondition(f"workload {workload_id!r} is CANCELLED: its checkpoint was deleted")

    # -- deletion ----------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Delete the checkpoints of workloads that are CANCELLED or unknown; their ids."""
        deleted = []
        for workload_id in self.checkpoints.workloads():
            try:
                state = self.shared.store.get_workload(workload_id).state
            except NotFound:
                state = None
            if state in (None, CANCELLED) and self.checkpoints.delete(workload_id):
                deleted.append(workload_id)
        return deleted

    def _sweep_loop(self) -> None:
        store = self.shared.store
        revision = -1
        while not self.shared.stopping:
            try:
                now = store.wait_for_change(revision, timeout=30.0)
                if self.shared.stopping:
                    return
                if now != revision:
                    revision = now
                    self.sweep()
            except Exception:  # a closed store (the server stopping), a full disk...
                if self.shared.stopping:
                    return
                log.exception("checkpoint sweep failed")
            time.sleep(SWEEP_EVERY_S)
