"""The server's Prometheus metrics (``apportion serve --metrics-port P``).

Each :class:`Metrics` owns its own :class:`prometheus_client.CollectorRegistry`,
never the process-global one, so several servers in one process (the tests) do not
collide. The series, all prefixed ``apportion_``:

==================================  =========  ==============  ==========================================
series                              type       labels          meaning
==================================  =========  ==============  ==========================================
apportion_requests_total            counter    method, code    RPCs finished, by gRPC status code name
apportion_request_seconds           histogram  method          RPC latency (buckets 0.5 ms .. 10 s)
apportion_plan_gap                  gauge                      relative optimality gap of the latest plan
                                                               (NaN when no bound was proved)
apportion_plan_objective            gauge                      objective value of the latest plan
apportion_plan_solve_seconds        histogram                  solver time per plan (10 ms .. 120 s)
apportion_plans_total               counter    status          plans computed, by solver status
apportion_workloads                 gauge      state           workloads by state (``set_workloads``)
==================================  =========  ==============  ==========================================

:meth:`Metrics.serve` exposes them over HTTP (``GET /metrics``; loopback by default)
and :meth:`Metrics.render` returns the same text exposition, for tests.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "PLAN_BUCKETS", "REQUEST_BUCKETS", "Metrics"]

NAMESPACE = "apportion"

REQUEST_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""RPC latency buckets in seconds: 0.5 ms .. 10 s (above that: +Inf)."""

PLAN_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Solver time buckets in seconds: 10 ms .. 2 min."""


class Metrics:
    """The server's metrics on a registry of their own; see the module docstring."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_total = Counter(
            "requests",
            "RPCs finished, by method and gRPC status code",
            ["method", "code"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.request_seconds = Histogram(
            "request_seconds",
            "RPC latency in seconds",
            ["method"],
            namespace=NAMESPACE,
            registry=r,
            buckets=REQUEST_BUCKETS,
        )
        self.plan_gap = Gauge(
            "plan_gap",
            "Relative optimality gap of the latest plan (NaN: no bound proved)",
            namespace=NAMESPACE,
            registry=r,
        )
        self.plan_objective = Gauge(
            "plan_objective", "Objective value of the latest plan", namespace=NAMESPACE, registry=r
        )
        self.plan_solve_seconds = Histogram(
            "plan_solve_seconds",
            "Solver time per plan in seconds",
            namespace=NAMESPACE,
            registry=r,
            buckets=PLAN_BUCKETS,
        )
        self.plans_total = Counter(
            "plans", "Plans computed, by solver status", ["status"], namespace=NAMESPACE, registry=r
        )
        self.admitted_total = Counter(
            "admitted",
            "Workloads placed at once into free capacity, between plans",
            namespace=NAMESPACE,
            registry=r,
        )
        self.workloads = Gauge("workloads", "Workloads by state", ["state"], namespace=NAMESPACE, registry=r)
        self._states: set[str] = set()
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- recording ------------------------------------------------------------------------

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC: ``code`` is the status code's name (``OK``, ``NOT_FOUND``, ...)."""
        self.requests_total.labels(method=method, code=code).inc()
        self.request_seconds.labels(method=method).observe(seconds)

    def observe_plan(
        self, status: str, *, gap: float | None, objective: float | None, solve_seconds: float
    ) -> None:
        """One computed plan; ``gap`` None (no bound proved) is exported as NaN, ``objective``
        None (no plan found) leaves the last value."""
        self.plans_total.labels(status=status).inc()
        self.plan_solve_seconds.observe(solve_seconds)
        self.plan_gap.set(math.nan if gap is None else gap)
        if objective is not None:
            self.plan_objective.set(objective)

    def observe_admitted(self, n: int) -> None:
        self.admitted_total.inc(n)

    def set_workloads(self, counts: Mapping[str, int]) -> None:
        """Workloads by state; a state reported before but missing from ``counts`` drops to 0."""
        with self._lock:
            for state in self._states - counts.keys():
                self.workloads.labels(state=state).set(0)
            for state, n in counts.items():
                self.workloads.labels(state=state).set(n)
            self._states |= counts.keys()

    # --- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format (what ``GET /metrics`` answers)."""
        return generate_latest(self.registry)

    @property
    def port(self) -> int | None:
        """The port :meth:`serve` listens on, None when not serving."""
        return None if self._server is None else int(self._server.server_port)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on ``addr:port`` in a daemon thread; port 0 picks a
        free one. Returns the port. Raises OSError (naming the address) when it is taken."""
        if self._server is not None:
            raise RuntimeError(f"metrics are already served on port {self.port}")
        try:
            server, thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from exc
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        """Stop serving (no-op when not serving); the port is free again on return."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
