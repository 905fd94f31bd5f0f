"""Load benchmark of ``apportion serve``: a real server in a child process, real clients.

    python bench/server_load.py [--quick] [--out FILE] [--only submit,plan,memory]

Every part starts ``python -m server serve --insecure --listen 127.0.0.1:PORT
--db TMP/state.db`` (plus the part's flags, recorded in the results) and talks
to it over loopback gRPC, as any client would:

submit
    The inventory of ``bench.instances.problem(W, N, seed)`` (real machine
    shapes, GPU types and tenants) is upserted first, so the control loop
    plans in the background exactly as in production (default loop settings:
    ``--plan-time-limit 5 --debounce 0.2``, 2 solver processes). Then 16
    concurrent clients (4 client *processes* x 4 threads each, one channel per
    thread, because of the GIL) call ``SubmitWorkload`` back to back for a
    fixed time; every request is a distinct workload of that instance (Philly
    jobs with Gavel throughputs, LLM services from TensorRT-LLM/Azure numbers;
    reused with an id suffix if the pool runs out). Throughput counts the
    replies in the measuring window (after a warm-up); latency is the
    client-observed time of each call (p50/p90/p99). Target: >= 1,000/s with
    p99 <= 50 ms.
plan
    ``Plan`` (stateless) of the 1k instance of ``bench/plan_scale.py``
    (``problem(1000, 1000, seed=0)``, time limit 2 s) on an idle server, one
    call at a time, several repetitions. Overhead = (client-observed wall time
    - the ``solve_time_s`` the response reports) / wall time; median over the
    repetitions. Target: <= 10 %. An in-process breakdown of the server's
    Python work (request -> problem, pickling to the solver process and back,
    plan -> message, serialization) is recorded beside it.
memory
    A fresh server holding 100,000 workloads, submitted in bulk through the
    API by the same 16 clients, on a deliberately small inventory (8 nodes of
    ``instances.inventory``) with ``--plan-time-limit 1 --solver-processes 1``:
    the control loop still plans every state (every ``max_delay_s`` = 2 s
    during the stream), but each solve is cut short and one solver process
    leaves a core to the server, so the load is not dominated by planning a
    cluster. After the last submit the benchmark waits for the plan that
    covers all of them, then reads the server's peak RSS (``VmHWM`` of
    ``/proc/PID/status``; the solver processes are separate and listed
    apart) and the size of the database files (db + WAL).

Results go to ``bench/results/server_load.json`` (date, command, machine, git
commit, config, results, targets); a Markdown table to stdout, progress to
stderr. ``--quick`` is a tiny smoke run of every part (a few seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "proto"):  # run as a script: `python bench/server_load.py`
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402

from apportion.v1 import allocator_pb2 as apb  # noqa: E402
from apportion.v1 import allocator_pb2_grpc  # noqa: E402
from apportion.v1 import types_pb2 as pb  # noqa: E402
from bench import provenance  # noqa: E402
from server import convert  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "server_load.json"
PARTS = ("submit", "plan", "memory")
TARGETS = {"submit_per_s": 1000.0, "submit_p99_ms": 50.0, "plan_overhead_fraction": 0.10}


@dataclass(frozen=True)
class Config:
    client_processes: int = 4
    threads_per_process: int = 4
    seed: int = 0
    # submit
    submit_nodes: int = 500
    submit_pool: int = 30_000
    submit_warmup_s: float = 3.0
    submit_measure_s: float = 15.0
    submit_server_args: tuple[str, ...] = ()  # the defaults of `apportion serve`
    # plan
    plan_workloads: int = 1000
    plan_nodes: int = 1000
    plan_time_limit_s: float = 2.0
    plan_repetitions: int = 5
    # memory
    memory_workloads: int = 100_000
    memory_nodes: int = 8
    memory_server_args: tuple[str, ...] = ("--plan-time-limit", "1", "--solver-processes", "1")
    memory_settle_timeout_s: float = 600.0


FULL = Config()
QUICK = replace(
    FULL,
    client_processes=2,
    threads_per_process=2,
    submit_nodes=24,
    submit_pool=3000,
    submit_warmup_s=0.3,
    submit_measure_s=1.0,
    submit_server_args=("--solver-processes", "1", "--plan-time-limit", "0.5"),
    plan_workloads=60,
    plan_nodes=24,
    plan_time_limit_s=0.3,
    plan_repetitions=2,
    memory_workloads=400,
    memory_nodes=4,
    memory_server_args=("--plan-time-limit", "0.5", "--solver-processes", "1"),
    memory_settle_timeout_s=30.0,
)


def log(msg: str) -> None:
    sys.stderr.write(f"server_load: {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- domain -> messages


def inventory_messages(problem: Any) -> tuple[list[pb.GpuType], list[pb.Node], list[pb.Tenant]]:
    inventory, _ = convert.problem_to_messages(problem)
    return list(inventory.gpu_types), list(inventory.nodes), list(inventory.tenants)


def workload_messages(problem: Any) -> list[pb.Workload]:
    return list(convert.problem_to_messages(problem)[1].workloads)


def build_instance(n_workloads: int, n_nodes: int, seed: int) -> Any:
    from bench import instances

    return instances.problem(n_workloads, n_nodes, seed)


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of /proc/PID/status, in KiB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.startswith("Vm") and value.strip().endswith("kB"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Server:
    """``python -m server serve --insecure`` on a free loopback port, in a child process."""

    def __init__(self, workdir: Path, extra: Sequence[str]) -> None:
        self.workdir = workdir
        self.db = workdir / "state.db"
        self.log_path = workdir / "server.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--insecure",
            "--listen",
            self.address,
            "--db",
            str(self.db),
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> str:
        return " ".join(["python", *self.args[1:]]).replace(str(self.workdir), "TMP")

    def start(self, timeout: float = 120.0) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "proto")]))
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        channel = grpc.insecure_channel(self.address)
        ready = grpc.channel_ready_future(channel)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    ready.result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = self.log_path.read_text(errors="replace")[-4000:]
                    raise RuntimeError(f"the server did not start ({self.command}); log:\n{tail}")
        finally:
            ready.cancel()
            channel.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def plan_rounds(self) -> list[dict[str, Any]]:
        """The control loop's "plan recorded" log lines so far."""
        rounds = []
        with contextlib.suppress(OSError), self.log_path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"plan recorded"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    rounds.append(json.loads(line))
        return rounds

    def memory(self) -> dict[str, Any]:
        status = proc_status(self.pid)
        kids = []
        for c in children(self.pid):
            s = proc_status(c)
            line = cmdline(c)
            kids.append(
                {
                    "pid": c,
                    "role": "resource_tracker" if "resource_tracker" in line else "solver process",
                    "vm_hwm_mib": round(s.get("VmHWM", 0) / 1024, 1),
                    "vm_rss_mib": round(s.get("VmRSS", 0) / 1024, 1),
                }
            )
        files = {p.name: p.stat().st_size for p in sorted(self.workdir.glob("state.db*"))}
        return {
            "server_vm_hwm_mib": round(status.get("VmHWM", 0) / 1024, 1),
            "server_vm_rss_mib": round(status.get("VmRSS", 0) / 1024, 1),
            "children": kids,
            "db_files_bytes": files,
            "db_total_mib": round(sum(files.values()) / 1024**2, 1),
        }


@contextlib.contextmanager
def server(extra: Sequence[str]) -> Iterator[Server]:
    workdir = Path(tempfile.mkdtemp(prefix="apportion-bench-"))
    srv = Server(workdir, extra)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def upsert(address: str, problem: Any) -> int:
    gpu_types, nodes, tenants = inventory_messages(problem)
    with grpc.insecure_channel(address) as ch:
        stub = allocator_pb2_grpc.AllocatorStub(ch)
        resp = stub.UpsertNodes(apb.UpsertNodesRequest(gpu_types=gpu_types, nodes=nodes, tenants=tenants))
    return int(resp.revision)


# --------------------------------------------------------------------------- submitting clients


def _client_process(
    address: str, payloads: list[bytes], threads: int, duration_s: float | None, conn: Any
) -> None:
    """One client process: ``threads`` threads, one channel each, SubmitWorkload back to back.

    Once every thread is connected it says "ready" and waits for the start time (wall
    clock) from the parent. With ``duration_s`` it runs that long, reusing its workloads
    with an id suffix if they run out; without, it submits each payload once. Sends back
    (end wall time, latency s) of every OK call, error counts and the highest revision.
    """
    base = [pb.Workload.FromString(p) for p in payloads]
    shares = [base[i::threads] for i in range(threads)]
    results: list[list[tuple[float, float]]] = [[] for _ in range(threads)]
    errors: dict[str, int] = {}
    max_revision = [0] * threads
    lock = threading.Lock()
    channels = [
        grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(threads)
    ]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=60)
    conn.send("ready")
    start_at: float = conn.recv()
    stop_at = None if duration_s is None else start_at + duration_s

    def run(k: int) -> None:
        own = shares[k]
        channel = channels[k]
        stub = allocator_pb2_grpc.AllocatorStub(channel)
        out = results[k]
        i = 0
        while time.time() < start_at:
            time.sleep(0.001)
        while True:
            if stop_at is None:
                if i >= len(own):
                    break
                workload = own[i]
            else:
                if time.time() >= stop_at:
                    break
                workload = own[i % len(own)]
                if i >= len(own):
                    copy = pb.Workload()
                    copy.CopyFrom(workload)
                    copy.id = f"{workload.id}-r{i // len(own)}"
                    workload = copy
            request = apb.SubmitWorkloadRequest(workload=workload, request_id=workload.id)
            i += 1
            t0 = time.perf_counter()
            try:
                status = stub.SubmitWorkload(request, timeout=60)
            except grpc.RpcError as exc:
                name = exc.code().name if exc.code() else "UNKNOWN"
                with lock:
                    errors[name] = errors.get(name, 0) + 1
                continue
            latency = time.perf_counter() - t0
            out.append((time.time(), latency))
            max_revision[k] = max(max_revision[k], status.revision)
        channel.close()

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    conn.send(
        {
            "samples": [s for r in results for s in r],
            "errors": errors,
            "max_revision": max(max_revision),
        }
    )
    conn.close()


def submit_load(
    address: str,
    workloads: Sequence[pb.Workload],
    cfg: Config,
    *,
    duration_s: float | None,
    on_start: Any = None,
) -> dict[str, Any]:
    """Run the client processes; every OK call's (end wall time, latency), errors, max revision.

    ``on_start(start_at)`` is called once every client is connected, just before the load.
    """
    ctx = mp.get_context("spawn")
    n = cfg.client_processes
    payloads = [w.SerializeToString() for w in workloads]
    procs, pipes = [], []
    for k in range(n):
        mine, theirs = ctx.Pipe(duplex=True)
        p = ctx.Process(
            target=_client_process,
            args=(address, payloads[k::n], cfg.threads_per_process, duration_s, theirs),
            daemon=True,
        )
        p.start()
        theirs.close()
        procs.append(p)
        pipes.append(mine)
    for conn in pipes:
        if conn.recv() != "ready":
            raise RuntimeError("a client process did not start")
    start_at = time.time() + 0.2
    if on_start is not None:
        on_start(start_at)
    for conn in pipes:
        conn.send(start_at)
    samples: list[tuple[float, float]] = []
    errors: dict[str, int] = {}
    max_revision = 0
    for p, conn in zip(procs, pipes, strict=True):
        out = conn.recv()
        p.join(30)
        samples.extend(out["samples"])
        for k, v in out["errors"].items():
            errors[k] = errors.get(k, 0) + v
        max_revision = max(max_revision, out["max_revision"])
    return {"start_at": start_at, "samples": samples, "errors": errors, "max_revision": max_revision}


def percentiles(latencies: Sequence[float]) -> dict[str, float | None]:
    import numpy as np

    if not latencies:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    a = np.asarray(latencies) * 1000
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(float(a.max()), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


# --------------------------------------------------------------------------- the parts


def part_submit(cfg: Config) -> dict[str, Any]:
    problem = build_instance(cfg.submit_pool, cfg.submit_nodes, cfg.seed)
    workloads = workload_messages(problem)
    with server(cfg.submit_server_args) as srv:
        upsert(srv.address, problem)
        log(f"submit: {len(workloads)} distinct workloads, {cfg.submit_nodes} nodes, {srv.command}")
        cpu: list[tuple[float, float, float]] = []  # (wall time, server CPU s, solver processes CPU s)
        samplers: list[threading.Thread] = []

        def sample_cpu(at: float) -> None:
            time.sleep(max(0.0, at - time.time()))
            server_cpu = cpu_seconds(srv.pid) or 0.0
            solvers_cpu = sum(cpu_seconds(c) or 0.0 for c in children(srv.pid))
            cpu.append((time.time(), server_cpu, solvers_cpu))

        duration = cfg.submit_warmup_s + cfg.submit_measure_s

        def on_start(start_at: float) -> None:  # CPU use over the measuring window
            for at in (start_at + cfg.submit_warmup_s, start_at + duration):
                samplers.append(threading.Thread(target=sample_cpu, args=(at,)))
                samplers[-1].start()

        rounds_before = len(srv.plan_rounds())
        run = submit_load(srv.address, workloads, cfg, duration_s=duration, on_start=on_start)
        for t in samplers:
            t.join()
        rounds = srv.plan_rounds()[rounds_before:]
        memory = srv.memory()
    lo = run["start_at"] + cfg.submit_warmup_s
    hi = run["start_at"] + duration
    window = [lat for end, lat in run["samples"] if lo <= end <= hi]
    every = [lat for _, lat in run["samples"]]
    cpu_use = None
    if len(cpu) == 2:
        (t0, s0, v0), (t1, s1, v1) = sorted(cpu)
        cpu_use = {
            "server_process_cores": round((s1 - s0) / (t1 - t0), 2),
            "solver_processes_cores": round((v1 - v0) / (t1 - t0), 2),
        }
    return {
        "server_command": srv.command,
        "instance": f"bench.instances.problem({cfg.submit_pool}, {cfg.submit_nodes}, seed={cfg.seed})",
        "clients": f"{cfg.client_processes} processes x {cfg.threads_per_process} threads",
        "concurrency": cfg.client_processes * cfg.threads_per_process,
        "warmup_s": cfg.submit_warmup_s,
        "window_s": cfg.submit_measure_s,
        "requests_in_window": len(window),
        "per_s": round(len(window) / cfg.submit_measure_s, 1),
        **percentiles(window),
        "requests_total": len(every),
        "errors": run["errors"],
        "cpu_in_window": cpu_use,
        "plan_rounds_during_load": len(rounds),
        "plan_rounds": [
            {k: r.get(k) for k in ("workloads", "placed", "solve_s", "round_s", "status")} for r in rounds
        ],
        "server_memory_after": memory,
    }


def part_plan(cfg: Config) -> dict[str, Any]:
    from server import convert

    problem = build_instance(cfg.plan_workloads, cfg.plan_nodes, cfg.seed)
    gpu_types, nodes, tenants = inventory_messages(problem)
    request = apb.PlanRequest(
        inventory=pb.Inventory(gpu_types=gpu_types, nodes=nodes, tenants=tenants),
        workloads=workload_messages(problem),
        policy="throughput",
        options=apb.PlanOptions(time_limit_s=cfg.plan_time_limit_s, seed=cfg.seed),
    )
    reps: list[dict[str, Any]] = []
    response = None
    with server(()) as srv, grpc.insecure_channel(srv.address) as ch:
        log(f"plan: {cfg.plan_workloads} workloads / {cfg.plan_nodes} nodes, {cfg.plan_repetitions} reps")
        stub = allocator_pb2_grpc.AllocatorStub(ch)
        for _ in range(cfg.plan_repetitions):
            t0 = time.perf_counter()
            response = stub.Plan(request, timeout=120)
            wall = time.perf_counter() - t0
            solve = response.solve_time_s
            reps.append(
                {
                    "wall_s": round(wall, 4),
                    "solve_time_s": round(solve, 4),
                    "overhead_s": round(wall - solve, 4),
                    "overhead_fraction": round((wall - solve) / wall, 4),
                    "status": response.plan.status,
                    "placed": response.plan.metrics.placed,
                }
            )
            log(f"plan: wall {wall:.3f} s, solve {solve:.3f} s")
        server_command = srv.command
    assert response is not None
    # Where the overhead goes: the server's Python work on this request, timed in this process.
    breakdown: dict[str, float] = {}

    def timed(key: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        value = fn()
        breakdown[key] = round(time.perf_counter() - t0, 4)
        return value

    data = timed("client_serialize_request_s", request.SerializeToString)
    parsed = timed("parse_request_s", lambda: apb.PlanRequest.FromString(data))
    domain = timed(
        "request_to_problem_s (convert.plan_request_problem)", lambda: convert.plan_request_problem(parsed)
    )
    blob = timed("pickle_problem_s", lambda: pickle.dumps(domain))
    timed("unpickle_problem_s", lambda: pickle.loads(blob))
    plan = convert.plan_from_message(response.plan)
    pblob = timed("pickle_plan_s", lambda: pickle.dumps(plan))
    timed("unpickle_plan_s", lambda: pickle.loads(pblob))
    message = timed("plan_to_message_s", lambda: convert.plan_to_message(plan))
    reply = apb.PlanResponse(plan=message, solve_time_s=1.0)
    out = timed("serialize_response_s", reply.SerializeToString)
    timed("client_parse_response_s", lambda: apb.PlanResponse.FromString(out))
    fractions = [r["overhead_fraction"] for r in reps]
    overheads = [r["overhead_s"] for r in reps]
    return {
        "server_command": server_command,
        "instance": f"bench.instances.problem({cfg.plan_workloads}, {cfg.plan_nodes}, seed={cfg.seed})",
        "options": {"policy": "throughput", "time_limit_s": cfg.plan_time_limit_s, "seed": cfg.seed},
        "request_bytes": len(data),
        "response_bytes": len(out),
        "repetitions": reps,
        "median_wall_s": round(statistics.median(r["wall_s"] for r in reps), 4),
        "median_solve_time_s": round(statistics.median(r["solve_time_s"] for r in reps), 4),
        "median_overhead_s": round(statistics.median(overheads), 4),
        "median_overhead_fraction": round(statistics.median(fractions), 4),
        "in_process_breakdown_s": breakdown,
        "in_process_breakdown_total_s": round(sum(breakdown.values()), 4),
    }


def part_memory(cfg: Config) -> dict[str, Any]:
    n = cfg.memory_workloads
    problem = build_instance(n, cfg.memory_nodes, cfg.seed)
    workloads = workload_messages(problem)
    with server(cfg.memory_server_args) as srv:
        upsert(srv.address, problem)
        base = srv.memory()
        log(f"memory: submitting {n} workloads ({cfg.memory_nodes} nodes), {srv.command}")
        run = submit_load(srv.address, workloads, cfg, duration_s=None)
        ends = sorted(end for end, _ in run["samples"])
        load_s = (ends[-1] - run["start_at"]) if ends else 0.0
        log(f"memory: {len(ends)} submitted in {load_s:.1f} s; waiting for the plan that covers them")
        # The plan that covers them all: a "plan recorded" log line over every workload.
        # (Not GetPlan: with 100k workloads the plan message, one entry and its reasons per
        # unplaced workload, is over the server's 16 MiB message limit.)
        settled_in = None
        t1 = time.perf_counter()
        while time.perf_counter() - t1 < cfg.memory_settle_timeout_s:
            if any(int(r.get("workloads") or 0) >= len(ends) for r in srv.plan_rounds()):
                settled_in = time.perf_counter() - t1
                break
            time.sleep(1.0)
        rounds = srv.plan_rounds()
        after = srv.memory()  # before any read below adds its own allocations
        with grpc.insecure_channel(srv.address) as ch:
            stub = allocator_pb2_grpc.AllocatorStub(ch)
            count = 0
            token = ""
            while True:  # every workload is there: count them through the API
                page = stub.ListWorkloads(
                    apb.ListWorkloadsRequest(page_size=1000, page_token=token), timeout=60
                )
                count += len(page.workloads)
                token = page.next_page_token
                if not token:
                    break
        tables = db_tables(srv.db)
    return {
        "server_command": srv.command,
        "instance": f"bench.instances.problem({n}, {cfg.memory_nodes}, seed={cfg.seed})",
        "why_this_setting": (
            f"a small inventory ({cfg.memory_nodes} nodes) and "
            f"{' '.join(cfg.memory_server_args)}: the control loop still plans every state "
            "(every 2 s while submissions stream in), but a solve on a few nodes is short and one "
            "solver process leaves a core to the server, so planning does not dominate the load"
        ),
        "workloads_submitted": len(ends),
        "workloads_listed": count,
        "errors": run["errors"],
        "submit_s": round(load_s, 1),
        "submit_per_s": round(len(ends) / load_s, 1) if load_s > 0 else None,
        "submit_latency": percentiles([lat for _, lat in run["samples"]]),
        "plan_covering_all_after_s": None if settled_in is None else round(settled_in, 1),
        "plan_rounds": len(rounds),
        "last_rounds": [
            {k: r.get(k) for k in ("workloads", "placed", "unplaced", "solve_s", "round_s", "status")}
            for r in rounds[-3:]
        ],
        "empty_server": base,
        **after,
        "db_tables": tables,
    }


def db_tables(db: Path) -> dict[str, Any]:
    """Rows and stored JSON bytes of the tables that grow (read-only, beside the running server)."""
    import sqlite3

    queries = {
        "workloads": "SELECT count(*), sum(length(spec) + length(coalesce(placement, '')) "
        "+ length(coalesce(reasons, ''))) FROM workloads",
        "events": "SELECT count(*), sum(length(data)) FROM events",
        "plans": "SELECT count(*), sum(length(plan)) FROM plans",
        "requests": "SELECT count(*), NULL FROM requests",
    }
    out: dict[str, Any] = {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    try:
        for table, sql in queries.items():
            try:
                rows, size = conn.execute(sql).fetchone()
            except sqlite3.Error as exc:
                out[table] = {"error": str(exc)}
                continue
            out[table] = {"rows": rows, "json_mib": None if size is None else round(size / 1024**2, 1)}
    finally:
        conn.close()
    return out


# --------------------------------------------------------------------------- output


def _machine() -> dict[str, Any]:
    return provenance.machine(
        grpcio=grpc.__version__,
        gpu=None,
        note="shared VM: other jobs (other test runs) may use the same 2 cores while this runs",
    )


def _git() -> dict[str, Any]:
    return provenance.git("server_or_solver_dirty", ("server", "solver"))


def targets(results: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    s = results.get("submit")
    if s:
        out["submit_per_s"] = {"target": ">= 1000", "value": s["per_s"], "met": s["per_s"] >= 1000}
        p99 = s["p99_ms"]
        out["submit_p99_ms"] = {"target": "<= 50", "value": p99, "met": p99 is not None and p99 <= 50}
    p = results.get("plan")
    if p:
        f = p["median_overhead_fraction"]
        out["plan_overhead_fraction"] = {"target": "<= 0.10", "value": f, "met": f <= 0.10}
    return out


def markdown(doc: Mapping[str, Any]) -> str:
    r = doc["results"]
    t = doc["targets"]
    lines = ["| measure | value | target | met |", "| --- | ---: | ---: | --- |"]

    def met(key: str) -> str:
        return "yes" if t[key]["met"] else "**no**"

    if "submit" in r:
        s = r["submit"]
        lines += [
            f"| SubmitWorkload throughput, {s['concurrency']} clients ({s['clients']}) "
            f"| {s['per_s']:,.0f}/s | ≥ 1,000/s | {met('submit_per_s')} |",
            f"| SubmitWorkload latency p50 / p90 / p99 | {s['p50_ms']:.1f} / {s['p90_ms']:.1f} / "
            f"{s['p99_ms']:.1f} ms | p99 ≤ 50 ms | {met('submit_p99_ms')} |",
        ]
    if "plan" in r:
        p = r["plan"]
        lines.append(
            f"| Plan overhead ({p['instance']}, median of {len(p['repetitions'])}) "
            f"| {100 * p['median_overhead_fraction']:.1f}% ({p['median_overhead_s'] * 1000:.0f} ms of "
            f"{p['median_wall_s']:.2f} s) | ≤ 10% | {met('plan_overhead_fraction')} |"
        )
    if "memory" in r:
        m = r["memory"]
        solver = max((c["vm_hwm_mib"] for c in m["children"] if c["role"] == "solver process"), default=0)
        lines += [
            f"| Server peak RSS holding {m['workloads_listed']:,} workloads (VmHWM) "
            f"| {m['server_vm_hwm_mib']:,.0f} MiB (solver process {solver:,.0f} MiB) | — | — |",
            f"| Database (db + WAL) with {m['workloads_listed']:,} workloads "
            f"| {m['db_total_mib']:,.0f} MiB | — | — |",
            f"| Bulk submit of {m['workloads_submitted']:,} workloads | {m['submit_per_s'] or 0:,.0f}/s, "
            f"p99 {m['submit_latency']['p99_ms'] or 0:.1f} ms | — | — |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run of every part")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run ({', '.join(PARTS)})")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts: {', '.join(unknown)}")
    cfg = QUICK if args.quick else FULL
    doc: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "bench/server_load.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": _machine(),
        "git": _git(),
        "config": {**asdict(cfg), "quick": args.quick},
        "results": {},
    }
    runners = {"submit": part_submit, "plan": part_plan, "memory": part_memory}
    provenance.run_parts(doc, parts, runners, cfg, targets, args.out)
    sys.stdout.write(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
