"""Submit-to-PLACED latency under load, with and without admission (issue 15, item 8).

A real ``python -m server serve --insecure`` in a child process, once with
``--admission on`` (the default) and once with ``--admission off``, on the same
state: a cluster of ``nodes`` 8-GPU nodes whose ``bulk`` tenant has a quota of
75% of the GPUs and ``stored`` training workloads (1-8 GPUs; written to the
store before the server starts, then planned by its first round: the quota
fills, the rest waits). Then ``client_processes`` x ``threads`` clients submit
at a steady ``rate`` per second for ``duration_s``, one request every
1/``rate`` s in turn; every ``probe_every``-th submission is a *probe*: a 1-GPU
job of the ``interactive`` tenant (no quota) that fits in the free 25% (all
probes together fit), the others more ``bulk`` work, which does not fit. The
planning rounds go on meanwhile (each takes tens of seconds on this state), so
plans solved before admissions are applied beside them.

Measured per probe: from just before its ``SubmitWorkload`` call to the first
``PLACED`` of it in the store's event log (the same machine's clock), read
after the run; probes still unplaced ``drain_s`` after the load count as not
placed (their latency is at least the wait). Also: the submit rate reached, the
RPC latency, the planning rounds during the load, what the admission placed and
what plans made it give back, and, from the store at the end, whether any node
holds more GPUs than it has or any tenant more than its quota (must be none).

    python bench/admission.py                 # both modes, 50,000 stored, 1,000/s for 60 s (~8 min)
    python bench/admission.py --quick --out /tmp/admission.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "proto"):  # run as a script: `python bench/admission.py`
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from apportion.v1 import allocator_pb2 as apb  # noqa: E402
from apportion.v1 import allocator_pb2_grpc  # noqa: E402
from apportion.v1 import types_pb2 as pb  # noqa: E402
from bench import provenance  # noqa: E402
from bench.server_load import Server, percentiles  # noqa: E402
from server import convert  # noqa: E402
from server.store import Store  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "admission.json"
TARGET_P99_S = 1.0
GPU_TYPE = "h100-80g"


@dataclass(frozen=True)
class Config:
    nodes: int = 1000
    stored: int = 50_000
    rate: float = 1000.0
    duration_s: float = 60.0  # long enough for planning rounds to end during the load
    probe_every: int = 40  # 2.5% of the submissions are probes
    client_processes: int = 4
    threads_per_process: int = 4
    drain_s: float = 120.0  # after the load, how long unplaced probes are waited for
    first_plan_timeout_s: float = 600.0
    seed: int = 0
    server_args: tuple[str, ...] = ()


FULL = Config()
QUICK = replace(FULL, nodes=40, stored=2000, rate=200.0, duration_s=4.0, client_processes=2, drain_s=30.0)


def log(msg: str) -> None:
    sys.stderr.write(f"[admission {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- the state


def inventory(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    types = [{"name": GPU_TYPE, "memory_gib": 80}]
    nodes = [
        {"id": f"n{i:05d}", "gpu_type": GPU_TYPE, "gpus": 8, "zone": f"z{i % 4}", "domain": f"r{i // 16}"}
        for i in range(cfg.nodes)
    ]
    tenants = [{"name": "bulk", "max_gpus": int(0.75 * 8 * cfg.nodes)}, {"name": "interactive"}]
    return types, nodes, tenants


def job(id: str, tenant: str, gpus: int, rng: np.random.Generator) -> pb.Workload:
    w = pb.Workload(id=id, tenant=tenant, submit_time_s=time.time())
    w.training.gpus = gpus
    w.training.throughput[GPU_TYPE] = round(float(gpus * rng.uniform(0.5, 1.5)), 3)
    w.training.remaining_work = 1e6
    return w


def bulk(n: int, start: int, rng: np.random.Generator) -> list[pb.Workload]:
    sizes = rng.choice([1, 2, 4, 8], size=n, p=[0.4, 0.3, 0.2, 0.1])
    return [job(f"bulk-{start + i:06d}", "bulk", int(g), rng) for i, g in enumerate(sizes)]


def preload(db: Path, cfg: Config) -> float:
    """The inventory and ``cfg.stored`` bulk workloads, written to a new store; seconds taken."""
    t0 = time.perf_counter()
    types, nodes, tenants = inventory(cfg)
    workloads = bulk(cfg.stored, 0, np.random.default_rng([cfg.seed, 1]))
    with Store(db) as store:
        store.upsert_inventory(gpu_types=types, nodes=nodes, tenants=tenants)

        def put(w: pb.Workload) -> None:
            store.submit_workload(w.id, w.tenant, "training", convert.message_to_dict(w), request_key=None)

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(put, workloads, chunksize=256))
    return time.perf_counter() - t0


def load_requests(cfg: Config) -> list[tuple[bool, bytes]]:
    """(is a probe, the serialized request) of every submission, in order."""
    rng = np.random.default_rng([cfg.seed, 2])
    n = int(cfg.rate * cfg.duration_s)
    out = []
    more = iter(bulk(n, cfg.stored, rng))
    for i in range(n):
        if i % cfg.probe_every == 0:
            w = job(f"probe-{i:06d}", "interactive", 1, rng)
            out.append((True, apb.SubmitWorkloadRequest(workload=w, request_id=w.id).SerializeToString()))
        else:
            w = next(more)
            out.append((False, apb.SubmitWorkloadRequest(workload=w, request_id=w.id).SerializeToString()))
    return out


# --------------------------------------------------------------------------- paced clients


def _client(address: str, mine: list[tuple[int, bytes]], threads: int, rate: float, conn: Any) -> None:
    """One client process: its share of the submissions (global index, request), each
    sent at start + index / rate, by ``threads`` threads. Sends back (index, send wall
    time, RPC seconds or None on error) of each."""
    channels = [grpc.insecure_channel(address) for _ in range(threads)]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=60)
    conn.send("ready")
    start_at: float = conn.recv()
    results: list[tuple[int, float, float | None]] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        stub = allocator_pb2_grpc.AllocatorStub(channels[k])
        for index, payload in mine[k::threads]:
            at = start_at + index / rate
            wait = at - time.time()
            if wait > 0:
                time.sleep(wait)
            sent = time.time()
            t0 = time.perf_counter()
            try:
                stub.SubmitWorkload(apb.SubmitWorkloadRequest.FromString(payload), timeout=60)
                took: float | None = time.perf_counter() - t0
            except grpc.RpcError:
                took = None
            with lock:
                results.append((index, sent, took))

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for ch in channels:
        ch.close()
    conn.send(results)
    conn.close()


def submit_paced(
    address: str, requests: list[tuple[bool, bytes]], cfg: Config
) -> dict[int, tuple[float, float | None]]:
    ctx = mp.get_context("spawn")
    n = cfg.client_processes
    indexed = [(i, payload) for i, (_probe, payload) in enumerate(requests)]
    procs, pipes = [], []
    for k in range(n):
        mine, theirs = ctx.Pipe(duplex=True)
        p = ctx.Process(
            target=_client,
            args=(address, indexed[k::n], cfg.threads_per_process, cfg.rate, theirs),
            daemon=True,
        )
        p.start()
        theirs.close()
        procs.append(p)
        pipes.append(mine)
    for conn in pipes:
        if conn.recv() != "ready":
            raise RuntimeError("a client process did not start")
    start_at = time.time() + 0.5
    for conn in pipes:
        conn.send(start_at)
    out: dict[int, tuple[float, float | None]] = {}
    for p, conn in zip(procs, pipes, strict=True):
        for index, sent, took in conn.recv():
            out[index] = (sent, took)
        p.join(30)
    return out


# --------------------------------------------------------------------------- one mode


def first_placed(db: Path, ids: Sequence[str]) -> dict[str, float]:
    """id -> the time of its first PLACED event."""
    wanted = set(ids)
    out: dict[str, float] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT id, time, data FROM events "
            "WHERE kind = 'workload' AND id LIKE 'probe-%' ORDER BY revision"
        )
        for id, t, data in rows:
            if id in wanted and id not in out and json.loads(data).get("state") == "PLACED":
                out[id] = t
    return out


def final_state_checks(db: Path, cfg: Config) -> dict[str, int]:
    """From the store after the run: nodes over their GPUs, tenants over their quota,
    and admissions a plan withdrew (events with the withdrawal reason)."""
    _types, nodes, tenants = inventory(cfg)
    capacity = {n["id"]: n["gpus"] for n in nodes}
    quota = {t["name"]: t["max_gpus"] for t in tenants if "max_gpus" in t}
    used: dict[str, int] = {}
    held: dict[str, int] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for tenant, placement in conn.execute(
            "SELECT tenant, placement FROM workloads WHERE state IN ('PLACED', 'RUNNING')"
        ):
            for shard in json.loads(placement or "{}").get("shards", []):
                used[shard["node_id"]] = used.get(shard["node_id"], 0) + shard["gpus"]
                held[tenant] = held.get(tenant, 0) + shard["gpus"]
        withdrawn = conn.execute(
            "SELECT count(*) FROM events WHERE kind = 'workload' AND data LIKE '%then withdrawn%'"
        ).fetchone()[0]
    return {
        "nodes_over_capacity": sum(1 for n, g in used.items() if g > capacity[n]),
        "tenants_over_quota": sum(1 for t, g in held.items() if t in quota and g > quota[t]),
        "admissions_withdrawn": int(withdrawn),
    }


def admitted_count(srv: Server) -> int:
    """Workloads the admission placed, by the server's "admitted" log lines."""
    total = 0
    for line in srv.log_path.read_text(errors="replace").splitlines():
        if '"admitted"' in line:
            with contextlib.suppress(ValueError):
                total += int(json.loads(line).get("workloads", 0))
    return total


def wait_first_plan(srv: Server, stored: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in srv.plan_rounds():
            if r.get("workloads", 0) >= stored:
                return r
        time.sleep(1.0)
    raise RuntimeError(f"no plan of the {stored} stored workloads within {timeout} s")


def run_mode(cfg: Config, mode: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="apportion-admission-"))
    try:
        srv = Server(workdir, ["--admission", mode, *cfg.server_args])
        log(f"{mode}: writing {cfg.stored:,} workloads")
        preload_s = preload(srv.db, cfg)
        srv.start()
        try:
            log(f"{mode}: waiting for the first plan")
            first = wait_first_plan(srv, cfg.stored, cfg.first_plan_timeout_s)
            requests = load_requests(cfg)
            rounds_before = len(srv.plan_rounds())
            log(f"{mode}: {len(requests):,} submissions at {cfg.rate:g}/s")
            sent = submit_paced(srv.address, requests, cfg)
            load_end = time.time()
            rounds_load = srv.plan_rounds()[rounds_before:]
            probes = {f"probe-{i:06d}": i for i, (probe, _p) in enumerate(requests) if probe}
            log(f"{mode}: waiting up to {cfg.drain_s:g} s for the {len(probes)} probes")
            placed: dict[str, float] = {}
            while time.time() < load_end + cfg.drain_s:
                placed = first_placed(srv.db, list(probes))
                if len(placed) == len(probes):
                    break
                time.sleep(1.0)
            admitted = admitted_count(srv)
        finally:
            srv.stop()
        checks = final_state_checks(srv.db, cfg)
        ok = [(s, t) for s, t in sent.values() if t is not None]
        first_sent = min(s for s, _ in sent.values())
        last_sent = max(s for s, _ in sent.values())
        latencies = []
        never = 0
        for id, i in probes.items():
            s, took = sent.get(i, (None, None))
            if s is None or took is None:
                continue
            if id in placed:
                latencies.append(placed[id] - s)
            else:
                never += 1
        waited = [max(x, 0.0) for x in latencies] + [cfg.drain_s] * never
        lat = percentiles(waited)
        return {
            "mode": mode,
            "server_command": srv.command,
            "preload_s": round(preload_s, 1),
            "first_plan": {k: first.get(k) for k in ("workloads", "placed", "unplaced", "round_s", "status")},
            "submissions": len(requests),
            "errors": len(sent) - len(ok),
            "submit_per_s": round(len(ok) / max(1e-9, last_sent - first_sent), 1),
            "submit_rpc": percentiles([t for _s, t in ok]),
            "probes": len(probes),
            "probes_placed": len(placed),
            "probes_not_placed_after_drain": never,
            "submit_to_placed_s": {
                k.replace("_ms", "_s"): (None if v is None else round(v / 1000, 3)) for k, v in lat.items()
            },
            "admitted_by_admission": admitted,
            "final_state": checks,
            "rounds_during_load": [
                {k: r.get(k) for k in ("workloads", "placed", "round_s")} for r in rounds_load
            ],
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- main


def markdown(doc: Mapping[str, Any]) -> str:
    lines = [
        "| admission | submits/s | probes placed | submit→PLACED p50 / p90 / p99 / max "
        "| rounds in the load | withdrawn | over capacity |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in doc["results"].values():
        s = r["submit_to_placed_s"]
        lines.append(
            f"| {r['mode']} | {r['submit_per_s']:,.0f} | {r['probes_placed']} of {r['probes']} "
            f"| {s['p50_s']} / {s['p90_s']} / {s['p99_s']} / {s['max_s']} s "
            f"| {len(r['rounds_during_load'])} | {r['final_state']['admissions_withdrawn']} "
            f"| {r['final_state']['nodes_over_capacity']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--modes", default="on,off", help="admission modes to run (on, off)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    doc: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/admission.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": provenance.machine(grpcio=grpc.__version__, gpu=None, note="shared 2-core VM"),
        "git": provenance.git("server_or_solver_dirty", ("server", "solver")),
        "config": {**asdict(cfg), "quick": args.quick},
        "results": {},
    }
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        doc["results"][mode] = run_mode(cfg, mode)
        on = doc["results"].get("on")
        p99 = None if on is None else on["submit_to_placed_s"]["p99_s"]
        doc["target"] = {
            "submit_to_placed_p99_s": f"<= {TARGET_P99_S} at {cfg.rate:g}/s with {cfg.stored:,} stored",
            "met": on is not None
            and on["final_state"]["nodes_over_capacity"] == 0
            and on["final_state"]["tenants_over_quota"] == 0
            and p99 is not None
            and p99 <= TARGET_P99_S
            and on["probes_not_placed_after_drain"] == 0,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    sys.stdout.write(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
