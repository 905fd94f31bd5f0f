"""End to end, workers with SEPARATE work directories (no shared file system), CPU only:
the server keeps each training job's latest checkpoint, so

- a ``train-lm`` job whose worker is SIGKILLed resumes on the other worker from the
  checkpoint the first one uploaded, and succeeds;
- a ``serve-lm`` on one worker serves the checkpoint of a ``train-lm`` that ran on another.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

import grpc

from apportion.v1 import inference_pb2 as ipb
from apportion.v1 import inference_pb2_grpc, workers_pb2_grpc
from apportion.v1 import workers_pb2 as wpb
from tests.e2e.cluster import GPU_TYPE, Cluster, alive, cluster, wait_for

EVERY = 10
MODEL_ARGS = ["--d-model", "32", "--layers", "1", "--seq-len", "32", "--batch-size", "4"]
ENV = {
    "APPORTION_DEVICE": "cpu",
    "APPORTION_CHECKPOINT_EVERY": str(EVERY),
    "APPORTION_PROGRESS_INTERVAL_S": "0.5",
}


def train(workload_id: str, steps: int) -> dict[str, object]:
    return {
        "id": workload_id,
        "training": {"gpus": 1, "throughput": {GPU_TYPE: 1.0}, "remaining_work": steps},
        "runtime": {"builtin": "train-lm", "env": ENV, "args": MODEL_ARGS},
    }


def stored_step(c: Cluster, workload_id: str) -> int:
    """The step of the checkpoint the server keeps for ``workload_id`` (-1: none)."""
    stub = workers_pb2_grpc.WorkersStub(c.server.channel())
    request = wpb.GetCheckpointRequest(workload_id=workload_id, newer_than=1 << 62)  # the header only
    try:
        return int(next(iter(stub.GetCheckpoint(request, timeout=10))).step)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            return -1
        raise


def local_steps(work_dir: Path, workload_id: str) -> list[int]:
    return sorted(
        int(p.stem.split("-")[1]) for p in (work_dir / "checkpoints" / workload_id).glob("ckpt-*.pt")
    )


def test_a_killed_workers_job_resumes_on_a_worker_with_its_own_work_dir(tmp_path: Path) -> None:
    steps = 200
    with cluster(tmp_path) as c:
        workers = {n: c.worker(n) for n in ("w1", "w2")}
        assert workers["w1"].work_dir != workers["w2"].work_dir
        c.wait_nodes("w1", "w2")
        c.submit(train("job", steps))
        first = c.wait_state("job", "RUNNING", timeout=30).placement.shards[0].node_id
        other = "w2" if first == "w1" else "w1"
        a, b = workers[first], workers[other]
        wait_for(lambda: stored_step(c, "job") >= 2 * EVERY, 60, "a checkpoint on the server")
        assert c.get("job").state == "RUNNING", c.get("job").message
        assert local_steps(b.work_dir, "job") == []  # nothing reaches B but through the server

        # SIGKILL worker A, then its runtime (its own session, so it outlived the worker)
        pids = [int(p.read_text().split()[0]) for p in (a.work_dir / "pids" / first).glob("*.pid")]
        assert pids
        a.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in pids), 10, "the runtime to die")
        saved = stored_step(c, "job")
        written = max(local_steps(a.work_dir, "job"))
        assert 0 < saved <= written < steps
        assert written - saved <= 3 * EVERY, (saved, written)  # uploads keep up with the checkpoints

        c.wait_nodes(first, state="down", timeout=15)
        wait_for(
            lambda: (s := c.get("job")).placement.shards and s.placement.shards[0].node_id == other,
            20,
            "the job to be re-planned on the other worker",
        )
        done = c.wait_state("job", "SUCCEEDED", timeout=120)
        assert f"step {steps}/{steps}" in done.message

        log = (b.work_dir / "logs" / "job" / "shard-0.log").read_text()  # only B's run
        resumed = re.findall(r"resumed from (\S+)ckpt-(\d+)\.pt at step (\d+)", log)
        assert resumed, log[-3000:]
        where, name_step, step = resumed[0][0], int(resumed[0][1]), int(resumed[0][2])
        assert where.startswith(str(b.work_dir)) and name_step == step == saved > 0
        assert re.search(rf"job: steps {step} to {steps} on 1 rank", log), log[-3000:]
        assert f"checkpoint of job step {saved} downloaded" in b.log()
        assert stored_step(c, "job") == steps  # B's final checkpoint went up before SUCCEEDED


def test_a_service_on_one_worker_serves_a_model_trained_on_another(tmp_path: Path) -> None:
    steps = 30
    with cluster(tmp_path) as c:
        a = c.worker("w1")
        c.wait_nodes("w1")
        c.submit(train("trainer", steps))
        c.wait_state("trainer", "SUCCEEDED", timeout=120)
        assert stored_step(c, "trainer") == steps  # on the server when it SUCCEEDED
        trained = (a.work_dir / "logs" / "trainer" / "shard-0.log").read_text()
        digest = re.findall(r"rank 0 done at step \d+, param_sha256 ([0-9a-f]{64})", trained)
        assert digest, trained[-3000:]
        assert a.stop() == 0  # w1 leaves: the service can only run on w2

        b = c.worker("w2")
        c.wait_nodes("w2")
        c.submit(
            {
                "id": "chat",
                "inference": {
                    "gpus_per_replica": {GPU_TYPE: 1},
                    "replica_rps": {GPU_TYPE: 10},
                    "target_rps": 10,
                },
                "runtime": {
                    "builtin": "serve-lm",
                    "env": {"APPORTION_DEVICE": "cpu", "APPORTION_SERVE_FROM": "trainer"},
                },
            }
        )
        c.wait_state("chat", "RUNNING", timeout=60)
        dispatcher = c.server.server.dispatcher
        wait_for(lambda: dispatcher.endpoints("chat"), 60, "the replica's endpoint")
        assert c.get("chat").placement.shards[0].node_id == "w2"
        inference = inference_pb2_grpc.InferenceStub(c.server.channel())
        reply = inference.Generate(
            ipb.GenerateRequest(service="chat", prompt="Once", max_tokens=4), timeout=30
        )
        assert reply.tokens == 4 and reply.replica == "chat/0"

        copy = b.work_dir / "checkpoints" / "trainer" / f"ckpt-{steps}.pt"
        assert copy.is_file() and local_steps(b.work_dir, "trainer") == [steps]
        served = (b.work_dir / "logs" / "chat" / "shard-0.log").read_text()
        assert f"loaded {copy} (step {steps})" in served, served[-3000:]
        assert f"param_sha256 {digest[0]}" in served, served[-3000:]
