"""Service exchange for ``cost``: drop an expensive service, serve others more.

The stages before ``cost`` keep floors on weighted served demand (a tier's
coverage counts Σ w·f over its services; the demand stage Σ w·f over all).
They do not say *which* services serve it: the LP of the cost stage drops the
services whose whole replicas are dearest per unit of w·f and serves cheaper
ones more. Rounding cannot follow it (it keeps the incumbent's services so
that the floors hold), so at scale the plan keeps whatever the coverage
stages placed. This local search does the exchange on concrete nodes:

for each placed service that does not run now, dearest $/hour per unit of w·f
first, take it out and, while some floor is short, add what is cheapest per
unit of w·f in the same tier: one more replica of a service below its target
(on its type), or an unplaced service at the replicas it wants. The exchange
is kept if every floor holds and the $/hour went down; else it is undone.

The served fraction of every service is computed as the model's hint does
(``floor(min(1, replicas·rps/target)·resolution)/resolution``), so the floors
checked here are the ones the pipeline checks. A service is only taken out if
no node of a type it could use holds lower-priority work (else the verifier's
strict-priority rule, which looks for room that lower tiers hold, could
object); and only services that do not run now move (no migrations).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, Sequence

from solver import clock
from solver.aggregate import Index, Option, OptionKind, WorkloadClass, options_by_type
from solver.greedy import replicas_wanted
from solver.model import Placement, Spread, Workload
from solver.packing import Ledger, lowest_priority_by_type, served_fraction, spread_fits, spread_unit

__all__ = ["exchange_services", "raise_minimum"]


def exchange_services(
    index: Index,
    placed: Mapping[str, Placement],
    gains: Sequence[Mapping[str, float]],
    slack: Sequence[float],
    resolution: int,
    deadline: float,
) -> dict[str, Placement]:
    """``gains[j][wid]``: what one unit of service ``wid``'s served fraction adds to
    floored stage j; ``slack[j]``: how far the plan is above that floor now. Returns
    the plan after the exchanges (``placed`` itself is not changed)."""
    out = dict(placed)
    ledger = Ledger.holding(index, out)
    slack = list(slack)
    price = {t: gt.cost_per_hour or 0.0 for t, gt in index.types.items()}

    def frac(w: Workload, t: str, replicas: int) -> float:
        return served_fraction(w, t, replicas, resolution)

    def served(wid: str) -> float:
        p = out.get(wid)
        if p is None or not p.shards or p.gpu_type is None:
            return 0.0
        return frac(index.workloads[wid], p.gpu_type, len(p.shards))

    def dollars(p: Placement) -> float:
        return price.get(p.gpu_type or "", 0.0) * sum(s.gpus for s in p.shards)

    lowest = lowest_priority_by_type(index, out)

    def by_type_of(w: Workload) -> dict[str, list[Option]]:
        return options_by_type(index.classes[index.workload_class[w.id]])

    services = [
        w
        for w in index.problem.workloads
        if w.inference is not None
        and w.id not in index.current
        and any(g.get(w.id, 0.0) > 0 for g in gains)
        and w.id in index.workload_class
    ]
    droppable = []
    for w in services:
        held = out.get(w.id)
        f = served(w.id)
        if held is None or f <= 0:
            continue
        if any(lowest.get(t, w.priority) < w.priority for t in by_type_of(w)):
            continue
        unit = sum(g.get(w.id, 0.0) for g in gains) * f
        droppable.append((-dollars(held) / unit, w.id))
    droppable.sort()

    def pattern(wid: str) -> tuple[bool, ...]:
        return tuple(g.get(wid, 0.0) > 0 for g in gains)

    # Peers of a dropped service: same priority, and counted by the same floored stages.
    groups: dict[tuple[int, tuple[bool, ...]], list[Workload]] = {}
    for x in services:
        groups.setdefault((x.priority, pattern(x.id)), []).append(x)
    # What one unit of a peer's served fraction adds to the floored stages it counts in
    # (the same stages as the dropped service's, for a peer).
    unit_of = {x.id: sum(g.get(x.id, 0.0) for g in gains if g.get(x.id, 0.0) > 0) for x in services}
    cache: dict[str, tuple[Placement | None, tuple[float, str, str, int, bool] | None]] = {}

    def best_of(x: Workload) -> tuple[float, str, str, int, bool] | None:
        """The cheapest way, per unit of w*f, to serve peer ``x`` more: ($ per unit,
        wid, type, replicas, whether the whole service moves to the type). It depends
        only on x's own placement, so it is kept until that changes."""
        cur = out.get(x.id)
        hit = cache.get(x.id)
        if hit is not None and hit[0] is cur:
            return hit[1]
        unit = unit_of[x.id]
        now = served(x.id)
        if cur is not None and (now >= 1.0 or not cur.shards or cur.gpu_type is None):
            return None
        best: tuple[float, str, str, int, bool] | None = None
        for t, opts in by_type_of(x).items():
            if cur is not None and t == cur.gpu_type:
                # one more replica where it runs
                spec = x.inference
                assert spec is not None
                if len(cur.shards) + 1 > replicas_wanted(x, spec.replica_rps.get(t, 1.0), 0):
                    continue
                gain = frac(x, t, len(cur.shards) + 1) - now
                cost = price.get(t, 0.0) * cur.shards[0].gpus
                cand = (
                    cost / (unit * gain) if gain > 0 else math.inf,
                    x.id,
                    t,
                    len(cur.shards) + 1,
                    False,
                )
            else:
                # the whole service, at the replicas it wants, on type t
                want = replicas_wanted(x, opts[0].value, 0)
                gain = frac(x, t, want) - now
                cost = price.get(t, 0.0) * opts[0].gpus * want - (dollars(cur) if cur is not None else 0.0)
                cand = (max(0.0, cost) / (unit * gain) if gain > 0 else math.inf, x.id, t, want, True)
            if gain > 0 and (best is None or cand < best):
                best = cand
        cache[x.id] = (cur, best)
        return best

    for _ratio, wid in droppable:
        if clock.now() > deadline:
            break
        w = index.workloads[wid]
        old = out.get(wid)
        if old is None:
            continue
        f_old = served(wid)
        log: list[tuple[str, Placement | None, Placement, bool]] = [
            (wid, old, Placement(wid, (), old.gpu_type), False)
        ]
        ledger.release(w, old)
        del out[wid]
        short = [slack[j] - g.get(wid, 0.0) * f_old for j, g in enumerate(gains)]
        saved = dollars(old)
        peers = [x for x in groups[w.priority, pattern(wid)] if x.id != wid]
        # A peer's best candidate depends only on its own placement, so the candidates
        # are kept in a heap and only the peer that changed is evaluated again (the
        # same choices as scanning every peer each time, in a fraction of the time).
        heap = [b for b in (best_of(x) for x in peers) if b is not None]
        heapq.heapify(heap)
        while any(s < 0 for s in short) and saved > 0:
            if not heap:
                break
            best = heapq.heappop(heap)
            _r, xid, t, want, whole = best
            x = index.workloads[xid]
            c = index.classes[index.workload_class[xid]]
            opts = by_type_of(x)[t]
            before = out.get(xid)
            f_before = served(xid)
            spec = x.inference
            assert spec is not None
            if whole:
                if before is not None:
                    ledger.release(x, before)
                new = ledger.try_service(x, opts, want, c.spread_units)
                moved = Placement(xid, tuple(new), t)
                if len(new) < max(1, spec.min_replicas) or frac(x, t, len(new)) <= f_before:
                    if new:
                        ledger.release(x, moved)
                    if before is not None:
                        ledger.place(x, before)
                    continue
                out[xid] = moved
                log.append((xid, before, moved, True))
                saved -= dollars(moved) - (dollars(before) if before is not None else 0.0)
            else:
                assert before is not None
                new = ledger.try_service(x, opts, want, c.spread_units, True, None, before.shards)
                if not new:
                    continue
                out[xid] = Placement(xid, (*before.shards, *new), t)
                log.append((xid, before, Placement(xid, tuple(new), t), False))
                saved -= price.get(t, 0.0) * sum(s.gpus for s in new)
            f_after = served(xid)
            for j, g in enumerate(gains):
                short[j] += g.get(xid, 0.0) * (f_after - f_before)
            if f_after < 1.0:
                again = best_of(x)  # it may take yet another replica
                if again is not None:
                    heapq.heappush(heap, again)
        if all(s >= 0 for s in short) and saved > 1e-9:
            slack = short
            continue
        # Undo, newest first.
        for xid, before, added, whole in reversed(log):
            x = index.workloads[xid]
            if xid == wid:
                assert before is not None
                ledger.place(x, before)
                out[xid] = before
                continue
            ledger.release(x, added)
            if whole and before is not None:
                ledger.place(x, before)
            if before is None:
                del out[xid]
            else:
                out[xid] = before
    return out


def raise_minimum(index: Index, placed: Mapping[str, Placement], deadline: float) -> dict[str, Placement]:
    """For ``fairness``: while time is left, the workloads at the plan's minimum of
    (normalized throughput or served fraction) / weight move to something better:
    a job that does not run now to an option of higher throughput where room is
    free, or else trades places with a one-node job of the same size on another
    type when both end above the minimum; a service that does not run now to
    more replicas on its type (in free room; else in room made by moving one-node
    jobs elsewhere, each above the minimum; else in the room of a replica of a
    service of the same priority that stays above the minimum and loses no more
    weighted served fraction than it gains) or to another type where its
    replicas serve more. Every placed workload stays placed (a trade keeps both
    running), and the weighted served fraction of a priority never drops, so the
    coverage of every tier never drops; the minimum rises or the search stops
    (when some workload at the minimum cannot improve)."""
    out = dict(placed)
    ledger = Ledger.holding(index, out)

    def nodes_of(t: str) -> Iterator[str]:
        for shape in index.shapes:
            if shape.gpu_type == t:
                yield from shape.node_ids

    def value(wid: str) -> float:
        p = out[wid]
        w = index.workloads[wid]
        c = index.classes[index.workload_class[wid]]
        if w.inference is not None:
            spec = w.inference
            rps = spec.replica_rps.get(p.gpu_type or "", 0.0)
            return min(1.0, len(p.shards) * rps / spec.target_rps) / c.weight
        for o in c.options:
            if o.gpu_type == p.gpu_type and o.gpus == p.gpus:
                return o.value / c.weight
        return 0.0

    def better(wid: str) -> bool:
        """Move ``wid`` to something of higher value (and record it); False if nothing fits."""
        w = index.workloads[wid]
        c = index.classes[index.workload_class[wid]]
        old = out[wid]
        now = value(wid)
        if w.training is not None:
            opts = [o for o in c.options if o.kind in (OptionKind.SINGLE, OptionKind.GANG)]
            cands = sorted(
                (o for o in opts if o.value / c.weight > now + 1e-12), key=lambda o: (-o.value, o.gpus)
            )
            if not cands:
                return False
            ledger.release(w, old)
            for o in cands:
                got = ledger.try_training(w, o)
                if got is not None:
                    out[wid] = got
                    return True
            ledger.place(w, old)
            return swap(wid, now)
        spec = w.inference
        assert spec is not None
        by_type = options_by_type(c)
        # More replicas where it runs, as many as fit (up to what it wants).
        here = by_type.get(old.gpu_type or "", [])
        want = replicas_wanted(w, here[0].value, 0) if here else 0
        if want > len(old.shards):
            more = ledger.try_service(w, here, want, c.spread_units, True, None, old.shards)
            if more:
                out[wid] = Placement(wid, (*old.shards, *more), old.gpu_type)
                if value(wid) > now + 1e-12:
                    return True
                ledger.release(w, Placement(wid, tuple(more), old.gpu_type))
                out[wid] = old
            # Else room for one more where it runs: made by moving one-node jobs, or
            # taken from a service that can spare a replica.
            if make_room(w, c, old, now, here) or take_replicas(w, c, old, now, here):
                return True
        # Else the whole service elsewhere: most served first, then fewest GPUs.
        plans = []
        for t, opts in by_type.items():
            want = replicas_wanted(w, opts[0].value, 0)
            f = min(1.0, want * opts[0].value / spec.target_rps)
            if f / c.weight > now + 1e-12:
                plans.append((-f, want * opts[0].gpus, t, want))
        if not plans:
            return False
        ledger.release(w, old)
        for _f, _g, t, want in sorted(plans):
            shards = ledger.try_service(w, by_type[t], want, c.spread_units)
            new = Placement(wid, tuple(shards), t)
            if shards:
                out[wid] = new
                if len(shards) >= max(1, spec.min_replicas) and value(wid) > now + 1e-12:
                    return True
                ledger.release(w, new)
        out[wid] = old
        ledger.place(w, old)
        return False

    def make_room(w: Workload, c: WorkloadClass, old: Placement, now: float, here: list[Option]) -> bool:
        """One more replica for service ``w`` (at the minimum ``now``, placed as
        ``old``, wanting more) on its type, on a node whose one-node training jobs
        that do not run now move elsewhere, each to an option above the minimum;
        everything is undone if one of them finds no such room. The service's served
        fraction rises and no workload ends at or below ``now``, so the minimum rises
        (or has fewer at it)."""
        spec = w.inference
        assert spec is not None
        wid = w.id
        t, g, k = old.gpu_type or "", here[0].gpus, len(old.shards)
        if min(1.0, (k + 1) * here[0].value / spec.target_rps) / c.weight <= now + 1e-12:
            return False
        units = c.spread_units.get(t, 0)
        cap = math.ceil((k + 1) / units) if spec.spread is not Spread.NONE and units > 0 else k + 1

        def unit(nid: str) -> tuple[str, ...]:
            return spread_unit(index.nodes[nid], spec.spread)

        taken: dict[tuple[str, ...], int] = {}
        for sh in old.shards:
            taken[unit(sh.node_id)] = taken.get(unit(sh.node_id), 0) + 1
        for nid in nodes_of(t):
            if clock.now() >= deadline:
                return False
            if nid in ledger.exclusive or taken.get(unit(nid), 0) >= cap:
                continue
            room = ledger.free[nid].gpus
            jobs = sorted(
                (gpus, j)
                for j, gpus in ledger.holders[nid]
                if j in movable and index.workloads[j].training is not None and len(out[j].shards) == 1
            )
            pick: list[str] = []
            for gpus, j in jobs:
                if room >= g:
                    break
                pick.append(j)
                room += gpus
            if room < g or not pick:
                continue
            before = {j: out[j] for j in pick}
            for j in pick:
                ledger.release(index.workloads[j], before[j])
            more = ledger.try_service(w, here, k + 1, c.spread_units, True, None, old.shards)
            moved: dict[str, Placement] = {}
            if more:
                for j in pick:
                    wj = index.workloads[j]
                    cj = index.classes[index.workload_class[j]]
                    cands = sorted(
                        (
                            o
                            for o in cj.options
                            if o.kind in (OptionKind.SINGLE, OptionKind.GANG)
                            and o.value / cj.weight > now + 1e-12
                        ),
                        key=lambda o: (-o.value, o.gpus),
                    )
                    got = next(
                        (p for p in (ledger.try_training(wj, o) for o in cands) if p is not None), None
                    )
                    if got is None:
                        break
                    moved[j] = got
            if more and len(moved) == len(pick):
                out[wid] = Placement(wid, (*old.shards, *more), t)
                for j, p in moved.items():
                    out[j] = p
                    by_size.get(before[j].gpus, {}).get(t_of(before[j]), set()).discard(j)
                    if len(p.shards) == 1:
                        by_size.setdefault(p.gpus, {}).setdefault(t_of(p), set()).add(j)
                return True
            for j, p in moved.items():
                ledger.release(index.workloads[j], p)
            if more:
                ledger.release(w, Placement(wid, tuple(more), t))
            for j in pick:
                ledger.place(index.workloads[j], before[j])
        return False

    def take_replicas(w: Workload, c: WorkloadClass, old: Placement, now: float, here: list[Option]) -> bool:
        """One more replica for service ``w`` (at the minimum ``now``, placed as
        ``old``, wanting more) on its type, in the room of one replica of another
        service of the same priority that does not run now, when that one stays
        above the minimum and loses no more weighted served fraction than ``w``
        gains (so the tier's coverage does not drop)."""
        wid = w.id
        t, g, k = old.gpu_type or "", here[0].gpus, len(old.shards)
        gain = c.weight * (served_fraction(w, t, k + 1) - served_fraction(w, t, k))
        if gain <= 0 or served_fraction(w, t, k + 1) / c.weight <= now + 1e-12:
            return False
        for nid in nodes_of(t):
            if clock.now() >= deadline:
                return False
            if nid in ledger.exclusive:
                continue
            for did, dg in list(ledger.holders[nid]):
                if did == wid or did not in movable or ledger.free[nid].gpus + dg < g:
                    continue
                d = index.workloads[did]
                if d.inference is None or d.priority != w.priority:
                    continue
                dc = index.classes[index.workload_class[did]]
                dp = out[did]
                dt, dk = dp.gpu_type or "", len(dp.shards)
                if dk - 1 < max(1, d.inference.min_replicas):
                    continue
                after = served_fraction(d, dt, dk - 1)
                loss = dc.weight * (served_fraction(d, dt, dk) - after)
                if loss > gain + 1e-12 or after / dc.weight <= now + 1e-12:
                    continue
                shard = next(sh for sh in dp.shards if sh.node_id == nid and sh.gpus == dg)
                rest = list(dp.shards)
                rest.remove(shard)
                if not spread_fits(index, d, dt, rest):
                    continue
                ledger.release(d, Placement(did, (shard,), dt))
                more = ledger.try_service(w, here, k + 1, c.spread_units, True, None, old.shards)
                if more:
                    out[did] = Placement(did, tuple(rest), dt)
                    out[wid] = Placement(wid, (*old.shards, *more), t)
                    return True
                ledger.place(d, Placement(did, (shard,), dt))
        return False

    def single(wid: str) -> Option | None:
        """The one-node option a placed job runs as (None: a gang, or unknown)."""
        p = out[wid]
        if len(p.shards) != 1:
            return None
        c = index.classes[index.workload_class[wid]]
        for o in c.options:
            if o.kind is OptionKind.SINGLE and o.gpu_type == p.gpu_type and o.gpus == p.gpus:
                return o
        return None

    def option_on(wid: str, shape: int, gpus: int) -> Option | None:
        """The one-node option of ``wid`` with ``gpus`` GPUs on node shape ``shape``."""
        c = index.classes[index.workload_class[wid]]
        for o in c.options:
            if o.kind is OptionKind.SINGLE and o.shape == shape and o.gpus == gpus:
                return o
        return None

    def swap(wid: str, now: float) -> bool:
        """Trade places with a one-node job of the same size on another type, if both
        end above ``now`` (the minimum): both keep running, so no coverage changes.
        The partner is the one that ends best (the smaller of the two values)."""
        mine = single(wid)
        if mine is None:
            return False
        w = index.workloads[wid]
        wj = index.classes[index.workload_class[wid]].weight
        best: tuple[float, str, Option, Option] | None = None
        # In sorted order: sets of ids iterate in an order that changes from one
        # process to the next (string hashing), and the first of equal partners wins.
        for t, held in sorted(by_size.get(mine.gpus, {}).items()):
            if t == mine.gpu_type:
                continue
            for kid in sorted(held):
                if kid == wid or kid not in out or t_of(out[kid]) != t:
                    continue
                there = option_on(wid, index.node_shape[out[kid].shards[0].node_id], mine.gpus)
                if there is None or there.value / wj <= now + 1e-12:
                    continue
                back = option_on(kid, mine.shape, mine.gpus)
                if back is None:
                    continue
                worst = min(there.value / wj, back.value / index.classes[index.workload_class[kid]].weight)
                if worst > now + 1e-12 and (best is None or worst > best[0]):
                    best = (worst, kid, there, back)
        if best is None:
            return False
        _worst, kid, there, back = best
        k = index.workloads[kid]
        old_w, old_k = out[wid], out[kid]
        ledger.release(w, old_w)
        ledger.release(k, old_k)
        got_w = ledger.try_training(w, there)
        got_k = ledger.try_training(k, back) if got_w is not None else None
        if got_w is None or got_k is None:
            if got_w is not None:
                ledger.release(w, got_w)
            ledger.place(w, old_w)
            ledger.place(k, old_k)
            return False
        out[wid], out[kid] = got_w, got_k
        by_size[mine.gpus][mine.gpu_type].discard(wid)
        by_size[mine.gpus][t_of(got_w)].add(wid)
        by_size[mine.gpus][t_of(old_k)].discard(kid)
        by_size[mine.gpus][t_of(got_k)].add(kid)
        return True

    def t_of(p: Placement) -> str:
        return p.gpu_type or index.nodes[p.shards[0].node_id].gpu_type

    movable = {wid for wid in out if wid not in index.current and wid in index.workload_class}
    # One-node jobs that may trade places, by size and type.
    by_size: dict[int, dict[str, set[str]]] = {}
    for wid in movable:
        p = out[wid]
        if index.workloads[wid].training is not None and len(p.shards) == 1:
            by_size.setdefault(p.gpus, {}).setdefault(t_of(p), set()).add(wid)
    stuck: set[str] = set()
    while clock.now() < deadline:
        clock.charge(clock.LEDGER_CHECK * len(out))
        values = {wid: value(wid) for wid in out}
        if not values:
            break
        low = min(values.values())
        at_min = sorted(wid for wid, v in values.items() if v <= low + 1e-12)
        if any(wid not in movable or wid in stuck for wid in at_min):
            break
        for wid in at_min:
            if clock.now() >= deadline:
                break
            if not better(wid):
                stuck.add(wid)
                break
    return out
