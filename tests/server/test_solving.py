"""``server.solving.SolverPool``: the solver's limits enforced from outside its
processes (hardening: a hostile Plan kept a solver at 100% for 125 s past its limit,
and a server said "stopped" while its solver ran on for 400 s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.solving import SolverCancelled, SolverCrashed, SolverPool, SolverTimeout
from tests.server import pool_tasks


@pytest.fixture
def pool() -> Iterator[SolverPool]:
    p = SolverPool(1)
    yield p
    p.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_call_past_its_deadline_is_killed_and_its_process_replaced(pool: SolverPool) -> None:
    first = pool.call(pool_tasks.pid)
    start = time.monotonic()
    with pytest.raises(SolverTimeout, match=r"deadline of 0\.5 s"):
        pool.call(pool_tasks.spin, 60.0, deadline_s=0.5)
    assert time.monotonic() - start < 5
    assert not alive(first)
    assert pool.call(pool_tasks.pid) != first  # a fresh process answers the next call


def test_a_cancelled_call_is_killed(pool: SolverPool) -> None:
    first = pool.call(pool_tasks.pid)
    gone = threading.Event()
    threading.Timer(0.3, gone.set).start()
    with pytest.raises(SolverCancelled):
        pool.call(pool_tasks.spin, 60.0, cancelled=gone.is_set)
    assert not alive(first)


def test_errors_pass_and_a_dead_process_is_replaced(pool: SolverPool) -> None:
    with pytest.raises(ValueError, match="as asked"):
        pool.call(pool_tasks.fail)
    with pytest.raises(SolverCrashed):
        pool.call(pool_tasks.die)
    assert pool.call(pool_tasks.pid) > 0


def test_close_kills_a_running_solve_and_starts_nothing_after(pool: SolverPool) -> None:
    busy = pool.call(pool_tasks.pid)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pool.call(pool_tasks.spin, 60.0)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    start = time.monotonic()
    pool.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - start < 6
    assert errors and isinstance(errors[0], SolverCrashed)
    assert not alive(busy)
    with pytest.raises(SolverCrashed, match="stopping"):
        pool.call(pool_tasks.pid)


def _hard_plan() -> Any:
    from apportion.v1 import allocator_pb2 as apb
    from bench import instances
    from server import convert

    inv, wl = convert.problem_to_messages(instances.problem(1000, 200, seed=5))
    request = apb.PlanRequest(inventory=inv, workloads=wl.workloads, policy="cost")
    request.options.time_limit_s = 30
    request.options.relative_gap = 0
    return request


def test_plan_calls_are_one_at_a_time_per_caller_and_a_caller_who_leaves_stops_its_solve(
    tmp_path: Path,
) -> None:
    import grpc

    from tests.server.serving import running_server

    with running_server(tmp_path) as srv:
        stub = srv.stub()
        plan_pool = srv.server.plan_pool
        before = plan_pool._idle[0].process.pid
        running = stub.Plan.future(_hard_plan(), timeout=60)
        time.sleep(1.0)  # solving now
        with pytest.raises(grpc.RpcError) as second:
            stub.Plan(_hard_plan(), timeout=60)
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "one at a time" in str(second.value.details())
        running.cancel()  # the caller goes away
        deadline = time.monotonic() + 10
        while alive(before):
            assert time.monotonic() < deadline, "the solve went on after its caller left"
            time.sleep(0.1)
        # the control loop's processes were never involved, and the Plan pool serves again
        assert srv.server.pool is not plan_pool
        while not plan_pool._idle:
            assert time.monotonic() < deadline + 10
            time.sleep(0.1)
