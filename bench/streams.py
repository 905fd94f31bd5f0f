"""Stream load of ``apportion serve``: thousands of connected workers, Watch streams, unary latency.

    python bench/streams.py [--quick] [--out FILE]

A real server in a child process (``python -m server serve --insecure`` on a
free loopback port, ``--heartbeat-interval 2``; every caller is the anonymous
admin there, so ``--max-streams-per-caller`` is raised to let one principal hold
every Watch) and, in other processes:

workers
    ``--workers`` light simulated agents (``--agent-processes`` processes, one
    asyncio loop and a few channels each), starting at ``register_per_s`` (200/s,
    as a cluster's workers come up): each calls ``Register`` with a node
    of its own (1 GPU of one type) and keeps a ``Connect`` stream, sending a
    heartbeat every interval the server asked for (random phase) and reading
    what the server sends (a lease per heartbeat). An agent counts as
    connected while its last lease is younger than two intervals.
watchers
    ``--watchers`` ``Watch`` streams (one process), opened once the workers are
    connected, from the revision then; with ``--watches-first``, before the
    workers start (then ``connect_s`` is how long the workers take to connect
    while every registration is an event for each watch). (Opened first, every registration is
    an event for each of them: 4,000 registrations are 400,000 messages, which
    this machine's one server core does not send fast enough to keep every
    worker's first heartbeat inside the timeout; see the README.)
probe
    This process, once everything is connected: unary calls one at a time at
    ``--probe-rate`` per second for ``--measure`` seconds, cycling through
    ``SubmitWorkload`` (a small training job), ``GetWorkload`` and
    ``ListWorkloads`` (a page of 10); latency is the client-observed time of
    each call.

Target (hardening, issue 15 item 3): 4,000 connected workers heartbeating every
2 s plus 100 Watch streams, unary p99 <= 50 ms. Results go to
``bench/results/streams.json`` (date, command, machine, git commit, config,
results, targets) and a Markdown table to stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "proto"):  # run as a script: `python bench/streams.py`
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402

from apportion.v1 import allocator_pb2 as apb  # noqa: E402
from apportion.v1 import (  # noqa: E402
    allocator_pb2_grpc,
    workers_pb2_grpc,
)
from apportion.v1 import types_pb2 as pb  # noqa: E402
from apportion.v1 import workers_pb2 as wpb  # noqa: E402
from bench import server_load  # noqa: E402
from bench.server_load import percentiles  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "streams.json"
GPU_TYPE = "bench-gpu"
UNARY_P99_TARGET_MS = 50.0


@dataclass(frozen=True)
class Config:
    workers: int = 4000
    agent_processes: int = 4
    agents_per_channel: int = 100
    watchers: int = 100
    heartbeat_interval_s: float = 2.0
    register_per_s: float = 200.0  # workers starting per second, all processes together
    watches_first: bool = False  # open the watches before the workers register
    connect_timeout_s: float = 300.0
    probe_rate: float = 20.0
    measure_s: float = 30.0


FULL = Config()
QUICK = replace(FULL, workers=40, agent_processes=2, watchers=10, connect_timeout_s=60.0, measure_s=3.0)


def log(msg: str) -> None:
    sys.stderr.write(f"streams: {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- simulated agents


class Agent:
    """One simulated worker: Register, then a Connect stream with heartbeats."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str) -> None:
        self.stub = workers_pb2_grpc.WorkersStub(channel)
        self.node_id = node_id
        self.last_lease = 0.0
        self.leases = 0
        self.errors: list[str] = []
        self.deferred = 0  # registrations refused UNAVAILABLE (backpressure) and retried
        self.interval = 2.0
        self.register_s: list[float] = []  # each Register's wait
        self.first_lease_s: list[float] = []  # from Register's reply to the first lease

    async def run(self, stop: asyncio.Event) -> None:
        node = pb.Node(id=self.node_id, gpu_type=GPU_TYPE, gpus=1, cpus=8, memory_gib=64, zone="z1")
        while not stop.is_set():
            try:
                asked = time.monotonic()
                request = wpb.RegisterRequest(node=node, advertise_address="127.0.0.1:1")
                reply = await self.stub.Register(request)
                registered = time.monotonic()
                self.register_s.append(registered - asked)
                self.interval = reply.heartbeat_interval_s or self.interval
                call = self.stub.Connect(self._messages(reply.session_id, stop))
                async for message in call:
                    if message.WhichOneof("body") == "lease":
                        if not self.leases:
                            self.first_lease_s.append(time.monotonic() - registered)
                        self.leases += 1
                        self.last_lease = time.monotonic()
                return
            except grpc.aio.AioRpcError as exc:
                if stop.is_set():
                    return
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    self.deferred += 1  # the server's backpressure: retried, as the real agent does
                else:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(random.uniform(0.5, 1.5))

    async def _messages(self, session_id: str, stop: asyncio.Event) -> AsyncIterator[wpb.WorkerMessage]:
        yield wpb.WorkerMessage(session_id=session_id, heartbeat=wpb.Heartbeat())
        await asyncio.sleep(random.uniform(0, self.interval))  # spread the beats over the interval
        while not stop.is_set():
            yield wpb.WorkerMessage(session_id=session_id, heartbeat=wpb.Heartbeat())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    def connected(self, now: float) -> bool:
        return self.last_lease > 0 and now - self.last_lease < 2 * self.interval


async def _agents(address: str, first: int, count: int, per_channel: int, pause_s: float, conn: Any) -> None:
    stop = asyncio.Event()
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, -(-count // per_channel)))]
    agents = [Agent(channels[i // per_channel], f"bench-node-{first + i:05d}") for i in range(count)]
    tasks = []
    for agent in agents:  # workers start over a while, as a cluster's do
        tasks.append(asyncio.create_task(agent.run(stop)))
        await asyncio.sleep(pause_s)
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        now = time.monotonic()
        report = {
            "agents": count,
            "connected": sum(a.connected(now) for a in agents),
            "leases": sum(a.leases for a in agents),
            "errors": sum(len(a.errors) for a in agents),
            "deferred": sum(a.deferred for a in agents),
            "error_examples": sorted({e for a in agents for e in a.errors})[:5],
            "register_s": [x for a in agents for x in a.register_s],
            "first_lease_s": [x for a in agents for x in a.first_lease_s],
        }
        conn.send(report)
        if command == "stop":
            break
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    for ch in channels:
        await ch.close()


def agent_process(address: str, first: int, count: int, per_channel: int, pause_s: float, conn: Any) -> None:
    asyncio.run(_agents(address, first, count, per_channel, pause_s, conn))


# --------------------------------------------------------------------------- watchers


async def _watchers(address: str, count: int, revision: int, conn: Any) -> None:
    events = [0] * count
    opened = [False] * count
    errors: list[str] = []

    async def watch(i: int, channel: grpc.aio.Channel) -> None:
        stub = allocator_pb2_grpc.AllocatorStub(channel)
        try:
            call = stub.Watch(apb.WatchRequest(from_revision=revision))
            await call.initial_metadata()
            opened[i] = True
            async for _ in call:
                events[i] += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                errors.append(f"{exc.code().name}: {exc.details()}")

    channel = grpc.aio.insecure_channel(address)
    tasks = [asyncio.create_task(watch(i, channel)) for i in range(count)]
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        conn.send({"watchers": count, "open": sum(opened), "events": sum(events), "errors": errors[:5]})
        if command == "stop":
            break
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()


def watcher_process(address: str, count: int, revision: int, conn: Any) -> None:
    asyncio.run(_watchers(address, count, revision, conn))


# --------------------------------------------------------------------------- the probe


def probe(address: str, rate: float, duration_s: float) -> dict[str, Any]:
    """Unary calls one at a time at ``rate``/s: their latencies, by method and together."""
    latencies: dict[str, list[float]] = {"SubmitWorkload": [], "GetWorkload": [], "ListWorkloads": []}
    errors: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = allocator_pb2_grpc.AllocatorStub(channel)
        stub.ListWorkloads(apb.ListWorkloadsRequest(page_size=1), timeout=30)  # connected
        start = time.monotonic()
        i = 0
        last_id = ""
        while (now := time.monotonic()) - start < duration_s:
            method = ("SubmitWorkload", "GetWorkload", "ListWorkloads")[i % 3]
            t0 = time.perf_counter()
            try:
                if method == "SubmitWorkload":
                    last_id = f"probe-{i:06d}"
                    job = pb.Workload(
                        id=last_id,
                        tenant="bench",
                        training=pb.TrainingSpec(gpus=1, throughput={GPU_TYPE: 1.0}),
                    )
                    stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=job), timeout=10)
                elif method == "GetWorkload":
                    stub.GetWorkload(apb.GetWorkloadRequest(id=last_id), timeout=10)
                else:
                    stub.ListWorkloads(apb.ListWorkloadsRequest(page_size=10), timeout=10)
                latencies[method].append(time.perf_counter() - t0)
            except grpc.RpcError as exc:
                errors.append(f"{method} {exc.code().name}: {exc.details()}")
            i += 1
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
        del now
    together = [x for v in latencies.values() for x in v]
    return {
        "calls": len(together),
        "errors": len(errors),
        "error_examples": errors[:5],
        "all": percentiles(together),
        "by_method": {m: percentiles(v) for m, v in latencies.items()},
    }


# --------------------------------------------------------------------------- the run


def _ask(conns: Sequence[Any], command: str) -> list[dict[str, Any]]:
    for c in conns:
        c.send(command)
    return [c.recv() for c in conns]


def _wait(agents: Sequence[Any], watchers: Sequence[Any], cfg: Config) -> None:
    """Until every agent is connected and every watch open (or the timeout)."""
    t0 = time.monotonic()
    while True:
        time.sleep(2.0)
        connected = sum(a["connected"] for a in _ask(agents, "report"))
        opened = sum(w["open"] for w in _ask(watchers, "report"))
        wanted = cfg.watchers if watchers else 0
        workers = cfg.workers if agents else 0
        log(f"{connected}/{workers} workers connected, {opened}/{wanted} watches open")
        if connected >= workers and opened >= wanted:
            return
        if time.monotonic() - t0 > cfg.connect_timeout_s:
            log("not everything connected in time; measuring what is")
            return


def setup(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = allocator_pb2_grpc.AllocatorStub(channel)
        reply = stub.UpsertNodes(
            apb.UpsertNodesRequest(
                gpu_types=[pb.GpuType(name=GPU_TYPE, memory_gib=80, cost_per_hour=2.0)],
                tenants=[pb.Tenant(name="bench")],
            )
        )
    return int(reply.revision)


def run(cfg: Config) -> dict[str, Any]:
    extra = [
        "--heartbeat-interval",
        str(cfg.heartbeat_interval_s),
        "--heartbeat-timeout",
        str(5 * cfg.heartbeat_interval_s),
        "--max-streams-per-caller",
        str(cfg.watchers + 10),
        "--plan-time-limit",
        "2",
    ]
    ctx = mp.get_context("spawn")
    with server_load.server(extra) as srv:
        revision = setup(srv.address)
        procs, conns = [], []
        watch_pipe, their_watch_pipe = ctx.Pipe()
        watchers = ctx.Process(
            target=watcher_process, args=(srv.address, cfg.watchers, revision, their_watch_pipe)
        )
        if cfg.watches_first:  # every registration is then an event for each of them
            watchers.start()
            procs.append(watchers)
            _wait([], [watch_pipe], cfg)
        share = -(-cfg.workers // cfg.agent_processes)
        pause_s = cfg.agent_processes / cfg.register_per_s
        for p in range(cfg.agent_processes):
            count = min(share, cfg.workers - p * share)
            if count <= 0:
                break
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=agent_process,
                args=(srv.address, p * share, count, cfg.agents_per_channel, pause_s, theirs),
            )
            proc.start()
            procs.append(proc)
            conns.append(mine)
        t0 = time.monotonic()
        _wait(conns, [watch_pipe] if cfg.watches_first else [], cfg)
        connect_s = time.monotonic() - t0
        if not cfg.watches_first:
            revision = setup(srv.address)  # the watches start from now
            watchers = ctx.Process(
                target=watcher_process, args=(srv.address, cfg.watchers, revision, their_watch_pipe)
            )
            watchers.start()
            procs.append(watchers)
            _wait(conns, [watch_pipe], cfg)
        cpu0 = server_load.cpu_seconds(srv.pid)
        m0 = time.monotonic()
        probed = probe(srv.address, cfg.probe_rate, cfg.measure_s)
        cpu1 = server_load.cpu_seconds(srv.pid)
        wall = time.monotonic() - m0
        agents = _ask(conns, "stop")
        watch = _ask([watch_pipe], "stop")[0]
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        memory = srv.memory()
    return {
        "server": srv.command,
        "connect_s": round(connect_s, 1),
        "register_s": _spread([x for a in agents for x in a["register_s"]]),
        "register_to_first_lease_s": _spread([x for a in agents for x in a["first_lease_s"]]),
        "connected_workers": sum(a["connected"] for a in agents),
        "workers": cfg.workers,
        "leases_received": sum(a["leases"] for a in agents),
        "agent_errors": sum(a["errors"] for a in agents),
        "registrations_deferred": sum(a["deferred"] for a in agents),
        "agent_error_examples": sorted({e for a in agents for e in a["error_examples"]})[:5],
        "watch_streams": watch["open"],
        "watch_events": watch["events"],
        "watch_errors": watch["errors"],
        "probe": probed,
        "server_cpu_share_while_measuring": None
        if cpu0 is None or cpu1 is None
        else round((cpu1 - cpu0) / wall, 2),
        "server_vm_hwm_mib": memory["server_vm_hwm_mib"],
    }


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def targets(results: Mapping[str, Any], cfg: Config) -> dict[str, Any]:
    """Every worker and Watch of the run connected (FULL: the issue's 4,000 and 100), unary p99."""
    p99 = results["probe"]["all"]["p99_ms"]
    return {
        "connected_workers": {"target": cfg.workers, "value": results["connected_workers"],
                              "met": results["connected_workers"] >= cfg.workers},
        "watch_streams": {"target": cfg.watchers, "value": results["watch_streams"],
                          "met": results["watch_streams"] >= cfg.watchers},
        "unary_p99_ms": {"target": UNARY_P99_TARGET_MS, "value": p99,
                         "met": p99 is not None and p99 <= UNARY_P99_TARGET_MS},
    }  # fmt: skip


def markdown(doc: Mapping[str, Any]) -> str:
    r = doc["results"]
    p = r["probe"]
    lines = [
        f"# Stream load ({doc['date']}, `{doc['command']}`)",
        "",
        "| workers connected | Watch streams | unary calls | p50 ms | p99 ms | max ms | server CPU "
        "| server RSS peak |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['connected_workers']}/{r['workers']} | {r['watch_streams']} "
        f"| {p['calls']} ({p['errors']} errors) "
        f"| {p['all']['p50_ms']} | {p['all']['p99_ms']} | {p['all']['max_ms']} "
        f"| {r['server_cpu_share_while_measuring']} cores | {r['server_vm_hwm_mib']} MiB |",
        "",
    ]
    for name, t in doc["targets"].items():
        lines.append(f"- {name}: {t['value']} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (40 workers, 10 watches)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    parser.add_argument("--workers", type=int, help="simulated workers (default 4000)")
    parser.add_argument(
        "--watches-first", action="store_true", help="open the watches before the workers register"
    )
    parser.add_argument("--connect-timeout", type=float, help="seconds to wait for everything to connect")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.workers is not None:
        cfg = replace(cfg, workers=args.workers)
    if args.watches_first:
        cfg = replace(cfg, watches_first=True)
    if args.connect_timeout is not None:
        cfg = replace(cfg, connect_timeout_s=args.connect_timeout)
    doc: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/streams.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": server_load._machine(),
        "git": server_load._git(),
        "config": {**asdict(cfg), "quick": args.quick},
    }
    doc["results"] = run(cfg)
    doc["targets"] = targets(doc["results"], cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
