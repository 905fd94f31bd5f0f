"""Strengthened bounds: valid (never below the best integer plan) and tighter.

The cost cuts (12) of ``Formulation.service_cost_cuts`` must hold at every
integer point of a service (run it on one type with k in [lo, R] replicas, or
not at all), and must lift the LP bound to what whole replicas cost. Both are
checked against an enumeration that uses none of the formulation's code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from solver import PlanOptions, Problem, Workload, plan
from solver.aggregate import build_index
from solver.backends import get_backend
from solver.formulation import build_formulation
from solver.linear import Sense
from solver.model import Placement, Shard
from solver.verify import objective
from tests.builders import TYPES, node, problem, serve, train

PRICE = {t.name: t.cost_per_hour or 0.0 for t in TYPES}
# Room for every service at its cheapest, whatever the draw (at most 3 x 40 GPUs per type).
ROOMY = [node(f"a{i}", "a100", 8) for i in range(16)] + [node(f"h{i}", "h100", 8) for i in range(16)]


def _service_points(
    spec_gpus: dict[str, int], rps: dict[str, float], target: float, lo: int, cap: int
) -> Iterator[tuple[str | None, int, float, float]]:
    """Every (type, replicas, served fraction, $/hour) a plan can run a service as."""
    for t in spec_gpus:
        for k in range(lo, cap + 1):
            yield t, k, min(1.0, k * rps[t] / target), PRICE[t] * spec_gpus[t] * k


@settings(max_examples=60, deadline=None)
@given(
    gpus=st.fixed_dictionaries({"a100": st.sampled_from([1, 2, 4]), "h100": st.sampled_from([1, 2, 4])}),
    rps=st.fixed_dictionaries(
        {"a100": st.floats(0.5, 20.0), "h100": st.floats(0.5, 40.0)},
    ),
    target=st.floats(1.0, 60.0),
    min_replicas=st.integers(1, 3),
    max_replicas=st.one_of(st.none(), st.integers(1, 12)),
)
# Found by Hypothesis: 37 / 0.5000000000000001 and 37 / 0.5 differ in the last bit,
# so the a100 point at one replica sorted after the dearer h100 one at "the same" x,
# and the hull kept the dearer one (a cut C >= 296 f that whole a100 replicas break).
@example(
    gpus={"a100": 1, "h100": 1},
    rps={"a100": 0.5000000000000001, "h100": 0.5},
    target=37.0,
    min_replicas=1,
    max_replicas=None,
)
def test_service_cost_cuts_hold_at_every_integer_point(
    gpus: dict[str, int], rps: dict[str, float], target: float, min_replicas: int, max_replicas: int | None
) -> None:
    svc = serve(
        "svc", gpus, rps, target, types=("a100", "h100"), min_replicas=min_replicas, max_replicas=max_replicas
    )
    p = problem(nodes=[node(f"a{i}", "a100", 8) for i in range(8)] + [node("h1", "h100", 8)], workloads=[svc])
    index = build_index(p)
    form = build_formulation(index)
    form.service_cost_cuts()
    c = index.classes[0]
    if c.index not in form.f:
        return  # the service cannot run at all: no cuts, nothing to check
    # The cost cuts and the GPU cuts build_formulation adds (the same envelope, every GPU at 1).
    cuts = [k for k in form.model.constraints if k.name.startswith(("svccost[", "svcgpus["))]
    assert any(k.name.startswith("svcgpus[") for k in cuts)
    lo, cap = max(1, min_replicas), form.max_replicas[c.index]
    first = {t: next(o for o, opt in enumerate(c.options) if opt.gpu_type == t) for t in gpus}
    points: list[tuple[str | None, int, float, float]] = [
        (None, 0, 0.0, 0.0),
        *_service_points(gpus, rps, target, lo, cap),
    ]
    for t, k, f, cost in points:
        values = [0.0] * len(form.model.vars)
        if t is not None:
            values[form.n[c.index, first[t]].index] = k
        # The largest served fraction the model allows (in its thousandths): the worst case.
        values[form.f[c.index].index] = math.floor(f * 1000 + 1e-9) / 1000
        for cut in cuts:
            lhs = form.model.evaluate(cut.terms, tuple(values))
            assert cut.sense is Sense.GE
            assert lhs >= cut.rhs - 1e-9, (t, k, f, cost, cut)
    # And with f at its exact value (continuous, as the LP sees it).
    for t, k, f, _cost in points:
        values = [0.0] * len(form.model.vars)
        if t is not None:
            values[form.n[c.index, first[t]].index] = k
        values[form.f[c.index].index] = f
        for cut in cuts:
            assert form.model.evaluate(cut.terms, tuple(values)) >= cut.rhs - 1e-9


def _cost_lp_bound(services: list[Workload], cuts: bool) -> float:
    """The LP bound of the cost stage with every service fully served (demand floor)."""
    p = problem(nodes=ROOMY, workloads=services)
    index = build_index(p)
    form = build_formulation(index)
    if cuts:
        form.service_cost_cuts()
    form.model.add(form.served(), Sense.GE, sum(c.weight for c in index.classes), "full")
    form.model.maximize(form.cost())
    lp = get_backend("ortools").solve_lp(form.model, time_limit_s=10)
    return float(lp.objective)


def _brute_force_cost(services: list[Workload]) -> float:
    """Cheapest way to serve every service fully, each on one type (room is ample)."""
    best = []
    for s in services:
        spec = s.inference
        assert spec is not None
        lo = max(1, spec.min_replicas)
        best.append(
            min(
                PRICE[t] * spec.gpus_per_replica[t] * k
                for t in spec.gpus_per_replica
                for k in range(lo, 40)
                if k * spec.replica_rps[t] >= spec.target_rps - 1e-9
            )
        )
    return -sum(best)


def test_service_cost_cuts_lift_the_lp_bound_to_whole_replicas() -> None:
    # s1: 8.8 req/s with 4.3 req/s a100 replicas ($2/h) -> 3 replicas, $6/h; h100 ($4/h,
    #     9 req/s) -> 1 replica, but min_replicas 2 -> $8/h. The LP without cuts serves it
    #     with about 2.05 replicas (1.957 a100 + 0.043 h100), $4.09/h.
    # s2: 3 req/s, min 2 replicas: 2 x a100, $4/h (the LP too: min_replicas binds it).
    # Optimum -10; the LP without cuts -8.09; with them -10 (less 1e-3 per cut).
    services = [
        serve("s1", 1, {"a100": 4.3, "h100": 9.0}, 8.8, types=("a100", "h100"), min_replicas=2),
        serve("s2", 1, {"a100": 10.0, "h100": 20.0}, 3.0, types=("a100", "h100"), min_replicas=2),
    ]
    optimum = _brute_force_cost(services)
    assert optimum == pytest.approx(-10.0)
    weak, strong = _cost_lp_bound(services, cuts=False), _cost_lp_bound(services, cuts=True)
    assert strong >= optimum - 1e-2  # valid (the 1e-3 $/h slack per cut aside)
    assert weak > optimum + 1.8  # the plain LP: fractional replicas, -8.09
    assert strong == pytest.approx(optimum, abs=1e-2)  # the cuts close the gap here
    r = plan(problem(nodes=ROOMY, workloads=services), "cost", PlanOptions(time_limit_s=5))
    assert r.objective == pytest.approx(optimum)
    assert r.best_bound is not None and r.best_bound >= optimum - 1e-2


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2]),
            st.floats(1.0, 12.0),
            st.floats(2.0, 25.0),
            st.floats(1.0, 40.0),
            st.integers(1, 3),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_cost_bound_with_cuts_is_never_below_the_brute_force_optimum(
    specs: list[tuple[int, float, float, float, int]],
) -> None:
    services = [
        serve(f"s{i}", g, {"a100": ra, "h100": rh}, target, types=("a100", "h100"), min_replicas=lo)
        for i, (g, ra, rh, target, lo) in enumerate(specs)
    ]
    optimum = _brute_force_cost(services)
    strong = _cost_lp_bound(services, cuts=True)
    assert strong >= optimum - 1e-2 * len(services)  # valid (1e-3 $/h slack per cut)
    assert strong <= _cost_lp_bound(services, cuts=False) + 1e-6  # and never weaker


def test_lower_hull_of_points() -> None:
    from solver.formulation import _lower_hull

    pts = sorted({(0.0, 0.0), (0.5, 3.0), (0.5, 1.0), (1.0, 4.0), (0.8, 3.5), (1.0, 2.5)})
    assert _lower_hull(pts) == [(0.0, 0.0), (0.5, 1.0), (1.0, 2.5)]
    assert list(itertools.pairwise(_lower_hull(pts)))


def test_exchange_drops_the_dearest_service_for_cheaper_served_demand() -> None:
    # x: h100 only, one 4-GPU replica ($4/GPU-h: $16/h) serves its target, weight 0.5.
    # y: a100 only, 1-GPU replicas of 10 req/s for 40 req/s ($2/h each), weight 1, runs
    #    2 of its 4 replicas (f = 0.5). Served demand 0.5·1 + 1·0.5 = 1.0, floor 1.0.
    # Taking x out loses 0.5; two more y replicas gain 0.5 for $4/h instead of $16/h.
    from solver.exchange import exchange_services

    x = serve("x", 4, 10.0, 10.0, types=("h100",), weight=0.5)
    y = serve("y", 1, 10.0, 40.0, types=("a100",))
    p = problem(nodes=[node("h1", "h100", 8), node("a1", "a100", 8)], workloads=[x, y])
    index = build_index(p)
    placed = {
        "x": Placement("x", (Shard("h1", 4),), "h100"),
        "y": Placement("y", (Shard("a1", 1), Shard("a1", 1)), "a100"),
    }
    gains = [{"x": 0.5, "y": 1.0}]
    out = exchange_services(index, placed, gains, [0.0], 1000, math.inf)
    assert "x" not in out
    assert len(out["y"].shards) == 4
    # No saving without the room: with y's node holding only 2 GPUs, nothing changes.
    p2 = problem(nodes=[node("h1", "h100", 8), node("a1", "a100", 2)], workloads=[x, y])
    assert exchange_services(build_index(p2), placed, gains, [0.0], 1000, math.inf) == placed
    # Nor when the floor has no slack for what x alone serves and nothing can replace it.
    assert exchange_services(index, placed, [{"x": 0.5}], [0.0], 1000, math.inf) == placed


def test_exchange_tops_up_the_cheapest_peer_first_one_replica_at_a_time() -> None:
    # x: h100 only, one 4-GPU replica ($16/h) serves its target; taking it out loses
    #    w·f = weight. Two peers below their target can make that up:
    # y: a100 1-GPU replicas ($2/h) of 10 req/s for 40: $2 per 0.25 of f = $8 per unit;
    #    runs 2, its node has room for 1 more.
    # z: l4 1-GPU replicas ($0.8/h) of 5 req/s for 40: $0.8 per 0.125 = $6.4 per unit;
    #    runs 4, its node has room for 2 more.
    # z is cheaper per unit, so it is topped up first, one replica at a time (after each
    # one it is weighed again); y only once z has no room left.
    from solver.exchange import exchange_services

    y = serve("y", 1, 10.0, 40.0, types=("a100",))
    z = serve("z", 1, 5.0, 40.0, types=("l4",))
    placed = {
        "x": Placement("x", (Shard("h1", 4),), "h100"),
        "y": Placement("y", tuple(Shard("a1", 1) for _ in range(2)), "a100"),
        "z": Placement("z", tuple(Shard("l1", 1) for _ in range(4)), "l4"),
    }
    for weight, want_y, want_z in ((0.25, 2, 6), (0.5, 3, 6)):
        x = serve("x", 4, 10.0, 10.0, types=("h100",), weight=weight)
        p = problem(
            nodes=[node("h1", "h100", 8), node("a1", "a100", 3), node("l1", "l4", 6)], workloads=[x, y, z]
        )
        gains = [{"x": weight, "y": 1.0, "z": 1.0}]
        out = exchange_services(build_index(p), placed, gains, [0.0], 1000, math.inf)
        assert "x" not in out
        assert (len(out["y"].shards), len(out["z"].shards)) == (want_y, want_z)
    # Made up only in part (z and y together add 0.5, x takes 0.75 away): undone.
    x = serve("x", 4, 10.0, 10.0, types=("h100",), weight=0.75)
    p = problem(
        nodes=[node("h1", "h100", 8), node("a1", "a100", 3), node("l1", "l4", 6)], workloads=[x, y, z]
    )
    gains = [{"x": 0.75, "y": 1.0, "z": 1.0}]
    assert exchange_services(build_index(p), placed, gains, [0.0], 1000, math.inf) == placed


# ---------------------------------------------------------------------------
# fairness: the level bound and the search that raises the minimum.
#
# h1: 1 x h100, a1: 1 x a100. Jobs of 1 GPU, weight 1:
#   j: h100 3.0, a100 1.0 -> rho(h100) = 1, rho(a100) = 1/3
#   k: h100 1.2, a100 1.0 -> rho(h100) = 1, rho(a100) = 1/1.2 = 0.833
# Both run (coverage first): one of them is on the a100. Min: j on h100, k on a100
# -> min(1, 0.833) = 0.833 (the optimum); the other way round 1/3.


def _two_jobs() -> tuple[Problem, dict[str, Placement]]:
    p = problem(
        nodes=[node("h1", "h100", 1), node("a1", "a100", 1)],
        workloads=[
            train("j", 1, {"a100": 1.0, "h100": 3.0}, types=("a100", "h100")),
            train("k", 1, {"a100": 1.0, "h100": 1.2}, types=("a100", "h100")),
        ],
    )
    bad = {
        "j": Placement("j", (Shard("a1", 1),), "a100"),
        "k": Placement("k", (Shard("h1", 1),), "h100"),
    }
    return p, bad


def test_raise_minimum_trades_places_when_both_end_above_the_minimum() -> None:
    from solver.exchange import raise_minimum

    p, bad = _two_jobs()
    out = raise_minimum(build_index(p), bad, math.inf)
    assert out["j"].shards == (Shard("h1", 1),)
    assert out["k"].shards == (Shard("a1", 1),)
    assert objective(p, list(out.values()), "fairness") == pytest.approx(1 / 1.2)


def test_level_bound_is_the_optimum_where_the_big_m_lp_is_weak(monkeypatch: pytest.MonkeyPatch) -> None:
    from solver.policies.fairness import FairnessPolicy

    p, _ = _two_jobs()
    r = plan(p, "fairness", PlanOptions(time_limit_s=5))
    assert r.objective == pytest.approx(1 / 1.2)
    assert r.best_bound == pytest.approx(1 / 1.2)  # valid and tight
    # Without the level bound: the big-M LP (CP-SAT may still close it on so small
    # a model, so compare the LP alone).
    index = build_index(p)
    form = build_formulation(index)
    stages = FairnessPolicy().stages(form, PlanOptions())
    form.model.add(stages[0].terms, Sense.GE, 2.0 - 1e-6, "both run")
    form.model.maximize(stages[1].terms, stages[1].constant)
    weak = get_backend("ortools").solve_lp(form.model, time_limit_s=5).objective
    assert weak > 1 / 1.2 + 0.05


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(1.0, 4.0), st.floats(0.2, 1.0), st.sampled_from([1.0, 2.0])),
        min_size=2,
        max_size=4,
    )
)
def test_level_bound_is_never_below_the_best_plan(jobs: list[tuple[float, float, float]]) -> None:
    # 1-GPU jobs on 1 h100 + 2 a100 GPUs: every assignment is enumerated (all jobs that
    # fit run, as coverage asks), and the bound must be >= the best minimum.
    p = problem(
        nodes=[node("h1", "h100", 1), node("a1", "a100", 2)],
        workloads=[
            train(f"j{i}", 1, {"h100": h, "a100": a}, types=("a100", "h100"), weight=w)
            for i, (h, a, w) in enumerate(jobs)
        ],
    )
    r = plan(p, "fairness", PlanOptions(time_limit_s=5))
    # The policy ranks by coverage (sum of the weights that run) first, then the minimum.
    best = (-math.inf, -math.inf)
    ids = [w.id for w in p.workloads]
    weight = {w.id: w.weight for w in p.workloads}
    slots = ["h1", "a1", "a1"]
    for chosen in itertools.permutations(range(len(ids)), min(len(ids), 3)):
        placements = [
            Placement(ids[j], (Shard(slots[s], 1),), "h100" if slots[s] == "h1" else "a100")
            for s, j in enumerate(chosen)
        ]
        key = (sum(weight[ids[j]] for j in chosen), objective(p, placements, "fairness"))
        best = max(best, key)
    assert sum(weight[x.workload_id] for x in r.placements) == pytest.approx(best[0])
    assert r.best_bound is not None
    assert r.best_bound >= best[1] - 1e-9
    assert r.objective <= best[1] + 1e-9


@pytest.mark.parametrize("policy", ["throughput", "cost", "fairness"])
def test_every_optimizing_plan_has_a_bound_even_when_no_lp_finishes(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11 measured plans with ``best_bound`` null (the primary LP cut short at 10k
    workloads / 4,278 nodes). With every LP out of time and no MIP run, the bound is the
    stage's trivial one: valid, if weak."""
    from solver.backends.ortools_backend import OrToolsBackend
    from solver.linear import Solution, SolveStatus

    def out_of_time(self: object, model: object, **kwargs: object) -> Solution:
        return Solution(SolveStatus.UNKNOWN, (), 0.0, math.inf, 0.0)

    monkeypatch.setattr(OrToolsBackend, "solve_lp", out_of_time)
    p = problem(
        [node("a0", "a100", 8), node("h0", "h100", 8)],
        [
            train("j1", 4, {"a100": 1.0, "h100": 2.0}),
            train("j2", 8, {"a100": 1.0, "h100": 1.5}),
            serve("s", {"a100": 1, "h100": 1}, {"a100": 5.0, "h100": 10.0}, 20.0),
        ],
    )
    r = plan(p, policy, PlanOptions(time_limit_s=0.3, backend="ortools"))
    assert r.best_bound is not None and math.isfinite(r.best_bound) and r.gap is not None
    assert r.best_bound >= r.objective - 1e-9


def test_the_bound_is_taken_again_at_the_final_plans_coverage() -> None:
    """``pipeline._rebound``: where the final plan covers more of an earlier stage than its
    floor (completion adds what fits), the primary bound at the plan's own coverage is
    tighter and still at least the plan's value. Two jobs, one 8-GPU a100 node and one
    h100 node; ``cost``: with the coverage floor at 1 job, the LP may run the cheaper one
    only; at 2 jobs it must pay for both."""
    import time

    from solver.pipeline import _rebound
    from solver.policies import get_policy
    from solver.policies.base import stage_values

    p = problem(
        [node("a0", "a100", 8), node("h0", "h100", 8)],
        [train("cheap", 8, {"a100": 1.0}), train("dear", 8, {"h100": 1.0}, types=("h100",))],
    )
    index = build_index(p)
    form = build_formulation(index)
    pol = get_policy("cost")
    stages = pol.stages(form, PlanOptions())  # type: ignore[attr-defined]
    backend = get_backend("highs")
    floors = [form.set_floor(st.terms, st.constant, 1.0, f"floor[{st.name}]") for st in stages[:-1]]
    form.model.maximize(stages[-1].terms, stages[-1].constant)
    loose = backend.solve_lp(form.model, time_limit_s=5).objective
    both = plan(p, "cost", PlanOptions(time_limit_s=5))
    final = stage_values(form, stages, form.hint(both.placements))
    assert final[0] == pytest.approx(2.0) and len(both.placements) == 2
    tight = _rebound(form, stages, floors, final, loose, backend, time.perf_counter() + 5)
    price = {t.name: t.cost_per_hour or 0.0 for t in TYPES}
    assert loose == pytest.approx(-8 * price["a100"], rel=1e-3)  # one job, the cheaper
    assert tight == pytest.approx(-8 * (price["a100"] + price["h100"]), rel=1e-3)
    assert tight < loose
    assert tight >= final[-1] - 1e-6
