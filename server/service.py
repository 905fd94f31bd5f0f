"""The ``Allocator`` servicer: validate, convert, delegate, convert back.

Every RPC goes through one error boundary (:func:`unary` / :func:`stream`):
it authenticates the caller, applies the rate limit, runs the method, maps
domain errors to status codes through :data:`server.errors.STATUS_CODES`
(INVALID_ARGUMENT carries a ``google.rpc.BadRequest`` with one field violation
per bad field), records the request's metrics and logs it. An unexpected
exception is logged with its traceback and answered INTERNAL without details.

Decisions (DESIGN.md is silent on them):

* Workload ids are global (the solver plans every tenant together), so a
  submit with an id that another tenant uses is ALREADY_EXISTS. Anything else
  about another tenant's workload answers NOT_FOUND, as if it did not exist.
* A tenant's submission may leave ``tenant`` empty (it is filled in) but may
  not name another tenant (PERMISSION_DENIED). The admin may submit for any.
* Request ids are scoped by the caller's tenant (all admin tokens share one
  scope), so two tenants' request ids never collide and a retry with a rotated
  token of the same tenant is still recognised.
* A workload without ``submit_time_s`` gets the server's time of acceptance,
  so the ``fcfs`` policy orders by arrival.
* An update may not change a workload's tenant or kind.
* ``GetPlan`` for a tenant shows only that tenant's workloads; the metrics
  stay cluster-wide. Watch sends a tenant its own workloads' changes and the
  changes of nodes, GPU types, tenants and plans (summaries).
* Page tokens are opaque (base64 of the last id of the page).
* ``Logs`` serves the lines the dispatcher keeps in memory (see
  ``server.workers``): a workload with no lines kept (none printed yet, a
  planning-only workload, or printed before a server restart) streams nothing.
  ``follow`` ends when the workload is in a terminal state and no new lines
  came for one poll, or when the caller goes away.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message

import solver
from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import allocator_pb2_grpc
from apportion.v1 import types_pb2 as pb
from server import aio, control, convert
from server.auth import Principal
from server.errors import (
    Cancelled,
    DeadlineExceeded,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from server.redact import redact
from server.rpc import (
    Shared,
    async_stream,
    unary,
)
from server.solving import SolverCancelled, SolverCrashed, SolverTimeout
from server.store import STATES, TERMINAL, Event, Store
from server.watching import EventTail
from solver import ValidationError, Violation

if TYPE_CHECKING:
    from server.workers import LogBuffer

log = logging.getLogger("apportion.rpc")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEADLINE_MARGIN_S = 0.1  # of a Plan call's deadline, left for conversion and the reply
# A Plan solve still running at time_limit_s x FACTOR + GRACE (building and checking the plan
# of a big input included) is killed from outside: the solver's own limit is not trusted.
PLAN_DEADLINE_FACTOR = 2.0
PLAN_DEADLINE_GRACE_S = 10.0
WATCH_POLL_S = 2.0  # a Watch wakes on every commit; the poll only notices a stop
WATCH_BATCH = 500  # events a Watch takes at a time
LOGS_POLL_S = 0.5

Req = TypeVar("Req")
Resp = TypeVar("Resp")
M = TypeVar("M", bound="Message")


def _digest(msg: Message) -> str:
    """What a request sent, for telling a retry from another request with the same id."""
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()


_TOKEN_PREFIX = "after:"


def _page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_id).encode()).decode().rstrip("=")


def _after_id(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith(_TOKEN_PREFIX):
        raise ValidationError([Violation("page_token", "not a page token of this server")])
    return text[len(_TOKEN_PREFIX) :]


Row = TypeVar("Row", bound=Any)


def _page(rows: list[Row], size: int) -> tuple[list[Row], str]:
    """The page of ``rows`` (read with ``limit=size + 1``) and the token of the next one
    (empty on the last page)."""
    if len(rows) <= size:
        return rows, ""
    rows = rows[:size]
    return rows, _page_token(rows[-1].id)


def _page_size(size: int) -> int:
    if size < 0:
        raise ValidationError([Violation("page_size", "must be ≥ 0")])
    return min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _request_key(principal: Principal, request_id: str) -> str | None:
    if not request_id:
        return None
    scope = "admin" if principal.admin else f"tenant:{principal.tenant}"
    return f"{scope}/{request_id}"


class AllocatorServicer(allocator_pb2_grpc.AllocatorServicer):
    def __init__(self, shared: Shared, logs: LogBuffer | None = None) -> None:
        self.shared = shared
        self.logs = logs  # the workers' log lines (server.workers.Dispatcher.log_buffer)
        self.tail = EventTail(shared.store)  # the newest events, read once for every Watch
        # built from the GPU types and tenants it was made for; rebuilt when they change
        self._checker: convert.WorkloadChecker | None = None
        self._plans_lock = threading.Lock()
        self._planning: set[str] = set()  # callers with a Plan call solving

    @property
    def store(self) -> Store:
        return self.shared.store

    # -- Plan (stateless) ------------------------------------------------

    @unary
    def Plan(
        self, request: apb.PlanRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.PlanResponse:
        violations: list[Violation] = []
        policy = request.policy or "throughput"
        if policy not in solver.policy_names():
            known = ", ".join(solver.policy_names())
            violations.append(Violation("policy", f'unknown policy "{policy}" (known: {known})'))
        remaining = context.time_remaining()
        deadline = None if remaining is None else remaining - DEADLINE_MARGIN_S - 0.05 * remaining
        try:
            options = convert.plan_options(request.options, deadline_s=deadline)
        except ValidationError as exc:
            violations.extend(exc.violations)
        try:
            problem = convert.plan_request_problem(request)
        except ValidationError as exc:
            violations.extend(exc.violations)
        if violations:
            raise ValidationError(violations)
        with self._plan_slot(who):
            try:
                solved = self.shared.pool.solve(
                    problem,
                    policy,
                    options,
                    deadline_s=options.time_limit_s * PLAN_DEADLINE_FACTOR + PLAN_DEADLINE_GRACE_S,
                    cancelled=lambda: not context.is_active(),
                )
            except SolverTimeout as exc:
                raise DeadlineExceeded(str(exc)) from exc
            except SolverCancelled as exc:
                raise Cancelled(str(exc)) from exc
            except SolverCrashed as exc:
                raise Unavailable(str(exc)) from exc
        return apb.PlanResponse(plan=convert.plan_to_message(solved.plan), solve_time_s=solved.solve_time_s)

    @contextlib.contextmanager
    def _plan_slot(self, who: Principal) -> Iterator[None]:
        """One ``Plan`` at a time per caller: a second while the first solves is
        RESOURCE_EXHAUSTED (the Plan processes are shared by every caller)."""
        with self._plans_lock:
            if who.name in self._planning:
                raise ResourceExhausted(
                    f"{who.name} already has a Plan call solving; one at a time per caller"
                )
            self._planning.add(who.name)
        try:
            yield
        finally:
            with self._plans_lock:
                self._planning.discard(who.name)

    # -- workloads -------------------------------------------------------

    def _visible(self, who: Principal, workload_id: str) -> Any:
        row = self.store.get_workload(workload_id)
        if not who.can_see(row.tenant):
            raise NotFound(f'no workload "{workload_id}"')
        return row

    def _check(self, workload: pb.Workload) -> list[dict[str, Any]]:
        """Raise ValidationError for a workload the server cannot take. One that only names
        GPU types the inventory does not have yet is taken (workers may register after
        their work is submitted): its NO_GPU_TYPE reasons, each with the closest known
        name, are returned."""
        gpu_types, tenants = self.store.gpu_types(), self.store.tenants()
        checker = self._checker
        if checker is None or checker.gpu_types != gpu_types or checker.tenants != tenants:
            checker = self._checker = convert.WorkloadChecker(gpu_types, tenants)
        reasons: list[dict[str, Any]] = []
        try:
            checker.check(workload)
        except ValidationError as exc:
            unknown = convert.unknown_gpu_types(exc.violations)
            if not unknown:
                raise
            reasons = convert.unknown_type_reasons(unknown, (str(t.get("name", "")) for t in gpu_types))
        self._check_serve_from(workload)
        return reasons

    def _check_serve_from(self, workload: pb.Workload) -> None:
        """A service may serve from a training workload of its own tenant only (one that
        does not exist yet is allowed: the dispatcher checks again at each launch)."""
        name = convert.serve_from(workload)
        if name is None:
            return
        try:
            source = self.store.get_workload(name)
        except NotFound:
            return
        if source.kind != "training" or source.tenant != workload.tenant:
            raise ValidationError(
                [
                    Violation(
                        f"workload.runtime.env[{convert.SERVE_FROM}]",
                        f'must name a training workload of tenant "{workload.tenant}"',
                    )
                ]
            )

    @unary
    def SubmitWorkload(
        self, request: apb.SubmitWorkloadRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.WorkloadStatus:
        workload = pb.Workload()
        workload.CopyFrom(request.workload)
        if not who.admin:
            if not workload.tenant:
                workload.tenant = who.tenant or ""
            who.require_tenant(workload.tenant, "submitting a workload")
        if not workload.submit_time_s:
            workload.submit_time_s = time.time()
        early = self._check(workload)
        row, created = self.store.submit_workload(
            workload.id,
            workload.tenant,
            convert.workload_kind(workload),
            convert.message_to_dict(workload),
            request_key=_request_key(who, request.request_id),
            request_digest=_digest(request.workload),
            reasons=early,
        )
        if created:
            self.shared.loop.notify()
            return self._shown(who, convert.workload_status(row, workload=workload))  # as stored, unparsed
        return self._shown(who, convert.workload_status(row))

    @unary
    def GetWorkload(
        self, request: apb.GetWorkloadRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.WorkloadStatus:
        return self._shown(who, convert.workload_status(self._visible(who, request.id)))

    @unary
    def ListWorkloads(
        self, request: apb.ListWorkloadsRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.ListWorkloadsResponse:
        violations = []
        if request.kind and request.kind not in ("training", "inference"):
            violations.append(Violation("kind", f'must be training or inference; got "{request.kind}"'))
        if request.state and request.state not in STATES:
            violations.append(
                Violation("state", f'must be one of {", ".join(STATES)}; got "{request.state}"')
            )
        try:
            size = _page_size(request.page_size)
            after = _after_id(request.page_token)
        except ValidationError as exc:
            violations.extend(exc.violations)
        if violations:
            raise ValidationError(violations)
        tenant: str | None = request.tenant or None
        if not who.admin:
            if tenant is not None:
                who.require_tenant(tenant, "listing workloads")
            tenant = who.tenant or ""
        rows = self.store.list_workloads(
            tenant=tenant,
            kind=request.kind or None,
            state=request.state or None,
            after_id=after,
            limit=size + 1,
        )
        rows, token = _page(rows, size)
        return self._shown(
            who,
            apb.ListWorkloadsResponse(
                workloads=[convert.workload_status(r) for r in rows], next_page_token=token
            ),
        )

    @unary
    def CancelWorkload(
        self, request: apb.CancelWorkloadRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.WorkloadStatus:
        row = self._visible(who, request.id)
        cancelled = self.store.cancel_workload(row.id)
        if cancelled.revision != row.revision:
            self.shared.loop.notify()
        return self._shown(who, convert.workload_status(cancelled))

    @unary
    def UpdateWorkload(
        self, request: apb.UpdateWorkloadRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.WorkloadStatus:
        workload = pb.Workload()
        workload.CopyFrom(request.workload)
        if not workload.id:
            raise ValidationError([Violation("workload.id", "must not be empty")])
        row = self._visible(who, workload.id)
        violations = []
        if not workload.tenant:
            workload.tenant = row.tenant
        elif workload.tenant != row.tenant:
            violations.append(Violation("workload.tenant", f'cannot change (it is "{row.tenant}")'))
        kind = convert.workload_kind(workload)
        if kind and kind != row.kind:
            violations.append(
                Violation(f"workload.{kind}", f"cannot change the kind of a {row.kind} workload")
            )
        if violations:
            raise ValidationError(violations)
        if not workload.submit_time_s:
            workload.submit_time_s = row.spec.get("submit_time_s", row.created_at)
        early = self._check(workload)
        updated = self.store.update_workload(
            workload.id,
            convert.message_to_dict(workload),
            request_key=_request_key(who, request.request_id),
            request_digest=_digest(request.workload),
        )
        if updated.revision != row.revision:
            self.shared.loop.notify()
        status = convert.workload_status(updated)
        status.reasons.extend(
            pb.Reason(code=r["code"], message=r["message"]) for r in early
        )  # told, not stored
        return self._shown(who, status)

    # -- inventory -------------------------------------------------------

    @unary
    def UpsertNodes(
        self, request: apb.UpsertNodesRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.UpsertNodesResponse:
        who.require_admin("changing nodes, GPU types or tenants")
        convert.check_inventory_update(
            request.gpu_types,
            request.nodes,
            request.tenants,
            gpu_types=self.store.gpu_types(),
            nodes=[n.spec for n in self.store.all_nodes()],
            tenants=self.store.tenants(),
        )
        rows = self.store.upsert_inventory(
            gpu_types=[convert.message_to_dict(t) for t in request.gpu_types],
            nodes=[convert.message_to_dict(n) for n in request.nodes],
            tenants=[convert.message_to_dict(t) for t in request.tenants],
        )
        self.shared.loop.notify()
        return apb.UpsertNodesResponse(
            nodes=[convert.node_from_dict(r.spec) for r in rows], revision=self.store.revision()
        )

    @unary
    def DrainNode(
        self, request: apb.DrainNodeRequest, context: grpc.ServicerContext, who: Principal
    ) -> pb.Node:
        who.require_admin("draining a node")
        row = self.store.drain_node(request.id)
        self.shared.loop.notify()
        return convert.node_from_dict(row.spec)

    @unary
    def ListNodes(
        self, request: apb.ListNodesRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.ListNodesResponse:
        size = _page_size(request.page_size)
        after = _after_id(request.page_token)
        rows = self.store.list_nodes(after_id=after, limit=size + 1)
        rows, token = _page(rows, size)
        response = apb.ListNodesResponse(
            nodes=[convert.node_from_dict(r.spec) for r in rows], next_page_token=token
        )
        if not after:
            response.gpu_types.extend(convert.gpu_type_from_dict(t) for t in self.store.gpu_types())
            response.tenants.extend(convert.tenant_from_dict(t) for t in self.store.tenants())
        return response

    # -- the plan --------------------------------------------------------

    @unary
    def GetPlan(
        self, request: apb.GetPlanRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.PlanRecord:
        latest = self.store.latest_plan()
        if latest is None:
            raise NotFound("no plan yet: the server plans as soon as it has nodes and workloads")
        data = latest.plan
        if not who.admin:
            mine = self._tenant_ids(who.tenant or "")
            data = convert.plan_dict_for_tenant(data, mine.__contains__)
        record = convert.plan_record(
            data,
            revision=latest.revision,
            based_on=latest.based_on,
            created_at=latest.created_at,
            solve_time_s=latest.solve_s,
        )
        return self._shown(who, record)

    def _shown(self, who: Principal, msg: M) -> M:
        """``msg`` as ``who`` may see it: for a tenant, other tenants' workload ids in its
        texts are replaced (:mod:`server.redact`)."""
        return msg if who.admin else redact(msg, who.tenant or "", self.store)

    def _tenant_ids(self, tenant: str) -> set[str]:
        ids: set[str] = set()
        after = ""
        while True:
            rows = self.store.list_workloads(tenant=tenant, after_id=after, limit=MAX_PAGE_SIZE)
            ids.update(r.id for r in rows)
            if len(rows) < MAX_PAGE_SIZE:
                return ids
            after = rows[-1].id

    @unary
    def Explain(
        self, request: apb.ExplainRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.Explanation:
        self._visible(who, request.id)
        explanation, state = control.explain(self.shared.loop, self.store, request.id)
        return self._shown(who, convert.explanation_to_message(explanation, state))

    # -- watch -----------------------------------------------------------

    @async_stream
    async def Watch(
        self, request: apb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any], who: Principal
    ) -> AsyncIterator[apb.Event]:
        if request.from_revision < 0:
            raise ValidationError([Violation("from_revision", "must be ≥ 0")])
        tenant: str | None = request.tenant or None
        if not who.admin:
            if tenant is not None:
                who.require_tenant(tenant, "watching workloads")
            tenant = who.tenant or ""
        revision = request.from_revision
        with self.shared.streams.hold(who):
            while not self.shared.stopping:
                changed = self.store.changed.ticket()  # before the read: no change is missed
                events = await self.tail.after(revision, WATCH_BATCH)
                if not events:
                    await aio.wait(changed, WATCH_POLL_S)
                    continue
                revision = events[-1].revision
                mine = [e for e in events if e.kind != "workload" or tenant is None or e.tenant == tenant]
                if who.admin:
                    shown: list[apb.Event | bytes] = [self.tail.encoded(e) for e in mine]
                else:  # redaction reads the store
                    shown = list(await asyncio.to_thread(self._shown_events, who, mine))
                for message in shown:
                    yield message  # type: ignore[misc]  # bytes: serialized once (server.aio)

    def _shown_events(self, who: Principal, events: list[Event]) -> list[apb.Event]:
        return [self._shown(who, convert.event_message(e)) for e in events]

    # -- audit -----------------------------------------------------------

    @unary
    def Audit(
        self, request: apb.AuditRequest, context: grpc.ServicerContext, who: Principal
    ) -> apb.AuditResponse:
        who.require_admin("reading the audit trail")
        if request.limit < 0:
            raise ValidationError([Violation("limit", "must be ≥ 0")])
        entries = self.shared.audit.entries(
            principal=request.principal,
            id=request.id,
            since=request.since,
            until=request.until,
            after_seq=request.after_seq,
            limit=min(request.limit or MAX_PAGE_SIZE, MAX_PAGE_SIZE),
        )
        return apb.AuditResponse(
            entries=[
                apb.AuditEntry(
                    seq=e.seq,
                    time=e.time,
                    principal=e.principal,
                    tenant=e.tenant,
                    method=e.method,
                    ids=e.ids,
                    code=e.code,
                    message=e.message,
                )
                for e in entries
            ]
        )

    # -- logs ------------------------------------------------------------

    @async_stream
    async def Logs(
        self, request: apb.LogsRequest, context: grpc.aio.ServicerContext[Any, Any], who: Principal
    ) -> AsyncIterator[apb.LogLine]:
        if request.tail < 0:
            raise ValidationError([Violation("tail", "must be ≥ 0")])
        row = await asyncio.to_thread(self._visible, who, request.id)
        if self.logs is None:
            return
        with self.shared.streams.hold(who):
            lines = self.logs.after(row.id, 0)
            if request.tail:
                lines = lines[-request.tail :]
            seq = 0
            while True:
                for entry in lines:
                    seq = entry.seq
                    yield apb.LogLine(
                        workload_id=entry.workload_id,
                        shard_index=entry.shard_index,
                        rank=entry.rank,
                        text=entry.text,
                        time=entry.time,
                    )
                if not request.follow or self.shared.stopping:
                    return
                changed = self.logs.changed.ticket()  # before the look: no line is missed
                lines = self.logs.after(row.id, seq)
                if not lines:
                    await aio.wait(changed, LOGS_POLL_S)
                    lines = self.logs.after(row.id, seq)
                if not lines and (await asyncio.to_thread(self.store.get_workload, row.id)).state in TERMINAL:
                    lines = self.logs.after(row.id, seq)  # a last look: lines that raced the end
                    if not lines:
                        return
