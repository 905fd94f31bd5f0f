"""Hypothesis strategies for small random planning problems.

The search space is kept tiny on purpose, so that a test can enumerate every
plan by brute force: 1-3 GPU types (from :data:`tests.builders.TYPES`), 1-4
nodes of 1-4 GPUs in two zones of two domains, 1-4 training jobs of 1-4 GPUs
(sometimes elastic, with a second GPU count), throughputs from a short list.
Priorities, tenant quotas, non-ready nodes and what runs now (``current``, for
re-planning) are switched on by arguments.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from hypothesis import strategies as st

from solver.model import (
    GangShape,
    Locality,
    Node,
    NodeState,
    Placement,
    Problem,
    Shard,
    Tenant,
    TrainingSpec,
    Workload,
)
from tests.builders import TYPES, node, tenant

__all__ = ["THROUGHPUTS", "running_now", "small_nodes", "small_problems", "small_quotas", "training_jobs"]

#: Throughput values drawn for a (shape, type); a type left out has no numbers.
THROUGHPUTS = (0.5, 1.0, 1.5, 2.0, 3.0)


@st.composite
def small_nodes(
    draw: st.DrawFn, types: tuple[str, ...], *, states: tuple[NodeState, ...] = ()
) -> tuple[Node, ...]:
    """1-4 nodes of 1-4 GPUs of the given types in zones z1/z2, domains r1/r2; each
    node is ready, or (one time in three, when ``states`` are given) in one of ``states``."""
    count = draw(st.integers(1, 4))
    out = []
    for i in range(1, count + 1):
        state = draw(st.sampled_from(states)) if states and not draw(st.integers(0, 2)) else NodeState.READY
        out.append(
            node(
                f"n{i}",
                draw(st.sampled_from(types)),
                draw(st.integers(1, 4)),
                zone=draw(st.sampled_from(["z1", "z2"])),
                domain=draw(st.sampled_from(["r1", "r2"])),
                state=state,
            )
        )
    return tuple(out)


@st.composite
def training_jobs(
    draw: st.DrawFn,
    types: tuple[str, ...],
    *,
    priorities: bool = False,
    tenants: tuple[str, ...] = (),
) -> tuple[Workload, ...]:
    """1-4 training jobs of 1-4 GPUs (a third of them elastic, with two GPU counts)."""
    count = draw(st.integers(1, 4))
    out = []
    for i in range(1, count + 1):
        sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2, unique=True))
        shapes = []
        for g in sizes:
            with_numbers = draw(
                st.lists(st.sampled_from(types), min_size=1, max_size=len(types), unique=True)
            )
            shapes.append(GangShape(g, {t: draw(st.sampled_from(THROUGHPUTS)) for t in sorted(with_numbers)}))
        spec = TrainingSpec(
            shapes=tuple(shapes),
            gpu_memory_gib=draw(st.sampled_from([0.0, 0.0, 40.0])),  # 40 GiB rules out the 24 GiB l4
            locality=draw(st.sampled_from(list(Locality))),
        )
        out.append(
            Workload(
                id=f"j{i}",
                tenant=draw(st.sampled_from(("", *tenants))) if tenants else "",
                priority=draw(st.integers(0, 1)) if priorities else 0,
                weight=draw(st.sampled_from([1.0, 2.0])),
                training=spec,
            )
        )
    return tuple(out)


@st.composite
def small_quotas(draw: st.DrawFn, types: tuple[str, ...]) -> tuple[Tenant, ...]:
    """One tenant ``t1`` with a total quota and/or a quota on one type."""
    max_gpus = draw(st.one_of(st.none(), st.integers(0, 6)))
    per_type = {draw(st.sampled_from(types)): draw(st.integers(0, 4))} if draw(st.booleans()) else {}
    return (tenant("t1", max_gpus, per_type=per_type, weight=draw(st.sampled_from([1.0, 2.0]))),)


@st.composite
def running_now(draw: st.DrawFn, p: Problem) -> Problem:
    """``p`` with some of its jobs running (each on one node with room for its first
    shape, of a type it has a throughput for, within its tenant's quota) and some
    of those not preemptible. What runs is a valid plan of the input."""
    used: Counter[str] = Counter()
    held: Counter[tuple[str, str]] = Counter()  # (tenant, type or "") -> GPUs
    quotas = {t.name: t for t in p.tenants}
    types = {t.name: t for t in p.gpu_types}

    def within_quota(w: Workload, gpu_type: str, gpus: int) -> bool:
        t = quotas.get(w.tenant)
        if t is None:
            return True
        if t.max_gpus is not None and held[w.tenant, ""] + gpus > t.max_gpus:
            return False
        cap = t.max_gpus_per_type.get(gpu_type)
        return cap is None or held[w.tenant, gpu_type] + gpus <= cap

    current = []
    workloads = []
    for w in p.workloads:
        assert w.training is not None
        shape = w.training.shapes[0]
        hosts = [
            n
            for n in p.nodes
            if shape.throughput.get(n.gpu_type, 0.0) > 0
            and n.gpus - used[n.id] >= shape.gpus
            and types[n.gpu_type].memory_gib >= w.training.gpu_memory_gib
            and within_quota(w, n.gpu_type, shape.gpus)
        ]
        if len(hosts) > 0 and draw(st.booleans()):
            chosen = draw(st.sampled_from(hosts))
            host = chosen.id
            used[host] += shape.gpus
            held[w.tenant, ""] += shape.gpus
            held[w.tenant, chosen.gpu_type] += shape.gpus
            current.append(Placement(w.id, (Shard(host, shape.gpus),)))
            if not draw(st.integers(0, 3)):
                w = dataclasses.replace(w, training=dataclasses.replace(w.training, preemptible=False))
        workloads.append(w)
    return dataclasses.replace(p, workloads=tuple(workloads), current=tuple(current))


@st.composite
def small_problems(
    draw: st.DrawFn,
    *,
    priorities: bool = False,
    quotas: bool = False,
    states: tuple[NodeState, ...] = (),
    current: bool = False,
) -> Problem:
    """A tiny problem of training jobs (see the module docstring); ``states``: the
    non-ready node states to draw."""
    names = draw(st.lists(st.sampled_from([t.name for t in TYPES]), min_size=1, max_size=3, unique=True))
    types = tuple(sorted(names))
    tenants = draw(small_quotas(types)) if quotas else ()
    p = Problem(
        gpu_types=tuple(t for t in TYPES if t.name in types),
        nodes=draw(small_nodes(types, states=states)),
        workloads=draw(training_jobs(types, priorities=priorities, tenants=tuple(t.name for t in tenants))),
        tenants=tenants,
    )
    return draw(running_now(p)) if current else p
