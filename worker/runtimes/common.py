"""What the built-in runtimes share: reading their environment, the progress protocol, the device.

Progress protocol (stdout, read by the worker agent): one line per report,
``APPORTION_PROGRESS {json}`` (and ``APPORTION_READY {json}`` once a server is
serving), flushed as it is written. Everything else a runtime says goes to
stderr. A runtime that fails exits non-zero with ``<runtime>: error: ...`` on
stderr; a bad environment exits 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

PROGRESS_PREFIX = "APPORTION_PROGRESS"
READY_PREFIX = "APPORTION_READY"


class ConfigError(ValueError):
    """The environment does not configure the runtime (exit status 2)."""


def env_int(env: Mapping[str, str], name: str, default: int | None = None, minimum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        if default is None:
            raise ConfigError(f"{name} must be set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:
        raise ConfigError(f"{name} must be ≥ {minimum}, got {raw}")
    return value


def env_args(env: Mapping[str, str]) -> list[str]:
    """APPORTION_RUNTIME_ARGS: a JSON list of strings (absent or empty: none)."""
    raw = env.get("APPORTION_RUNTIME_ARGS", "").strip()
    if not raw:
        return []
    try:
        args = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"APPORTION_RUNTIME_ARGS must be a JSON list: {exc}") from None
    if not isinstance(args, list):
        raise ConfigError("APPORTION_RUNTIME_ARGS must be a JSON list")
    return [str(a) for a in args]


def env_device(env: Mapping[str, str]) -> torch.device:
    """APPORTION_DEVICE (cpu|cuda; default cuda when torch sees one, else cpu), on LOCAL_RANK's GPU."""
    name = env.get("APPORTION_DEVICE", "").strip().lower() or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ConfigError(f"APPORTION_DEVICE must be cpu or cuda, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError("APPORTION_DEVICE is cuda but torch sees no GPU")
    # CUDA_VISIBLE_DEVICES usually leaves each process its own GPU(s): the local rank picks among those seen
    local_rank = env_int(env, "LOCAL_RANK", 0, minimum=0)
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cpu_threads(env: Mapping[str, str]) -> None:
    """Share the machine's cores among the local ranks instead of each rank taking all of them."""
    local = env_int(env, "LOCAL_WORLD_SIZE", 1, minimum=1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local))


def emit(prefix: str, payload: Mapping[str, Any]) -> None:
    """One protocol line on stdout, flushed."""
    sys.stdout.write(f"{prefix} {json.dumps(payload, separators=(',', ':'))}\n")
    sys.stdout.flush()


def log(runtime: str, message: str) -> None:
    print(f"{runtime}: {message}", file=sys.stderr, flush=True)
