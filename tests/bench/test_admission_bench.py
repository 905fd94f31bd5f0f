"""Smoke test of the admission benchmark (bench/admission.py): real servers in child
processes with admission on and off, paced clients, every field recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import admission


def test_quick_run_places_every_probe_and_admission_is_faster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "admission.json"
    assert admission.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == f"python bench/admission.py --quick --out {out}"
    assert doc["date"] and doc["machine"]["cpu_count"] and "commit" in doc["git"]
    on, off = doc["results"]["on"], doc["results"]["off"]
    for r in (on, off):
        assert r["submissions"] == int(admission.QUICK.rate * admission.QUICK.duration_s)
        assert r["errors"] == 0 and r["probes"] == r["probes_placed"] > 0
        assert r["first_plan"]["workloads"] == admission.QUICK.stored
        assert r["final_state"]["nodes_over_capacity"] == 0 and r["final_state"]["tenants_over_quota"] == 0
    # (a round solved between a probe's submission and its admission may place it first)
    assert on["admitted_by_admission"] > 0 and off["admitted_by_admission"] == 0
    # without admission a probe waits for a round (debounced, then solved); with it, not
    assert on["submit_to_placed_s"]["p50_s"] < off["submit_to_placed_s"]["p50_s"]
    assert doc["target"]["met"] is (on["submit_to_placed_s"]["p99_s"] <= admission.TARGET_P99_S)
    assert "| on |" in capsys.readouterr().out
