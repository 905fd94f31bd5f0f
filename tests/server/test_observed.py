"""Measured throughput: kept in the store (merged, migrated, dropped when the job
changes), shown in the API's status, and planned with by the control loop."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from apportion.v1 import allocator_pb2 as apb
from server import convert
from server.control import planned_spec
from server.store import PLACED, RUNNING, SCHEMA_VERSION, Observation, Store
from server.workers import RATE_WINDOW_S, SMOOTHING_S, _Track
from tests.server.serving import FAST_LOOP, running_server

SPEC: dict[str, Any] = {
    "id": "job",
    "training": {"gpus": 2, "throughput": {"h100-80g": 10.0, "a100-80g": 8.0}, "remaining_work": 1000},
    "runtime": {"builtin": "train-lm"},
}


def test_observations_are_merged_per_gpu_type_and_kept(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.submit_workload("job", "", "training", SPEC, request_key=None)
        store.set_workload_state("job", RUNNING, "step 10", observation=Observation(work_done=10))
        assert store.get_workload("job").observed == {"work_done": 10}
        h100 = Observation(120, "h100-80g", 2, work_per_s=4.0, samples_per_s=256.0, seconds=30.0)
        row = store.set_workload_state("job", RUNNING, "step 120", observation=h100)
        rate = row.observed["throughput"]["h100-80g"]
        assert row.observed["work_done"] == 120
        assert [rate[k] for k in ("gpus", "work_per_s", "samples_per_s", "seconds")] == [2, 4.0, 256.0, 30]
        a100 = Observation(300, "a100-80g", 2, work_per_s=3.0, samples_per_s=192.0, seconds=5.0)
        store.set_workload_state("job", RUNNING, "step 300", observation=a100)
        # a progress write without an observation keeps them
        store.set_workload_state("job", PLACED, "moved")
        row = store.get_workload("job")
        assert row.observed["work_done"] == 300
        assert {t: r["work_per_s"] for t, r in row.observed["throughput"].items()} == {
            "h100-80g": 4.0,
            "a100-80g": 3.0,
        }
        events = [e for e in store.events_after(0) if e.kind == "workload"]
        assert events[-1].data["observed"] == row.observed  # Watch sees them too
    with Store(tmp_path / "s.db") as store:
        assert store.get_workload("job").observed == row.observed


def test_an_update_keeps_rates_unless_the_job_it_measured_changed(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.submit_workload("job", "", "training", SPEC, request_key=None)
        obs = Observation(50, "h100-80g", 2, work_per_s=4.0, samples_per_s=256.0, seconds=30.0)
        store.set_workload_state("job", RUNNING, "step 50", observation=obs)
        more = {**SPEC, "training": {**SPEC["training"], "remaining_work": 2000}}
        assert store.update_workload("job", more).observed["throughput"]["h100-80g"]["work_per_s"] == 4.0
        bigger = {**SPEC, "training": {**SPEC["training"], "gpus": 4}}
        assert store.update_workload("job", bigger).observed == {"work_done": 50}
        store.set_workload_state("job", RUNNING, "step 60", observation=obs)
        other = {**bigger, "runtime": {"builtin": "train-lm", "args": ["--layers", "4"]}}
        assert "throughput" not in store.update_workload("job", other).observed


def test_a_schema_1_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Store(path) as store:
        store.submit_workload("job", "", "training", SPEC, request_key=None)
    conn = sqlite3.connect(path)  # make it what a schema 1 server wrote: no observed column
    conn.executescript(
        """
        CREATE TABLE w1 (
            id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
            version INTEGER NOT NULL, spec TEXT NOT NULL, placement TEXT, reasons TEXT NOT NULL,
            message TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
            revision INTEGER NOT NULL
        );
        INSERT INTO w1 SELECT id, tenant, kind, state, version, spec, placement, reasons, message,
            created_at, updated_at, revision FROM workloads;
        DROP TABLE workloads;
        ALTER TABLE w1 RENAME TO workloads;
        CREATE INDEX workloads_tenant ON workloads (tenant, id);
        CREATE INDEX workloads_state ON workloads (state, id);
        DROP TABLE requests;
        CREATE TABLE requests (
            request_key TEXT PRIMARY KEY, op TEXT NOT NULL, workload_id TEXT NOT NULL,
            revision INTEGER NOT NULL, created_at REAL NOT NULL
        );
        UPDATE meta SET value = '1' WHERE key = 'schema_version';
        """
    )
    conn.commit()
    conn.close()
    with Store(path) as store:
        row = store.get_workload("job")
        assert row.observed == {} and row.spec == SPEC
        obs = Observation(7, "h100-80g", 2, work_per_s=1.0, samples_per_s=64.0, seconds=3.0)
        store.set_workload_state("job", RUNNING, "step 7", observation=obs)
        assert store.get_workload("job").observed["work_done"] == 7
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    conn.close()


def test_the_status_shows_what_was_measured(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.submit_workload("job", "", "training", SPEC, request_key=None)
        assert not convert.workload_status(store.get_workload("job")).HasField("work_done")
        obs = Observation(120, "h100-80g", 2, work_per_s=4.0, samples_per_s=256.0, seconds=30.0)
        status = convert.workload_status(store.set_workload_state("job", RUNNING, "x", observation=obs))
    assert status.work_done == 120
    [rate] = status.observed_throughput
    assert (rate.gpu_type, rate.gpus, rate.work_per_s, rate.samples_per_s, rate.measured_s) == (
        "h100-80g",
        2,
        4.0,
        256.0,
        30.0,
    )
    assert rate.updated_at > 0


def observed(work_done: float, **rates: tuple[int, float]) -> dict[str, Any]:
    return {
        "work_done": work_done,
        "throughput": {
            t.replace("_", "-"): {"gpus": g, "work_per_s": r, "seconds": 60.0} for t, (g, r) in rates.items()
        },
    }


def test_planned_spec_replaces_measured_types_and_counts_remaining_work_down() -> None:
    seen = observed(400, h100_80g=(2, 5.0))
    out = planned_spec(SPEC, seen, "observed")
    assert out["training"]["throughput"] == {"h100-80g": 5.0, "a100-80g": 8.0}
    assert out["training"]["remaining_work"] == 600
    assert SPEC["training"]["throughput"]["h100-80g"] == 10.0  # the stored spec is not touched
    scaled = planned_spec(SPEC, seen, "scaled")
    assert scaled["training"]["throughput"] == {"h100-80g": 5.0, "a100-80g": 4.0}
    off = planned_spec(SPEC, seen, "off")
    assert off["training"]["throughput"] == SPEC["training"]["throughput"]
    assert off["training"]["remaining_work"] == 600  # progress is not an estimate: always counted
    # a rate measured on another gang size is not this job's
    assert planned_spec(SPEC, observed(0, h100_80g=(4, 1.0)), "observed")["training"] == SPEC["training"]
    # measured on both: within 10% of each other they count as equal (noise moves nothing)
    both = planned_spec(SPEC, observed(0, h100_80g=(2, 5.0), a100_80g=(2, 5.4)), "observed")
    assert both["training"]["throughput"] == {"h100-80g": 5.4, "a100-80g": 5.4}
    apart = planned_spec(SPEC, observed(0, h100_80g=(2, 5.0), a100_80g=(2, 6.0)), "observed")
    assert apart["training"]["throughput"] == {"h100-80g": 5.0, "a100-80g": 6.0}
    # too short a measurement to plan with
    brief = observed(0, h100_80g=(2, 1.0))
    brief["throughput"]["h100-80g"]["seconds"] = 3.0
    assert planned_spec(SPEC, brief, "observed") is SPEC
    # done (or past it): a little work left, never zero (the solver wants it > 0)
    assert 0 < planned_spec(SPEC, observed(1000), "observed")["training"]["remaining_work"] < 1
    assert planned_spec(SPEC, {}, "observed") is SPEC


def test_planned_spec_of_an_elastic_job() -> None:
    spec = {
        "id": "el",
        "training": {
            "elastic": [
                {"gpus": 1, "throughput": {"h100-80g": 4.0, "a100-80g": 3.0}},
                {"gpus": 2, "throughput": {"h100-80g": 7.0, "a100-80g": 5.0}},
            ]
        },
    }
    out = planned_spec(spec, observed(0, h100_80g=(2, 3.5)), "observed")
    # the measured shape takes the measurement; the other shapes of that type its ratio (0.5)
    assert [s["throughput"] for s in out["training"]["elastic"]] == [
        {"h100-80g": 2.0, "a100-80g": 3.0},
        {"h100-80g": 3.5, "a100-80g": 5.0},
    ]
    scaled = planned_spec(spec, observed(0, h100_80g=(2, 3.5)), "scaled")
    assert [s["throughput"] for s in scaled["training"]["elastic"]] == [
        {"h100-80g": 2.0, "a100-80g": 1.5},
        {"h100-80g": 3.5, "a100-80g": 2.5},
    ]


@pytest.mark.parametrize("mode", ["observed", "scaled", "off"])
def test_planned_spec_leaves_services_alone(mode: str) -> None:
    spec = {"id": "chat", "inference": {"gpus_per_replica": {"h100-80g": 1}, "replica_rps": {"h100-80g": 5}}}
    assert planned_spec(spec, observed(3, h100_80g=(1, 1.0)), mode) is spec


TWO_TYPES = {
    "gpu_types": [{"name": "h100-80g", "memory_gib": 80}, {"name": "a100-80g", "memory_gib": 80}],
    "nodes": [
        {"id": "h1", "gpu_type": "h100-80g", "gpus": 2},
        {"id": "a1", "gpu_type": "a100-80g", "gpus": 2},
    ],
}


def where(status: Any) -> str:
    return str(status.placement.gpu_type)


@pytest.mark.parametrize("feedback", ["observed", "off"])
def test_a_measured_throughput_moves_a_job_to_the_type_that_is_better(tmp_path: Path, feedback: str) -> None:
    with running_server(tmp_path, loop=replace(FAST_LOOP, throughput_feedback=feedback)) as srv:
        stub = srv.stub()
        stub.UpsertNodes(_inventory(TWO_TYPES))
        job = convert.workloads_from_data({"workloads": [SPEC]}).workloads[0]
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=job))
        srv.settle()
        before = stub.GetWorkload(apb.GetWorkloadRequest(id="job"))
        assert where(before) == "h100-80g"  # declared 10 work units/s there, 8 on the A100s
        # the workers measured it on the H100s: 4 work units/s, half of what the A100s promise
        store = srv.server.store
        store.set_workload_state("job", RUNNING, "step 100", observation=Observation(
            100, "h100-80g", 2, work_per_s=4.0, samples_per_s=256.0, seconds=60.0))  # fmt: skip
        srv.server.loop.notify()
        srv.settle()
        after = stub.GetWorkload(apb.GetWorkloadRequest(id="job"))
        assert after.work_done == 100 and after.observed_throughput[0].work_per_s == 4.0
        if feedback == "off":
            assert where(after) == "h100-80g" and after.state == RUNNING
        else:
            assert where(after) == "a100-80g" and after.state == PLACED
            why = stub.Explain(apb.ExplainRequest(id="job"))  # explained with the numbers it was planned with
            assert why.placed and "8 work units/s" in why.summary + " ".join(why.details)
            # measured on the A100s too, and worse there: back, and it stays (both types measured now)
            store.set_workload_state("job", RUNNING, "step 200", observation=Observation(
                200, "a100-80g", 2, work_per_s=2.0, samples_per_s=128.0, seconds=60.0))  # fmt: skip
            srv.server.loop.notify()
            srv.settle()
            assert where(stub.GetWorkload(apb.GetWorkloadRequest(id="job"))) == "h100-80g"


def _inventory(data: dict[str, Any]) -> Any:
    return json_format.ParseDict(data, apb.UpsertNodesRequest())


def test_the_samples_rate_of_a_window_is_the_time_weighted_mean_of_its_reports() -> None:
    # The runtime's samples/s covers its last progress interval only: one stalled
    # interval at the end of a window must not stand for the whole window (CI saw
    # 172 samples/s reported against 94 steps/s x 8 samples per step).
    track = _Track(kind="training", gpu_type="h100-80g", gpus=2)
    track.restart_rate({})
    track.measure(100, 0.0, 10.0)  # the base
    track.measure(110, 800.0, 10.5)  # 0.5 s at 800/s: the window is still open
    track.measure(120, 160.0, 11.2)  # 0.7 s at 160/s (a stall): closes a 1.2 s window
    assert abs(track.rate_samples_per_s - (800.0 * 0.5 + 160.0 * 0.7) / 1.2) < 1e-9
    assert abs(track.work_per_s - 20 / 1.2) < 1e-9


def test_the_dispatcher_measures_steps_over_time_without_start_up() -> None:
    track = _Track(kind="training", gpu_type="h100-80g", gpus=2)
    track.restart_rate({})
    assert track.observation() is None  # nothing done yet
    track.measure(0, 0.0, 100.0)  # a fresh launch reports step 0: ignored
    track.measure(500, 64.0, 130.0)  # first progress (resumed at 480, 30 s of start-up): the base
    track.step = 500
    obs = track.observation()
    assert obs is not None and obs.work_done == 500 and obs.work_per_s is None
    track.measure(500.5, 64.0, 130.0 + RATE_WINDOW_S / 2)  # too short an interval: waits for more
    track.measure(520, 64.0, 134.0)  # 20 steps in 4 s
    assert track.work_per_s == 5.0 and track.measured_s == 4.0 and track.rate_samples_per_s == 64.0
    track.measure(540, 32.0, 144.0)  # 20 steps in 10 s: 2/s, averaged in with weight 1 - e^(-10/30)
    alpha = 1 - math.exp(-10 / SMOOTHING_S)
    assert abs(track.work_per_s - (5.0 + alpha * (2.0 - 5.0))) < 1e-9 and track.measured_s == 14.0
    # a relaunch starts over from the stored average of that type and gang size
    track.step = 540
    rate = {"gpus": 2, "work_per_s": 3.0, "samples_per_s": 50.0, "seconds": 14}
    stored = {"throughput": {"h100-80g": rate}}
    track.restart_rate(stored)
    assert (track.base, track.work_per_s, track.measured_s) == (None, 3.0, 14.0)
    track.gpus = 4
    track.restart_rate(stored)  # another gang size: not this measurement
    assert (track.work_per_s, track.measured_s) == (0.0, 0.0)
