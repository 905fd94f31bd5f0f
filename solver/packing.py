"""Concrete nodes: what is free where, and how to put one workload on them.

:class:`Ledger` tracks free GPUs, CPUs and memory per node and finds nodes for
one item (a job on one node, a gang on whole nodes, a service's replicas). It
is used by the greedy baselines, by the disaggregation of the aggregated
solution and by the explanations ("would it fit if...").
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass

from solver import clock
from solver.aggregate import Index, Option, OptionKind, scope_of_nodes
from solver.model import Node, Placement, Shard, Spread, Workload

__all__ = [
    "Ledger",
    "Quota",
    "in_scope",
    "lowest_priority_by_type",
    "served_fraction",
    "spread_fits",
    "spread_unit",
]


@dataclass
class _Free:
    gpus: int
    cpus: float
    memory_gib: float


class Quota:
    """GPUs held per tenant (and per tenant and type) against their limits."""

    def __init__(self, index: Index) -> None:
        self.limits = {t.name: t for t in index.problem.tenants}
        self.used: dict[str, int] = defaultdict(int)
        self.used_type: dict[tuple[str, str], int] = defaultdict(int)

    def allows(self, tenant: str, gpu_type: str, gpus: int) -> bool:
        lim = self.limits.get(tenant)
        if lim is None:
            return True
        if lim.max_gpus is not None and self.used[tenant] + gpus > lim.max_gpus:
            return False
        cap = lim.max_gpus_per_type.get(gpu_type)
        return cap is None or self.used_type[tenant, gpu_type] + gpus <= cap

    def take(self, tenant: str, gpu_type: str, gpus: int) -> None:
        self.used[tenant] += gpus
        self.used_type[tenant, gpu_type] += gpus


class Ledger:
    """Free capacity of every node, with buckets by free GPUs per node shape so
    that first-fit and best-fit searches do not scan every node."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.order = {n.id: i for i, n in enumerate(index.problem.nodes)}
        self.free: dict[str, _Free] = {n.id: _Free(n.gpus, n.cpus, n.memory_gib) for n in index.problem.nodes}
        self.exclusive: set[str] = set()  # nodes held whole by a gang
        self.holders: dict[str, list[tuple[str, int]]] = defaultdict(list)  # node -> (workload, gpus)
        # shape -> free gpus -> sorted node positions
        self.buckets: dict[int, dict[int, list[int]]] = {s.index: defaultdict(list) for s in index.shapes}
        self.by_pos = [n.id for n in index.problem.nodes]
        for s in index.shapes:
            for nid in s.node_ids:
                bisect.insort(self.buckets[s.index][s.gpus], self.order[nid])
        self.quota = Quota(index)
        # ready nodes with a free GPU: at 0 nothing more fits anywhere, and searches stop at once
        self.open_nodes = sum(len(s.node_ids) for s in index.shapes if s.gpus > 0)
        self.freed: dict[int, int] = defaultdict(int)  # shape -> times a node became whole
        self._gang_miss: dict[Option, int] = {}  # option -> ``freed`` when it last found nothing
        # Work is counted per node checked, taken or released (solver.clock).
        self._clock = clock.current()
        self._clock.work += clock.LEDGER_CHECK * len(self.free)

    @classmethod
    def holding(cls, index: Index, placed: Mapping[str, Placement], but: Set[str] = frozenset()) -> Ledger:
        """A ledger with ``placed`` recorded, except the workloads in ``but``."""
        ledger = cls(index)
        for wid, p in sorted(placed.items()):
            if wid not in but:
                ledger.place(index.workloads[wid], p)
        return ledger

    # -- bookkeeping ------------------------------------------------------------------

    def _move(self, node_id: str, before: int, after: int) -> None:
        si = self.index.node_shape.get(node_id)
        if si is None:
            return
        pos = self.order[node_id]
        self.open_nodes += (after > 0) - (before > 0)
        if after == self.index.shapes[si].gpus:
            self.freed[si] += 1  # a node became whole again: gang searches may succeed now
        b = self.buckets[si][before]
        i = bisect.bisect_left(b, pos)
        if i < len(b) and b[i] == pos:
            b.pop(i)
        bisect.insort(self.buckets[si][after], pos)

    def take(self, workload: Workload, node_id: str, gpus: int, cpus: float, memory_gib: float) -> None:
        self._clock.work += clock.LEDGER_CHECK
        f = self.free[node_id]
        self._move(node_id, f.gpus, f.gpus - gpus)
        f.gpus -= gpus
        f.cpus -= cpus
        f.memory_gib -= memory_gib
        self.holders[node_id].append((workload.id, gpus))

    def place(self, workload: Workload, placement: Placement) -> None:
        """Record a whole placement (GPUs, host resources, quota)."""
        node_type = ""
        for shard in placement.shards:
            node = self.index.nodes[shard.node_id]
            node_type = node.gpu_type
            cpus, mem = _host_need(workload, shard.gpus)
            if len(placement.shards) > 1 and workload.training is not None:
                f = self.free[node.id]
                cpus, mem = max(0.0, f.cpus), max(0.0, f.memory_gib)
                self.exclusive.add(node.id)
            self.take(workload, node.id, shard.gpus, cpus, mem)
        self.quota.take(workload.tenant, node_type, placement.gpus)

    # -- searches ---------------------------------------------------------------------

    def fits(self, node_id: str, gpus: int, cpus: float, memory_gib: float) -> bool:
        self._clock.work += clock.LEDGER_CHECK
        n = self.index.nodes[node_id]
        f = self.free[node_id]
        if node_id in self.exclusive or f.gpus < gpus:
            return False
        return (n.cpus <= 0 or f.cpus + 1e-9 >= cpus) and (
            n.memory_gib <= 0 or f.memory_gib + 1e-9 >= memory_gib
        )

    def candidates(self, shape: int, gpus: int, best_fit: bool) -> Iterator[str]:
        """Nodes of a shape with at least ``gpus`` free, best-fit or first-fit order.
        Lazy: callers take a node and stop, so no bucket is copied or sorted whole
        (the ledger must not change while the iterator is used)."""
        buckets = self.buckets[shape]
        levels = sorted(lv for lv, b in buckets.items() if lv >= gpus and b)
        work = self._clock
        if best_fit:
            for lv in levels:
                for pos in buckets[lv]:
                    work.work += clock.LEDGER_LOOK
                    yield self.by_pos[pos]
        else:
            for pos in heapq.merge(*(buckets[lv] for lv in levels)):
                work.work += clock.LEDGER_LOOK
                yield self.by_pos[pos]

    def find_single(self, option: Option, best_fit: bool = True, prefer: str | None = None) -> str | None:
        if (
            prefer is not None
            and self.index.node_shape.get(prefer) == option.shape
            and self.fits(prefer, option.gpus, option.cpus, option.memory_gib)
        ):
            return prefer
        for nid in self.candidates(option.shape, option.gpus, best_fit):
            if self.fits(nid, option.gpus, option.cpus, option.memory_gib):
                return nid
        return None

    def find_gang(self, option: Option) -> list[str] | None:
        """``option.nodes`` whole idle nodes of the shape inside the option's scope,
        preferring one domain (the one with the fewest idle nodes that suffice)."""
        shape = self.index.shapes[option.shape]
        full = self.buckets[shape.index].get(shape.gpus, [])
        if len(full) < option.nodes:  # the common case in a full cluster: decide at once
            return None
        if self._gang_miss.get(option) == self.freed[shape.index]:
            return None  # nothing became whole since this search last failed
        self._clock.work += clock.LEDGER_CHECK * len(full)
        idle = [self.by_pos[p] for p in full]
        idle = [nid for nid in idle if not self.holders.get(nid) and nid not in self.exclusive]
        nodes = self.index.nodes
        if option.scope[0] == "domain":
            zone, domain = option.scope[1], option.scope[2]
            idle = [nid for nid in idle if nodes[nid].domain == domain and nodes[nid].zone == zone]
        elif option.scope[0] == "domains":
            zone, size = option.scope[1], int(option.scope[2])
            idle = [
                nid
                for nid in idle
                if nodes[nid].zone == zone and shape.by_domain.get((zone, nodes[nid].domain), 0) == size
            ]
        elif option.scope[0] == "zone":
            idle = [nid for nid in idle if nodes[nid].zone == option.scope[1]]
        if len(idle) < option.nodes:
            self._gang_miss[option] = self.freed[shape.index]
            return None
        by_domain: dict[tuple[str, str], list[str]] = defaultdict(list)
        for nid in idle:
            n = self.index.nodes[nid]
            by_domain[n.zone, n.domain].append(nid)
        fitting = [d for d, ids in by_domain.items() if len(ids) >= option.nodes]
        if fitting:
            d = min(fitting, key=lambda d: (len(by_domain[d]), d))
            return by_domain[d][: option.nodes]
        if option.scope[0] in ("domain", "domains"):  # must sit inside one domain
            self._gang_miss[option] = self.freed[shape.index]
            return None
        if option.scope[0] == "any":
            # Spread over zones only if no zone holds it.
            by_zone: dict[str, list[str]] = defaultdict(list)
            for nid in idle:
                by_zone[self.index.nodes[nid].zone].append(nid)
            zones = [z for z, ids in by_zone.items() if len(ids) >= option.nodes]
            if zones:
                z = min(zones, key=lambda z: (len(by_zone[z]), z))
                idle = by_zone[z]
        # Fill from the largest domains first to touch few domains.
        out: list[str] = []
        for _, ids in sorted(by_domain.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            out += [i for i in ids if i in set(idle)]
        return out[: option.nodes] if len(out) >= option.nodes else None

    def gang_placement(self, workload: Workload, option: Option, nodes: Sequence[str]) -> Placement:
        k = len(nodes)
        base, extra = divmod(option.gpus, k)
        shards = tuple(Shard(nid, base + (1 if i < extra else 0)) for i, nid in enumerate(nodes))
        return Placement(workload.id, shards, option.gpu_type)

    def try_training(self, workload: Workload, option: Option, best_fit: bool = True) -> Placement | None:
        if not self.quota.allows(workload.tenant, option.gpu_type, option.gpus):
            return None
        if option.kind is OptionKind.SINGLE:
            nid = self.find_single(option, best_fit)
            if nid is None:
                return None
            p = Placement(workload.id, (Shard(nid, option.gpus),), option.gpu_type)
        elif option.kind is OptionKind.GANG:
            nodes = self.find_gang(option)
            if nodes is None:
                return None
            p = self.gang_placement(workload, option, nodes)
        else:
            return None
        self.place(workload, p)
        return p

    def try_service(
        self,
        workload: Workload,
        options: Sequence[Option],
        replicas: int,
        units: Mapping[str, int],
        best_fit: bool = True,
        per_option: Mapping[int, int] | None = None,
        existing: Sequence[Shard] = (),
    ) -> list[Shard]:
        """Place replicas over the given options of one GPU type until the service
        has ``replicas`` (counting the ``existing`` ones, already recorded),
        honouring spread (no unit above ceil(replicas / units)). With
        ``per_option``, place that many on each option (indices into ``options``).
        Returns the new shards placed (and records them)."""
        spec = workload.inference
        assert spec is not None
        if not options:
            return []
        t = options[0].gpu_type
        g = options[0].gpus
        spread = spec.spread is not Spread.NONE and units.get(t, 0) > 0
        n_units = units.get(t, 0)
        cap_per_unit = math.ceil(replicas / n_units) if spread else replicas
        unit_count: dict[tuple[str, ...], int] = defaultdict(int)
        shards: list[Shard] = []
        have = len(existing)
        wanted = dict(per_option) if per_option is not None else None

        def unit_of(nid: str) -> tuple[str, ...]:
            return spread_unit(self.index.nodes[nid], spec.spread)

        for sh in existing:
            unit_count[unit_of(sh.node_id)] += 1
        while have + len(shards) < replicas:
            if not self.quota.allows(workload.tenant, t, g):
                break
            best: tuple[tuple[int, int, int], str] | None = None
            for oi, opt in enumerate(options):
                if wanted is not None and wanted.get(oi, 0) <= 0:
                    continue
                # Where the option's scope fixes the failure unit, every node in it
                # counts the same replicas, and the candidates come in the key's order:
                # the first that fits is the option's best (the scan of every node of
                # the shape per replica took 14 of 15 s of a 10k greedy seed).
                one_unit = _scope_fixes_unit(opt.scope, spec.spread)
                for nid in self.candidates(opt.shape, opt.gpus, best_fit):
                    if opt.scope != ("any",) and not in_scope(self.index.nodes[nid], opt.scope):
                        continue
                    u = unit_of(nid)
                    if unit_count[u] >= cap_per_unit:
                        if one_unit:
                            break  # every node of the option is in this full unit
                        continue
                    if not self.fits(nid, opt.gpus, opt.cpus, opt.memory_gib):
                        continue
                    key = (unit_count[u], self.free[nid].gpus if best_fit else 0, self.order[nid])
                    if best is None or key < best[0]:
                        best = (key, nid)
                        best_oi = oi
                    if spec.spread is Spread.NONE or one_unit:
                        break
            if best is None:
                break
            nid = best[1]
            opt = options[best_oi]
            self.take(workload, nid, opt.gpus, opt.cpus, opt.memory_gib)
            self.quota.take(workload.tenant, t, opt.gpus)
            unit_count[unit_of(nid)] += 1
            shards.append(Shard(nid, opt.gpus))
            if wanted is not None:
                wanted[best_oi] -= 1
        if spread:
            # The cap is ceil(R / units) for the replicas R actually placed: trim the
            # fullest unit until it holds.
            while shards:
                counts: dict[tuple[str, ...], list[Shard]] = defaultdict(list)
                for sh in [*existing, *shards]:
                    counts[unit_of(sh.node_id)].append(sh)
                fullest = max(
                    sorted(counts), key=lambda u: (len(counts[u]), any(x in shards for x in counts[u]))
                )
                if len(counts[fullest]) <= math.ceil((have + len(shards)) / n_units):
                    break
                if not any(x in shards for x in counts[fullest]):
                    break
                drop = [x for x in counts[fullest] if x in shards][-1]
                shards.remove(drop)
                self.release(workload, Placement(workload.id, (drop,), t))
        return shards

    def release(self, workload: Workload, placement: Placement) -> None:
        """Undo :meth:`place` (used when a service cannot reach its minimum)."""
        node_type = ""
        self._clock.work += clock.LEDGER_CHECK * len(placement.shards)
        for shard in placement.shards:
            node = self.index.nodes[shard.node_id]
            node_type = node.gpu_type
            cpus, mem = _host_need(workload, shard.gpus)
            if node.id in self.exclusive:
                self.exclusive.discard(node.id)
                cpus = node.cpus - self.free[node.id].cpus
                mem = node.memory_gib - self.free[node.id].memory_gib
            f = self.free[node.id]
            self._move(node.id, f.gpus, f.gpus + shard.gpus)
            f.gpus += shard.gpus
            f.cpus += cpus
            f.memory_gib += mem
            hs = self.holders[node.id]
            if (workload.id, shard.gpus) in hs:
                hs.remove((workload.id, shard.gpus))
        self.quota.used[workload.tenant] -= placement.gpus
        self.quota.used_type[workload.tenant, node_type] -= placement.gpus


def lowest_priority_by_type(index: Index, placed: Mapping[str, Placement]) -> dict[str, int]:
    """The lowest priority of the work on the nodes of each GPU type. A service may
    be taken out or made smaller only where no lower-priority work sits on a type
    it could use: else the verifier's strict-priority rule, which looks for room
    that lower tiers hold, could object."""
    lowest: dict[str, int] = {}
    for wid, p in placed.items():
        pr = index.workloads[wid].priority
        for s in p.shards:
            t = index.nodes[s.node_id].gpu_type
            lowest[t] = min(lowest.get(t, pr), pr)
    return lowest


def served_fraction(workload: Workload, gpu_type: str, replicas: int, resolution: int = 1000) -> float:
    """The served fraction of ``replicas`` of service ``workload`` on ``gpu_type`` as
    the model counts it: min(1, replicas * rps / target), rounded down to its
    variable's resolution (``Formulation.hint``)."""
    spec = workload.inference
    assert spec is not None
    f = min(1.0, replicas * spec.replica_rps.get(gpu_type, 0.0) / spec.target_rps)
    return math.floor(f * resolution) / resolution


def _scope_fixes_unit(scope: tuple[str, ...], spread: Spread) -> bool:
    """Whether every node in ``scope`` is in the same failure unit of ``spread``: a
    zone unit inside a zone, domain or domains scope (each names its zone), a domain
    unit inside a domain scope."""
    if spread is Spread.ZONE:
        return scope[0] in ("zone", "domain", "domains")
    if spread is Spread.DOMAIN:
        return scope[0] == "domain"
    return False


def spread_unit(node: Node, spread: Spread) -> tuple[str, ...]:
    """The failure unit of ``node`` that a service spread over ``spread`` counts."""
    if spread is Spread.ZONE:
        return (node.zone,)
    if spread is Spread.DOMAIN:
        return (node.zone, node.domain)
    if spread is Spread.NODE:
        return (node.id,)
    return ()


def spread_fits(index: Index, workload: Workload, gpu_type: str, shards: Sequence[Shard]) -> bool:
    """Whether ``shards`` of service ``workload`` on ``gpu_type`` keep its spread rule:
    no failure unit holds more than ceil(replicas / units) of them."""
    spec = workload.inference
    assert spec is not None
    units = index.classes[index.workload_class[workload.id]].spread_units.get(gpu_type, 0)
    if spec.spread is Spread.NONE or units <= 0:
        return True
    count: dict[tuple[str, ...], int] = defaultdict(int)
    for sh in shards:
        count[spread_unit(index.nodes[sh.node_id], spec.spread)] += 1
    return max(count.values(), default=0) <= math.ceil(len(shards) / units)


def in_scope(node: Node, scope: tuple[str, ...]) -> bool:
    """Whether a node lies inside a replica option's scope (any, a zone, a domain)."""
    if scope[0] == "any":
        return True
    return scope_of_nodes([node], scope[0]) == scope


def _host_need(workload: Workload, gpus: int) -> tuple[float, float]:
    if workload.training is not None:
        return gpus * workload.training.cpus_per_gpu, gpus * workload.training.memory_gib_per_gpu
    assert workload.inference is not None
    return workload.inference.cpus_per_replica, workload.inference.memory_gib_per_replica
