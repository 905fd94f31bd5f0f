"""A real server (in this process, short heartbeat timeout and back-offs) and real
``python -m server worker`` agent processes with simulated GPUs, for the end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import allocator_pb2_grpc
from apportion.v1 import types_pb2 as pb
from server.workers import WorkersConfig
from tests.server.serving import ROOT, Running, running_server

GPU_TYPE = "sim-gpu"
FAST_WORKERS = WorkersConfig(
    heartbeat_interval_s=0.3,
    heartbeat_timeout_s=2.0,
    max_restarts=2,
    restart_backoff_s=0.2,
    stop_grace_s=2.0,
    progress_interval_s=0.2,
    tick_s=0.1,
)

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class WorkerProcess:
    """``python -m server worker`` with N simulated GPUs, its log in ``work_dir/agent.log``."""

    def __init__(self, address: str, node_id: str, work_dir: Path, gpus: int = 1) -> None:
        self.address = address
        self.node_id = node_id
        self.work_dir = work_dir
        self.gpus = gpus
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]))
        args = [
            sys.executable, "-m", "server", "worker", "--server", self.address, "--node-id", self.node_id,
            "--gpus", str(self.gpus), "--gpu-type", GPU_TYPE, "--gpu-memory-gib", "16",
            "--work-dir", str(self.work_dir), "--heartbeat", "0.3", "--stop-grace", "2",
        ]  # fmt: skip
        with (self.work_dir / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return (self.work_dir / "agent.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def pids_of(work_dir: Path) -> list[int]:
    """The pids the agent's pid files under ``work_dir`` name."""
    return [int(p.read_text().split()[0]) for p in (work_dir / "pids").glob("*/*.pid")]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Cluster:
    def __init__(self, server: Running, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.stub: allocator_pb2_grpc.AllocatorStub = server.stub()
        self.workers: list[WorkerProcess] = []

    def worker(self, node_id: str, gpus: int = 1) -> WorkerProcess:
        w = WorkerProcess(self.server.address, node_id, self.tmp_path / node_id, gpus).start()
        self.workers.append(w)
        return w

    def nodes(self) -> dict[str, pb.Node]:
        return {n.id: n for n in self.stub.ListNodes(apb.ListNodesRequest()).nodes}

    def wait_nodes(self, *ids: str, state: str = "ready", timeout: float = 15.0) -> dict[str, pb.Node]:
        def check() -> dict[str, pb.Node] | None:
            nodes = self.nodes()
            ok = all(i in nodes and (nodes[i].state or "ready") == state for i in ids)
            return nodes if ok else None

        return wait_for(check, timeout, f"nodes {ids} {state}")

    def submit(self, workload: dict[str, Any]) -> None:
        from server import convert

        msg = convert.workloads_from_data({"workloads": [workload]}).workloads[0]
        self.stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=msg))

    def get(self, workload_id: str) -> apb.WorkloadStatus:
        return self.stub.GetWorkload(apb.GetWorkloadRequest(id=workload_id))

    def wait_state(self, workload_id: str, *states: str, timeout: float = 15.0) -> apb.WorkloadStatus:
        def check() -> apb.WorkloadStatus | None:
            status = self.get(workload_id)
            return status if status.state in states else None

        try:
            return wait_for(check, timeout, f"{workload_id} in {states}")
        except AssertionError:
            logs = "\n".join(f"--- {w.node_id}\n{w.log()[-3000:]}" for w in self.workers)
            raise AssertionError(f"{workload_id}: {self.get(workload_id)}\n{logs}") from None


@contextlib.contextmanager
def cluster(tmp_path: Path, **overrides: Any) -> Iterator[Cluster]:
    from dataclasses import replace

    config = replace(FAST_WORKERS, **overrides)
    with running_server(tmp_path, workers=config) as server:
        c = Cluster(server, tmp_path)
        try:
            yield c
        finally:
            for w in c.workers:
                w.stop()
            for w in c.workers:  # nothing a test started may outlive it
                for pid in pids_of(w.work_dir):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)


def training(workload_id: str, command: list[str], *, gpus: int = 1, steps: int = 10) -> dict[str, Any]:
    return {
        "id": workload_id,
        "training": {"gpus": gpus, "throughput": {GPU_TYPE: 1.0}, "remaining_work": steps},
        "runtime": {"command": command},
    }
