"""The ``Inference`` service: ``Generate`` routed to a live replica of a placed service.

The servicer looks the service up in the store, asks the dispatcher
(:meth:`server.workers.Dispatcher.endpoints`) for the replicas that report an
endpoint, picks one and forwards the request to it with a gRPC stub (one
cached channel per endpoint).

Decisions (DESIGN.md is silent on them):

* Choice. Each replica's capacity is the ``inference.replica_rps`` of the GPU
  type the service is placed on (1 when it names none); the router keeps the
  requests outstanding at each replica and picks the lowest
  ``(outstanding + 1) / capacity``; ties go to the replica chosen least
  recently, so light sequential traffic goes round the replicas.
* Failures. A replica that answers UNAVAILABLE, RESOURCE_EXHAUSTED or ABORTED
  (or whose connection breaks: CANCELLED while the caller is still there) is
  avoided for :data:`SUSPECT_S` seconds, and the request is tried once more on
  another replica of those serving by then (asked of the dispatcher again: a
  replica taken out meanwhile is not tried, one ready meanwhile may be; the
  same one when it is the only one). Other errors of the
  replica (INVALID_ARGUMENT, DEADLINE_EXCEEDED...) are passed on with their code.
* Deadline. The caller's deadline is the replica call's; without one,
  :data:`DEFAULT_TIMEOUT_S`.
* Errors. An unknown service (or another tenant's) is NOT_FOUND; a workload
  that is not an inference service, a service that is not placed, or one with
  no replica serving yet is UNAVAILABLE, with a message saying which.
  ``max_tokens`` < 0 and a negative ``temperature`` are INVALID_ARGUMENT.
* Auth as for ``Allocator``: a tenant may call only its own services; the
  admin any.
* ``replica`` in the response is ``SERVICE/SHARD``: the shard index the replica
  runs as (:func:`server.workers.replica_index`: its index in the placement,
  plus 1000 for even versions of the service); ``latency_s`` is the replica's own.
* Rollouts. During a rolling update the dispatcher keeps the old version's
  replicas in :meth:`~server.workers.Dispatcher.endpoints` until the new ones
  are ready, and takes a replica out the moment it is told to stop, so the
  router never picks a replica that is going away (a request already sent to
  it finishes in its stop grace; one that reaches it after it stopped listening,
  picked just before it was taken out, fails and is retried on the replicas
  serving then).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc

from apportion.v1 import inference_pb2 as ipb
from apportion.v1 import inference_pb2_grpc
from server.auth import Principal
from server.errors import NotFound, Unavailable, Upstream
from server.rpc import Shared, unary
from server.store import PLACED, RUNNING
from server.workers import Dispatcher
from solver import ValidationError, Violation

log = logging.getLogger("apportion.inference")

SUSPECT_S = 5.0
DEFAULT_TIMEOUT_S = 60.0
RETRIED = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)


@dataclass
class _Replica:
    outstanding: int = 0
    chosen: int = 0  # the router's pick counter when last chosen
    suspect_until: float = 0.0
    requests: int = 0
    failures: int = 0


class Router:
    """Picks replicas and keeps their channels and counters (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[str, _Replica] = {}  # endpoint -> its counters
        self._channels: dict[str, grpc.Channel] = {}
        self._picks = 0
        self.retries = 0

    def pick(
        self, endpoints: dict[int, str], capacity: float, exclude: set[str] | None = None
    ) -> tuple[int, str] | None:
        """A replica (shard index, endpoint) to send to, counted as outstanding; None if none."""
        now = time.monotonic()
        with self._lock:
            candidates = [(i, e) for i, e in endpoints.items() if not exclude or e not in exclude]
            if not candidates:
                return None
            healthy = [(i, e) for i, e in candidates if self._get(e).suspect_until <= now]
            pool = healthy or candidates

            def key(item: tuple[int, str]) -> tuple[float, int]:
                r = self._get(item[1])
                return ((r.outstanding + 1) / capacity, r.chosen)

            index, endpoint = min(pool, key=key)
            r = self._get(endpoint)
            self._picks += 1
            r.chosen = self._picks
            r.outstanding += 1
            r.requests += 1
            return index, endpoint

    def done(self, endpoint: str, failed: bool = False) -> None:
        with self._lock:
            r = self._get(endpoint)
            r.outstanding = max(0, r.outstanding - 1)
            if failed:
                r.failures += 1
                r.suspect_until = time.monotonic() + SUSPECT_S

    def stub(self, endpoint: str) -> inference_pb2_grpc.InferenceStub:
        with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = self._channels[endpoint] = grpc.insecure_channel(endpoint)
        return inference_pb2_grpc.InferenceStub(channel)

    def forget(self, live: set[str]) -> None:
        """Close the channels of endpoints no longer in use."""
        with self._lock:
            for endpoint in [e for e in self._channels if e not in live]:
                self._channels.pop(endpoint).close()
                self._replicas.pop(endpoint, None)

    def stats(self) -> dict[str, tuple[int, int]]:
        """endpoint -> (requests sent, failures)."""
        with self._lock:
            return {e: (r.requests, r.failures) for e, r in self._replicas.items()}

    def close(self) -> None:
        self.forget(set())

    def _get(self, endpoint: str) -> _Replica:
        r = self._replicas.get(endpoint)
        if r is None:
            r = self._replicas[endpoint] = _Replica()
        return r


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, shared: Shared, dispatcher: Dispatcher, router: Router | None = None) -> None:
        self.shared = shared
        self.dispatcher = dispatcher
        self.router = router or Router()

    @staticmethod
    def _capacity(spec: dict[str, Any], placement: dict[str, Any] | None) -> float:
        gpu_type = str((placement or {}).get("gpu_type", ""))
        rps: Any = ((spec.get("inference") or {}).get("replica_rps") or {}).get(gpu_type)
        try:
            value = float(rps)
        except (TypeError, ValueError):
            return 1.0
        return value if value > 0 else 1.0

    @unary
    def Generate(
        self, request: ipb.GenerateRequest, context: grpc.ServicerContext, who: Principal
    ) -> ipb.GenerateResponse:
        violations = []
        if not request.service:
            violations.append(Violation("service", "must name an inference workload"))
        if request.max_tokens < 0:
            violations.append(Violation("max_tokens", "must be ≥ 0"))
        if request.HasField("temperature") and request.temperature < 0:
            violations.append(Violation("temperature", "must be ≥ 0"))
        if violations:
            raise ValidationError(violations)
        row = self.shared.store.get_workload(request.service)
        if not who.can_see(row.tenant):
            raise NotFound(f'no workload "{request.service}"')
        if row.kind != "inference":
            raise Unavailable(f'"{row.id}" is a {row.kind} workload, not an inference service')
        if row.state not in (PLACED, RUNNING):
            raise Unavailable(f'service "{row.id}" is {row.state}: no replica serves it')
        endpoints = self.dispatcher.endpoints(row.id)
        if not endpoints:
            raise Unavailable(f'service "{row.id}" has no live replica yet ({row.state})')
        capacity = self._capacity(row.spec, row.placement)
        tried: set[str] = set()
        last: grpc.RpcError | None = None
        for attempt in range(2):
            if attempt:  # the replicas serving now: one stopped meanwhile (a rollout) is not tried again
                endpoints = self.dispatcher.endpoints(row.id) or endpoints
            picked = self.router.pick(endpoints, capacity, exclude=tried)
            if picked is None:
                picked = self.router.pick(endpoints, capacity)  # the only replica: try it again
            assert picked is not None
            index, endpoint = picked
            tried.add(endpoint)
            remaining = context.time_remaining()
            # no deadline reads as None or as an infinite one, depending on the gRPC version
            no_deadline = remaining is None or remaining > 10 * DEFAULT_TIMEOUT_S
            timeout = DEFAULT_TIMEOUT_S if no_deadline else max(0.0, remaining)
            try:
                reply: ipb.GenerateResponse = self.router.stub(endpoint).Generate(request, timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                retry = code in RETRIED or (code is grpc.StatusCode.CANCELLED and context.is_active())
                self.router.done(endpoint, failed=retry)
                details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
                if not retry:
                    raise Upstream(code, f"replica {row.id}/{index}: {details}") from None
                log.info(
                    "replica failed; retrying",
                    extra={"service": row.id, "replica": index, "code": code.name, "attempt": attempt},
                )
                self.router.retries += attempt == 0
                last = exc
                continue
            self.router.done(endpoint)
            reply.replica = f"{row.id}/{index}"
            return reply
        assert last is not None
        details = (last.details() if isinstance(last, grpc.Call) else None) or str(last)
        raise Unavailable(f'service "{row.id}": replicas failed twice, last: {details}')
