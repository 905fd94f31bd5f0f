"""The control loop through a real server: re-plans that do not reshuffle what
runs, rolling updates that keep a service's minimum, plans always feasible."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from tests.server.serving import Running, running_server

INVENTORY = apb.UpsertNodesRequest(
    gpu_types=[pb.GpuType(name="h100-80g", memory_gib=80)],
    nodes=[
        pb.Node(id=f"n{i}", gpu_type="h100-80g", gpus=8, zone=f"z{i % 2}", domain=f"r{i}") for i in range(4)
    ],
)


def training(id: str, gpus: int) -> pb.Workload:
    w = pb.Workload(id=id)
    w.training.gpus = gpus
    w.training.throughput["h100-80g"] = float(gpus)
    return w


def service(id: str, gpus_per_replica: int, target_rps: float, min_replicas: int) -> pb.Workload:
    w = pb.Workload(id=id)
    w.inference.gpus_per_replica["h100-80g"] = gpus_per_replica
    w.inference.replica_rps["h100-80g"] = 10.0
    w.inference.target_rps = target_rps
    w.inference.min_replicas = min_replicas
    return w


def placements(srv: Running) -> dict[str, list[tuple[str, int]]]:
    plan = srv.stub().GetPlan(apb.GetPlanRequest()).plan
    return {p.workload_id: sorted((s.node_id, s.gpus) for s in p.shards) for p in plan.placements}


def assert_feasible(srv: Running) -> None:
    used: Counter[str] = Counter()
    for shards in placements(srv).values():
        for node, gpus in shards:
            used[node] += gpus
    assert all(n <= 8 for n in used.values()), used


def test_a_new_workload_does_not_reshuffle_running_ones(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        stub = srv.stub()
        stub.UpsertNodes(INVENTORY)
        for i, gpus in enumerate([4, 2, 2, 1, 3, 4]):
            stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=training(f"j{i}", gpus)))
        srv.settle()
        before = placements(srv)
        assert len(before) == 6
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=training("late", 2)))
        srv.settle()
        after = placements(srv)
        assert "late" in after
        assert {k: after[k] for k in before} == before
        assert_feasible(srv)
        states = {w.workload.id: w.state for w in stub.ListWorkloads(apb.ListWorkloadsRequest()).workloads}
        assert set(states.values()) == {"PLACED"}


def test_cancel_frees_gpus_for_a_pending_workload(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        stub = srv.stub()
        stub.UpsertNodes(INVENTORY)
        for i in range(4):
            stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=training(f"full{i}", 8)))
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=training("waiting", 8)))
        srv.settle()
        waiting = stub.GetWorkload(apb.GetWorkloadRequest(id="waiting"))
        assert waiting.state == "PENDING" and waiting.reasons
        victim = next(w for w, shards in placements(srv).items() if w != "waiting")
        stub.CancelWorkload(apb.CancelWorkloadRequest(id=victim))
        srv.settle()
        assert stub.GetWorkload(apb.GetWorkloadRequest(id="waiting")).state == "PLACED"
        assert victim not in placements(srv)
        assert_feasible(srv)


def test_rolling_update_keeps_the_old_version_until_the_new_one_has_its_minimum(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        stub = srv.stub()
        stub.UpsertNodes(INVENTORY)
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=service("chat", 2, 40.0, 2)))
        for i in range(3):  # a higher tier: the service may not take their GPUs
            big = training(f"big{i}", 8)
            big.priority = 10
            stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=big))
        srv.settle()
        v1 = stub.GetWorkload(apb.GetWorkloadRequest(id="chat"))
        assert v1.state == "PLACED" and len(v1.placement.shards) >= 2
        old_shards = sorted((s.node_id, s.gpus) for s in v1.placement.shards)

        # version 2 needs 8 GPUs a replica and 2 replicas: only one node is left to it
        stub.UpdateWorkload(apb.UpdateWorkloadRequest(workload=service("chat", 8, 40.0, 2)))
        srv.settle()
        waiting = stub.GetWorkload(apb.GetWorkloadRequest(id="chat"))
        assert waiting.version == 2 and waiting.HasField("serving_version") and waiting.serving_version == 1
        assert sorted((s.node_id, s.gpus) for s in waiting.placement.shards) == old_shards
        assert [r.code for r in waiting.reasons] == ["ROLLOUT"]
        assert_feasible(srv)

        # capacity comes free: version 2 takes over
        stub.CancelWorkload(apb.CancelWorkloadRequest(id="big0"))
        srv.settle()
        rolled = stub.GetWorkload(apb.GetWorkloadRequest(id="chat"))
        assert rolled.state == "PLACED" and not rolled.HasField("serving_version")
        assert len(rolled.placement.shards) >= 2 and all(s.gpus == 8 for s in rolled.placement.shards)
        assert_feasible(srv)


def test_a_workload_the_inventory_no_longer_admits_waits_with_the_reason(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        stub = srv.stub()
        stub.UpsertNodes(INVENTORY)  # no tenants: tenant names are labels, no quotas
        labelled = training("labelled", 2)
        labelled.tenant = "research"
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=labelled))
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=training("other", 2)))
        srv.settle()
        assert set(placements(srv)) == {"labelled", "other"}
        # quotas arrive, and they do not name "research"
        stub.UpsertNodes(apb.UpsertNodesRequest(tenants=[pb.Tenant(name="product", max_gpus=8)]))
        srv.settle()
        status = stub.GetWorkload(apb.GetWorkloadRequest(id="labelled"))
        assert status.state == "PENDING" and [r.code for r in status.reasons] == ["INVALID"]
        assert 'unknown tenant "research"' in status.reasons[0].message
        assert set(placements(srv)) == {"other"}  # the rest is still planned
        why = stub.Explain(apb.ExplainRequest(id="labelled"))
        assert not why.placed and "does not validate" in why.summary and why.details


class InProcessPool:
    """The solver pool's seam, in this process, so a fault can be injected into the solver
    (a real solver process cannot be monkeypatched from here)."""

    def call(self, fn: Any, *args: Any, deadline_s: float | None = None, **_: Any) -> Any:
        return fn(*args)


def test_a_workload_that_makes_planning_fail_is_found_and_failed_and_planning_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hardening: one workload (target_rps 1e300, before validation bounded it) failed
    every round, and nothing was planned until it was cancelled. Whatever the cause, the
    loop now finds the workload by bisection, marks it FAILED with the reason, and plans
    the rest."""
    import solver as solver_module
    from server import convert
    from server.control import ControlLoop, LoopConfig
    from server.store import Store

    real_plan = solver_module.plan

    def fragile(problem: Any, *args: Any, **kwargs: Any) -> Any:
        if any(w.id == "poison" for w in problem.workloads):
            raise RuntimeError("Unable to cast Python instance of type <class 'int'> to C++ type")
        return real_plan(problem, *args, **kwargs)

    monkeypatch.setattr(solver_module, "plan", fragile)
    with Store(tmp_path / "s.db") as store:
        store.upsert_inventory(
            gpu_types=[convert.message_to_dict(t) for t in INVENTORY.gpu_types],
            nodes=[convert.message_to_dict(n) for n in INVENTORY.nodes],
        )
        for wid in ("a", "b", "poison", "c", "d", "e"):
            w = training(wid, 1)
            store.submit_workload(wid, "", "training", convert.message_to_dict(w), request_key=None)
        loop = ControlLoop(store, InProcessPool(), LoopConfig(time_limit_s=1.0, debounce_s=0.01))  # type: ignore[arg-type]
        loop.start()
        try:
            deadline = time.monotonic() + 60
            while not (
                store.get_workload("poison").state == "FAILED"
                and all(store.get_workload(w).state == "PLACED" for w in "abcde")
            ):
                assert time.monotonic() < deadline, {w: store.get_workload(w).state for w in ("a", "poison")}
                time.sleep(0.05)
        finally:
            loop.stop()
        message = store.get_workload("poison").message
        assert "planning failed with this workload" in message and "Unable to cast" in message
