"""``make demo`` (``python -m server.demo``): the whole service on one machine, CPU only.

Starts ``apportion serve --insecure`` on a free loopback port with a temporary
SQLite file, two workers with simulated GPUs sharing one work directory (so the
checkpoints are shared), submits a ``train-lm`` training job split across both
workers (a gang of 4 GPUs, 2 + 2) and a ``serve-lm`` service that serves the
trained checkpoint (lower priority: it waits for the GPUs the training job
holds), shows the plan, the training progress, a few answers from
``Inference.Generate`` through the server's router, then stops everything
(workers, then the server, with SIGTERM) and removes the temporary directory.
Exit status 0 when all of that worked, 1 otherwise (with the tails of the logs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from apportion.client import ApportionError, Client
from apportion.v1 import allocator_pb2 as apb

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ID = "demo-train"
SERVE_ID = "demo-chat"
NODES = ("demo-w1", "demo-w2")
PROMPTS = ("the old fox ", "12 plus 7 is ", "every child ")
STEP_RE = re.compile(r"step (\d+)(?:/(\d+))?")

T = TypeVar("T")


class DemoError(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ApportionError):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class Proc:
    """A child process with its output in a log file; stopped with SIGTERM."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]))
        env.pop("APPORTION_TOKEN", None)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise DemoError(f"{self.name} exited with status {self.proc.returncode}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def workloads(steps: int, gpu_type: str) -> list[dict[str, Any]]:
    cpu = {"APPORTION_DEVICE": "cpu"}
    train: dict[str, Any] = {
        "id": TRAIN_ID,
        "priority": 10,
        "training": {"gpus": 4, "locality": "any", "throughput": {gpu_type: 4.0}, "remaining_work": steps},
        "runtime": {
            "builtin": "train-lm",
            "env": {**cpu, "APPORTION_CHECKPOINT_EVERY": "50", "APPORTION_PROGRESS_INTERVAL_S": "1"},
        },
    }
    serve: dict[str, Any] = {
        "id": SERVE_ID,
        "inference": {"gpus_per_replica": {gpu_type: 1}, "replica_rps": {gpu_type: 20}, "target_rps": 40},
        "runtime": {
            "builtin": "serve-lm",
            "env": {**cpu, "APPORTION_SERVE_FROM": TRAIN_ID, "APPORTION_PROGRESS_INTERVAL_S": "1"},
        },
    }
    return [train, serve]


def show_plan(address: str) -> None:
    from server import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["get-plan", "--server", address])
    say(out.getvalue().rstrip())


def bar(step: int, total: int, width: int = 30) -> str:
    done = min(width, width * step // total) if total else 0
    return "[" + "#" * done + "." * (width - done) + "]"


def follow_training(client: Client, procs: list[Proc], timeout: float, stream: IO[str]) -> apb.WorkloadStatus:
    """Poll the training job's status until it ends, one line per change (in place on a terminal)."""
    tty = stream.isatty()
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        for p in procs:
            p.check()
        status = client.get(TRAIN_ID)
        m = STEP_RE.search(status.message)
        progress = bar(int(m.group(1)), int(m.group(2) or 0)) + " " if m else ""
        first = status.message.splitlines()[0] if status.message else ""
        line = f"  {TRAIN_ID} {status.state:<9} {progress}{first}"
        if line != last:
            stream.write(("\r\x1b[K" if tty else "") + line + ("" if tty else "\n"))
            stream.flush()
            last = line
        if status.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            if tty:
                stream.write("\n")
            return status
        if time.monotonic() > deadline:
            raise DemoError(f"training did not finish within {timeout:g} s")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="apportion-demo-"))
    procs: list[Proc] = []
    client: Client | None = None
    ok = False
    started = time.monotonic()
    try:
        port = free_port()
        address = f"127.0.0.1:{port}"
        say(f"== the server: apportion serve --insecure on {address}, state in {tmp / 'state.db'}")
        argv = [
            sys.executable, "-m", "server", "serve", "--insecure", "--listen", address,
            "--db", str(tmp / "state.db"), "--log-format", "text", "--plan-time-limit", "2",
            "--debounce", "0.1", "--solver-processes", "1",
        ]  # fmt: skip
        server = Proc("the server", argv, tmp / "server.log")
        procs.append(server)
        client = Client(address, timeout=10.0)

        def serving() -> bool:
            server.check()
            return client is not None and client.health() == "SERVING"

        wait_for(serving, 30, "the server")

        work = tmp / "work"
        say(f"== two workers, {args.gpus} simulated {args.gpu_type} GPUs each, sharing {work}")
        for node in NODES:
            argv = [
                sys.executable, "-m", "server", "worker", "--server", address, "--node-id", node,
                "--gpus", str(args.gpus), "--gpu-type", args.gpu_type, "--gpu-memory-gib", "80",
                "--work-dir", str(work), "--stop-grace", "10",
            ]  # fmt: skip
            procs.append(Proc(f"worker {node}", argv, tmp / f"{node}.log"))

        def ready() -> bool:
            for p in procs:
                p.check()
            nodes = {n.id: n for n in client.nodes()[0]}
            return all(n in nodes and (nodes[n].state or "ready") == "ready" for n in NODES)

        wait_for(ready, 60, "the workers to register")

        say(f"== submit: {TRAIN_ID} (train-lm, 4 GPUs, {args.steps} steps) and {SERVE_ID} (serve-lm)")
        for w in workloads(args.steps, args.gpu_type):
            client.submit(w)
        wait_for(lambda: client.get(TRAIN_ID).state in ("PLACED", "RUNNING", "SUCCEEDED"), 30, "the plan")
        # admitted at once into free capacity (server/admission.py), it may be placed before a plan lists it
        wait_for(
            lambda: any(p.workload_id == TRAIN_ID for p in client.current_plan().plan.placements),
            30,
            "a plan",
        )
        say("== the plan (apportion get-plan)")
        show_plan(address)
        shards = sorted(client.get(TRAIN_ID).placement.shards, key=lambda s: s.node_id)
        say(f"   {TRAIN_ID} runs as one gang on {', '.join(f'{s.node_id} ({s.gpus} GPUs)' for s in shards)}")

        say("== training (GetWorkload, every 0.5 s)")
        done = follow_training(client, procs, args.timeout, sys.stdout)
        if done.state != "SUCCEEDED":
            raise DemoError(f"{TRAIN_ID} {done.state}: {done.message}")
        say(f"   {TRAIN_ID} SUCCEEDED: {done.message}")
        checkpoints = sorted(p.name for p in (work / "checkpoints" / TRAIN_ID).glob("ckpt-*.pt"))
        say(f"   checkpoints: {', '.join(checkpoints)}")

        say(f"== {SERVE_ID} gets the GPUs and serves the trained model")

        def service_running() -> apb.WorkloadStatus | None:
            status = client.get(SERVE_ID) if client is not None else None
            return status if status is not None and status.state == "RUNNING" else None

        serving_status = wait_for(service_running, 60, f"{SERVE_ID} to run")
        replicas = len(serving_status.placement.shards)
        wait_for(
            lambda: client.get(SERVE_ID).message.startswith(f"{replicas} replicas"),
            60,
            f"{replicas} replicas",
        )
        say(f"   {replicas} replicas, on {', '.join(s.node_id for s in serving_status.placement.shards)}")
        for prompt in PROMPTS:
            answer = wait_for(
                lambda p=prompt: client.generate(SERVE_ID, p, max_tokens=args.max_tokens, timeout=30),  # type: ignore[misc]
                60,
                "an answer",
                every=0.5,
            )
            say(f"   {prompt!r} -> {answer.text!r}  ({answer.replica}, {answer.tokens} tokens)")
        ok = True
    except (DemoError, ApportionError) as exc:
        say(f"demo failed: {exc}")
        for p in procs:
            say(f"--- {p.name} ({p.log.name}), last lines:\n{p.tail()}")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        say("== shutting down: workers, then the server (SIGTERM)")
        if client is not None:
            client.close()
        codes = [p.stop() for p in reversed(procs)]
        if any(c != 0 for c in codes):
            say(f"   exit statuses: {dict(zip([p.name for p in reversed(procs)], codes, strict=True))}")
        if args.keep:
            say(f"   kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"== {'done' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--gpus", type=int, default=2, help="simulated GPUs per worker (default 2)")
    parser.add_argument("--gpu-type", default="h100", help="GPU type of the workers (default h100)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (default 24)")
    parser.add_argument("--timeout", type=float, default=300.0, help="most seconds training may take")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
