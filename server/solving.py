"""Running the solver beside the server, in worker processes.

The server's threads answer RPCs while plans are solved, and a solve holds
the GIL for much of its time (model building, rounding, repair), so solves run
in a small pool of separate processes: the server keeps answering
``SubmitWorkload`` in milliseconds while the control loop plans thousands of
workloads. Problems and plans are plain frozen dataclasses and cross the
process boundary by pickling, which costs milliseconds even at thousands of
workloads (``Plan`` RPC overhead is measured by ``bench/server_load.py``).

Processes are started with ``spawn`` (forking a process that runs gRPC threads
is unsafe) and warmed at start, so the first solve does not pay for importing
OR-Tools. A process that dies (killed, out of memory) is replaced and the solve
fails with :class:`SolverCrashed`; the caller decides whether to retry.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

import solver
from solver import Plan, PlanOptions, Problem

T = TypeVar("T")


class SolverCrashed(RuntimeError):
    """The process solving a problem died."""


@dataclass(frozen=True)
class Solved:
    plan: Plan
    solve_time_s: float  # wall time inside the solver process


def _watch_parent(parent: int) -> None:
    """In a solver process: exit as soon as the server that started it is gone
    (killed with SIGKILL, say), so no solver outlives its server."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="apportion-parent-watch", daemon=True).start()


def _warm() -> bool:
    import solver.backends.ortools_backend  # noqa: F401  (the heavy import, done once per process)

    return True


def _solve(problem: Problem, policy: str, options: PlanOptions) -> Solved:
    start = time.perf_counter()
    plan = solver.plan(problem, policy=policy, options=options)
    return Solved(plan=plan, solve_time_s=time.perf_counter() - start)


class SolverPool:
    """``processes`` solver processes; ``solve`` blocks its calling thread only."""

    def __init__(self, processes: int = 2) -> None:
        if processes < 1:
            raise ValueError("processes must be ≥ 1")
        self._processes = processes
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            self._processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_watch_parent,
            initargs=(os.getpid(),),
        )
        for _ in range(self._processes):
            pool.submit(_warm)
        return pool

    def solve(self, problem: Problem, policy: str, options: PlanOptions) -> Solved:
        """Solve in a worker process (without ``options.progress``: a callback cannot
        cross the process boundary).

        Raises:
            ValidationError, UnknownPolicyError, SolverError: as ``solver.plan``.
            SolverCrashed: the process died; the pool is replaced.
        """
        return self.call(_solve, problem, policy, dataclasses.replace(options, progress=None))

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (a module-level function; arguments and result pickled)
        in a worker process.

        Raises:
            what ``fn`` raises; SolverCrashed: the process died (the pool is replaced).
        """
        with self._lock:
            pool = self._pool
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as exc:
            with self._lock:
                if self._pool is pool:
                    self._pool = self._new_pool()
            raise SolverCrashed("the solver process died; the plan was not computed") from exc

    def close(self) -> None:
        """Stop every solver process now, abandoning solves in progress."""
        with self._lock:
            pool = self._pool
        # ProcessPoolExecutor has no public way to stop a running task; without
        # this a server stopping mid-solve would leave its solver running on.
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)
