"""End to end: a rolling ``UpdateWorkload`` of a real ``serve-lm`` service under traffic.

Two workers with simulated GPUs, a service of two replicas (``min_replicas: 2``)
answering ``Generate`` through the server's router, and a client calling it
continuously; then an update (a runtime env change: a new version). The new
version's replicas come up beside the old ones, the old ones are stopped once
the new ones serve, and not one call fails — first with room for the new replicas
beside the old (a surge), then with none (one GPU a worker: the old replicas make
room one at a time) — CPU only."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import inference_pb2 as ipb
from apportion.v1 import inference_pb2_grpc
from server import convert
from server.workers import REPLICA_STRIDE
from tests.e2e.cluster import GPU_TYPE, Cluster, alive, cluster, pids_of, wait_for


def service(version_mark: str, min_replicas: int = 2) -> dict[str, Any]:
    return {
        "id": "chat",
        "inference": {
            "gpus_per_replica": {GPU_TYPE: 1},
            "replica_rps": {GPU_TYPE: 10},
            "target_rps": 20,
            "min_replicas": min_replicas,
            "max_replicas": 2,
            "spread": "node",
        },
        "runtime": {
            "builtin": "serve-lm",
            "env": {"APPORTION_DEVICE": "cpu", "ROLLOUT_MARK": version_mark},  # a new mark: a new version
        },
    }


class Traffic:
    """A thread calling Generate on the service without pause; every answer and error kept."""

    def __init__(self, c: Cluster) -> None:
        self.stub = inference_pb2_grpc.InferenceStub(c.server.channel())
        self.replicas: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self.stub.Generate(
                    ipb.GenerateRequest(service="chat", prompt="hello", max_tokens=2), timeout=30
                )
                self.replicas.append(reply.replica)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def serving(c: Cluster, indexes: set[int], timeout: float) -> dict[int, str]:
    dispatcher = c.server.server.dispatcher
    return wait_for(
        lambda: set(e := dispatcher.endpoints("chat")) == indexes and e, timeout, f"replicas {indexes}"
    )


def live_pids(c: Cluster) -> set[int]:
    """The replica processes running now (a stopped one's pid file may linger a moment)."""
    return {p for w in c.workers for p in pids_of(w.work_dir) if alive(p)}


def roll(c: Cluster, min_replicas: int = 2) -> None:
    new = {REPLICA_STRIDE, REPLICA_STRIDE + 1}
    c.submit(service("v1", min_replicas))
    c.wait_state("chat", "RUNNING", timeout=90)
    old_endpoints = serving(c, {0, 1}, 90)
    old_pids = wait_for(lambda: len(p := live_pids(c)) == 2 and p, 30, "two replica processes")
    with Traffic(c) as traffic:
        wait_for(lambda: len(traffic.replicas) >= 5, 60, "answers from version 1")
        update = convert.workloads_from_data({"workloads": [service("v2", min_replicas)]}).workloads[0]
        assert c.stub.UpdateWorkload(apb.UpdateWorkloadRequest(workload=update)).version == 2
        endpoints = serving(c, new, 180)  # the old replicas are out of the router
        assert not set(endpoints.values()) & set(old_endpoints.values())
        answered = len(traffic.replicas)
        wait_for(lambda: len(traffic.replicas) >= answered + 5, 60, "answers from version 2")
    assert not traffic.errors, traffic.errors[:5]
    seen = Counter(traffic.replicas)
    assert {"chat/0", "chat/1"} & set(seen) and {f"chat/{i}" for i in new} & set(seen), seen
    assert traffic.replicas[-1] in {f"chat/{i}" for i in new}  # after the rollout only the new serve
    status = c.wait_state("chat", "RUNNING", timeout=30)
    assert status.version == 2 and not status.HasField("serving_version")
    wait_for(lambda: not any(alive(p) for p in old_pids), 30, "the old replicas' processes to end")
    now = live_pids(c)
    assert len(now) == 2 and not now & old_pids


def test_a_rolling_update_with_room_beside_the_old_replicas_never_fails_a_call(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.worker("w1", gpus=2)
        c.worker("w2", gpus=2)
        c.wait_nodes("w1", "w2")
        roll(c)


def test_a_rolling_update_in_place_never_fails_a_call(tmp_path: Path) -> None:
    """No room beside the old replicas: one at a time, as min_replicas 1 allows (with
    min_replicas 2 it waits: tests/e2e/test_dispatch.py)."""
    with cluster(tmp_path) as c:
        c.worker("w1", gpus=1)
        c.worker("w2", gpus=1)
        c.wait_nodes("w1", "w2")
        roll(c, min_replicas=1)
