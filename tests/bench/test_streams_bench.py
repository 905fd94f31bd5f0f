"""Smoke test of the stream-load benchmark (bench/streams.py): a real server in a child
process, simulated workers and Watch streams in other processes, every field recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import streams


def test_quick_run_connects_everything_and_records_every_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "streams.json"
    assert streams.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == f"python bench/streams.py --quick --out {out}"
    assert doc["date"] and doc["machine"]["cpu_count"] and "commit" in doc["git"]
    r = doc["results"]
    assert r["connected_workers"] == r["workers"] == streams.QUICK.workers
    assert r["watch_streams"] == streams.QUICK.watchers
    assert r["agent_errors"] == 0 and r["watch_errors"] == []
    assert r["leases_received"] >= r["workers"]  # every worker's heartbeats were answered
    assert r["watch_events"] >= streams.QUICK.watchers  # the probe's submits reached every watch
    assert r["probe"]["calls"] > 0 and r["probe"]["errors"] == 0
    assert r["probe"]["all"]["p99_ms"] > 0
    assert set(doc["targets"]) == {"connected_workers", "watch_streams", "unary_p99_ms"}
    assert doc["targets"]["connected_workers"]["met"] and doc["targets"]["watch_streams"]["met"]
    assert "workers connected" in capsys.readouterr().out
