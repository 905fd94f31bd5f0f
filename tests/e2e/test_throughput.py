"""End to end: the throughput a real ``train-lm`` job achieves is measured by the
server from its workers' reports and shown in ``GetWorkload`` (work units — steps —
per second of the whole gang, samples/s, the work done), while it runs and after
it has ended — CPU only."""

from __future__ import annotations

from pathlib import Path

from apportion.v1 import allocator_pb2 as apb
from tests.e2e.cluster import GPU_TYPE, cluster, wait_for

STEPS = 100_000  # more than it will do: cancelled once measured (an id of its own: its MASTER_PORT)
BATCH = 4


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
                "runtime": {
                    "builtin": "train-lm",
                    "env": {"APPORTION_DEVICE": "cpu", "APPORTION_PROGRESS_INTERVAL_S": "0.3"},
                    "args": [
                        "--d-model",
                        "32",
                        "--layers",
                        "1",
                        "--seq-len",
                        "32",
                        "--batch-size",
                        f"{BATCH}",
                    ],
                },
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
        later = wait_for(
            lambda: (s := c.get("measured-lm")).observed_throughput[0].measured_s > rate.measured_s + 1 and s,
            90,
            "more measurement",
        )
        assert later.work_done > status.work_done and later.observed_throughput[0].work_per_s > 0
        listed = {w.workload.id: w for w in c.stub.ListWorkloads(apb.ListWorkloadsRequest()).workloads}
        assert listed["measured-lm"].observed_throughput[0].gpu_type == GPU_TYPE
        # kept after the job ends
        c.stub.CancelWorkload(apb.CancelWorkloadRequest(id="measured-lm"))
        cancelled = c.wait_state("measured-lm", "CANCELLED", timeout=30)
        assert cancelled.work_done >= later.work_done and cancelled.observed_throughput
