"""Running the solver beside the server, in worker processes.

The server's threads answer RPCs while plans are solved, and a solve holds
the GIL for much of its time (model building, rounding, repair), so solves run
in separate processes: the server keeps answering ``SubmitWorkload`` in
milliseconds while the control loop plans thousands of workloads. Problems and
plans are plain frozen dataclasses and cross the process boundary by pickling,
which costs milliseconds even at thousands of workloads (``Plan`` RPC overhead is
measured by ``bench/server_load.py``).

A :class:`SolverPool` keeps ``processes`` processes, each serving one call at a
time over a pipe. Processes are started with ``spawn`` (forking a process that runs
gRPC threads is unsafe) and warmed at start, so the first solve does not pay for
importing OR-Tools. What this module guarantees from outside the solver:

- **a deadline**: a call that has not answered within its ``deadline_s`` (the
  plan's time limit plus a grace) has its process killed (SIGKILL) and replaced, and
  raises :class:`SolverTimeout` (an input once kept a solver at 100% CPU for 125 s
  past its 2 s limit);
- **cancellation**: a call whose ``cancelled()`` turns true (the RPC's client went
  away) has its process killed and replaced, and raises :class:`SolverCancelled`;
- **crashes**: a process that dies (killed, out of memory) is replaced and the call
  raises :class:`SolverCrashed`; the caller decides whether to retry;
- **shutdown**: :meth:`SolverPool.close` kills every process, and a pool that is
  closed starts no new one (a round retried after shutdown once kept a solver at
  100% for 400 s after the server said "stopped").

The server keeps two pools (``server.app``): the control loop's, and a separate one
for ``Plan`` calls, so what a caller asks of ``Plan`` never delays planning.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import solver
from solver import Plan, PlanOptions, Problem

T = TypeVar("T")

POLL_S = 0.1  # how often a waiting call checks its deadline and cancellation


class SolverCrashed(RuntimeError):
    """The process solving a problem died (or the pool is closed)."""


class SolverTimeout(SolverCrashed):
    """The solve overran its deadline: its process was killed."""


class SolverCancelled(SolverCrashed):
    """The caller went away: the solve's process was killed."""


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


def _serve(conn: Connection, parent: int) -> None:
    """A solver process: answer ``(fn, args)`` with ``(True, result)`` or ``(False, exc)``."""
    _watch_parent(parent)
    import solver.backends.ortools_backend  # noqa: F401  (the heavy import, done once per process)

    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, fn(*args)))
        except BaseException as exc:  # the caller re-raises it
            conn.send((False, exc))


def _solve(problem: Problem, policy: str, options: PlanOptions) -> Solved:
    start = time.perf_counter()
    plan = solver.plan(problem, policy=policy, options=options)
    return Solved(plan=plan, solve_time_s=time.perf_counter() - start)


class _Process:
    """One solver process and the pipe to it."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, os.getpid()), daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class SolverPool:
    """``processes`` solver processes; ``call`` blocks its calling thread only."""

    def __init__(self, processes: int = 2) -> None:
        if processes < 1:
            raise ValueError("processes must be ≥ 1")
        self._lock = threading.Condition()
        self._idle: list[_Process] = [_Process() for _ in range(processes)]
        self._busy: set[_Process] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (calls fail fast since)."""
        return self._closed

    def solve(
        self,
        problem: Problem,
        policy: str,
        options: PlanOptions,
        *,
        deadline_s: float | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Solved:
        """Solve in a solver process (without ``options.progress``: a callback cannot
        cross the process boundary), killed past ``deadline_s`` or once ``cancelled()``.

        Raises:
            ValidationError, UnknownPolicyError, SolverError: as ``solver.plan``.
            SolverCrashed, SolverTimeout, SolverCancelled: see the module docstring.
        """
        opts = dataclasses.replace(options, progress=None)
        return self.call(_solve, problem, policy, opts, deadline_s=deadline_s, cancelled=cancelled)

    def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        deadline_s: float | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> T:
        """Run ``fn(*args)`` (a module-level function; arguments and result pickled) in a
        solver process; see :meth:`solve` for ``deadline_s`` and ``cancelled``.

        Raises:
            what ``fn`` raises; SolverCrashed and its kinds (the process is replaced).
        """
        proc = self._take()
        end = None if deadline_s is None else time.monotonic() + deadline_s
        try:
            proc.conn.send((fn, args))
            while not proc.conn.poll(POLL_S):
                if not proc.process.is_alive():
                    raise SolverCrashed("the solver process died; the plan was not computed")
                if cancelled():
                    raise SolverCancelled("the caller went away: the solve was stopped")
                if end is not None and time.monotonic() > end:
                    raise SolverTimeout(f"the solve overran its deadline of {deadline_s:g} s and was stopped")
                if self._closed:
                    raise SolverCrashed("the server is stopping: the solve was stopped")
            ok, value = proc.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as exc:
            self._replace(proc)
            raise SolverCrashed("the solver process died; the plan was not computed") from exc
        except SolverCrashed:
            self._replace(proc)
            raise
        self._give(proc)
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def _take(self) -> _Process:
        with self._lock:
            while not self._idle and not self._closed:
                self._lock.wait()
            if self._closed:
                raise SolverCrashed("the server is stopping: no solve is started")
            proc = self._idle.pop()
            self._busy.add(proc)
            return proc

    def _give(self, proc: _Process) -> None:
        with self._lock:
            self._busy.discard(proc)
            if self._closed:
                proc.kill()
            else:
                self._idle.append(proc)
            self._lock.notify()

    def _replace(self, proc: _Process) -> None:
        proc.kill()
        with self._lock:
            self._busy.discard(proc)
            if not self._closed:
                self._idle.append(_Process())
            self._lock.notify()

    def close(self) -> None:
        """Kill every solver process now, abandoning solves in progress; start no other."""
        with self._lock:
            self._closed = True
            procs = [*self._idle, *self._busy]
            self._idle.clear()
            self._lock.notify_all()
        for proc in procs:
            if proc.process.is_alive():
                proc.process.kill()
        for proc in procs:
            proc.process.join(timeout=5)
