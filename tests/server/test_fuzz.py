"""Fuzzing a live server (hardening, issue 15): seeded random mutations of valid requests.

Each request is a valid one of some method, serialized, then mutated at the byte level
(bit flips, truncation, inserted or duplicated bytes) or at the field level (a scalar
somewhere in it set to an extreme: 0, -1, 2**31-1, 1e308, NaN, inf, a 10,000-character
string, control characters). Every answer must be a deliberate status (OK or a client
error), never INTERNAL, UNKNOWN or UNAVAILABLE; afterwards the server answers its health
check and its control loop still plans. The seed is fixed, so a failure replays."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from tests.server.serving import example_workloads, inventory_request, running_server

SEED = 20261206
REQUESTS = 1500
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # Plan: a mutated time limit beyond the call's deadline
    grpc.StatusCode.OUT_OF_RANGE,
}
EXTREMES: dict[int, list[object]] = {
    FieldDescriptor.CPPTYPE_INT32: [0, -1, 2**31 - 1, -(2**31)],
    FieldDescriptor.CPPTYPE_INT64: [0, -1, 2**63 - 1, -(2**63)],
    FieldDescriptor.CPPTYPE_UINT32: [0, 2**32 - 1],
    FieldDescriptor.CPPTYPE_UINT64: [0, 2**64 - 1],
    FieldDescriptor.CPPTYPE_DOUBLE: [0.0, -1.0, 1e308, -1e308, math.nan, math.inf, -math.inf, 5e-324],
    FieldDescriptor.CPPTYPE_FLOAT: [0.0, -1.0, 3e38, math.nan, math.inf],
    FieldDescriptor.CPPTYPE_BOOL: [True, False],
    FieldDescriptor.CPPTYPE_STRING: ["", "x" * 10_000, "a\x00b", "\x1b[31m", "\u202eevil", "../../etc", " "],
}


def valid_requests() -> list[tuple[str, Message]]:
    """(method path, request) pairs that are valid against the example inventory."""
    inventory = inventory_request()
    workloads = example_workloads()
    node = inventory.nodes[0]
    out: list[tuple[str, Message]] = [
        ("/apportion.v1.Allocator/UpsertNodes", inventory),
        ("/apportion.v1.Allocator/ListWorkloads", apb.ListWorkloadsRequest(page_size=10, state="PENDING")),
        ("/apportion.v1.Allocator/ListNodes", apb.ListNodesRequest(page_size=5)),
        ("/apportion.v1.Allocator/GetPlan", apb.GetPlanRequest()),
        ("/apportion.v1.Allocator/DrainNode", apb.DrainNodeRequest(id=node.id)),
        ("/apportion.v1.Workers/Register", wpb.RegisterRequest(node=node, advertise_address="127.0.0.1:9")),
        (
            "/apportion.v1.Allocator/Plan",
            apb.PlanRequest(
                inventory=pb.Inventory(
                    gpu_types=inventory.gpu_types, nodes=inventory.nodes, tenants=inventory.tenants
                ),
                workloads=workloads,
                policy="throughput",
            ),
        ),
    ]
    for w in workloads:
        out += [
            (
                "/apportion.v1.Allocator/SubmitWorkload",
                apb.SubmitWorkloadRequest(workload=w, request_id=f"r-{w.id}"),
            ),
            ("/apportion.v1.Allocator/UpdateWorkload", apb.UpdateWorkloadRequest(workload=w)),
            ("/apportion.v1.Allocator/GetWorkload", apb.GetWorkloadRequest(id=w.id)),
            ("/apportion.v1.Allocator/Explain", apb.ExplainRequest(id=w.id)),
            ("/apportion.v1.Allocator/CancelWorkload", apb.CancelWorkloadRequest(id=w.id)),
        ]
    return out


def scalar_fields(msg: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every singular scalar field of ``msg`` and the messages in it (set or not)."""
    found: list[tuple[Message, FieldDescriptor]] = []
    for field in msg.DESCRIPTOR.fields:
        if field.label == FieldDescriptor.LABEL_REPEATED:
            if (
                field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
                and not field.message_type.GetOptions().map_entry
            ):
                for item in getattr(msg, field.name):
                    found += scalar_fields(item)
            continue
        if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            if msg.HasField(field.name):
                found += scalar_fields(getattr(msg, field.name))
        elif field.cpp_type in EXTREMES:
            found.append((msg, field))
    return found


def mutate_field(rng: random.Random, request: Message) -> bytes:
    copy = type(request)()
    copy.CopyFrom(request)
    fields = scalar_fields(copy)
    for _ in range(rng.randint(1, 3)):
        if not fields:
            break
        owner, field = rng.choice(fields)
        value = rng.choice(EXTREMES[field.cpp_type])
        with contextlib.suppress(TypeError, ValueError):  # not representable: not sendable either
            setattr(owner, field.name, value)
    return copy.SerializeToString()


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:
        del b[rng.randrange(len(b)) :]
    elif kind == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif b:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 64))
        b[i:i] = b[i:j]
    return bytes(b)


def test_random_mutations_leave_the_server_healthy_and_planning(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    requests = valid_requests()
    with running_server(tmp_path) as srv:
        channel = srv.channel()
        call: Callable[[str, bytes], None]

        def call(method: str, data: bytes) -> None:
            channel.unary_unary(method)(data, timeout=10)

        call("/apportion.v1.Allocator/UpsertNodes", inventory_request().SerializeToString())
        bad: list[str] = []
        codes: Counter[grpc.StatusCode] = Counter()
        for i in range(REQUESTS):
            method, request = rng.choice(requests)
            if method.endswith("/Plan") and rng.random() < 0.8:
                continue  # each Plan solves: a few of them are enough
            data = (
                mutate_field(rng, request)
                if rng.random() < 0.5
                else mutate_bytes(rng, request.SerializeToString())
            )
            try:
                call(method, data)
                codes[grpc.StatusCode.OK] += 1
            except grpc.RpcError as exc:
                codes[exc.code()] += 1
                if exc.code() not in ALLOWED:
                    bad.append(f"#{i} {method} {exc.code().name}: {exc.details()} (request {data[:80]!r})")
        assert not bad, "\n".join(bad[:10])
        # not a vacuous run: mutants were both accepted and refused
        assert codes[grpc.StatusCode.OK] >= 20 and codes[grpc.StatusCode.INVALID_ARGUMENT] >= 100, codes

        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        stub = srv.stub()
        stub.UpsertNodes(inventory_request(), timeout=10)  # undo what the fuzzing changed
        probe = pb.Workload(id="after-fuzz", training=pb.TrainingSpec(gpus=1, throughput={"h100-80g": 1.0}))
        submitted = stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=probe), timeout=10)
        deadline = time.monotonic() + 60
        while stub.GetPlan(apb.GetPlanRequest(), timeout=10).based_on < submitted.revision:
            assert time.monotonic() < deadline, "the control loop stopped planning after the fuzzing"
            time.sleep(0.2)
