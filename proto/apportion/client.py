"""A thin Python client of the Apportion ``Allocator`` service, for embedding.

    from apportion.client import Client, ApportionError

    with Client("127.0.0.1:50051", token="...") as client:
        status = client.submit({"id": "chat", "inference": {...}})
        for w in client.list(state="PENDING"):
            print(w.workload.id, w.state)
        try:
            client.get("nope")
        except ApportionError as exc:
            print(exc.code, exc.message, exc.violations)

It imports nothing of the server or the solver: only ``grpc``, ``grpc_status``,
``google.protobuf`` / ``google.rpc`` and the generated ``apportion.v1`` messages
(``grpc_health`` lazily, for :meth:`Client.health`). Results are the API's
messages; inputs are messages or plain dicts in the files' JSON mapping
(``json_format.ParseDict``; a dict that does not fit raises
``json_format.ParseError``).

Decisions:

* Transport. ``insecure=True`` forces plain text and ``insecure=False`` forces
  TLS. By default (``insecure=None``) the channel is TLS when a CA, a client
  certificate or a key is given or when the address is not loopback
  (``127.0.0.0/8``, ``::1``, ``localhost``, ``unix:``), and plain text to a
  loopback address otherwise — what ``apportion serve --insecure`` listens on.
  TLS without ``ca`` trusts the system's roots; ``cert`` and ``key`` (paths or
  PEM bytes) together give mutual TLS.
* The token travels as ``authorization: Bearer TOKEN`` metadata on every call.
* ``timeout`` is the deadline of each unary call in seconds (None: none);
  ``watch`` has no deadline.
* Retries. Every call here is idempotent, so a unary call that fails with
  UNAVAILABLE (the server could not be reached, or went away) is tried again
  up to ``retries`` times with exponential back-off. ``submit`` and ``update``
  also retry DEADLINE_EXCEEDED (the write may have been accepted and the reply
  lost): they send the same ``request_id`` (a uuid4 unless given) on every
  attempt, so the server creates or updates the workload once.
* Errors are :class:`ApportionError`: the status code, the server's message,
  and for INVALID_ARGUMENT the ``google.rpc.BadRequest`` field violations as
  ``(field, description)`` pairs, so a caller sees every bad field.
"""

from __future__ import annotations

import builtins
import ipaddress
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import allocator_pb2_grpc, inference_pb2, inference_pb2_grpc
from apportion.v1 import types_pb2 as pb

__all__ = ["DEFAULT_ADDRESS", "ApportionError", "Client", "ConfigError", "is_loopback"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE})
RETRIED_WRITES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
PAGE_SIZE = 1000  # the server's largest page

M = TypeVar("M", bound=Message)
Pem = str | os.PathLike[str] | bytes
MessageOrDict = Message | Mapping[str, Any]


ANSWERED_BY_KEY = "apportion-answered-by"  # trailing metadata of every error the server answers itself


class ApportionError(Exception):
    """A call that failed: its status ``code``, the server's ``message`` and, for
    INVALID_ARGUMENT, ``violations``: one ``(field, description)`` per bad field."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        *,
        from_server: bool = False,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations: list[tuple[str, str]] = list(violations)
        #: the Apportion server answered this error itself (its UNAVAILABLE means "no
        #: live replica", not "cannot reach the server")
        self.from_server = from_server

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> ApportionError:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        message = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        trailing = (exc.trailing_metadata() if isinstance(exc, grpc.Call) else None) or ()
        answered = any(key == ANSWERED_BY_KEY for key, _value in trailing)
        return cls(code, message, _violations(exc), from_server=answered)


class ConfigError(ValueError):
    """A client that cannot be set up: a TLS file that cannot be read, a key without its certificate."""


def _violations(exc: grpc.RpcError) -> list[tuple[str, str]]:
    if not isinstance(exc, grpc.Call):
        return []
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # the status in the details does not match the call's
        return []
    out: list[tuple[str, str]] = []
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def is_loopback(address: str) -> bool:
    """Whether a gRPC target (``127.0.0.1:50051``, ``[::1]:1``, ``localhost:1``, ``unix:/p``)
    stays on this machine. Other names are not resolved and count as not loopback."""
    address = address.strip()
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    if address.startswith("dns:"):
        address = address[4:].lstrip("/")
    if address.startswith("["):
        host = address[1 : address.find("]")] if "]" in address else ""
    else:
        host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {os.fsdecode(value)}: {exc.strerror or exc}") from exc


def _message(value: MessageOrDict, cls: type[M]) -> M:
    if isinstance(value, cls):
        return value
    if isinstance(value, Message):
        raise TypeError(f"expected a {cls.DESCRIPTOR.full_name} or a dict, got {value.DESCRIPTOR.full_name}")
    return json_format.ParseDict(dict(value), cls())


def _workload_list(workloads: pb.WorkloadList | Mapping[str, Any] | Iterable[MessageOrDict]) -> list[Any]:
    """Workloads as a WorkloadList message, a workloads document (``{"workloads": [...]}``)
    or an iterable of workloads (messages or dicts)."""
    if isinstance(workloads, pb.WorkloadList):
        return list(workloads.workloads)
    if isinstance(workloads, Mapping):
        return list(_message(workloads, pb.WorkloadList).workloads)
    return [_message(w, pb.Workload) for w in workloads]


MAX_RECEIVE_BYTES = 256 * 1024 * 1024
"""Replies can be large (the plan of 100,000 workloads is tens of MiB); gRPC's default is 4 MiB."""


def _messages(call: Any) -> Generator[Any, None, None]:
    """The messages of a server-streaming call; an error as :class:`ApportionError`; the
    call cancelled when the iterator is closed."""
    try:
        yield from call
    except grpc.RpcError as exc:
        raise ApportionError.from_rpc_error(exc) from None
    finally:
        call.cancel()


def _channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    given = list(options)
    if not any(name == "grpc.max_receive_message_length" for name, _ in given):
        given.append(("grpc.max_receive_message_length", MAX_RECEIVE_BYTES))
    return given


class Client:
    """A connection to an Apportion server (see the module docstring for the decisions)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        ca: Pem | None = None,
        cert: Pem | None = None,
        key: Pem | None = None,
        insecure: bool | None = None,
        timeout: float | None = None,
        retries: int = 3,
        backoff_s: float = 0.1,
        interceptors: Sequence[Any] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if (cert is None) != (key is None):
            raise ConfigError("a client certificate needs its key, and a key its certificate")
        self.address = address
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        tls = (
            not insecure
            if insecure is not None
            else (ca is not None or cert is not None or not is_loopback(address))
        )
        self.tls = tls
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(ca, "CA certificate"),
                private_key=_pem(key, "client private key"),
                certificate_chain=_pem(cert, "client certificate"),
            )
            channel = grpc.secure_channel(address, credentials, options=_channel_options(options))
        else:
            channel = grpc.insecure_channel(address, options=_channel_options(options))
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._channel = channel
        self._stub = allocator_pb2_grpc.AllocatorStub(channel)
        self._inference = inference_pb2_grpc.InferenceStub(channel)

    # -- plumbing ----------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def _call(
        self,
        method: Callable[..., Any],
        request: Message,
        expect: type[M],
        *,
        retried: frozenset[grpc.StatusCode] = RETRIED,
        timeout: float | None = None,
    ) -> M:
        attempt = 0
        while True:
            try:
                response = method(request, timeout=timeout or self.timeout, metadata=self._metadata)
                if not isinstance(response, expect):
                    raise TypeError(f"expected a {expect.__name__} from the server, got {type(response)}")
                return response
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code not in retried or attempt >= self.retries:
                    raise ApportionError.from_rpc_error(exc) from None
            time.sleep(self.backoff_s * 2**attempt)
            attempt += 1

    # -- planning ----------------------------------------------------------

    def plan(
        self,
        inventory: pb.Inventory | Mapping[str, Any],
        workloads: pb.WorkloadList | Mapping[str, Any] | Iterable[MessageOrDict],
        policy: str = "",
        options: apb.PlanOptions | Mapping[str, Any] | None = None,
        current: pb.Plan | Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.Plan:
        """A stateless what-if plan of ``workloads`` on ``inventory`` (no server state touched).

        ``timeout`` (default: the client's) is also the solver's budget: the
        server cuts the time limit to fit it and returns the best plan found.
        """
        return self.plan_response(inventory, workloads, policy, options, current, timeout=timeout).plan

    def plan_response(
        self,
        inventory: pb.Inventory | Mapping[str, Any],
        workloads: pb.WorkloadList | Mapping[str, Any] | Iterable[MessageOrDict],
        policy: str = "",
        options: apb.PlanOptions | Mapping[str, Any] | None = None,
        current: pb.Plan | Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> apb.PlanResponse:
        """:meth:`plan`, with the solver time the server measured."""
        request = apb.PlanRequest(
            inventory=_message(inventory, pb.Inventory),
            workloads=_workload_list(workloads),
            policy=policy,
        )
        if options is not None:
            request.options.CopyFrom(_message(options, apb.PlanOptions))
        if current is not None:
            request.current.CopyFrom(_message(current, pb.Plan))
        return self._call(self._stub.Plan, request, apb.PlanResponse, timeout=timeout)

    # -- workloads ---------------------------------------------------------

    def submit(self, workload: MessageOrDict, request_id: str | None = None) -> apb.WorkloadStatus:
        """Submit a workload; retried with the same ``request_id`` (default: a new uuid4)."""
        request = apb.SubmitWorkloadRequest(
            workload=_message(workload, pb.Workload), request_id=request_id or str(uuid.uuid4())
        )
        return self._call(self._stub.SubmitWorkload, request, apb.WorkloadStatus, retried=RETRIED_WRITES)

    def update(self, workload: MessageOrDict, request_id: str | None = None) -> apb.WorkloadStatus:
        """A new version of a workload (named by its id); retried like :meth:`submit`."""
        request = apb.UpdateWorkloadRequest(
            workload=_message(workload, pb.Workload), request_id=request_id or str(uuid.uuid4())
        )
        return self._call(self._stub.UpdateWorkload, request, apb.WorkloadStatus, retried=RETRIED_WRITES)

    def get(self, id: str) -> apb.WorkloadStatus:
        return self._call(self._stub.GetWorkload, apb.GetWorkloadRequest(id=id), apb.WorkloadStatus)

    def list(
        self, tenant: str = "", kind: str = "", state: str = "", page_size: int = 0
    ) -> Iterator[apb.WorkloadStatus]:
        """Every workload that matches, page after page (``page_size`` 0: the server's default).

        The first page is fetched now, so a bad filter raises here; the next
        pages as the iteration reaches them.
        """
        request = apb.ListWorkloadsRequest(tenant=tenant, kind=kind, state=state, page_size=page_size)
        first = self._call(self._stub.ListWorkloads, request, apb.ListWorkloadsResponse)

        def pages(response: apb.ListWorkloadsResponse) -> Iterator[apb.WorkloadStatus]:
            while True:
                yield from response.workloads
                if not response.next_page_token:
                    return
                request.page_token = response.next_page_token
                response = self._call(self._stub.ListWorkloads, request, apb.ListWorkloadsResponse)

        return pages(first)

    def audit(
        self, *, principal: str = "", id: str = "", since: float = 0.0, until: float = 0.0, limit: int = 0
    ) -> Iterator[apb.AuditEntry]:
        """The audit trail (admin), oldest first, page after page; ``limit`` 0: all."""
        request = apb.AuditRequest(principal=principal, id=id, since=since, until=until)
        left = limit or None
        while True:
            request.limit = min(1000, left) if left is not None else 0
            page = self._call(self._stub.Audit, request, apb.AuditResponse).entries
            yield from page
            if left is not None:
                left -= len(page)
                if left <= 0:
                    return
            if not page:
                return
            request.after_seq = page[-1].seq

    def cancel(self, id: str) -> apb.WorkloadStatus:
        return self._call(self._stub.CancelWorkload, apb.CancelWorkloadRequest(id=id), apb.WorkloadStatus)

    # -- inventory ---------------------------------------------------------

    def upsert_nodes(
        self,
        gpu_types: Iterable[MessageOrDict] = (),
        nodes: Iterable[MessageOrDict] = (),
        tenants: Iterable[MessageOrDict] = (),
    ) -> apb.UpsertNodesResponse:
        """Add or replace GPU types, nodes and tenants (admin). An inventory
        document fits as keywords: ``client.upsert_nodes(**inventory_dict)``."""
        request = apb.UpsertNodesRequest(
            gpu_types=[_message(t, pb.GpuType) for t in gpu_types],
            nodes=[_message(n, pb.Node) for n in nodes],
            tenants=[_message(t, pb.Tenant) for t in tenants],
        )
        return self._call(self._stub.UpsertNodes, request, apb.UpsertNodesResponse)

    def drain(self, id: str) -> pb.Node:
        """Mark node ``id`` draining (admin)."""
        return self._call(self._stub.DrainNode, apb.DrainNodeRequest(id=id), pb.Node)

    def undrain(self, id: str) -> pb.Node:
        """Mark draining node ``id`` ready again (admin): new work may land on it. It is
        read and written back with ``UpsertNodes``; FAILED_PRECONDITION (raised here) if
        it is not draining (a down node comes back when its worker reconnects)."""
        nodes, _types, _tenants = self.nodes()
        node = next((n for n in nodes if n.id == id), None)
        if node is None:
            raise ApportionError(grpc.StatusCode.NOT_FOUND, f"no node {id!r}")
        if node.state != "draining":
            raise ApportionError(
                grpc.StatusCode.FAILED_PRECONDITION, f"node {id!r} is {node.state or 'ready'}, not draining"
            )
        node.state = "ready"
        response = self.upsert_nodes([], [node], [])
        return next((n for n in response.nodes if n.id == id), node)

    def nodes(
        self, page_size: int = PAGE_SIZE
    ) -> tuple[builtins.list[pb.Node], builtins.list[pb.GpuType], builtins.list[pb.Tenant]]:
        """The whole inventory: every node (all pages), the GPU types and the tenants."""
        request = apb.ListNodesRequest(page_size=page_size)
        response = self._call(self._stub.ListNodes, request, apb.ListNodesResponse)
        nodes = list(response.nodes)
        gpu_types = list(response.gpu_types)
        tenants = list(response.tenants)
        while response.next_page_token:
            request.page_token = response.next_page_token
            response = self._call(self._stub.ListNodes, request, apb.ListNodesResponse)
            nodes.extend(response.nodes)
        return nodes, gpu_types, tenants

    # -- the plan ----------------------------------------------------------

    def current_plan(self) -> apb.PlanRecord:
        """The plan the server runs now (NOT_FOUND before its first plan)."""
        return self._call(self._stub.GetPlan, apb.GetPlanRequest(), apb.PlanRecord)

    def explain(self, id: str) -> apb.Explanation:
        return self._call(self._stub.Explain, apb.ExplainRequest(id=id), apb.Explanation)

    def watch(self, from_revision: int = 0, tenant: str = "") -> Generator[apb.Event, None, None]:
        """Changes after ``from_revision``, then new ones as they happen, until the
        iterator is closed (the call is then cancelled) or the server goes away
        (:class:`ApportionError`)."""
        call = self._stub.Watch(
            apb.WatchRequest(from_revision=from_revision, tenant=tenant), metadata=self._metadata
        )

        return _messages(call)

    def logs(self, id: str, *, follow: bool = False, tail: int = 0) -> Generator[apb.LogLine, None, None]:
        """A workload's log lines the server keeps (the last ``tail``; 0: all), then with
        ``follow`` new ones until the workload ends or the iterator is closed."""
        call = self._stub.Logs(apb.LogsRequest(id=id, follow=follow, tail=tail), metadata=self._metadata)

        return _messages(call)

    # -- inference ---------------------------------------------------------

    def generate(
        self,
        service: str,
        prompt: str,
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> inference_pb2.GenerateResponse:
        """``Inference.Generate`` through the server's router: text from a replica of
        ``service`` (``max_tokens`` 0: the replica's default; ``temperature`` None: greedy).
        UNAVAILABLE (no replica serving yet) is retried like any call."""
        request = inference_pb2.GenerateRequest(service=service, prompt=prompt, max_tokens=max_tokens)
        if temperature is not None:
            request.temperature = temperature
        return self._call(self._inference.Generate, request, inference_pb2.GenerateResponse, timeout=timeout)

    def health(self, service: str = "apportion.v1.Allocator") -> str:
        """The standard health check's answer: ``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``…"""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        response = self._call(
            stub.Check, health_pb2.HealthCheckRequest(service=service), health_pb2.HealthCheckResponse
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
