"""The aggregated integer model shared by every optimizing policy.

Sets
    J   training classes (see ``aggregate``), each with ``count_j`` members;
    I   inference services;  O_j  options of class j (service i: O_i);
    S   node shapes, each with K_s ready nodes of G_s GPUs, C_s CPUs, M_s GiB;
    L   locations (a zone, or a zone's domain) with K_{s,L} nodes of shape s;
    T   GPU types;  P  tenants.
Data
    g_o GPUs of one item of option o (a job, or one replica); k_o whole nodes of
    a gang option; rho_o normalized throughput; rps_o requests/s of a replica;
    w_j effective weight; c_t $/GPU-hour.
Variables
    n_{j,o} in {0..count_j}   members of class j running as option o;
    r_{i,o} in {0..R_i}       replicas of service i as option o;
    y_i, z_{i,t} in {0,1}     service i runs, on type t;
    f_i in [0,1]              served fraction of service i;
    m_i in {0,1}              service i loses a running replica (a migration).
Constraints
    (1)  sum_o n_{j,o} <= count_j
    (2)  n_{j,o*} = count_j for non-preemptible running members (o*: where they run)
    (3)  GPUs per shape:  sum g_o n_{j,o} [single] + sum g_o r_{i,o} + sum k_o G_s n_{j,o} [gang] <= G_s K_s
    (4)  packing per shape, for each item size v that does not divide G_s:
         #items with g_o >= v + floor(G_s/v) * (nodes held by gangs) <= floor(G_s/v) K_s
    (5)  CPUs and memory per shape (only where nodes declare them), gangs count whole nodes
    (6)  GPUs per shape and location, for gangs and spread replicas bound to a location:
         sum over options inside L of GPUs held <= G_s K_{s,L}
    (7)  tenant quotas, in total and per type
    (8)  services: z_{i,t} <= y_i, sum_t z_{i,t} <= 1, r_{i,o} <= R_i z_{i,t(o)},
         max(1, min_i) y_i <= sum_o r_{i,o} <= R_i y_i,  f_i <= y_i,
         target_i f_i <= sum_o rps_o r_{i,o}
    (9)  spread over the U_{i,t} units of type t: U_{i,t} * (replicas in unit u) -
         sum_{o of type t} r_{i,o} <= U_{i,t} - 1; for node spread, with q = ceil(R_i / U_{i,t}),
         r_{i,o} + q * (items on s as large as a node + gang nodes on s) <= q K_s   (9b)
    (10) migrations: moves = sum_j (running_j - n_{j,o*}) + sum_i m_i <= max_migrations,
         m_i >= (running replicas of i on o - r_{i,o}) / running replicas on o
Objectives are supplied by the policies (``solver.policies``) as stages solved
one after another; each stage's optimum becomes a floor for the next (11).
    (12) valid inequalities: each service's GPUs (and, for ``cost``, its $/hour) are at
         least the convex envelope of what whole replicas take for the fraction it
         serves (``Formulation.service_envelope_cuts``, which proves them).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from solver import clock
from solver.aggregate import Index, Option, OptionKind, WorkloadClass, gang_fits_scope, scope_of_nodes
from solver.linear import LinearModel, Sense, Var
from solver.model import Placement, Problem

__all__ = ["Formulation", "Terms", "build_formulation"]

Terms = list[tuple[Var, float]]


@dataclass
class Formulation:
    model: LinearModel
    index: Index
    n: dict[tuple[int, int], Var] = field(default_factory=dict)  # (class, option) -> items
    y: dict[int, Var] = field(default_factory=dict)
    z: dict[tuple[int, str], Var] = field(default_factory=dict)
    f: dict[int, Var] = field(default_factory=dict)
    m: dict[int, Var] = field(default_factory=dict)
    max_replicas: dict[int, int] = field(default_factory=dict)
    move_constant: float = 0.0  # migrations = move_constant + sum(move_terms)
    forced_moves: float = 0.0  # of which the input forces (running work that cannot stay)
    move_terms: Terms = field(default_factory=list)
    gpu_rows: dict[str, int] = field(default_factory=dict)  # capacity row name -> shape
    # Policies that add variables derived from the counts (fairness' t) register how
    # to compute them, so hints from concrete plans are complete.
    derived: list[Callable[[dict[int, float]], None]] = field(default_factory=list)
    level: Var | None = None  # a max-min policy's level variable (fairness' t)
    _class_vars: dict[int, list[Var]] = field(default_factory=dict)  # built on first use

    def class_vars(self, ci: int) -> list[Var]:
        """Every variable that belongs to class ``ci``."""
        if not self._class_vars:
            for (c, _o), v in self.n.items():
                self._class_vars.setdefault(c, []).append(v)
            for part in (self.y, self.f, self.m):
                for c, v in part.items():
                    self._class_vars.setdefault(c, []).append(v)
            for (c, _t), v in self.z.items():
                self._class_vars.setdefault(c, []).append(v)
        return self._class_vars.get(ci, [])

    def idle_classes(self, objective_vars: set[int]) -> frozenset[int]:
        """Variables of classes that no objective so far uses and that run nowhere now
        (so no migration or pin row sees them): a stage may hold them at 0, which
        cannot lower its optimum and keeps its model small."""
        fixed: set[int] = set()
        for c in self.index.classes:
            if c.current_count or c.current_replicas or c.forced_move:
                continue
            vs = self.class_vars(c.index)
            if not any(v.index in objective_vars for v in vs):
                fixed.update(v.index for v in vs)
        return frozenset(fixed)

    # -- objective building blocks (all to maximize) -------------------------------------

    def classes(self, tier: int | None = None) -> Iterable[WorkloadClass]:
        return (c for c in self.index.classes if tier is None or c.tier == tier)

    def coverage(self, tier: int | None = None) -> Terms:
        """Weighted count of running jobs plus weighted served fraction of services:
        a tier's demand is met before any lower tier's."""
        terms: Terms = []
        for c in self.classes(tier):
            if c.is_training:
                terms += [(self.n[c.index, o], c.weight) for o in range(len(c.options))]
            elif c.index in self.f:
                terms.append((self.f[c.index], c.weight))
        return terms

    def served(self) -> Terms:
        return [(self.f[c.index], c.weight) for c in self.classes() if c.index in self.f]

    def throughput(self) -> Terms:
        terms: Terms = []
        for c in self.classes():
            if c.is_training:
                terms += [(self.n[c.index, o], c.weight * opt.value) for o, opt in enumerate(c.options)]
        return terms + self.served()

    def cost(self) -> Terms:
        """Minus $/hour of the GPUs held."""
        terms: Terms = []
        for c in self.classes():
            for o, opt in enumerate(c.options):
                price = self.index.types[opt.gpu_type].cost_per_hour or 0.0
                if price:
                    terms.append((self.n[c.index, o], -price * opt.gpus))
        return terms

    def service_cost_cuts(self) -> int:
        """(12) with each type's $/GPU-hour: see :meth:`service_envelope_cuts`."""
        return self.service_envelope_cuts(lambda t: self.index.types[t].cost_per_hour or 0.0, "svccost")

    def service_gpu_cuts(self) -> int:
        """(12) with every GPU at 1: each service holds at least the GPUs of the whole
        replicas that serve its fraction on its thriftiest type. The LP otherwise serves a
        service with fractional replicas and gives the GPUs it saves to training: on the
        ``zonal`` family at 1k (400 services) the throughput bound was 28% above every
        plan any solver found. See :meth:`service_envelope_cuts` for the proof."""
        return self.service_envelope_cuts(lambda t: 1.0, "svcgpus")

    def service_envelope_cuts(self, price_of: Callable[[str], float], prefix: str) -> int:
        """Valid inequalities (12) that tie each service's priced GPUs (``price_of`` a
        GPU of each type: $/hour, or 1 to count GPUs) to its served fraction.

        The LP relaxation serves a fraction f_i of a service with fractional
        replicas at (per unit of f) the price of its cheapest type, while an
        integer plan pays for whole replicas, at least ``min_replicas`` of them:
        serving 8.8 req/s with 4.3 req/s replicas takes 3 of them, not 2.05. With
        only (1)-(10) the cost bound is therefore weak wherever a demand floor
        makes services run.

        For service i let T be its target, lo = max(1, min_replicas) and R its
        replica cap (``max_replicas``). An integer plan either does not run it
        (y_i = 0: no replicas, f_i = 0, cost 0) or runs k in [lo, R] replicas of
        one type t (constraints (8)), costing C = p_t g_t k (price per GPU-hour,
        GPUs per replica) and serving f_i <= min(1, k rps_t / T). So every integer
        point has (f_i, C) >= (in f: <=, in C: >=) one of the points
        P = {(0, 0)} + {(min(1, k rps_t / T), p_t g_t k)}. Let phi be the lower
        convex envelope of P: convex, phi(0) = 0, and non-decreasing (its first
        piece starts at (0, 0), the cheapest point, so every slope is >= 0).
        Then C >= phi(f_point) >= phi(f_i), since f_i <= f_point. phi is the
        maximum of the lines through its pieces, so each piece (C >= a + b f)
        is a valid inequality; together they say C_i >= phi(f_i).

        Only a few k per type are needed: for k <= T / rps_t the points lie on
        the ray from (0, 0) through the largest such k (kept: floor(T / rps_t),
        or R if smaller), so they are on or above the segment to it; for
        k >= T / rps_t the point is (1, p_t g_t k), above the one with the least
        such k (kept: ceil(T / rps_t), or lo if larger). So k in
        {lo, floor, ceil, R} inside [lo, R] give the same envelope.

        Each right-hand side is lowered by 1e-3 $/hour so that CP-SAT's integer
        scaling of the rows (``f`` is counted in thousandths) cannot cut off the
        integer points on the envelope. Returns the number of rows added.
        """
        added = 0
        for c in self.classes():
            if c.is_training or c.index not in self.f:
                continue
            spec = c.members[0].inference
            assert spec is not None
            lo, cap, target = max(1, spec.min_replicas), self.max_replicas[c.index], spec.target_rps
            cost_terms: Terms = []
            points: set[tuple[float, float]] = {(0.0, 0.0)}
            seen: set[str] = set()
            for o, opt in enumerate(c.options):
                price = price_of(opt.gpu_type)
                if price:
                    cost_terms.append((self.n[c.index, o], price * opt.gpus))
                if opt.gpu_type in seen:
                    continue
                seen.add(opt.gpu_type)
                ratio = target / opt.value
                for k in {lo, math.floor(ratio), math.ceil(ratio), cap}:
                    if lo <= k <= cap:
                        points.add((min(1.0, k / ratio), price * opt.gpus * k))
            hull = _lower_hull(sorted(points))
            for (x1, c1), (x2, c2) in itertools.pairwise(hull):
                slope = (c2 - c1) / (x2 - x1)
                if slope <= 0:
                    continue
                icpt = c1 - slope * x1
                self.model.add(
                    [*cost_terms, (self.f[c.index], -slope)],
                    Sense.GE,
                    icpt - 1e-3,
                    f"{prefix}[{c.members[0].id},{added}]",
                )
                added += 1
        return added

    def moves(self, penalty: float) -> tuple[Terms, float]:
        """``-penalty * migrations`` as terms and a constant."""
        return [(v, -penalty * a) for v, a in self.move_terms], -penalty * self.move_constant

    def set_floor(
        self, terms: Terms, constant: float, value: float, name: str, tolerance: float = 0.0
    ) -> float:
        """Constraint (11): keep a solved stage's objective, less ``tolerance``
        (relative) and a small slack for CP-SAT's integer scaling. Returns the floor."""
        floor = value - max(1e-5, tolerance) * max(1.0, abs(value))
        self.model.add(terms, Sense.GE, floor - constant, name)
        return floor

    # -- hints ----------------------------------------------------------------------------

    def hint(self, placements: Iterable[Placement]) -> dict[int, float]:
        """Variable values that describe concrete placements (e.g. a greedy plan)."""
        idx = self.index
        placements = list(placements)
        clock.charge(clock.PER_ITEM * (len(self.model.vars) + len(placements)))
        values: dict[int, float] = {v.index: 0.0 for v in self.model.vars if v.integer}
        for p in placements:
            ci = idx.workload_class.get(p.workload_id)
            if ci is None or not p.shards:
                continue
            c = idx.classes[ci]
            hosts = [idx.nodes[s.node_id] for s in p.shards]
            if c.is_training:
                for o, opt in enumerate(c.options):
                    spec_shape = c.members[0].training.shapes[opt.gang_shape] if opt.gang_shape >= 0 else None  # type: ignore[union-attr]
                    if spec_shape is None or spec_shape.gpus != p.gpus or opt.gpu_type != hosts[0].gpu_type:
                        continue
                    if opt.kind is OptionKind.STAY:
                        now = idx.current.get(p.workload_id)
                        same = now is not None and sorted((x.node_id, x.gpus) for x in now.shards) == sorted(
                            (x.node_id, x.gpus) for x in p.shards
                        )
                        if c.current_option == o and same:
                            values[self.n[ci, o].index] += 1
                            break
                        continue
                    if any(h.id not in idx.node_shape or idx.node_shape[h.id] != opt.shape for h in hosts):
                        continue
                    if opt.kind is OptionKind.SINGLE and len(hosts) == 1:
                        values[self.n[ci, o].index] += 1
                        break
                    if (
                        opt.kind is OptionKind.GANG
                        and len(hosts) == opt.nodes
                        and (
                            opt.scope == ("any",) or gang_fits_scope(idx.shapes[opt.shape], hosts, opt.scope)
                        )
                    ):
                        values[self.n[ci, o].index] += 1
                        break
            else:
                t = hosts[0].gpu_type
                for h in hosts:
                    for o, opt in enumerate(c.options):
                        if opt.shape == idx.node_shape.get(h.id) and (
                            opt.scope == ("any",) or scope_of_nodes([h], opt.scope[0]) == opt.scope
                        ):
                            values[self.n[ci, o].index] += 1
                            break
                if ci in self.y:
                    values[self.y[ci].index] = 1.0
                    if (ci, t) in self.z:
                        values[self.z[ci, t].index] = 1.0
        # Clip to bounds, then derive f and m from the counts.
        for v in self.model.vars:
            if v.index in values:
                values[v.index] = min(max(values[v.index], v.lb), v.ub)
        for c in self.index.classes:
            if c.index in self.f:
                spec = c.members[0].inference
                assert spec is not None
                served = sum(values[self.n[c.index, o].index] * opt.value for o, opt in enumerate(c.options))
                res = self.f[c.index].resolution
                values[self.f[c.index].index] = math.floor(min(1.0, served / spec.target_rps) * res) / res
                if c.index in self.m:
                    moved = any(
                        values[self.n[c.index, o].index] < cur for o, cur in c.current_replicas.items()
                    )
                    values[self.m[c.index].index] = 1.0 if moved else 0.0
        for fill in self.derived:
            fill(values)
        return values


def _service_max_replicas(c: WorkloadClass, idx: Index) -> int:
    spec = c.members[0].inference
    assert spec is not None
    if not c.options:
        return 0
    need = max(math.ceil(spec.target_rps / o.value - 1e-9) for o in c.options)
    r = max(need, spec.min_replicas, 1)
    if spec.max_replicas is not None:
        r = min(r, spec.max_replicas)
    room = sum(
        idx.shapes[s].count * (idx.shapes[s].gpus // g) for s, g in {(o.shape, o.gpus) for o in c.options}
    )
    return max(0, min(r, room))


def build_formulation(index: Index, max_migrations: int | None = None) -> Formulation:
    """Variables and constraints (1)-(10); objectives come from the policies."""
    model = LinearModel()
    form = Formulation(model=model, index=index)
    shapes = index.shapes
    problem: Problem = index.problem

    # Usage collected per shape / location / tenant as (var, coefficient) lists.
    gpu_use: dict[int, Terms] = defaultdict(list)
    cpu_use: dict[int, Terms] = defaultdict(list)
    mem_use: dict[int, Terms] = defaultdict(list)
    items_by_size: dict[int, list[tuple[Var, int]]] = defaultdict(list)  # shape -> (var, size)
    node_spread: list[tuple[Var, int, int]] = []  # (replica var, shape, per-node cap)
    gang_nodes: dict[int, Terms] = defaultdict(list)
    loc_use: dict[tuple[int, tuple[str, ...]], Terms] = defaultdict(list)
    tenant_use: dict[str, Terms] = defaultdict(list)
    tenant_type_use: dict[tuple[str, str], Terms] = defaultdict(list)

    def locations(scope: tuple[str, ...]) -> list[tuple[str, ...]]:
        if scope[0] == "domain":
            return [("domain", scope[1], scope[2]), ("zone", scope[1])]
        if scope[0] == "domains":
            return [("zone", scope[1]), scope]
        if scope[0] == "zone":
            return [("zone", scope[1])]
        return []

    for c in index.classes:
        if c.is_training:
            # Constraint (1): at most count_j members run.
            vars_c: Terms = []
            for o, opt in enumerate(c.options):
                v = model.int_var(0, c.count, f"n[{c.members[0].id},{o}]")
                form.n[c.index, o] = v
                vars_c.append((v, 1.0))
                tenant = c.members[0].tenant
                tenant_use[tenant].append((v, opt.gpus))
                tenant_type_use[tenant, opt.gpu_type].append((v, opt.gpus))
                if opt.kind is OptionKind.STAY:
                    continue
                s = shapes[opt.shape]
                if opt.kind is OptionKind.SINGLE:
                    gpu_use[s.index].append((v, opt.gpus))
                    cpu_use[s.index].append((v, opt.cpus))
                    mem_use[s.index].append((v, opt.memory_gib))
                    items_by_size[s.index].append((v, opt.gpus))
                else:
                    gpu_use[s.index].append((v, opt.nodes * s.gpus))
                    cpu_use[s.index].append((v, opt.nodes * s.cpus))
                    mem_use[s.index].append((v, opt.nodes * s.memory_gib))
                    gang_nodes[s.index].append((v, opt.nodes))
                    for loc in locations(opt.scope):
                        loc_use[s.index, loc].append((v, opt.nodes * s.gpus))
            model.add(vars_c, Sense.LE, c.count, f"count[{c.members[0].id}]")
            # Constraint (2): non-preemptible running members stay.
            if c.pinned and c.current_option is not None:
                model.add([(form.n[c.index, c.current_option], 1.0)], Sense.GE, c.count, f"pin[{c.index}]")
            # Constraint (10), training part.
            if c.current_count:
                form.move_constant += c.current_count
                stays_draining = (
                    c.current_option is not None and c.options[c.current_option].kind is OptionKind.STAY
                )
                if c.current_option is not None and not stays_draining:
                    form.move_terms.append((form.n[c.index, c.current_option], -1.0))
                else:
                    # Work that cannot stay, or sits on a draining node (staying there
                    # counts as its migration too): forced, never against the cap.
                    form.forced_moves += c.current_count
        else:
            spec = c.members[0].inference
            assert spec is not None
            wid = c.members[0].id
            r_max = _service_max_replicas(c, index)
            form.max_replicas[c.index] = r_max
            if r_max < max(1, spec.min_replicas):
                for o in range(len(c.options)):
                    form.n[c.index, o] = model.int_var(0, 0, f"r[{wid},{o}]")
                if c.current_count:
                    form.move_constant += 1
                    form.forced_moves += 1
                continue
            y = form.y[c.index] = model.bool_var(f"y[{wid}]")
            f = form.f[c.index] = model.num_var(0, 1, f"f[{wid}]")
            reps: Terms = []
            served: Terms = []
            for t in sorted({o.gpu_type for o in c.options}):
                form.z[c.index, t] = model.bool_var(f"z[{wid},{t}]")
                # Constraint (8): one type, only if the service runs.
                model.add([(form.z[c.index, t], 1.0), (y, -1.0)], Sense.LE, 0, f"zy[{wid},{t}]")
            model.add(
                [(form.z[c.index, t], 1.0) for t in {o.gpu_type for o in c.options}],
                Sense.LE,
                1,
                f"onetype[{wid}]",
            )
            by_unit: dict[tuple[str, tuple[str, ...]], Terms] = defaultdict(list)
            reps_by_type: dict[str, Terms] = defaultdict(list)
            for o, opt in enumerate(c.options):
                s = shapes[opt.shape]
                cap = r_max
                units_t = c.spread_units.get(opt.gpu_type, 0)
                per_node = math.ceil(r_max / units_t) if spec.spread.value == "node" and units_t else 0
                if per_node:
                    cap = min(cap, s.count * per_node)
                v = model.int_var(0, cap, f"r[{wid},{o}]")
                if per_node:
                    node_spread.append((v, s.index, per_node))
                form.n[c.index, o] = v
                reps.append((v, 1.0))
                served.append((v, opt.value))
                model.add([(v, 1.0), (form.z[c.index, opt.gpu_type], -cap)], Sense.LE, 0, f"rz[{wid},{o}]")
                gpu_use[s.index].append((v, opt.gpus))
                cpu_use[s.index].append((v, opt.cpus))
                mem_use[s.index].append((v, opt.memory_gib))
                items_by_size[s.index].append((v, opt.gpus))
                for loc in locations(opt.scope):
                    loc_use[s.index, loc].append((v, opt.gpus))
                tenant_use[c.members[0].tenant].append((v, opt.gpus))
                tenant_type_use[c.members[0].tenant, opt.gpu_type].append((v, opt.gpus))
                if opt.scope != ("any",):
                    by_unit[opt.gpu_type, opt.scope].append((v, 1.0))
                reps_by_type[opt.gpu_type].append((v, 1.0))
            lo = max(1, spec.min_replicas)
            model.add([*reps, (y, -lo)], Sense.GE, 0, f"minrep[{wid}]")
            model.add([*reps, (y, -r_max)], Sense.LE, 0, f"maxrep[{wid}]")
            model.add([(f, 1.0), (y, -1.0)], Sense.LE, 0, f"fy[{wid}]")
            model.add([(f, spec.target_rps)] + [(v, -a) for v, a in served], Sense.LE, 0, f"served[{wid}]")
            # Constraint (9): spread over zones / domains.
            for (t, unit), terms in sorted(by_unit.items()):
                units = c.spread_units.get(t, 0)
                if units > 1:
                    model.add(
                        [(v, units * a) for v, a in terms] + [(v, -a) for v, a in reps_by_type[t]],
                        Sense.LE,
                        units - 1,
                        f"spread[{wid},{t},{'/'.join(unit)}]",
                    )
            # Constraint (10), service part.
            if c.forced_move:
                form.move_constant += 1
                form.forced_moves += 1
            elif c.current_replicas:
                m = form.m[c.index] = model.bool_var(f"m[{wid}]")
                form.move_terms.append((m, 1.0))
                for o, cur in sorted(c.current_replicas.items()):
                    model.add([(m, cur), (form.n[c.index, o], 1.0)], Sense.GE, cur, f"moved[{wid},{o}]")

    for s in shapes:
        # Constraint (3): GPUs per shape (its dual is the shadow price of a GPU).
        if gpu_use[s.index]:
            name = f"gpu[{s.index}]"
            model.add(gpu_use[s.index], Sense.LE, s.gpus * s.count, name)
            form.gpu_rows[name] = s.index
        # Constraint (4): sizes that do not divide the node.
        sizes = sorted({g for _, g in items_by_size[s.index] if s.gpus % g})
        for v_size in sizes:
            per = s.gpus // v_size
            terms = [(v, 1.0) for v, g in items_by_size[s.index] if g >= v_size]
            terms += [(v, per * a) for v, a in gang_nodes[s.index]]
            model.add(terms, Sense.LE, per * s.count, f"pack[{s.index},{v_size}]")
        # Constraint (5): host CPUs and memory where tracked.
        if s.cpus > 0 and any(a for _, a in cpu_use[s.index]):
            model.add(cpu_use[s.index], Sense.LE, s.cpus * s.count, f"cpu[{s.index}]")
        if s.memory_gib > 0 and any(a for _, a in mem_use[s.index]):
            model.add(mem_use[s.index], Sense.LE, s.memory_gib * s.count, f"mem[{s.index}]")
    # Constraint (9b): node-spread replicas need distinct nodes that full-node items
    # (jobs as large as the node, gangs) leave free.
    for v, si, per_node in node_spread:
        s = shapes[si]
        full = [(x, per_node * 1.0) for x, g in items_by_size[si] if g >= s.gpus and x is not v]
        full += [(x, per_node * a) for x, a in gang_nodes[si]]
        if full:
            model.add([(v, 1.0), *full], Sense.LE, per_node * s.count, f"nodespread[{v.name}]")
    # Constraint (6): per location.
    for (si, loc), terms in sorted(loc_use.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        s = shapes[si]
        if loc[0] == "domains":
            # Gangs in interchangeable domains (same zone, same size): whole nodes,
            # and per gang size k, at most floor(size / k) gangs in one domain.
            size = int(loc[2])
            count = sum(1 for (z, _d), c in s.by_domain.items() if z == loc[1] and c == size)
            model.add(terms, Sense.LE, s.gpus * size * count, f"loc[{si},{'/'.join(loc)}]")
            gang_vars = [(v, round(a / s.gpus)) for v, a in terms]
            for k in sorted({k for _, k in gang_vars}):
                if size % k:
                    model.add(
                        [(v, 1.0) for v, kk in gang_vars if kk >= k],
                        Sense.LE,
                        count * (size // k),
                        f"gangpack[{si},{'/'.join(loc)},{k}]",
                    )
            continue
        nodes = s.by_domain.get((loc[1], loc[2]), 0) if loc[0] == "domain" else s.by_zone.get(loc[1], 0)
        model.add(terms, Sense.LE, s.gpus * nodes, f"loc[{si},{'/'.join(loc)}]")
    # Constraint (7): quotas.
    for ten in problem.tenants:
        if ten.max_gpus is not None and tenant_use.get(ten.name):
            model.add(tenant_use[ten.name], Sense.LE, ten.max_gpus, f"quota[{ten.name}]")
        for t, cap in sorted(ten.max_gpus_per_type.items()):
            if tenant_type_use.get((ten.name, t)):
                model.add(tenant_type_use[ten.name, t], Sense.LE, cap, f"quota[{ten.name},{t}]")
    # Constraint (10): the migration cap (moves the input forces do not count against it).
    if max_migrations is not None and form.move_terms:
        allowed = max(float(max_migrations), form.forced_moves)
        model.add(form.move_terms, Sense.LE, allowed - form.move_constant, "migrations")
    # Valid inequalities (12) on GPUs: whole replicas for the fraction served.
    form.service_gpu_cuts()
    return form


@dataclass
class _Service:
    """A service being rounded: its type, options there, LP mass per option, replicas."""

    c: WorkloadClass
    t: str
    mine: list[int]
    raw: dict[int, float]
    low: int  # replicas rounded down
    high: int  # rounded up (capped)
    least: int  # its minimum
    gpus: int
    reps: int = 0
    mass: dict[str, float] = field(default_factory=dict)  # the LP's replicas per type
    served_rps: float = 0.0  # the requests/s the LP served

    def served(self, r: int) -> float:
        spec = self.c.members[0].inference
        assert spec is not None
        return self.c.weight * min(1.0, r * self.c.options[self.mine[0]].value / spec.target_rps)


def _on_type(
    form: Formulation,
    c: WorkloadClass,
    t: str,
    values: tuple[float, ...],
    served: float,
    mass: dict[str, float],
) -> _Service:
    """Service ``c`` rounded onto type ``t``: the replicas there that serve what the
    LP served (``served`` requests/s), to be spread like the LP's replicas of that
    type (evenly over its options where the LP put none there)."""
    mine = [o for o, opt in enumerate(c.options) if opt.gpu_type == t]
    spec = c.members[0].inference
    assert spec is not None
    exact = served / c.options[mine[0]].value
    cap = form.max_replicas[c.index]
    return _Service(
        c,
        t,
        mine,
        {o: values[form.n[c.index, o].index] for o in mine},
        min(cap, math.floor(exact + 1e-6)),
        min(cap, math.ceil(exact - 1e-6)),
        max(1, spec.min_replicas),
        c.options[mine[0]].gpus,
        mass=mass,
        served_rps=served,
    )


def _moved_off_full_types(
    form: Formulation, values: tuple[float, ...], todo: list[_Service], left: dict[str, float]
) -> list[_Service]:
    """Where the services rounded onto a type need more of its GPUs than the jobs
    leave (``left`` < 0), services move whole to another of their types that has
    the room for what the LP served there, before any replicas are taken back: the
    LP split them over types, and taking replicas back serves less (measured on the
    zonal family at 1k: the LP's 400 services rounded to 342 served on the slow
    type, and the plan kept the greedy seed, 23% below its bound). The services the
    LP put least on the full type move first, each to the type where the LP put
    most of it that has room (then the fewest GPUs)."""
    out: list[_Service] = []
    for sv in sorted(todo, key=lambda x: (x.mass[x.t] / max(1e-12, sum(x.mass.values())), x.c.index)):
        if left[sv.t] >= 0 or sv.reps == 0:
            out.append(sv)
            continue
        best: _Service | None = None
        for u in sorted(sv.mass, key=lambda u: (-sv.mass[u], u)):
            if u == sv.t:
                continue
            alt = _on_type(form, sv.c, u, values, sv.served_rps, sv.mass)
            alt.reps = max(alt.low, alt.least)
            if alt.reps <= alt.high and alt.reps * alt.gpus <= left[u]:
                best = alt
                break
        if best is None:
            out.append(sv)
            continue
        left[sv.t] += sv.reps * sv.gpus
        left[best.t] -= best.reps * best.gpus
        out.append(best)
    return sorted(out, key=lambda x: x.c.index)


def _jobs_give_way(
    form: Formulation, counts: dict[tuple[int, int], int], todo: list[_Service], left: dict[str, float]
) -> None:
    """On each type whose GPUs the rounded jobs and services overflow (``left`` < 0),
    jobs of tiers below the services' leave (lowest tier first, then least value per
    GPU), one member at a time, until the type holds the rest."""
    idx = form.index
    top = min((sv.c.tier for sv in todo if sv.reps), default=None)
    if top is None:
        return
    for t in sorted(u for u, v in left.items() if v < 0):
        jobs = [
            (c.tier, c.options[o].value / _held_gpus(form, c.options[o]), c.index, o)
            for (ci, o), k in counts.items()
            if k > 0 and (c := idx.classes[ci]).is_training and c.options[o].gpu_type == t and c.tier < top
        ]
        for _tier, _value, ci, o in sorted(jobs):
            while left[t] < 0 and counts.get((ci, o), 0) > 0:
                counts[ci, o] -= 1
                left[t] += _held_gpus(form, idx.classes[ci].options[o])
            if counts.get((ci, o)) == 0:
                del counts[ci, o]
            if left[t] >= 0:
                break


def _held_gpus(form: Formulation, opt: Option) -> int:
    """The GPUs one member running as ``opt`` holds (a gang holds whole nodes)."""
    if opt.kind is OptionKind.GANG:
        return opt.nodes * form.index.shapes[opt.shape].gpus
    return opt.gpus


def round_down(
    form: Formulation, values: tuple[float, ...], services: Literal["up", "down", "fit", "first"] = "up"
) -> dict[tuple[int, int], int]:
    """Counts per (class, option) from an LP solution: jobs rounded down (so the
    capacity rows still hold); a service runs on the type where the LP put most
    of its replicas, with the replicas that serve what the LP served, rounded
    ``services``: "up" (keeps demand, but can overflow a full cluster), "down",
    or "fit": down, then up (or, below its minimum, to its minimum) where the
    type's GPUs left by the jobs and the other services allow, most served
    demand per GPU first (and, on a type the roundings down already overflow,
    replicas taken back, least served demand per GPU first), or "first": up, as
    services come before the jobs of lower tiers (strict priority), and where a
    type's GPUs do not hold both, services move to another type with room, then
    jobs of the lowest tier (least value per GPU first) give way. A service below
    its minimum does not run. Packing and greedy completion do the rest."""
    idx = form.index
    counts: dict[tuple[int, int], int] = {}
    left: dict[str, float] = defaultdict(float)  # GPUs per type the counts leave free
    for s in idx.shapes:
        left[s.gpu_type] += s.gpus * s.count
    for c in idx.classes:
        if not c.is_training:
            continue
        # Round the class's total (LP values sit on floors that carry a small slack:
        # a total of 1 - 1e-5 is 1), then split it over the options, whole parts
        # first, then the largest remainders.
        lp_n = [values[form.n[c.index, o].index] for o in range(len(c.options))]
        total = math.floor(sum(lp_n) + 1e-3)
        whole = [math.floor(x + 1e-6) for x in lp_n]
        for o in sorted(range(len(lp_n)), key=lambda o: (whole[o] - lp_n[o], o)):
            if sum(whole) >= total:
                break
            if lp_n[o] - whole[o] > 1e-6:
                whole[o] += 1
        for o, k in enumerate(whole):
            if k > 0:
                counts[c.index, o] = k
                opt = c.options[o]
                if opt.kind is OptionKind.SINGLE:
                    left[opt.gpu_type] -= k * opt.gpus
                elif opt.kind is OptionKind.GANG:
                    left[opt.gpu_type] -= k * opt.nodes * idx.shapes[opt.shape].gpus

    todo: list[_Service] = []
    for c in idx.classes:
        if c.is_training or c.index not in form.y:
            continue
        spec = c.members[0].inference
        assert spec is not None
        mass: dict[str, float] = defaultdict(float)
        for o, opt in enumerate(c.options):
            mass[opt.gpu_type] += values[form.n[c.index, o].index]
        if not mass:
            continue
        t = max(sorted(mass), key=lambda k: mass[k])
        served = sum(values[form.n[c.index, o].index] * opt.value for o, opt in enumerate(c.options))
        sv = _on_type(form, c, t, values, served, dict(mass))
        sv.reps = sv.high if services in ("up", "first") else sv.low
        todo.append(sv)
    if services == "first":
        for sv in todo:
            sv.reps = sv.reps if sv.reps >= sv.least else 0
            left[sv.t] -= sv.reps * sv.gpus
        todo = _moved_off_full_types(form, values, todo, left)
        _jobs_give_way(form, counts, todo, left)
    if services == "fit":
        for sv in todo:
            sv.reps = sv.reps if sv.reps >= sv.least else 0
            left[sv.t] -= sv.reps * sv.gpus
        todo = _moved_off_full_types(form, values, todo, left)

        def step(sv: _Service, down: bool) -> tuple[float, int]:
            """Served demand and replicas one step changes (down: below the minimum, all)."""
            if down:
                k = 1 if sv.reps > sv.least else sv.reps
                return sv.served(sv.reps) - sv.served(sv.reps - k), k
            k = 1 if sv.reps else sv.least
            return sv.served(sv.reps + k) - sv.served(sv.reps), k

        for t in sorted({sv.t for sv in todo}):
            on_t = [sv for sv in todo if sv.t == t]
            while left[t] < 0:
                held = [sv for sv in on_t if sv.reps > 0]
                if not held:
                    break
                sv = min(held, key=lambda x: (step(x, True)[0] / (step(x, True)[1] * x.gpus), x.c.index))
                k = step(sv, True)[1]
                sv.reps -= k
                left[t] += k * sv.gpus
        ups = [sv for sv in todo if sv.reps < sv.high and sv.high >= sv.least]
        ups.sort(key=lambda x: (-step(x, False)[0] / (step(x, False)[1] * x.gpus), x.c.index))
        for sv in ups:
            k = step(sv, False)[1]
            if sv.reps + k <= sv.high and left[sv.t] >= k * sv.gpus:
                sv.reps += k
                left[sv.t] -= k * sv.gpus
    for sv in todo:
        if sv.reps < sv.least:
            continue
        mass_t = sum(sv.raw.values())
        share = {o: (sv.raw[o] / mass_t if mass_t > 0 else 1.0 / len(sv.mine)) * sv.reps for o in sv.mine}
        reps = {o: math.floor(x + 1e-6) for o, x in share.items()}
        for o in sorted(sv.mine, key=lambda o: (reps[o] - share[o], o)):  # largest fractions first
            if sum(reps.values()) >= sv.reps:
                break
            reps[o] += 1
        counts.update({(sv.c.index, o): k for o, k in reps.items() if k > 0})
    return counts


def option_values(form: Formulation, values: tuple[float, ...]) -> Mapping[tuple[int, int], int]:
    """Integer counts per (class, option) from a solution."""
    return {key: round(values[v.index]) for key, v in form.n.items() if values[v.index] > 0.5}


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of points sorted by x (then y), left to right (Andrew's
    monotone chain); of points with equal x only the lowest can be on it."""
    hull: list[tuple[float, float]] = []
    for p in points:
        if hull and abs(hull[-1][0] - p[0]) <= 1e-12:
            # The same x up to rounding (k / (T / rps) of two types can differ in the
            # last bit): only the lower of the two can be on the hull.
            if p[1] >= hull[-1][1]:
                continue
            hull.pop()
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point unless it lies strictly below the line from hull[-2] to p.
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull
