"""Backends: pulp (CBC) and ortools (CP-SAT + GLOP) agree; unknown names fail;
``solve_mip`` / ``solve_lp`` on tiny LinearModels with known optima and duals."""

from __future__ import annotations

import functools

import pytest

from bench.instances import problem as bench_problem
from solver import POLICIES, PlanOptions, Problem, UnknownPolicyError, plan, verify
from solver.backends import BACKENDS, get_backend
from solver.linear import LinearModel, Sense, SolveStatus
from tests.builders import node, problem, serve, tenant, train

OPTIMIZING = tuple(n for n, p in POLICIES.items() if not p.heuristic)


def hetero() -> Problem:
    # Two jobs compete for one h100 node (see test_known_optimum.py): optimum 5/3.
    return problem(
        nodes=[node("h1", "h100", 4), node("a1", "a100", 4)],
        workloads=[
            train("fast", 4, {"a100": 1.0, "h100": 3.0}),
            train("mild", 4, {"a100": 1.0, "h100": 1.5}),
        ],
    )


def mixed() -> Problem:
    # Priorities, a quota, an elastic job, a gang and a spread service on 5 nodes.
    return problem(
        nodes=[
            node("a1", "a100", 4, zone="z1", domain="r1"),
            node("a2", "a100", 4, zone="z1", domain="r1"),
            node("a3", "a100", 8, zone="z2", domain="r2"),
            node("h1", "h100", 4, zone="z1", domain="r1"),
            node("h2", "h100", 4, zone="z2", domain="r2"),
        ],
        tenants=[tenant("team", 10, per_type={"h100": 4})],
        workloads=[
            train("gang", 8, {"a100": 2.0, "h100": 4.0}, types=(), locality="domain", tenant="team"),
            train("elastic", shapes={2: {"a100": 1.0, "h100": 2.0}, 4: {"a100": 1.6, "h100": 3.0}}),
            train("hi", 4, {"a100": 1.0, "h100": 1.2}, priority=1),
            train("small", 2, {"a100": 1.0}, tenant="team", weight=2.0),
            serve("svc", {"a100": 2, "h100": 1}, {"a100": 8.0, "h100": 10.0}, 30.0, types=(), min_replicas=2,
                  spread="zone"),
        ],
    )  # fmt: skip


@functools.cache
def instances() -> dict[str, Problem]:
    return {
        "hetero": hetero(),
        "mixed": mixed(),
        "bench-12x6": bench_problem(12, 6, seed=1),
        "bench-20x8": bench_problem(20, 8, seed=3),
    }


@pytest.mark.parametrize("policy", OPTIMIZING)
@pytest.mark.parametrize("name", ["hetero", "mixed", "bench-12x6", "bench-20x8"])
def test_the_backends_agree(name: str, policy: str) -> None:
    p = instances()[name]
    results = {b: plan(p, policy, PlanOptions(time_limit_s=5, backend=b)) for b in BACKENDS}
    for r in results.values():
        assert verify(p, r, policy).ok
        assert r.best_bound is not None and r.best_bound >= r.objective - 1e-6
    first = results[BACKENDS[0]].objective
    for r in results.values():
        assert r.objective == pytest.approx(first, rel=1e-6, abs=1e-6), {
            k: (r.objective, r.status) for k, r in results.items()
        }


def test_unknown_backend_is_an_unknown_policy_error() -> None:
    with pytest.raises(UnknownPolicyError, match="gurobi"):
        plan(hetero(), "throughput", PlanOptions(backend="gurobi"))
    with pytest.raises(UnknownPolicyError):
        get_backend("")
    with pytest.raises(KeyError):  # UnknownPolicyError is also a KeyError
        get_backend("cplex")


def test_unknown_policy_is_an_unknown_policy_error() -> None:
    with pytest.raises(UnknownPolicyError, match="max-profit"):
        plan(hetero(), "max-profit")


# ---------------------------------------------------------------------------
# LinearModel level.
#
#   maximize 3x + 2y   subject to   (c1) x + y <= 4,   (c2) 2x + y <= 6,   x, y in [0, 10]
#
# Vertices: (0, 4) -> 8, (2, 2) -> 10, (3, 0) -> 9. Optimum (2, 2) = 10, integral, so
# the MIP and the LP agree. Both rows bind; duals from c^T = u^T A:
#   x: u1 + 2 u2 = 3,  y: u1 + u2 = 2  ->  u1 = 1, u2 = 1.


def two_rows() -> LinearModel:
    m = LinearModel()
    x, y = m.int_var(0, 10, "x"), m.int_var(0, 10, "y")
    m.add([(x, 1.0), (y, 1.0)], Sense.LE, 4, "c1")
    m.add([(x, 2.0), (y, 1.0)], Sense.LE, 6, "c2")
    m.maximize([(x, 3.0), (y, 2.0)])
    return m


def solve_mip(backend: str, m: LinearModel, hint: tuple[float, ...] | None = None):  # type: ignore[no-untyped-def]
    return get_backend(backend).solve_mip(
        m, hint=hint, time_limit_s=5, seed=0, relative_gap=1e-6, num_workers=1
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_mip_finds_the_known_optimum(backend: str) -> None:
    sol = solve_mip(backend, two_rows(), hint=(3.0, 0.0))
    assert sol.status is SolveStatus.OPTIMAL
    assert sol.values == pytest.approx((2.0, 2.0))
    assert sol.objective == pytest.approx(10.0)
    assert sol.bound == pytest.approx(10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lp_returns_the_optimum_and_the_duals(backend: str) -> None:
    sol = get_backend(backend).solve_lp(two_rows(), time_limit_s=5)
    assert sol.status is SolveStatus.OPTIMAL
    assert sol.values == pytest.approx((2.0, 2.0))
    assert sol.objective == pytest.approx(10.0)
    assert sol.duals["c1"] == pytest.approx(1.0)
    assert sol.duals["c2"] == pytest.approx(1.0)


# maximize x + y + 1 subject to (c) 2x + 2y <= 5, x, y integers in [0, 3]:
# LP: x + y = 2.5 -> 3.5, dual of c = 1/2. MIP: x + y = 2 -> 3.


def fractional() -> LinearModel:
    m = LinearModel()
    x, y = m.int_var(0, 3, "x"), m.int_var(0, 3, "y")
    m.add([(x, 2.0), (y, 2.0)], Sense.LE, 5, "c")
    m.maximize([(x, 1.0), (y, 1.0)], constant=1.0)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_lp_relaxation_bounds_the_integer_optimum(backend: str) -> None:
    lp = get_backend(backend).solve_lp(fractional(), time_limit_s=5)
    assert lp.objective == pytest.approx(3.5)
    assert lp.duals["c"] == pytest.approx(0.5)
    mip = solve_mip(backend, fractional())
    assert mip.status is SolveStatus.OPTIMAL
    assert mip.objective == pytest.approx(3.0)
    assert sum(mip.values) == pytest.approx(2.0)
    assert 3.0 - 1e-6 <= mip.bound <= 3.5 + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_variables_and_equalities(backend: str) -> None:
    # maximize z subject to z + x = 2.5, x integer in [1, 3], z in [0, 10]: x = 1, z = 1.5.
    m = LinearModel()
    x = m.int_var(1, 3, "x")
    z = m.num_var(0, 10, "z")
    m.add([(z, 1.0), (x, 1.0)], Sense.EQ, 2.5, "eq")
    m.maximize([(z, 1.0)])
    sol = solve_mip(backend, m)
    assert sol.status is SolveStatus.OPTIMAL
    assert sol.values == pytest.approx((1.0, 1.5))
    assert sol.objective == pytest.approx(1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infeasible_model_is_a_status(backend: str) -> None:
    m = LinearModel()
    x = m.int_var(0, 5, "x")
    m.add([(x, 1.0)], Sense.GE, 3, "low")
    m.add([(x, 1.0)], Sense.LE, 2, "high")
    m.maximize([(x, 1.0)])
    assert solve_mip(backend, m).status is SolveStatus.INFEASIBLE
    assert get_backend(backend).solve_lp(m, time_limit_s=5).status is SolveStatus.INFEASIBLE


@pytest.mark.parametrize(
    "backend",
    [
        # Regression: when CP-SAT's presolve fixes every variable and the objective
        # has a fractional coefficient, CP-SAT reports OPTIMAL with its trivial bound
        # (1.5 here); the backend now clamps an OPTIMAL bound to the gap limits.
        "ortools",
        "pulp",
        "highs",
    ],
)
def test_optimal_status_comes_with_a_tight_bound(backend: str) -> None:
    # maximize 1.5 x subject to 2x <= 1, x integer in [0, 1]: x = 0, optimum 0.
    m = LinearModel()
    x = m.int_var(0, 1, "x")
    m.add([(x, 2.0)], Sense.LE, 1, "c")
    m.maximize([(x, 1.5)])
    sol = solve_mip(backend, m)
    assert sol.status is SolveStatus.OPTIMAL
    assert sol.objective == pytest.approx(0.0)
    assert sol.bound == pytest.approx(0.0, abs=1e-6)


# Regression: the pulp backend used APIs deprecated in PuLP 3.3 and gone in 4
# (LpVariable(name, ...), prob.constraints as a dict, PULP_CBC_CMD).
def test_pulp_backend_uses_no_deprecated_api() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        get_backend("pulp").solve_lp(two_rows(), time_limit_s=5)
