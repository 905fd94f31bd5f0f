"""Admission: new work that fits in free capacity is placed at once.

A planning round solves the whole state, which takes seconds to tens of seconds
on a large one (20 s at 29,000 workloads): without admission, a workload
submitted to an idle corner of a busy cluster waits for a round to start after
it and end. The admission thread places such work within milliseconds, and the
optimizer re-balances in the background as before.

What it admits. Only workloads *no plan has seen yet* (PENDING, not in the
latest recorded plan's state): every other pending workload was left out by a
plan for a reason (priority, quota, packing) that free capacity does not
change, and only the next round, which sees everything, may place it. The
free capacity is what the placed and running workloads leave on ready nodes,
and what they leave of their tenants' quotas: kept up to date from the store's
events (every change is one). The candidates are placed by the solver's
best-fit greedy (priority first, then largest first, onto the fullest node
that fits) on a problem of that free capacity, verified by the solver's
independent checker there, and kept only where the rules also hold on the whole
cluster: a gang on several nodes needs whole free nodes, a spread service's
replicas are spread over the units of the whole cluster. Nothing running is
ever moved or stopped by an admission.

Consistency with the plan. The store writes an admission only if no plan, no
node and no inventory changed after the state it was computed from (else it
looks again). A plan solved from a state before an admission keeps it; where
the two overflow a node or a quota, the lower priority gives way
(``server.reconcile``).

Cost. The thread shares the server's interpreter with the RPCs, so it works in
batches: everything submitted meanwhile is admitted in one step and one write,
at least ``AdmissionConfig.batch_s`` (50 ms) after the first submission, and
after a step it rests 20 times the CPU time that step took (at most 0.5 s), so
it takes at most about 5% of the server's interpreter (a step costs ~5-10 ms
with 250 free nodes; measured with ``bench/admission.py``: without the rest,
admission cut the submit rate at 1,000/s offered by a fifth). Candidates that
did not fit are not tried again until capacity frees (a workload ends or is
cancelled, a plan or the inventory changes), and one that cannot fit in its
tenant's quota left or in the free GPUs is not handed to the solver at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import solver
from server import convert
from server.control import PlanInfo, placement_doc
from server.errors import FailedPrecondition
from server.store import PENDING, PLACED, RUNNING, Event, Store, WorkloadRow
from server.usage import Use, least_gpus, placement_use, ready
from solver import Node, PlanOptions, Problem, Tenant, ValidationError

__all__ = ["Admission", "AdmissionConfig"]

log = logging.getLogger("apportion.admission")

EVENT_PAGE = 5000  # events read per query while catching up
LOOK_AGAIN = 3  # admissions refused because the state moved, retried at once this many times
MAX_BATCH = 256  # candidates placed in one step (the rest in the next, at once)
REST_FACTOR = 20.0  # after a step, the thread waits this many times the CPU time it took ...
MAX_REST_S = 0.5  # ... but never longer than this


@dataclass(frozen=True)
class AdmissionConfig:
    enabled: bool = True
    batch_s: float = 0.05  # submissions gathered this long before they are admitted together
    time_limit_s: float = 2.0  # the solver's budget for one batch (the greedy takes milliseconds)


@dataclass(frozen=True)
class _Hold:
    tenant: str
    gpu_type: str
    held: Mapping[str, Use]


class Admission:
    """The admission thread of one server (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        latest: Callable[[], PlanInfo | None],
        config: AdmissionConfig | None = None,
        on_admit: Callable[[list[WorkloadRow]], None] | None = None,
    ) -> None:
        self.store = store
        self.latest = latest
        self.config = config or AdmissionConfig()
        self.on_admit = on_admit
        self.admitted = 0  # workloads admitted so far
        self._cond = threading.Condition()
        self._woken = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="apportion-admission", daemon=True)
        # the view of the store, kept from its events
        self._seen = -1  # the revision the view is at (-1: read it whole first)
        self._nodes: dict[str, dict[str, Any]] = {}
        self._domain_nodes: dict[str, Node] = {}  # the same as domain objects, made when first needed
        self._tenants: dict[str, dict[str, Any]] = {}
        self._inventory = Problem((), (), ())  # GPU types and tenants as domain objects
        self._holds: dict[str, _Hold] = {}  # placed and running workloads
        self._used: dict[str, Use] = {}  # node id -> what the holds take there
        self._full: set[str] = set()  # nodes the holds leave no GPU free on
        self._tenant_used: dict[str, dict[str, float]] = {}  # tenant -> GPU type -> GPUs
        self._fresh: dict[str, WorkloadRow] = {}  # PENDING, no plan has seen them
        self._untried: dict[str, WorkloadRow] = {}  # fresh, not tried since capacity last grew
        self._queue: list[tuple[int, float, str]] = []  # a heap of untried ids, in admission order
        self._grew = False  # capacity may have grown: every fresh workload is tried again
        self._plan: PlanInfo | None = None  # the plan ``_fresh`` is relative to

    # -- control ---------------------------------------------------------

    def start(self) -> None:
        if self.config.enabled:
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Something changed (a submission, a cancellation, a plan): look soon."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def _run(self) -> None:
        rest = 0.0
        while True:
            with self._cond:
                while not self._woken and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                # gather a batch, and rest in proportion to what the last step cost
                self._cond.wait(max(self.config.batch_s, rest))
                self._woken = False
                if self._stopped:
                    return
            cpu = time.thread_time()
            try:
                self.step()
            except Exception:  # never let the thread die: the next wake-up looks again
                log.exception("admission failed")
                self._seen = -1  # and reads the state whole then
            rest = min(MAX_REST_S, REST_FACTOR * (time.thread_time() - cpu))

    # -- one step --------------------------------------------------------

    def step(self) -> list[WorkloadRow]:
        """Admit what fits of the fresh workloads; the rows admitted."""
        out: list[WorkloadRow] = []
        for _ in range(LOOK_AGAIN):
            self._refresh()
            batch = self._candidates()
            if not batch:
                break
            placements = self._place(batch)
            rows = self.store.admit(placements, self._seen) if placements else []
            if placements and not rows:
                continue  # the state moved (a plan, a node): look again
            for row in batch:
                self._untried.pop(row.id, None)
            out += rows
            break
        if out:
            self.admitted += len(out)
            log.info("admitted", extra={"workloads": len(out), "ids": [r.id for r in out[:10]]})
            if self.on_admit is not None:
                self.on_admit(out)
        return out

    def _candidates(self) -> list[WorkloadRow]:
        plan = self.latest()
        if plan is None:
            return []  # the first round plans everything there is
        if plan is not self._plan:
            self._plan = plan
            self._fresh = {id: row for id, row in self._fresh.items() if id not in plan.included}
            self._untried = {id: row for id, row in self._untried.items() if id in self._fresh}
        if self._grew:
            self._grew = False
            self._untried = dict(self._fresh)
            self._queue = [_order(r) for r in self._fresh.values()]
            heapq.heapify(self._queue)
        rows: dict[str, WorkloadRow] = {}
        while self._queue and len(rows) < MAX_BATCH:
            id = heapq.heappop(self._queue)[2]
            row = self._untried.get(id)
            if row is not None:
                rows[id] = row
        if self._queue:
            self.wake()  # the rest next
        return list(rows.values())

    def _place(self, batch: list[WorkloadRow]) -> dict[str, tuple[int, dict[str, Any]]]:
        """id -> (version, placement) of the candidates that fit, checked on the whole cluster."""
        tenants = tuple(_quota_left(t, self._tenant_used.get(t.name, {})) for t in self._inventory.tenants)
        # What cannot fit in its tenant's quota left or in the free GPUs is not tried (the
        # common case on a busy cluster: a tenant at its quota keeps submitting).
        room = {t.name: t.max_gpus for t in tenants if t.max_gpus is not None}
        need = {r.id: least_gpus(r.spec) for r in batch}
        batch = [r for r in batch if 0 < need[r.id] <= room.get(r.tenant, need[r.id])]
        if not batch:
            return {}
        nodes = self._free_nodes()
        free = sum(n.gpus for n in nodes)
        batch = [r for r in batch if need[r.id] <= free]
        if not batch:
            return {}
        # (what a spec says of GPU types the inventory does not have yet is left out)
        known = {t.name for t in self._inventory.gpu_types}
        specs = {r.id: s for r in batch if (s := convert.without_unknown_types(r.spec, known)) is not None}
        batch = [r for r in batch if r.id in specs]
        if not batch:
            return {}
        try:
            workloads = convert.domain_of(workloads=[specs[r.id] for r in batch]).workloads
        except ValidationError:
            return {}  # a spec the store should not hold: the control loop reports it
        problem = Problem(self._inventory.gpu_types, tuple(nodes), workloads, tenants)
        try:
            plan = solver.plan(problem, "best-fit", PlanOptions(time_limit_s=self.config.time_limit_s))
        except ValidationError:
            return {}  # one no longer fits the inventory: the control loop says why
        by_id = {r.id: r for r in batch}
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        for p in plan.placements:
            row = by_id[p.workload_id]
            doc = placement_doc(row, convert.placement_to_dict(p))
            if self._holds_on_whole_cluster(row, doc):
                out[row.id] = (row.version, doc)
        return out

    def _free_nodes(self) -> list[Node]:
        """The ready nodes with a GPU free, as nodes of what is free on them."""
        out = []
        for id, doc in self._nodes.items():
            if id in self._full or not ready(doc):
                continue
            node = self._domain_nodes.get(id)
            if node is None:
                try:
                    node = self._domain_nodes[id] = convert.domain_of(nodes=[doc]).nodes[0]
                except ValidationError:
                    continue
            used = self._used.get(id)
            free = node if used is None else _left(node, used)
            if free is not None:
                out.append(free)
        return out

    def _holds_on_whole_cluster(self, row: WorkloadRow, doc: Mapping[str, Any]) -> bool:
        """The rules that a problem of free capacity cannot see: a gang on several nodes
        takes whole nodes (every one of them free), and a spread service's replicas are
        spread over the failure units of the whole cluster (solver/verify.py, 5 and 6)."""
        shards = doc.get("shards", ())
        if row.kind == "training":
            return len(shards) <= 1 or all(str(s.get("node_id")) not in self._used for s in shards)
        inference = row.spec.get("inference", {})
        spread = str(inference.get("spread", "") or "none")
        if spread == "none":
            return True
        gpu_type = doc.get("gpu_type", "")
        per_replica = int((inference.get("gpus_per_replica") or {}).get(gpu_type, 0) or 0)
        selector: Mapping[str, str] = row.spec.get("node_selector") or {}

        def unit(node: Mapping[str, Any]) -> tuple[str, ...]:
            if spread == "zone":
                return (str(node.get("zone", "")),)
            if spread == "domain":
                return (str(node.get("zone", "")), str(node.get("domain", "")))
            return (str(node.get("id", "")),)

        units = {
            unit(n)
            for n in self._nodes.values()
            if ready(n)
            and n.get("gpu_type") == gpu_type
            and int(n.get("gpus", 0) or 0) >= per_replica
            and all((n.get("labels") or {}).get(k) == v for k, v in selector.items())
        }
        counts: dict[tuple[str, ...], int] = {}
        for s in shards:
            key = unit(self._nodes.get(str(s.get("node_id")), {}))
            counts[key] = counts.get(key, 0) + 1
        return max(counts.values(), default=0) <= math.ceil(len(shards) / max(1, len(units)))

    # -- the view ----------------------------------------------------------

    def _refresh(self) -> None:
        """Bring the view up to date from the events since the last look (read whole
        at first, after a failure, or when the events were compacted away)."""
        if self._seen >= 0:
            with contextlib.suppress(FailedPrecondition):
                while True:
                    events = self.store.events_after(self._seen, limit=EVENT_PAGE)
                    for event in events:
                        self._apply(event)
                        self._seen = event.revision
                    if len(events) < EVENT_PAGE:
                        return
        self._reload()

    def _reload(self) -> None:
        revision = self.store.revision()  # read first: the events after it are applied again
        self._nodes = {n.id: n.spec for n in self.store.all_nodes()}
        self._domain_nodes = {}
        self._read_inventory()
        self._holds, self._used, self._tenant_used, self._fresh, self._untried = {}, {}, {}, {}, {}
        self._queue = []
        self._full = set()
        for row in self.store.workloads_in((PLACED, RUNNING, PENDING)):
            self._track(row)
        self._seen = revision
        self._grew = True

    def _read_inventory(self) -> None:
        try:
            self._inventory = convert.domain_of(
                gpu_types=self.store.gpu_types(), tenants=self.store.tenants()
            )
        except ValidationError:
            self._inventory = Problem((), (), ())  # admits nothing until it is fixed

    def _apply(self, event: Event) -> None:
        if event.kind == "workload":
            if event.action == "deleted":
                self._forget(event.id)
            else:
                self._track(WorkloadRow(**event.data))
        elif event.kind == "node":
            self._domain_nodes.pop(event.id, None)
            if event.action == "deleted":
                self._nodes.pop(event.id, None)
            else:
                self._nodes[event.id] = event.data.get("spec", {})
            self._mark(event.id)
            self._grew = True
        elif event.kind == "inventory":
            self._read_inventory()
            self._grew = True
        elif event.kind == "plan":
            self._grew = True

    def _forget(self, id: str) -> None:
        self._fresh.pop(id, None)
        self._untried.pop(id, None)
        hold = self._holds.pop(id, None)
        if hold is not None:
            self._count(hold, -1.0)
            self._grew = True

    def _track(self, row: WorkloadRow) -> None:
        self._fresh.pop(row.id, None)
        self._untried.pop(row.id, None)
        old = self._holds.pop(row.id, None)
        if old is not None:
            self._count(old, -1.0)
        if row.state in (PLACED, RUNNING) and row.placement:
            gpu_type = str(row.placement.get("gpu_type", ""))
            hold = _Hold(row.tenant, gpu_type, placement_use(row.spec, row.placement))
            self._holds[row.id] = hold
            self._count(hold, 1.0)
            self._grew = self._grew or (old is not None and old != hold)  # moved: capacity may have freed
            return
        self._grew = self._grew or old is not None  # capacity freed
        plan = self._plan
        if row.state == PENDING and not row.placement and (plan is None or row.id not in plan.included):
            self._fresh[row.id] = self._untried[row.id] = row
            heapq.heappush(self._queue, _order(row))

    def _count(self, hold: _Hold, sign: float) -> None:
        for node, use in hold.held.items():
            used = self._used.setdefault(node, Use())
            used.add(use, sign)
            if used.gpus <= 1e-9 and used.cpus <= 1e-9 and used.memory_gib <= 1e-9:
                del self._used[node]
            self._mark(node)
        by_type = self._tenant_used.setdefault(hold.tenant, {})
        by_type[hold.gpu_type] = by_type.get(hold.gpu_type, 0.0) + sign * sum(
            u.gpus for u in hold.held.values()
        )

    def _mark(self, node_id: str) -> None:
        """Whether the holds leave no GPU free on ``node_id`` (then it is not looked at)."""
        doc, used = self._nodes.get(node_id), self._used.get(node_id)
        if doc is not None and used is not None and int(doc.get("gpus", 0) or 0) - round(used.gpus) < 1:
            self._full.add(node_id)
        else:
            self._full.discard(node_id)


def _order(row: WorkloadRow) -> tuple[int, float, str]:
    """Admission order: priority first, then submission."""
    return (-int(row.spec.get("priority", 0) or 0), row.created_at, row.id)


def _left(node: Node, used: Use) -> Node | None:
    """What ``used`` leaves free on ``node`` (None: no GPU, or a tracked CPU or memory
    count with nothing left, which would read as untracked)."""
    gpus = node.gpus - round(used.gpus)
    if gpus < 1:
        return None
    cpus, memory = node.cpus, node.memory_gib
    if cpus > 0:
        cpus -= used.cpus
        if cpus <= 1e-9:
            return None
    if memory > 0:
        memory -= used.memory_gib
        if memory <= 1e-9:
            return None
    return dataclasses.replace(node, gpus=gpus, cpus=cpus, memory_gib=memory)


def _quota_left(tenant: Tenant, held: Mapping[str, float]) -> Tenant:
    """``tenant`` with its quotas reduced by what it holds."""
    if tenant.max_gpus is None and not tenant.max_gpus_per_type:
        return tenant
    total = None if tenant.max_gpus is None else max(0, tenant.max_gpus - round(sum(held.values())))
    per_type = {t: max(0, cap - round(held.get(t, 0.0))) for t, cap in tenant.max_gpus_per_type.items()}
    return dataclasses.replace(tenant, max_gpus=total, max_gpus_per_type=per_type)
