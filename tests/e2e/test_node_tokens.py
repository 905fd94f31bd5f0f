"""A worker's credential reaches no further than its node (issue: a tenant's job read the
admin token, and with it everything). The Workers service called directly with node tokens
(``{node: ID}`` in the tokens file), no agent: what a node may register, attach to, report,
upload and download, and that it reads nothing through ``Allocator``."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from apportion.v1 import workers_pb2_grpc
from server import convert
from tests.e2e.cluster import FAST_WORKERS, wait_for
from tests.server.serving import (
    ADMIN_TOKEN,
    NODE1_TOKEN,
    NODE2_TOKEN,
    PRODUCT_TOKEN,
    RESEARCH_TOKEN,
    TOKENS_YAML,
    Running,
    metadata,
    running_server,
)

INVENTORY = """\
gpu_types:
  - {name: sim, memory_gib: 16}
tenants:
  - {name: research}
  - {name: product}
"""


def node(node_id: str, gpus: int = 4) -> pb.Node:
    return pb.Node(id=node_id, gpu_type="sim", gpus=gpus, cpus=4, memory_gib=8)


def code_of(call: Any) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined, no-any-return]
    return None


def setup(srv: Running) -> None:
    inv = convert.inventory_from_data(convert.parse_document(INVENTORY))
    request = apb.UpsertNodesRequest(gpu_types=inv.gpu_types, tenants=inv.tenants)
    srv.stub().UpsertNodes(request, metadata=metadata(ADMIN_TOKEN))


def submit(srv: Running, workload: dict[str, Any], token: str) -> None:
    msg = convert.workloads_from_data({"workloads": [workload]}).workloads[0]
    srv.stub().SubmitWorkload(apb.SubmitWorkloadRequest(workload=msg), metadata=metadata(token))


def training(workload_id: str, tenant: str, runtime: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "id": workload_id,
        "tenant": tenant,
        "training": {"gpus": 1, "throughput": {"sim": 1.0}, "remaining_work": 100},
    }
    if runtime:
        spec["runtime"] = {"command": ["sleep", "60"]}
    return spec


def service(workload_id: str, tenant: str, serve_from: str) -> dict[str, Any]:
    return {
        "id": workload_id,
        "tenant": tenant,
        "priority": 10,
        "inference": {"gpus_per_replica": {"sim": 1}, "replica_rps": {"sim": 10}, "target_rps": 10},
        "runtime": {"command": ["sleep", "60"], "env": {"APPORTION_SERVE_FROM": serve_from}},
    }


def checkpoint(workload_id: str, step: int, data: bytes) -> Iterator[wpb.CheckpointChunk]:
    yield wpb.CheckpointChunk(
        workload_id=workload_id,
        step=step,
        name=f"ckpt-{step}.pt",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
    )


class Stream:
    """A worker's Connect stream, by hand: heartbeats every 0.3 s, launches collected."""

    def __init__(self, stub: workers_pb2_grpc.WorkersStub, session: str, token: str) -> None:
        self.session = session
        self.outbox: queue.Queue[wpb.WorkerMessage | None] = queue.Queue()
        self.outbox.put(wpb.WorkerMessage(session_id=session, heartbeat=wpb.Heartbeat()))
        self.launches: dict[str, wpb.Launch] = {}
        self.call = stub.Connect(iter(self.outbox.get, None), metadata=metadata(token))
        self.closed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                if message.WhichOneof("body") == "launch":
                    self.launches[message.launch.workload_id] = message.launch
        except grpc.RpcError:
            pass
        finally:
            self.closed.set()

    def _beat(self) -> None:
        while not self.closed.wait(0.3):
            self.send(wpb.WorkerMessage(heartbeat=wpb.Heartbeat()))

    def send(self, message: wpb.WorkerMessage) -> None:
        message.session_id = self.session
        self.outbox.put(message)

    def launch(self, workload_id: str) -> wpb.Launch:
        return wait_for(lambda: self.launches.get(workload_id), 20, f"a launch of {workload_id}")

    def close(self) -> None:
        self.closed.set()
        self.outbox.put(None)
        self.call.cancel()


def test_a_node_token_registers_only_its_node_and_reads_nothing(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(tmp_path, tokens=tokens, workers=FAST_WORKERS) as srv:
        setup(srv)
        workers = workers_pb2_grpc.WorkersStub(srv.channel())
        submit(srv, training("secret-job", "research"), RESEARCH_TOKEN)

        def register(node_id: str, token: str) -> wpb.RegisterResponse:
            request = wpb.RegisterRequest(node=node(node_id), advertise_address="127.0.0.1")
            return workers.Register(request, metadata=metadata(token), timeout=10)

        assert code_of(lambda: register("n2", NODE1_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: register("n1", RESEARCH_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
        session = register("n1", NODE1_TOKEN).session_id

        # nothing of Allocator: not the workloads, nodes, plan, nor a submission
        stub, md = srv.stub(), metadata(NODE1_TOKEN)
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: stub.ListWorkloads(apb.ListWorkloadsRequest(), metadata=md)) == denied
        assert (
            code_of(lambda: stub.GetWorkload(apb.GetWorkloadRequest(id="secret-job"), metadata=md)) == denied
        )
        assert code_of(lambda: stub.ListNodes(apb.ListNodesRequest(), metadata=md)) == denied
        assert code_of(lambda: stub.GetPlan(apb.GetPlanRequest(), metadata=md)) == denied
        assert code_of(lambda: list(stub.Watch(apb.WatchRequest(), metadata=md, timeout=5))) == denied
        msg = convert.workloads_from_data({"workloads": [training("mine", "")]}).workloads[0]
        submit_call = lambda: stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=msg), metadata=md)  # noqa: E731
        assert code_of(submit_call) == denied

        # another node's token cannot take over n1's session (nor knock its stream off)
        own = Stream(workers, session, NODE1_TOKEN)
        try:
            wait_for(lambda: srv.server.dispatcher.sessions()["n1"].connected, 10, "n1's stream")
            first = wpb.WorkerMessage(session_id=session, heartbeat=wpb.Heartbeat())
            hijack = lambda: list(workers.Connect(iter([first]), metadata=metadata(NODE2_TOKEN), timeout=5))  # noqa: E731
            assert code_of(hijack) == denied
            assert not own.closed.is_set() and srv.server.dispatcher.sessions()["n1"].connected
        finally:
            own.close()


def test_a_worker_reports_and_moves_checkpoints_only_for_what_it_runs(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(tmp_path, tokens=tokens, workers=FAST_WORKERS) as srv:
        setup(srv)
        workers = workers_pb2_grpc.WorkersStub(srv.channel())
        request = wpb.RegisterRequest(node=node("n1", gpus=1), advertise_address="127.0.0.1")
        session = workers.Register(request, metadata=metadata(NODE1_TOKEN), timeout=10).session_id
        stream = Stream(workers, session, NODE1_TOKEN)
        try:
            submit(srv, training("job", "research"), RESEARCH_TOKEN)
            stream.launch("job")
            submit(srv, training("other", "product"), PRODUCT_TOKEN)  # no room on n1: stays pending
            time.sleep(0.5)

            # statuses and logs of a shard it was never sent are ignored
            for message in (
                wpb.WorkerMessage(status=wpb.ShardStatus(workload_id="other", state="RUNNING")),
                wpb.WorkerMessage(status=wpb.ShardStatus(workload_id="other", state="FAILED", exit_code=1)),
                wpb.WorkerMessage(log=wpb.LogChunk(workload_id="other", text="forged line")),
                wpb.WorkerMessage(log=wpb.LogChunk(workload_id="job", text="a real line")),
            ):
                stream.send(message)
            logs = srv.server.dispatcher.log_buffer
            wait_for(lambda: logs.after("job", 0), 10, "job's log line")
            assert logs.after("other", 0) == []
            other = srv.stub().GetWorkload(apb.GetWorkloadRequest(id="other"), metadata=metadata(ADMIN_TOKEN))
            assert other.state == "PENDING", other

            # checkpoints: its own workload's only
            md1, md2 = metadata(NODE1_TOKEN), metadata(NODE2_TOKEN)
            denied = grpc.StatusCode.PERMISSION_DENIED
            assert workers.PutCheckpoint(checkpoint("job", 5, b"five"), metadata=md1).step == 5
            assert (
                code_of(lambda: workers.PutCheckpoint(checkpoint("other", 5, b"x"), metadata=md1)) == denied
            )
            assert code_of(lambda: workers.PutCheckpoint(checkpoint("job", 6, b"x"), metadata=md2)) == denied
            get = wpb.GetCheckpointRequest(workload_id="job")
            assert list(workers.GetCheckpoint(get, metadata=md1))[-1].data == b"five"
            assert code_of(lambda: list(workers.GetCheckpoint(get, metadata=md2))) == denied
            get_other = wpb.GetCheckpointRequest(workload_id="other")
            assert code_of(lambda: list(workers.GetCheckpoint(get_other, metadata=md1))) == denied
        finally:
            stream.close()


def test_a_service_serves_only_from_its_own_tenants_training(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(tmp_path, tokens=tokens, workers=FAST_WORKERS) as srv:
        setup(srv)
        workers = workers_pb2_grpc.WorkersStub(srv.channel())
        request = wpb.RegisterRequest(node=node("n1"), advertise_address="127.0.0.1")
        session = workers.Register(request, metadata=metadata(NODE1_TOKEN), timeout=10).session_id
        stream = Stream(workers, session, NODE1_TOKEN)
        try:
            # a name that does not exist yet is accepted; the trainer comes later, another tenant's
            submit(srv, service("thief", "product", "model"), PRODUCT_TOKEN)
            submit(srv, training("model", "research", runtime=False), RESEARCH_TOKEN)
            workers.PutCheckpoint(checkpoint("model", 7, b"weights"), metadata=metadata(ADMIN_TOKEN))

            # where the server can tell at submission, it refuses
            with pytest.raises(grpc.RpcError) as refused:
                submit(srv, service("thief2", "product", "model"), PRODUCT_TOKEN)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert 'must name a training workload of tenant "product"' in str(refused.value.details())

            # the launch of the other tenant's service does not carry the name; the node may not read it
            launch = stream.launch("thief")
            assert "APPORTION_SERVE_FROM" not in launch.workload.runtime.env
            get = wpb.GetCheckpointRequest(workload_id="model")
            md = metadata(NODE1_TOKEN)
            assert code_of(lambda: list(workers.GetCheckpoint(get, metadata=md))) == (
                grpc.StatusCode.PERMISSION_DENIED
            )

            # the trainer's own tenant's service: it carries it, and its node may read the checkpoint
            submit(srv, service("chat", "research", "model"), RESEARCH_TOKEN)
            assert stream.launch("chat").workload.runtime.env["APPORTION_SERVE_FROM"] == "model"
            assert list(workers.GetCheckpoint(get, metadata=md))[-1].data == b"weights"
        finally:
            stream.close()
