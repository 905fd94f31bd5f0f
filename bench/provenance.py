"""Where a benchmark figure comes from: the machine and the commit, recorded
beside every result in bench/results/*.json."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def machine(**extra: Any) -> dict[str, Any]:
    """Cores, platform, Python, load average and memory of this machine, plus ``extra``."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_gib": None,
        **extra,
    }
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as f:
        total_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(total_kib / 1024**2, 1)
    return info


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git(dirty_key: str, paths: Sequence[str]) -> dict[str, Any]:
    """The commit, and under ``dirty_key`` whether ``paths`` have uncommitted changes.
    Run from an export of a commit (``git archive``, no .git): the commit named by
    ``$APPORTION_GIT_COMMIT``."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": os.environ.get("APPORTION_GIT_COMMIT"), "exported_tree": True}
    dirty = _git("status", "--porcelain", "--", *paths)
    return {"commit": commit, dirty_key: None if dirty is None else bool(dirty)}


def run_parts(
    doc: dict[str, Any],
    parts: Sequence[str],
    runners: Mapping[str, Callable[[Any], dict[str, Any]]],
    cfg: Any,
    targets: Callable[[Mapping[str, Any]], dict[str, Any]],
    out: Path,
) -> None:
    """Run each part (``runners[part](cfg)``) into ``doc["results"]`` with its time
    (``part_s``), and write ``doc`` with its ``targets`` to ``out`` after each part, so
    a part that fails leaves the ones before it recorded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for part in parts:
        t0 = time.perf_counter()
        doc["results"][part] = runners[part](cfg)
        doc["results"][part]["part_s"] = round(time.perf_counter() - t0, 1)
        doc["targets"] = targets(doc["results"])
        out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    doc["targets"] = targets(doc["results"])
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
