"""The dispatcher against fake workers that speak the Workers protocol directly (no
agent, nothing runs): a moved training job's launch waits for its old shard to end
(break before make), at most the stop grace and a margin, or until the old node is
down; a moved service does not wait; a service's latency reaches its message."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from apportion.v1 import workers_pb2_grpc
from server import convert, workers
from tests.e2e.cluster import FAST_WORKERS, wait_for
from tests.server.serving import Running, running_server

GPU_TYPE = "sim"
COMMAND = {"command": ["never-run"]}


class FakeWorker:
    """Registers a one-GPU node and keeps its stream: what the server sends is queued in
    ``received``; statuses are sent with :meth:`status`; heartbeats until :meth:`silence`."""

    def __init__(self, srv: Running, node_id: str) -> None:
        self.node_id = node_id
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        node = pb.Node(id=node_id, gpu_type=GPU_TYPE, gpus=1, cpus=4, memory_gib=8)
        self.session = stub.Register(wpb.RegisterRequest(node=node, advertise_address="127.0.0.1")).session_id
        self.received: queue.Queue[wpb.ServerMessage] = queue.Queue()
        self._up: queue.Queue[wpb.WorkerMessage | None] = queue.Queue()
        self._quiet = threading.Event()
        self._up.put(wpb.WorkerMessage(heartbeat=wpb.Heartbeat()))
        self._call = stub.Connect(self._outgoing())
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _outgoing(self) -> Iterator[wpb.WorkerMessage]:
        while (msg := self._up.get()) is not None:
            msg.session_id = self.session
            yield msg

    def _read(self) -> None:
        try:
            for msg in self._call:
                self.received.put(msg)
        except Exception:  # the stream ended (silence, the server stopping)
            pass

    def _beat(self) -> None:
        while not self._quiet.wait(0.3):
            self._up.put(wpb.WorkerMessage(heartbeat=wpb.Heartbeat()))

    def status(self, launch: wpb.Launch, state: str, **fields: Any) -> None:
        self._up.put(
            wpb.WorkerMessage(
                status=wpb.ShardStatus(
                    workload_id=launch.workload_id,
                    version=launch.version,
                    shard_index=launch.shard_index,
                    state=state,
                    **fields,
                )
            )
        )

    def next(self, kind: str, timeout: float) -> Any:
        """The next ``launch`` or ``stop`` the server sends within ``timeout`` (others skipped), or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.received.get(timeout=left)
            except queue.Empty:
                return None
            if msg.WhichOneof("body") == kind:
                return getattr(msg, kind)
        return None

    def silence(self) -> None:
        """Stop sending anything (as a worker that died): the server marks the node down."""
        self._quiet.set()
        self._up.put(None)
        self._call.cancel()


def submit(srv: Running, workload: dict[str, Any]) -> None:
    msg = convert.workloads_from_data({"workloads": [workload]}).workloads[0]
    srv.stub().SubmitWorkload(apb.SubmitWorkloadRequest(workload=msg))


def start(tmp_path: Path) -> Any:
    return running_server(tmp_path, workers=FAST_WORKERS)


def two_workers(srv: Running) -> dict[str, FakeWorker]:
    srv.server.store.upsert_inventory(gpu_types=[{"name": GPU_TYPE, "memory_gib": 16}])
    return {n: FakeWorker(srv, n) for n in ("n1", "n2")}


def first_launch(fakes: dict[str, FakeWorker]) -> tuple[FakeWorker, FakeWorker, wpb.Launch]:
    """Wait for a Launch on either worker: (that worker, the other, the launch)."""

    def check() -> tuple[FakeWorker, FakeWorker, wpb.Launch] | None:
        for name, fake in fakes.items():
            launch = fake.next("launch", 0.05)
            if launch is not None:
                other = next(f for n, f in fakes.items() if n != name)
                return fake, other, launch
        return None

    return wait_for(check, 30, "a launch")


def training(workload_id: str) -> dict[str, Any]:
    return {
        "id": workload_id,
        "training": {"gpus": 1, "throughput": {GPU_TYPE: 1.0}, "remaining_work": 1000},
        "runtime": COMMAND,
    }


def drain_running_training_job(srv: Running, fakes: dict[str, FakeWorker]) -> tuple[FakeWorker, FakeWorker]:
    """A training job launched and RUNNING on one worker, whose node is then drained:
    (the old worker, after the server told it to stop; the new one)."""
    submit(srv, training("job"))
    old, new, launch = first_launch(fakes)
    old.status(launch, "STARTING")
    old.status(launch, "RUNNING", step=5, loss=2.0)
    stub = srv.stub()
    wait_for(lambda: stub.GetWorkload(apb.GetWorkloadRequest(id="job")).state == "RUNNING", 15, "RUNNING")
    stub.DrainNode(apb.DrainNodeRequest(id=old.node_id))
    stop = old.next("stop", 15)
    assert stop is not None and stop.workload_id == "job" and stop.shard_index == 0
    assert stop.reason == "no longer in the plan"
    return old, new


def test_a_moved_training_jobs_launch_waits_until_the_old_shard_has_stopped(tmp_path: Path) -> None:
    with start(tmp_path) as srv:
        fakes = two_workers(srv)
        old, new = drain_running_training_job(srv, fakes)
        assert new.next("launch", 2.0) is None  # the old shard is still stopping (its checkpoint)
        old_launch = wpb.Launch(workload_id="job", version=1, shard_index=0)
        old.status(old_launch, "STOPPED", step=7)
        launch = new.next("launch", 10)
        assert launch is not None and launch.workload_id == "job" and launch.shard_index == 0
        assert launch.master_addr == "127.0.0.1" and launch.world_size == 1


def test_the_launch_waits_at_most_the_stop_grace_and_a_margin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "MOVE_MARGIN_S", 1.0)  # FAST_WORKERS: stop grace 2 s, so 3 s in all
    with start(tmp_path) as srv:
        fakes = two_workers(srv)
        _old, new = drain_running_training_job(srv, fakes)
        stopped_at = time.monotonic()
        launch = new.next("launch", 20)  # the old worker never reports the end
        waited = time.monotonic() - stopped_at
        assert launch is not None and launch.workload_id == "job"
        assert waited >= 2.5, waited


def test_the_launch_goes_out_when_the_old_node_is_down(tmp_path: Path) -> None:
    with start(tmp_path) as srv:  # FAST_WORKERS: a worker silent for 2 s is down
        fakes = two_workers(srv)
        old, new = drain_running_training_job(srv, fakes)
        old.silence()
        stopped_at = time.monotonic()
        launch = new.next("launch", 20)
        assert launch is not None and launch.workload_id == "job"
        assert time.monotonic() - stopped_at < FAST_WORKERS.stop_grace_s + workers.MOVE_MARGIN_S
        assert srv.server.store.get_node(old.node_id).spec.get("state") == "down"


def test_a_gang_with_one_shard_moved_is_stopped_whole_before_it_is_launched_again(tmp_path: Path) -> None:
    with start(tmp_path) as srv:
        srv.server.store.upsert_inventory(gpu_types=[{"name": GPU_TYPE, "memory_gib": 16}])
        fakes = {n: FakeWorker(srv, n) for n in ("n1", "n2", "n3")}
        submit(srv, {**training("job"), "training": {**training("job")["training"], "gpus": 2}})
        stub = srv.stub()
        placed = wait_for(
            lambda: stub.GetWorkload(apb.GetWorkloadRequest(id="job")).placement.shards, 30, "a placement"
        )
        gang = {s.node_id: fakes[s.node_id].next("launch", 15) for s in placed}
        assert len(gang) == 2 and all(gang.values()), gang
        for node_id, launch in gang.items():
            fakes[node_id].status(launch, "RUNNING", step=5)
        wait_for(lambda: stub.GetWorkload(apb.GetWorkloadRequest(id="job")).state == "RUNNING", 15, "RUNNING")
        drained = placed[1].node_id  # shard 1's node: shard 0 may stay where it is
        stub.DrainNode(apb.DrainNodeRequest(id=drained))
        for node_id in gang:  # the shard that stays too: its gang lost a member
            stop = fakes[node_id].next("stop", 15)
            assert stop is not None and stop.workload_id == "job", node_id
        assert not any(f.next("launch", 0.5) for f in fakes.values())  # nothing until both have ended
        for node_id, launch in gang.items():
            fakes[node_id].status(launch, "STOPPED", step=6)
        launches = {n: f.next("launch", 10) for n, f in fakes.items() if n != drained}
        assert all(launches.values()), launches
        assert sorted(x.shard_index for x in launches.values()) == [0, 1]


def service(workload_id: str, target_rps: float) -> dict[str, Any]:
    return {
        "id": workload_id,
        "inference": {
            "gpus_per_replica": {GPU_TYPE: 1},
            "replica_rps": {GPU_TYPE: 10},
            "target_rps": target_rps,
        },
        "runtime": COMMAND,
    }


def test_a_moved_service_replica_is_launched_at_once(tmp_path: Path) -> None:
    with start(tmp_path) as srv:
        fakes = two_workers(srv)
        submit(srv, service("chat", 10))
        old, new, launch = first_launch(fakes)
        old.status(launch, "RUNNING", endpoint="127.0.0.1:1")
        srv.stub().DrainNode(apb.DrainNodeRequest(id=old.node_id))
        moved = new.next("launch", 15)  # while the old replica still runs: make before break
        assert moved is not None and moved.workload_id == "chat"


def test_a_services_latency_is_in_its_message(tmp_path: Path) -> None:
    with start(tmp_path) as srv:
        fakes = two_workers(srv)
        submit(srv, service("chat", 20))  # two replicas, one on each worker
        launches = {n: f.next("launch", 30) for n, f in fakes.items()}
        assert all(launches.values()), launches
        stub = srv.stub()

        def message() -> str:
            return str(stub.GetWorkload(apb.GetWorkloadRequest(id="chat")).message)

        fakes["n1"].status(launches["n1"], "RUNNING", requests_per_s=30.0)  # no latency measured yet
        fakes["n2"].status(launches["n2"], "RUNNING", requests_per_s=10.0)
        wait_for(
            lambda: message() == "2 replicas running, 40.0 requests/s", 15, "the message without latency"
        )
        fakes["n1"].status(
            launches["n1"], "RUNNING", requests_per_s=30.0, latency_p50_s=0.02, latency_p99_s=0.05
        )
        fakes["n2"].status(
            launches["n2"], "RUNNING", requests_per_s=10.0, latency_p50_s=0.04, latency_p99_s=0.08
        )
        # p50: the medians weighted by requests/s, (30 * 20 + 10 * 40) / 40 = 25 ms; p99: the highest
        expected = "2 replicas running, 40.0 requests/s, p50 25 ms, p99 80 ms"
        wait_for(lambda: message() == expected, 15, f"{expected!r}, not {message()!r}")


def test_an_in_place_rollout_never_goes_below_min_replicas(tmp_path: Path) -> None:
    """Two one-GPU workers, a service of two replicas with min_replicas 2: a new version has
    no room beside the old replicas, and making room would leave one serving, so the
    rollout waits with both old replicas serving (tests/e2e/test_rollout.py rolls in
    place where min_replicas allows it)."""
    with start(tmp_path) as srv:
        fakes = two_workers(srv)
        spec = {**service("chat", 20), "id": "chat"}
        spec["inference"] = {**spec["inference"], "min_replicas": 2, "max_replicas": 2, "spread": "node"}
        submit(srv, spec)
        launches = {n: f.next("launch", 30) for n, f in fakes.items()}
        assert all(launches.values()), launches
        for n, f in fakes.items():
            f.status(launches[n], "RUNNING", endpoint=f"127.0.0.1:{1 if n == 'n1' else 2}")
        dispatcher = srv.server.dispatcher
        wait_for(lambda: len(dispatcher.endpoints("chat")) == 2, 15, "two replicas serving")
        update = convert.workloads_from_data(
            {"workloads": [{**spec, "runtime": {**COMMAND, "args": ["v2"]}}]}
        ).workloads[0]
        assert srv.stub().UpdateWorkload(apb.UpdateWorkloadRequest(workload=update)).version == 2
        for f in fakes.values():
            assert f.next("stop", 4.0) is None  # neither old replica is stopped to make room
        assert len(dispatcher.endpoints("chat")) == 2
