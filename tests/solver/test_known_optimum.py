"""Tiny instances whose optimum is worked out by hand in a comment, per policy.

Each test states the instance, the candidate plans with their objective
(arithmetic shown), asserts that ``plan`` proves the best one optimal, that the
independent verifier accepts it with the same objective, and the placement facts
that make it the optimum.

Objectives (solver/verify.py): throughput = Σ w·ρ + Σ w·f − 0.05·M,
cost = −Σ GPUs·$/h − 0.05·M, fairness = min over placed of ρ/w (or f/w) − 0.05·M,
with ρ = throughput on the chosen type and size / the job's best over usable types.
"""

from __future__ import annotations

import pytest

from solver import NodeState, Plan, PlanOptions, PlanStatus, Problem, plan, verify
from tests.builders import node, place, problem, serve, tenant, train

PENALTY = 0.05  # PlanOptions().migration_penalty


def solve(p: Problem, policy: str, expected: float, **options: object) -> Plan:
    """Plan ``p``; check optimality, the objective, and the verifier's agreement."""
    opts = PlanOptions(time_limit_s=5, **options)  # type: ignore[arg-type]
    result = plan(p, policy, opts)
    assert result.status is PlanStatus.OPTIMAL or (result.gap is not None and result.gap <= 1e-6), result
    assert result.objective == pytest.approx(expected, abs=1e-6)
    report = verify(p, result, policy, opts.migration_penalty, opts.max_migrations)
    assert report.ok, report.violations
    assert report.objective == pytest.approx(result.objective, abs=1e-9)
    assert result.best_bound is not None and result.best_bound >= result.objective - 1e-6
    return result


def nodes_of(result: Plan, workload_id: str) -> list[tuple[str, int]]:
    p = result.placement(workload_id)
    assert p is not None, f"{workload_id} is not placed"
    return sorted((s.node_id, s.gpus) for s in p.shards)


def unplaced_ids(result: Plan) -> set[str]:
    return {u.workload_id for u in result.unplaced}


# ---------------------------------------------------------------------------
# Heterogeneity: two jobs compete for one fast GPU.
#
# h1: 4 × h100, a1: 4 × a100. Both jobs need 4 GPUs.
#   fast: a100 1.0, h100 3.0  -> ρ(h100) = 1, ρ(a100) = 1/3
#   mild: a100 1.0, h100 1.5  -> ρ(h100) = 1, ρ(a100) = 1/1.5 = 2/3
# fast on h100 + mild on a100: 1 + 2/3 = 5/3   <- throughput optimum
# mild on h100 + fast on a100: 1 + 1/3 = 4/3
# Fairness: min(1, 2/3) = 2/3 vs min(1/3, 1) = 1/3 -> the same choice, 2/3.
# Cost: both GPUs run either way: −(4·$4 + 4·$2) = −24.


def hetero() -> Problem:
    return problem(
        nodes=[node("h1", "h100", 4), node("a1", "a100", 4)],
        workloads=[
            train("fast", 4, {"a100": 1.0, "h100": 3.0}),
            train("mild", 4, {"a100": 1.0, "h100": 1.5}),
        ],
    )


def test_throughput_gives_the_fast_gpu_to_the_job_that_gains_most() -> None:
    r = solve(hetero(), "throughput", 5 / 3)
    assert nodes_of(r, "fast") == [("h1", 4)]
    assert nodes_of(r, "mild") == [("a1", 4)]
    assert r.placement("fast").gpu_type == "h100"  # type: ignore[union-attr]
    assert r.metrics.normalized_throughput == pytest.approx(5 / 3)


def test_fairness_maximizes_the_worst_normalized_throughput() -> None:
    r = solve(hetero(), "fairness", 2 / 3)
    assert nodes_of(r, "fast") == [("h1", 4)]
    assert nodes_of(r, "mild") == [("a1", 4)]


def test_cost_runs_everything_and_pays_for_it() -> None:
    r = solve(hetero(), "cost", -24.0)
    assert not r.unplaced
    assert r.metrics.cost_per_hour == pytest.approx(24.0)


# ---------------------------------------------------------------------------
# An elastic job chooses its size.
#
# a1: 8 × a100. elastic: 2 GPUs 1.0, 4 GPUs 1.8, 8 GPUs 3.0 (best 3.0);
# fixed: 4 GPUs, 1.0 (ρ = 1).
#   elastic 8            : 3.0/3 = 1.0                 (fixed does not fit)
#   elastic 4 + fixed    : 1.8/3 + 1 = 0.6 + 1 = 1.6   <- optimum
#   elastic 2 + fixed    : 1.0/3 + 1 = 1.333...
# Alone, the elastic job takes all 8 GPUs: 1.0.


def test_elastic_job_takes_the_size_that_maximizes_the_total() -> None:
    elastic = train("elastic", shapes={2: 1.0, 4: 1.8, 8: 3.0})
    r = solve(problem(nodes=[node("a1", gpus=8)], workloads=[elastic, train("fixed", 4)]), "throughput", 1.6)
    assert nodes_of(r, "elastic") == [("a1", 4)]
    assert nodes_of(r, "fixed") == [("a1", 4)]


def test_elastic_job_alone_takes_its_best_shape() -> None:
    elastic = train("elastic", shapes={2: 1.0, 4: 1.8, 8: 3.0})
    r = solve(problem(nodes=[node("a1", gpus=8)], workloads=[elastic]), "throughput", 1.0)
    assert nodes_of(r, "elastic") == [("a1", 8)]


def test_fairness_runs_everyone_before_maximizing_the_minimum() -> None:
    # a1: 8 × a100. big: 4 GPUs 1.0, 8 GPUs 10.0 (best 10); small: 4 GPUs, weight 0.5.
    # Throughput: big on 8 = 1.0  vs  big on 4 + small = 0.1 + 0.5·1 = 0.6 -> big alone, 1.0.
    # Fairness covers every tier first (both run), then max-min:
    #   min(ρ_big / 1, ρ_small / 0.5) = min(0.1, 2) = 0.1.
    big = train("big", shapes={4: 1.0, 8: 10.0})
    small = train("small", 4, weight=0.5)
    p = problem(nodes=[node("a1", gpus=8)], workloads=[big, small])
    r = solve(p, "throughput", 1.0)
    assert nodes_of(r, "big") == [("a1", 8)]
    assert unplaced_ids(r) == {"small"}
    r = solve(p, "fairness", 0.1)
    assert nodes_of(r, "big") == [("a1", 4)]
    assert nodes_of(r, "small") == [("a1", 4)]


# ---------------------------------------------------------------------------
# Gangs: an 8-GPU job on 4-GPU nodes needs two whole nodes in one locality group.
#
# a1 (z1/r1), a2 (z1/r1), a3 (z1/r2), each 4 × a100.
# gang (8 GPUs, locality domain): only r1 has two nodes -> a1 + a2, 4 + 4 GPUs.
# small (4 GPUs) takes a3. Throughput: 1 + 1 = 2.


def test_gang_takes_two_whole_nodes_in_one_domain() -> None:
    p = problem(
        nodes=[
            node("a1", gpus=4, zone="z1", domain="r1"),
            node("a2", gpus=4, zone="z1", domain="r1"),
            node("a3", gpus=4, zone="z1", domain="r2"),
        ],
        workloads=[train("gang", 8, locality="domain"), train("small", 4)],
    )
    r = solve(p, "throughput", 2.0)
    assert nodes_of(r, "gang") == [("a1", 4), ("a2", 4)]
    assert nodes_of(r, "small") == [("a3", 4)]


def test_gang_spans_nodes_that_differ_only_in_labels_no_selector_names() -> None:
    # every node carries its own hostname label, as in Kubernetes; only "pool" is selected on
    labelled = [
        node(f"a{i}", gpus=4, zone="z1", domain="r1", labels={"hostname": f"a{i}", "pool": "gpu"})
        for i in (1, 2)
    ]
    picky = train("picky", 4, selector={"pool": "gpu"})
    p = problem(nodes=labelled, workloads=[train("gang", 8, locality="domain")])
    assert nodes_of(solve(p, "throughput", 1.0), "gang") == [("a1", 4), ("a2", 4)]
    # nodes that differ in a selected label are still of different kinds: no gang spans them
    mixed = [labelled[0], node("a3", gpus=4, zone="z1", domain="r1", labels={"pool": "cpu"})]
    r = solve(problem(nodes=mixed, workloads=[train("gang", 8, locality="domain"), picky]), "throughput", 1.0)
    assert unplaced_ids(r) == {"gang"}
    assert "labels that selectors name" in r.unplaced[0].reasons[0].message


# a1 (z1/r1), a2 (z1/r2), a3 (z2/r3): no domain has two nodes, zone z1 has.
# locality domain: the gang cannot run -> 0 (TOO_LARGE).
# locality zone  : a1 + a2 (z1), 4 + 4 -> 1.
SPLIT = (
    node("a1", gpus=4, zone="z1", domain="r1"),
    node("a2", gpus=4, zone="z1", domain="r2"),
    node("a3", gpus=4, zone="z2", domain="r3"),
)


def test_gang_with_domain_locality_cannot_span_domains() -> None:
    r = solve(problem(nodes=SPLIT, workloads=[train("gang", 8, locality="domain")]), "throughput", 0.0)
    assert unplaced_ids(r) == {"gang"}
    assert [x.code.value for x in r.unplaced[0].reasons] == ["TOO_LARGE"]


def test_gang_with_zone_locality_spans_domains_inside_one_zone() -> None:
    r = solve(problem(nodes=SPLIT, workloads=[train("gang", 8, locality="zone")]), "throughput", 1.0)
    assert nodes_of(r, "gang") == [("a1", 4), ("a2", 4)]


def test_gang_of_six_gpus_is_split_evenly_over_two_nodes() -> None:
    # 6 GPUs on 4-GPU nodes: ceil(6/4) = 2 whole nodes, 3 + 3 GPUs.
    p = problem(nodes=SPLIT[:2], workloads=[train("gang", 6, locality="zone")])
    r = solve(p, "throughput", 1.0)
    assert nodes_of(r, "gang") == [("a1", 3), ("a2", 3)]


# ---------------------------------------------------------------------------
# Cost: a service meets its target with the cheapest replicas.
#
# target 50 req/s. a100 ($2/GPU-h): 10 req/s per 1-GPU replica -> 5 replicas, $10/h.
#                  h100 ($4/GPU-h): 25 req/s per 1-GPU replica -> 2 replicas, $8/h.
# Cost optimum: 2 × h100, −8. (A third h100 replica would cost $4 more for nothing.)


def test_cost_meets_the_target_with_the_cheapest_replicas() -> None:
    svc = serve("svc", 1, {"a100": 10.0, "h100": 25.0}, 50.0, types=("a100", "h100"))
    p = problem(nodes=[node("a1", "a100", 8), node("h1", "h100", 4)], workloads=[svc])
    r = solve(p, "cost", -8.0)
    assert nodes_of(r, "svc") == [("h1", 1), ("h1", 1)]
    assert not r.shortfalls


def test_cost_picks_the_cheaper_gpu_type_for_a_training_job() -> None:
    # 4 GPUs on a100 cost 4·2 = $8/h, on h100 4·4 = $16/h (h100 is 3× faster: cost does not care).
    job = train("job", 4, {"a100": 1.0, "h100": 3.0})
    p = problem(nodes=[node("a1", "a100", 4), node("h1", "h100", 4)], workloads=[job])
    assert nodes_of(solve(p, "cost", -8.0), "job") == [("a1", 4)]
    assert nodes_of(solve(p, "throughput", 1.0), "job") == [("h1", 4)]


# ---------------------------------------------------------------------------
# Spread over zones.
#
# z1: a1 with 8 GPUs, z2: a2 with 1 GPU. svc: 1-GPU replicas of 10 req/s, target 40,
# spread zone over the 2 eligible zones: at most ceil(R/2) replicas per zone.
#   R = 4: z1 ≤ 2, z2 ≤ 2 but z2 holds only 1 -> impossible.
#   R = 3: z1 ≤ 2, z2 ≤ 2 -> 2 + 1 = 3 replicas, 30 of 40 req/s, f = 0.75  <- optimum
# Throughput = f = 0.75, with a shortfall of 10 req/s.


def test_spread_over_zones_caps_the_replicas() -> None:
    p = problem(
        nodes=[node("a1", gpus=8, zone="z1"), node("a2", gpus=1, zone="z2")],
        workloads=[serve("svc", 1, 10.0, 40.0, spread="zone")],
    )
    r = solve(p, "throughput", 0.75)
    assert nodes_of(r, "svc") == [("a1", 1), ("a1", 1), ("a2", 1)]
    assert [(s.workload_id, s.served_rps, s.target_rps) for s in r.shortfalls] == [("svc", 30.0, 40.0)]


def test_spread_over_two_zones_splits_replicas_evenly() -> None:
    # Both zones have room: 4 replicas, 2 per zone, f = 1.
    p = problem(
        nodes=[node("a1", gpus=8, zone="z1"), node("a2", gpus=8, zone="z2")],
        workloads=[serve("svc", 1, 10.0, 40.0, spread="zone")],
    )
    r = solve(p, "throughput", 1.0)
    assert nodes_of(r, "svc") == [("a1", 1), ("a1", 1), ("a2", 1), ("a2", 1)]


# ---------------------------------------------------------------------------
# A tenant quota binds.
#
# a1: 12 × a100. Tenant "team" may hold 4 GPUs. t1 (team, weight 2), t2 (team), other
# (no tenant), 4 GPUs each, ρ = 1. All three fit on the node, but only one of t1/t2 may
# run: t1 (2·1) beats t2 (1). Throughput: 2 + 1 = 3, and 4 GPUs stay idle.


def test_tenant_quota_limits_the_tenant_and_not_the_others() -> None:
    p = problem(
        nodes=[node("a1", gpus=12)],
        tenants=[tenant("team", 4)],
        workloads=[
            train("t1", 4, tenant="team", weight=2.0),
            train("t2", 4, tenant="team"),
            train("other", 4),
        ],
    )
    r = solve(p, "throughput", 3.0)
    assert {x.workload_id for x in r.placements} == {"t1", "other"}
    assert [x.code.value for x in r.unplaced[0].reasons] == ["QUOTA"]


def test_per_type_quota_sends_the_job_to_the_slower_type() -> None:
    # Tenant "team" may hold no h100. job (4 GPUs; a100 1.0, h100 2.0): a100 only, ρ = 0.5.
    p = problem(
        nodes=[node("a1", "a100", 4), node("h1", "h100", 4)],
        tenants=[tenant("team", per_type={"h100": 0})],
        workloads=[train("job", 4, {"a100": 1.0, "h100": 2.0}, tenant="team")],
    )
    assert nodes_of(solve(p, "throughput", 0.5), "job") == [("a1", 4)]


# ---------------------------------------------------------------------------
# Strict priority.
#
# a1: 8 × a100. hi (priority 1): 8 GPUs, ρ = 1. lo1, lo2 (priority 0): 4 GPUs, ρ = 1.
# Throughput alone would prefer lo1 + lo2: 1 + 1 = 2 > 1. Strict priority runs hi:
# throughput 1; cost −8·$2 = −16; fairness min(1) = 1.


@pytest.mark.parametrize(("policy", "expected"), [("throughput", 1.0), ("cost", -16.0), ("fairness", 1.0)])
def test_high_priority_job_displaces_two_lower_ones(policy: str, expected: float) -> None:
    p = problem(
        nodes=[node("a1", gpus=8)],
        workloads=[train("hi", 8, priority=1), train("lo1", 4), train("lo2", 4)],
    )
    r = solve(p, policy, expected)
    assert nodes_of(r, "hi") == [("a1", 8)]
    assert unplaced_ids(r) == {"lo1", "lo2"}
    for u in r.unplaced:
        assert [x.code.value for x in u.reasons] == ["HIGHER_PRIORITY"]


def test_without_priorities_throughput_prefers_the_two_smaller_jobs() -> None:
    # The same instance with one tier: lo1 + lo2 = 2 > hi = 1.
    p = problem(nodes=[node("a1", gpus=8)], workloads=[train("hi", 8), train("lo1", 4), train("lo2", 4)])
    r = solve(p, "throughput", 2.0)
    assert unplaced_ids(r) == {"hi"}


# ---------------------------------------------------------------------------
# Re-planning: running work, migrations, node states.
#
# h1: 4 × h100, a1: 4 × a100. job (4 GPUs; a100 1.0, h100 2.0) runs on a1: ρ = 0.5.
#   stay          : 0.5
#   move to h1    : 1.0 − 0.05 (one migration) = 0.95
# Preemptible -> it moves (0.95); non-preemptible -> it stays (0.5).


def running_job(preemptible: bool) -> Problem:
    return problem(
        nodes=[node("h1", "h100", 4), node("a1", "a100", 4)],
        workloads=[train("job", 4, {"a100": 1.0, "h100": 2.0}, preemptible=preemptible)],
        current=[place("job", ("a1", 4))],
    )


def test_preemptible_running_job_moves_to_the_faster_gpu() -> None:
    r = solve(running_job(True), "throughput", 1.0 - PENALTY)
    assert nodes_of(r, "job") == [("h1", 4)]
    assert r.metrics.migrations == 1


def test_non_preemptible_running_job_stays() -> None:
    r = solve(running_job(False), "throughput", 0.5)
    assert nodes_of(r, "job") == [("a1", 4)]
    assert r.metrics.migrations == 0


# h1: 4 × h100, a1: 4 × a100, jobs as in `hetero` but running the wrong way round:
# fast on a1 (ρ 1/3), mild on h1 (ρ 1). Stay: 4/3.
#   swap (2 migrations)                    : 5/3 − 2·0.05 = 1.5667  <- optimum, no cap
#   max_migrations = 1: one move needs the other node free, i.e. stopping the other job,
#   which is a second migration -> only "stay" is allowed: 4/3.
#   max_migrations = 0: stay, 4/3.


def swapped() -> Problem:
    return problem(
        nodes=[node("h1", "h100", 4), node("a1", "a100", 4)],
        workloads=[
            train("fast", 4, {"a100": 1.0, "h100": 3.0}),
            train("mild", 4, {"a100": 1.0, "h100": 1.5}),
        ],
        current=[place("fast", ("a1", 4)), place("mild", ("h1", 4))],
    )


def test_without_a_cap_running_jobs_swap_gpus() -> None:
    r = solve(swapped(), "throughput", 5 / 3 - 2 * PENALTY)
    assert nodes_of(r, "fast") == [("h1", 4)]
    assert r.metrics.migrations == 2


@pytest.mark.parametrize("cap", [0, 1])
def test_max_migrations_keeps_everything_where_it_is(cap: int) -> None:
    r = solve(swapped(), "throughput", 4 / 3, max_migrations=cap)
    assert nodes_of(r, "fast") == [("a1", 4)]
    assert nodes_of(r, "mild") == [("h1", 4)]
    assert r.metrics.migrations == 0


@pytest.mark.parametrize("policy", ["cost", "fairness"])
def test_max_migrations_zero_holds_for_every_policy(policy: str) -> None:
    r = plan(swapped(), policy, PlanOptions(time_limit_s=5, max_migrations=0))
    assert verify(swapped(), r, policy, max_migrations=0).ok
    assert r.placements == (place("fast", ("a1", 4), type="a100"), place("mild", ("h1", 4), type="h100"))


# d1 is draining (8 GPUs, empty), a1 ready (4 GPUs). Two new 4-GPU jobs: only a1 may
# take one -> throughput 1; the other is unplaced.


def test_draining_node_gets_nothing_new() -> None:
    p = problem(
        nodes=[node("d1", gpus=8, state="draining"), node("a1", gpus=4)],
        workloads=[train("j1", 4, weight=2.0), train("j2", 4)],
    )
    r = solve(p, "throughput", 2.0)  # j1 (weight 2) gets a1: 2·1
    assert nodes_of(r, "j1") == [("a1", 4)]
    assert unplaced_ids(r) == {"j2"}
    assert all(s.node_id != "d1" for x in r.placements for s in x.shards)


# a1 is down and its job was running there; a2 is ready. The job is re-placed on a2;
# work on a down node is not running, so this is no migration: throughput 1, not 0.95.


def test_job_on_a_down_node_is_replaced_without_a_migration() -> None:
    p = problem(
        nodes=[node("a1", gpus=4, state=NodeState.DOWN), node("a2", gpus=4)],
        workloads=[train("job", 4)],
        current=[place("job", ("a1", 4))],
    )
    r = solve(p, "throughput", 1.0)
    assert nodes_of(r, "job") == [("a2", 4)]
    assert r.metrics.migrations == 0


def test_job_on_a_down_node_with_no_room_elsewhere_is_not_a_migration_either() -> None:
    # Nowhere to go: unplaced, objective 0 (not −0.05), even with max_migrations = 0.
    p = problem(
        nodes=[node("a1", gpus=4, state="down"), node("a2", gpus=2)],
        workloads=[train("job", 4)],
        current=[place("job", ("a1", 4))],
    )
    r = solve(p, "throughput", 0.0, max_migrations=0)
    assert unplaced_ids(r) == {"job"}
    assert r.metrics.migrations == 0


# A job larger than its tenant's whole quota can never run, so leaving it out
# (objective 0) is optimal; the LP bound is 0.5 (n = 1/2 job, since 2n <= 1) and
# CP-SAT proves 0 (regression: its trivial bound used to be reported, gap 100%).
# The bound may exceed 0 by CP-SAT's absolute gap limit (1e-7).
def test_job_larger_than_its_tenant_quota_is_proven_optimal() -> None:
    p = problem(
        nodes=[node("n1", gpus=2)], tenants=[tenant("t1", 1)], workloads=[train("j1", 2, 0.5, tenant="t1")]
    )
    r = solve(p, "throughput", 0.0)
    assert r.best_bound == pytest.approx(0.0, abs=1e-6)


# A tier's coverage stage with no time for its LP keeps what the incumbent covers;
# the incumbent's lower tiers were completed largest first. Priority 1: A (8 GPUs,
# weight 5) or four 2-GPU jobs B on the a100 node (the largest-first seed runs A:
# 5 > 4). Priority 0 on the l4 node (4 GPUs): C (4 GPUs) or four 1-GPU jobs D; the
# seed ran C. Smallest first the lowest tier covers 4, not 1, and that is tried
# before its floor is set (every stage out of time at once with a limit of 1 ms).
@pytest.mark.parametrize("policy", ["fairness", "throughput", "cost"])
def test_a_coverage_stage_out_of_time_places_its_tier_smallest_first(policy: str) -> None:
    p = problem(
        nodes=[node("a1", "a100", 8), node("l1", "l4", 4)],
        workloads=[
            train("A", 8, {"a100": 1.0}, types=("a100",), priority=1, weight=5.0),
            *(train(f"B{i}", 2, {"a100": 1.0}, types=("a100",), priority=1) for i in range(4)),
            train("C", 4, {"l4": 1.0}, types=("l4",)),
            *(train(f"D{i}", 1, {"l4": 1.0}, types=("l4",)) for i in range(4)),
        ],
    )
    r = plan(p, policy, PlanOptions(time_limit_s=0.001))
    assert sorted(x.workload_id for x in r.placements) == ["A", "D0", "D1", "D2", "D3"]
