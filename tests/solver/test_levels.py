"""``solver.levels``: the type-level bound and plan for ``fairness``, and the
search that makes room for a service at the minimum (``solver.exchange``)."""

from __future__ import annotations

import math

import pytest

from solver import PlanOptions, plan
from solver.aggregate import build_index
from solver.backends import get_backend
from solver.exchange import raise_minimum
from solver.levels import job_floors, level_plan, type_level_model
from solver.model import Placement, Plan, PlanStatus, Problem, Shard, Unplaced
from solver.policies.fairness import FairnessPolicy
from solver.search import level_bound
from solver.verify import objective, verify
from tests.builders import gpu_type, node, problem, serve, train

# Four 1-GPU nodes: k1, k2 (k80), v1, v2 (v100). Jobs of 1 GPU, weight 1, one tier:
#   a: v100 1.0, k80 0.5  -> rho 1 and 0.5
#   b: v100 1.0, k80 0.25 -> rho 1 and 0.25
#   c: v100 1.0, k80 0.45 -> rho 1 and 0.45
#   d: v100 1.0, k80 0.1  -> rho 1 and 0.1
# All four run (coverage 4): two on the k80s. The best minimum puts a and c there:
# min(0.5, 0.45) = 0.45. Above 0.45 only a can use a k80, so the other three need
# the two v100s: the type-level LP with coverage 4 is infeasible for tau > 0.45.


def _four() -> Problem:
    k80 = {"a": 0.5, "b": 0.25, "c": 0.45, "d": 0.1}
    return problem(
        nodes=[node("k1", "k80", 1), node("k2", "k80", 1), node("v1", "v100", 1), node("v2", "v100", 1)],
        workloads=[train(j, 1, {"v100": 1.0, "k80": r}, types=("v100", "k80")) for j, r in k80.items()],
        gpu_types=[gpu_type("k80", 12.0, 0.45), gpu_type("v100", 16.0, 2.48)],
    )


def test_type_level_bisection_proves_the_best_minimum() -> None:
    p = _four()
    index = build_index(p)
    lp, holds = type_level_model(index, {0: 4.0 - 1e-5})
    # below(tau): the largest minimum a plan can have below tau (an option's rho/w).
    values = sorted({0.0, 0.1, 0.25, 0.45, 0.5, 1.0})

    def below(tau: float) -> float:
        return max(v for v in values if v < tau)

    bound, _ = level_bound(lp, get_backend("ortools"), holds, below, 0.0, frozenset(), 0.1, 1.0, math.inf)
    assert bound == pytest.approx(0.45)
    # The pipeline reports it (and reaches it).
    r = plan(p, "fairness", PlanOptions(time_limit_s=5))
    assert r.objective == pytest.approx(0.45)
    assert r.best_bound is not None and r.best_bound == pytest.approx(0.45, abs=1e-4)


def test_type_level_model_is_feasible_at_every_level_a_plan_reaches() -> None:
    # Without the coverage floor nothing is infeasible: the bisection proves nothing.
    p = _four()
    lp, holds = type_level_model(build_index(p), {})
    bound, _ = level_bound(
        lp, get_backend("ortools"), holds, lambda tau: tau, 0.0, frozenset(), 0.1, 1.0, math.inf
    )
    assert bound is None


def test_level_plan_raises_the_minimum_and_keeps_every_job() -> None:
    p = _four()
    index = build_index(p)
    # d and b on the k80s: minimum 0.1.
    bad = {
        "a": Placement("a", (Shard("v1", 1),), "v100"),
        "b": Placement("b", (Shard("k1", 1),), "k80"),
        "c": Placement("c", (Shard("v2", 1),), "v100"),
        "d": Placement("d", (Shard("k2", 1),), "k80"),
    }
    assert objective(p, list(bad.values()), "fairness") == pytest.approx(0.1)
    out = level_plan(index, bad, {0: 4.0 - 1e-5}, 1000, get_backend("ortools"), math.inf)
    assert out is not None and set(out) == {"a", "b", "c", "d"}
    assert objective(p, list(out.values()), "fairness") == pytest.approx(0.45)
    assert {out["a"].gpu_type, out["c"].gpu_type} == {"k80"}
    # A floor that no plan keeps: nothing.
    assert level_plan(index, bad, {0: 5.0}, 1000, get_backend("ortools"), math.inf) is None
    # Out of time: nothing.
    assert level_plan(index, bad, {0: 4.0 - 1e-5}, 1000, get_backend("ortools"), 0.0) is None


def test_raise_minimum_makes_room_for_a_service_at_the_minimum() -> None:
    # h1: 2 x h100; a1: 1 x a100. s: 1-GPU h100 replicas of 10 req/s for 20 req/s,
    # runs 1 (f = 0.5, the minimum). j: 1 GPU, h100 rho 1, a100 rho 0.8, runs on h1
    # beside s. No free GPU on h100: s gets its second replica only if j moves to
    # the a100 (0.8 > 0.5): then the minimum is 0.8.
    p = problem(
        nodes=[node("h1", "h100", 2), node("a1", "a100", 1)],
        workloads=[
            serve("s", 1, 10.0, 20.0, types=("h100",)),
            train("j", 1, {"h100": 1.0, "a100": 0.8}, types=("h100", "a100")),
        ],
    )
    placed = {
        "s": Placement("s", (Shard("h1", 1),), "h100"),
        "j": Placement("j", (Shard("h1", 1),), "h100"),
    }
    assert objective(p, list(placed.values()), "fairness") == pytest.approx(0.5)
    out = raise_minimum(build_index(p), placed, math.inf)
    assert len(out["s"].shards) == 2
    assert out["j"].gpu_type == "a100"
    assert objective(p, list(out.values()), "fairness") == pytest.approx(0.8)
    # If j had nowhere else to go above the minimum, nothing would change.
    p2 = problem(
        nodes=[node("h1", "h100", 2), node("a1", "a100", 1)],
        workloads=[
            serve("s", 1, 10.0, 20.0, types=("h100",)),
            train("j", 1, {"h100": 1.0, "a100": 0.4}, types=("h100", "a100")),
        ],
    )
    assert raise_minimum(build_index(p2), placed, math.inf) == placed


def test_the_fairness_policy_levels_match_the_type_level_holds() -> None:
    # Every training option value the policy's bisection knows is one the type-level
    # model holds (so below(tau) from the policy applies to both).
    p = _four()
    index = build_index(p)
    from solver.formulation import build_formulation

    form = build_formulation(index)
    FairnessPolicy().stages(form, PlanOptions())
    levels = FairnessPolicy().levels(form)
    assert levels is not None
    _lp, holds = type_level_model(index, {})
    assert {round(v, 9) for v, _ in holds} <= {round(v, 9) for v, _ in levels.holds}


def test_raise_minimum_takes_a_replica_from_a_service_that_can_spare_it() -> None:
    # h1: 3 x h100, full. s: 1-GPU replicas of 10 req/s for 20 req/s, runs 1 (f/w
    # = 0.5, the minimum). d: the same replicas for 20 req/s, weight 0.5, runs 2 (f/w
    # = 2). One replica of d to s: d loses w*f = 0.5 * 0.5 = 0.25 of coverage, s gains
    # 1 * 0.5, and d stays at 1 > 0.5; the minimum becomes 1.
    def case(d_weight: float) -> tuple[Problem, dict[str, Placement]]:
        p = problem(
            nodes=[node("h1", "h100", 3)],
            workloads=[
                serve("s", 1, 10.0, 20.0, types=("h100",)),
                serve("d", 1, 10.0, 20.0, types=("h100",), weight=d_weight),
            ],
        )
        return p, {
            "s": Placement("s", (Shard("h1", 1),), "h100"),
            "d": Placement("d", (Shard("h1", 1), Shard("h1", 1)), "h100"),
        }

    p, placed = case(0.5)
    out = raise_minimum(build_index(p), placed, math.inf)
    assert (len(out["s"].shards), len(out["d"].shards)) == (2, 1)
    assert objective(p, list(out.values()), "fairness") == pytest.approx(1.0)
    # With d of weight 2 the coverage would drop (2 * 0.5 > 0.5): nothing changes.
    p, placed = case(2.0)
    assert raise_minimum(build_index(p), placed, math.inf) == placed


def test_a_polished_plan_that_fails_verification_falls_back() -> None:
    # _finish with a plan that breaks a rule (two 1-GPU jobs on a 1-GPU node) and a
    # valid fallback returns the fallback, marked FEASIBLE; without one it raises.
    from solver.errors import SolverError
    from solver.model import PlanOptions as Options
    from solver.pipeline import _finish, _Timer

    p = _four()
    index = build_index(p)
    broken = {
        "a": Placement("a", (Shard("k1", 1),), "k80"),
        "b": Placement("b", (Shard("k1", 1),), "k80"),
    }
    good = {"a": Placement("a", (Shard("k1", 1),), "k80")}
    options = Options(time_limit_s=5)
    r = _finish(
        index, "fairness", "fairness", broken, None, {}, _Timer(options), options, None, fallback=good
    )
    assert [x.workload_id for x in r.placements] == ["a"]
    assert r.status.value == "FEASIBLE"
    with pytest.raises(SolverError):
        _finish(index, "fairness", "fairness", broken, None, {}, _Timer(options), options, None)


def test_a_donor_service_keeps_its_spread_rule() -> None:
    # Zones z1 (h1, h3) and z2 (h2), 2-GPU h100 nodes. d: 1-GPU replicas spread over
    # the zones, runs 3 (h1 x 2, h2 x 1: at most 2 per zone). s: 2-GPU replicas, runs
    # 1 on h3 (f/w = 0.5, the minimum). s's second replica fits only where d gives up
    # its h2 replica (h2's free GPU + that one), but d's 2 replicas left would both be
    # in z1 (at most 1 per zone for 2): not allowed, so nothing changes.
    p = problem(
        nodes=[
            node("h1", "h100", 2, zone="z1"),
            node("h2", "h100", 2, zone="z2"),
            node("h3", "h100", 2, zone="z1"),
        ],
        workloads=[
            serve("s", 2, 10.0, 20.0, types=("h100",)),
            serve("d", 1, 10.0, 30.0, types=("h100",), spread="zone"),
        ],
    )
    placed = {
        "s": Placement("s", (Shard("h3", 2),), "h100"),
        "d": Placement("d", (Shard("h1", 1), Shard("h1", 1), Shard("h2", 1)), "h100"),
    }
    out = raise_minimum(build_index(p), placed, math.inf)
    assert out == placed


# Strict priority inside the max-min. Nodes k1 (k80), v1 (v100), 1 GPU each; a1
# (a100, 2 GPUs) for the service. Priority 1: job hi (v100 1.0, k80 0.1) and
# service s (weight 2, 10 req/s per replica, target 20: f = 1 with 2 replicas).
# Priority 0: job lo (v100 1.0, k80 0.2). The floors: priority 1 covers 2
# (hi + 2 * 0.5, say, as a coverage stage cut short left it), priority 0 covers 1.
# With s at f = 1 the tier's floor holds without hi, and then lo has the v100:
# minimum min(1.0, f/w = 0.5) = 0.5 -- but hi is left out while lo holds v1,
# where hi fits: the verifier's strict-priority rule rejects it. With hi kept
# (its job floor), the best minimum is hi on v1 and lo on k1: 0.2.


def _traded() -> Problem:
    return problem(
        nodes=[node("k1", "k80", 1), node("v1", "v100", 1), node("a1", "a100", 2)],
        workloads=[
            train("hi", 1, {"v100": 1.0, "k80": 0.1}, types=("v100", "k80"), priority=1),
            train("lo", 1, {"v100": 1.0, "k80": 0.2}, types=("v100", "k80")),
            serve("s", 1, 10.0, 20.0, types=("a100",), priority=1, weight=2.0),
        ],
        gpu_types=[gpu_type("k80", 12.0, 0.45), gpu_type("v100", 16.0, 2.48), gpu_type("a100", 80.0, 2.0)],
    )


def test_job_floors_keep_the_higher_tiers_jobs_in_the_bound() -> None:
    index = build_index(_traded())
    floors = {1: 2.0 - 1e-5, 0: 1.0 - 1e-5}
    values = [0.0, 0.1, 0.2, 0.5, 1.0]

    def below(tau: float) -> float:
        return max(v for v in values if v < tau)

    def bound(jobs: dict[int, float] | None) -> float | None:
        lp, holds = type_level_model(index, floors, jobs)
        got, _ = level_bound(lp, get_backend("ortools"), holds, below, 0.0, frozenset(), 0.1, 1.0, math.inf)
        return got

    assert bound(None) == pytest.approx(0.5)  # hi traded for s's served demand
    assert bound({1: 1.0}) == pytest.approx(0.2)


def test_the_level_plan_keeps_the_job_floors() -> None:
    p = _traded()
    index = build_index(p)
    placed = {
        "hi": Placement("hi", (Shard("k1", 1),), "k80"),
        "lo": Placement("lo", (Shard("v1", 1),), "v100"),
        "s": Placement("s", (Shard("a1", 1), Shard("a1", 1)), "a100"),
    }
    assert job_floors(index, placed) == {1: 1.0}  # the lowest tier has none
    floors = {1: 2.0 - 1e-5, 0: 1.0 - 1e-5}
    backend = get_backend("ortools")
    # Without the job floor: hi out so that lo runs on the v100 (minimum 0.5).
    traded = level_plan(index, placed, floors, 1000, backend, math.inf)
    assert traded is not None and "hi" not in traded and traded["lo"].gpu_type == "v100"
    assert objective(p, list(traded.values()), "fairness") == pytest.approx(0.5)
    kept = level_plan(index, placed, floors, 1000, backend, math.inf, job_floors(index, placed))
    assert kept is not None and kept["hi"].gpu_type == "v100" and kept["lo"].gpu_type == "k80"
    assert objective(p, list(kept.values()), "fairness") == pytest.approx(0.2)
    unplaced = tuple(Unplaced(w.id, ()) for w in p.workloads if w.id not in kept)
    draft = Plan(PlanStatus.FEASIBLE, "fairness", 0.0, None, None, tuple(kept.values()), unplaced)
    assert verify(p, draft, "fairness").ok
