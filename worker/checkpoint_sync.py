"""Checkpoints between a worker's directory and the server, so training resumes on any node.

The server keeps the latest checkpoint of each training workload
(``server.checkpoints``; ``Workers.PutCheckpoint`` / ``GetCheckpoint``). The
agent (``worker.agent``) uses this module:

- :func:`fetch` before it launches a shard of a ``train-lm`` job (every shard
  of a gang: each node's ranks load from their own directory) or a
  ``serve-lm`` whose ``APPORTION_SERVE_FROM`` names a training workload: if
  the server's checkpoint has a higher step than the newest one in the local
  directory (``<work-dir>/checkpoints/<id>``, layout in
  ``worker.runtimes.ckpt_files``), it is downloaded, its size and SHA-256
  checked, written atomically as ``ckpt-STEP.pt`` and ``latest`` pointed at it.
  When the local one is as new (workers that share ``--work-dir``, or a job
  restarted where it ran), nothing is downloaded. A failed download leaves
  the directory as it was and the shard starts with what is there.
- :class:`Uploader` for the shard that holds global rank 0 of a ``train-lm``
  job (the rank that writes checkpoints): a thread of the agent polls the
  directory every :data:`POLL_S` and uploads each new ``latest`` checkpoint
  whose step is above what the server has, so the training processes never
  wait for it. Files are complete when ``latest`` names them (the runtime
  writes atomically); an upload reads from one open file, so a checkpoint
  pruned meanwhile is still sent whole. A failed upload is retried at the next
  poll with back-off (at most :data:`MAX_BACKOFF_S`); one the server refuses
  as older than what it has is skipped; a server without these RPCs (or a token
  that may not use them) ends the uploads of that shard. When the shard ends,
  :meth:`Uploader.finish` uploads its last checkpoint before the agent reports
  the shard's end, so a SUCCEEDED job's model (or a stopped job's checkpoint,
  when it is moved) is on the server when the server learns of it. A worker
  that dies loses at most what it had not uploaded yet: the checkpoints
  written in its last poll interval and upload.

A job the plan moves (not a crash) is launched on its new node only once the
old shards have reported their end (the server's dispatcher: break before
make), and the old rank 0's agent uploads the checkpoint the runtime writes on
SIGTERM before it reports that end, so the new node downloads the step the old
one stopped at: a planned move loses nothing. A worker that dies loses what it
had not uploaded (above).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import grpc

from apportion.v1 import workers_pb2 as wpb
from apportion.v1 import workers_pb2_grpc
from worker.runtimes import ckpt_files

log = logging.getLogger("apportion.worker.checkpoints")

CHUNK_BYTES = 1024 * 1024  # the server accepts chunks of at most 1 MiB
POLL_S = 0.5
MAX_BACKOFF_S = 10.0
UPLOAD_TIMEOUT_S = 600.0
FETCH_TIMEOUT_S = 600.0

Metadata = Sequence[tuple[str, str]]
# answers no retry changes: a server without the RPCs, a token that may not use them
_GIVE_UP = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class SyncError(Exception):
    """A download that cannot be used (size or SHA-256 mismatch)."""


def local_step(directory: Path) -> int:
    """The step of the newest complete checkpoint in ``directory``, -1 when there is none."""
    path = ckpt_files.latest_path(directory)
    return ckpt_files.step_of(path) if path is not None else -1


def fetch(
    stub: workers_pb2_grpc.WorkersStub,
    metadata: Metadata,
    workload_id: str,
    directory: Path,
    *,
    timeout: float = FETCH_TIMEOUT_S,
) -> tuple[int, bool]:
    """Bring the server's checkpoint of ``workload_id`` into ``directory`` if it is newer.

    Returns (the server's step, -1 when it has none; whether it was downloaded).
    Raises grpc.RpcError (the server failed) or SyncError (a corrupt transfer);
    the directory is unchanged then.
    """
    have = local_step(directory)
    call = stub.GetCheckpoint(
        wpb.GetCheckpointRequest(workload_id=workload_id, newer_than=have), metadata=metadata, timeout=timeout
    )
    try:
        header = next(call)
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
            return -1, False
        raise
    except StopIteration:
        raise SyncError("the server's answer has no header") from None
    if header.step <= have:
        call.cancel()
        return int(header.step), False
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / ckpt_files.name_for(header.step)

    def write(f: IO[bytes]) -> None:
        h = hashlib.sha256()
        size = 0
        for chunk in _data(header, call):
            h.update(chunk)
            size += len(chunk)
            f.write(chunk)
        if size != header.size or h.hexdigest() != header.sha256:
            raise SyncError(
                f"checkpoint of {workload_id!r} step {header.step}: received {size} bytes with sha256 "
                f"{h.hexdigest()}; the server announced {header.size} bytes, {header.sha256}"
            )

    try:
        ckpt_files.write_atomic(target, write)
    finally:
        call.cancel()
    if local_step(directory) < header.step:  # a runtime here may have written a newer one meanwhile
        ckpt_files.point_latest(directory, header.step)
    log.info(
        f"checkpoint of {workload_id} step {header.step} downloaded ({header.size} bytes; "
        f"the newest here was step {have})",
        extra={"workload": workload_id, "step": header.step, "bytes": header.size, "local_step": have},
    )
    return int(header.step), True


def _data(header: wpb.CheckpointChunk, rest: Iterator[wpb.CheckpointChunk]) -> Iterator[bytes]:
    if header.data:
        yield header.data
    for chunk in rest:
        yield chunk.data


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file itself, not a symbolic link or a
    device: the directory belongs to the job, which could otherwise point a checkpoint at a
    file only the agent may read and have the agent upload it (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def upload(
    stub: workers_pb2_grpc.WorkersStub,
    metadata: Metadata,
    workload_id: str,
    path: Path,
    *,
    timeout: float = UPLOAD_TIMEOUT_S,
) -> int:
    """Send checkpoint file ``path`` (``ckpt-STEP.pt``) to the server; the step it stored."""
    step = ckpt_files.step_of(path)
    with open_regular(path) as f:  # open once: a prune that deletes the file does not cut it short
        h = hashlib.sha256()
        size = 0
        while block := f.read(CHUNK_BYTES):
            h.update(block)
            size += len(block)
        header = wpb.CheckpointChunk(
            workload_id=workload_id, step=step, name=path.name, size=size, sha256=h.hexdigest()
        )

        def chunks() -> Iterator[wpb.CheckpointChunk]:
            f.seek(0)
            yield header
            while block := f.read(CHUNK_BYTES):
                yield wpb.CheckpointChunk(data=block)

        reply = stub.PutCheckpoint(chunks(), metadata=metadata, timeout=timeout)
    return int(reply.step)


class Uploader:
    """Uploads each new checkpoint of ``directory`` from a background thread (see the module)."""

    def __init__(
        self,
        stub: workers_pb2_grpc.WorkersStub,
        metadata: Metadata,
        workload_id: str,
        directory: Path,
        *,
        server_step: int = -1,
        poll_s: float = POLL_S,
    ) -> None:
        self.stub = stub
        self.metadata = metadata
        self.workload_id = workload_id
        self.directory = directory
        self.server_step = server_step  # the step the server is known to have (-1: none)
        self.poll_s = poll_s
        self.uploads = 0
        self._lock = threading.Lock()  # one upload at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"upload-{workload_id}", daemon=True)

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def _run(self) -> None:
        delay = self.poll_s
        while not self._stop.wait(delay):
            try:
                self.upload_latest()
                delay = self.poll_s
            except grpc.RpcError as exc:
                if isinstance(exc, grpc.Call) and exc.code() in _GIVE_UP:
                    log.warning(
                        f"checkpoints of {self.workload_id} are not uploaded: {exc.code().name}: "
                        f"{exc.details()}",
                        extra={"workload": self.workload_id, "code": exc.code().name},
                    )
                    return
                delay = min(MAX_BACKOFF_S, max(self.poll_s, delay * 2))
                code = exc.code().name if isinstance(exc, grpc.Call) else ""
                log.warning(
                    f"checkpoint upload of {self.workload_id} failed ({code}); retrying in {delay:.1f} s",
                    extra={"workload": self.workload_id, "code": code},
                )
            except (OSError, ValueError) as exc:
                delay = min(MAX_BACKOFF_S, max(self.poll_s, delay * 2))
                log.warning(
                    f"checkpoint upload of {self.workload_id} failed ({exc}); retrying in {delay:.1f} s",
                    extra={"workload": self.workload_id, "error": str(exc)},
                )

    def upload_latest(self, timeout: float = UPLOAD_TIMEOUT_S) -> bool:
        """Upload the directory's newest checkpoint if the server's is older; whether one was sent."""
        with self._lock:
            path = ckpt_files.latest_path(self.directory)
            if path is None or ckpt_files.step_of(path) <= self.server_step:
                return False
            step = ckpt_files.step_of(path)
            try:
                self.server_step = upload(self.stub, self.metadata, self.workload_id, path, timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    raise
                # the server has a newer one, or will not keep this workload's: do not send it again
                self.server_step = max(self.server_step, step)
                reason = exc.details() if isinstance(exc, grpc.Call) else ""
                log.info(
                    f"checkpoint of {self.workload_id} step {step} not stored: {reason}",
                    extra={"workload": self.workload_id, "step": step, "reason": reason},
                )
                return False
            self.uploads += 1
            log.info(
                f"checkpoint of {self.workload_id} step {step} uploaded",
                extra={"workload": self.workload_id, "step": step},
            )
            return True

    def finish(self, timeout: float = 60.0) -> None:
        """Stop polling and upload the last checkpoint (giving up after ``timeout`` seconds)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        if self._thread.is_alive():
            self._thread.join(timeout)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            self.upload_latest(timeout=remaining)
        except (grpc.RpcError, OSError, ValueError) as exc:
            log.warning(
                f"the last checkpoint upload of {self.workload_id} failed: {exc}",
                extra={"workload": self.workload_id, "error": str(exc)},
            )


def serve_from_workload(value: str) -> str | None:
    """The training workload an ``APPORTION_SERVE_FROM`` value names (a bare name, not a
    path), else None."""
    if value and "/" not in value and os.sep not in value and value not in (".", ".."):
        return value
    return None
