"""End to end: the throughput a real ``train-lm`` job achieves is measured by the
server from its workers' reports and shown in ``GetWorkload`` (work units — steps —
per second of the whole gang, samples/s, the work done), while it runs and after
it has ended; and a job that runs slower than it declared on one GPU type moves
to another that declares more, once measured — CPU only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from apportion.v1 import allocator_pb2 as apb
from tests.e2e.cluster import GPU_TYPE, WorkerProcess, cluster, wait_for
from tests.server.serving import ROOT

STEPS = 100_000  # more than it will do: cancelled once measured (an id of its own: its MASTER_PORT)
BATCH = 4
RUNTIME: dict[str, Any] = {
    "builtin": "train-lm",
    "env": {"APPORTION_DEVICE": "cpu", "APPORTION_PROGRESS_INTERVAL_S": "0.3"},
    "args": ["--d-model", "32", "--layers", "1", "--seq-len", "32", "--batch-size", f"{BATCH}"],
}


def test_a_training_jobs_measured_throughput_appears_in_its_status(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.worker("w1", gpus=2)
        c.worker("w2", gpus=2)
        c.wait_nodes("w1", "w2")
        c.submit(
            {
                "id": "measured-lm",
                # declared far off (1000 steps/s): the measurement is the job's own
                "training": {"gpus": 2, "throughput": {GPU_TYPE: 1000.0}, "remaining_work": STEPS},
                "runtime": RUNTIME,
            }
        )
        c.wait_state("measured-lm", "RUNNING", timeout=60)

        def measured() -> apb.WorkloadStatus | None:
            status = c.get("measured-lm")
            return status if status.observed_throughput else None

        try:
            status = wait_for(measured, 90, "a measured throughput")
        except AssertionError:
            logs = "\n".join(f"--- {w.node_id}\n{w.log()[-3000:]}" for w in c.workers)
            raise AssertionError(f"no measured throughput: {c.get('measured-lm')}\n{logs}") from None
        [rate] = status.observed_throughput
        assert rate.gpu_type == GPU_TYPE and rate.gpus == 2
        assert 0 < rate.work_per_s < 1000 and rate.measured_s > 0 and rate.updated_at > 0
        assert 0 < status.work_done <= STEPS
        # the runtime counts samples of both ranks: BATCH x 2 per step
        assert 0.5 < rate.samples_per_s / (2 * BATCH) / rate.work_per_s < 2.0, rate

        # measured on: the average moves on with more seconds behind it, the work done grows
        def measured_more() -> apb.WorkloadStatus | None:
            status = c.get("measured-lm")
            return status if status.observed_throughput[0].measured_s > rate.measured_s + 1 else None

        later = wait_for(measured_more, 90, "more measurement")
        assert later.work_done > status.work_done and later.observed_throughput[0].work_per_s > 0
        listed = {w.workload.id: w for w in c.stub.ListWorkloads(apb.ListWorkloadsRequest()).workloads}
        assert listed["measured-lm"].observed_throughput[0].gpu_type == GPU_TYPE
        # kept after the job ends
        c.stub.CancelWorkload(apb.CancelWorkloadRequest(id="measured-lm"))
        cancelled = c.wait_state("measured-lm", "CANCELLED", timeout=30)
        assert cancelled.work_done >= later.work_done and cancelled.observed_throughput


class TypedWorker(WorkerProcess):
    """A worker whose simulated GPUs are of type ``gpu_type``."""

    def __init__(self, address: str, node_id: str, work_dir: Path, gpu_type: str) -> None:
        super().__init__(address, node_id, work_dir, gpus=1)
        self.gpu_type = gpu_type

    def start(self) -> TypedWorker:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]))
        args = [
            sys.executable, "-m", "server", "worker", "--server", self.address, "--node-id", self.node_id,
            "--gpus", "1", "--gpu-type", self.gpu_type, "--gpu-memory-gib", "16",
            "--work-dir", str(self.work_dir), "--heartbeat", "0.3", "--stop-grace", "2",
        ]  # fmt: skip
        with (self.work_dir / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self


def test_a_job_slower_than_declared_moves_to_the_type_that_promises_more(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        for node, gpu_type in (("fast", "sim-fast"), ("slow", "sim-slow")):
            c.workers.append(TypedWorker(c.server.address, node, tmp_path / node, gpu_type).start())
        c.wait_nodes("fast", "slow")
        c.submit(
            {
                "id": "feedback-lm",
                # both run on the same CPU (some steps/s); "sim-fast" promises 1000, "sim-slow" 500
                "training": {
                    "gpus": 1,
                    "throughput": {"sim-fast": 1000.0, "sim-slow": 500.0},
                    "remaining_work": STEPS,
                },
                "runtime": RUNTIME,
            }
        )
        first = c.wait_state("feedback-lm", "RUNNING", timeout=60)
        assert first.placement.gpu_type == "sim-fast"  # as declared, the better one

        # measured for 10 s on sim-fast: far below what sim-slow declares, so it moves there
        def on_slow() -> apb.WorkloadStatus | None:
            status = c.get("feedback-lm")
            return status if status.placement.gpu_type == "sim-slow" else None

        moved = wait_for(on_slow, 120, "the move")
        [fast] = [r for r in moved.observed_throughput if r.gpu_type == "sim-fast"]
        assert fast.measured_s >= 10 and fast.work_per_s < 500
        # and runs there, measured too
        wait_for(
            lambda: any(r.gpu_type == "sim-slow" for r in c.get("feedback-lm").observed_throughput),
            90,
            "a measurement on sim-slow",
        )
        c.stub.CancelWorkload(apb.CancelWorkloadRequest(id="feedback-lm"))
