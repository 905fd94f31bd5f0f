"""Small, readable builders for solver test instances.

Everything defaults to the most common case, so a test only spells out what it
is about::

    p = problem(
        nodes=[node("n1", gpus=8), node("n2", "h100", gpus=4, zone="z2")],
        workloads=[
            train("j1", gpus=4, throughput={"a100": 1.0, "h100": 2.0}),
            serve("s1", rps=10, target_rps=30, min_replicas=2),
        ],
    )
    result = plan_of(place("j1", ("n1", 4)), place("s1", ("n2", 1), ("n2", 1)))

GPU types: unless ``gpu_types`` is given, :func:`problem` uses :data:`TYPES`
(``a100`` 80 GiB $2/h, ``h100`` 80 GiB $4/h, ``l4`` 24 GiB $0.8/h). The default
type of nodes and workloads is ``a100``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from solver.model import (
    GangShape,
    GpuType,
    InferenceSpec,
    Locality,
    Node,
    NodeState,
    Placement,
    Plan,
    PlanStatus,
    Problem,
    Reason,
    ReasonCode,
    Shard,
    Spread,
    Tenant,
    TrainingSpec,
    Unplaced,
    Workload,
)

__all__ = [
    "TYPES",
    "gpu_type",
    "node",
    "nodes",
    "place",
    "plan_of",
    "problem",
    "serve",
    "tenant",
    "train",
]


def gpu_type(name: str = "a100", memory_gib: float = 80.0, cost_per_hour: float | None = None) -> GpuType:
    return GpuType(name, memory_gib, cost_per_hour)


#: The default GPU catalogue of :func:`problem`.
TYPES: tuple[GpuType, ...] = (
    gpu_type("a100", 80.0, 2.0),
    gpu_type("h100", 80.0, 4.0),
    gpu_type("l4", 24.0, 0.8),
)


def node(
    id: str,
    type: str = "a100",
    gpus: int = 8,
    *,
    cpus: float = 0.0,
    memory_gib: float = 0.0,
    zone: str = "",
    domain: str = "",
    labels: Mapping[str, str] | None = None,
    state: NodeState | str = NodeState.READY,
) -> Node:
    """A node; ``state`` may be given as ``"draining"`` / ``"down"``."""
    return Node(
        id=id,
        gpu_type=type,
        gpus=gpus,
        cpus=cpus,
        memory_gib=memory_gib,
        zone=zone,
        domain=domain,
        labels=dict(labels or {}),
        state=NodeState(state) if isinstance(state, str) else state,
    )


def nodes(prefix: str, count: int, type: str = "a100", gpus: int = 8, **kw: Any) -> list[Node]:
    """``count`` identical nodes ``prefix1 .. prefixN`` (keyword arguments as for :func:`node`)."""
    return [node(f"{prefix}{i}", type, gpus, **kw) for i in range(1, count + 1)]


def tenant(
    name: str,
    max_gpus: int | None = None,
    *,
    per_type: Mapping[str, int] | None = None,
    weight: float = 1.0,
) -> Tenant:
    return Tenant(name, max_gpus, dict(per_type or {}), weight)


def _per_type(value: float | Mapping[str, float], types: Sequence[str]) -> dict[str, float]:
    return dict(value) if isinstance(value, Mapping) else {t: float(value) for t in types}


def train(
    id: str,
    gpus: int = 1,
    throughput: float | Mapping[str, float] = 1.0,
    *,
    types: Sequence[str] = ("a100",),
    shapes: Mapping[int, float | Mapping[str, float]] | None = None,
    tenant: str = "",
    priority: int = 0,
    weight: float = 1.0,
    allowed: Sequence[str] = (),
    selector: Mapping[str, str] | None = None,
    submit_time_s: float = 0.0,
    gpu_memory_gib: float = 0.0,
    cpus_per_gpu: float = 0.0,
    memory_gib_per_gpu: float = 0.0,
    locality: Locality | str = Locality.ANY,
    remaining_work: float | None = None,
    deadline_s: float | None = None,
    preemptible: bool = True,
) -> Workload:
    """A training job.

    A fixed gang: ``train("j", gpus=4, throughput={"a100": 1, "h100": 2})``; a
    scalar ``throughput`` applies to every type in ``types``. An elastic job:
    ``train("j", shapes={2: 1.0, 4: {"a100": 1.8}})`` (GPU count -> throughput),
    which overrides ``gpus``/``throughput``.
    """
    shape_list: tuple[GangShape, ...]
    if shapes is None:
        shape_list = (GangShape(gpus, _per_type(throughput, types)),)
    else:
        shape_list = tuple(GangShape(g, _per_type(t, types)) for g, t in shapes.items())
    spec = TrainingSpec(
        shapes=shape_list,
        gpu_memory_gib=gpu_memory_gib,
        cpus_per_gpu=cpus_per_gpu,
        memory_gib_per_gpu=memory_gib_per_gpu,
        locality=Locality(locality) if isinstance(locality, str) else locality,
        remaining_work=remaining_work,
        deadline_s=deadline_s,
        preemptible=preemptible,
    )
    return Workload(
        id=id,
        tenant=tenant,
        priority=priority,
        weight=weight,
        allowed_gpu_types=tuple(allowed),
        node_selector=dict(selector or {}),
        submit_time_s=submit_time_s,
        training=spec,
    )


def serve(
    id: str,
    gpus: int | Mapping[str, int] = 1,
    rps: float | Mapping[str, float] = 10.0,
    target_rps: float = 10.0,
    *,
    types: Sequence[str] = ("a100",),
    min_replicas: int = 1,
    max_replicas: int | None = None,
    spread: Spread | str = Spread.NONE,
    tenant: str = "",
    priority: int = 0,
    weight: float = 1.0,
    allowed: Sequence[str] = (),
    selector: Mapping[str, str] | None = None,
    submit_time_s: float = 0.0,
    cpus_per_replica: float = 0.0,
    memory_gib_per_replica: float = 0.0,
) -> Workload:
    """An inference service; ``gpus`` (per replica) and ``rps`` (per replica) may be
    scalars, applied to every type in ``types``, or per-type mappings."""
    gpr = dict(gpus) if isinstance(gpus, Mapping) else dict.fromkeys(types, gpus)
    spec = InferenceSpec(
        gpus_per_replica=gpr,
        replica_rps=_per_type(rps, types),
        target_rps=target_rps,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        cpus_per_replica=cpus_per_replica,
        memory_gib_per_replica=memory_gib_per_replica,
        spread=Spread(spread) if isinstance(spread, str) else spread,
    )
    return Workload(
        id=id,
        tenant=tenant,
        priority=priority,
        weight=weight,
        allowed_gpu_types=tuple(allowed),
        node_selector=dict(selector or {}),
        submit_time_s=submit_time_s,
        inference=spec,
    )


def place(workload_id: str, *shards: tuple[str, int], type: str = "") -> Placement:
    """``place("j", ("n1", 4), ("n2", 4))``: shards as (node id, GPUs)."""
    return Placement(workload_id, tuple(Shard(n, g) for n, g in shards), type)


def problem(
    nodes: Iterable[Node] = (),
    workloads: Iterable[Workload] = (),
    *,
    gpu_types: Iterable[GpuType] | None = None,
    tenants: Iterable[Tenant] = (),
    current: Iterable[Placement] = (),
) -> Problem:
    return Problem(
        gpu_types=TYPES if gpu_types is None else tuple(gpu_types),
        nodes=tuple(nodes),
        workloads=tuple(workloads),
        tenants=tuple(tenants),
        current=tuple(current),
    )


def plan_of(
    *placements: Placement,
    unplaced: Iterable[str] = (),
    policy: str = "throughput",
    objective: float = 0.0,
    status: PlanStatus = PlanStatus.HEURISTIC,
) -> Plan:
    """A plan with the given placements; ``unplaced`` lists the ids left out."""
    return Plan(
        status=status,
        policy=policy,
        objective=objective,
        best_bound=None,
        gap=None,
        placements=tuple(placements),
        unplaced=tuple(Unplaced(w, (Reason(ReasonCode.CAPACITY, "test"),)) for w in unplaced),
    )
