"""Why a workload is unplaced, short of its demand, or where it is.

Reasons are found by relaxation, constraint family by constraint family, not
by guessing from strings:

1. *static* families, checked against an empty cluster: a GPU type with the
   numbers, the memory and the permission (NO_GPU_TYPE), a ready node of such
   a type and selector (NO_NODE), a node or locality group large enough
   (TOO_LARGE), a quota large enough (QUOTA), enough failure units ;
2. *dynamic* families, checked against the plan: the workload is tried on the
   nodes as the plan leaves them, then with the tenant quota relaxed, then
   with the capacity held by equal-or-lower-priority work released, then with
   all capacity released. The first relaxation under which it fits names the
   binding constraint: QUOTA, CAPACITY (held by work the policy ranks at least
   as high) or HIGHER_PRIORITY; if it fits without any relaxation, the
   migration cap (MIGRATION_LIMIT) or the solver's time limit kept it out.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from solver.aggregate import Index, Option, OptionKind, usable_service_types, usable_training_types
from solver.model import Locality, Node, NodeState, Placement, Reason, ReasonCode, Workload
from solver.packing import Ledger

__all__ = ["Explainer"]


def _names(ids: Iterable[str], limit: int = 3) -> str:
    unique = set(ids)
    shown = ", ".join(heapq.nsmallest(limit, unique))
    return shown + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


@dataclass
class _Fit:
    fits: bool
    holders: tuple[str, ...] = ()


class Explainer:
    """Explains workloads against one plan. Ledgers with some work removed are
    built once per removal rule and reused for every workload."""

    def __init__(
        self, index: Index, placements: Mapping[str, Placement], gap: float | None, max_migrations: int | None
    ) -> None:
        self.index = index
        self.placements = placements
        self.gap = gap
        self.max_migrations = max_migrations
        self._ledgers: dict[tuple[str, int], Ledger] = {}
        self._by_type: dict[str, list[str]] = {}
        self._sorted = sorted(placements.items())
        for wid, p in self._sorted:
            t = p.gpu_type or (index.nodes[p.shards[0].node_id].gpu_type if p.shards else "")
            self._by_type.setdefault(t, []).append(wid)
        self._memo: dict[int, tuple[Reason, ...]] = {}
        self._holder_memo: dict[tuple[str, str, float], list[str]] = {}
        self._ready_memo: dict[tuple[frozenset[str], frozenset[tuple[str, str]]], list[Node]] = {}

    # -- ledgers -----------------------------------------------------------------------

    def ledger(self, rule: str, priority: int) -> Ledger:
        """Nodes as the plan leaves them, without the work ``rule`` releases:
        ``none``; ``lower-or-equal`` (priority <= p); ``all``; ``kept`` (running
        work that stays where it runs)."""
        key = (rule, priority if rule == "lower-or-equal" else 0)
        if key not in self._ledgers:
            led = Ledger(self.index)
            for wid, p in self._sorted:
                if not self._released(rule, priority, wid, p):
                    led.place(self.index.workloads[wid], p)
            self._ledgers[key] = led
        return self._ledgers[key]

    def _released(self, rule: str, priority: int, wid: str, p: Placement) -> bool:
        return (
            rule == "all"
            or (rule == "lower-or-equal" and self.index.workloads[wid].priority <= priority)
            or (rule == "kept" and self._stays(wid, p))
        )

    def _fits_under(
        self, fits: Callable[[Ledger, bool], bool], rule: str, priority: int, keep: str = ""
    ) -> bool:
        """Whether ``fits`` holds on the ledger of ``rule`` where workload ``keep`` is
        never released (a service short of its demand keeps its own replicas): it is
        put back on the shared ledger for the question, then taken off again."""
        led = self.ledger(rule, priority)
        p = self.placements.get(keep) if keep else None
        if p is None or not self._released(rule, priority, keep, p):
            return fits(led, True)
        w = self.index.workloads[keep]
        led.place(w, p)
        try:
            return fits(led, True)
        finally:
            led.release(w, p)

    def _stays(self, wid: str, p: Placement) -> bool:
        now = self.index.current.get(wid)
        return now is not None and sorted((s.node_id, s.gpus) for s in now.shards) == sorted(
            (s.node_id, s.gpus) for s in p.shards
        )

    def _holders(self, gpu_type: str, exclude: str, below: float = math.inf) -> list[str]:
        """Workloads placed on ``gpu_type`` (but ``exclude``) of priority below ``below``."""
        key = (gpu_type, exclude if exclude in self.placements else "", below)
        if key not in self._holder_memo:
            self._holder_memo[key] = [
                wid
                for wid in self._by_type.get(gpu_type, [])
                if wid != exclude and self.index.workloads[wid].priority < below
            ]
        return self._holder_memo[key]

    def _of_priority(self, ids: Iterable[str], priority: int) -> str:
        """ "workloads of equal priority (1)", or of the priorities they really have
        (a policy that does not order by priority, ``fcfs``, places lower ones first)."""
        have = sorted({self.index.workloads[h].priority for h in ids})
        if have == [priority]:
            return f"workloads of equal priority ({priority})"
        listed = ", ".join(str(p) for p in have)
        if have and have[-1] < priority:
            return f"lower-priority workloads (priority {listed}; this one has {priority})"
        return f"workloads of equal or lower priority ({listed}; this one has {priority})"

    def _ready_nodes(self, types: frozenset[str], selector: frozenset[tuple[str, str]]) -> list[Node]:
        """Ready nodes of ``types`` that carry the labels of ``selector`` (memoized)."""
        key = (types, selector)
        if key not in self._ready_memo:
            self._ready_memo[key] = [
                n
                for n in self.index.problem.nodes
                if n.state is NodeState.READY
                and n.gpu_type in types
                and all(n.labels.get(k) == v for k, v in selector)
            ]
        return self._ready_memo[key]

    # -- fitting one workload ----------------------------------------------------------

    def _fits_training(self, led: Ledger, w: Workload, opt: Option, quota: bool) -> bool:
        if quota and not led.quota.allows(w.tenant, opt.gpu_type, opt.gpus):
            return False
        if opt.kind is OptionKind.SINGLE:
            return led.find_single(opt) is not None
        if opt.kind is OptionKind.GANG:
            return led.find_gang(opt) is not None
        return False

    def _replica_slots(self, led: Ledger, w: Workload, opts: Sequence[Option]) -> int:
        spec = w.inference
        assert spec is not None
        slots = 0
        seen: set[str] = set()
        for opt in opts:
            for nid in led.candidates(opt.shape, opt.gpus, True):
                if nid in seen or not led.fits(nid, opt.gpus, opt.cpus, opt.memory_gib):
                    continue
                seen.add(nid)
                f = led.free[nid]
                n = self.index.nodes[nid]
                k = f.gpus // opt.gpus
                if n.cpus > 0 and opt.cpus > 0:
                    k = min(k, int(f.cpus // opt.cpus))
                if n.memory_gib > 0 and opt.memory_gib > 0:
                    k = min(k, int(f.memory_gib // opt.memory_gib))
                slots += max(0, k)
        return slots

    def _dynamic(
        self,
        w: Workload,
        gpu_type: str,
        fits: Callable[[Ledger, bool], bool],
        need: str,
        more: bool = False,
    ) -> Reason:
        """The first relaxation under which ``w`` (or, with ``more``, one more of its
        replicas) fits names the binding constraint."""
        keep = w.id if more else ""
        now = self.ledger("none", 0)
        if fits(now, False):
            if not fits(now, True):
                t = self.index.problem.tenants
                lim = next((x for x in t if x.name == w.tenant), None)
                used = now.quota.used[w.tenant]
                cap = lim.max_gpus if lim is not None else None
                per = lim.max_gpus_per_type.get(gpu_type) if lim is not None else None
                detail = f"holds {used} of {cap} GPUs" if cap is not None else ""
                if per is not None:
                    detail += ("; " if detail else "") + (
                        f"holds {now.quota.used_type[w.tenant, gpu_type]} of {per} {gpu_type} GPUs"
                    )
                return Reason(
                    ReasonCode.QUOTA,
                    f"on {gpu_type}: tenant {w.tenant!r} quota is exhausted ({detail}); needs {need}",
                )
            if self.max_migrations is not None:
                return Reason(
                    ReasonCode.MIGRATION_LIMIT,
                    f"on {gpu_type}: room is free, but max_migrations={self.max_migrations} "
                    "forbids the moves a better plan needs",
                )
            gap = f" (gap {self.gap:.2%})" if self.gap is not None else ""
            return Reason(
                ReasonCode.CAPACITY,
                f"on {gpu_type}: room for {need} is free, but the policy's objective did not "
                f"gain from it within the time limit{gap}",
            )
        if self.max_migrations is not None and self._fits_under(fits, "kept", 0, keep):
            movers = [h for h in self._holders(gpu_type, w.id) if self._stays(h, self.placements[h])]
            return Reason(
                ReasonCode.MIGRATION_LIMIT,
                f"on {gpu_type}: room for {need} would be free if running work moved "
                f"({_names(movers)}); max_migrations={self.max_migrations} forbids it",
            )
        if self._fits_under(fits, "lower-or-equal", w.priority, keep):
            holders = self._holders(gpu_type, w.id, w.priority + 1)
            lower = self._holders(gpu_type, w.id, w.priority)
            if lower and not self._fits_under(fits, "lower-or-equal", w.priority - 1, keep):
                lower = []
            who = lower or holders
            return Reason(
                ReasonCode.CAPACITY,
                f"on {gpu_type}: no room for {need}; the capacity is held by "
                f"{self._of_priority(who, w.priority)} that the policy values more: {_names(who)}",
            )
        if self._fits_under(fits, "all", 0, keep):
            holders = [
                h for h in self._holders(gpu_type, w.id) if self.index.workloads[h].priority > w.priority
            ]
            return Reason(
                ReasonCode.HIGHER_PRIORITY,
                f"on {gpu_type}: no room for {need}; the capacity is held by higher-priority "
                f"workloads: {_names(holders)}",
            )
        if more:
            return Reason(
                ReasonCode.CAPACITY,
                f"on {gpu_type}: no room for {need} even with every other workload gone; "
                "the nodes of this type are full",
            )
        return Reason(
            ReasonCode.PACKING, f"on {gpu_type}: {need} does not fit on the nodes even when they are empty"
        )

    # -- static checks -------------------------------------------------------------------

    def _static_training(self, w: Workload) -> list[Reason]:
        spec = w.training
        assert spec is not None
        idx = self.index
        types = idx.types
        need_g = min(s.gpus for s in spec.shapes)
        with_numbers = [t for t in types if any(s.throughput.get(t, 0) > 0 for s in spec.shapes)]
        allowed = [t for t in with_numbers if not w.allowed_gpu_types or t in w.allowed_gpu_types]
        if not with_numbers:
            return [
                Reason(ReasonCode.NO_GPU_TYPE, "no throughput is given for any GPU type in the inventory")
            ]
        if not allowed:
            return [
                Reason(
                    ReasonCode.NO_GPU_TYPE,
                    f"none of its allowed GPU types ({', '.join(w.allowed_gpu_types)}) has a throughput",
                )
            ]
        usable = usable_training_types(w, types)
        if not usable:
            largest = max(types[t].memory_gib for t in allowed)
            return [
                Reason(
                    ReasonCode.NO_GPU_TYPE,
                    f"needs {spec.gpu_memory_gib:g} GiB per GPU; the largest GPU type it may use has "
                    f"{largest:g} GiB",
                )
            ]
        selected = self._ready_nodes(frozenset(usable), frozenset(w.node_selector.items()))
        if not self._ready_nodes(frozenset(usable), frozenset()):
            return [Reason(ReasonCode.NO_NODE, f"no ready node of type {', '.join(sorted(usable))}")]
        if not selected:
            sel = ", ".join(f"{k}={v}" for k, v in sorted(w.node_selector.items()))
            return [Reason(ReasonCode.NO_NODE, f"no ready node of a usable type carries the labels {sel}")]
        c = idx.classes[idx.workload_class[w.id]]
        if not [o for o in c.options if o.kind is not OptionKind.STAY]:
            biggest = max(n.gpus for n in selected)
            if spec.locality is Locality.NODE:
                return [
                    Reason(
                        ReasonCode.TOO_LARGE,
                        f"needs {need_g} GPUs on one node (locality node); the largest usable node has "
                        f"{biggest}",
                    )
                ]
            if need_g <= biggest:
                return [
                    Reason(
                        ReasonCode.TOO_LARGE,
                        f"needs {need_g * spec.cpus_per_gpu:g} CPUs and {need_g * spec.memory_gib_per_gpu:g} "
                        "GiB of host memory on one node; no usable node has that much",
                    )
                ]
            scope = spec.locality.value
            kind = "of one kind (GPU type, size, host resources, labels that selectors name)"
            where = "there are not that many" if scope == "any" else f"no {scope} has that many"
            scoped = "" if scope == "any" else f" in one {scope}"
            return [
                Reason(
                    ReasonCode.TOO_LARGE, f"needs {need_g} GPUs on whole usable nodes {kind}{scoped}; {where}"
                )
            ]
        lim = next((t for t in idx.problem.tenants if t.name == w.tenant), None)
        if lim is not None:
            caps = [lim.max_gpus] if lim.max_gpus is not None else []
            per = [lim.max_gpus_per_type.get(t) for t in usable]
            if all(p is not None for p in per):
                caps.append(max(p for p in per if p is not None))
            if caps and min(caps) < need_g:
                return [
                    Reason(
                        ReasonCode.QUOTA,
                        f"needs {need_g} GPUs; tenant {w.tenant!r} may hold at most {min(caps)}",
                    )
                ]
        return []

    def _static_service(self, w: Workload) -> list[Reason]:
        spec = w.inference
        assert spec is not None
        idx = self.index
        usable = usable_service_types(w, idx.types)
        if not usable:
            return [
                Reason(
                    ReasonCode.NO_GPU_TYPE,
                    "no GPU type in the inventory has both gpus_per_replica and replica_rps for it"
                    + (" among its allowed types" if w.allowed_gpu_types else ""),
                )
            ]
        c = idx.classes[idx.workload_class[w.id]]
        if not c.options:
            return [
                Reason(
                    ReasonCode.NO_NODE,
                    f"no ready node of type {', '.join(sorted(usable))} can hold one replica",
                )
            ]
        return []

    # -- public --------------------------------------------------------------------------

    def unplaced(self, w: Workload) -> tuple[Reason, ...]:
        """Reasons for an unplaced workload; members of one class share them."""
        ci = self.index.workload_class[w.id]
        if ci not in self._memo:
            self._memo[ci] = self._unplaced(w)
        return self._memo[ci]

    def _unplaced(self, w: Workload) -> tuple[Reason, ...]:
        if w.training is not None:
            static = self._static_training(w)
            if static:
                return tuple(static)
            c = self.index.classes[self.index.workload_class[w.id]]
            reasons: list[Reason] = []
            by_type: dict[str, list[Option]] = {}
            for o in c.options:
                if o.kind is not OptionKind.STAY:
                    by_type.setdefault(o.gpu_type, []).append(o)
            for t in sorted(by_type, key=lambda t: (-max(o.value for o in by_type[t]), t)):
                opts = sorted(by_type[t], key=lambda o: (-o.value, o.gpus))
                need = (
                    f"{opts[0].gpus} GPUs"
                    if len({o.gpus for o in opts}) == 1
                    else (f"{min(o.gpus for o in opts)}+ GPUs")
                )

                def fits(led: Ledger, quota: bool, opts: list[Option] = opts) -> bool:
                    return any(self._fits_training(led, w, o, quota) for o in opts)

                reasons.append(self._dynamic(w, t, fits, need))
            return tuple(reasons)
        static = self._static_service(w)
        if static:
            return tuple(static)
        return self._service_reasons(w, max(1, w.inference.min_replicas) if w.inference else 1)

    def _service_reasons(
        self, w: Workload, replicas: int, placed_type: str | None = None, more: bool = False
    ) -> tuple[Reason, ...]:
        c = self.index.classes[self.index.workload_class[w.id]]
        by_type: dict[str, list[Option]] = {}
        for o in c.options:
            if placed_type is None or o.gpu_type == placed_type:
                by_type.setdefault(o.gpu_type, []).append(o)
        reasons = []
        for t in sorted(by_type):
            opts = by_type[t]
            g = opts[0].gpus
            need = f"{replicas} replica{'s' if replicas != 1 else ''} of {g} GPU{'s' if g != 1 else ''}"

            def fits(led: Ledger, quota: bool, opts: list[Option] = opts, g: int = g, t: str = t) -> bool:
                if quota and not led.quota.allows(w.tenant, t, g * replicas):
                    return False
                return self._replica_slots(led, w, opts) >= replicas

            reasons.append(self._dynamic(w, t, fits, need, more))
        return tuple(reasons)

    def shortfall(self, w: Workload, p: Placement, served: float) -> tuple[Reason, ...]:
        spec = w.inference
        assert spec is not None
        r = len(p.shards)
        if spec.max_replicas is not None and r >= spec.max_replicas:
            return (
                Reason(
                    ReasonCode.CAPACITY,
                    f"max_replicas={spec.max_replicas} caps it at {served:g} of {spec.target_rps:g} req/s",
                ),
            )
        # One more replica: why not? (its own replicas stay where they are)
        return self._service_reasons(w, 1, p.gpu_type, more=True)
