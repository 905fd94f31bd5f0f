"""End to end: ``Inference.Generate`` through the server's router to replicas run by real
agents (a small gRPC replica in a command runtime, and one real ``serve-lm``), and
``Allocator.Logs`` (``apportion logs``) — CPU only."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import inference_pb2 as ipb
from apportion.v1 import inference_pb2_grpc
from apportion.v1 import types_pb2 as pb
from server import cli
from tests.e2e.cluster import GPU_TYPE, Cluster, cluster, pids_of, training, wait_for
from tests.server.serving import ROOT

# A replica: Inference.Generate answers "<replica>:<prompt>", on a free port of 127.0.0.1.
REPLICA = textwrap.dedent(
    """\
    import json, os, time
    from concurrent import futures
    import grpc
    from apportion.v1 import inference_pb2, inference_pb2_grpc

    class Echo(inference_pb2_grpc.InferenceServicer):
        def Generate(self, request, context):
            if request.prompt == "bad":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a bad prompt")
            text = "%s:%s" % (os.environ["APPORTION_REPLICA_ID"], request.prompt)
            return inference_pb2.GenerateResponse(text=text, tokens=len(request.prompt), replica="x")

    server = grpc.server(futures.ThreadPoolExecutor(4))
    inference_pb2_grpc.add_InferenceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("APPORTION_READY " + json.dumps({"endpoint": "127.0.0.1:%d" % port}), flush=True)
    while True:
        print("APPORTION_PROGRESS " + json.dumps({"requests_per_s": 1.0}), flush=True)
        time.sleep(0.5)
    """
)

# Prints numbered lines until stopped.
CHATTY = textwrap.dedent(
    """\
    import sys, time
    n = 0
    while True:
        n += 1
        print("line %d" % n, flush=True)
        time.sleep(0.1)
    """
)


def service(workload_id: str, runtime: dict[str, Any], replicas: int = 2) -> dict[str, Any]:
    return {
        "id": workload_id,
        "inference": {
            "gpus_per_replica": {GPU_TYPE: 1},
            "replica_rps": {GPU_TYPE: 10},
            "target_rps": 10 * replicas,
        },
        "runtime": runtime,
    }


def stub(c: Cluster) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(c.server.channel())


def two_replicas(c: Cluster, workload_id: str, timeout: float = 20.0) -> dict[int, str]:
    dispatcher = c.server.server.dispatcher
    c.wait_state(workload_id, "RUNNING", timeout=timeout)
    return wait_for(lambda: len(e := dispatcher.endpoints(workload_id)) == 2 and e, timeout, "2 endpoints")


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return,attr-defined]


def test_generate_is_routed_over_the_replicas_and_survives_a_lost_one(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "replica.py"
    path.write_text(REPLICA)
    with cluster(tmp_path) as c:
        workers = {"w1": c.worker("w1"), "w2": c.worker("w2")}
        c.wait_nodes("w1", "w2")
        c.submit(service("svc", {"command": [sys.executable, str(path)]}))
        c.submit(training("job", [sys.executable, "-c", "import time; time.sleep(60)"]))
        endpoints = two_replicas(c, "svc")
        inference = stub(c)

        replies = [inference.Generate(ipb.GenerateRequest(service="svc", prompt=f"p{i}")) for i in range(10)]
        assert all(r.text.endswith(f":p{i}") for i, r in enumerate(replies))
        assert Counter(r.replica for r in replies) == {"svc/0": 5, "svc/1": 5}

        # errors
        assert code_of(lambda: inference.Generate(ipb.GenerateRequest(service="nope"))) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert code_of(lambda: inference.Generate(ipb.GenerateRequest(service="job"))) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert code_of(lambda: inference.Generate(ipb.GenerateRequest(service="svc", prompt="bad"))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert code_of(lambda: inference.Generate(ipb.GenerateRequest(service="svc", max_tokens=-1))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )

        # the command line
        assert cli.main(["generate", "svc", "--prompt", "hello", "--server", c.server.address]) == 0
        assert capsys.readouterr().out.split(":", 1)[1] == "hello\n"

        # a worker and its replica die at once: the router still lists it until the worker is
        # marked down, so a request sent there fails with UNAVAILABLE and is retried on the other
        node = c.get("svc").placement.shards[0].node_id
        pids = pids_of(workers[node].work_dir)
        workers[node].kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        router = c.server.server.router
        replies = [inference.Generate(ipb.GenerateRequest(service="svc", prompt=f"q{i}")) for i in range(4)]
        assert all(r.replica == "svc/1" for r in replies)
        assert router.retries >= 1
        assert router.stats()[endpoints[0]][1] >= 1  # a failure recorded at the dead replica


def test_generate_without_a_live_replica_is_unavailable(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:  # no worker: the service cannot be placed
        gpu_type = pb.GpuType(name=GPU_TYPE, memory_gib=16)
        c.stub.UpsertNodes(apb.UpsertNodesRequest(gpu_types=[gpu_type]))
        c.submit(service("svc", {"command": [sys.executable, "-c", "pass"]}))
        call = lambda: stub(c).Generate(ipb.GenerateRequest(service="svc"))  # noqa: E731
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert "svc" in info.value.details()  # type: ignore[attr-defined]


def test_logs_shows_and_follows_a_command_runtimes_lines(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "chatty.py"
    path.write_text(CHATTY)
    with cluster(tmp_path) as c:
        c.worker("w1")
        c.wait_nodes("w1")
        c.submit(training("job", [sys.executable, str(path)]))
        c.wait_state("job", "RUNNING")
        address = c.server.address

        def printed() -> str | None:
            assert cli.main(["logs", "job", "--server", address]) == 0
            out = capsys.readouterr().out
            return out if "line 3" in out else None

        out = wait_for(printed, 10, "3 lines")
        assert "[0:0] line 1\n" in out
        assert cli.main(["logs", "job", "--tail", "2", "--server", address]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2

        # -f: follows new lines, and ends when the workload does
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]))
        args = [sys.executable, "-m", "server", "logs", "job", "-f", "--tail", "1", "--server", address]
        follow = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert follow.stdout is not None
            first = int(follow.stdout.readline().split()[-1])
            later = [follow.stdout.readline() for _ in range(5)]
            assert [int(x.split()[-1]) for x in later] == list(range(first + 1, first + 6))
            time.sleep(0.2)
            c.stub.CancelWorkload(apb.CancelWorkloadRequest(id="job"))
            assert follow.wait(10) == 0
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
            if follow.stdout is not None:
                follow.stdout.close()


def test_a_real_serve_lm_service_answers_through_the_router(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.worker("w1")
        c.worker("w2")
        c.wait_nodes("w1", "w2")
        runtime = {
            "builtin": "serve-lm",
            "env": {"APPORTION_DEVICE": "cpu", "APPORTION_SERVE_FROM": "trainer"},
        }
        c.submit(service("lm", runtime))
        two_replicas(c, "lm", timeout=60)
        inference = stub(c)
        replies = [
            inference.Generate(ipb.GenerateRequest(service="lm", prompt="hello", max_tokens=4), timeout=30)
            for _ in range(4)
        ]
        assert {r.replica for r in replies} == {"lm/0", "lm/1"}
        assert all(r.tokens == 4 and r.text for r in replies)
        # the replicas' latency (serve-lm's progress lines, every 2 s) reaches the service's message
        served = r"2 replicas running, [\d.]+ requests/s, p50 [\d.]+ ms, p99 [\d.]+ ms"
        wait_for(lambda: re.fullmatch(served, c.get("lm").message), 30, f"a message like {served!r}")
