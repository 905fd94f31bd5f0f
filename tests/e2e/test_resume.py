"""End to end: a real ``train-lm`` job whose worker is killed with SIGKILL mid-training is
re-planned on the other worker (they share one work directory, so the checkpoints too),
resumes from its latest checkpoint and succeeds — CPU only. (Separate work directories,
with the checkpoints going through the server: ``test_checkpoints.py``.)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

from tests.e2e.cluster import GPU_TYPE, Cluster, WorkerProcess, alive, cluster, wait_for

STEPS = 200
EVERY = 10


def shared_worker(c: Cluster, node_id: str, work_dir: Path) -> WorkerProcess:
    w = WorkerProcess(c.server.address, node_id, work_dir).start()
    c.workers.append(w)
    return w


def test_a_killed_workers_training_job_resumes_from_its_checkpoint_on_the_other(tmp_path: Path) -> None:
    work = tmp_path / "work"
    with cluster(tmp_path) as c:
        workers = {n: shared_worker(c, n, work) for n in ("w1", "w2")}
        c.wait_nodes("w1", "w2")
        env = {
            "APPORTION_DEVICE": "cpu",
            "APPORTION_CHECKPOINT_EVERY": str(EVERY),
            "APPORTION_PROGRESS_INTERVAL_S": "0.5",
        }
        c.submit(
            {
                "id": "job",
                "training": {"gpus": 1, "throughput": {GPU_TYPE: 1.0}, "remaining_work": STEPS},
                "runtime": {
                    "builtin": "train-lm",
                    "env": env,
                    "args": ["--d-model", "32", "--layers", "1", "--seq-len", "32", "--batch-size", "4"],
                },
            }
        )
        first = c.wait_state("job", "RUNNING", timeout=30).placement.shards[0].node_id
        other = "w2" if first == "w1" else "w1"
        checkpoints = work / "checkpoints" / "job"
        wait_for(lambda: list(checkpoints.glob("ckpt-*.pt")), 30, "a checkpoint")
        assert c.get("job").state == "RUNNING", c.get("job").message

        # SIGKILL the worker, then its runtime (its own session, so it outlived the worker)
        pid_files = list((work / "pids" / first).glob("*.pid"))
        pids = [int(p.read_text().split()[0]) for p in pid_files]
        assert pids
        workers[first].kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in pids), 10, "the runtime to die")
        saved = max(int(p.stem.split("-")[1]) for p in checkpoints.glob("ckpt-*.pt"))
        assert 0 < saved < STEPS

        c.wait_nodes(first, state="down", timeout=15)
        wait_for(
            lambda: (s := c.get("job")).placement.shards and s.placement.shards[0].node_id == other,
            20,
            "the job to be re-planned on the other worker",
        )
        done = c.wait_state("job", "SUCCEEDED", timeout=60)
        assert f"step {STEPS}/{STEPS}" in done.message

        log = (work / "logs" / "job" / "shard-0.log").read_text()  # both runs, appended
        resumed = re.findall(r"resumed from \S+ckpt-(\d+)\.pt at step (\d+)", log)
        assert resumed, log[-3000:]
        step = int(resumed[-1][1])
        assert step >= saved > 0
        assert re.search(rf"job: steps {step} to {STEPS} on 1 rank", log), log[-3000:]
        # the shared directory is at least as new as the server's copy: nothing came down
        assert "uploaded" in workers[first].log() and "downloaded" not in workers[other].log()
