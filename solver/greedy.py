"""Greedy placement: the classic baselines, and the seed of the optimizer.

Every greedy pass does the same thing in a different order and with a
different node choice:

1. running workloads stay where they are if their nodes are still ready
   (schedulers of this kind do not migrate);
2. the rest are taken one at a time in the baseline's order; a training job
   tries its options from the highest normalized throughput down and takes the
   first that fits (first-fit: the lowest-numbered node; best-fit: the node
   left with the fewest free GPUs); a service takes the type with the most
   requests/s per GPU that can host its minimum, and as many replicas as its
   target needs.

Orders: ``fcfs`` by submission time; ``sjf`` by shortest remaining time
(remaining work / best throughput; services and jobs without remaining work
last); ``priority``, ``first-fit`` and ``best-fit`` by priority (highest
first), then largest GPU need first (first-fit/best-fit decreasing), then
submission time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from solver import clock
from solver.aggregate import Index, Option, OptionKind, WorkloadClass, options_by_type
from solver.model import NodeState, Placement, Workload
from solver.packing import Ledger

__all__ = ["BASELINE_ORDERS", "greedy_place"]


def _gpus_needed(w: Workload) -> int:
    if w.training is not None:
        return max(s.gpus for s in w.training.shapes)
    assert w.inference is not None
    return max(w.inference.gpus_per_replica.values(), default=0) * max(1, w.inference.min_replicas)


def _best_throughput(w: Workload) -> float:
    assert w.training is not None
    return max((v for s in w.training.shapes for v in s.throughput.values()), default=0.0)


def _order_fcfs(ws: Sequence[Workload]) -> list[Workload]:
    return sorted(ws, key=lambda w: (w.submit_time_s, w.id))


def _order_sjf(ws: Sequence[Workload]) -> list[Workload]:
    def key(w: Workload) -> tuple[float, float, str]:
        if w.training is not None and w.training.remaining_work is not None and _best_throughput(w) > 0:
            return (0, w.training.remaining_work / _best_throughput(w), w.id)
        return (1, w.submit_time_s, w.id)

    return sorted(ws, key=key)


def _order_priority(ws: Sequence[Workload]) -> list[Workload]:
    return sorted(ws, key=lambda w: (-w.priority, w.submit_time_s, w.id))


def _order_decreasing(ws: Sequence[Workload]) -> list[Workload]:
    return sorted(ws, key=lambda w: (-w.priority, -_gpus_needed(w), w.submit_time_s, w.id))


def _order_smallest(ws: Sequence[Workload]) -> list[Workload]:
    return sorted(ws, key=lambda w: (-w.priority, _gpus_needed(w), w.submit_time_s, w.id))


# name -> (order, best_fit)
BASELINE_ORDERS: dict[str, tuple[Callable[[Sequence[Workload]], list[Workload]], bool]] = {
    "fcfs": (_order_fcfs, False),
    "sjf": (_order_sjf, False),
    "priority": (_order_priority, False),
    "first-fit": (_order_decreasing, False),
    "best-fit": (_order_decreasing, True),
    # Not a baseline policy: an alternative seed that runs as many workloads as it
    # can (priority, then smallest first), for policies that count coverage first.
    "smallest-first": (_order_smallest, True),
}


def keep_running(
    index: Index, ledger: Ledger, allow_draining: bool = False, skip: frozenset[str] = frozenset()
) -> dict[str, Placement]:
    """Put running workloads (but those in ``skip``) back where they are (nodes
    ready, shape still valid)."""
    kept: dict[str, Placement] = {}
    for wid in sorted(index.current):
        if wid in skip:
            continue
        p = index.current[wid]
        w = index.workloads[wid]
        ok_states = (NodeState.READY, NodeState.DRAINING) if allow_draining else (NodeState.READY,)
        if not p.shards or any(
            s.node_id not in index.nodes or index.nodes[s.node_id].state not in ok_states for s in p.shards
        ):
            continue
        c = index.classes[index.workload_class[wid]]
        if w.training is not None:
            if c.current_option is None:
                continue
            opt = c.options[c.current_option]
            if not all(ledger.fits(s.node_id, s.gpus, 0, 0) for s in p.shards):
                continue
            p = Placement(wid, p.shards, opt.gpu_type)
        else:
            spec = w.inference
            assert spec is not None
            types = {index.nodes[s.node_id].gpu_type for s in p.shards}
            if len(types) != 1:
                continue
            t = types.pop()
            if spec.gpus_per_replica.get(t, 0) <= 0 or any(
                s.gpus != spec.gpus_per_replica[t] for s in p.shards
            ):
                continue
            if not all(ledger.fits(s.node_id, s.gpus, 0, 0) for s in p.shards):
                continue
            p = Placement(wid, p.shards, t)
        gpu_type = p.gpu_type or index.nodes[p.shards[0].node_id].gpu_type
        if not ledger.quota.allows(w.tenant, gpu_type, p.gpus):
            continue  # its tenant's quota no longer holds it
        ledger.place(w, p)
        kept[wid] = p
    return kept


def _price(ledger: Ledger, o: Option) -> float:
    return (ledger.index.types[o.gpu_type].cost_per_hour or 0.0) * o.gpus


def place_training(
    ledger: Ledger, w: Workload, c: WorkloadClass, best_fit: bool, prefer: str = "value"
) -> Placement | None:
    """Try the job's options best first: highest normalized throughput, or, with
    ``prefer="cost"``, cheapest $/hour."""
    opts = [o for o in c.options if o.kind in (OptionKind.SINGLE, OptionKind.GANG)]
    if prefer == "cost":
        opts.sort(
            key=lambda o: (_price(ledger, o), -o.value, o.kind is OptionKind.GANG, o.gpus, o.shape, o.scope)
        )
    else:
        opts.sort(key=lambda o: (-o.value, o.kind is OptionKind.GANG, o.gpus, o.shape, o.scope))
    for opt in opts:
        p = ledger.try_training(w, opt, best_fit)
        if p is not None:
            return p
    return None


def replicas_wanted(w: Workload, rps: float, cap: int) -> int:
    spec = w.inference
    assert spec is not None
    r = max(1, spec.min_replicas, math.ceil(spec.target_rps / rps - 1e-9))
    if spec.max_replicas is not None:
        r = min(r, spec.max_replicas)
    return min(r, cap) if cap else r


def place_service(
    ledger: Ledger,
    w: Workload,
    c: WorkloadClass,
    best_fit: bool,
    prefer: str = "value",
    gpu_value: Mapping[str, float] | None = None,
) -> Placement | None:
    """The type with the most requests/s per GPU (or, with ``prefer="cost"``, per $).
    With ``gpu_value`` (what one more GPU of each type is worth to the objective:
    the LP's shadow prices), the type whose GPUs the replicas it needs are worth
    least, then the most requests/s per GPU: serving costs the others that much."""
    spec = w.inference
    assert spec is not None
    by_type = options_by_type(c)
    if gpu_value is not None and prefer != "cost":
        order = sorted(
            by_type,
            key=lambda t: (
                gpu_value.get(t, 0.0) * by_type[t][0].gpus * replicas_wanted(w, by_type[t][0].value, 0),
                -by_type[t][0].value / by_type[t][0].gpus,
                t,
            ),
        )
    elif prefer == "cost":
        # The $/hour of the whole replicas it takes (not per request/s: 8.8 req/s on
        # 4.3 req/s replicas takes 3 of them), then requests/s per $.
        order = sorted(
            by_type,
            key=lambda t: (
                _price(ledger, by_type[t][0]) * replicas_wanted(w, by_type[t][0].value, 0),
                -by_type[t][0].value / max(1e-9, _price(ledger, by_type[t][0])),
                t,
            ),
        )
    else:
        order = sorted(by_type, key=lambda t: (-by_type[t][0].value / by_type[t][0].gpus, t))
    for t in order:
        opts = by_type[t]
        want = replicas_wanted(w, opts[0].value, 0)
        shards = ledger.try_service(w, opts, want, c.spread_units, best_fit)
        p = Placement(w.id, tuple(shards), t)
        if len(shards) >= max(1, spec.min_replicas):
            return p
        if shards:
            ledger.release(w, p)
    return None


def _make_room_for_service(
    index: Index,
    w: Workload,
    out: dict[str, Placement],
    placed: Mapping[str, Placement],
    ledger: Ledger,
    evictable: Callable[[str, int], bool],
) -> bool:
    """Place service ``w`` (its minimum replicas, spread kept) by evicting strictly
    lower-priority single-node work on nodes of its types, lowest priority and
    largest first, one at a time until it fits; if it never does, nothing changes."""
    c = index.classes[index.workload_class[w.id]]
    shapes = {o.shape for o in c.options}
    victims = sorted(
        {
            h
            for s in shapes
            for nid in index.shapes[s].node_ids
            for h, _ in ledger.holders.get(nid, [])
            if h in out and evictable(h, w.priority)
        },
        key=lambda h: (index.workloads[h].priority, -out[h].gpus, h),
    )
    evicted: list[str] = []
    for victim in [None, *victims]:
        if victim is not None:
            ledger.release(index.workloads[victim], out.pop(victim))
            evicted.append(victim)
        p = place_service(ledger, w, c, best_fit=True)
        if p is not None:
            out[w.id] = p
            return True
    for h in evicted:
        ledger.place(index.workloads[h], placed[h])
        out[h] = placed[h]
    return False


def place_one(
    ledger: Ledger,
    w: Workload,
    best_fit: bool,
    prefer: str = "value",
    gpu_value: Mapping[str, float] | None = None,
) -> Placement | None:
    """Place one workload on what the ledger has free (and record it)."""
    if ledger.open_nodes <= 0:
        return None  # every ready node is full: with many more workloads than GPUs, most calls end here
    c = ledger.index.classes[ledger.index.workload_class[w.id]]
    if w.training is not None:
        return place_training(ledger, w, c, best_fit, prefer)
    return place_service(ledger, w, c, best_fit, prefer, gpu_value)


def greedy_place(
    index: Index, order_name: str = "best-fit", ledger: Ledger | None = None, prefer: str = "value"
) -> dict[str, Placement]:
    """Place workloads greedily; returns workload id -> placement."""
    order, best_fit = BASELINE_ORDERS[order_name]
    ledger = ledger if ledger is not None else Ledger(index)
    placed = keep_running(index, ledger)
    for w in order(list(index.problem.workloads)):
        if w.id in placed:
            continue
        got = place_one(ledger, w, best_fit, prefer)
        if got is not None:
            placed[w.id] = got
    return placed


def complete(
    index: Index,
    placed: dict[str, Placement],
    prefer: str = "value",
    tier: int | None = None,
    order_name: str = "best-fit",
    gpu_value: Mapping[str, float] | None = None,
) -> dict[str, Placement]:
    """Keep ``placed`` and, in best-fit order (priority first; or another of
    ``BASELINE_ORDERS``), add every other workload (of priority ``tier`` only, if
    given) that fits in what is left and give services below their target the
    replicas that fit. Turns a stage's solution (which ignores lower tiers) into
    a full hint, and fills what packing or a time limit left free."""
    out = dict(placed)
    ledger = Ledger.holding(index, out)
    workloads = [w for w in index.problem.workloads if tier is None or w.priority == tier]
    # What runs now and is not placed yet goes back where it runs, if that is free:
    # re-placing it elsewhere would be a migration for nothing.
    others = frozenset(w.id for w in index.problem.workloads if tier is not None and w.priority != tier)
    out.update(keep_running(index, ledger, skip=frozenset(out) | others))
    order, best_fit = BASELINE_ORDERS[order_name]
    for w in order(workloads):
        c = index.classes[index.workload_class[w.id]]
        p = out.get(w.id)
        if p is None:
            got = place_one(ledger, w, best_fit, prefer, gpu_value)
            if got is not None:
                out[w.id] = got
        elif w.inference is not None and p.shards:
            opts = [o for o in c.options if o.gpu_type == p.gpu_type]
            if opts and len(p.shards) < replicas_wanted(w, opts[0].value, 0):
                want = replicas_wanted(w, opts[0].value, 0)
                more = ledger.try_service(w, opts, want, c.spread_units, best_fit, None, p.shards)
                if more:
                    out[w.id] = Placement(w.id, (*p.shards, *more), p.gpu_type)
    return out


def repair_priority(
    index: Index, placed: dict[str, Placement], max_migrations: int | None
) -> dict[str, Placement]:
    """Strict priority on concrete nodes: an unplaced training job that would fit
    on one node if strictly-lower-priority single-node work there were evicted
    takes that node, and the evicted work is unplaced (the caller re-fills); an
    unplaced service likewise gets its minimum replicas where evicting such work
    makes room (:func:`_make_room_for_service`). Running work is never evicted when
    a migration cap is set, nor is a non-preemptible running job. A safety net for
    plans cut short by the time limit or by packing, and for a solver's solution
    that keeps a tier's coverage by serving its other services more (found on the
    ``trtllm`` family: a priority-10 service left out beside priority-0 jobs); an
    optimal plan needs no repair."""
    out = dict(placed)
    ledger = Ledger.holding(index, out)

    def evictable(holder: str, below: int) -> bool:
        w = index.workloads[holder]
        if w.priority >= below or w.training is None or len(out[holder].shards) != 1:
            return False
        return not (holder in index.current and (max_migrations is not None or not w.training.preemptible))

    pending = sorted(
        (w for w in index.problem.workloads if w.id not in out and w.id in index.workload_class),
        key=lambda w: (-w.priority, w.id),
    )
    for w in pending:
        if w.priority == min(index.tiers, default=0):
            break
        c = index.classes[index.workload_class[w.id]]
        if w.inference is not None:
            _make_room_for_service(index, w, out, placed, ledger, evictable)
            continue
        for opt in sorted((o for o in c.options if o.kind is OptionKind.SINGLE), key=lambda o: -o.value):
            done = False
            for nid in index.shapes[opt.shape].node_ids:
                if nid in ledger.exclusive:
                    continue
                victims = sorted(
                    (h for h, _ in ledger.holders.get(nid, []) if h in out and evictable(h, w.priority)),
                    key=lambda h: (index.workloads[h].priority, -out[h].gpus, h),
                )
                free = ledger.free[nid].gpus
                chosen: list[str] = []
                for h in victims:
                    if free >= opt.gpus:
                        break
                    chosen.append(h)
                    free += out[h].gpus
                if free < opt.gpus or not chosen:
                    continue
                for h in chosen:
                    ledger.release(index.workloads[h], out.pop(h))
                new = ledger.try_training(w, opt)
                if new is None:  # host resources or quota still bind: undo
                    for h in chosen:
                        hp = placed.get(h)
                        if hp is not None:
                            ledger.place(index.workloads[h], hp)
                            out[h] = hp
                    continue
                out[w.id] = new
                done = True
                break
            if done:
                break
    return out


def improve(
    index: Index, placed: dict[str, Placement], prefer: str = "value", deadline: float = math.inf
) -> dict[str, Placement]:
    """Local improvement that keeps the same workloads running: each placed
    training job that does not run now (moving running work would be a
    migration), worst first, moves to a better option of its own where room is
    free: higher normalized throughput, or with ``prefer="cost"`` a lower $/hour.
    Coverage, demand and priorities are unchanged; only the objective can rise."""
    out = dict(placed)
    ledger = Ledger.holding(index, out)

    def score(o: Option) -> float:
        return -_price(ledger, o) if prefer == "cost" else o.value

    movable: list[tuple[float, str, Option]] = []
    for wid, p in out.items():
        w = index.workloads[wid]
        if w.training is None or wid in index.current:
            continue
        c = index.classes[index.workload_class[wid]]
        mine = [
            o
            for o in c.options
            if o.gpu_type == p.gpu_type
            and o.gpus == p.gpus
            and o.kind in (OptionKind.SINGLE, OptionKind.GANG)
        ]
        if mine:
            movable.append((score(mine[0]), wid, mine[0]))
    if prefer == "cost":
        _cheaper_services(index, ledger, out, deadline)
    for now_score, wid, _o in sorted(movable):
        w = index.workloads[wid]
        c = index.classes[index.workload_class[wid]]
        better = [
            o
            for o in c.options
            if o.kind in (OptionKind.SINGLE, OptionKind.GANG) and score(o) > now_score + 1e-12
        ]
        if not better:
            continue
        old = out[wid]
        ledger.release(w, old)
        for o in sorted(better, key=lambda o: (-score(o), o.gpus, o.shape, o.scope)):
            got = ledger.try_training(w, o)
            if got is not None:
                out[wid] = got
                break
        else:
            ledger.place(w, old)
    return out


#: Repacks per pass of ``_cheaper_services`` (each re-places every service of a type:
#: a few hundred at 10k workloads).
_MAX_REPACKS = 8


def _cheaper_services(index: Index, ledger: Ledger, out: dict[str, Placement], deadline: float) -> None:
    """Services that do not run now, most expensive first, move to the type whose
    whole replicas cost the least $/hour, where room is free and the served
    fraction does not drop (so coverage and demand are unchanged)."""

    def served(w: Workload, t: str, replicas: int) -> float:
        spec = w.inference
        assert spec is not None
        return min(1.0, replicas * spec.replica_rps.get(t, 0.0) / spec.target_rps)

    def saving_per_gpu(w: Workload, p: Placement) -> float:
        """The most $/hour a move to another type saves per GPU it takes there."""
        spec = w.inference
        assert spec is not None and p.gpu_type is not None
        now = (index.types[p.gpu_type].cost_per_hour or 0.0) * p.gpus
        best = 0.0
        for t, g in spec.gpus_per_replica.items():
            rps = spec.replica_rps.get(t, 0.0)
            if (
                t == p.gpu_type
                or rps <= 0
                or g <= 0
                or (w.allowed_gpu_types and t not in w.allowed_gpu_types)
            ):
                continue
            want = replicas_wanted(w, rps, 0)
            best = max(best, (now - (index.types[t].cost_per_hour or 0.0) * g * want) / (g * want))
        return best

    # Largest saving per GPU first: room on the cheap types goes where it saves most.
    todo = []
    for wid, p in out.items():
        w = index.workloads[wid]
        if w.inference is None or wid in index.current or not p.shards or p.gpu_type is None:
            continue
        if w.id not in index.workload_class:
            continue
        price = (index.types[p.gpu_type].cost_per_hour or 0.0) * p.shards[0].gpus * len(p.shards)
        gain = saving_per_gpu(w, p)
        if gain > 0:
            todo.append((-gain, -price, wid))
    repacks = 0  # each packs a whole type again: a few at most
    for _gain, neg_price, wid in sorted(todo):
        if clock.now() > deadline:
            break
        w = index.workloads[wid]
        c = index.classes[index.workload_class[wid]]
        old = out[wid]
        assert old.gpu_type is not None
        need = served(w, old.gpu_type, len(old.shards))
        by_type: dict[str, list[Option]] = {}
        for o in c.options:
            by_type.setdefault(o.gpu_type, []).append(o)
        better = []
        for t, opts in by_type.items():
            if t == old.gpu_type:
                continue
            want = replicas_wanted(w, opts[0].value, 0)
            cost = _price(ledger, opts[0]) * want
            if cost < -neg_price - 1e-9 and served(w, t, want) >= need - 1e-9:
                better.append((cost, t, want))
        if not better:
            continue
        ledger.release(w, old)
        for _cost, t, want in sorted(better):
            shards = ledger.try_service(w, by_type[t], want, c.spread_units)
            new = Placement(wid, tuple(shards), t)
            if len(shards) == want:
                out[wid] = new
                break
            if shards:
                ledger.release(w, new)
            if repacks >= _MAX_REPACKS or clock.now() > deadline:
                continue
            repacks += 1
            got = _repack(index, ledger, out, w, by_type[t], want)
            if got is not None:
                out[wid] = got
                break
        else:
            ledger.place(w, old)


def _repack(
    index: Index, ledger: Ledger, out: dict[str, Placement], w: Workload, opts: list[Option], want: int
) -> Placement | None:
    """Place ``want`` replicas of service ``w`` on the type of ``opts`` by packing that
    type's services again, ``w`` first, then the others (that do not run now) largest
    replicas first, each with as many replicas as it has: small replicas spread over
    many nodes can leave no node whole for a large one. All or nothing: on failure
    everything is as it was (and ``w`` is not placed)."""
    t = opts[0].gpu_type
    others = sorted(
        (
            x
            for x, p in out.items()
            if x != w.id
            and p.gpu_type == t
            and index.workloads[x].inference is not None
            and x not in index.current
        ),
        key=lambda x: (-out[x].shards[0].gpus, x),
    )
    if not others:
        return None
    before = {x: out[x] for x in others}
    for x in others:
        ledger.release(index.workloads[x], before[x])
    placed: dict[str, Placement] = {}
    c = index.classes[index.workload_class[w.id]]
    shards = ledger.try_service(w, opts, want, c.spread_units)
    ok = len(shards) == want
    if shards:
        placed[w.id] = Placement(w.id, tuple(shards), t)
    for x in others if ok else ():
        xw = index.workloads[x]
        xc = index.classes[index.workload_class[x]]
        xs = ledger.try_service(
            xw, [o for o in xc.options if o.gpu_type == t], len(before[x].shards), xc.spread_units
        )
        if xs:
            placed[x] = Placement(x, tuple(xs), t)
        if len(xs) != len(before[x].shards):
            ok = False
            break
    if ok:
        for x in others:
            out[x] = placed[x]
        return placed[w.id]
    for x, p in placed.items():
        ledger.release(index.workloads[x], p)
    for x in others:
        ledger.place(index.workloads[x], before[x])
    return None
