"""Checkpoints of the built-in training runtime, in a directory shared by all ranks (and nodes).

Layout of the directory:

- ``ckpt-STEP.pt``: a ``torch.save``'d dict: ``step``, ``model`` (state dict),
  ``optimizer`` (state dict), ``rng`` (torch CPU RNG state), ``model_config``,
  ``loss``, ``world_size``, ``workload_id`` and ``param_sha256`` (a digest of
  the parameters' bytes, the same on every rank of a data-parallel job).
- ``latest``: the name of the newest complete checkpoint, one line.

Both are written atomically (a temporary file in the same directory, fsync,
``os.replace``), the checkpoint before the pointer, so a reader (or a job
resumed on another node after a crash) only ever sees complete checkpoints.
The newest ``KEEP`` checkpoints are kept, older ones deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

LATEST = "latest"
KEEP = 3
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def name_for(step: int) -> str:
    return f"ckpt-{step}.pt"


def param_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal digests mean equal models."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def save(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (which has a ``step``) as ``ckpt-STEP.pt``, point ``latest`` at it, prune old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name_for(int(state["step"]))
    _write_atomic(path, lambda f: torch.save(state, f))
    _write_atomic(directory / LATEST, lambda f: f.write(f"{path.name}\n".encode()))
    steps = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    for old in steps[:-KEEP]:
        if old != state["step"]:
            with contextlib.suppress(OSError):
                (directory / name_for(old)).unlink()
    return path


def latest_path(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (None when there is none)."""
    pointer = directory / LATEST
    try:
        name = pointer.read_text().strip()
    except OSError:
        name = ""
    if _NAME.match(name) and (directory / name).is_file():
        return directory / name
    # no pointer (or a dangling one): the highest-numbered checkpoint, which is complete (atomic writes)
    if not directory.is_dir():
        return None
    steps = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    return directory / name_for(steps[-1]) if steps else None


def load(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
