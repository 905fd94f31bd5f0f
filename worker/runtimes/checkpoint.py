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
The newest ``KEEP`` checkpoints are kept, older ones deleted. The layout and
the atomic writes are in ``worker.runtimes.ckpt_files`` (no torch: the agent
uploads and downloads these files, see ``worker.checkpoint_sync``).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.runtimes import ckpt_files

KEEP = 3
LATEST = ckpt_files.LATEST
name_for = ckpt_files.name_for
latest_path = ckpt_files.latest_path


def param_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal digests mean equal models."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (which has a ``step``) as ``ckpt-STEP.pt``, point ``latest`` at it, prune old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    path = directory / name_for(step)
    ckpt_files.write_atomic(path, lambda f: torch.save(state, f))
    ckpt_files.point_latest(directory, step)
    for old in ckpt_files.steps(directory)[:-KEEP]:
        if old != step:
            with contextlib.suppress(OSError):
                (directory / name_for(old)).unlink()
    return path


def load(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
