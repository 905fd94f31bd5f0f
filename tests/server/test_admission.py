"""Admission: new work that fits in free capacity is placed at once, between
planning rounds, by the rules of the plan; and a plan solved before an
admission meets it without double-allocating a GPU (issue 15, item 8)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from server import convert
from server.admission import Admission
from server.control import LoopConfig
from server.store import PENDING, PLACED, WITHDRAWN, Assignment, Store
from server.usage import Usage, placement_use
from tests.server.serving import running_server

NODES = [
    {"id": f"n{i}", "gpu_type": "h100", "gpus": 8, "zone": f"z{i % 2}", "domain": f"r{i}"} for i in range(4)
]
TYPES = [{"name": "h100", "memory_gib": 80}]


def training(id: str, gpus: int, priority: int = 0, tenant: str = "", **extra: Any) -> dict[str, Any]:
    spec = {"gpus": gpus, "throughput": {"h100": float(gpus)}, **extra}
    return {"id": id, "tenant": tenant, "priority": priority, "training": spec}


def service(id: str, replicas: int, spread: str = "none") -> dict[str, Any]:
    inference = {
        "gpus_per_replica": {"h100": 1},
        "replica_rps": {"h100": 10.0},
        "target_rps": 10.0 * replicas,
        "min_replicas": replicas,
        "spread": spread,
    }
    return {"id": id, "tenant": "", "priority": 0, "inference": inference}


def submit(store: Store, spec: dict[str, Any]) -> None:
    kind = "training" if "training" in spec else "inference"
    store.submit_workload(spec["id"], spec["tenant"], kind, spec, request_key=None)


def placed_on(store: Store, id: str, *shards: tuple[str, int], gpu_type: str = "h100") -> None:
    """Record ``id`` as placed (as a plan would) on ``shards``."""
    row = store.get_workload(id)
    placement = {
        "workload_id": id,
        "gpu_type": gpu_type,
        "shards": [{"node_id": n, "gpus": g} for n, g in shards],
    }
    store.apply_plan(
        {"placements": []},
        status="FEASIBLE",
        gap=None,
        solve_s=0.0,
        based_on=store.revision(),
        assignments={id: Assignment(row.version, PLACED, dict(placement, version=row.version), [])},
    )


class Seen:
    """The latest plan as the admission sees it: which workloads it was solved with."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.info = SimpleNamespace(included={})

    def plan_everything(self) -> None:
        """As if a plan had just seen every workload there is."""
        self.info = SimpleNamespace(
            included={r.id: r.version for r in self.store.list_workloads(limit=10**6)}
        )

    def __call__(self) -> Any:
        return self.info


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "state.db") as s:
        s.upsert_inventory(gpu_types=TYPES, nodes=NODES, tenants=[{"name": "t", "max_gpus": 10}])
        yield s


def used_gpus(store: Store) -> Counter[str]:
    used: Counter[str] = Counter()
    for row in store.workloads_in((PLACED, "RUNNING")):
        for node, use in placement_use(row.spec, row.placement or {}).items():
            used[node] += int(use.gpus)
    return used


def test_a_fresh_workload_goes_into_free_capacity_and_nothing_running_moves(store: Store) -> None:
    seen = Seen(store)
    for i in range(3):
        submit(store, training(f"old{i}", 8))
        placed_on(store, f"old{i}", (f"n{i}", 8))
    submit(store, training("waits", 8, priority=5))  # a plan saw it and left it out: not admitted
    seen.plan_everything()
    submit(store, training("new", 4))
    admission = Admission(store, seen)
    rows = admission.step()
    assert [r.id for r in rows] == ["new"]
    new = store.get_workload("new")
    assert new.state == PLACED and new.placement is not None
    assert new.placement["shards"] == [{"node_id": "n3", "gpus": 4}] and new.placement["version"] == 1
    assert store.get_workload("waits").state == PENDING
    assert all(store.get_workload(f"old{i}").placement["shards"][0]["node_id"] == f"n{i}" for i in range(3))
    assert admission.step() == []  # nothing fresh is left


def test_what_does_not_fit_waits_for_the_plan_and_is_tried_again_when_capacity_frees(store: Store) -> None:
    seen = Seen(store)
    for i in range(4):
        submit(store, training(f"old{i}", 8))
        placed_on(store, f"old{i}", (f"n{i}", 8))
    seen.plan_everything()
    submit(store, training("new", 2))
    admission = Admission(store, seen)
    assert admission.step() == []
    assert store.get_workload("new").state == PENDING
    store.cancel_workload("old2")
    assert [r.id for r in admission.step()] == ["new"]
    assert store.get_workload("new").placement["shards"][0]["node_id"] == "n2"


def test_quotas_count_what_the_tenant_already_holds(store: Store) -> None:
    seen = Seen(store)
    submit(store, training("mine", 8, tenant="t"))
    placed_on(store, "mine", ("n0", 8))
    seen.plan_everything()
    submit(store, training("too-much", 4, tenant="t"))  # 8 + 4 > max_gpus 10
    submit(store, training("fits", 2, tenant="t"))
    assert [r.id for r in Admission(store, seen).step()] == ["fits"]
    assert store.get_workload("too-much").state == PENDING


def test_a_multi_node_gang_needs_whole_free_nodes(store: Store) -> None:
    seen = Seen(store)
    for i, gpus in enumerate([4, 4]):
        submit(store, training(f"half{i}", gpus))
        placed_on(store, f"half{i}", (f"n{i}", gpus))
    seen.plan_everything()
    # 12 GPUs free on n0 and n1 (4 + 4) and n2, n3 (8 + 8): only the whole nodes may hold the gang
    submit(store, training("gang", 16, locality="any"))
    rows = Admission(store, seen).step()
    assert [r.id for r in rows] == ["gang"]
    nodes = sorted(s["node_id"] for s in store.get_workload("gang").placement["shards"])
    assert nodes == ["n2", "n3"]


def test_a_spread_service_is_spread_over_the_whole_clusters_zones(store: Store) -> None:
    seen = Seen(store)
    # zone z0 (n0, n2) is full: a service spread over zones cannot be admitted into z1 alone
    for i in (0, 2):
        submit(store, training(f"full{i}", 8))
        placed_on(store, f"full{i}", (f"n{i}", 8))
    seen.plan_everything()
    submit(store, service("zonal", 2, spread="zone"))
    submit(store, service("anywhere", 2))
    rows = Admission(store, seen).step()
    assert [r.id for r in rows] == ["anywhere"]
    assert store.get_workload("zonal").state == PENDING


def test_an_admission_is_not_written_once_a_plan_came_after_what_it_saw(store: Store) -> None:
    seen = Seen(store)
    seen.plan_everything()
    submit(store, training("new", 4))
    row = store.get_workload("new")
    before = store.revision()
    submit(store, training("other", 8))
    placed_on(store, "other", ("n3", 8))  # a plan, after `before`
    placement = {"workload_id": "new", "gpu_type": "h100", "shards": [{"node_id": "n3", "gpus": 4}]}
    assert store.admit({"new": (row.version, placement)}, before) == []
    assert store.get_workload("new").state == PENDING


def plan_placing(store: Store, based_on: int, id: str, *shards: tuple[str, int]) -> None:
    """Apply a plan solved at ``based_on`` that places ``id`` on ``shards`` (and holds nothing else)."""
    row = store.get_workload(id)
    placement = {
        "workload_id": id,
        "gpu_type": "h100",
        "shards": [{"node_id": n, "gpus": g} for n, g in shards],
        "version": row.version,
    }
    usage = Usage()
    usage.add(row.tenant, "h100", placement_use(row.spec, placement))
    store.apply_plan(
        {"placements": [placement]},
        status="OPTIMAL",
        gap=0.0,
        solve_s=0.0,
        based_on=based_on,
        assignments={id: Assignment(row.version, PLACED, placement, [])},
        usage=usage,
    )


def admit(store: Store, id: str, *shards: tuple[str, int]) -> None:
    row = store.get_workload(id)
    placement = {
        "workload_id": id,
        "gpu_type": "h100",
        "shards": [{"node_id": n, "gpus": g} for n, g in shards],
    }
    assert store.admit({id: (row.version, placement)}, store.revision())


@pytest.mark.parametrize(
    ("planned_priority", "admitted_priority", "winner"),
    [(0, 5, "admitted"), (5, 0, "planned"), (3, 3, "admitted")],
)
def test_a_plan_and_an_admission_that_overflow_a_node_the_lower_priority_gives_way(
    store: Store, planned_priority: int, admitted_priority: int, winner: str
) -> None:
    submit(store, training("planned", 8, priority=planned_priority))
    based_on = store.revision()  # the plan's state: "admitted" does not exist yet
    submit(store, training("admitted", 8, priority=admitted_priority))
    admit(store, "admitted", ("n0", 8))
    plan_placing(store, based_on, "planned", ("n0", 8))
    planned, admitted = store.get_workload("planned"), store.get_workload("admitted")
    if winner == "admitted":
        assert (planned.state, admitted.state) == (PENDING, PLACED)
    else:
        assert (planned.state, admitted.state) == (PLACED, PENDING)
        assert admitted.reasons == [{"code": "CAPACITY", "message": WITHDRAWN}] and admitted.placement is None
    assert used_gpus(store)["n0"] == 8


def test_a_plan_that_places_an_admitted_workload_elsewhere_keeps_the_admission(store: Store) -> None:
    submit(store, training("w", 8))
    based_on = store.revision()  # the plan saw w pending
    admit(store, "w", ("n1", 8))
    plan_placing(store, based_on, "w", ("n0", 8))
    assert store.get_workload("w").placement["shards"] == [{"node_id": "n1", "gpus": 8}]
    assert used_gpus(store) == Counter({"n1": 8})
    # the next plan, solved after the admission, is applied as it is
    plan_placing(store, store.revision(), "w", ("n2", 8))
    assert store.get_workload("w").placement["shards"] == [{"node_id": "n2", "gpus": 8}]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=8),
    priorities=st.lists(st.integers(0, 2), min_size=8, max_size=8),
    split=st.integers(0, 8),
    data=st.data(),
)
def test_admissions_beside_a_plan_never_double_allocate(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    priorities: list[int],
    split: int,
    data: st.DataObject,
) -> None:
    """Some workloads a plan saw and placed (on nodes it chose: any that fit by its
    own count), the others submitted after its state and admitted; applied in any
    order, no node ever holds more than its GPUs."""
    with Store(tmp_path_factory.mktemp("h") / "state.db") as store:
        store.upsert_inventory(gpu_types=TYPES, nodes=NODES, tenants=[])
        seen = Seen(store)
        seen.plan_everything()
        planned = [training(f"p{i}", g, priority=priorities[i]) for i, g in enumerate(sizes[:split])]
        fresh = [training(f"a{i}", g, priority=priorities[-1 - i]) for i, g in enumerate(sizes[split:])]
        for spec in planned:
            submit(store, spec)
        based_on = store.revision()
        for spec in fresh:
            submit(store, spec)
        Admission(store, seen).step()
        # the plan: first fit by its own count (it knows nothing of the admissions)
        free = {n["id"]: 8 for n in NODES}
        assignments, usage, placements = {}, Usage(), []
        for spec in planned:
            g = spec["training"]["gpus"]
            fits = [n for n, f in free.items() if f >= g]
            if not fits:
                continue
            node = data.draw(st.sampled_from(fits))
            free[node] -= g
            placement = {
                "workload_id": spec["id"],
                "gpu_type": "h100",
                "shards": [{"node_id": node, "gpus": g}],
            }
            placement["version"] = 1
            usage.add("", "h100", placement_use(spec, placement))
            assignments[spec["id"]] = Assignment(1, PLACED, placement, [])
            placements.append(placement)
        store.apply_plan(
            {"placements": placements},
            status="FEASIBLE",
            gap=None,
            solve_s=0.0,
            based_on=based_on,
            assignments=assignments,
            usage=usage,
        )
        used = used_gpus(store)
        assert all(g <= 8 for g in used.values()), used


def test_a_submitted_workload_is_placed_before_the_next_round(tmp_path: Path) -> None:
    """A real server whose control loop waits a minute between rounds: the new
    workload is PLACED at once, by the admission, and dispatched like any other."""
    slow = LoopConfig(time_limit_s=2.0, debounce_s=60.0, max_delay_s=60.0)
    with running_server(tmp_path, loop=slow) as srv:
        deadline = time.monotonic() + 30
        while srv.server.loop.latest is None:  # the round on start; every later one waits a minute
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stub = srv.stub()
        stub.UpsertNodes(
            apb.UpsertNodesRequest(
                gpu_types=[pb.GpuType(name="h100", memory_gib=80)],
                nodes=[convert.node_from_dict(n) for n in NODES],
            )
        )
        w = convert.workload_from_dict(training("quick", 2))
        start = time.monotonic()
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=w))
        while stub.GetWorkload(apb.GetWorkloadRequest(id="quick")).state != "PLACED":
            assert time.monotonic() - start < 10, "not admitted"
            time.sleep(0.02)
        assert time.monotonic() - start < 10
        assert srv.server.admission.admitted == 1
        status = stub.GetWorkload(apb.GetWorkloadRequest(id="quick"))
        assert status.placement.shards[0].gpus == 2
        why = stub.Explain(apb.ExplainRequest(id="quick"))
        assert why.placed and "admitted at once" in why.summary


def test_with_admission_off_a_submitted_workload_waits_for_the_round(tmp_path: Path) -> None:
    from server.admission import AdmissionConfig

    slow = LoopConfig(time_limit_s=2.0, debounce_s=3.0, max_delay_s=3.0)
    with running_server(tmp_path, loop=slow, admission=AdmissionConfig(enabled=False)) as srv:
        stub = srv.stub()
        stub.UpsertNodes(
            apb.UpsertNodesRequest(
                gpu_types=[pb.GpuType(name="h100", memory_gib=80)],
                nodes=[convert.node_from_dict(n) for n in NODES],
            )
        )
        srv.settle()
        stub.SubmitWorkload(
            apb.SubmitWorkloadRequest(workload=convert.workload_from_dict(training("slow", 2)))
        )
        time.sleep(1.0)
        assert stub.GetWorkload(apb.GetWorkloadRequest(id="slow")).state == "PENDING"
        srv.settle()
        assert stub.GetWorkload(apb.GetWorkloadRequest(id="slow")).state == "PLACED"


def test_host_cpus_and_memory_count_where_the_node_tracks_them(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        nodes = [{"id": "c1", "gpu_type": "h100", "gpus": 8, "cpus": 16, "memory_gib": 64}]
        store.upsert_inventory(gpu_types=TYPES, nodes=nodes, tenants=[])
        seen = Seen(store)
        submit(store, training("hungry", 4, cpus_per_gpu=3.0))  # 12 of 16 CPUs
        placed_on(store, "hungry", ("c1", 4))
        seen.plan_everything()
        submit(store, training("too-many-cpus", 2, cpus_per_gpu=3.0))  # 6 > the 4 left
        submit(store, training("fits", 2, cpus_per_gpu=2.0, memory_gib_per_gpu=30.0))  # 4 CPUs, 60 GiB
        assert [r.id for r in Admission(store, seen).step()] == ["fits"]
        assert store.get_workload("too-many-cpus").state == PENDING
        # every CPU is taken now: the node reads as full (a 0 left would read as "not tracked")
        submit(store, training("no-cpus-asked", 1))
        assert Admission(store, seen).step() == []
