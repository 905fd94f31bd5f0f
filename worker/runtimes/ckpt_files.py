"""The file layout of a checkpoint directory, without torch (the agent reads and fills it too).

- ``ckpt-STEP.pt``: one complete checkpoint (what is in it: ``worker.runtimes.checkpoint``).
- ``latest``: the name of the newest complete checkpoint, one line (for people and
  other tools: :func:`latest_path` goes by the files, see there).

Every file is written atomically (a temporary file in the same directory, fsync,
``os.replace``), a checkpoint before the pointer that names it, so a reader only
ever sees complete checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

LATEST = "latest"
NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def name_for(step: int) -> str:
    return f"ckpt-{step}.pt"


def step_of(path: Path) -> int:
    """The step of checkpoint file ``path`` (``ckpt-STEP.pt``)."""
    m = NAME.match(path.name)
    if m is None:
        raise ValueError(f"not a checkpoint file name: {path.name!r}")
    return int(m.group(1))


def steps(directory: Path) -> list[int]:
    """The steps of the checkpoint files in ``directory``, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := NAME.match(p.name)))


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)``: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
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
    fsync_dir(path.parent)


def point_latest(directory: Path, step: int) -> None:
    """Make ``latest`` name ``ckpt-STEP.pt``."""
    write_atomic(directory / LATEST, lambda f: f.write(f"{name_for(step)}\n".encode()))


def latest_path(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (None when there is none): the
    highest-numbered ``ckpt-STEP.pt``, which is complete (written atomically), whatever
    ``latest`` says. The pointer lags behind the newest file while a writer is between the
    two writes, and stays behind if the writer is killed there: trusting it would resume
    from an older checkpoint and lose the steps of the newer one."""
    found = steps(directory)
    return directory / name_for(found[-1]) if found else None
