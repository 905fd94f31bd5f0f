"""Smoke test of the server benchmark (bench/server_load.py): a real server, tiny loads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from apportion.v1 import types_pb2 as pb
from bench import instances, server_load
from server import convert


def test_messages_are_the_instance() -> None:
    """The benchmark sends the instance exactly: messages -> domain gives it back."""
    problem = instances.problem(300, 12, seed=1)
    gpu_types, nodes, tenants = server_load.inventory_messages(problem)
    back = convert.problem_from_messages(
        pb.Inventory(gpu_types=gpu_types, nodes=nodes, tenants=tenants),
        pb.WorkloadList(workloads=server_load.workload_messages(problem)),
    )
    assert back == problem


def test_quick_benchmark_writes_every_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "server_load.json"
    start = time.perf_counter()
    assert server_load.main(["--quick", "--out", str(out)]) == 0
    assert time.perf_counter() - start < 60  # about 10 s alone on 2 cores; slack for a loaded machine
    res = json.loads(out.read_text())

    assert res["command"] == f"python bench/server_load.py --quick --out {out}"
    assert res["date"] and res["config"]["quick"] is True
    assert res["machine"]["cpu_count"] and res["machine"]["python"]
    assert "commit" in res["git"]
    r = res["results"]
    assert set(r) == {"submit", "plan", "memory"}

    s = r["submit"]
    assert s["errors"] == {} and s["requests_in_window"] > 0 and s["per_s"] > 0
    assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["server_command"].startswith("python -m server serve --insecure --listen 127.0.0.1:")
    assert s["concurrency"] == 4

    p = r["plan"]
    assert len(p["repetitions"]) == 2
    for rep in p["repetitions"]:
        assert rep["wall_s"] > rep["solve_time_s"] > 0
        assert rep["overhead_s"] == pytest.approx(rep["wall_s"] - rep["solve_time_s"], abs=2e-4)
        assert rep["placed"] > 0
    assert 0 < p["median_overhead_fraction"] < 1
    assert p["in_process_breakdown_s"]

    m = r["memory"]
    assert m["errors"] == {}
    assert m["workloads_submitted"] == m["workloads_listed"] == 400
    assert m["plan_covering_all_after_s"] is not None
    assert m["server_vm_hwm_mib"] >= m["empty_server"]["server_vm_hwm_mib"] > 10
    assert m["db_total_mib"] > 0 and "state.db" in m["db_files_bytes"]
    assert any(c["role"] == "solver process" for c in m["children"])

    assert set(res["targets"]) == {"submit_per_s", "submit_p99_ms", "plan_overhead_fraction"}
    table = capsys.readouterr().out
    assert "SubmitWorkload throughput" in table and "Plan overhead" in table and "peak RSS" in table
