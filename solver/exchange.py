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

import math
import time
from collections.abc import Mapping, Sequence

from solver.aggregate import Index, Option
from solver.greedy import replicas_wanted
from solver.model import Placement, Workload
from solver.packing import Ledger

__all__ = ["exchange_services"]


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
    ledger = Ledger(index)
    for wid, p in sorted(out.items()):
        ledger.place(index.workloads[wid], p)
    slack = list(slack)
    price = {t: gt.cost_per_hour or 0.0 for t, gt in index.types.items()}

    def frac(w: Workload, t: str, replicas: int) -> float:
        spec = w.inference
        assert spec is not None
        f = min(1.0, replicas * spec.replica_rps.get(t, 0.0) / spec.target_rps)
        return math.floor(f * resolution) / resolution

    def served(wid: str) -> float:
        p = out.get(wid)
        if p is None or not p.shards or p.gpu_type is None:
            return 0.0
        return frac(index.workloads[wid], p.gpu_type, len(p.shards))

    def dollars(p: Placement) -> float:
        return price.get(p.gpu_type or "", 0.0) * sum(s.gpus for s in p.shards)

    # Lowest priority of the work on nodes of each type: a service may be taken out
    # only where no lower-priority work sits on a type it could use.
    lowest: dict[str, int] = {}
    for wid, p in out.items():
        pr = index.workloads[wid].priority
        for s in p.shards:
            t = index.nodes[s.node_id].gpu_type
            lowest[t] = min(lowest.get(t, pr), pr)

    def options_by_type(w: Workload) -> dict[str, list[Option]]:
        c = index.classes[index.workload_class[w.id]]
        by_type: dict[str, list[Option]] = {}
        for o in c.options:
            by_type.setdefault(o.gpu_type, []).append(o)
        return by_type

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
        if any(lowest.get(t, w.priority) < w.priority for t in options_by_type(w)):
            continue
        unit = sum(g.get(w.id, 0.0) for g in gains) * f
        droppable.append((-dollars(held) / unit, w.id))
    droppable.sort()

    for _ratio, wid in droppable:
        if time.perf_counter() > deadline:
            break
        w = index.workloads[wid]
        old = out.get(wid)
        if old is None:
            continue
        f_old = served(wid)
        log: list[tuple[str, Placement | None, Placement]] = [(wid, old, Placement(wid, (), old.gpu_type))]
        ledger.release(w, old)
        del out[wid]
        short = [slack[j] - g.get(wid, 0.0) * f_old for j, g in enumerate(gains)]
        saved = dollars(old)
        peers = [
            x
            for x in services
            if x.id != wid
            and x.priority == w.priority
            and all((g.get(x.id, 0.0) > 0) == (g.get(wid, 0.0) > 0) for g in gains)
        ]
        tried: set[str] = set()
        while any(s < 0 for s in short) and saved > 0:
            best: tuple[float, str, str, int] | None = None  # ($ per unit, wid, type, replicas)
            for x in peers:
                if x.id in tried:
                    continue
                unit = sum(g.get(x.id, 0.0) for g in gains if g.get(wid, 0.0) > 0)
                cur = out.get(x.id)
                if cur is not None and cur.shards and cur.gpu_type is not None:
                    now = served(x.id)
                    t = cur.gpu_type
                    spec = x.inference
                    assert spec is not None
                    if now >= 1.0 or len(cur.shards) + 1 > replicas_wanted(
                        x, spec.replica_rps.get(t, 1.0), 0
                    ):
                        continue
                    more = frac(x, t, len(cur.shards) + 1) - now
                    if more <= 0:
                        continue
                    cost = price.get(t, 0.0) * cur.shards[0].gpus
                    key = (cost / (unit * more), x.id, t, len(cur.shards) + 1)
                else:
                    for t, opts in options_by_type(x).items():
                        want = replicas_wanted(x, opts[0].value, 0)
                        gain = frac(x, t, want)
                        if gain <= 0:
                            continue
                        cost = price.get(t, 0.0) * opts[0].gpus * want
                        cand = (cost / (unit * gain), x.id, t, want)
                        if best is None or cand < best:
                            best = cand
                    continue
                if best is None or key < best:
                    best = key
            if best is None:
                break
            _r, xid, t, want = best
            tried.add(xid)
            x = index.workloads[xid]
            c = index.classes[index.workload_class[xid]]
            opts = options_by_type(x)[t]
            before = out.get(xid)
            existing = before.shards if before is not None else ()
            new = ledger.try_service(x, opts, want, c.spread_units, True, None, existing)
            if not new:
                continue
            spec = x.inference
            assert spec is not None
            if before is None and len(new) < max(1, spec.min_replicas):
                ledger.release(x, Placement(xid, tuple(new), t))
                continue
            f_before = served(xid)
            after = Placement(xid, (*existing, *new), t)
            out[xid] = after
            log.append((xid, before, Placement(xid, tuple(new), t)))
            f_after = served(xid)
            for j, g in enumerate(gains):
                short[j] += g.get(xid, 0.0) * (f_after - f_before)
            saved -= price.get(t, 0.0) * sum(s.gpus for s in new)
            if before is not None and f_after < 1.0:
                tried.discard(xid)  # it may take yet another replica
        if all(s >= 0 for s in short) and saved > 1e-9:
            slack = short
            continue
        # Undo, newest first.
        for xid, before, added in reversed(log):
            x = index.workloads[xid]
            if xid == wid:
                assert before is not None
                ledger.place(x, before)
                out[xid] = before
                continue
            ledger.release(x, added)
            if before is None:
                del out[xid]
            else:
                out[xid] = before
    return out
