"""What a hostile tenant can send, through a real server: names that escape a directory
or carry control characters, numbers that once stopped every planning round, runtimes
of unbounded size, and requests with more violations than fit in gRPC's trailers. Each
is INVALID_ARGUMENT with readable field violations, and the server keeps planning."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from server import convert
from tests.server.serving import Running, inventory_request, running_server


def training(workload_id: str, **throughput: float) -> pb.Workload:
    w = pb.Workload(id=workload_id, tenant="research")
    w.training.gpus = 1
    w.training.throughput.update(throughput or {"h100-80g": 1.0})
    return w


def refusal(srv: Running, workload: pb.Workload) -> tuple[str, list[str]]:
    """The message and ``path: message`` violations of a refused SubmitWorkload."""
    with pytest.raises(grpc.RpcError) as info:
        srv.stub().SubmitWorkload(apb.SubmitWorkloadRequest(workload=workload), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    status = rpc_status.from_call(info.value)
    assert status is not None
    return str(info.value.details()), [str(v) for v in convert.field_violations(status)]


@pytest.mark.parametrize(
    "bad_id", ["../../../escape-rel", "/etc/evil", "a\nb", "\x1b[2Jclear", "rtl\u202eid", "x" * 10_000]
)
def test_ids_that_are_not_safe_names_are_refused(tmp_path: Path, bad_id: str) -> None:
    with running_server(tmp_path) as srv:
        srv.stub().UpsertNodes(inventory_request())
        _, violations = refusal(srv, training(bad_id))
        assert len(violations) == 1 and violations[0].startswith("workload.id: must be 1-253 letters")
        assert len(violations[0]) < 300


def test_numbers_that_stopped_planning_are_refused_and_planning_goes_on(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        srv.stub().UpsertNodes(inventory_request())
        service = pb.Workload(id="huge", tenant="product")
        service.inference.gpus_per_replica["h100-80g"] = 1
        service.inference.replica_rps["h100-80g"] = 10.0
        service.inference.target_rps = 1e300
        _, violations = refusal(srv, service)
        assert violations == ["workload.inference.target_rps: must be ≤ 1e+09"]
        srv.stub().SubmitWorkload(apb.SubmitWorkloadRequest(workload=training("fine")), timeout=30)
        deadline = time.monotonic() + 30
        while srv.stub().GetWorkload(apb.GetWorkloadRequest(id="fine")).state != "PLACED":
            assert time.monotonic() < deadline, "the control loop stopped planning"
            time.sleep(0.1)


def test_runtimes_are_bounded_and_unambiguous(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        srv.stub().UpsertNodes(inventory_request())
        cases = {
            "unknown-builtin": (pb.Runtime(builtin="rm-rf"), "workload.runtime.builtin: must be one of"),
            "both": (
                pb.Runtime(builtin="train-lm", command=["sh"]),
                "workload.runtime: needs exactly one of builtin, entrypoint or command "
                "(got builtin and command)",
            ),
            "many-args": (
                pb.Runtime(command=["x"] * 100_000),
                "workload.runtime.command: must have at most 256",
            ),
            "many-env": (
                pb.Runtime(command=["x"], env={f"V{i}": "1" for i in range(10_000)}),
                "workload.runtime.env: must have at most 256 entries",
            ),
            "bad-entrypoint": (
                pb.Runtime(entrypoint="os; import evil"),
                "workload.runtime.entrypoint: must be",
            ),
        }
        for name, (runtime, expected) in cases.items():
            w = training(name)
            w.runtime.CopyFrom(runtime)
            _, violations = refusal(srv, w)
            assert any(v.startswith(expected) for v in violations), (name, violations)


def test_a_hundred_thousand_violations_still_make_a_readable_answer(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        srv.stub().UpsertNodes(inventory_request())
        w = training("many", **{f"no-such-type-{i}": 1.0 for i in range(100_000)})
        w.training.throughput["h100-80g"] = 1.0
        message, violations = refusal(srv, w)
        assert "invalid input (100000 problems)" in message
        assert len(violations) == 21 and violations[-1] == "... and 99980 more"


def test_a_request_id_resent_with_another_spec_is_already_exists(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        srv.stub().UpsertNodes(inventory_request())
        first = training("once")
        srv.stub().SubmitWorkload(apb.SubmitWorkloadRequest(workload=first, request_id="req-1"), timeout=30)
        again = srv.stub().SubmitWorkload(
            apb.SubmitWorkloadRequest(workload=first, request_id="req-1"), timeout=30
        )
        assert again.workload.id == "once" and again.version == 1  # a retry: the same answer
        other = training("once", **{"h100-80g": 2.0})
        with pytest.raises(grpc.RpcError) as info:
            srv.stub().SubmitWorkload(
                apb.SubmitWorkloadRequest(workload=other, request_id="req-1"), timeout=30
            )
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "another spec" in str(info.value.details())


def test_malformed_request_bytes_are_invalid_argument_not_internal(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        channel = grpc.insecure_channel(srv.address)
        try:
            for method in (
                "Allocator/SubmitWorkload",
                "Allocator/UpsertNodes",
                "Allocator/Plan",
                "Workers/Register",
            ):
                call = channel.unary_unary(f"/apportion.v1.{method}")
                with pytest.raises(grpc.RpcError) as info:
                    call(b"\\xff\\xff\\xff\\xff\\x0f", timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
                assert "not a valid message" in str(info.value.details())
            # and the server goes on: a valid request is answered
            srv.stub().UpsertNodes(inventory_request(), timeout=10)
        finally:
            channel.close()
