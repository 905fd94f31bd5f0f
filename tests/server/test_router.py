"""The router's retry (server/inference.py, "Failures" and "Rollouts"): a request that
picked a replica just before the dispatcher took it out (a rollout stopping it)
reaches it after it stopped listening; the retry goes to the replicas serving by
then, not to the stale one again."""

from __future__ import annotations

from concurrent import futures
from types import SimpleNamespace
from typing import Any

import grpc

from apportion.v1 import inference_pb2 as ipb
from apportion.v1 import inference_pb2_grpc
from server.auth import Principal
from server.inference import InferenceServicer
from server.store import RUNNING, WorkloadRow


class Echo(inference_pb2_grpc.InferenceServicer):
    def Generate(self, request: ipb.GenerateRequest, context: grpc.ServicerContext) -> ipb.GenerateResponse:
        return ipb.GenerateResponse(text=f"new:{request.prompt}", tokens=1)


def replica() -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    inference_pb2_grpc.add_InferenceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


class Dispatcher:
    """Answers each endpoints() call with the next of ``answers`` (the last one repeated)."""

    def __init__(self, *answers: dict[int, str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def endpoints(self, workload_id: str) -> dict[int, str]:
        self.calls += 1
        return dict(self.answers[min(self.calls, len(self.answers)) - 1])


class Context:
    def time_remaining(self) -> float:
        return 5.0

    def is_active(self) -> bool:
        return True


def row() -> WorkloadRow:
    spec: dict[str, Any] = {"id": "chat", "inference": {"replica_rps": {"g": 10}}}
    placement = {"gpu_type": "g", "shards": [{"node_id": "w1", "gpus": 1}], "version": 2}
    return WorkloadRow("chat", "t", "inference", RUNNING, 2, spec, placement, [], "", 0.0, 0.0, 1)


def test_a_retry_goes_to_the_replicas_serving_then_not_to_the_one_taken_out() -> None:
    old, old_endpoint = replica()
    old.stop(None).wait()  # the old version's last replica: stopped, its port refuses connections
    new, new_endpoint = replica()
    # the request read the endpoints while only the old replica served; by its retry the
    # dispatcher has the new replica ready and the old one out
    dispatcher = Dispatcher({1: old_endpoint}, {1000: new_endpoint})
    shared = SimpleNamespace(store=SimpleNamespace(get_workload=lambda wid: row()))
    servicer = InferenceServicer(shared, dispatcher)  # type: ignore[arg-type]
    try:
        generate = InferenceServicer.Generate.__wrapped__  # type: ignore[attr-defined]
        request = ipb.GenerateRequest(service="chat", prompt="hi", max_tokens=1)
        reply = generate(servicer, request, Context(), Principal("admin", None, True))
        assert (reply.text, reply.replica) == ("new:hi", "chat/1000")
        assert servicer.router.stats()[old_endpoint] == (1, 1)  # tried once, failed, not again
    finally:
        new.stop(None)
        servicer.router.close()
