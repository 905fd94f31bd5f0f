"""The Workers service's contract, called directly (no agent): auth, validation,
sessions."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from apportion.v1 import workers_pb2_grpc
from server import convert
from server.workers import WORKER_LABEL
from tests.e2e.cluster import FAST_WORKERS
from tests.server.serving import ADMIN_TOKEN, RESEARCH_TOKEN, TOKENS_YAML, metadata, running_server

NODE = pb.Node(id="n1", gpu_type="sim", gpus=2, cpus=4, memory_gib=8)


def test_register_needs_the_admin_with_tokens_and_a_valid_node(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(tmp_path, tokens=tokens, workers=FAST_WORKERS) as srv:
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        request = wpb.RegisterRequest(node=NODE, advertise_address="10.1.2.3")
        with pytest.raises(grpc.RpcError) as denied:
            stub.Register(request, metadata=metadata(RESEARCH_TOKEN))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as unknown_type:
            stub.Register(request, metadata=metadata(ADMIN_TOKEN))
        assert unknown_type.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(unknown_type.value)
        assert status is not None
        assert [v.path for v in convert.field_violations(status)] == ["node.gpu_type"]

        srv.server.store.upsert_inventory(gpu_types=[{"name": "sim", "memory_gib": 16}])
        reply = stub.Register(request, metadata=metadata(ADMIN_TOKEN))
        assert reply.session_id and reply.heartbeat_timeout_s == FAST_WORKERS.heartbeat_timeout_s
        node = srv.server.store.get_node("n1").spec
        assert node["state"] == "ready" and node["labels"][WORKER_LABEL] == "10.1.2.3"


def test_connect_with_an_unknown_session_is_refused(tmp_path: Path) -> None:
    with running_server(tmp_path, workers=FAST_WORKERS) as srv:
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Connect(iter([wpb.WorkerMessage(session_id="nope")]), timeout=5))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_silent_session_marks_its_node_down(tmp_path: Path) -> None:
    import time

    with running_server(tmp_path, workers=FAST_WORKERS) as srv:
        srv.server.store.upsert_inventory(gpu_types=[{"name": "sim", "memory_gib": 16}])
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        stub.Register(wpb.RegisterRequest(node=NODE, advertise_address="127.0.0.1"))
        deadline = time.monotonic() + 10
        while srv.server.store.get_node("n1").spec.get("state") != "down":
            assert time.monotonic() < deadline, "the node was not marked down"
            time.sleep(0.05)
