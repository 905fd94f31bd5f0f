"""Instance families for the planning benchmark, so the planner is measured on clusters
shaped unlike the one it was developed on (``bench.instances.problem``), not tuned to it.

A family is a function ``(n_workloads, n_nodes, seed) -> Problem``. Most are built by
one generator with knobs (:class:`Knobs`, :func:`generate`): GPU types, the node mix,
zones (and types present in only some of them), the share of services and of spread
services, priority tiers, tenants with quotas, how much is asked of the cluster,
gang sizes with rack locality, GPU memory needs and elastic jobs. The others reuse
the real-data builders of ``bench.instances``. Numbers the data does not give
(speed-ups, fractions) are stated rules of each family: a family is a shape, and
the seed draws the rest.

Named families (:data:`FAMILIES`):

``bench``
    ``bench.instances.problem``: PAI's machine mix, Philly's job sizes with Gavel's
    throughputs, TensorRT-LLM/Azure services (5%). The family the planner was
    developed on.
``gavel``
    Gavel's three types only (K80, P100, V100 in Gavel's 24:16:8 GPU mix, 4-GPU
    nodes), Philly's job sizes with Gavel's measured throughputs, no services.
``trtllm``
    Inference first: TensorRT-LLM's four types (A100, L40S, H100, H200, 8-GPU
    nodes) serving services with Azure's demand (``bench.instances``), 60% of the
    workloads, with zone spread.
``philly``
    One GPU type (V100, 8-GPU nodes in racks of 16) and Philly's job sizes drawn
    from the data, including its 16-64 GPU gangs, which must stay in one rack.
``slow_fleet``
    Shaped like the real-data cluster on which the planner was 27.8% below a plain
    MIP (issue 11): 57% of the nodes one-GPU 24 GiB ``a10`` cards, a middle tier, and
    80 GiB 8-GPU nodes in racks; services run on any type; a quarter of the jobs need
    80 GiB. A good plan serves the services on the slow cards.
``fragmented``
    Sizes that do not nest: 6- and 10-GPU nodes, jobs of 3, 5 and 6 GPUs (the
    aggregated model is a relaxation there; the packing shows in the gap).
``zonal``
    40% services, half of them spread over zones and a quarter over racks, and two
    of the four types present in only some zones.
``quota``
    Four priority tiers, six tenants whose quotas add up to less than what they
    ask, demand twice the capacity.
``sparse``
    Half the capacity asked for: everything can run; the question is where.
``random``
    Every knob drawn from the seed (the fuzz campaign: ``random`` with seeds 0..N).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from bench import instances
from solver.model import (
    GangShape,
    GpuType,
    InferenceSpec,
    Locality,
    Node,
    Problem,
    Spread,
    Tenant,
    TrainingSpec,
    Workload,
)

__all__ = ["FAMILIES", "SIZES", "Kind", "Knobs", "generate", "slow_fleet"]


@dataclass(frozen=True)
class Kind:
    """A GPU type of a generated family: memory, price, training speed relative to the
    family's slowest type, and requests/s one replica of a service sustains."""

    name: str
    memory_gib: float
    price: float
    speed: float
    replica_rps: float


@dataclass(frozen=True)
class Knobs:
    """What :func:`generate` draws a problem from.

    Attributes:
        kinds: the GPU types.
        nodes: (type, GPUs per node, share of the nodes).
        zones: failure zones; racks are dealt to them round-robin.
        rack_gpus: GPUs per rack (domain).
        zonal_types: types present only in the first ``zones - 1`` zones.
        services: share of the workloads that are services.
        spread: shares of services spread over zones and over racks.
        tiers: (priority, share of the training jobs).
        tenants: how many; 0 for none.
        quota: each tenant's quota as a share of the cluster's GPUs (0: none).
        demand: GPUs the jobs ask for over the cluster's GPUs (sets how many per job).
        sizes: (GPUs, weight) of the gang sizes.
        big_memory: share of jobs needing the largest memory tier.
        elastic: share of jobs with two sizes.
    """

    kinds: tuple[Kind, ...]
    nodes: tuple[tuple[str, int, float], ...]
    zones: int = 3
    rack_gpus: int = 128
    zonal_types: tuple[str, ...] = ()
    services: float = 0.05
    spread: tuple[float, float] = (0.5, 0.0)
    tiers: tuple[tuple[int, float], ...] = ((10, 0.2), (0, 0.8))
    tenants: int = 0
    quota: float = 0.0
    demand: float = 1.5
    sizes: tuple[tuple[int, float], ...] = ((1, 0.6), (2, 0.15), (4, 0.12), (8, 0.1), (16, 0.03))
    big_memory: float = 0.2
    elastic: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)


def _nodes(k: Knobs, n_nodes: int) -> tuple[Node, ...]:
    counts = [max(1, round(share * n_nodes)) for _, _, share in k.nodes]
    counts[0] += n_nodes - sum(counts)
    out: list[Node] = []
    for (gpu_type, gpus, _), count in zip(k.nodes, counts, strict=True):
        per_rack = max(1, k.rack_gpus // gpus)
        zones = k.zones - 1 if gpu_type in k.zonal_types and k.zones > 1 else k.zones
        for i in range(max(0, count)):
            rack = i // per_rack
            out.append(
                Node(
                    id=f"{gpu_type}-{i:05d}",
                    gpu_type=gpu_type,
                    gpus=gpus,
                    cpus=16.0 * gpus,
                    memory_gib=128.0 * gpus,
                    zone=f"z{rack % zones}",
                    domain=f"{gpu_type}-r{rack}",
                )
            )
    return tuple(out)


def _job(k: Knobs, i: int, rng: np.random.Generator, tenant: str) -> Workload:
    sizes = [s for s, _ in k.sizes]
    weights = np.array([w for _, w in k.sizes], dtype=float)
    size = int(rng.choice(sizes, p=weights / weights.sum()))
    top = max(kind.memory_gib for kind in k.kinds)
    big = rng.random() < k.big_memory
    memory = (
        float(rng.uniform(0.5, 0.95)) * top
        if big
        else float(rng.uniform(0.1, 0.6)) * min(kind.memory_gib for kind in k.kinds)
    )
    base = float(rng.uniform(0.5, 2.0))
    fit = [kind for kind in k.kinds if kind.memory_gib >= memory]

    def shape(gpus: int) -> GangShape:
        efficiency = 0.9 ** math.log2(max(1, gpus))  # a stated rule: 10% per doubling
        return GangShape(gpus, {kind.name: round(base * kind.speed * gpus * efficiency, 4) for kind in fit})

    shapes: tuple[GangShape, ...] = (shape(size),)
    if size > 1 and rng.random() < k.elastic:
        shapes = (shape(size // 2), shape(size))
    priorities = [p for p, _ in k.tiers]
    shares = np.array([s for _, s in k.tiers], dtype=float)
    return Workload(
        id=f"job-{i:05d}",
        tenant=tenant,
        priority=int(rng.choice(priorities, p=shares / shares.sum())),
        training=TrainingSpec(
            shapes=shapes,
            gpu_memory_gib=round(memory, 1),
            cpus_per_gpu=4.0,
            memory_gib_per_gpu=16.0,
            locality=Locality.DOMAIN if size >= 16 else Locality.NODE,
            remaining_work=float(rng.integers(1_000, 100_000)),
        ),
    )


def _service(k: Knobs, i: int, rng: np.random.Generator, tenant: str) -> Workload:
    small = min(k.kinds, key=lambda kind: kind.replica_rps)
    replicas = int(rng.integers(2, 10))
    target = round(replicas * small.replica_rps * float(rng.uniform(0.6, 1.0)), 1)
    roll = rng.random()
    spread = Spread.ZONE if roll < k.spread[0] else Spread.DOMAIN if roll < sum(k.spread) else Spread.NONE
    return Workload(
        id=f"svc-{i:05d}",
        tenant=tenant,
        priority=100,
        inference=InferenceSpec(
            gpus_per_replica={kind.name: 1 for kind in k.kinds},
            replica_rps={kind.name: kind.replica_rps for kind in k.kinds},
            target_rps=target,
            min_replicas=2 if spread is not Spread.NONE else 1,
            cpus_per_replica=4.0,
            memory_gib_per_replica=16.0,
            spread=spread,
        ),
    )


def generate(k: Knobs, n_workloads: int, n_nodes: int, seed: int = 0) -> Problem:
    """A problem of ``n_workloads`` workloads drawn from ``k`` on at most ``n_nodes``
    nodes: the workloads first; then as many nodes as make the jobs ask ``demand``
    times the cluster's GPUs (all ``n_nodes`` where they ask less than that)."""
    rng = np.random.default_rng([seed, 29])
    tenant_names = [f"team-{t}" for t in range(k.tenants)]
    n_services = round(k.services * n_workloads)
    workloads: list[Workload] = []
    for i in range(n_services):
        workloads.append(_service(k, i, rng, tenant_names[i % len(tenant_names)] if tenant_names else ""))
    for i in range(n_workloads - n_services):
        tenant = tenant_names[int(rng.integers(len(tenant_names)))] if tenant_names else ""
        workloads.append(_job(k, i, rng, tenant))
    per_node = sum(gpus * share for _, gpus, share in k.nodes) / sum(share for _, _, share in k.nodes)
    nodes = _nodes(k, max(len(k.nodes), node_count(workloads, per_node, k.demand, n_nodes)))
    capacity = sum(n.gpus for n in nodes)
    tenants = tuple(
        Tenant(name, max_gpus=max(1, round(k.quota * capacity)) if k.quota else None, weight=float(1 + t % 3))
        for t, name in enumerate(tenant_names)
    )
    types = tuple(GpuType(kind.name, kind.memory_gib, kind.price) for kind in k.kinds)
    return Problem(gpu_types=types, nodes=nodes, workloads=tuple(workloads), tenants=tenants)


# --------------------------------------------------------------------------- the families

SLOW_FLEET = Knobs(
    kinds=(
        Kind("a10", 24.0, 0.8, 1.0, 10.0),
        Kind("t4", 16.0, 0.35, 0.6, 6.0),
        Kind("series1", 32.0, 1.0, 1.4, 12.0),
        Kind("a100-80g", 80.0, 2.2, 3.0, 25.0),
        Kind("h100-80g", 80.0, 3.5, 4.5, 40.0),
        Kind("h200-141g", 141.0, 4.5, 5.0, 45.0),
    ),
    nodes=(
        ("a10", 1, 0.568),
        ("t4", 2, 0.05),
        ("series1", 4, 0.142),
        ("a100-80g", 8, 0.10),
        ("h100-80g", 8, 0.09),
        ("h200-141g", 8, 0.05),
    ),
    spread=(1.0, 0.0),
    demand=1.0,  # the jobs ask about 1.2x the GPUs of 1,000 nodes: all n_nodes are used
    sizes=((1, 0.62), (2, 0.12), (4, 0.1), (8, 0.09), (16, 0.04), (32, 0.02), (64, 0.01)),
    big_memory=0.25,
)
FRAGMENTED = Knobs(
    kinds=(Kind("g6", 48.0, 1.5, 1.0, 12.0), Kind("g10", 48.0, 2.0, 1.3, 15.0)),
    nodes=(("g6", 6, 0.5), ("g10", 10, 0.5)),
    sizes=((3, 0.4), (5, 0.3), (6, 0.2), (1, 0.1)),
    big_memory=0.0,
    services=0.05,
    spread=(0.0, 0.0),
)
ZONAL = Knobs(
    kinds=(
        Kind("l4", 24.0, 0.7, 1.0, 8.0),
        Kind("a100", 80.0, 2.0, 2.6, 22.0),
        Kind("h100", 80.0, 3.5, 4.0, 36.0),
        Kind("h200", 141.0, 4.5, 4.6, 42.0),
    ),
    nodes=(("l4", 4, 0.4), ("a100", 8, 0.3), ("h100", 8, 0.2), ("h200", 8, 0.1)),
    zonal_types=("h100", "h200"),
    services=0.4,
    spread=(0.5, 0.25),
    demand=1.2,
)
QUOTA = Knobs(
    kinds=(Kind("v100", 32.0, 1.2, 1.0, 10.0), Kind("a100", 80.0, 2.0, 2.2, 20.0)),
    nodes=(("v100", 8, 0.6), ("a100", 8, 0.4)),
    tiers=((30, 0.1), (20, 0.2), (10, 0.3), (0, 0.4)),
    tenants=6,
    quota=0.12,
    demand=2.0,
    services=0.05,
    elastic=0.2,
)
SPARSE = replace(QUOTA, tenants=0, quota=0.0, demand=0.5, tiers=((10, 0.3), (0, 0.7)), elastic=0.3)


DEMAND = 1.5  # what the data-driven families ask of their cluster (see node_count)


def asked_gpus(workloads: list[Workload] | tuple[Workload, ...]) -> int:
    """GPUs the workloads ask for: each job its largest shape, each service the fewest GPUs
    that serve its target on one type."""
    total = 0
    for w in workloads:
        if w.training is not None:
            total += w.training.shapes[-1].gpus
        elif w.inference is not None:
            spec = w.inference
            total += min(
                math.ceil(spec.target_rps / spec.replica_rps[t]) * g
                for t, g in spec.gpus_per_replica.items()
                if t in spec.replica_rps
            )
    return total


def node_count(
    workloads: list[Workload] | tuple[Workload, ...], per_node: float, demand: float, most: int
) -> int:
    """Nodes of ``per_node`` GPUs for ``workloads`` to ask ``demand`` times the cluster's
    GPUs (:func:`asked_gpus`), at most ``most``."""
    asked = asked_gpus(workloads)
    return min(most, math.ceil(asked / (demand * per_node))) if asked else most


def _racked(gpu_type: str, i: int, gpus: int, *, per_rack: int, zones: int) -> Node:
    """Node ``i`` of a type: racks of ``per_rack`` nodes dealt to ``zones`` zones in turn."""
    rack = i // per_rack
    return Node(f"{gpu_type}-{i:05d}", gpu_type, gpus, cpus=12.0 * gpus, memory_gib=128.0 * gpus,
                zone=f"z{rack % zones}", domain=f"{gpu_type}-r{rack}")  # fmt: skip


def slow_fleet(n_workloads: int, n_nodes: int, seed: int = 0) -> Problem:
    """The ``slow_fleet`` family (module docstring)."""
    return generate(SLOW_FLEET, n_workloads, n_nodes, seed)


def _knobbed(knobs: Knobs) -> Callable[[int, int, int], Problem]:
    return lambda n_workloads, n_nodes, seed: generate(knobs, n_workloads, n_nodes, seed)


def random_knobs(seed: int) -> Knobs:
    """Every knob drawn from ``seed``: 2-16 GPU types, node sizes 1-16 mixed per type,
    memory tiers 16-141 GiB, 0-40% services, 1-4 tiers, tenants with quotas or none,
    demand 0.5-2x, gangs up to 256 GPUs, elastic jobs."""
    rng = np.random.default_rng([seed, 31])
    n_types = int(rng.integers(2, 17))
    memories = [16.0, 24.0, 32.0, 40.0, 48.0, 80.0, 96.0, 141.0]
    kinds = tuple(
        Kind(
            f"t{j}",
            float(rng.choice(memories)),
            round(float(rng.uniform(0.3, 5.0)), 2),
            round(float(rng.uniform(1.0, 5.0)), 2),
            round(float(rng.uniform(5.0, 50.0)), 1),
        )
        for j in range(n_types)
    )
    shares = rng.dirichlet(np.ones(n_types))
    nodes = tuple(
        (kind.name, int(rng.choice([1, 2, 4, 8, 16])), float(share))
        for kind, share in zip(kinds, shares, strict=True)
    )
    n_tiers = int(rng.integers(1, 5))
    tiers = tuple((10 * (n_tiers - t - 1), 1.0 / n_tiers) for t in range(n_tiers))
    top = int(rng.choice([8, 16, 64, 256]))
    sizes = tuple((s, 1.0 / (1 + math.log2(s))) for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if s <= top)
    tenants = int(rng.integers(0, 5))
    return Knobs(
        kinds=kinds,
        nodes=nodes,
        zones=int(rng.integers(1, 4)),
        zonal_types=tuple(k.name for k in kinds if rng.random() < 0.2),
        services=float(rng.uniform(0.0, 0.4)),
        spread=(float(rng.uniform(0, 0.6)), float(rng.uniform(0, 0.3))),
        tiers=tiers,
        tenants=tenants,
        quota=float(rng.uniform(0.1, 0.5)) if tenants else 0.0,
        demand=float(rng.uniform(0.5, 2.0)),
        sizes=sizes,
        big_memory=float(rng.uniform(0.0, 0.4)),
        elastic=float(rng.uniform(0.0, 0.3)),
    )


def random_family(n_workloads: int, n_nodes: int, seed: int = 0) -> Problem:
    """The ``random`` family: :func:`random_knobs` of the seed, drawn with the seed."""
    return generate(random_knobs(seed), n_workloads, n_nodes, seed)


def gavel_family(n_workloads: int, n_nodes: int, seed: int = 0) -> Problem:
    """The ``gavel`` family (module docstring): Gavel's 24:16:8 K80:P100:V100 GPU mix in
    4-GPU nodes, 4 zones of racks of 8 nodes, jobs from ``bench.instances``."""
    mix = (("k80", 0.5), ("p100", 1 / 3), ("v100", 1 / 6))
    jobs = instances.training_jobs(n_workloads, seed, ("k80", "p100", "v100"), tenants=("",))
    jobs = tuple(replace(j, tenant="") for j in jobs)
    n_nodes = max(len(mix), node_count(jobs, 4.0, DEMAND, n_nodes))
    counts = [round(share * n_nodes) for _, share in mix]
    counts[0] += n_nodes - sum(counts)
    nodes = tuple(
        Node(
            f"{t}-{i:05d}",
            t,
            4,
            cpus=24.0,
            memory_gib=448.0,
            zone=f"z{(i // 8) % 4}",
            domain=f"{t}-r{i // 8}",
        )
        for (t, _), count in zip(mix, counts, strict=True)
        for i in range(count)
    )
    return Problem(gpu_types=instances.gpu_types(("k80", "p100", "v100")), nodes=nodes, workloads=jobs)


def trtllm_family(n_workloads: int, n_nodes: int, seed: int = 0) -> Problem:
    """The ``trtllm`` family (module docstring): TensorRT-LLM's four types in 8-GPU nodes,
    60% services (Azure demand, zone spread where possible), 40% jobs on the same types
    with speed-ups by the TensorRT-LLM per-GPU capacity (a stated rule)."""
    types = ("a100", "l40s", "h100", "h200")
    n_services = round(0.6 * n_workloads)
    services = instances.inference_services(n_services, seed, types, tenants=("",))
    services = tuple(replace(s, tenant="", priority=10) for s in services)
    rng = np.random.default_rng([seed, 37])
    speed = {"a100": 1.0, "l40s": 0.8, "h100": 2.2, "h200": 2.6}
    jobs = []
    for i in range(n_workloads - n_services):
        size = int(rng.choice([1, 2, 4, 8, 16], p=[0.5, 0.2, 0.15, 0.1, 0.05]))
        base = float(rng.uniform(0.5, 2.0))
        shape = GangShape(size, {t: round(base * speed[t] * size, 4) for t in types})
        jobs.append(
            Workload(
                f"job-{i:05d}",
                training=TrainingSpec(
                    (shape,),
                    gpu_memory_gib=float(rng.uniform(10, 40)),
                    locality=Locality.DOMAIN if size >= 16 else Locality.NODE,
                ),
            )
        )
    workloads = services + tuple(jobs)
    n_nodes = max(len(types), node_count(workloads, 8.0, DEMAND, n_nodes))
    nodes = tuple(
        _racked(t, i, 8, per_rack=16, zones=3)
        for j, t in enumerate(types)
        for i in range(n_nodes // 4 + (1 if j < n_nodes % 4 else 0))
    )
    return Problem(gpu_types=instances.gpu_types(types), nodes=nodes, workloads=workloads)


def philly_family(n_workloads: int, n_nodes: int, seed: int = 0) -> Problem:
    """The ``philly`` family (module docstring): Philly's GPU counts from the data."""
    gpus, _, _ = instances.philly_jobs()
    rng = np.random.default_rng([seed, 41])
    drawn = rng.choice(gpus[(gpus >= 1) & (gpus <= 64)], size=n_workloads)
    jobs = tuple(
        Workload(
            f"job-{i:05d}",
            priority=10 if rng.random() < 0.2 else 0,
            training=TrainingSpec(
                (GangShape(int(g), {"v100": round(float(g) * float(rng.uniform(0.5, 2.0)), 4)}),),
                locality=Locality.DOMAIN if g > 8 else Locality.NODE,
            ),
        )
        for i, g in enumerate(drawn)
    )
    nodes = tuple(
        _racked("v100", i, 8, per_rack=16, zones=2) for i in range(node_count(jobs, 8.0, DEMAND, n_nodes))
    )
    return Problem(gpu_types=instances.gpu_types(("v100",)), nodes=nodes, workloads=jobs)


FAMILIES: dict[str, Callable[[int, int, int], Problem]] = {
    "bench": lambda n_workloads, n_nodes, seed: instances.problem(n_workloads, n_nodes, seed=seed),
    "gavel": gavel_family,
    "trtllm": trtllm_family,
    "philly": philly_family,
    "slow_fleet": slow_fleet,
    "fragmented": _knobbed(FRAGMENTED),
    "zonal": _knobbed(ZONAL),
    "quota": _knobbed(QUOTA),
    "sparse": _knobbed(SPARSE),
    "random": random_family,
}
"""Every named family: ``(n_workloads, n_nodes, seed) -> Problem``."""

SIZES: dict[str, tuple[int, int]] = {"small": (100, 100), "1k": (1000, 1000), "10k": (10000, 4000)}
"""(workloads, nodes) of each benchmark size."""
