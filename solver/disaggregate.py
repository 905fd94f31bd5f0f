"""Disaggregation: turn counts per (class, option) into concrete placements.

Order, so that what is pinned goes first and what is flexible fills the gaps:

1. running workloads that the solution keeps where they are (exact nodes);
2. gangs, on whole idle nodes of their shape and scope;
3. service replicas, per option, spread over failure units;
4. single-node jobs, largest first, best-fit within their shape.

A member the packing cannot put where the solution said is tried on its other
options (best value first); if none fits it stays unplaced with reason
PACKING. Members of a class are assigned in id order, higher tiers first, so
the result is deterministic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from solver.aggregate import Index, OptionKind
from solver.greedy import place_training
from solver.model import Placement, Shard, Workload
from solver.packing import Ledger, in_scope

__all__ = ["disaggregate"]


def disaggregate(
    index: Index,
    counts: Mapping[tuple[int, int], int],
    preplaced: Mapping[str, Placement] | None = None,
) -> tuple[dict[str, Placement], set[str]]:
    """Returns (placements by workload id, ids that lost their slot in packing).
    ``preplaced`` placements are taken as they are, first; ``counts`` of their
    classes are ignored."""
    ledger = Ledger(index)
    placed: dict[str, Placement] = {}
    lost: set[str] = set()
    fixed_classes: set[int] = set()
    for wid, p in sorted((preplaced or {}).items()):
        ledger.place(index.workloads[wid], p)
        placed[wid] = p
        fixed_classes.add(index.workload_class[wid])
    remaining: dict[tuple[int, int], int] = {k: n for k, n in counts.items() if k[0] not in fixed_classes}
    todo: dict[int, list[Workload]] = {
        c.index: sorted((w for w in c.members if w.id not in placed), key=lambda w: w.id)
        for c in index.classes
    }

    # 1. keep what runs where it runs (training: the class's current option).
    for c in index.classes:
        if not c.is_training or c.current_option is None:
            continue
        keep = remaining.get((c.index, c.current_option), 0)
        for w in list(todo[c.index]):
            if keep <= 0:
                break
            now = index.current.get(w.id)
            if now is None:
                continue
            if all(ledger.fits(s.node_id, s.gpus, 0, 0) for s in now.shards):
                stay = Placement(w.id, now.shards, c.options[c.current_option].gpu_type)
                ledger.place(w, stay)
                placed[w.id] = stay
                todo[c.index].remove(w)
                keep -= 1
                remaining[c.index, c.current_option] -= 1
    # Services: keep running replicas the solution keeps on their option.
    service_kept: dict[int, list[Shard]] = defaultdict(list)
    for c in index.classes:
        if c.is_training or not c.current_replicas:
            continue
        w = c.members[0]
        cur = index.current[w.id]
        for o, _n in sorted(c.current_replicas.items()):
            want = min(remaining.get((c.index, o), 0), c.current_replicas[o])
            opt = c.options[o]
            for shard in cur.shards:
                if want <= 0:
                    break
                if index.node_shape.get(shard.node_id) != opt.shape or shard.gpus != opt.gpus:
                    continue
                if opt.scope != ("any",) and not in_scope(index.nodes[shard.node_id], opt.scope):
                    continue
                if shard in service_kept[c.index] and service_kept[c.index].count(shard) >= cur.shards.count(
                    shard
                ):
                    continue
                if ledger.fits(shard.node_id, opt.gpus, opt.cpus, opt.memory_gib):
                    ledger.take(w, shard.node_id, opt.gpus, opt.cpus, opt.memory_gib)
                    ledger.quota.take(w.tenant, opt.gpu_type, opt.gpus)
                    service_kept[c.index].append(shard)
                    want -= 1
                    remaining[c.index, o] -= 1

    # Members per option, in id order, higher tiers first.
    wanted: list[tuple[int, int, int, Workload]] = []  # (tier, class, option, workload)
    for c in sorted(index.classes, key=lambda c: (-c.tier, c.index)):
        if not c.is_training:
            continue
        members = todo[c.index]
        for o in range(len(c.options)):
            for _ in range(max(0, remaining.get((c.index, o), 0))):
                if not members:
                    break
                wanted.append((c.tier, c.index, o, members.pop(0)))

    def fallback(w: Workload, ci: int) -> None:
        p = place_training(ledger, w, index.classes[ci], best_fit=True)
        if p is None:
            lost.add(w.id)
        else:
            placed[w.id] = p

    # 2. gangs bound to a zone or domain (and STAY on draining nodes).
    for _tier, ci, o, w in wanted:
        opt = index.classes[ci].options[o]
        if opt.kind is OptionKind.GANG and opt.scope == ("any",):
            continue
        if opt.kind is OptionKind.STAY:
            p = index.current[w.id]
            p = Placement(w.id, p.shards, opt.gpu_type)
            ledger.place(w, p)
            placed[w.id] = p
        elif opt.kind is OptionKind.GANG:
            got = ledger.try_training(w, opt)
            if got is None:
                fallback(w, ci)
            else:
                placed[w.id] = got

    # 3. services bound to zones or domains, then the other services, largest replicas
    # first (services are few, and their demand is a stage of its own: they pack before
    # jobs); 4. gangs that may go anywhere; 5. single-node jobs, largest first
    # (first-fit decreasing), then by tier. If that loses a service, steps 3-5 are
    # packed again from the same start with the services it lost first (most
    # constrained first, learned from the failure: on the trtllm family, node-spread
    # services packed after zone-spread ones found free GPUs on too few nodes and 3-13
    # were lost from every solution; always packing node-spread services first instead
    # cost the 10k fairness plan of bench.instances its minimum: gap 0.13% -> 42%).
    items: list[tuple[int, int, int, int, str, int, int, Workload | None]] = []
    for c in index.classes:
        if c.is_training:
            continue
        per = [o for (ci, o), n in remaining.items() if ci == c.index and n > 0]
        gpus = max((c.options[o].gpus for o in per), default=0)
        if per or service_kept.get(c.index):
            spread = c.members[0].inference.spread.value  # type: ignore[union-attr]
            located = 0 if spread in ("zone", "domain") else 1
            items.append(
                (located, -gpus, 0 if spread == "node" else 1, -c.tier, c.members[0].id, c.index, -1, None)
            )
    for tier, ci, o, w in wanted:
        opt = index.classes[ci].options[o]
        if opt.kind is OptionKind.SINGLE:
            items.append((3, -opt.gpus, 1, -tier, w.id, ci, o, w))
        elif opt.kind is OptionKind.GANG and opt.scope == ("any",):
            items.append((2, -opt.gpus, 1, -tier, w.id, ci, o, w))
    items.sort(key=lambda x: x[:5])
    before = (dict(placed), set(lost), {k: list(v) for k, v in service_kept.items()})
    got_placed, got_lost = _pack_rest(index, ledger, items, remaining, service_kept)
    lost_services = {w for w in got_lost if index.workloads[w].inference is not None}
    if lost_services:
        first = sorted((x for x in items if x[4] in lost_services), key=lambda x: x[:5])
        again = first + [x for x in items if x[4] not in lost_services]
        ledger2 = Ledger.holding(index, before[0])
        for ci, shards in before[2].items():
            w = index.classes[ci].members[0]
            for shard in shards:
                opt = next(
                    o for o in index.classes[ci].options if index.node_shape.get(shard.node_id) == o.shape
                )
                ledger2.take(w, shard.node_id, shard.gpus, opt.cpus, opt.memory_gib)
                ledger2.quota.take(w.tenant, opt.gpu_type, shard.gpus)
        placed2, lost2 = _pack_rest(index, ledger2, again, remaining, before[2])
        lost_services2 = {w for w in lost2 if index.workloads[w].inference is not None}
        if (len(lost_services2), len(lost2)) < (len(lost_services), len(got_lost)):
            got_placed, got_lost = placed2, lost2
    placed.update(got_placed)
    lost |= got_lost
    return placed, lost


def _pack_rest(
    index: Index,
    ledger: Ledger,
    items: list[tuple[int, int, int, int, str, int, int, Workload | None]],
    remaining: Mapping[tuple[int, int], int],
    service_kept: Mapping[int, list[Shard]],
) -> tuple[dict[str, Placement], set[str]]:
    """Steps 3-5 of :func:`disaggregate` in the order of ``items``: the placements made and
    the ids lost (recorded in ``ledger``)."""
    placed: dict[str, Placement] = {}
    lost: set[str] = set()
    for *_key, ci, o, member in items:
        if member is not None:
            opt = index.classes[ci].options[o]
            got = ledger.try_training(member, opt, best_fit=True)
            if got is None:
                got = place_training(ledger, member, index.classes[ci], best_fit=True)
            if got is None:
                lost.add(member.id)
            else:
                placed[member.id] = got
            continue
        c = index.classes[ci]
        w = c.members[0]
        per_option = {o: n for (cj, o), n in remaining.items() if cj == c.index and n > 0}
        kept = list(service_kept.get(c.index, []))
        types = {c.options[o].gpu_type for o in per_option} | (
            {index.nodes[kept[0].node_id].gpu_type} if kept else set()
        )
        t = sorted(types)[0]
        opts = [opt for opt in c.options if opt.gpu_type == t]
        local = {opts.index(c.options[o]): n for o, n in per_option.items() if c.options[o].gpu_type == t}
        total = sum(local.values()) + len(kept)
        shards = ledger.try_service(w, opts, total, c.spread_units, True, local, kept) if local else []
        spec = w.inference
        assert spec is not None
        if len(shards) + len(kept) < total:
            # Packing left some out: try the other options of the same type.
            shards += ledger.try_service(w, opts, total, c.spread_units, True, None, [*kept, *shards])
        all_shards = tuple(kept) + tuple(shards)
        if len(all_shards) >= max(1, spec.min_replicas):
            placed[w.id] = Placement(w.id, all_shards, t)
        else:
            if all_shards:
                ledger.release(w, Placement(w.id, all_shards, t))
            lost.add(w.id)
    return placed, lost
