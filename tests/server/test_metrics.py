"""server.metrics: the series render on a registry of their own, and serve() answers HTTP."""

from __future__ import annotations

import math
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import REQUEST_BUCKETS, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_render() -> None:
    m = Metrics()
    m.observe_request("SubmitWorkload", "OK", 0.002)
    m.observe_request("SubmitWorkload", "OK", 0.004)
    m.observe_request("SubmitWorkload", "INVALID_ARGUMENT", 0.0003)
    m.observe_plan("OPTIMAL", gap=0.0025, objective=123.5, solve_seconds=1.5)
    m.set_workloads({"PENDING": 3, "PLACED": 7})
    got = samples(m)
    assert got[("apportion_requests_total", (("code", "OK"), ("method", "SubmitWorkload")))] == 2
    assert (
        got[("apportion_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "SubmitWorkload")))] == 1
    )
    assert got[("apportion_request_seconds_count", (("method", "SubmitWorkload"),))] == 3
    assert got[("apportion_request_seconds_bucket", (("le", "0.0005"), ("method", "SubmitWorkload")))] == 1
    assert got[("apportion_request_seconds_bucket", (("le", "0.005"), ("method", "SubmitWorkload")))] == 3
    assert got[("apportion_plan_gap", ())] == 0.0025
    assert got[("apportion_plan_objective", ())] == 123.5
    assert got[("apportion_plan_solve_seconds_count", ())] == 1
    assert got[("apportion_plan_solve_seconds_sum", ())] == 1.5
    assert got[("apportion_plans_total", (("status", "OPTIMAL"),))] == 1
    assert got[("apportion_workloads", (("state", "PENDING"),))] == 3
    assert got[("apportion_workloads", (("state", "PLACED"),))] == 7
    text = m.render().decode()
    assert "# TYPE apportion_request_seconds histogram" in text
    assert "# HELP apportion_requests_total" in text
    assert REQUEST_BUCKETS[0] == 0.0005 and REQUEST_BUCKETS[-1] == 10.0


def test_plan_without_bound_and_workload_states() -> None:
    m = Metrics()
    m.observe_plan("OPTIMAL", gap=0.0, objective=10.0, solve_seconds=0.1)
    m.observe_plan("FEASIBLE", gap=None, objective=None, solve_seconds=0.2)
    got = samples(m)
    assert math.isnan(got[("apportion_plan_gap", ())])
    assert got[("apportion_plan_objective", ())] == 10.0  # kept
    assert got[("apportion_plans_total", (("status", "FEASIBLE"),))] == 1
    m.set_workloads({"PENDING": 2, "PLACED": 1})
    m.set_workloads({"PLACED": 3})  # PENDING drained: reported as 0, not left stale
    got = samples(m)
    assert got[("apportion_workloads", (("state", "PENDING"),))] == 0
    assert got[("apportion_workloads", (("state", "PLACED"),))] == 3


def test_registries_are_separate() -> None:
    a, b = Metrics(), Metrics()  # no "Duplicated timeseries" error
    a.observe_request("Plan", "OK", 0.1)
    assert b"apportion_requests_total{" not in b.render()
    assert b"apportion_requests_total{" in a.render()
    assert REGISTRY.get_sample_value("apportion_requests_total", {"method": "Plan", "code": "OK"}) is None


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_serve() -> None:
    m = Metrics()
    m.observe_request("GetPlan", "NOT_FOUND", 0.01)
    port = m.serve(0)
    try:
        assert port > 0 and m.port == port
        status, content_type, body = fetch(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        assert b'apportion_requests_total{code="NOT_FOUND",method="GetPlan"} 1.0' in body
        with pytest.raises(RuntimeError, match="already served"):
            m.serve(0)
        other = Metrics()
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            other.serve(port)  # taken
    finally:
        m.stop()
    assert m.port is None
    with pytest.raises(urllib.error.URLError):
        fetch(f"http://127.0.0.1:{port}/metrics")
    m.stop()  # a second stop is a no-op
