"""Explanations: a reason code (and a useful message) for every unplaced workload
and every shortfall, ``explain()`` for one workload, and shadow prices."""

from __future__ import annotations

import pytest

from solver import Plan, PlanOptions, Problem, ReasonCode, ValidationError, explain, plan, verify
from tests.builders import node, place, problem, serve, tenant, train

OPTIONS = PlanOptions(time_limit_s=5)


def planned(p: Problem, policy: str = "throughput", **options: object) -> Plan:
    opts = PlanOptions(time_limit_s=5, **options)  # type: ignore[arg-type]
    r = plan(p, policy, opts)
    assert verify(p, r, policy, opts.migration_penalty, opts.max_migrations).ok
    return r


def reasons(r: Plan, workload_id: str) -> list[tuple[ReasonCode, str]]:
    u = next(u for u in r.unplaced if u.workload_id == workload_id)
    assert u.reasons
    return [(x.code, x.message) for x in u.reasons]


def only_reason(r: Plan, workload_id: str) -> tuple[ReasonCode, str]:
    found = reasons(r, workload_id)
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------------------
# Static reasons: the workload could not run even on an empty cluster.


def test_memory_too_large_for_every_gpu_type_is_no_gpu_type() -> None:
    # 40 GiB per GPU; the only type with numbers, l4, has 24 GiB.
    p = problem(
        nodes=[node("l1", "l4", 4)], workloads=[train("big", 1, {"l4": 1.0}, types=(), gpu_memory_gib=40.0)]
    )
    code, message = only_reason(planned(p), "big")
    assert code is ReasonCode.NO_GPU_TYPE
    assert "GiB" in message and "40" in message and "24" in message


def test_no_ready_node_of_its_type_is_no_node() -> None:
    # It runs only on h100, and the only h100 node is down.
    p = problem(
        nodes=[node("a1", "a100", 4), node("h1", "h100", 4, state="down")],
        workloads=[train("job", 1, {"h100": 1.0}, types=())],
    )
    code, message = only_reason(planned(p), "job")
    assert code is ReasonCode.NO_NODE
    assert "h100" in message


def test_no_node_with_the_selected_labels_is_no_node() -> None:
    p = problem(nodes=[node("a1", labels={"pool": "batch"})], workloads=[train("job", 1)])
    p = problem(nodes=p.nodes, workloads=[train("job", 1, selector={"pool": "serving"})])
    code, message = only_reason(planned(p), "job")
    assert code is ReasonCode.NO_NODE
    assert "pool=serving" in message


def test_gang_larger_than_any_node_with_node_locality_is_too_large() -> None:
    p = problem(nodes=[node("a1", gpus=4), node("a2", gpus=4)], workloads=[train("job", 8, locality="node")])
    code, message = only_reason(planned(p), "job")
    assert code is ReasonCode.TOO_LARGE
    assert "8" in message and "4" in message


def test_job_larger_than_its_tenant_may_hold_is_quota() -> None:
    p = problem(
        nodes=[node("a1", gpus=8)], tenants=[tenant("team", 2)], workloads=[train("job", 4, tenant="team")]
    )
    code, message = only_reason(planned(p), "job")
    assert code is ReasonCode.QUOTA
    assert "team" in message


def test_service_without_a_usable_type_is_no_gpu_type() -> None:
    # Numbers for h100 only, but it may use a100 only.
    p = problem(
        nodes=[node("a1")], workloads=[serve("svc", 1, 10.0, 10.0, types=("h100",), allowed=("a100",))]
    )
    code, _ = only_reason(planned(p), "svc")
    assert code is ReasonCode.NO_GPU_TYPE


# ---------------------------------------------------------------------------
# Dynamic reasons: what the plan gave to others.


def test_tenant_quota_used_by_its_other_jobs_is_quota() -> None:
    # a1 has room for both; tenant "team" may hold 4 GPUs and j1 holds them.
    p = problem(
        nodes=[node("a1", gpus=8)],
        tenants=[tenant("team", 4)],
        workloads=[train("j1", 4, tenant="team", weight=2.0), train("j2", 4, tenant="team")],
    )
    code, message = only_reason(planned(p), "j2")
    assert code is ReasonCode.QUOTA
    assert "team" in message and "4 of 4" in message


def test_capacity_held_by_a_higher_priority_job_names_it() -> None:
    p = problem(nodes=[node("a1", gpus=4)], workloads=[train("boss", 4, priority=5), train("minion", 4)])
    code, message = only_reason(planned(p), "minion")
    assert code is ReasonCode.HIGHER_PRIORITY
    assert "boss" in message


def test_capacity_held_by_equal_priority_work_is_capacity_and_names_it() -> None:
    # Same priority; "favourite" has weight 2, so the policy prefers it.
    p = problem(nodes=[node("a1", gpus=4)], workloads=[train("favourite", 4, weight=2.0), train("other", 4)])
    code, message = only_reason(planned(p), "other")
    assert code is ReasonCode.CAPACITY
    assert "favourite" in message


def test_each_usable_gpu_type_gets_its_reason() -> None:
    # "other" could run on a100 or h100; "fast" holds h1 and "slow" holds a1.
    p = problem(
        nodes=[node("h1", "h100", 4), node("a1", "a100", 4)],
        workloads=[
            train("fast", 4, {"a100": 1.0, "h100": 3.0}, types=(), weight=2.0),
            train("slow", 4, {"a100": 1.0}, types=(), weight=2.0),
            train("other", 4, {"a100": 1.0, "h100": 2.0}, types=()),
        ],
    )
    found = reasons(planned(p), "other")
    assert [c for c, _ in found] == [ReasonCode.CAPACITY, ReasonCode.CAPACITY]
    by_type = {m.split(":")[0]: m for _, m in found}
    assert "fast" in by_type["on h100"]
    assert "slow" in by_type["on a100"]


# ---------------------------------------------------------------------------
# Shortfalls.


def test_service_capped_by_max_replicas_has_a_shortfall() -> None:
    # 3 replicas × 10 req/s = 30 of 50: max_replicas binds, not capacity (8 GPUs).
    p = problem(nodes=[node("a1", gpus=8)], workloads=[serve("svc", 1, 10.0, 50.0, max_replicas=3)])
    r = planned(p)
    assert len(r.placement("svc").shards) == 3  # type: ignore[union-attr]
    [sf] = r.shortfalls
    assert (sf.workload_id, sf.served_rps, sf.target_rps) == ("svc", 30.0, 50.0)
    assert [x.code for x in sf.reasons] == [ReasonCode.CAPACITY]
    assert "max_replicas=3" in sf.reasons[0].message


# Regression: the explainer found a shortfall's reason by releasing equal-or-lower-priority
# work *including the service's own replicas*, so one more replica always "fits" at
# that step and the reason is CAPACITY "held by workloads of equal priority (0) that
# the policy values more: " with an empty list, whoever really holds the room:
# * a higher-priority job (should be HIGHER_PRIORITY naming it);
# * nobody: the cluster is too small (one 2-GPU node, serve("svc", 1 GPU, 10 req/s,
#   target 50) -> 2 replicas; no reason should blame absent workloads).
def test_service_short_of_gpus_has_a_shortfall_blaming_the_holder() -> None:
    # a1 has 4 GPUs; boss (priority 1) holds 2, so svc gets 2 replicas: 20 of 50 req/s.
    p = problem(
        nodes=[node("a1", gpus=4)],
        workloads=[train("boss", 2, priority=1), serve("svc", 1, 10.0, 50.0)],
    )
    r = planned(p)
    [sf] = r.shortfalls
    assert sf.served_rps == 20.0
    assert [x.code for x in sf.reasons] == [ReasonCode.HIGHER_PRIORITY]
    assert "boss" in sf.reasons[0].message


def test_shortfall_on_a_too_small_cluster_does_not_blame_absent_workloads() -> None:
    p = problem(nodes=[node("a1", gpus=2)], workloads=[serve("svc", 1, 10.0, 50.0)])
    r = planned(p)
    [sf] = r.shortfalls
    assert sf.served_rps == 20.0
    for reason in sf.reasons:
        assert not reason.message.rstrip().endswith(":"), reason
        assert reason.code is not ReasonCode.CAPACITY or "held by" not in reason.message, reason


# ---------------------------------------------------------------------------
# The migration cap.


def test_job_blocked_only_by_the_migration_cap_can_be_explained() -> None:
    # a1 (4 GPUs) runs "run" (2 GPUs); a2 has 2 GPUs. "new" (4 GPUs) fits only if "run"
    # moves to a2: without a cap both run (2 − 0.05 = 1.95); with max_migrations = 0
    # "new" waits.
    p = problem(
        nodes=[node("a1", gpus=4), node("a2", gpus=2)],
        workloads=[train("run", 2), train("new", 4)],
        current=[place("run", ("a1", 2))],
    )
    assert planned(p).objective == pytest.approx(1.95)
    r = planned(p, max_migrations=0)
    assert r.objective == pytest.approx(1.0)
    assert reasons(r, "new")


# Regression: in that case the reason was CAPACITY "held by workloads of equal priority (0)
# that the policy values more: run", which is false: the policy values running both
# more (1.95 > 1.0); max_migrations forbids the move (MIGRATION_LIMIT). The explainer
# gives MIGRATION_LIMIT only when the room is already free.
def test_job_blocked_only_by_the_migration_cap_gets_migration_limit() -> None:
    p = problem(
        nodes=[node("a1", gpus=4), node("a2", gpus=2)],
        workloads=[train("run", 2), train("new", 4)],
        current=[place("run", ("a1", 2))],
    )
    code, _ = only_reason(planned(p, max_migrations=0), "new")
    assert code is ReasonCode.MIGRATION_LIMIT


# ---------------------------------------------------------------------------
# explain() for one workload.


def boss_and_minion() -> tuple[Problem, Plan]:
    p = problem(
        nodes=[node("a1", gpus=4)],
        workloads=[
            train("boss", 4, {"a100": 1.0, "h100": 2.0}, types=("a100", "h100"), priority=5),
            train("minion", 4),
        ],
    )
    return p, planned(p)


def test_explain_a_placed_workload() -> None:
    p, r = boss_and_minion()
    e = explain(p, r, "boss")
    assert e.placed and e.placement == r.placement("boss")
    assert "a1" in e.summary and "a100" in e.summary
    # It runs on a100 at 1.0, half of its best (h100, 2.0).
    assert any("50%" in d for d in e.details), e.details


def test_explain_an_unplaced_workload() -> None:
    p, r = boss_and_minion()
    e = explain(p, r, "minion")
    assert not e.placed and e.placement is None
    assert "not placed" in e.summary
    assert any("HIGHER_PRIORITY" in d and "boss" in d for d in e.details), e.details


def test_explain_a_service_and_its_shortfall() -> None:
    p = problem(nodes=[node("a1", gpus=8)], workloads=[serve("svc", 1, 10.0, 50.0, max_replicas=3)])
    e = explain(p, planned(p), "svc")
    assert e.placed
    assert any("30 of 50" in d for d in e.details), e.details
    assert any("max_replicas=3" in d for d in e.details), e.details


def test_explain_says_whether_a_running_workload_moved() -> None:
    p = problem(
        nodes=[node("a1", "a100", 4), node("h1", "h100", 4)],
        workloads=[train("job", 4, {"a100": 1.0, "h100": 2.0}, types=())],
        current=[place("job", ("a1", 4))],
    )
    e = explain(p, planned(p), "job")
    assert any(d.startswith("moves from a1") for d in e.details), e.details
    stay = problem(nodes=p.nodes, workloads=p.workloads, current=[place("job", ("h1", 4))])
    assert "stays where it runs now" in explain(stay, planned(stay), "job").details


def test_explain_an_unknown_workload_is_a_validation_error() -> None:
    p, r = boss_and_minion()
    with pytest.raises(ValidationError, match="nobody"):
        explain(p, r, "nobody")


# ---------------------------------------------------------------------------
# Shadow prices: the LP dual of each GPU type's capacity (throughput policy).
#
# h1: 8 × h100, a1: 4 × a100. Three 4-GPU jobs that run only on h100 (ρ = 1 each):
# two fit. One more h100 GPU would run a quarter of the third job in the LP:
# shadow price 1/4. The a100 GPUs are idle (nothing can use them): 0.


def test_shadow_price_of_the_scarce_type_is_positive_and_of_an_idle_type_zero() -> None:
    p = problem(
        nodes=[node("h1", "h100", 8), node("a1", "a100", 4)],
        workloads=[train(f"j{i}", 4, {"h100": 1.0}, types=()) for i in range(3)],
    )
    r = planned(p)
    assert r.objective == pytest.approx(2.0)
    assert r.shadow_prices["h100"] == pytest.approx(0.25)
    assert r.shadow_prices["a100"] == pytest.approx(0.0)
    assert r.shadow_prices["l4"] == pytest.approx(0.0)  # no nodes at all


def test_shadow_prices_are_zero_when_nothing_is_scarce() -> None:
    p = problem(nodes=[node("a1", gpus=8)], workloads=[train("j", 4)])
    assert all(v == pytest.approx(0.0) for v in planned(p).shadow_prices.values())


def test_under_fcfs_the_priorities_named_are_the_holders_own() -> None:
    # fcfs places by submission, not priority: the earlier priority-0 jobs fill the
    # node and the later priority-1 job waits. The reason names the holders' priority
    # (0), not the waiting job's (it said "workloads of equal priority (1)").
    p = problem(
        nodes=[node("n1", "a100", 4)],
        workloads=[
            train("early-a", 2, submit_time_s=1.0),
            train("early-b", 2, submit_time_s=2.0),
            train("late-high", 4, priority=1, submit_time_s=3.0),
        ],
    )
    r = plan(p, "fcfs", OPTIONS)
    assert {x.workload_id for x in r.placements} == {"early-a", "early-b"}
    code, message = only_reason(r, "late-high")
    assert code is ReasonCode.CAPACITY
    assert "lower-priority workloads (priority 0; this one has 1)" in message, message
    assert "equal priority (1)" not in message
    assert "early-a, early-b" in message
