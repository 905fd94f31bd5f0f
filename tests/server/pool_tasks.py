"""Module-level functions for ``test_solving.py`` to run in solver processes (they must
pickle by reference)."""

from __future__ import annotations

import os
import time


def pid() -> int:
    return os.getpid()


def spin(seconds: float) -> int:
    """Busy for ``seconds`` (a solver that ignores its limit)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return os.getpid()


def die() -> None:
    os._exit(3)


def fail() -> None:
    raise ValueError("as asked")
