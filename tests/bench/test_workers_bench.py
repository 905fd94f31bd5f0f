"""Smoke test of the workers benchmark (bench/workers.py): a real server, real agents, the real runtime.

Only the failover part runs (about 15 s alone on 2 cores: it starts a server, two agents and
``train-lm`` twice); the other parts' report is checked on a made-up result."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import workers


def test_quick_failover_writes_every_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "workers.json"
    start = time.perf_counter()
    assert workers.main(["--quick", "--only", "failover", "--out", str(out)]) == 0
    assert time.perf_counter() - start < 30
    res = json.loads(out.read_text())
    assert res["command"] == f"python bench/workers.py --quick --only failover --out {out}"
    assert res["date"] and res["config"]["quick"] is True and res["machine"]["cpu_count"]
    assert "commit" in res["git"]
    f = res["results"]["failover"]
    assert f["heartbeat_timeout_s"] == workers.QUICK.heartbeat_timeout_s
    assert 0 < f["kill_to_placed_elsewhere_s"] <= f["kill_to_running_again_s"] <= f["kill_to_first_step_s"]
    assert f["resumed_at_step"] is not None and f["resumed_at_step"] > 0
    assert f["server"].startswith("apportion serve --heartbeat-interval")
    assert "Worker SIGKILLed" in capsys.readouterr().out


def test_report_of_train_and_generate() -> None:
    run = {"samples_per_s": 100.0, "submit_to_first_step_s": 3.0, "submit_to_running_s": 1.0}
    results = {
        "train": {
            "median_submit_to_first_step_s": 3.0,
            "median_submit_to_running_s": 1.0,
            "median_direct_spawn_to_first_step_s": 2.5,
            "median_direct_samples_per_s": 100.0,
            "median_dispatched_samples_per_s": 98.0,
            "ratio": 0.98,
            "dispatched": [run],
        },
        "generate": {
            "clients": 8,
            "direct_1": {"per_s": 50.0, "p50_ms": 20.0},
            "router_1": {"per_s": 48.0, "p50_ms": 21.0},
            "router_2": {"per_s": 60.0},
            "direct_2_one_replica": {"per_s": 30.0},
            "router_scaling_2_over_1": 1.25,
        },
    }
    t = workers.targets(results)
    assert t["dispatched_over_direct_samples_per_s"]["met"]
    assert "router_scaling_2_over_1" not in t  # real replicas on the router's cores: shown, not judged
    table = workers.markdown({"results": results, "targets": t})
    assert "98.0 / 100.0 = 0.980" in table and "× 1.25" in table


def test_quick_router_part_routes_to_every_fixed_replica(tmp_path: Path) -> None:
    """The router part: replicas of fixed capacity (bench/fixed_replica.py) launched by agents as a
    ``command`` runtime, reached through the server's router; its figures are recorded (not judged here:
    the machine is shared)."""
    out = tmp_path / "workers.json"
    assert workers.main(["--quick", "--only", "router", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    r = res["results"]["router"]
    assert r["replica_capacity_per_s"] == 100.0 and r["direct_1"]["per_s"] > 0
    assert set(r["runs"]) == {"1", "2"} and r["scaling"]["1"] == 1.0
    assert set(r["runs"]["2"]["replicas"]) == {"fixed2/0", "fixed2/1"}
    assert not r["runs"]["1"]["errors"] and not r["runs"]["2"]["errors"]
    assert r["runs"]["2"]["server_cpu_ms_per_request"] > 0
    assert "router_scaling_fixed_replicas" in res["targets"]
