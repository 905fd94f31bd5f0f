"""The plumbing every servicer shares: what they hold in common (:class:`Shared`),
the per-caller stream cap, and the error boundary of each kind of call (``unary``,
``stream``, ``async_stream``): authenticate and rate-limit the caller, answer an
error with its status (every one the server answers itself is marked, see
``SERVER_ANSWERED``), count it in the metrics, log it and, for mutating methods,
write the audit record. ``server.service`` (Allocator), ``server.workers``,
``server.checkpoints`` and ``server.inference`` import it; it imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc
from grpc_status import rpc_status

from apportion.client import ANSWERED_BY_KEY
from server import audit, convert
from server.aio import Undecodable
from server.audit import AuditTrail
from server.auth import Authenticator, Principal, RateLimiter
from server.control import ControlLoop
from server.errors import PermissionDenied, ResourceExhausted, status_code
from server.metrics import Metrics
from server.solving import SolverPool
from server.store import Store
from solver import ValidationError, Violation

__all__ = [
    "DEFAULT_STREAMS_PER_CALLER",
    "SERVER_ANSWERED",
    "Shared",
    "StreamCap",
    "abort",
    "async_stream",
    "caller",
    "code_of",
    "decoded",
    "record",
    "status_for",
    "stream",
    "unary",
]

log = logging.getLogger("apportion.rpc")

DEFAULT_STREAMS_PER_CALLER = 64

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Shared:
    """What the servicers share: the store, the control loop, the solver pool, auth and metrics."""

    def __init__(
        self,
        store: Store,
        loop: ControlLoop,
        pool: SolverPool,
        auth: Authenticator,
        limiter: RateLimiter,
        metrics: Metrics,
        audit: AuditTrail,
        streams: StreamCap | None = None,
    ) -> None:
        self.audit = audit
        self.store = store
        self.loop = loop
        self.pool = pool
        self.auth = auth
        self.limiter = limiter
        self.metrics = metrics
        self.streams = streams or StreamCap(DEFAULT_STREAMS_PER_CALLER)
        self.stopping = False


MAX_VIOLATIONS = 20  # field violations listed in one INVALID_ARGUMENT (then "... and N more")
MAX_MESSAGE_CHARS = 1024  # of its message (both travel in trailers, 8 KiB at most by default)


Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]
# Trailing metadata of every error the server itself answers, so that a client can tell
# the server's UNAVAILABLE ("no live replica") from a server it cannot reach.
SERVER_ANSWERED = (ANSWERED_BY_KEY, "apportion")


def status_for(exc: BaseException) -> Status:
    """The status that answers ``exc``: code, details and trailing metadata."""
    if isinstance(exc, ValidationError):
        count = len(exc.violations)
        head = f"invalid input ({count} problem{'s' if count != 1 else ''}): "
        # At most MAX_VIOLATIONS are listed: 100,000 of them (one per unknown GPU type)
        # made trailers larger than gRPC's metadata limit, and the client saw only
        # "Stream removed".
        shown = list(exc.violations[:MAX_VIOLATIONS])
        if count > len(shown):
            shown.append(Violation("", f"... and {count - len(shown)} more"))
        message = head + "; ".join(str(v) for v in shown)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "…"
        status = rpc_status.to_status(convert.bad_request_status(shown, message))
        return status.code, status.details, (*status.trailing_metadata, SERVER_ANSWERED)
    code = status_code(exc)
    if code is None:
        log.error("internal error", exc_info=exc)
        return grpc.StatusCode.INTERNAL, "internal error (see the server log)", (SERVER_ANSWERED,)
    return code, str(exc), (SERVER_ANSWERED,)


def abort(context: grpc.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """Answer ``exc`` with its status (never returns: ``context.abort`` raises). ``context``
    is a blocking handler's: a :class:`server.aio.CallContext` or grpc's own."""
    code, details, trailing = status_for(exc)
    context.abort(code, details, trailing)
    return code


def decoded(request: Any) -> None:
    """Raise ValidationError for a request whose bytes did not parse."""
    if isinstance(request, Undecodable):
        raise ValidationError([Violation("", f"the request is not a valid message: {request.error}")])


def caller(servicer: Any, context: grpc.ServicerContext) -> Principal:
    """The authenticated, rate-limited caller. A node's token opens only the servicers that
    say ``NODES_ALLOWED`` (the worker protocol): a worker's credential reads nothing."""
    principal: Principal = servicer.shared.auth.authenticate(context.invocation_metadata())
    servicer.shared.limiter.check(principal.name)
    if principal.node is not None and not getattr(servicer, "NODES_ALLOWED", False):
        raise PermissionDenied(f"{principal.name} is a node's token: it may only run the worker protocol")
    return principal


def unary(
    method: Callable[[Any, Req, grpc.ServicerContext, Principal], Resp],
) -> Callable[[Any, Req, grpc.ServicerContext], Resp]:
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        principal: Principal | None = None
        error = ""
        try:
            decoded(request)
            principal = caller(self, context)
            return method(self, request, context, principal)
        except Exception as exc:
            code = code_of(exc)
            error = "internal error" if code is grpc.StatusCode.INTERNAL else str(exc)
            abort(context, exc)
            raise  # not reached: abort raises
        finally:
            record(self.shared, name, code, start, principal)
            if name in audit.AUDITED:
                self.shared.audit.record(name, principal, request, code.name, error)

    return wrapper


def stream(
    method: Callable[[Any, Req, grpc.ServicerContext, Principal], Iterator[Resp]],
) -> Callable[[Any, Req, grpc.ServicerContext], Iterator[Resp]]:
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Req, context: grpc.ServicerContext) -> Iterator[Resp]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        principal: Principal | None = None
        try:
            decoded(request)
            principal = caller(self, context)
            yield from method(self, request, context, principal)
        except Exception as exc:
            code = code_of(exc)
            abort(context, exc)
        finally:
            record(self.shared, name, code, start, principal)

    return wrapper


def async_stream(
    method: Callable[[Any, Req, Any, Principal], AsyncIterator[Resp]],
) -> Callable[[Any, Req, Any], AsyncIterator[Resp]]:
    """The error boundary of a stream served on the event loop (see ``server.aio``)."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Resp]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        principal: Principal | None = None
        try:
            decoded(request)
            principal = caller(self, context)
            async for item in method(self, request, context, principal):
                yield item
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, details, trailing = status_for(exc)
            await context.abort(code, details, trailing)
        finally:
            record(self.shared, name, code, start, principal)

    return wrapper


class StreamCap:
    """At most ``limit`` open streams (``Watch``, ``Logs``) per caller: streams hold no
    thread (``server.aio``), but each costs memory and wake-ups, and one caller's
    thousands should not be everyone's cost."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, who: Principal) -> Iterator[None]:
        with self._lock:
            count = self._open.get(who.name, 0)
            if count >= self.limit:
                raise ResourceExhausted(
                    f"{who.name} has {count} open streams (Watch, Logs), the most one caller may have; "
                    "close one (--max-streams-per-caller)"
                )
            self._open[who.name] = count + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._open[who.name] - 1
                if left:
                    self._open[who.name] = left
                else:
                    del self._open[who.name]


def code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return status_code(exc) or grpc.StatusCode.INTERNAL


def record(
    shared: Shared, name: str, code: grpc.StatusCode, start: float, principal: Principal | None
) -> None:
    seconds = time.perf_counter() - start
    shared.metrics.observe_request(name, code.name, seconds)
    if log.isEnabledFor(logging.DEBUG) or code is not grpc.StatusCode.OK:
        log.log(
            logging.DEBUG if code is grpc.StatusCode.OK else logging.INFO,
            "rpc",
            extra={
                "method": name,
                "code": code.name,
                "duration_ms": round(seconds * 1000, 3),
                "principal": principal.name if principal else "",
            },
        )
