"""Smoke test of the planning benchmark (bench/plan_scale.py) on tiny instances."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import plan_scale


def test_quick_benchmark_writes_every_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan_scale.json"
    argv = [
        "--quick",
        "--out",
        str(out),
        "--sizes",
        "1k,gavel",
        "--policies",
        "throughput,fairness,fcfs,best-fit",
    ]
    assert plan_scale.main(argv) == 0
    res = json.loads(out.read_text())

    assert res["command"].startswith("python bench/plan_scale.py --quick")
    for key in ("cpu_count", "platform", "python", "ortools"):
        assert res["machine"][key]
    assert res["date"] and res["config"]["quick"] is True and res["errors"] == []
    assert [i["name"] for i in res["instances"]] == ["1k", "gavel"]
    for inst in res["instances"]:
        assert inst["summary"]["nodes"] > 0 and inst["time_limit_s"] == 0.5
        assert [r["policy"] for r in inst["runs"]] == ["throughput", "fairness", "fcfs", "best-fit"]
        for r in inst["runs"]:
            assert r["ok"], r.get("error")
            for key in ("wall_s", "peak_rss_mib", "status", "objective", "placed", "unplaced", "gpus_used"):
                assert r[key] is not None, key
            assert r["gpus_total"] == inst["summary"]["gpus"]
            assert r["peak_rss_mib"] > 10 and r["stage_times_s"]
            assert set(r["scores"]) == {"throughput", "cost", "fairness"}
            assert r["scores"][r["policy"] if r["optimizer"] else "throughput"] == pytest.approx(
                r["objective"]
            )
            if r["optimizer"]:
                assert r["best_bound"] is not None and r["gap"] is not None
        comparison = {c["policy"]: c for c in inst["comparison"]}
        assert set(comparison) == {"throughput", "fairness"}
        for c in comparison.values():
            assert set(c["baselines"]) == {"fcfs", "best-fit"}
            assert c["best_baseline"] in c["baselines"] and c["best_strict_baseline"] == "best-fit"
    gavel = res["instances"][1]["gavel_lp"]
    assert 0 < gavel["lp_optimum"] <= 1 and gavel["fairness_objective"] is not None
    assert gavel["ratio"] == pytest.approx(gavel["fairness_objective"] / gavel["lp_optimum"])
    table = capsys.readouterr().out
    assert "| 1k | throughput |" in table and "Gavel max-min LP" in table


def test_a_failing_run_is_recorded_not_raised() -> None:
    spec = {"builder": ["nope"], "seed": 0, "policy": "throughput", "time_limit_s": 0.5}
    r = plan_scale.run_isolated(spec, guard_s=60)
    assert r["ok"] is False and "unknown builder" in r["error"]
