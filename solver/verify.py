"""An independent checker for plans: feasibility and objective, recomputed.

``verify(problem, plan)`` re-derives everything from the :class:`Problem` and
the :class:`Plan` alone. It imports no solver, no backend and none of the
formulation or aggregation code, so a bug there shows up here as a violation
(or as an objective that differs from ``plan.objective``). It does not assume
that the plan is well-formed: unknown ids, duplicates and empty placements are
reported, never raised.

Feasibility rules checked (numbering used in the code):

1. Every placement names a known workload (once) and known nodes, every shard
   has ≥ 1 GPU; each workload is either placed or listed in ``plan.unplaced``
   (not both, not twice).
2. Node states: new shards only on ready nodes; a shard on a draining node only
   if the same (workload, node, GPUs) shard runs there now (``problem.current``,
   counted as a multiset) and, for a training job, only if the job stays exactly as
   it runs (a changed gang is a new gang, relaunched whole: none of it is kept);
   nothing on down nodes.
3. Capacity per node: Σ GPUs ≤ ``gpus``, Σ CPUs ≤ ``cpus``, Σ host memory ≤
   ``memory_gib``. **A node whose ``cpus`` (or ``memory_gib``) is 0 does not
   track that resource**: it is not checked there. A training shard needs
   ``cpus_per_gpu × gpus`` and ``memory_gib_per_gpu × gpus``; a replica needs
   ``cpus_per_replica`` and ``memory_gib_per_replica``.
4. GPU types: all shards of a workload on one type (equal to
   ``placement.gpu_type`` when given), allowed by ``allowed_gpu_types``, on
   nodes whose labels include ``node_selector``. Training: the type's memory ≥
   ``gpu_memory_gib``; the total GPUs equal one shape's ``gpus`` whose
   throughput on the type is > 0. Inference: the type has ``gpus_per_replica``
   and ``replica_rps``; each replica has exactly ``gpus_per_replica[type]`` GPUs.
5. Gangs (training): at most one shard per node; a gang that fits on one of the
   nodes it runs on is one shard. A multi-node gang needs locality ≠ node, one
   (zone, domain) for ``domain`` and one zone for ``zone``; nodes of equal size
   N, ``ceil(gpus / N)`` shards whose sizes differ by ≤ 1, and no other workload
   on those nodes (whole nodes).
6. Inference: ``min_replicas`` ≤ replicas ≤ ``max_replicas``. Spread over
   zone / (zone, domain) / node: no unit holds more than ``ceil(R / units)``
   replicas, where the units are counted over the service's *eligible* nodes:
   ready, of the placement's GPU type (a service runs on one type), which must
   be usable (in ``gpus_per_replica`` ∩ ``replica_rps`` ∩ ``allowed_gpu_types``
   when that is given), carrying its ``node_selector`` labels and with enough
   GPUs for one replica (model.py).
7. Quotas: per tenant, Σ GPUs ≤ ``max_gpus`` and per type ≤
   ``max_gpus_per_type[type]``.
8. Migrations. *Running* workloads are those of ``problem.current`` still in
   ``problem.workloads`` that still run: **a training job with a shard on a down
   (or unknown) node is not running, a service is running while one of its
   replicas is on a live node** (model.py: work on down nodes is "treated as not
   running"). A running training job *migrates* when its shards change (as a
   multiset of (node, GPUs)) or it is not placed, or while it stays on a draining
   node (a drain is a move the input asks for); a running service when it
   loses a replica it runs on a live node, or is not placed (replicas on down
   nodes are lost anyway; adding replicas moves nothing). A migration is
   *forced* when the workload cannot stay as it runs: a live shard is on a
   draining node, or its live shards alone break rules (4)-(6) of the current
   input. A non-preemptible training job may only migrate when forced, and
   migrations ≤ ``max(max_migrations, forced)`` when a cap is given (the
   formulation's rule: moves the input forces are always allowed).
9. Strict priority, **best effort and conservative** (it only flags clear
   cases): an unplaced training job with a shape that fits on one node is
   reported when some ready node it may use would hold it if the
   strictly-lower-priority workloads on that node were removed, its tenant's
   quota would allow it if the tenant's strictly-lower-priority workloads were
   removed, and such a removal is actually needed (it fits nowhere without
   one). An unplaced service likewise when ``max(1, min_replicas)`` replicas of
   one type fit (with the spread rule) on its eligible nodes once lower-priority
   work is removed, but not without. Workloads that cannot be removed are never
   counted: running non-preemptible jobs, and, when ``max_migrations`` is
   given, any running workload kept where it is (removing it would be a
   migration). A node that hosts a multi-node gang counts as full unless that
   gang is removed. An unplaced workload that fits in free capacity is a matter
   of the policy's objective, not of priority, and is not reported.

Objective (all policies maximize; M = migrations as in 8):

* effective weight w = ``workload.weight × tenant.weight`` (1 for no/unknown tenant);
* training on type t with shape s: ρ = s.throughput[t] / max throughput over
  all shapes and *usable* types (allowed, enough GPU memory, throughput > 0);
* a service with R replicas on type t: f = min(1, R × replica_rps[t] / target_rps);
* ``throughput`` (and the baselines ``fcfs``, ``sjf``, ``priority``,
  ``first-fit``, ``best-fit``): Σ w·ρ + Σ w·f − penalty·M;
* ``cost``: −Σ GPUs × cost_per_hour(type) (unknown price: 0) − penalty·M;
* ``fairness``: min over placed workloads of (ρ or f) / w (0 if none) − penalty·M.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from solver.errors import UnknownPolicyError
from solver.model import (
    GpuType,
    InferenceSpec,
    Locality,
    Node,
    NodeState,
    Placement,
    Plan,
    PlanMetrics,
    Problem,
    Shard,
    Spread,
    Tenant,
    TrainingSpec,
    Workload,
)

__all__ = ["OBJECTIVE_OF_POLICY", "VerifyReport", "objective", "verify"]

#: The objective each policy name is scored with.
OBJECTIVE_OF_POLICY: Mapping[str, str] = {
    "throughput": "throughput",
    "cost": "cost",
    "fairness": "fairness",
    "fcfs": "throughput",
    "sjf": "throughput",
    "priority": "throughput",
    "first-fit": "throughput",
    "best-fit": "throughput",
}

_TOL = 1e-9
_NEVER = math.inf  # a priority above every other


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    Attributes:
        violations: one readable sentence per broken rule (empty: feasible).
        objective: the plan's objective under the policy, recomputed.
        metrics: the plan's summary figures, recomputed.
    """

    violations: tuple[str, ...]
    objective: float
    metrics: PlanMetrics

    @property
    def ok(self) -> bool:
        return not self.violations


def verify(
    problem: Problem,
    plan: Plan,
    policy: str = "throughput",
    migration_penalty: float = 0.05,
    max_migrations: int | None = None,
    strict_priority: bool = True,
) -> VerifyReport:
    """Check ``plan`` against every rule of ``problem`` and recompute its objective.

    ``strict_priority=False`` skips rule 9, for baselines that ignore priority by
    design (``fcfs``, ``sjf``).

    Raises:
        UnknownPolicyError: ``policy`` is not a known policy name.
    """
    kind = _objective_kind(policy)
    ctx = _Context(problem, plan.placements)
    checker = _Checker(ctx, plan, max_migrations)
    checker.strict_priority = strict_priority
    checker.run()
    score = _score(ctx)
    metrics = PlanMetrics(
        gpus_used=score.gpus_used,
        gpus_total=sum(n.gpus for n in problem.nodes if n.state is NodeState.READY),
        cost_per_hour=score.cost_per_hour,
        normalized_throughput=score.normalized_throughput,
        served_fraction=score.served_fraction,
        migrations=len(ctx.migrated),
        placed=len(ctx.placed),
        unplaced=sum(1 for w in ctx.workloads if w not in ctx.placed),
    )
    return VerifyReport(
        violations=tuple(checker.violations),
        objective=_objective_value(kind, score, len(ctx.migrated), migration_penalty),
        metrics=metrics,
    )


def objective(
    problem: Problem, placements: Sequence[Placement], policy: str, migration_penalty: float = 0.05
) -> float:
    """The objective of ``placements`` under ``policy`` (see the module docstring).

    Placements of unknown workloads, repeated placements (after the first) and
    placements without shards are ignored.

    Raises:
        UnknownPolicyError: ``policy`` is not a known policy name.
    """
    kind = _objective_kind(policy)
    ctx = _Context(problem, placements)
    return _objective_value(kind, _score(ctx), len(ctx.migrated), migration_penalty)


# ---------------------------------------------------------------------------
# Shared lookups


def _objective_kind(policy: str) -> str:
    try:
        return OBJECTIVE_OF_POLICY[policy]
    except KeyError:
        known = ", ".join(sorted(OBJECTIVE_OF_POLICY))
        raise UnknownPolicyError(f'unknown policy "{policy}" (known: {known})') from None


class _Context:
    """Indexes of the problem and the normalized placements.

    ``placed`` holds the first placement with ≥ 1 shard of each known workload;
    everything else (feasibility, objective, metrics) is computed from it.
    """

    def __init__(self, problem: Problem, placements: Sequence[Placement]) -> None:
        self.problem = problem
        self.types: dict[str, GpuType] = {t.name: t for t in problem.gpu_types}
        self.nodes: dict[str, Node] = {n.id: n for n in problem.nodes}
        self.workloads: dict[str, Workload] = {w.id: w for w in problem.workloads}
        self.tenants: dict[str, Tenant] = {t.name: t for t in problem.tenants}
        self.placed: dict[str, Placement] = {}
        for p in placements:
            if p.workload_id in self.workloads and p.workload_id not in self.placed and p.shards:
                self.placed[p.workload_id] = p
        # Running now (rule 8): the first current placement of each known workload
        # that still runs, i.e. a training job with none of its shards on a down
        # (or unknown) node, a service with at least one replica on a live node.
        self.running: dict[str, Placement] = {}
        for c in problem.current:
            w = self.workloads.get(c.workload_id)
            if w is None or c.workload_id in self.running:
                continue
            alive = [self.alive(s) for s in c.shards]
            if all(alive) if w.training is not None else any(alive):
                self.running[c.workload_id] = c
        self.migrated: list[str] = [wid for wid, c in self.running.items() if self._moved(wid, c)]
        self.migrated_set = frozenset(self.migrated)

    def alive(self, s: Shard) -> bool:
        node = self.nodes.get(s.node_id)
        return node is not None and node.state is not NodeState.DOWN

    def _moved(self, wid: str, c: Placement) -> bool:
        """Is running workload ``wid`` moved or stopped by the placements?

        A training job must keep exactly its shards; a service must keep every
        replica it runs on a live node (replicas on down nodes are lost anyway,
        and adding replicas moves nothing).
        """
        p = self.placed.get(wid)
        if p is None:
            return True
        if self.workloads[wid].training is not None:
            # A job on a draining node is due to move: staying there counts as its
            # (forced) migration too, so a drain moves work off wherever it can.
            draining = any(
                (n := self.nodes.get(s.node_id)) is not None and n.state is NodeState.DRAINING
                for s in c.shards
            )
            return draining or Counter(p.shards) != Counter(c.shards)
        now = Counter(s for s in c.shards if self.alive(s))
        return bool(now - Counter(p.shards))

    def gpu_type(self, p: Placement) -> str:
        """The placement's type: as stated, else that of its first known node."""
        if p.gpu_type:
            return p.gpu_type
        for s in p.shards:
            if s.node_id in self.nodes:
                return self.nodes[s.node_id].gpu_type
        return ""

    def weight(self, w: Workload) -> float:
        tenant = self.tenants.get(w.tenant)
        return w.weight * (tenant.weight if tenant is not None else 1.0)

    def usable_training_types(self, w: Workload, spec: TrainingSpec) -> list[str]:
        """Types a training job may use: allowed, with enough memory and a positive throughput."""
        out = []
        for name, t in self.types.items():
            if w.allowed_gpu_types and name not in w.allowed_gpu_types:
                continue
            if not _fits_memory(t, spec):
                continue
            if any(s.throughput.get(name, 0.0) > 0 for s in spec.shapes):
                out.append(name)
        return out

    def usable_service_types(self, w: Workload, spec: InferenceSpec) -> list[str]:
        """Known types with a replica size and rate, allowed by the service."""
        return [
            t
            for t in self.types
            if spec.gpus_per_replica.get(t, 0) > 0
            and spec.replica_rps.get(t, 0.0) > 0
            and (not w.allowed_gpu_types or t in w.allowed_gpu_types)
        ]

    def eligible_service_nodes(
        self, w: Workload, spec: InferenceSpec, gpu_type: str | None = None
    ) -> list[Node]:
        """Ready nodes that could host one replica of the service (see rule 6),
        of ``gpu_type`` only when given (a service runs on one type)."""
        usable = set(self.usable_service_types(w, spec))
        if gpu_type is not None:
            usable &= {gpu_type}
        return [
            n
            for n in self.problem.nodes
            if n.state is NodeState.READY
            and n.gpu_type in usable
            and _has_labels(n, w.node_selector)
            and n.gpus >= spec.gpus_per_replica[n.gpu_type]
        ]

    def rho(self, w: Workload, spec: TrainingSpec, p: Placement) -> float:
        usable = self.usable_training_types(w, spec)
        best = max((s.throughput.get(t, 0.0) for s in spec.shapes for t in usable), default=0.0)
        if best <= 0:
            return 0.0
        t = self.gpu_type(p)
        total = p.gpus
        for s in spec.shapes:
            if s.gpus == total:
                return s.throughput.get(t, 0.0) / best
        return 0.0

    def served(self, spec: InferenceSpec, p: Placement) -> float:
        rps = len(p.shards) * spec.replica_rps.get(self.gpu_type(p), 0.0)
        if spec.target_rps <= 0:
            return 1.0 if rps > 0 else 0.0
        return min(1.0, rps / spec.target_rps)


def _fits_memory(t: GpuType, spec: TrainingSpec) -> bool:
    return _le(spec.gpu_memory_gib, t.memory_gib)


def _has_labels(node: Node, selector: Mapping[str, str]) -> bool:
    return all(node.labels.get(k) == v for k, v in selector.items())


def _unit(node: Node, spread: Spread) -> tuple[str, ...]:
    if spread is Spread.ZONE:
        return (node.zone,)
    if spread is Spread.DOMAIN:
        return (node.zone, node.domain)
    return (node.id,)


def _le(a: float, b: float) -> bool:
    """a ≤ b up to rounding."""
    return a <= b + _TOL * max(1.0, abs(b))


def _fmt(x: float) -> str:
    return f"{x:g}"


# ---------------------------------------------------------------------------
# Objective


@dataclass(frozen=True)
class _Score:
    normalized_throughput: float
    served_fraction: float
    cost_per_hour: float
    fairness: float
    gpus_used: int


def _score(ctx: _Context) -> _Score:
    thr = served = cost = 0.0
    gpus = 0
    fair: list[float] = []
    for wid, p in ctx.placed.items():
        w = ctx.workloads[wid]
        weight = ctx.weight(w)
        if w.training is not None:
            value = ctx.rho(w, w.training, p)
            thr += weight * value
        elif w.inference is not None:
            value = ctx.served(w.inference, p)
            served += weight * value
        else:
            value = 0.0
        fair.append(value / weight if weight > 0 else 0.0)
        fallback = ctx.gpu_type(p)
        for s in p.shards:
            node = ctx.nodes.get(s.node_id)
            gpu_type = ctx.types.get(node.gpu_type if node is not None else fallback)
            if gpu_type is not None and gpu_type.cost_per_hour is not None:
                cost += s.gpus * gpu_type.cost_per_hour
            gpus += s.gpus
    return _Score(
        normalized_throughput=thr,
        served_fraction=served,
        cost_per_hour=cost,
        fairness=min(fair, default=0.0),
        gpus_used=gpus,
    )


def _objective_value(kind: str, score: _Score, migrations: int, penalty: float) -> float:
    if kind == "cost":
        base = -score.cost_per_hour
    elif kind == "fairness":
        base = score.fairness
    else:
        base = score.normalized_throughput + score.served_fraction
    return base - penalty * migrations


# ---------------------------------------------------------------------------
# Feasibility


@dataclass
class _NodeUse:
    """What one workload holds on one node."""

    gpus: int = 0
    cpus: float = 0.0
    memory_gib: float = 0.0


class _Checker:
    def __init__(self, ctx: _Context, plan: Plan, max_migrations: int | None) -> None:
        self.ctx = ctx
        self.plan = plan
        self.max_migrations = max_migrations
        self.strict_priority = True
        self.priority_cache: dict[tuple[object, ...], str] = {}  # request -> blocking node ("" if none)
        self.violations: list[str] = []
        # Running workloads kept exactly where they are; running non-preemptible jobs.
        self.kept = {wid for wid in ctx.running if wid not in ctx.migrated_set}
        self.non_preemptible = {
            wid
            for wid in ctx.running
            if (spec := ctx.workloads[wid].training) is not None and not spec.preemptible
        }
        self.quota_cache: dict[tuple[str, int], _QuotaUse] = {}
        self.by_tenant: dict[str, list[str]] = defaultdict(list)
        for wid in ctx.placed:
            self.by_tenant[ctx.workloads[wid].tenant].append(wid)
        # use[node][workload]: resources the workload holds on the node.
        self.use: dict[str, dict[str, _NodeUse]] = defaultdict(dict)
        for wid, p in ctx.placed.items():
            w = ctx.workloads[wid]
            for s in p.shards:
                if s.node_id not in ctx.nodes:
                    continue
                u = self.use[s.node_id].setdefault(wid, _NodeUse())
                cpus, mem = _shard_needs(w, s)
                u.gpus += s.gpus
                u.cpus += cpus
                u.memory_gib += mem

    def add(self, message: str) -> None:
        self.violations.append(message)

    def run(self) -> None:
        self.check_references()
        self.check_node_states()
        self.check_capacity()
        for wid, p in self.ctx.placed.items():
            w = self.ctx.workloads[wid]
            self.check_types(w, p)
            if w.training is not None:
                self.check_gang(w, w.training, p)
            if w.inference is not None:
                self.check_replicas(w, w.inference, p)
        self.check_quotas()
        self.check_migrations()
        if self.strict_priority:
            self.check_priority()

    # Rule (1): references and completeness.
    def check_references(self) -> None:
        ctx = self.ctx
        listed: set[str] = set()
        for p in self.plan.placements:
            wid = p.workload_id
            if wid not in ctx.workloads:
                self.add(f'placement of unknown workload "{wid}"')
            elif wid in listed:
                self.add(f'workload "{wid}" is placed more than once')
            listed.add(wid)
            if not p.shards:
                self.add(f'workload "{wid}" has a placement with no shards')
            for s in p.shards:
                if s.node_id not in ctx.nodes:
                    self.add(f'workload "{wid}" has a shard on unknown node "{s.node_id}"')
                if s.gpus < 1:
                    self.add(f'workload "{wid}" has a shard of {s.gpus} GPUs on node "{s.node_id}"')
        unplaced: set[str] = set()
        for u in self.plan.unplaced:
            wid = u.workload_id
            if wid not in ctx.workloads:
                self.add(f'unplaced entry for unknown workload "{wid}"')
            elif wid in unplaced:
                self.add(f'workload "{wid}" is listed as unplaced more than once')
            elif wid in listed:
                self.add(f'workload "{wid}" is both placed and listed as unplaced')
            unplaced.add(wid)
        for wid in ctx.workloads:
            if wid not in listed and wid not in unplaced:
                self.add(f'workload "{wid}" is neither placed nor listed as unplaced')

    # Rule (2): node states.
    def check_node_states(self) -> None:
        ctx = self.ctx
        now: Counter[tuple[str, Shard]] = Counter()
        seen: set[str] = set()
        running: dict[str, Counter[Shard]] = {}  # each workload's shards now
        for c in ctx.problem.current:
            if c.workload_id not in seen:
                seen.add(c.workload_id)
                now.update((c.workload_id, s) for s in c.shards)
                running[c.workload_id] = Counter(c.shards)
        for wid, p in ctx.placed.items():
            planned: Counter[tuple[str, Shard]] = Counter((wid, s) for s in p.shards)
            regang = ctx.workloads[wid].training is not None and Counter(p.shards) != running.get(wid)
            reported: set[str] = set()
            for s in p.shards:
                node = ctx.nodes.get(s.node_id)
                if node is None or node.id in reported:
                    continue
                if node.state is NodeState.DOWN:
                    self.add(f'workload "{wid}" has a shard on node "{node.id}", which is down')
                    reported.add(node.id)
                elif node.state is NodeState.DRAINING and (planned[(wid, s)] > now[(wid, s)] or regang):
                    self.add(
                        f'workload "{wid}" gets a new shard of {s.gpus} GPUs on node "{node.id}", '
                        "which is draining"
                    )
                    reported.add(node.id)

    # Rule (3): capacity per node.
    def check_capacity(self) -> None:
        for node in self.ctx.problem.nodes:
            users = self.use.get(node.id)
            if not users:
                continue
            gpus = sum(u.gpus for u in users.values())
            cpus = sum(u.cpus for u in users.values())
            mem = sum(u.memory_gib for u in users.values())
            if gpus > node.gpus:
                self.add(f'node "{node.id}" is given {gpus} GPUs but has {node.gpus}')
            if node.cpus > 0 and not _le(cpus, node.cpus):
                self.add(f'node "{node.id}" is given {_fmt(cpus)} CPUs but has {_fmt(node.cpus)}')
            if node.memory_gib > 0 and not _le(mem, node.memory_gib):
                self.add(
                    f'node "{node.id}" is given {_fmt(mem)} GiB of memory but has {_fmt(node.memory_gib)}'
                )

    # Rule (4): GPU types, labels, shapes.
    def check_types(self, w: Workload, p: Placement) -> None:
        ctx = self.ctx
        nodes = [ctx.nodes[s.node_id] for s in p.shards if s.node_id in ctx.nodes]
        if not nodes and not p.gpu_type:
            return  # only unknown nodes: reported by rule (1)
        node_types = sorted({n.gpu_type for n in nodes})
        if len(node_types) > 1:
            self.add(f'workload "{w.id}" mixes GPU types {", ".join(node_types)}')
        if p.gpu_type and any(t != p.gpu_type for t in node_types):
            self.add(
                f'workload "{w.id}" is placed as GPU type "{p.gpu_type}" on nodes of type '
                f"{', '.join(node_types)}"
            )
        t = ctx.gpu_type(p)
        if w.allowed_gpu_types and t not in w.allowed_gpu_types:
            self.add(f'workload "{w.id}" runs on GPU type "{t}", which it does not allow')
        missing = sorted({n.id for n in nodes if not _has_labels(n, w.node_selector)})
        for node_id in missing:
            self.add(f'workload "{w.id}" is on node "{node_id}", which lacks its node_selector labels')
        if w.training is not None:
            spec = w.training
            gpu_type = ctx.types.get(t)
            if gpu_type is None:
                self.add(f'workload "{w.id}" runs on unknown GPU type "{t}"')
            elif not _fits_memory(gpu_type, spec):
                self.add(
                    f'workload "{w.id}" needs {_fmt(spec.gpu_memory_gib)} GiB per GPU but "{t}" has '
                    f"{_fmt(gpu_type.memory_gib)}"
                )
            shape = next((s for s in spec.shapes if s.gpus == p.gpus), None)
            if shape is None:
                allowed = ", ".join(str(s.gpus) for s in spec.shapes)
                self.add(f'workload "{w.id}" gets {p.gpus} GPUs, not one of its shapes ({allowed})')
            elif not shape.throughput.get(t, 0.0) > 0:
                self.add(f'workload "{w.id}" has no throughput with {shape.gpus} GPUs of type "{t}"')
        if w.inference is not None:
            inf = w.inference
            if t not in inf.gpus_per_replica or t not in inf.replica_rps:
                self.add(f'service "{w.id}" cannot run on GPU type "{t}" (no gpus_per_replica/replica_rps)')
            else:
                want = inf.gpus_per_replica[t]
                for s in p.shards:
                    if s.gpus != want:
                        self.add(
                            f'service "{w.id}" has a replica of {s.gpus} GPUs on node "{s.node_id}", '
                            f"needs {want}"
                        )

    # Rule (5): gangs and locality.
    def check_gang(self, w: Workload, spec: TrainingSpec, p: Placement, *, exclusive: bool = True) -> None:
        ctx = self.ctx
        counts = Counter(s.node_id for s in p.shards)
        for node_id, k in sorted(counts.items()):
            if k > 1:
                self.add(f'training job "{w.id}" has {k} shards on node "{node_id}"')
        shards = [s for s in p.shards if s.node_id in ctx.nodes]
        if len(shards) <= 1:
            return
        g = p.gpus
        nodes = [ctx.nodes[s.node_id] for s in shards]
        biggest = max(nodes, key=lambda n: n.gpus)
        if g <= biggest.gpus:
            self.add(
                f'training job "{w.id}" ({g} GPUs) fits on node "{biggest.id}" but is split over '
                f"{len(shards)} shards"
            )
            return
        if spec.locality is Locality.NODE:
            self.add(f'training job "{w.id}" has locality node but spans {len(shards)} nodes')
        elif spec.locality is Locality.DOMAIN and len({(n.zone, n.domain) for n in nodes}) > 1:
            self.add(f'training job "{w.id}" has locality domain but spans several domains')
        elif spec.locality is Locality.ZONE and len({n.zone for n in nodes}) > 1:
            self.add(f'training job "{w.id}" has locality zone but spans several zones')
        sizes = {n.gpus for n in nodes}
        if min(sizes) < 1:
            pass  # invalid input (validate rejects it)
        elif len(sizes) > 1:
            self.add(
                f'training job "{w.id}" spans nodes of different sizes ({", ".join(map(str, sorted(sizes)))})'
            )
        else:
            need = -(-g // sizes.pop())
            if len(shards) != need:
                self.add(f'training job "{w.id}" ({g} GPUs) uses {len(shards)} nodes, should use {need}')
        gpus = [s.gpus for s in shards]
        if max(gpus) - min(gpus) > 1:
            self.add(f'training job "{w.id}" is split unevenly ({", ".join(map(str, gpus))} GPUs)')
        for n in nodes if exclusive else ():
            others = sorted(x for x in self.use.get(n.id, {}) if x != w.id)
            if others:
                self.add(
                    f'multi-node training job "{w.id}" shares node "{n.id}" with '
                    + ", ".join(f'"{x}"' for x in others)
                )

    # Rule (6): replica counts and spread.
    def check_replicas(self, w: Workload, spec: InferenceSpec, p: Placement) -> None:
        replicas = len(p.shards)
        if replicas < spec.min_replicas:
            self.add(f'service "{w.id}" has {replicas} replicas, fewer than min_replicas {spec.min_replicas}')
        if spec.max_replicas is not None and replicas > spec.max_replicas:
            self.add(f'service "{w.id}" has {replicas} replicas, more than max_replicas {spec.max_replicas}')
        if spec.spread is Spread.NONE:
            return
        units = len(
            {_unit(n, spec.spread) for n in self.ctx.eligible_service_nodes(w, spec, self.ctx.gpu_type(p))}
        )
        if units == 0:
            return
        limit = -(-replicas // units)
        held = Counter(
            _unit(self.ctx.nodes[s.node_id], spec.spread) for s in p.shards if s.node_id in self.ctx.nodes
        )
        for unit, k in sorted(held.items()):
            if k > limit:
                name = "/".join(unit)
                self.add(
                    f'service "{w.id}" has {k} of {replicas} replicas in {spec.spread.value} "{name}" '
                    f"(at most {limit} over {units} units)"
                )

    # Rule (7): tenant quotas.
    def check_quotas(self) -> None:
        ctx = self.ctx
        total: Counter[str] = Counter()
        per_type: Counter[tuple[str, str]] = Counter()
        for wid, p in ctx.placed.items():
            tenant = ctx.workloads[wid].tenant
            for s in p.shards:
                node = ctx.nodes.get(s.node_id)
                total[tenant] += s.gpus
                if node is not None:
                    per_type[(tenant, node.gpu_type)] += s.gpus
        for t in ctx.problem.tenants:
            if t.max_gpus is not None and total[t.name] > t.max_gpus:
                self.add(f'tenant "{t.name}" holds {total[t.name]} GPUs, quota {t.max_gpus}')
            for gpu_type, limit in sorted(t.max_gpus_per_type.items()):
                used = per_type[(t.name, gpu_type)]
                if used > limit:
                    self.add(f'tenant "{t.name}" holds {used} GPUs of type "{gpu_type}", quota {limit}')

    # Rule (8): migrations.
    def check_migrations(self) -> None:
        ctx = self.ctx
        forced = [wid for wid in ctx.migrated if not self._keepable(wid)]
        for wid in ctx.migrated:
            if wid in self.non_preemptible and wid not in forced:
                verb = "moved" if wid in ctx.placed else "stopped"
                self.add(f'non-preemptible training job "{wid}" is {verb}')
        if self.max_migrations is not None and len(ctx.migrated) > max(self.max_migrations, len(forced)):
            why = f", {len(forced)} of them forced" if forced else ""
            self.add(
                f"{len(ctx.migrated)} migrations ({', '.join(ctx.migrated)}{why}), "
                f"more than max_migrations {self.max_migrations}"
            )

    def _keepable(self, wid: str) -> bool:
        """Could running workload ``wid`` stay exactly as it runs now?

        Only if all its live shards are on ready nodes and, taken alone, they keep
        rules (4)-(6) of the current input (which may have changed since).
        Otherwise moving it is *forced* by the input: such moves do not count
        against ``max_migrations`` and are allowed for non-preemptible jobs.
        """
        ctx = self.ctx
        w = ctx.workloads[wid]
        shards = tuple(s for s in ctx.running[wid].shards if ctx.alive(s))
        if any(ctx.nodes[s.node_id].state is not NodeState.READY for s in shards):
            return False
        now = Placement(wid, shards, ctx.running[wid].gpu_type)
        saved, self.violations = self.violations, []
        try:
            self.check_types(w, now)
            if w.training is not None:
                self.check_gang(w, w.training, now, exclusive=False)
            if w.inference is not None:
                self.check_replicas(w, w.inference, now)
            return not self.violations
        finally:
            self.violations = saved

    # Rule (9): strict priority (conservative).
    def check_priority(self) -> None:
        ctx = self.ctx
        if len({w.priority for w in ctx.problem.workloads}) <= 1:
            return
        self._prepare_rooms()
        # Work of a priority at or below every removable placed workload's has no
        # lower-priority work to blame (rooms and quotas are the same with and
        # without removals): nothing to check.
        lowest = min(
            (
                ctx.workloads[wid].priority
                for wid in ctx.placed
                if wid in ctx.workloads and self._removable(wid, _NEVER)
            ),
            default=_NEVER,
        )
        for w in ctx.problem.workloads:
            if w.id in ctx.placed or w.priority <= lowest:
                continue
            if w.training is not None:
                self._priority_training(w, w.training)
            elif w.inference is not None:
                self._priority_service(w, w.inference)

    def _removable(self, wid: str, priority: float) -> bool:
        """Could workload ``wid`` be removed to make room for one of ``priority``?"""
        if self.ctx.workloads[wid].priority >= priority or wid in self.non_preemptible:
            return False
        return self.max_migrations is None or wid not in self.kept

    def _quota_use(self, w: Workload) -> _QuotaUse | None:
        """GPUs ``w``'s tenant holds, in total and per type, with and without its removable work."""
        ctx = self.ctx
        tenant = ctx.tenants.get(w.tenant)
        if tenant is None:
            return None
        key = (tenant.name, w.priority)
        if key in self.quota_cache:
            return self.quota_cache[key]
        use = self.quota_cache[key] = _QuotaUse(tenant)
        for wid in self.by_tenant.get(tenant.name, ()):
            removable = self._removable(wid, w.priority)
            for s in ctx.placed[wid].shards:
                node = ctx.nodes.get(s.node_id)
                gpu_type = node.gpu_type if node is not None else ""
                use.total += s.gpus
                use.typed[gpu_type] += s.gpus
                if not removable:
                    use.kept_total += s.gpus
                    use.kept_typed[gpu_type] += s.gpus
        return use

    def _prepare_rooms(self) -> None:
        """Free resources per node, and prefix sums by priority of what removable work holds there."""
        self.free: dict[str, _NodeUse] = {}
        self.lower: dict[str, tuple[list[int], list[_NodeUse]]] = {}
        ctx = self.ctx
        # A multi-node gang holds its nodes whole: nothing else may join it there.
        gangs = {
            wid
            for wid, p in ctx.placed.items()
            if ctx.workloads[wid].training is not None
            and len({s.node_id for s in p.shards if s.node_id in ctx.nodes}) > 1
        }
        for node in ctx.problem.nodes:
            free = _NodeUse(node.gpus, node.cpus, node.memory_gib)
            held: list[tuple[int, _NodeUse]] = []
            for wid, use in self.use.get(node.id, {}).items():
                u = _NodeUse(node.gpus, node.cpus, node.memory_gib) if wid in gangs else use
                free.gpus -= u.gpus
                free.cpus -= u.cpus
                free.memory_gib -= u.memory_gib
                # Removable by something of higher priority? (the priority itself is compared per query)
                if self._removable(wid, _NEVER):
                    held.append((ctx.workloads[wid].priority, u))
            held.sort(key=lambda e: e[0])
            cum: list[_NodeUse] = []
            total = _NodeUse()
            for _, u in held:
                total = _NodeUse(total.gpus + u.gpus, total.cpus + u.cpus, total.memory_gib + u.memory_gib)
                cum.append(total)
            self.free[node.id] = free
            self.lower[node.id] = ([prio for prio, _ in held], cum)

    def _room(self, w: Workload, node: Node, *, remove: bool) -> _NodeUse:
        """Free GPUs/CPUs/memory of ``node`` (plus what removable lower-priority work holds there)."""
        free = self.free[node.id]
        if not remove:
            return free
        priorities, cum = self.lower[node.id]
        k = bisect.bisect_left(priorities, w.priority)
        if k == 0:
            return free
        c = cum[k - 1]
        return _NodeUse(free.gpus + c.gpus, free.cpus + c.cpus, free.memory_gib + c.memory_gib)

    def _priority_training(self, w: Workload, spec: TrainingSpec) -> None:
        # Workloads asking for the same thing get the same verdict: check each once.
        key = (
            w.priority,
            w.tenant,
            tuple(sorted(w.allowed_gpu_types)),
            tuple(sorted(w.node_selector.items())),
            spec.gpu_memory_gib,
            spec.cpus_per_gpu,
            spec.memory_gib_per_gpu,
            tuple((s.gpus, tuple(sorted(t for t, v in s.throughput.items() if v > 0))) for s in spec.shapes),
        )
        if key not in self.priority_cache:
            self.priority_cache[key] = self._priority_blocker(w, spec)
        blocked_by = self.priority_cache[key]
        if blocked_by:
            self.add(
                f'workload "{w.id}" (priority {w.priority}) is left out while lower-priority work '
                f'holds node "{blocked_by}" (or its quota)'
            )

    def _priority_blocker(self, w: Workload, spec: TrainingSpec) -> str:
        """A node whose lower-priority work keeps ``w`` out, or "" if none does."""
        ctx = self.ctx
        usable = set(ctx.usable_training_types(w, spec))
        quota = self._quota_use(w)
        smallest = min(s.gpus for s in spec.shapes)
        blocked_by = ""
        for node in ctx.problem.nodes:
            if node.state is not NodeState.READY or node.gpu_type not in usable or node.gpus < smallest:
                continue
            if not _has_labels(node, w.node_selector):
                continue
            room = self._room(w, node, remove=False)
            room_after = self._room(w, node, remove=True)
            for shape in spec.shapes:
                if shape.gpus > node.gpus or not shape.throughput.get(node.gpu_type, 0.0) > 0:
                    continue
                need = _NodeUse(
                    shape.gpus, spec.cpus_per_gpu * shape.gpus, spec.memory_gib_per_gpu * shape.gpus
                )
                if _fits(need, room, node) and _quota_allows(quota, node.gpu_type, shape.gpus, remove=False):
                    return ""  # it fits without removing anything: not a priority matter
                if (
                    not blocked_by
                    and _fits(need, room_after, node)
                    and _quota_allows(quota, node.gpu_type, shape.gpus, remove=True)
                ):
                    blocked_by = node.id
        return blocked_by

    def _priority_service(self, w: Workload, spec: InferenceSpec) -> None:
        ctx = self.ctx
        need = max(1, spec.min_replicas)
        quota = self._quota_use(w)
        fits_free = blocked = False
        for gpu_type in sorted(ctx.usable_service_types(w, spec)):
            eligible = ctx.eligible_service_nodes(w, spec, gpu_type)
            units = len({_unit(n, spec.spread) for n in eligible}) if spec.spread is not Spread.NONE else 0
            per_unit = -(-need // units) if units else need
            gpus = spec.gpus_per_replica[gpu_type]
            one = _NodeUse(gpus, spec.cpus_per_replica, spec.memory_gib_per_replica)
            for remove in (False, True):
                held: Counter[tuple[str, ...]] = Counter()
                for node in eligible:
                    held[_unit(node, spec.spread)] += _replicas(one, self._room(w, node, remove=remove), node)
                if sum(min(k, per_unit) for k in held.values()) < need:
                    continue
                if not _quota_allows(quota, gpu_type, need * gpus, remove=remove):
                    continue
                if remove:
                    blocked = True
                else:
                    fits_free = True
        if blocked and not fits_free:
            self.add(
                f'service "{w.id}" (priority {w.priority}) is left out while lower-priority work '
                f"holds the capacity (or quota) for its {need} replica(s)"
            )


@dataclass
class _QuotaUse:
    """GPUs a tenant holds (``kept_*``: without the workloads that could be removed)."""

    tenant: Tenant
    total: int = 0
    kept_total: int = 0
    typed: Counter[str] = field(default_factory=Counter)
    kept_typed: Counter[str] = field(default_factory=Counter)


def _quota_allows(use: _QuotaUse | None, gpu_type: str, gpus: int, *, remove: bool) -> bool:
    """Would the tenant's quota allow ``gpus`` more GPUs of ``gpu_type``?"""
    if use is None:
        return True
    total = use.kept_total if remove else use.total
    typed = (use.kept_typed if remove else use.typed)[gpu_type]
    if use.tenant.max_gpus is not None and total + gpus > use.tenant.max_gpus:
        return False
    limit = use.tenant.max_gpus_per_type.get(gpu_type)
    return limit is None or typed + gpus <= limit


def _shard_needs(w: Workload, s: Shard) -> tuple[float, float]:
    """Host (CPUs, memory GiB) one shard of ``w`` needs."""
    if w.training is not None:
        return w.training.cpus_per_gpu * s.gpus, w.training.memory_gib_per_gpu * s.gpus
    if w.inference is not None:
        return w.inference.cpus_per_replica, w.inference.memory_gib_per_replica
    return 0.0, 0.0


def _fits(need: _NodeUse, room: _NodeUse, node: Node) -> bool:
    """Does ``need`` fit in ``room`` (CPU and memory only where ``node`` tracks them)?"""
    if need.gpus > room.gpus:
        return False
    if node.cpus > 0 and not _le(need.cpus, room.cpus):
        return False
    return not (node.memory_gib > 0 and not _le(need.memory_gib, room.memory_gib))


def _replicas(one: _NodeUse, room: _NodeUse, node: Node) -> int:
    """How many replicas of size ``one`` fit in ``room``."""
    k = room.gpus // one.gpus if one.gpus > 0 else 0
    if node.cpus > 0 and one.cpus > 0:
        k = min(k, math.floor((room.cpus + _TOL * max(1.0, node.cpus)) / one.cpus))
    if node.memory_gib > 0 and one.memory_gib > 0:
        k = min(k, math.floor((room.memory_gib + _TOL * max(1.0, node.memory_gib)) / one.memory_gib))
    return max(0, k)
