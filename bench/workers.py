"""Benchmark of the workers: a real server, real worker agents with simulated GPUs, the real runtimes.

    python bench/workers.py [--quick] [--reps N] [--out FILE] [--only train,generate,router,failover]

Everything runs on this machine over loopback, on CPU (``APPORTION_DEVICE=cpu``).
The server is ``python -m server serve --insecure --listen 127.0.0.1:PORT --db
TMP/state.db --solver-processes 1`` (= ``apportion serve``) in a child process, the
workers ``python -m server worker --gpus 1 --gpu-type sim-gpu ...`` (= ``apportion
worker``), one simulated GPU each:

train
    A ``train-lm`` job (``runtime: {builtin: train-lm}``, 1 GPU, ``remaining_work``
    = STEPS) on a fresh server and one worker, alternating with the same runtime
    run directly (``python -m worker.runtimes.train_lm`` with the environment the
    agent would give it: RANK 0, WORLD_SIZE 1, the same APPORTION_* variables),
    with no Apportion process running, REPS times each. *Submit-to-first-step*:
    from ``SubmitWorkload`` returning to the first ``GetWorkload`` (polled every
    50 ms; every 1 s after that, so that the benchmark's own calls take no CPU from
    the run being measured) whose message reports a step ("step N/STEPS loss ..."); the times it
    became PLACED and RUNNING are recorded too. The server writes progress into
    the message at most every ``progress_interval_s`` (2 s, the default of
    ``WorkersConfig``), after the RUNNING write: that is part of what is measured.
    *Samples/s*: both ways, the benchmark polls the checkpoint directory (every
    10 ms) and notes when each ``ckpt-STEP.pt`` appears (``APPORTION_CHECKPOINT_EVERY``
    steps apart); samples/s = (last step - first step) x batch size / (time between
    them): the start-up (interpreter, torch, the first checkpoint) is left out, the
    same way for both. Ratio = median dispatched / median direct (target >= 0.97).
generate
    A ``serve-lm`` service on two workers (advertised as 127.0.0.1 and 127.0.0.2,
    so both replicas can listen on one fixed port, ``APPORTION_SERVE_PORT``, and
    the benchmark knows where each is). CLIENTS threads of this process call
    ``Inference.Generate`` (``max_tokens`` MAX_TOKENS, greedy, one channel per
    thread) back to back; requests/s counts replies in a window after a warm-up.
    Measured: straight to one replica, through the server's router with 1 replica,
    then (a new service) through the router with 2 replicas, and straight to one of
    those two. The clients, the server and the replicas share the machine's cores.
router
    Does the router scale with replicas? Real ``serve-lm`` replicas cannot show it
    here: they compute on the same 2 cores as the router and the clients. So this
    part serves replicas of fixed capacity (``bench/fixed_replica.py``: SLOTS
    requests at a time, each held SERVICE_MS, sleeping — what a GPU-bound replica
    looks like to the router), launched by the agents as a ``command`` runtime,
    one per worker (4 workers). ROUTER_CLIENTS threads call ``Generate`` through
    the router for services of 1, 2 and 4 replicas (and straight to the lone
    replica); also recorded: the server process's CPU seconds per routed request,
    which bounds what one server can route. Target: requests/s with k replicas
    >= 0.9 k x with 1.
failover
    A ``train-lm`` job on two workers, each with its own work directory (no shared
    file system: the job resumes from the checkpoint the server keeps); once the
    server holds a checkpoint of it, the agent running it and its runtime's
    process group are SIGKILLed. Measured from the kill: the node marked
    ``down``, the job placed on the other worker, RUNNING there, and its first
    step there (message polling as above). The server gets ``--heartbeat-interval``
    and ``--heartbeat-timeout``: the full run passes the defaults of ``apportion
    serve`` (heartbeat every 2 s, a worker silent for 10 s is down).

Results go to ``bench/results/workers.json`` (date, command, machine, git commit,
config, results, targets); a Markdown table to stdout, progress to stderr.
``--quick`` is a small smoke run of every part.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "proto"):  # run as a script: `python bench/workers.py`
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402

from apportion.v1 import allocator_pb2 as apb  # noqa: E402
from apportion.v1 import allocator_pb2_grpc, inference_pb2_grpc  # noqa: E402
from apportion.v1 import inference_pb2 as ipb  # noqa: E402
from bench.provenance import run_parts  # noqa: E402
from bench.server_load import _git, _machine, children, cpu_seconds, free_port  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "workers.json"
PARTS = ("train", "generate", "router", "failover")
GPU_TYPE = "sim-gpu"
BATCH_SIZE = 8  # train-lm's default --batch-size (per rank)
SERVER_ARGS = ("--solver-processes", "1")
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    # train
    train_steps: int = 2000
    checkpoint_every: int = 200
    train_reps: int = 5
    progress_interval_s: float = 0.2  # the runtime's APPORTION_PROGRESS_INTERVAL_S
    # generate
    clients: int = 8
    max_tokens: int = 8
    warmup_s: float = 3.0
    measure_s: float = 15.0
    # router (fixed-capacity replicas: bench/fixed_replica.py)
    router_clients: int = 24
    router_replicas: tuple[int, ...] = (1, 2, 4)
    replica_slots: int = 4
    replica_service_ms: float = 40.0
    # failover
    heartbeat_interval_s: float = 2.0  # WorkersConfig defaults = `apportion serve`
    heartbeat_timeout_s: float = 10.0


FULL = Config()
QUICK = replace(
    FULL,
    train_steps=60,
    checkpoint_every=10,
    train_reps=1,
    clients=4,
    max_tokens=4,
    warmup_s=0.3,
    measure_s=1.0,
    router_clients=8,
    router_replicas=(1, 2),
    heartbeat_interval_s=0.3,
    heartbeat_timeout_s=1.5,
)


def log(msg: str) -> None:
    sys.stderr.write(f"workers bench: {msg}\n")
    sys.stderr.flush()


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "proto")]))


def wait_for(check: Callable[[], T | None], timeout: float, what: str, poll: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)


# --------------------------------------------------------------------------- processes


class Proc:
    def __init__(self, args: list[str], log_path: Path, cwd: Path = REPO, extra_env: Mapping[str, str] = {}):
        self.args = args
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as f:
            self.proc = subprocess.Popen(
                args, cwd=cwd, env={**env(), **extra_env}, stdout=f, stderr=subprocess.STDOUT
            )

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_process(tmp: Path, extra: Sequence[str] = ()) -> tuple[Proc, str]:
    address = f"127.0.0.1:{free_port()}"
    args = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--insecure",
        "--listen",
        address,
        "--db",
        str(tmp / "state.db"),
    ]
    proc = Proc([*args, *SERVER_ARGS, *extra], tmp / "server.log")
    stub = allocator_pb2_grpc.AllocatorStub(grpc.insecure_channel(address))

    def up() -> bool:
        try:
            stub.ListNodes(apb.ListNodesRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    wait_for(up, 30, "the server")
    return proc, address


def worker_process(address: str, node_id: str, work_dir: Path, advertise: str = "127.0.0.1") -> Proc:
    args = [
        sys.executable, "-m", "server", "worker", "--server", address, "--node-id", node_id, "--gpus", "1",
        "--gpu-type", GPU_TYPE, "--gpu-memory-gib", "16", "--work-dir", str(work_dir),
        "--advertise", advertise, "--stop-grace", "5",
    ]  # fmt: skip
    return Proc(args, work_dir / "agent.log")


def kill_runtimes(work_dir: Path) -> None:
    """SIGKILL every process group the agent's pid files under ``work_dir`` name."""
    for p in (work_dir / "pids").glob("*/*.pid"):
        with contextlib.suppress(ValueError, OSError, ProcessLookupError):
            os.killpg(int(p.read_text().split()[0]), signal.SIGKILL)


class Cluster:
    """A server (a child process, or given) and workers; everything stopped on close."""

    def __init__(self, tmp: Path, address: str | None = None, server_args: Sequence[str] = ()) -> None:
        self.tmp = tmp
        self.server: Proc | None = None
        if address is None:
            self.server, address = server_process(tmp, server_args)
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = allocator_pb2_grpc.AllocatorStub(self.channel)
        self.workers: dict[str, tuple[Proc, Path]] = {}

    def worker(self, node_id: str, advertise: str = "127.0.0.1") -> None:
        work_dir = self.tmp / node_id
        self.workers[node_id] = (worker_process(self.address, node_id, work_dir, advertise), work_dir)

    def wait_ready(self, *ids: str, timeout: float = 30.0) -> None:
        def check() -> bool:
            nodes = {n.id: n for n in self.stub.ListNodes(apb.ListNodesRequest()).nodes}
            return all(i in nodes and (nodes[i].state or "ready") == "ready" for i in ids)

        wait_for(check, timeout, f"nodes {ids} ready")

    def node_state(self, node_id: str) -> str:
        nodes = {n.id: n for n in self.stub.ListNodes(apb.ListNodesRequest()).nodes}
        return nodes[node_id].state if node_id in nodes else ""

    def submit(self, workload: dict[str, Any]) -> None:
        from server import convert

        msg = convert.workloads_from_data({"workloads": [workload]}).workloads[0]
        self.stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=msg))

    def get(self, workload_id: str) -> apb.WorkloadStatus:
        status: apb.WorkloadStatus = self.stub.GetWorkload(apb.GetWorkloadRequest(id=workload_id))
        return status

    def close(self) -> None:
        for proc, _ in self.workers.values():
            proc.stop()
        for _, work_dir in self.workers.values():
            kill_runtimes(work_dir)
        if self.server is not None:
            self.server.stop()
        self.channel.close()


@contextlib.contextmanager
def cluster(tmp: Path, address: str | None = None, server_args: Sequence[str] = ()) -> Iterator[Cluster]:
    c = Cluster(tmp, address, server_args)
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------- train


def train_env(cfg: Config) -> dict[str, str]:
    return {
        "APPORTION_DEVICE": "cpu",
        "APPORTION_CHECKPOINT_EVERY": str(cfg.checkpoint_every),
        "APPORTION_PROGRESS_INTERVAL_S": str(cfg.progress_interval_s),
    }


def training(workload_id: str, steps: int, runtime_env: Mapping[str, str]) -> dict[str, Any]:
    return {
        "id": workload_id,
        "training": {"gpus": 1, "throughput": {GPU_TYPE: 1.0}, "remaining_work": steps},
        "runtime": {"builtin": "train-lm", "env": dict(runtime_env)},
    }


class CheckpointWatch:
    """Notes when each ``ckpt-STEP.pt`` appears in a directory (polled every 10 ms, in a thread)."""

    NAME = re.compile(r"^ckpt-(\d+)\.pt$")

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with contextlib.suppress(OSError):
                for name in os.listdir(self.directory):
                    if (m := self.NAME.match(name)) and int(m.group(1)) not in self.seen:
                        self.seen[int(m.group(1))] = now
            time.sleep(0.01)

    def close(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        steps = sorted(self.seen)
        if len(steps) < 2:
            return {"samples_per_s": None, "checkpoints_seen": steps}
        first, last = steps[0], steps[-1]
        elapsed = self.seen[last] - self.seen[first]
        return {
            "samples_per_s": round((last - first) * BATCH_SIZE / elapsed, 2),
            "from_step": first,
            "to_step": last,
            "measured_s": round(elapsed, 3),
            "checkpoints_seen": steps,
        }


def train_direct(cfg: Config, tmp: Path) -> dict[str, Any]:
    ckpt = tmp / "checkpoints" / "direct"
    run_env = {
        **env(),
        "PYTHONUNBUFFERED": "1",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "APPORTION_WORKLOAD_ID": "direct",
        "APPORTION_CHECKPOINT_DIR": str(ckpt),
        "APPORTION_TOTAL_STEPS": str(cfg.train_steps),
        **train_env(cfg),
    }
    (tmp / "run").mkdir(parents=True, exist_ok=True)
    watch = CheckpointWatch(ckpt)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.runtimes.train_lm"],
        cwd=tmp / "run",
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first_step_s = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if (
            first_step_s is None
            and line.startswith("APPORTION_PROGRESS ")
            and json.loads(line.split(" ", 1)[1])["step"]
        ):
            first_step_s = round(time.monotonic() - start, 3)
    rc = proc.wait()
    wall = time.monotonic() - start
    return {
        "exit": rc,
        "wall_s": round(wall, 2),
        "spawn_to_first_step_s": first_step_s,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        **watch.close(),
    }


def train_dispatched(cfg: Config, tmp: Path) -> dict[str, Any]:
    with cluster(tmp) as c:
        c.worker("w1")
        c.wait_ready("w1")
        watch = CheckpointWatch(tmp / "w1" / "checkpoints" / "job")
        c.submit(training("job", cfg.train_steps, train_env(cfg)))
        t0 = time.monotonic()
        marks: dict[str, float] = {}
        message = ""
        while True:
            status = c.get("job")
            now = round(time.monotonic() - t0, 3)
            if status.state in ("PLACED", "RUNNING") and "placed_s" not in marks:
                marks["placed_s"] = now
            if status.state == "RUNNING" and "running_s" not in marks:
                marks["running_s"] = now
            if status.message.startswith("step ") and "first_step_s" not in marks:
                marks["first_step_s"] = now
                message = status.message
            if status.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
                marks["ended_s"] = now
                break
            if now > 300:
                raise TimeoutError(f"job: {status}")
            # 50 ms polls until the first step (the latency measured); then once a second, so the
            # benchmark's own GetWorkload calls do not take CPU from the run whose samples/s is measured
            # (the direct run has no poller)
            time.sleep(1.0 if "first_step_s" in marks else 0.05)
        return {
            "state": status.state,
            "final_message": status.message,
            "first_step_message": message,
            "load_average_1m_after": round(os.getloadavg()[0], 2),
            **{f"submit_to_{k}": v for k, v in marks.items()},
            **watch.close(),
        }


def part_train(cfg: Config) -> dict[str, Any]:
    direct: list[dict[str, Any]] = []
    dispatched: list[dict[str, Any]] = []
    for rep in range(cfg.train_reps):
        order = ("direct", "dispatched") if rep % 2 == 0 else ("dispatched", "direct")
        for way in order:
            with tempfile.TemporaryDirectory(prefix="apportion-bench-") as d:
                if way == "direct":
                    direct.append(train_direct(cfg, Path(d)))
                else:
                    dispatched.append(train_dispatched(cfg, Path(d)))
            last = (direct if way == "direct" else dispatched)[-1]
            log(f"train rep {rep} {way}: {last['samples_per_s']} samples/s")
    med_direct = statistics.median(r["samples_per_s"] for r in direct)
    med_disp = statistics.median(r["samples_per_s"] for r in dispatched)
    first = [r["submit_to_first_step_s"] for r in dispatched]
    return {
        "steps": cfg.train_steps,
        "batch_size": BATCH_SIZE,
        "latency_measured_by": "GetWorkload polled every 50 ms (every 1 s after the first step): "
        "first 'step N/...' message after submit",
        "server_progress_interval_s": 2.0,
        "median_submit_to_first_step_s": statistics.median(first),
        "median_submit_to_running_s": statistics.median(r["submit_to_running_s"] for r in dispatched),
        "median_direct_spawn_to_first_step_s": statistics.median(r["spawn_to_first_step_s"] for r in direct),
        "median_direct_samples_per_s": med_direct,
        "median_dispatched_samples_per_s": med_disp,
        "ratio": round(med_disp / med_direct, 4),
        "direct": direct,
        "dispatched": dispatched,
    }


# --------------------------------------------------------------------------- generate


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children that still run."""
    return sum(cpu_seconds(p) or 0.0 for p in [pid, *children(pid)])


def load(
    target: str, service: str, cfg: Config, clients: int | None = None, server_pid: int | None = None
) -> dict[str, Any]:
    """CLIENTS threads calling Generate back to back; replies in the measuring window.
    With ``server_pid``: that process's CPU seconds in the window, per reply."""
    clients = clients or cfg.clients
    stop = threading.Event()
    start = time.monotonic()
    window = (start + cfg.warmup_s, start + cfg.warmup_s + cfg.measure_s)
    done: list[list[float]] = [[] for _ in range(clients)]
    errors: dict[str, int] = {}
    replicas: dict[str, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            n = 0
            while not stop.is_set():
                n += 1
                req = ipb.GenerateRequest(
                    service=service, prompt=f"Once upon a time {i}.{n}", max_tokens=cfg.max_tokens
                )
                t = time.monotonic()
                try:
                    reply = stub.Generate(req, timeout=30)
                except grpc.RpcError as exc:
                    with lock:
                        key = str(exc.code())
                        errors[key] = errors.get(key, 0) + 1
                    continue
                end = time.monotonic()
                if window[0] <= end <= window[1]:
                    done[i].append(end - t)
                    with lock:
                        replicas[reply.replica] = replicas.get(reply.replica, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, window[0] - time.monotonic()))
    cpu0 = tree_cpu_seconds(server_pid) if server_pid else 0.0
    time.sleep(max(0.0, window[1] - time.monotonic()))
    cpu1 = tree_cpu_seconds(server_pid) if server_pid else 0.0
    stop.set()
    for t in threads:
        t.join()
    lat = sorted(x for d in done for x in d)
    extra: dict[str, Any] = {}
    if server_pid:
        extra["server_cpu_s"] = round(cpu1 - cpu0, 2)
        extra["server_cpu_ms_per_request"] = round(1000 * (cpu1 - cpu0) / len(lat), 3) if lat else None
    return {
        "clients": clients,
        **extra,
        "target": target,
        "requests_in_window": len(lat),
        "per_s": round(len(lat) / cfg.measure_s, 1),
        "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "errors": errors,
        "replicas": replicas,
    }


def service(workload_id: str, replicas: int, port: int) -> dict[str, Any]:
    return {
        "id": workload_id,
        "inference": {
            "gpus_per_replica": {GPU_TYPE: 1},
            "replica_rps": {GPU_TYPE: 10},
            "target_rps": 10 * replicas,
        },
        "runtime": {
            "builtin": "serve-lm",
            "env": {"APPORTION_DEVICE": "cpu", "APPORTION_SERVE_PORT": str(port)},
        },
    }


def wait_replicas(c: Cluster, workload_id: str, n: int, cfg: Config) -> None:
    stub = inference_pb2_grpc.InferenceStub(c.channel)
    seen: set[str] = set()

    def check() -> bool:
        with contextlib.suppress(grpc.RpcError):
            req = ipb.GenerateRequest(service=workload_id, prompt="warm", max_tokens=cfg.max_tokens)
            seen.add(stub.Generate(req, timeout=10).replica)
        return len(seen) >= n

    wait_for(check, 120, f"{n} replicas of {workload_id}", poll=0.1)


def part_generate(cfg: Config) -> dict[str, Any]:
    hosts = {"w1": "127.0.0.1", "w2": "127.0.0.2"}
    out: dict[str, Any] = {"clients": cfg.clients, "max_tokens": cfg.max_tokens, "measure_s": cfg.measure_s}
    with tempfile.TemporaryDirectory(prefix="apportion-bench-") as d, cluster(Path(d)) as c:
        for node, host in hosts.items():
            c.worker(node, host)
        c.wait_ready(*hosts)
        port = free_port()
        c.submit(service("lm1", 1, port))
        wait_replicas(c, "lm1", 1, cfg)
        node = c.get("lm1").placement.shards[0].node_id
        out["direct_1"] = load(f"{hosts[node]}:{port}", "lm1", cfg)
        out["router_1"] = load(c.address, "lm1", cfg)
        log(f"generate 1 replica: direct {out['direct_1']['per_s']}/s, router {out['router_1']['per_s']}/s")
        c.stub.CancelWorkload(apb.CancelWorkloadRequest(id="lm1"))
        port = free_port()
        c.submit(service("lm2", 2, port))
        wait_replicas(c, "lm2", 2, cfg)
        out["router_2"] = load(c.address, "lm2", cfg)
        out["direct_2_one_replica"] = load(f"{hosts['w1']}:{port}", "lm2", cfg)
        log(f"generate 2 replicas: router {out['router_2']['per_s']}/s")
    out["router_overhead_1"] = round(1 - out["router_1"]["per_s"] / out["direct_1"]["per_s"], 4)
    out["router_scaling_2_over_1"] = round(out["router_2"]["per_s"] / out["router_1"]["per_s"], 3)
    return out


# --------------------------------------------------------------------------- router


def fixed_service(workload_id: str, replicas: int, port: int, cfg: Config) -> dict[str, Any]:
    capacity = cfg.replica_slots / (cfg.replica_service_ms / 1000)
    script = str(REPO / "bench" / "fixed_replica.py")
    return {
        "id": workload_id,
        "inference": {
            "gpus_per_replica": {GPU_TYPE: 1},
            "replica_rps": {GPU_TYPE: capacity},
            "target_rps": capacity * replicas,
            "min_replicas": replicas,
            "max_replicas": replicas,
        },
        "runtime": {
            "command": [sys.executable, script],
            "args": ["--slots", str(cfg.replica_slots), "--service-ms", str(cfg.replica_service_ms)],
            "env": {"APPORTION_SERVE_PORT": str(port)},
        },
    }


def part_router(cfg: Config) -> dict[str, Any]:
    """The router with 1, 2, 4... replicas of fixed capacity (bench/fixed_replica.py): does it scale?"""
    most = max(cfg.router_replicas)
    hosts = {f"w{i + 1}": f"127.0.0.{i + 1}" for i in range(most)}
    capacity = cfg.replica_slots / (cfg.replica_service_ms / 1000)
    out: dict[str, Any] = {
        "clients": cfg.router_clients,
        "replica": f"bench/fixed_replica.py --slots {cfg.replica_slots} "
        f"--service-ms {cfg.replica_service_ms:g}",
        "replica_capacity_per_s": capacity,
        "measure_s": cfg.measure_s,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="apportion-bench-") as d, cluster(Path(d)) as c:
        assert c.server is not None
        for node, host in hosts.items():
            c.worker(node, host)
        c.wait_ready(*hosts)
        for k in cfg.router_replicas:
            name = f"fixed{k}"
            port = free_port()
            c.submit(fixed_service(name, k, port, cfg))
            wait_replicas(c, name, k, cfg)
            run = load(c.address, name, cfg, cfg.router_clients, c.server.proc.pid)
            if k == 1:
                node = c.get(name).placement.shards[0].node_id
                out["direct_1"] = load(f"{hosts[node]}:{port}", name, cfg, cfg.router_clients)
                log(f"router: 1 replica direct {out['direct_1']['per_s']}/s")
            out["runs"][str(k)] = run
            cpu = run["server_cpu_ms_per_request"]
            log(f"router: {k} replicas {run['per_s']}/s, server {cpu} ms CPU/request")
            c.stub.CancelWorkload(apb.CancelWorkloadRequest(id=name))  # its GPUs go to the next service
    one = out["runs"]["1"]["per_s"]
    out["scaling"] = {k: round(r["per_s"] / one, 3) if one else None for k, r in out["runs"].items()}
    return out


# --------------------------------------------------------------------------- failover


def part_failover(cfg: Config) -> dict[str, Any]:
    server_args = [
        "--heartbeat-interval", str(cfg.heartbeat_interval_s),
        "--heartbeat-timeout", str(cfg.heartbeat_timeout_s),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="apportion-bench-") as d:
        tmp = Path(d)
        stored = tmp / "state.db.checkpoints" / "job"  # the server's copy (server/checkpoints.py)
        with cluster(tmp, server_args=server_args) as c:
            c.worker("w1")
            c.worker("w2")
            c.wait_ready("w1", "w2")
            c.submit(training("job", 1_000_000, train_env(cfg)))
            wait_for(lambda: c.get("job").message.startswith("step "), 120, "the job's first steps")
            wait_for(lambda: stored.is_dir() and any(stored.iterdir()), 120, "a checkpoint on the server")
            victim = c.get("job").placement.shards[0].node_id
            proc, work_dir = c.workers[victim]
            proc.proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            kill_runtimes(work_dir)
            proc.proc.wait()
            marks: dict[str, float] = {}
            moved_message = before = c.get("job").message  # the last progress the dead worker sent
            while "first_step_s" not in marks:
                now = round(time.monotonic() - t0, 3)
                if "node_down_s" not in marks and c.node_state(victim) == "down":
                    marks["node_down_s"] = now
                s = c.get("job")
                shards = s.placement.shards
                elsewhere = bool(shards) and shards[0].node_id != victim
                if elsewhere and "placed_elsewhere_s" not in marks:
                    marks["placed_elsewhere_s"] = now
                if elsewhere and s.state == "RUNNING" and "running_again_s" not in marks:
                    marks["running_again_s"] = now
                if "running_again_s" not in marks:
                    before = s.message  # the RUNNING write may repeat the old progress
                elif s.message.startswith("step ") and s.message != before:
                    marks["first_step_s"] = now  # progress from the new worker
                    moved_message = s.message
                if now > 180:
                    raise TimeoutError(f"job after the kill: {s}")
                time.sleep(0.05)
            log_text = c.workers["w2" if victim == "w1" else "w1"][1] / "logs" / "job" / "shard-0.log"
            resumed = re.search(r"resumed from \S+ at step (\d+)", log_text.read_text(errors="replace"))
            c.stub.CancelWorkload(apb.CancelWorkloadRequest(id="job"))
            return {
                "server": "apportion serve " + " ".join(server_args),
                "work_dirs": "one per worker (no shared file system): the job resumes from the "
                "checkpoint the server keeps",
                "heartbeat_interval_s": cfg.heartbeat_interval_s,
                "heartbeat_timeout_s": cfg.heartbeat_timeout_s,
                "killed": f"SIGKILL of the agent of {victim} and its runtime's process group",
                **{f"kill_to_{k}": v for k, v in marks.items()},
                "message_after": moved_message,
                "resumed_at_step": int(resumed.group(1)) if resumed else None,
            }


# --------------------------------------------------------------------------- report


def targets(results: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "train" in results:
        r = results["train"]["ratio"]
        out["dispatched_over_direct_samples_per_s"] = {"target": ">= 0.97", "value": r, "met": r >= 0.97}
    if "router" in results:
        sc = results["router"]["scaling"]
        ok = all(v is not None and v >= 0.9 * int(k) for k, v in sc.items())
        out["router_scaling_fixed_replicas"] = {
            "target": ">= 0.9 x replicas (requests/s with k replicas / with 1)",
            "value": sc,
            "met": ok,
        }
    return out


def markdown(doc: Mapping[str, Any]) -> str:
    r = doc["results"]
    lines = ["| measure | value | target | met |", "| --- | ---: | ---: | --- |"]
    t = doc["targets"]

    def met(key: str) -> str:
        return "yes" if t[key]["met"] else "**no**"

    if "train" in r:
        x = r["train"]
        n = len(x["dispatched"])
        lines += [
            f"| `train-lm` submit → first step reported (median of {n}) "
            f"| {x['median_submit_to_first_step_s']:.2f} s "
            f"(RUNNING at {x['median_submit_to_running_s']:.2f} s; run directly: first step "
            f"{x['median_direct_spawn_to_first_step_s']:.2f} s after spawn) | — | — |",
            f"| `train-lm` samples/s, dispatched / direct (medians of {n}) "
            f"| {x['median_dispatched_samples_per_s']:.1f}"
            f" / {x['median_direct_samples_per_s']:.1f} = {x['ratio']:.3f} | ≥ 0.97 | "
            f"{met('dispatched_over_direct_samples_per_s')} |",
        ]
    if "generate" in r:
        g = r["generate"]
        lines += [
            f"| `Generate` req/s, {g['clients']} clients, 1 replica: direct / router "
            f"| {g['direct_1']['per_s']:.1f} / "
            f"{g['router_1']['per_s']:.1f} (p50 {g['direct_1']['p50_ms']} / {g['router_1']['p50_ms']} ms) "
            "| — | — |",
            f"| `Generate` req/s through the router, 2 replicas (one of them direct) "
            f"| {g['router_2']['per_s']:.1f} "
            f"({g['direct_2_one_replica']['per_s']:.1f}); × {g['router_scaling_2_over_1']:.2f} vs 1 replica "
            "(the replicas share the same cores) | — | — |",
        ]
    if "router" in r:
        x = r["router"]
        runs = ", ".join(
            f"{k}: {v['per_s']:.0f}/s (× {x['scaling'][k]:.2f}, p50 {v['p50_ms']} ms)"
            for k, v in x["runs"].items()
        )
        cpu = ", ".join(f"{v['server_cpu_ms_per_request']}" for v in x["runs"].values())
        lines += [
            "| `Generate` through the router, replicas of fixed capacity "
            f"{x['replica_capacity_per_s']:.0f}/s "
            f"({x['clients']} clients; straight to one: {x['direct_1']['per_s']:.0f}/s) | {runs} "
            f"| × ≥ 0.9 k | {met('router_scaling_fixed_replicas')} |",
            f"| server CPU per routed request (1, 2, 4 replicas) | {cpu} ms | — | — |",
        ]
    if "failover" in r:
        f = r["failover"]
        lines.append(
            f"| Worker SIGKILLed → job RUNNING on the other worker "
            f"(heartbeat timeout {f['heartbeat_timeout_s']:g} s) "
            f"| down {f.get('kill_to_node_down_s', 0):.1f} s, RUNNING {f['kill_to_running_again_s']:.1f} s, "
            f"first step {f['kill_to_first_step_s']:.1f} s (resumed at step {f['resumed_at_step']}) | — | — |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small smoke run of every part")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run ({', '.join(PARTS)})")
    parser.add_argument("--reps", type=int, help="train part: runs each way (default 5; --quick 1)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts: {', '.join(unknown)}")
    cfg = QUICK if args.quick else FULL
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps must be ≥ 1")
        cfg = replace(cfg, train_reps=args.reps)
    doc: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/workers.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": _machine(),
        "git": _git(),
        "config": {**asdict(cfg), "quick": args.quick, "server_args": list(SERVER_ARGS)},
        "results": {},
    }
    runners = {
        "train": part_train,
        "generate": part_generate,
        "router": part_router,
        "failover": part_failover,
    }
    run_parts(doc, parts, runners, cfg, targets, args.out)
    sys.stdout.write(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
