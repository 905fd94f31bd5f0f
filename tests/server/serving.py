"""Real Apportion servers for the tests: in this process, or as a child process
(for SIGKILL tests), always on a free loopback port with a real SQLite file.

    with running_server(tmp_path) as srv:          # in-process ApportionServer
        stub = srv.stub()                           # AllocatorStub, token optional
    proc = ServerProcess(tmp_path / "state.db")     # `python -m server serve ...`
    proc.start(); ...; proc.kill(); proc.start()

Both plan with a short time limit and debounce, so tests settle quickly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import allocator_pb2_grpc
from server import convert
from server.app import ApportionServer, ServerConfig
from server.control import LoopConfig
from tests.server.conftest import INVENTORY_YAML, WORKLOADS_YAML

ROOT = Path(__file__).resolve().parents[2]
FAST_LOOP = LoopConfig(time_limit_s=2.0, debounce_s=0.05, max_delay_s=0.5)

ADMIN_TOKEN = "admin-token-0123456789abcdef"
RESEARCH_TOKEN = "research-token-0123456789abcdef"
PRODUCT_TOKEN = "product-token-0123456789abcdef"
NODE1_TOKEN = "node-1-token-0123456789abcdef"  # a worker's: node n1 only
NODE2_TOKEN = "node-2-token-0123456789abcdef"
TOKENS_YAML = f"""\
{ADMIN_TOKEN}: {{role: admin}}
{RESEARCH_TOKEN}: {{tenant: research}}
{PRODUCT_TOKEN}: {{tenant: product}}
{NODE1_TOKEN}: {{node: n1}}
{NODE2_TOKEN}: {{node: n2}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def inventory_request(text: str = INVENTORY_YAML) -> apb.UpsertNodesRequest:
    inv = convert.inventory_from_data(convert.parse_document(text))
    return apb.UpsertNodesRequest(gpu_types=inv.gpu_types, nodes=inv.nodes, tenants=inv.tenants)


def example_workloads(text: str = WORKLOADS_YAML) -> list[Any]:
    return list(convert.workloads_from_data(convert.parse_document(text)).workloads)


def metadata(token: str | None) -> list[tuple[str, str]] | None:
    return None if token is None else [("authorization", f"Bearer {token}")]


class Running:
    def __init__(self, server: ApportionServer) -> None:
        self.server = server
        self.address = server.address
        self._channels: list[grpc.Channel] = []

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address)
        self._channels.append(ch)
        return ch

    def stub(self) -> allocator_pb2_grpc.AllocatorStub:
        return allocator_pb2_grpc.AllocatorStub(self.channel())

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the control loop has planned every change so far."""
        assert self.server.loop.wait_settled(timeout), "the control loop did not settle"

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


@contextlib.contextmanager
def running_server(tmp_path: Path, **overrides: Any) -> Iterator[Running]:
    """An in-process server (``--insecure`` on loopback unless overridden)."""
    config = ServerConfig(
        listen="127.0.0.1:0",
        db=tmp_path / "state.db",
        insecure=True,
        loop=FAST_LOOP,
        solver_processes=1,
        threads=48,
    )
    config = replace(config, **overrides)
    server = ApportionServer(config)
    server.start()
    running = Running(server)
    try:
        yield running
    finally:
        running.close()
        server.stop(grace=0.5)


class ServerProcess:
    """``python -m server serve`` in a child process, on a fixed port so a restart keeps it."""

    def __init__(self, db: Path, *extra: str, port: int | None = None) -> None:
        self.db = db
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = db.with_suffix(".log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]))
        args = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--insecure",
            "--listen",
            self.address,
            "--db",
            str(self.db),
            "--plan-time-limit",
            "2",
            "--debounce",
            "0.05",
            "--solver-processes",
            "1",
            *self.extra,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        channel = grpc.insecure_channel(self.address)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self.kill()
            raise AssertionError(f"server did not start; log:\n{self.log.read_text()}") from None
        finally:
            channel.close()

    def kill(self) -> None:
        """SIGKILL: no clean-up at all."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reap_solvers()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reap_solvers()

    def _reap_solvers(self) -> None:
        """Solver processes of a killed server notice their parent is gone and exit; wait briefly."""
        time.sleep(0.1)
