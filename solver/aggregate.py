"""Aggregation: interchangeable nodes and identical workloads become classes.

The naive model (one variable per workload and node) does not scale: measured
on 2 cores, 1,000 jobs x 500 nodes gave CP-SAT no feasible solution in 30 s.
Here the model sees

* **node shapes**: ready nodes with the same GPU type, GPU count, CPUs, memory
  and labels. For a workload that runs on one node these are interchangeable,
  wherever they stand; each shape keeps its node count per zone and per
  (zone, domain) for gangs and spread services, which do care where.
* **workload classes**: training jobs with the same requirements, value and
  tenant (and the same current placement, at shape level) share one integer
  variable per option: *how many* of them run that way. Services are not
  merged (each has its own demand).
* **options**: the ways one member of a class can run: one node of a shape
  (``SINGLE``), whole nodes of a shape inside a locality scope (``GANG``),
  replicas on a shape, optionally within a failure unit (``REPLICA``), or
  staying where it runs on a draining node (``STAY``).

The classes are exact for the GPU dimension when item sizes divide the node
size (1, 2, 4, 8 on 8-GPU nodes); otherwise the model is a relaxation and the
packing on concrete nodes (``disaggregate``) may place fewer, which the
reported gap then shows.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from solver.model import (
    GpuType,
    Locality,
    Node,
    NodeState,
    Placement,
    Problem,
    Spread,
    Workload,
)

__all__ = [
    "Index",
    "NodeShape",
    "Option",
    "OptionKind",
    "WorkloadClass",
    "build_index",
    "effective_weight",
    "options_by_type",
    "usable_service_types",
    "usable_training_types",
]

Loc = tuple[str, str]  # (zone, domain)


class OptionKind(enum.Enum):
    SINGLE = "single"
    GANG = "gang"
    REPLICA = "replica"
    STAY = "stay"


@dataclass(frozen=True)
class NodeShape:
    """Ready nodes that are interchangeable for a workload on one node."""

    index: int
    gpu_type: str
    gpus: int
    cpus: float
    memory_gib: float
    labels: frozenset[tuple[str, str]]
    node_ids: tuple[str, ...]
    by_domain: Mapping[Loc, int]
    by_zone: Mapping[str, int]

    @property
    def count(self) -> int:
        return len(self.node_ids)

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all((k, v) in self.labels for k, v in selector.items())


@dataclass(frozen=True)
class Option:
    """One way for one member of a class to run.

    Attributes:
        kind: see :class:`OptionKind`.
        gpu_type: the GPU type used.
        shape: index of the :class:`NodeShape` (-1 for STAY).
        gpus: GPUs one item takes (a job, a replica; for GANG all of its GPUs).
        nodes: whole nodes one GANG item takes (0 otherwise).
        scope: where a GANG or located REPLICA must be: ``("domain", zone, domain)``,
            ``("domains", zone, size)`` (a gang inside any one domain of the zone that
            has ``size`` nodes of the shape: such domains are interchangeable),
            ``("zone", zone)``, ``("node",)`` or ``("any",)``.
        gang_shape: index into ``TrainingSpec.shapes`` (training only).
        value: normalized throughput (training) or requests/s per replica (service).
        cpus: host CPUs one item takes; memory_gib likewise.
    """

    kind: OptionKind
    gpu_type: str
    shape: int
    gpus: int
    nodes: int
    scope: tuple[str, ...]
    gang_shape: int
    value: float
    cpus: float
    memory_gib: float


@dataclass
class WorkloadClass:
    """Workloads that the model treats as one, and their options."""

    index: int
    members: list[Workload]
    options: list[Option]
    tier: int
    weight: float
    current_option: int | None = None  # option its members run as now (all alike)
    current_count: int = 0  # members running now (counted as migrations if moved)
    pinned: bool = False  # non-preemptible members that must stay
    current_replicas: dict[int, int] = field(default_factory=dict)  # service: option -> replicas now
    spread_units: dict[str, int] = field(default_factory=dict)  # service: failure units per GPU type
    forced_move: bool = False  # service: a running replica must move (its node is draining)

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def is_training(self) -> bool:
        return self.members[0].training is not None


@dataclass
class Index:
    """What the formulation, the greedy heuristics and the disaggregation share."""

    problem: Problem
    types: dict[str, GpuType]
    nodes: dict[str, Node]
    shapes: list[NodeShape]
    node_shape: dict[str, int]  # ready node id -> shape index
    classes: list[WorkloadClass]
    workload_class: dict[str, int]
    workloads: dict[str, Workload]
    tenant_weight: dict[str, float]
    current: dict[str, Placement]
    tiers: list[int]  # distinct priorities, highest first


def effective_weight(w: Workload, tenant_weight: Mapping[str, float]) -> float:
    return w.weight * tenant_weight.get(w.tenant, 1.0)


def options_by_type(c: WorkloadClass) -> dict[str, list[Option]]:
    """A class's options grouped by GPU type, each group in option order."""
    out: dict[str, list[Option]] = {}
    for o in c.options:
        out.setdefault(o.gpu_type, []).append(o)
    return out


def usable_training_types(w: Workload, types: Mapping[str, GpuType]) -> list[str]:
    """Types a training job may use: allowed, enough GPU memory, some throughput."""
    spec = w.training
    assert spec is not None
    out = []
    for t, gt in types.items():
        if w.allowed_gpu_types and t not in w.allowed_gpu_types:
            continue
        if gt.memory_gib + 1e-9 < spec.gpu_memory_gib:
            continue
        if any(s.throughput.get(t, 0.0) > 0 for s in spec.shapes):
            out.append(t)
    return out


def usable_service_types(w: Workload, types: Mapping[str, GpuType]) -> list[str]:
    spec = w.inference
    assert spec is not None
    return [
        t
        for t in types
        if (not w.allowed_gpu_types or t in w.allowed_gpu_types)
        and spec.gpus_per_replica.get(t, 0) > 0
        and spec.replica_rps.get(t, 0.0) > 0
    ]


def _node_shapes(
    nodes: Sequence[Node], selected: frozenset[tuple[str, str]] = frozenset()
) -> tuple[list[NodeShape], dict[str, int]]:
    """Ready nodes grouped into shapes. Only the labels some workload selects on
    (``selected``, pairs of key and value) tell shapes apart: a label no selector
    names changes nothing a plan can do, and keeping it would split nodes that
    a gang may span (a hostname label would make every node a shape of its own)."""
    groups: dict[tuple[str, int, float, float, frozenset[tuple[str, str]]], list[Node]] = defaultdict(list)
    labels_of: dict[str, frozenset[tuple[str, str]]] = {}
    for n in nodes:
        if n.state is NodeState.READY:
            labels = labels_of[n.id] = frozenset(n.labels.items()) & selected
            key = (n.gpu_type, n.gpus, n.cpus, n.memory_gib, labels)
            groups[key].append(n)
    shapes: list[NodeShape] = []
    node_shape: dict[str, int] = {}
    for key in sorted(groups, key=repr):
        members = sorted(groups[key], key=lambda n: n.id)
        by_domain: dict[Loc, int] = defaultdict(int)
        by_zone: dict[str, int] = defaultdict(int)
        for n in members:
            by_domain[(n.zone, n.domain)] += 1
            by_zone[n.zone] += 1
        s = NodeShape(
            index=len(shapes),
            gpu_type=members[0].gpu_type,
            gpus=members[0].gpus,
            cpus=members[0].cpus,
            memory_gib=members[0].memory_gib,
            labels=labels_of[members[0].id],
            node_ids=tuple(n.id for n in members),
            by_domain=dict(sorted(by_domain.items())),
            by_zone=dict(sorted(by_zone.items())),
        )
        for n in members:
            node_shape[n.id] = s.index
        shapes.append(s)
    return shapes, node_shape


def _fits_host(shape: NodeShape, cpus: float, memory_gib: float) -> bool:
    """CPUs and memory are tracked only on nodes that declare them (> 0)."""
    return (shape.cpus <= 0 or cpus <= shape.cpus + 1e-9) and (
        shape.memory_gib <= 0 or memory_gib <= shape.memory_gib + 1e-9
    )


def _training_options(w: Workload, shapes: Sequence[NodeShape], types: Mapping[str, GpuType]) -> list[Option]:
    spec = w.training
    assert spec is not None
    usable = set(usable_training_types(w, types))
    best = max(
        (s.throughput.get(t, 0.0) for s in spec.shapes for t in usable),
        default=0.0,
    )
    options: list[Option] = []
    for k, gs in enumerate(spec.shapes):
        for shape in shapes:
            t = shape.gpu_type
            thr = gs.throughput.get(t, 0.0)
            if t not in usable or thr <= 0 or not shape.matches(w.node_selector):
                continue
            value = thr / best
            g = gs.gpus
            if g <= shape.gpus:
                cpus, mem = g * spec.cpus_per_gpu, g * spec.memory_gib_per_gpu
                if _fits_host(shape, cpus, mem):
                    options.append(
                        Option(OptionKind.SINGLE, t, shape.index, g, 0, ("node",), k, value, cpus, mem)
                    )
                continue
            if spec.locality is Locality.NODE:
                continue
            nodes = math.ceil(g / shape.gpus)
            per_node = math.ceil(g / nodes)
            if not _fits_host(shape, per_node * spec.cpus_per_gpu, per_node * spec.memory_gib_per_gpu):
                continue
            cpus, mem = g * spec.cpus_per_gpu, g * spec.memory_gib_per_gpu
            scopes: list[tuple[str, ...]]
            if spec.locality is Locality.DOMAIN:
                sizes = sorted({(z, c) for (z, _d), c in shape.by_domain.items() if c >= nodes})
                scopes = [("domains", z, str(c)) for z, c in sizes]
            elif spec.locality is Locality.ZONE:
                scopes = [("zone", z) for z, c in shape.by_zone.items() if c >= nodes]
            else:
                scopes = [("any",)] if shape.count >= nodes else []
            for scope in scopes:
                options.append(Option(OptionKind.GANG, t, shape.index, g, nodes, scope, k, value, cpus, mem))
    return options


def spread_units(
    w: Workload, ready_by_type: Mapping[str, Sequence[Node]], types: Mapping[str, GpuType]
) -> dict[str, int]:
    """Per usable GPU type, the failure units (zones, domains or nodes) that have a
    ready node of that type (``ready_by_type``: the ready nodes of each type),
    carrying the selector's labels, with GPUs for one replica. A service runs on
    one type, so its spread counts the units of that type."""
    spec = w.inference
    assert spec is not None
    units: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for n in (n for t in usable_service_types(w, types) for n in ready_by_type.get(t, ())):
        if n.gpus < spec.gpus_per_replica[n.gpu_type]:
            continue
        if not all(n.labels.get(k) == v for k, v in w.node_selector.items()):
            continue
        if spec.spread is Spread.ZONE:
            units[n.gpu_type].add((n.zone,))
        elif spec.spread is Spread.DOMAIN:
            units[n.gpu_type].add((n.zone, n.domain))
        else:
            units[n.gpu_type].add((n.id,))
    return {t: len(u) for t, u in sorted(units.items())}


def _service_options(w: Workload, shapes: Sequence[NodeShape], types: Mapping[str, GpuType]) -> list[Option]:
    spec = w.inference
    assert spec is not None
    usable = set(usable_service_types(w, types))
    options: list[Option] = []
    for shape in shapes:
        t = shape.gpu_type
        if t not in usable or not shape.matches(w.node_selector):
            continue
        g = spec.gpus_per_replica[t]
        if g > shape.gpus or not _fits_host(shape, spec.cpus_per_replica, spec.memory_gib_per_replica):
            continue
        rps = spec.replica_rps[t]
        scopes: list[tuple[str, ...]]
        if spec.spread is Spread.ZONE:
            scopes = [("zone", z) for z in shape.by_zone]
        elif spec.spread is Spread.DOMAIN:
            scopes = [("domain", z, d) for (z, d) in shape.by_domain]
        else:
            scopes = [("any",)]
        for scope in scopes:
            options.append(
                Option(
                    OptionKind.REPLICA,
                    t,
                    shape.index,
                    g,
                    0,
                    scope,
                    -1,
                    rps,
                    spec.cpus_per_replica,
                    spec.memory_gib_per_replica,
                )
            )
    return options


def gang_fits_scope(shape: NodeShape, hosts: Sequence[Node], scope: tuple[str, ...]) -> bool:
    """Whether the nodes of a gang lie inside a gang option's scope."""
    kind = scope[0]
    if kind == "any":
        return True
    if kind == "zone":
        return all(h.zone == scope[1] for h in hosts)
    locs = {(h.zone, h.domain) for h in hosts}
    if len(locs) != 1:
        return False
    zone, domain = locs.pop()
    if kind == "domain":
        return (zone, domain) == (scope[1], scope[2])
    return zone == scope[1] and shape.by_domain.get((zone, domain), 0) == int(scope[2])


def scope_of_nodes(nodes: Sequence[Node], kind: str) -> tuple[str, ...]:
    if kind == "domain":
        return ("domain", nodes[0].zone, nodes[0].domain)
    if kind == "zone":
        return ("zone", nodes[0].zone)
    return ("any",)


def _current_option(
    w: Workload,
    placement: Placement,
    options: Sequence[Option],
    nodes: Mapping[str, Node],
    node_shape: Mapping[str, int],
    shapes: Sequence[NodeShape],
    types_of: Mapping[str, GpuType],
) -> int | None:
    """The option a running training job's placement corresponds to (None if
    it matches none, e.g. its node is down or its shape changed)."""
    spec = w.training
    assert spec is not None
    hosts = [nodes.get(s.node_id) for s in placement.shards]
    if not hosts or any(h is None or h.state is NodeState.DOWN for h in hosts):
        return None
    real = [h for h in hosts if h is not None]
    types = {h.gpu_type for h in real}
    if len(types) != 1:
        return None
    t = types.pop()
    g = placement.gpus
    shape_idx = [gs.gpus for gs in spec.shapes].index(g) if g in [gs.gpus for gs in spec.shapes] else -1
    if shape_idx < 0:
        return None
    if any(h.state is NodeState.DRAINING for h in real):
        # It may stay on a draining node only if it still could run there as it is
        # now specified: the type usable, the labels selected, the host resources.
        gt = types_of.get(t)
        usable = (
            gt is not None
            and (not w.allowed_gpu_types or t in w.allowed_gpu_types)
            and gt.memory_gib + 1e-9 >= spec.gpu_memory_gib
            and spec.shapes[shape_idx].throughput.get(t, 0.0) > 0
        )
        fits = all(
            all(h.labels.get(k) == v for k, v in w.node_selector.items())
            and (h.cpus <= 0 or s.gpus * spec.cpus_per_gpu <= h.cpus + 1e-9)
            and (h.memory_gib <= 0 or s.gpus * spec.memory_gib_per_gpu <= h.memory_gib + 1e-9)
            and s.gpus <= h.gpus
            for h, s in zip(real, placement.shards, strict=True)
        )
        return -2 if usable and fits else None  # -2: a STAY option is added for it
    shapes_of = {node_shape[h.id] for h in real}
    if len(shapes_of) != 1:
        return None
    sh = shapes_of.pop()
    for i, o in enumerate(options):
        if o.gang_shape != shape_idx or o.shape != sh or o.gpu_type != t:
            continue
        if o.kind is OptionKind.SINGLE and len(real) == 1:
            return i
        if o.kind is OptionKind.GANG and len(real) == o.nodes and gang_fits_scope(shapes[sh], real, o.scope):
            return i
    return None


def _runs(p: Placement, nodes: Mapping[str, Node]) -> bool:
    """Whether a current placement still runs: none of its nodes is down or gone.
    Work on a lost node is already disrupted, so re-placing it is no migration."""
    return all(s.node_id in nodes and nodes[s.node_id].state is not NodeState.DOWN for s in p.shards)


def _training_signature(w: Workload, tenant_weight: Mapping[str, float]) -> tuple[object, ...]:
    spec = w.training
    assert spec is not None
    return (
        tuple((s.gpus, tuple(sorted(s.throughput.items()))) for s in spec.shapes),
        spec.gpu_memory_gib,
        spec.cpus_per_gpu,
        spec.memory_gib_per_gpu,
        spec.locality,
        spec.preemptible,
        w.tenant,
        w.priority,
        effective_weight(w, tenant_weight),
        tuple(sorted(w.allowed_gpu_types)),
        tuple(sorted(w.node_selector.items())),
    )


def build_index(problem: Problem) -> Index:
    """Group nodes into shapes and workloads into classes with their options."""
    types = {t.name: t for t in problem.gpu_types}
    nodes = {n.id: n for n in problem.nodes}
    ready_by_type: dict[str, list[Node]] = defaultdict(list)
    for n in problem.nodes:
        if n.state is NodeState.READY:
            ready_by_type[n.gpu_type].append(n)
    selected = frozenset(pair for w in problem.workloads for pair in w.node_selector.items())
    shapes, node_shape = _node_shapes(problem.nodes, selected)
    tenant_weight = {t.name: t.weight for t in problem.tenants}
    workloads = {w.id: w for w in problem.workloads}
    current = {p.workload_id: p for p in problem.current if p.workload_id in workloads}
    tiers = sorted({w.priority for w in problem.workloads}, reverse=True)

    classes: list[WorkloadClass] = []
    workload_class: dict[str, int] = {}
    by_key: dict[tuple[object, ...], int] = {}
    options_cache: dict[tuple[object, ...], list[Option]] = {}
    for w in sorted(problem.workloads, key=lambda w: w.id):
        if w.training is not None:
            sig = _training_signature(w, tenant_weight)
            if sig not in options_cache:
                options_cache[sig] = _training_options(w, shapes, types)
            options = options_cache[sig]
            cur_opt: int | None = None
            if w.id in current:
                cur_opt = _current_option(w, current[w.id], options, nodes, node_shape, shapes, types)
            stays_draining = cur_opt == -2
            key = (sig, cur_opt, w.id if stays_draining else "")
            if key in by_key:
                wc = classes[by_key[key]]
                wc.members.append(w)
            else:
                opts = list(options)
                if stays_draining:
                    p = current[w.id]
                    host = nodes[p.shards[0].node_id]
                    gi = [s.gpus for s in w.training.shapes].index(p.gpus)
                    usable = set(usable_training_types(w, types))
                    top = max(
                        (s.throughput.get(t, 0.0) for s in w.training.shapes for t in usable), default=1.0
                    )
                    thr = w.training.shapes[gi].throughput.get(host.gpu_type, 0.0)
                    opts.append(
                        Option(
                            OptionKind.STAY,
                            host.gpu_type,
                            -1,
                            p.gpus,
                            0,
                            ("node",),
                            gi,
                            # A hair below moving: a drain moves work off when it can.
                            (thr / top if top > 0 else 0.0) * (1 - 1e-6),
                            p.gpus * w.training.cpus_per_gpu,
                            p.gpus * w.training.memory_gib_per_gpu,
                        )
                    )
                    cur_opt = len(opts) - 1
                wc = WorkloadClass(
                    index=len(classes),
                    members=[w],
                    options=opts,
                    tier=w.priority,
                    weight=effective_weight(w, tenant_weight),
                    current_option=cur_opt,
                )
                by_key[key] = wc.index
                classes.append(wc)
            if w.id in current and _runs(current[w.id], nodes):
                wc.current_count += 1
                # A non-preemptible job stays where it runs, except on a draining node:
                # leaving a drain is a forced move, which it may make like any job.
                if cur_opt is not None and not w.training.preemptible and not stays_draining:
                    wc.pinned = True
            workload_class[w.id] = wc.index
        else:
            assert w.inference is not None
            opts = _service_options(w, shapes, types)
            wc = WorkloadClass(
                index=len(classes),
                members=[w],
                options=opts,
                tier=w.priority,
                weight=effective_weight(w, tenant_weight),
                spread_units=spread_units(w, ready_by_type, types)
                if w.inference.spread is not Spread.NONE
                else {},
            )
            if w.id in current and any(
                s.node_id in nodes and nodes[s.node_id].state is not NodeState.DOWN
                for s in current[w.id].shards
            ):
                wc.current_count = 1
                for shard in current[w.id].shards:
                    maybe = nodes.get(shard.node_id)
                    if maybe is None or maybe.state is NodeState.DOWN:
                        continue
                    host = maybe
                    if host.state is NodeState.DRAINING:
                        wc.forced_move = True
                        continue
                    for i, o in enumerate(opts):
                        if (
                            o.shape == node_shape[host.id]
                            and o.gpus == shard.gpus
                            and (o.scope in (("any",), scope_of_nodes([host], o.scope[0])))
                        ):
                            wc.current_replicas[i] = wc.current_replicas.get(i, 0) + 1
                            break
            workload_class[w.id] = wc.index
            classes.append(wc)
    return Index(
        problem=problem,
        types=types,
        nodes=nodes,
        shapes=shapes,
        node_shape=node_shape,
        classes=classes,
        workload_class=workload_class,
        workloads=workloads,
        tenant_weight=tenant_weight,
        current=current,
        tiers=tiers,
    )
