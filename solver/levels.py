"""Max-min (``fairness``) at the level of GPU types: a bound and a plan.

The max-min stage's LP (t <= rho/w for every option used, with big-M indicators)
bounds the minimum weakly (0.38 at 10k workloads where plans reach 0.04), and
the level bisection on the whole aggregated model (``search.level_bound``)
needs about 11 s of LPs at that size. Both questions can be asked of a much
smaller model, with one variable per (class, GPU type, GPUs) instead of per
node shape and failure unit:

**Bound** (:func:`type_level_model`). Variables: n_{c,t,g} in [0, count_c] for
each distinct (type, GPUs) a training class can run as, with
sum_{t,g} n_{c,t,g} <= count_c; for each service, f_i in [0, 1] and replicas
r_{i,t} >= 0 with target_i f_i <= sum_t rps_{i,t} r_{i,t}; per GPU type, the GPUs
they take <= the GPUs of its ready nodes; per priority tier, its coverage
(sum w n + sum w f) >= the floor that the tier's stage set, and for every tier
but the lowest, sum w n over its jobs >= what the coverage stages' plan runs of
them (:func:`job_floors`: strict priority inside the max-min, see
``solver.policies.fairness``). Every solution of
the aggregated model's LP maps onto this one (sum its per-shape and per-scope
counts; its GPU rows per shape add up to these; its floors are these), so it is
a relaxation: if it is infeasible with everything of value below tau held at 0
(an option of rho/w < tau; a service of 1/w < tau), so is the aggregated LP,
and no plan has a minimum >= tau. The pipeline bisects on tau with it first
(measured at 10k: about 10 LPs in 0.4 s, one warm GLOP model; without the job
floors it proved the same 0.1625 that the bisection on the whole model proved
in about 11 s; with them 0.1196, which the plan reaches), then, with what time
is left, on the whole model below that.

**Plan** (:func:`level_plan`). The same kind of model for the training jobs of
a plan, the rest where it is: the services and the jobs that run now are fixed
(the coverage stages packed the services' spread replicas; moving them lost
coverage in every try at 10k), and each class's jobs that do not run now may
run as any (type, GPUs) again, as many of them as the tiers' coverage floors
need (they count the jobs, by weight, not which ones). The rows are each
tier's coverage floor and job floor (as above), the GPUs free per type in
chunks of each item size (sum over items of v GPUs or more of their GPUs <=
sum over nodes of v * floor(free / v), where every such size is a multiple of
v) and the tenant quotas. The highest level tau at which the LP is
feasible is found by bisection; the LP there, maximizing coverage (then
throughput, then what stays where it is), is rounded (a class's total up, its
choices by largest remainder) and packed on the nodes, highest priority first
(a lower tier absorbs what packing loses), multi-node gangs first, then the
largest items, the jobs the plan placed before the others; a job whose choice
does not fit takes its best option at or above tau that does, else its best
option that does. If a floor is short, the same at the level 0.85 tau (whose
LP leaves coverage to spare). Measured on the 10k instance: tau = 0.119 for the
training jobs, every floor kept in 1 s; the minimum then is a service's (0.048,
was 0.037), which ``raise_minimum`` lifts where it can make room.

Pure and typed; the LPs go through a :class:`~solver.backends.Backend`.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Mapping

from solver import clock
from solver.aggregate import Index, Option, OptionKind, WorkloadClass
from solver.backends import Backend
from solver.linear import LinearModel, Sense, SolveStatus, Var
from solver.model import Placement, Workload
from solver.packing import Ledger, served_fraction

__all__ = ["bisect_levels", "job_floors", "level_plan", "type_level_model"]


def _choices(c: WorkloadClass) -> dict[tuple[str, int], list[Option]]:
    """A training class's options by (GPU type, GPUs of one item)."""
    out: dict[tuple[str, int], list[Option]] = defaultdict(list)
    for o in c.options:
        if o.kind in (OptionKind.SINGLE, OptionKind.GANG):
            out[o.gpu_type, o.gpus].append(o)
    return out


def type_level_model(
    index: Index, tier_floors: Mapping[int, float], job_floors: Mapping[int, float] | None = None
) -> tuple[LinearModel, list[tuple[float, list[int]]]]:
    """The relaxation above (no objective) and its holds: (v, variables that a plan
    whose minimum is >= tau holds at 0 for every tau > v). ``job_floors``: per
    tier, the least Σ w over its running training jobs (see ``job_floors``)."""
    lp = LinearModel()
    holds: list[tuple[float, list[int]]] = []
    gpus: dict[str, list[tuple[Var, float]]] = defaultdict(list)
    coverage: dict[int, list[tuple[Var, float]]] = defaultdict(list)
    jobs: dict[int, list[tuple[Var, float]]] = defaultdict(list)
    capacity: dict[str, int] = defaultdict(int)
    for shape in index.shapes:
        capacity[shape.gpu_type] += shape.gpus * len(shape.node_ids)
    for c in index.classes:
        if c.is_training:
            own: list[Var] = []
            for (t, g), opts in sorted(_choices(c).items()):
                n = lp.num_var(0.0, float(c.count), f"n[{c.index},{t},{g}]")
                own.append(n)
                gpus[t].append((n, float(g)))
                coverage[c.tier].append((n, c.weight))
                jobs[c.tier].append((n, c.weight))
                holds.append((max(o.value for o in opts) / c.weight, [n.index]))
            if own:
                lp.add([(n, 1.0) for n in own], Sense.LE, float(c.count), f"count[{c.index}]")
            continue
        spec = c.members[0].inference
        if spec is None:
            continue
        f = lp.num_var(0.0, 1.0, f"f[{c.index}]")
        held = [f.index]
        served: list[tuple[Var, float]] = [(f, spec.target_rps)]
        for t in sorted({o.gpu_type for o in c.options}):
            rps = spec.replica_rps.get(t, 0.0)
            if rps <= 0:
                continue
            most = max(1, spec.min_replicas, math.ceil(spec.target_rps / rps))
            r = lp.num_var(0.0, float(most), f"r[{c.index},{t}]")
            held.append(r.index)
            served.append((r, -rps))
            gpus[t].append((r, float(spec.gpus_per_replica[t])))
        lp.add(served, Sense.LE, 0.0, f"serve[{c.index}]")
        coverage[c.tier].append((f, c.weight))
        holds.append((1.0 / c.weight, held))
    for t, terms in sorted(gpus.items()):
        lp.add(terms, Sense.LE, float(capacity.get(t, 0)), f"gpus[{t}]")
    for tier, floor in sorted(tier_floors.items()):
        lp.add(coverage.get(tier, []), Sense.GE, floor, f"floor[{tier}]")
    for tier, floor in sorted((job_floors or {}).items()):
        lp.add(jobs.get(tier, []), Sense.GE, floor, f"jobs[{tier}]")
    return lp, holds


def bisect_levels(lo: int, hi: int, feasible: Callable[[int], bool | None]) -> tuple[int, int]:
    """Bisection over level indices between ``lo`` (feasible, or -1) and ``hi``
    (infeasible, or past the last): the highest index found feasible and the
    lowest found infeasible. Feasibility is monotone (a higher level holds more at
    0); an answer of None (out of time) stops the search where it is."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        answer = feasible(mid)
        if answer is None:
            break
        if answer:
            lo = mid
        else:
            hi = mid
    return lo, hi


def job_floors(index: Index, placed: Mapping[str, Placement]) -> dict[int, float]:
    """Per priority tier but the lowest, Σ w over the training jobs that ``placed``
    runs: what the max-min keeps of each tier's jobs (see above)."""
    out: dict[int, float] = {}
    lowest = min(index.tiers, default=0)
    for wid in placed:
        w = index.workloads[wid]
        c = index.classes[index.workload_class[wid]]
        if w.training is not None and c.tier != lowest:
            out[c.tier] = out.get(c.tier, 0.0) + c.weight
    return out


def level_plan(
    index: Index,
    placed: Mapping[str, Placement],
    tier_floors: Mapping[int, float],
    resolution: int,
    backend: Backend,
    deadline: float,
    jobs_floors: Mapping[int, float] | None = None,
) -> dict[str, Placement] | None:
    """Every training job that does not run now chosen again at the highest level
    the LP over (class, type, GPUs) allows, keeping each tier's coverage floor and
    ``jobs_floors`` (see above); None if no plan that keeps the floors was found
    in time."""
    jobs_floors = jobs_floors or {}
    if clock.now() > deadline:
        return None

    def frac(w: Workload, p: Placement) -> float:
        return served_fraction(w, p.gpu_type or "", len(p.shards), resolution)

    movable: dict[int, list[Workload]] = defaultdict(list)
    for w in index.problem.workloads:
        if w.training is not None and w.id not in index.current and w.id in index.workload_class:
            movable[index.workload_class[w.id]].append(w)
    moving = {w.id for ws in movable.values() for w in ws}
    if not moving:
        return None

    def fixed_ledger() -> Ledger:
        return Ledger.holding(index, placed, moving)

    fixed = fixed_ledger()
    fixed_cover: dict[int, float] = defaultdict(float)
    fixed_jobs: dict[int, float] = defaultdict(float)
    for wid, p in placed.items():
        if wid not in moving:
            w = index.workloads[wid]
            c = index.classes[index.workload_class[wid]]
            fixed_cover[c.tier] += c.weight * (frac(w, p) if w.inference is not None else 1.0)
            if w.inference is None:
                fixed_jobs[c.tier] += c.weight
    free: dict[str, list[int]] = defaultdict(list)
    for shape in index.shapes:
        for nid in shape.node_ids:
            if nid not in fixed.exclusive and fixed.free[nid].gpus > 0:
                free[shape.gpu_type].append(fixed.free[nid].gpus)

    lp = LinearModel()
    columns: list[tuple[Var, float]] = []  # (n, rho / w)
    job_cols: dict[int, list[tuple[tuple[str, int], Var]]] = defaultdict(list)
    items: dict[tuple[str, int], list[tuple[Var, float]]] = defaultdict(list)  # (type, item GPUs)
    cover: dict[int, list[tuple[Var, float]]] = defaultdict(list)
    tenants: dict[str, list[tuple[Var, float]]] = defaultdict(list)
    tenant_types: dict[tuple[str, str], list[tuple[Var, float]]] = defaultdict(list)
    value: list[tuple[Var, float]] = []
    stay: list[tuple[Var, float]] = []  # runs as the plan has it (fewer moves on ties)
    for ci, members in sorted(movable.items()):
        c = index.classes[ci]
        own: list[Var] = []
        now_as: dict[tuple[str, int], int] = defaultdict(int)
        for w in members:
            held = placed.get(w.id)
            if held is not None and held.gpu_type is not None:
                now_as[held.gpu_type, held.gpus] += 1
        for (t, g), opts in sorted(_choices(c).items()):
            if not free.get(t):
                continue
            rho = max(o.value for o in opts)
            n = lp.num_var(0.0, float(len(members)), f"n[{ci},{t},{g}]")
            own.append(n)
            columns.append((n, rho / c.weight))
            job_cols[ci].append(((t, g), n))
            items[t, g].append((n, float(g)))
            cover[c.tier].append((n, c.weight))
            value.append((n, c.weight * rho))
            if now_as.get((t, g)):
                stay.append((n, now_as[t, g] / len(members)))
            # A class's members share its tenant (the class signature includes it).
            tenants[members[0].tenant].append((n, float(g)))
            tenant_types[members[0].tenant, t].append((n, float(g)))
        if own:
            lp.add([(n, 1.0) for n in own], Sense.LE, float(len(members)), f"count[{ci}]")
    # GPUs per type, and in chunks: items of v GPUs or more (a gang over whole nodes
    # counts as items of a node's size) fit in sum over nodes of v * floor(free / v)
    # when every such size is a multiple of v (sizes 1, 2, 4, 8 on 8-GPU nodes).
    sizes: dict[str, set[int]] = defaultdict(set)
    for t, g in items:
        sizes[t].add(g)
    smallest_node = {t: min(s.gpus for s in index.shapes if s.gpu_type == t) for t in sizes}
    for t, present in sorted(sizes.items()):
        chunk = {g: min(g, smallest_node[t]) for g in present}
        for v in sorted({1, *chunk.values()}):
            if any(c >= v and c % v for c in chunk.values()):
                continue
            terms = [xa for (tt, g), xs in items.items() if tt == t and chunk[g] >= v for xa in xs]
            room = sum(v * (f // v) for f in free[t])
            lp.add(terms, Sense.LE, float(room), f"gpus[{t},{v}]")
    for tier, floor in sorted(tier_floors.items()):
        lp.add(cover.get(tier, []), Sense.GE, floor - fixed_cover.get(tier, 0.0), f"floor[{tier}]")
    for tier, floor in sorted(jobs_floors.items()):
        lp.add(cover.get(tier, []), Sense.GE, floor - fixed_jobs.get(tier, 0.0), f"jobs[{tier}]")
    for tenant, lim in fixed.quota.limits.items():
        if lim.max_gpus is not None and tenants.get(tenant):
            left = float(lim.max_gpus - fixed.quota.used[tenant])
            lp.add(tenants[tenant], Sense.LE, left, f"quota[{tenant}]")
        for t, cap in lim.max_gpus_per_type.items():
            if tenant_types.get((tenant, t)):
                left = float(cap - fixed.quota.used_type[tenant, t])
                lp.add(tenant_types[tenant, t], Sense.LE, left, f"quota[{tenant},{t}]")

    levels = sorted({v for _n, v in columns})

    def below(i: int) -> frozenset[int]:
        return frozenset(n.index for n, v in columns if i >= 0 and v < levels[i])

    def feasible(i: int) -> bool | None:
        left = deadline - clock.now()
        if left <= 0.05:
            return None
        sol = backend.solve_lp(lp, time_limit_s=min(left, 60.0), fixed_zero=below(i))
        if sol.status is SolveStatus.INFEASIBLE:
            return False
        return True if sol.status is SolveStatus.OPTIMAL else None

    lo, _hi = bisect_levels(-1, len(levels), feasible)
    # Round and pack at the highest level, then lower (the LP at the highest level
    # is tight on coverage, so what packing loses breaks a floor; below it the LP,
    # maximizing coverage, leaves slack for that): the first plan that keeps every
    # floor.
    all_cover = [(n, a) for terms in cover.values() for n, a in terms]
    lp.maximize([*all_cover, *((n, 1e-3 * a) for n, a in value), *((n, 1e-4 * a) for n, a in stay)])
    tries = [lo]
    if lo >= 0:
        i = bisect.bisect_right(levels, 0.85 * levels[lo]) - 1
        if i != lo:
            tries.append(i)
    for n_try, i in enumerate(tries):
        left = deadline - clock.now()
        if left <= 0.05:
            return None
        sol = backend.solve_lp(lp, time_limit_s=min(left, 60.0), fixed_zero=below(i))
        if sol.status is not SolveStatus.OPTIMAL:
            continue
        tau = levels[i] if i >= 0 else 0.0
        ledger = fixed if n_try == 0 else fixed_ledger()
        out = _round_and_pack(index, placed, movable, job_cols, sol.values, tau, ledger, deadline)
        if out is None:
            return None
        got, got_jobs = dict(fixed_cover), dict(fixed_jobs)
        for wid in out:
            if wid in moving:
                c = index.classes[index.workload_class[wid]]
                got[c.tier] = got.get(c.tier, 0.0) + c.weight
                got_jobs[c.tier] = got_jobs.get(c.tier, 0.0) + c.weight
        if all(got.get(t, 0.0) >= f - 1e-9 * max(1.0, abs(f)) for t, f in tier_floors.items()) and all(
            got_jobs.get(t, 0.0) >= f - 1e-9 * max(1.0, abs(f)) for t, f in jobs_floors.items()
        ):
            return out
    return None


def _round_and_pack(
    index: Index,
    placed: Mapping[str, Placement],
    movable: Mapping[int, list[Workload]],
    job_cols: Mapping[int, list[tuple[tuple[str, int], Var]]],
    values: tuple[float, ...],
    tau: float,
    ledger: Ledger,
    deadline: float,
) -> dict[str, Placement] | None:
    """The LP's counts rounded (a class's total up, its choices by largest
    remainder) and packed, highest priority first (a lower tier absorbs what
    packing loses), in a tier multi-node gangs then the largest items; the
    members that the plan placed come first. A job whose choice does not fit
    takes its best option at or above ``tau`` that does, else its best option
    that does, else it is left out. None if out of time."""
    moving = {w.id for ws in movable.values() for w in ws}
    out = {wid: p for wid, p in placed.items() if wid not in moving}
    jobs: list[tuple[Workload, tuple[str, int]]] = []
    for ci, members in movable.items():
        cols = [(ch, values[n.index]) for ch, n in job_cols.get(ci, [])]
        total = min(len(members), math.ceil(sum(x for _ch, x in cols) - 1e-6))
        counts = {ch: math.floor(x + 1e-6) for ch, x in cols}
        rest = total - sum(counts.values())
        for ch, _x in sorted(cols, key=lambda cx: -(cx[1] - math.floor(cx[1] + 1e-6))):
            if rest <= 0:
                break
            counts[ch] += 1
            rest -= 1
        chosen = [ch for ch, k in sorted(counts.items(), key=lambda kv: (-kv[0][1], kv[0])) for _ in range(k)]
        first = sorted(members, key=lambda w: (w.id not in placed, w.id))
        jobs += list(zip(first, chosen[: len(first)], strict=False))
    node_gpus = {s.gpu_type: s.gpus for s in sorted(index.shapes, key=lambda s: s.gpus)}

    def order(wc: tuple[Workload, tuple[str, int]]) -> tuple[int, bool, int, str]:
        w, (t, g) = wc
        tier_rank = index.tiers.index(index.classes[index.workload_class[w.id]].tier)
        return (tier_rank, g <= node_gpus.get(t, 1), -g, w.id)

    for w, (t, g) in sorted(jobs, key=order):
        if clock.now() > deadline:
            return None
        got = _place_job(index, ledger, w, t, g, tau)
        if got is not None:
            out[w.id] = got
    return out


def _place_job(index: Index, ledger: Ledger, w: Workload, t: str, g: int, tau: float) -> Placement | None:
    """Job ``w`` as its choice (t, g), else its best option at or above ``tau``
    that fits, else its best option that fits (None if nothing fits)."""
    c = index.classes[index.workload_class[w.id]]
    by_choice = _choices(c)
    ranked = sorted(by_choice.items(), key=lambda kv: -max(o.value for o in kv[1]))
    others = [(max(o.value for o in opts) / c.weight, opts) for ch, opts in ranked if ch != (t, g)]
    attempts = [by_choice.get((t, g), [])]
    attempts += [opts for v, opts in others if v >= tau] + [opts for v, opts in others if v < tau]
    for opts in attempts:
        for o in opts:
            got = ledger.try_training(w, o)
            if got is not None:
                return got
    return None
