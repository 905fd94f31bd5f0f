"""``apportion serve``: assemble and run the gRPC server.

One process holds: the SQLite store (``--db``), the control loop, a pool of
solver processes, the gRPC server (``grpc.aio`` on an event loop thread of its own,
so that an open stream holds no thread: see ``server.aio``; ``Allocator``; ``Inference``, the router
of ``server.inference``; ``Workers``, whose dispatcher
thread turns the plan into launches and watches the workers' liveness, see
``server.workers``; standard health checking, server reflection) and, with
``--metrics-port``, the Prometheus endpoint.

Start-up refuses an unsafe configuration (see ``server.auth.check_listen``):
without ``--insecure`` it needs TLS and a tokens file; ``--insecure`` allows
plain text and no tokens, and only on a loopback address. Stop (SIGTERM,
SIGINT, or :meth:`ApportionServer.stop`) reports NOT_SERVING, lets running
calls finish for ``grace`` seconds, stops the control loop and the solver
processes and closes the store. Nothing needs a clean stop to be safe: every
acknowledged write is already durable, and a restart plans again at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from apportion.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    workers_pb2,
    workers_pb2_grpc,
)
from server import audit, auth
from server.admission import Admission, AdmissionConfig
from server.aio import EventLoop, Registrar
from server.audit import AuditTrail
from server.checkpoints import CheckpointsServicer
from server.control import ControlLoop, LoopConfig, RoundResult
from server.gcpolicy import Collector
from server.inference import InferenceServicer, Router
from server.metrics import Metrics
from server.rpc import DEFAULT_STREAMS_PER_CALLER, Shared, StreamCap
from server.service import AllocatorServicer
from server.solving import SolverPool
from server.store import Store, WorkloadRow
from server.workers import Dispatcher, WorkersConfig

log = logging.getLogger("apportion.server")

SERVICE_NAME = "apportion.v1.Allocator"
WORKERS_SERVICE_NAME = "apportion.v1.Workers"
INFERENCE_SERVICE_NAME = "apportion.v1.Inference"
PLAN_HISTORY = 20  # plans kept in the store (the plan of 100,000 workloads is ~25 MB)
MAX_REPLY_BYTES = 256 * 1024 * 1024  # GetPlan of 100,000 workloads is tens of MiB
STREAM_IO_THREADS = 8  # the store reads and dispatcher calls of streams (none holds one while it waits)


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    db: Path = Path("apportion.db")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # given: mTLS, clients need a certificate it signed
    tokens: Path | None = None
    insecure: bool = False
    metrics_port: int | None = None
    loop: LoopConfig = field(default_factory=LoopConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    solver_processes: int = 2
    plan_processes: int = 1  # for Plan RPCs, apart from the control loop's
    threads: int = 32  # for unary calls and checkpoint transfers; a stream holds none (server.aio)
    max_streams_per_caller: int = DEFAULT_STREAMS_PER_CALLER  # open Watch and Logs streams
    max_message_mib: int = 16
    # requests/s per caller (one token; every anonymous caller shares one bucket): on by default
    rate_limit: float = auth.DEFAULT_RATE_PER_S
    rate_burst: int = int(2 * auth.DEFAULT_RATE_PER_S)
    workers: WorkersConfig = field(default_factory=WorkersConfig)


class ApportionServer:
    def __init__(self, config: ServerConfig) -> None:
        tls = config.tls_cert is not None or config.tls_key is not None
        if tls and (config.tls_cert is None or config.tls_key is None):
            raise auth.ConfigError("TLS needs both --tls-cert and --tls-key")
        if config.tls_client_ca is not None and not tls:
            raise auth.ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        auth.check_listen(config.listen, insecure=config.insecure, tls=tls, tokens=config.tokens is not None)
        self.config = config
        authenticator = auth.Authenticator.from_file(config.tokens)
        loose = None if config.tokens is None else auth.loose_permissions(config.tokens)
        if loose is not None:
            log.warning(f"the tokens file: {loose}", extra={"tokens": str(config.tokens)})
        credentials = (
            auth.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert is not None and config.tls_key is not None
            else None
        )
        self.metrics = Metrics()
        self.store = Store(config.db, plan_history=PLAN_HISTORY)
        try:
            self.audit = AuditTrail(audit.path_for(Path(config.db)))
            self.pool = SolverPool(config.solver_processes)
            self.plan_pool = SolverPool(config.plan_processes)
            self.loop = ControlLoop(self.store, self.pool, config.loop, on_plan=self._on_plan)
            self.shared = Shared(
                self.store,
                self.loop,
                self.plan_pool,
                authenticator,
                auth.RateLimiter(config.rate_limit, config.rate_burst),
                self.metrics,
                self.audit,
                StreamCap(config.max_streams_per_caller),
            )
            self.dispatcher = Dispatcher(self.shared, config.workers)
            self.admission = Admission(
                self.store, lambda: self.loop.latest, config.admission, on_admit=self._on_admit
            )
            self.loop.listeners.append(self.admission.wake)
            self.router = Router()
            self.events = EventLoop()
            self.rpc_pool = futures.ThreadPoolExecutor(config.threads, thread_name_prefix="apportion-rpc")
            self.events.loop.set_default_executor(  # what streams hand blocking reads and writes to
                futures.ThreadPoolExecutor(STREAM_IO_THREADS, thread_name_prefix="apportion-stream-io")
            )
            self.dispatcher.clock = self.events.clock  # a worker is lost for its silence, not ours
            self.grpc, self.health = self.events.run(self._build(credentials))
        except BaseException:
            for pool in (getattr(self, "pool", None), getattr(self, "plan_pool", None)):
                if pool is not None:
                    pool.close()
            if getattr(self, "events", None) is not None:
                self.events.close()
                self.rpc_pool.shutdown(wait=False)
            if getattr(self, "audit", None) is not None:
                self.audit.close()
            self.store.close()
            raise
        self._stopped = threading.Event()
        self._done = threading.Event()

    async def _build(
        self, credentials: grpc.ServerCredentials | None
    ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
        """The gRPC server with every servicer (on the event loop: grpc.aio binds to it)."""
        limit = self.config.max_message_mib * 1024 * 1024
        server = grpc.aio.server(
            migration_thread_pool=self.rpc_pool,  # runs the checkpoint transfers (blocking streams)
            options=[
                ("grpc.max_receive_message_length", limit),  # requests: bounded
                ("grpc.max_send_message_length", MAX_REPLY_BYTES),  # a big cluster's plan
                ("grpc.so_reuseport", 0),
            ],
        )
        registrar = Registrar(server, self.rpc_pool)
        allocator_pb2_grpc.add_AllocatorServicer_to_server(
            AllocatorServicer(self.shared, logs=self.dispatcher.log_buffer), registrar
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.shared, self.dispatcher, self.router), registrar
        )
        workers_pb2_grpc.add_WorkersServicer_to_server(  # WorkersServicer + checkpoints (next to the db)
            CheckpointsServicer.for_db(self.shared, self.dispatcher, self.config.db), registrar
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (
            allocator_pb2.DESCRIPTOR.services_by_name["Allocator"].full_name,
            workers_pb2.DESCRIPTOR.services_by_name["Workers"].full_name,
            inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        if credentials is not None:
            self.port = server.add_secure_port(self.config.listen, credentials)
        else:
            self.port = server.add_insecure_port(self.config.listen)
        return server, health_servicer

    async def _serving(self, status: Any) -> None:
        for name in ("", SERVICE_NAME, WORKERS_SERVICE_NAME, INFERENCE_SERVICE_NAME):
            await self.health.set(name, status)

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def _on_plan(self, result: RoundResult) -> None:
        self.metrics.observe_plan(
            result.status, gap=result.gap, objective=result.objective, solve_seconds=result.solve_time_s
        )
        self.metrics.set_workloads(self.store.counts_by_state())
        self.dispatcher.notify()
        self.admission.wake()  # capacity may have freed; the fresh workloads are fewer

    def _on_admit(self, rows: list[WorkloadRow]) -> None:
        self.metrics.observe_admitted(len(rows))
        self.dispatcher.notify()

    def start(self) -> None:
        self.metrics.set_workloads(self.store.counts_by_state())
        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.metrics_port)
        self.loop.start()
        self.admission.start()
        self.dispatcher.start()
        self.events.run(self.grpc.start())
        self.events.run(self._serving(health_pb2.HealthCheckResponse.SERVING))
        log.info(
            "serving",
            extra={
                "address": self.address,
                "db": str(self.config.db),
                "tls": self.config.tls_cert is not None,
                "mtls": self.config.tls_client_ca is not None,
                "auth": self.config.tokens is not None,
                "metrics_port": self.metrics.port,
                "revision": self.store.revision(),
            },
        )

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.events.run(self.health.enter_graceful_shutdown())
        self.shared.stopping = True
        self.plan_pool.close()  # a Plan solve in progress ends now, not after its time limit
        self.events.run(self.grpc.stop(grace))
        self.events.close()
        self.rpc_pool.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.stop()
        self.admission.stop()
        self.router.close()
        self.pool.close()  # before the loop's join: a round's solve is killed, not waited for
        self.loop.stop()
        self.metrics.stop()
        self.audit.close()
        self.store.close()
        log.info("stopped")
        self._done.set()

    def wait(self) -> None:
        """Block until :meth:`stop` has finished."""
        self._done.wait()

    def __enter__(self) -> ApportionServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT; the exit status."""
    server = ApportionServer(config)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal received; stopping", extra={"signal": signal.Signals(signum).name})
        threading.Thread(target=server.stop, name="apportion-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    collector = Collector()  # the process is the server's: its collection policy (server.gcpolicy)
    collector.start()
    server.wait()
    collector.stop()
    return 0
