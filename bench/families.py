"""Instance families the planner was not tuned on, built without the shared data.

Each family is a generator with a seed and a size. They exist so that a change to the
planner is measured on clusters shaped differently from ``bench.instances`` (which
draws PAI's machine mix and Gavel's jobs), not tuned to one generator.

``slow_fleet``
    Shaped like the real-data cluster on which the planner's plan was 27.8% below
    what a plain MIP proves (issue 11): most nodes are one-GPU 24 GiB cards of a
    slow type (``a10``, 57% of the nodes), a middle tier of 4-GPU 32 GiB nodes
    (``series1``), and 8-GPU 80 GiB nodes of three fast types in a few racks
    (``a100-80g``, ``h100-80g``, ``h200-141g``), plus a few 2-GPU 16 GiB ``t4``
    nodes. Services (5% of the workloads, priority 100, spread over zones) can run
    on every type, one GPU a replica, faster on the fast types; training jobs
    (20% priority 10, the rest priority 0) are mostly one-GPU, some 2-8 GPUs, a
    few 16-64 GPU gangs inside one rack; a quarter of them need 80 GiB cards.
    A good plan serves the services on the slow cards and keeps the fast ones
    for the jobs only they can run.

Numbers (speed-ups, sizes, fractions) are stated rules, not data: the family is
a shape, and the seed draws the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from solver.model import (
    GangShape,
    GpuType,
    InferenceSpec,
    Locality,
    Node,
    Problem,
    Spread,
    TrainingSpec,
    Workload,
)

__all__ = ["FAMILIES", "slow_fleet"]

# type: (memory GiB, $/GPU-hour, training speed-up over a10, service requests/s per replica)
SLOW_FLEET_TYPES: dict[str, tuple[float, float, float, float]] = {
    "a10": (24.0, 0.8, 1.0, 10.0),
    "t4": (16.0, 0.35, 0.6, 6.0),
    "series1": (32.0, 1.0, 1.4, 12.0),
    "a100-80g": (80.0, 2.2, 3.0, 25.0),
    "h100-80g": (80.0, 3.5, 4.5, 40.0),
    "h200-141g": (141.0, 4.5, 5.0, 45.0),
}
# node mix as fractions of the nodes: (type, GPUs per node, fraction)
SLOW_FLEET_NODES: tuple[tuple[str, int, float], ...] = (
    ("a10", 1, 0.568),
    ("t4", 2, 0.05),
    ("series1", 4, 0.142),
    ("a100-80g", 8, 0.10),
    ("h100-80g", 8, 0.09),
    ("h200-141g", 8, 0.05),
)
ZONES = 3
RACK_NODES = 16  # 8-GPU nodes per rack (domain); smaller nodes: 32 per rack


def _slow_fleet_nodes(n_nodes: int) -> tuple[Node, ...]:
    counts = [max(1, round(f * n_nodes)) for _, _, f in SLOW_FLEET_NODES]
    counts[0] += n_nodes - sum(counts)  # the a10 tier takes the rounding
    nodes: list[Node] = []
    for (gpu_type, gpus, _), count in zip(SLOW_FLEET_NODES, counts, strict=True):
        per_rack = RACK_NODES if gpus == 8 else 2 * RACK_NODES
        for i in range(count):
            rack = i // per_rack
            nodes.append(
                Node(
                    id=f"{gpu_type}-{i:05d}",
                    gpu_type=gpu_type,
                    gpus=gpus,
                    cpus=16.0 * gpus,
                    memory_gib=128.0 * gpus,
                    zone=f"z{rack % ZONES}",
                    domain=f"{gpu_type}-r{rack}",
                )
            )
    return tuple(nodes)


def _job(i: int, rng: np.random.Generator) -> Workload:
    size = int(rng.choice([1, 2, 4, 8, 16, 32, 64], p=[0.62, 0.12, 0.1, 0.09, 0.04, 0.02, 0.01]))
    big_memory = rng.random() < 0.25
    memory = float(rng.uniform(40.0, 78.0)) if big_memory else float(rng.uniform(4.0, 22.0))
    base = float(rng.uniform(0.5, 2.0))
    throughput = {
        t: round(base * speed * size * (0.9 if size >= 16 else 1.0), 4)
        for t, (mem, _, speed, _) in SLOW_FLEET_TYPES.items()
        if mem >= memory
    }
    priority = 10 if rng.random() < 0.2 else 0
    return Workload(
        id=f"job-{i:05d}",
        priority=priority,
        training=TrainingSpec(
            shapes=(GangShape(gpus=size, throughput=throughput),),
            gpu_memory_gib=round(memory, 1),
            cpus_per_gpu=4.0,
            memory_gib_per_gpu=16.0,
            locality=Locality.DOMAIN if size >= 16 else Locality.NODE,
            remaining_work=float(rng.integers(1_000, 100_000)),
        ),
    )


def _service(i: int, rng: np.random.Generator) -> Workload:
    usable = [t for t, (mem, *_) in SLOW_FLEET_TYPES.items() if mem >= 16.0]
    replicas_on_a10 = int(rng.integers(2, 12))
    target = round(replicas_on_a10 * SLOW_FLEET_TYPES["a10"][3] * float(rng.uniform(0.7, 1.0)), 1)
    return Workload(
        id=f"svc-{i:04d}",
        priority=100,
        inference=InferenceSpec(
            gpus_per_replica=dict.fromkeys(usable, 1),
            replica_rps={t: SLOW_FLEET_TYPES[t][3] for t in usable},
            target_rps=target,
            min_replicas=2,
            cpus_per_replica=4.0,
            memory_gib_per_replica=16.0,
            spread=Spread.ZONE,
        ),
    )


def slow_fleet(n_workloads: int, n_nodes: int, seed: int = 0) -> Problem:
    """The ``slow_fleet`` family (module docstring): ``n_nodes`` nodes, ``n_workloads``
    workloads, 5% of them services."""
    rng = np.random.default_rng([seed, 11])
    n_services = max(1, round(0.05 * n_workloads))
    workloads = [_service(i, rng) for i in range(n_services)]
    workloads += [_job(i, rng) for i in range(n_workloads - n_services)]
    types = tuple(GpuType(t, mem, cost) for t, (mem, cost, _, _) in SLOW_FLEET_TYPES.items())
    return Problem(gpu_types=types, nodes=_slow_fleet_nodes(n_nodes), workloads=tuple(workloads))


FAMILIES: dict[str, Callable[[int, int, int], Problem]] = {"slow_fleet": slow_fleet}
