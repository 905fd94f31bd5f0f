"""Streams hold no thread (hardening, issue 15 item 3): a real server, real Watch and worker
Connect streams (bench/streams.py's light agents), far more of them than RPC threads."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from apportion.v1 import workers_pb2_grpc
from bench import streams
from server.workers import WorkersConfig
from tests.server.serving import (
    ADMIN_TOKEN,
    PRODUCT_TOKEN,
    RESEARCH_TOKEN,
    TOKENS_YAML,
    example_workloads,
    inventory_request,
    metadata,
    running_server,
)


class Background:
    """A coroutine of bench/streams.py (agents or watchers) on its own loop and thread,
    driven through a pipe as the benchmark drives its processes."""

    def __init__(self, coroutine: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
        self._mine, theirs = mp.Pipe()
        self._thread = threading.Thread(target=lambda: asyncio.run(coroutine(theirs)), daemon=True)
        self._thread.start()

    def report(self) -> dict[str, Any]:
        self._mine.send("report")
        return dict(self._mine.recv())

    def stop(self) -> dict[str, Any]:
        self._mine.send("stop")
        out = dict(self._mine.recv())
        self._thread.join(20)
        return out


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def two_threads(tmp_path: Path) -> Iterator[Any]:
    """A server with 2 RPC threads: the thread-pool server could hold 2 streams at most."""
    with running_server(tmp_path, threads=2, max_streams_per_caller=100) as srv:
        yield srv


def test_many_open_streams_leave_unary_calls_answered(two_threads: Any) -> None:
    srv = two_threads
    revision = streams.setup(srv.address)
    agents = Background(lambda conn: streams._agents(srv.address, 0, 40, 20, 0.0, conn))
    watchers = Background(lambda conn: streams._watchers(srv.address, 40, revision, conn))
    try:
        wait_until(lambda: agents.report()["connected"] == 40, 60, "40 connected workers")
        wait_until(lambda: watchers.report()["open"] == 40, 30, "40 open watches")
        stub = srv.stub()
        start = time.perf_counter()
        for _ in range(20):
            stub.ListWorkloads(apb.ListWorkloadsRequest(page_size=10), timeout=5)
        assert time.perf_counter() - start < 10
        before = watchers.report()["events"]
        job = pb.Workload(id="probe", training=pb.TrainingSpec(gpus=1, throughput={streams.GPU_TYPE: 1.0}))
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=job), timeout=5)
        wait_until(lambda: watchers.report()["events"] >= before + 40, 20, "every watch to see the submit")
        assert agents.report()["connected"] == 40  # heartbeats and leases kept flowing
    finally:
        got = agents.stop()
        seen = watchers.stop()
    assert got["errors"] == 0, got["error_examples"]
    assert seen["errors"] == []


def test_open_streams_are_capped_per_caller(tmp_path: Path, write: Any) -> None:
    tokens = write("tokens.yaml", TOKENS_YAML)
    with running_server(tmp_path, tokens=tokens, max_streams_per_caller=3) as srv:
        stub = srv.stub()
        stub.UpsertNodes(inventory_request(), metadata=metadata(ADMIN_TOKEN))
        for w in example_workloads():
            if w.tenant == "research":
                stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=w), metadata=metadata(RESEARCH_TOKEN))
        request = apb.WatchRequest(from_revision=0)
        held = [stub.Watch(request, metadata=metadata(RESEARCH_TOKEN)) for _ in range(3)]
        for call in held:
            next(call)  # open: each has sent its first event
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.Watch(request, metadata=metadata(RESEARCH_TOKEN)))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 open streams" in (caught.value.details() or "")
        with pytest.raises(grpc.RpcError) as logs:  # Logs counts against the same cap
            follow = apb.LogsRequest(id="llm-pretrain", follow=True)
            next(stub.Logs(follow, metadata=metadata(RESEARCH_TOKEN)))
        assert logs.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        other = stub.Watch(request, metadata=metadata(PRODUCT_TOKEN))  # another caller is not capped
        next(other)
        held.pop().cancel()  # a closed stream frees its place

        def reopens() -> bool:
            try:
                call = stub.Watch(request, metadata=metadata(RESEARCH_TOKEN))
                next(call)
            except grpc.RpcError:
                return False
            held.append(call)
            return True

        wait_until(reopens, 10, "the cap to free a place")
        for call in [*held, other]:
            call.cancel()


def test_registrations_wait_while_registered_workers_wait_for_their_streams(tmp_path: Path) -> None:
    """Backpressure: a worker that registered and whose stream is not served yet for half
    the heartbeat timeout makes new registrations UNAVAILABLE (workers retry) until it is."""
    config = WorkersConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0)
    with running_server(tmp_path, workers=config) as srv:
        streams.setup(srv.address)
        stub = workers_pb2_grpc.WorkersStub(srv.channel())

        def register(node_id: str) -> wpb.RegisterResponse:
            node = pb.Node(id=node_id, gpu_type=streams.GPU_TYPE, gpus=1)
            return stub.Register(wpb.RegisterRequest(node=node, advertise_address="127.0.0.1:9"), timeout=5)

        first = register("slow-worker")
        time.sleep(1.2)  # past half the timeout, its stream not yet open
        with pytest.raises(grpc.RpcError) as refused:
            register("next-worker")
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "wait for their streams" in (refused.value.details() or "")
        hello = wpb.WorkerMessage(session_id=first.session_id, heartbeat=wpb.Heartbeat())
        connect = stub.Connect(iter([hello]))
        assert next(connect).WhichOneof("body") == "lease"  # served: the backlog is gone
        register("next-worker")
        connect.cancel()


def test_a_session_no_stream_has_served_waits_three_timeouts_before_it_expires(tmp_path: Path) -> None:
    """A registered worker whose Connect comes late (a busy server accepts new streams late)
    keeps its session past one heartbeat timeout; after three it is gone."""
    config = WorkersConfig(heartbeat_interval_s=0.25, heartbeat_timeout_s=1.0)
    with running_server(tmp_path, workers=config) as srv:
        streams.setup(srv.address)
        stub = workers_pb2_grpc.WorkersStub(srv.channel())

        def session_of(node_id: str) -> str:
            node = pb.Node(id=node_id, gpu_type=streams.GPU_TYPE, gpus=1)
            request = wpb.RegisterRequest(node=node, advertise_address="127.0.0.1:9")
            return stub.Register(request, timeout=5).session_id

        def first_reply(session_id: str) -> wpb.ServerMessage:
            hello = wpb.WorkerMessage(session_id=session_id, heartbeat=wpb.Heartbeat())
            call = stub.Connect(iter([hello]), timeout=5)
            try:
                return next(call)
            finally:
                call.cancel()

        late = session_of("late-worker")
        time.sleep(1.8)  # past one timeout, within three
        assert first_reply(late).WhichOneof("body") == "lease"
        gone = session_of("gone-worker")
        time.sleep(4.5)  # past three timeouts (and the expiry pass after them)
        with pytest.raises(grpc.RpcError) as expired:
            first_reply(gone)
        assert expired.value.code() is grpc.StatusCode.FAILED_PRECONDITION
