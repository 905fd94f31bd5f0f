"""Service reassignment for ``cost``: choose every movable service's type and
replicas again, by an LP over their whole-replica choices.

After the coverage and demand stages, the ``cost`` stage only has to keep the
floors on weighted served demand (Σ w·f per tier, and over all services); it
may serve that demand with other services, on other types. The pipeline's LP
of the cost stage does this, but over the aggregated model, whose basic
solutions split many services over types and node shapes, so its rounding
keeps little of it; the exchange search (``solver.exchange``) follows it one
service at a time and stops where the cheap types are full (measured at 10k
workloads: the LP served the demand with about 550 fewer h100/h200 GPUs than
the plan, by moving services between l40s and h100/h200, a chain of three
changes that no single exchange makes).

Here the training jobs and the services that may not move stay as they are,
and the movable services are chosen again at once, by a small LP whose columns
are whole choices: service i on GPU type t with k replicas, x_{i,t,k} >= 0,

    sum_{t,k} x_{i,t,k} <= 1                                 for each service i
    sum_{i,t,k} gain_j(i) f_i(t,k) x_{i,t,k} >= (what the movable services serve
        in floored stage j now) - (the plan's slack above that floor)
    sum_{(i,k): g_{i,t} >= v} g_{i,t} k x_{i,t,k} <= sum over free nodes of type t
        of v * floor(free GPUs / v)                    for each type t, replica size v
    tenant quotas, in total and per type (what the fixed work leaves)
    maximize - sum $/GPU-hour(t) g_{i,t} k x_{i,t,k}

with k in {min replicas, the most replicas that do not exceed the target,
the replicas that meet it, the replicas it has now}: the served fraction is
linear in k up to the target, so these are the vertices of each service's
choices. A service spread over U zones (or domains) has at most ceil(k / U)
replicas in one, so at least k - (U - 1) ceil(k / U) in each: one more row per
zone and domain of each type. With few coupling rows a basic solution leaves
only a few services fractional (measured at 10k: 2 of 496). Each service then
takes its dominant type with the fewest replicas that serve at least what the
LP serves, and the replicas are packed on the nodes: a service whose choice
keeps its type keeps its nodes (as many replicas as it keeps, within the spread
rule for that many; one that grows gets the rest in its turn: at 10k this took
the gap from 1.87-2.14% to 1.55-1.75%); then zone-spread services (they need
room in every zone), node-spread (distinct nodes), domain-spread, and the rest,
largest replicas first. A service whose replicas do not all fit goes to the cheapest
other type where they do. Where a floor is still short the cheapest replica
that adds served demand is added.

The LP's GPU rows do not see where the free GPUs are, so at a full cluster some
spread services do not pack (measured at 10k: 4-13 of 484). So the packing is
tried again with those services first, and then the LP is solved again
without the choices that did not fit (at most 3 LPs, 2 packings each). The
best result is kept only if every floor holds and the $/hour went down;
otherwise the plan is returned unchanged.

Like the exchange, only services that do not run now are moved (no
migrations), and only where no lower-priority work sits on a type they could
use (the verifier's strict-priority rule). Pure: no I/O; the LP goes through a
:class:`~solver.backends.Backend`.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence, Set

from solver import clock
from solver.aggregate import Index, Option, options_by_type
from solver.backends import Backend
from solver.greedy import replicas_wanted
from solver.linear import LinearModel, Sense, SolveStatus, Var
from solver.model import Placement, Shard, Spread, Workload
from solver.packing import Ledger, lowest_priority_by_type, served_fraction, spread_unit

__all__ = ["reassign_services"]


def reassign_services(
    index: Index,
    placed: Mapping[str, Placement],
    gains: Sequence[Mapping[str, float]],
    slack: Sequence[float],
    resolution: int,
    backend: Backend,
    deadline: float,
) -> dict[str, Placement]:
    """``gains[j][wid]``: what one unit of service ``wid``'s served fraction adds to
    floored stage j; ``slack[j]``: how far the plan is above that floor now (>= 0).
    Returns the reassigned plan, or a copy of ``placed`` where that is not better
    or not possible in time (``placed`` itself is not changed)."""
    original = dict(placed)
    if clock.now() > deadline or any(s < 0 for s in slack):
        return original
    price = {t: gt.cost_per_hour or 0.0 for t, gt in index.types.items()}

    def frac(w: Workload, t: str, replicas: int) -> float:
        return served_fraction(w, t, replicas, resolution)

    def dollars(p: Placement | None) -> float:
        if p is None:
            return 0.0
        return price.get(p.gpu_type or "", 0.0) * sum(s.gpus for s in p.shards)

    grouped: dict[str, dict[str, list[Option]]] = {}  # asked for again and again below

    def by_type(w: Workload) -> dict[str, list[Option]]:
        got = grouped.get(w.id)
        if got is None:
            got = grouped[w.id] = options_by_type(index.classes[index.workload_class[w.id]])
        return got

    lowest = lowest_priority_by_type(index, original)
    movable: list[Workload] = []
    for w in index.problem.workloads:
        if (
            w.inference is None
            or w.id in index.current
            or w.id not in index.workload_class
            or not any(g.get(w.id, 0.0) > 0 for g in gains)
        ):
            continue
        types = by_type(w)
        if not types or any(lowest.get(t, w.priority) < w.priority for t in types):
            continue
        movable.append(w)
    if not movable:
        return original
    moving = {w.id for w in movable}

    def fixed_ledger() -> Ledger:
        return Ledger.holding(index, original, moving)

    # What the fixed work leaves: free GPUs per ready node, and quota.
    fixed = fixed_ledger()
    free_by_type: dict[str, list[int]] = defaultdict(list)
    # Free GPUs per zone and per domain of each type: a service spread over U units
    # with k replicas has at most ceil(k / U) in a unit, so at least
    # k - (U - 1) * ceil(k / U) in every one of them.
    free_in: dict[tuple[str, Spread, tuple[str, ...]], int] = defaultdict(int)
    for shape in index.shapes:
        for nid in shape.node_ids:
            if nid not in fixed.exclusive and fixed.free[nid].gpus > 0:
                free_by_type[shape.gpu_type].append(fixed.free[nid].gpus)
            node = index.nodes[nid]
            room = 0 if nid in fixed.exclusive else fixed.free[nid].gpus
            free_in[shape.gpu_type, Spread.ZONE, (node.zone,)] += room
            free_in[shape.gpu_type, Spread.DOMAIN, (node.zone, node.domain)] += room
    units_of: dict[tuple[str, Spread], list[tuple[str, ...]]] = defaultdict(list)
    for t, kind, unit in free_in:
        units_of[t, kind].append(unit)

    # The LP over whole choices.
    lp = LinearModel()
    columns: list[tuple[Workload, str, int, Var]] = []  # (service, type, replicas, x)
    gpu_terms: dict[tuple[str, int], list[tuple[Var, float]]] = defaultdict(list)  # (type, size)
    sizes: dict[str, set[int]] = defaultdict(set)
    tenant_terms: dict[str, list[tuple[Var, float]]] = defaultdict(list)
    tenant_type_terms: dict[tuple[str, str], list[tuple[Var, float]]] = defaultdict(list)
    stage_terms: list[list[tuple[Var, float]]] = [[] for _ in gains]
    base = [0.0 for _ in gains]
    cost: list[tuple[Var, float]] = []
    unit_terms: dict[tuple[str, Spread, tuple[str, ...]], list[tuple[Var, float]]] = defaultdict(list)
    for w in movable:
        spec = w.inference
        assert spec is not None
        c = index.classes[index.workload_class[w.id]]
        now = original.get(w.id)
        for j, g in enumerate(gains):
            if now is not None and now.gpu_type is not None:
                base[j] += g.get(w.id, 0.0) * frac(w, now.gpu_type, len(now.shards))
        own: list[Var] = []
        for t, opts in sorted(by_type(w).items()):
            if not free_by_type.get(t):
                continue
            g_rep, rps = opts[0].gpus, opts[0].value
            kmin = max(1, spec.min_replicas)
            kmax = replicas_wanted(w, rps, 0)
            if kmax < kmin:
                continue
            below = min(kmax, max(kmin, math.floor(spec.target_rps / rps + 1e-9)))
            ks = {kmin, below, kmax}
            if now is not None and now.gpu_type == t:
                ks.add(len(now.shards))
            sizes[t].add(g_rep)
            for k in sorted(ks):
                x = lp.num_var(0.0, 1.0, f"x[{w.id},{t},{k}]")
                own.append(x)
                columns.append((w, t, k, x))
                cost.append((x, -price.get(t, 0.0) * g_rep * k))
                gpu_terms[t, g_rep].append((x, float(g_rep * k)))
                units = c.spread_units.get(t, 0)
                if spec.spread in (Spread.ZONE, Spread.DOMAIN) and units > 0:
                    least = k - (units - 1) * math.ceil(k / units)
                    if least > 0:
                        for unit in units_of[t, spec.spread]:
                            unit_terms[t, spec.spread, unit].append((x, float(g_rep * least)))
                tenant_terms[w.tenant].append((x, float(g_rep * k)))
                tenant_type_terms[w.tenant, t].append((x, float(g_rep * k)))
                for j, g in enumerate(gains):
                    a = g.get(w.id, 0.0) * frac(w, t, k)
                    if a:
                        stage_terms[j].append((x, a))
        if own:
            lp.add([(x, 1.0) for x in own], Sense.LE, 1.0, f"one[{w.id}]")
    for j, terms in enumerate(stage_terms):
        lp.add(terms, Sense.GE, base[j] - slack[j], f"floor[{j}]")
    for t, present in sizes.items():
        for v in present:
            terms = [xa for (tt, g), xs in gpu_terms.items() if tt == t and g >= v for xa in xs]
            room = sum(v * (free // v) for free in free_by_type[t])
            lp.add(terms, Sense.LE, float(room), f"gpus[{t},{v}]")
    for (t, kind, unit), terms in unit_terms.items():
        lp.add(terms, Sense.LE, float(free_in[t, kind, unit]), f"spread[{t},{kind.value},{'/'.join(unit)}]")
    for tenant, lim in fixed.quota.limits.items():
        if lim.max_gpus is not None and tenant_terms.get(tenant):
            left = lim.max_gpus - fixed.quota.used[tenant]
            lp.add(tenant_terms[tenant], Sense.LE, float(left), f"quota[{tenant}]")
        for t, cap in lim.max_gpus_per_type.items():
            if tenant_type_terms.get((tenant, t)):
                left = cap - fixed.quota.used_type[tenant, t]
                lp.add(tenant_type_terms[tenant, t], Sense.LE, float(left), f"quota[{tenant},{t}]")
    lp.maximize(cost)

    best = original
    best_cost = sum(dollars(p) for p in original.values())
    # (service, type) -> the most replicas that packed there in an earlier round: a
    # spread service's replicas can fail to pack although the LP's GPU rows hold
    # (room in the wrong failure units), so the next round's LP does without the
    # choices that did not pack.
    fits: dict[tuple[str, str], int] = {}
    # Services that did not pack in an earlier try are packed first in the next.
    first: set[str] = set()
    fresh = False
    for _lp_round in range(3):
        time_left = deadline - clock.now()
        if time_left <= 0.05:
            break
        banned = frozenset(x.index for w, t, k, x in columns if k > fits.get((w.id, t), k))
        sol = backend.solve_lp(lp, time_limit_s=min(time_left, 60.0), fixed_zero=banned)
        if sol.status is not SolveStatus.OPTIMAL:
            break
        choice = _round_choices(sol.values, columns, movable, frac, price, by_type)
        failed: dict[tuple[str, str], int] = {}
        for _repack in range(2):
            ledger = fixed_ledger() if fresh else fixed
            fresh = True
            out, failed = _pack(
                index, original, movable, choice, ledger, price, frac, by_type, first, deadline
            )
            if out is None:
                return best
            if _top_up(index, out, movable, gains, base, slack, ledger, price, frac, by_type, deadline):
                total = sum(dollars(p) for p in out.values())
                if total < best_cost - 1e-9:
                    best, best_cost = out, total
            if not failed:
                break
            first.update(wid for wid, _t in failed)
        if not failed:
            break
        fits.update(failed)
    return best


def _round_choices(
    values: Sequence[float],
    columns: Sequence[tuple[Workload, str, int, Var]],
    movable: Sequence[Workload],
    frac: Callable[[Workload, str, int], float],
    price: Mapping[str, float],
    by_type: Callable[[Workload], dict[str, list[Option]]],
) -> dict[str, tuple[str, int]]:
    """Each service with LP mass: its dominant type (the cheaper on a tie) and the
    fewest replicas there that serve at least what the LP serves."""
    mass: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    served_lp: dict[str, float] = defaultdict(float)
    most: dict[tuple[str, str], int] = defaultdict(int)
    for w, t, k, x in columns:
        v = values[x.index]
        if v > 1e-9:
            mass[w.id][t] += v
            served_lp[w.id] += v * frac(w, t, k)
            most[w.id, t] = max(most[w.id, t], k)
    choice: dict[str, tuple[str, int]] = {}
    for w in movable:
        spec = w.inference
        assert spec is not None
        if not mass.get(w.id) or served_lp[w.id] <= 1e-9:
            continue
        t = max(sorted(mass[w.id]), key=lambda tt: (mass[w.id][tt], -price.get(tt, 0.0)))
        kmin, kmax = max(1, spec.min_replicas), most[w.id, t]
        k = kmin
        while k < kmax and frac(w, t, k) < served_lp[w.id] - 1e-9:
            k += 1
        choice[w.id] = (t, max(k, kmin))
    return choice


def _pack(
    index: Index,
    original: Mapping[str, Placement],
    movable: Sequence[Workload],
    choice: Mapping[str, tuple[str, int]],
    ledger: Ledger,
    price: Mapping[str, float],
    frac: Callable[[Workload, str, int], float],
    by_type: Callable[[Workload], dict[str, list[Option]]],
    first: Set[str],
    deadline: float,
) -> tuple[dict[str, Placement] | None, dict[tuple[str, str], int]]:
    """The choices on the nodes (``ledger`` holds the fixed work and is updated).
    Services whose choice keeps their type keep their nodes (as many replicas as
    they keep); the rest, and the replicas that growing ones add, are placed
    spread services first (zone, node, domain), then the largest replicas; on a
    retry, what did not fit before goes first. A new service whose replicas do
    not all fit goes to the cheapest other type where the replicas it wants fit
    (else keeps what fitted); a growing one keeps what fitted. Returns the plan
    (None if out of time) and, for each choice that did not fit, how many
    replicas did."""
    moving = {w.id for w in movable}
    out = {wid: p for wid, p in original.items() if wid not in moving}
    failed: dict[tuple[str, str], int] = {}
    todo: list[Workload] = []
    growing: dict[str, Placement] = {}  # same type, more replicas: these first, then more
    for w in movable:
        now = original.get(w.id)
        want = choice.get(w.id)
        if want is None:
            continue
        kept = _kept(index, w, now, want[1]) if now is not None and now.gpu_type == want[0] else None
        if kept is None:
            todo.append(w)
            continue
        ledger.place(w, kept)
        out[w.id] = kept
        if len(kept.shards) < want[1]:
            growing[w.id] = kept
            todo.append(w)

    def order(w: Workload) -> tuple[bool, int, int, int, int, str]:
        spec = w.inference
        assert spec is not None
        t, k = choice[w.id]
        units = index.classes[index.workload_class[w.id]].spread_units.get(t, 0)
        spread = spec.spread is not Spread.NONE and units > 0
        rank = {Spread.ZONE: 0, Spread.NODE: 1, Spread.DOMAIN: 2}.get(spec.spread, 3) if spread else 3
        return (w.id not in first, rank, units if spread else 0, -by_type(w)[t][0].gpus, -k, w.id)

    for w in sorted(todo, key=order):
        if clock.now() > deadline:
            return None, failed
        spec = w.inference
        assert spec is not None
        t, k = choice[w.id]
        c = index.classes[index.workload_class[w.id]]
        have = growing.get(w.id)
        if have is not None:
            # More replicas where it runs: as many as fit (the rest is topped up below).
            more = ledger.try_service(w, by_type(w)[t], k, c.spread_units, True, None, have.shards)
            out[w.id] = Placement(w.id, (*have.shards, *more), t)
            if len(have.shards) + len(more) < k:
                failed[w.id, t] = len(have.shards) + len(more)
            continue
        shards = ledger.try_service(w, by_type(w)[t], k, c.spread_units)
        got = Placement(w.id, tuple(shards), t)
        if len(shards) < k:
            failed[w.id, t] = len(shards)
            if shards:
                ledger.release(w, got)
            for _cost, u in sorted(
                (price.get(u, 0.0) * opts[0].gpus * replicas_wanted(w, opts[0].value, 0), u)
                for u, opts in by_type(w).items()
                if u != t
            ):
                opts = by_type(w)[u]
                wanted = replicas_wanted(w, opts[0].value, 0)
                if frac(w, u, wanted) < frac(w, t, len(shards)):
                    continue
                other = ledger.try_service(w, opts, wanted, c.spread_units)
                if len(other) == wanted:
                    got = Placement(w.id, tuple(other), u)
                    break
                if other:
                    ledger.release(w, Placement(w.id, tuple(other), u))
            else:
                if shards:
                    ledger.place(w, got)
        if len(got.shards) >= max(1, spec.min_replicas):
            out[w.id] = got
        elif got.shards:
            ledger.release(w, got)
    return out, failed


def _kept(index: Index, w: Workload, cur: Placement, k: int) -> Placement | None:
    """Service ``w``'s current replicas, at most ``k`` of them and no more in a
    failure unit than its spread allows for that many (None if fewer than its
    minimum remain)."""
    spec = w.inference
    assert spec is not None
    units = index.classes[index.workload_class[w.id]].spread_units.get(cur.gpu_type or "", 0)
    n = min(k, len(cur.shards))
    cap = math.ceil(n / units) if spec.spread is not Spread.NONE and units > 0 else n
    count: dict[tuple[str, ...], int] = defaultdict(int)
    kept: list[Shard] = []
    for sh in cur.shards:
        if len(kept) == n:
            break
        unit = spread_unit(index.nodes[sh.node_id], spec.spread)
        if count[unit] < cap:
            count[unit] += 1
            kept.append(sh)
    if len(kept) < max(1, spec.min_replicas) or len(kept) < n:
        return None
    return Placement(w.id, tuple(kept), cur.gpu_type)


def _top_up(
    index: Index,
    out: dict[str, Placement],
    movable: Sequence[Workload],
    gains: Sequence[Mapping[str, float]],
    base: Sequence[float],
    slack: Sequence[float],
    ledger: Ledger,
    price: Mapping[str, float],
    frac: Callable[[Workload, str, int], float],
    by_type: Callable[[Workload], dict[str, list[Option]]],
    deadline: float,
) -> bool:
    """Where a floor is still short (rounding, packing), add the replica that adds
    served demand most cheaply, again and again (``out`` and ``ledger`` are
    updated). Returns whether every floor holds."""

    def served(wid: str) -> float:
        p = out.get(wid)
        if p is None or p.gpu_type is None or not p.shards:
            return 0.0
        return frac(index.workloads[wid], p.gpu_type, len(p.shards))

    short = [
        sum(g.get(w.id, 0.0) * served(w.id) for w in movable) - (base[j] - slack[j])
        for j, g in enumerate(gains)
    ]

    def candidate(w: Workload) -> tuple[float, str] | None:
        p = out.get(w.id)
        if p is None or p.gpu_type is None:
            return None
        k = len(p.shards)
        opts = by_type(w)[p.gpu_type]
        if k + 1 > replicas_wanted(w, opts[0].value, 0):
            return None
        gain = frac(w, p.gpu_type, k + 1) - frac(w, p.gpu_type, k)
        units = sum(g.get(w.id, 0.0) for j, g in enumerate(gains) if short[j] < 0)
        if gain <= 0 or units <= 0:
            return None
        return (price.get(p.gpu_type, 0.0) * opts[0].gpus / (gain * units), w.id)

    heap = [cand for cand in (candidate(w) for w in movable) if cand is not None]
    heapq.heapify(heap)
    while any(s < -1e-12 for s in short) and heap and clock.now() <= deadline:
        _r, wid = heapq.heappop(heap)
        w = index.workloads[wid]
        p = out[wid]
        assert p.gpu_type is not None
        c = index.classes[index.workload_class[wid]]
        before = served(wid)
        new = ledger.try_service(
            w, by_type(w)[p.gpu_type], len(p.shards) + 1, c.spread_units, True, None, p.shards
        )
        if not new:
            continue
        out[wid] = Placement(wid, (*p.shards, *new), p.gpu_type)
        for j, g in enumerate(gains):
            short[j] += g.get(wid, 0.0) * (served(wid) - before)
        again = candidate(w)
        if again is not None:
            heapq.heappush(heap, again)
    return all(s >= -1e-9 * max(1.0, abs(b)) for s, b in zip(short, base, strict=True))
