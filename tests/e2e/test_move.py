"""End to end, workers with SEPARATE work directories, CPU only: a running ``train-lm``
job that the plan moves (its node drained) stops on the old node first — which writes
a checkpoint at the step it reached on SIGTERM and uploads it — and only then starts
on the new node, from that checkpoint (break before make): no progress lost, and the
two copies never run at once."""

from __future__ import annotations

import re
import threading
from datetime import datetime
from pathlib import Path

from apportion.v1 import allocator_pb2 as apb
from tests.e2e.cluster import alive, cluster, pids_of, wait_for
from tests.e2e.test_checkpoints import stored_step, train

STEPS = 300
EVERY = 10  # test_checkpoints' interval; the SIGTERM checkpoint is usually between two of them
AGENT_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?: (.*)$", re.M)


def agent_times(log: str, message: str) -> list[datetime]:
    """When the agent logged lines starting with ``message`` (its log's timestamps)."""
    return [
        datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f")
        for t, text in AGENT_TIME.findall(log)
        if text.startswith(message)
    ]


class Overlap:
    """Samples, every 10 ms, which workers have a live runtime process (from their pid files)."""

    def __init__(self, *work_dirs: Path) -> None:
        self.work_dirs = work_dirs
        self.both = 0  # samples with live processes under two work directories at once
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            running = [d for d in self.work_dirs if any(alive(p) for p in pids_of(d))]
            self.samples += 1
            self.both += len(running) > 1

    def __enter__(self) -> Overlap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_drained_nodes_training_job_moves_without_losing_progress_or_overlapping(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        workers = {n: c.worker(n) for n in ("w1", "w2")}
        c.wait_nodes("w1", "w2")
        c.submit(train("job", STEPS))
        first = c.wait_state("job", "RUNNING", timeout=60).placement.shards[0].node_id
        other = "w2" if first == "w1" else "w1"
        a, b = workers[first], workers[other]
        wait_for(lambda: stored_step(c, "job") >= EVERY, 90, "a periodic checkpoint on the server")
        with Overlap(a.work_dir, b.work_dir) as overlap:
            assert c.get("job").state == "RUNNING", c.get("job").message
            c.stub.DrainNode(apb.DrainNodeRequest(id=first))
            wait_for(
                lambda: (s := c.get("job")).placement.shards and s.placement.shards[0].node_id == other,
                30,
                "the job to be re-planned off the drained node",
            )
            done = c.wait_state("job", "SUCCEEDED", "FAILED", timeout=180)
        assert done.state == "SUCCEEDED", done.message
        assert f"step {STEPS}/{STEPS}" in done.message

        old = (a.work_dir / "logs" / "job" / "shard-0.log").read_text()
        stopped = re.findall(r"rank 0 stopped at step (\d+)", old)  # SIGTERM: checkpointed, then exited
        assert len(stopped) == 1, old[-3000:]
        stop_step = int(stopped[0])
        assert 0 < stop_step < STEPS

        new = (b.work_dir / "logs" / "job" / "shard-0.log").read_text()
        resumed = re.findall(r"resumed from (\S+)ckpt-(\d+)\.pt at step (\d+)", new)
        assert len(resumed) == 1, new[-3000:]  # one start on the new node, never one from an older checkpoint
        where, step = resumed[0][0], int(resumed[0][2])
        assert where.startswith(str(b.work_dir)) and step == stop_step, (resumed, stop_step)
        assert re.search(rf"job: steps {step} to {STEPS} on 1 rank", new), new[-3000:]
        assert f"checkpoint of job step {stop_step} downloaded" in b.log()

        # never two copies at once: the old shard ended before the new node fetched its checkpoint
        # (before it started its process), and no sample saw runtimes on both workers
        ended = agent_times(a.log(), "shard ended")
        fetched = agent_times(b.log(), f"checkpoint of job step {stop_step} downloaded")
        launched = agent_times(b.log(), "launched")
        assert len(ended) == 1 and len(fetched) == 1 and len(launched) == 1, (ended, fetched, launched)
        assert ended[0] <= fetched[0] <= launched[0]
        assert overlap.samples > 100 and overlap.both == 0, (overlap.samples, overlap.both)
        assert stored_step(c, "job") == STEPS
