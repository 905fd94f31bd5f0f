"""End to end: GPUs handed from a stopping shard to a new one on the same worker.

When a workload is cancelled and another is placed on its GPUs in the same plan,
the server sends the Stop and the Launch together; the old shard holds the GPUs
until its process has exited (its SIGTERM grace). The agent must wait for them,
not fail the new shard ("needs 1 free GPUs")."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from apportion.v1 import allocator_pb2 as apb
from tests.e2e.cluster import cluster, training

# Runs until SIGTERM, then takes 1.5 s to exit (a checkpoint being written, say).
SLOW_TO_STOP = textwrap.dedent(
    """\
    import signal, sys, time
    def on_term(*_):
        time.sleep(1.5)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("running", flush=True)
    while True:
        time.sleep(0.1)
    """
)


def test_a_launch_waits_for_gpus_a_stopping_shard_still_holds(tmp_path: Path) -> None:
    with cluster(tmp_path, max_restarts=0) as c:  # no restart may hide a failed launch
        c.worker("w1", gpus=1)
        c.wait_nodes("w1")
        c.submit(training("old", [sys.executable, "-c", SLOW_TO_STOP]))
        c.wait_state("old", "RUNNING", timeout=30)
        c.submit(training("new", [sys.executable, "-c", "print('done')"]))  # waits: no free GPU
        assert c.get("new").state == "PENDING"
        c.stub.CancelWorkload(apb.CancelWorkloadRequest(id="old"))  # one round: old out, new in
        status = c.wait_state("new", "SUCCEEDED", "FAILED", timeout=60)
        assert status.state == "SUCCEEDED", status.message
        assert "free GPUs" not in c.workers[0].log()
