"""verify(): the independent checker, on hand-built problems and plans."""

from __future__ import annotations

import pytest

from solver.errors import UnknownPolicyError
from solver.model import Plan, PlanMetrics, Problem
from solver.verify import objective, verify
from tests.builders import gpu_type, node, nodes, place, plan_of, problem, serve, tenant, train


def violations(p: Problem, plan: Plan, **kw: object) -> list[str]:
    return list(verify(p, plan, **kw).violations)  # type: ignore[arg-type]


def only(p: Problem, plan: Plan, *fragments: str, **kw: object) -> None:
    """The plan breaks exactly one rule per fragment, each message containing it."""
    found = violations(p, plan, **kw)
    assert len(found) == len(fragments), found
    for fragment, message in zip(fragments, found, strict=True):
        assert fragment in message, found


# ---------------------------------------------------------------------------
# A correct plan, with its objective worked out by hand


def mixed_problem() -> Problem:
    return problem(
        nodes=[
            node("a1", "a100", 8, zone="z1", domain="r1"),
            node("a2", "a100", 8, zone="z1", domain="r1"),
            node("a3", "a100", 8, zone="z2", domain="r2"),
            node("h1", "h100", 4, zone="z1", domain="r1"),
            node("h2", "h100", 4, zone="z2", domain="r2"),
        ],
        tenants=[tenant("research", 24, per_type={"h100": 4}, weight=2.0), tenant("product")],
        workloads=[
            # 12 GPUs > 8 per node: two whole a100 nodes in one domain, 6 + 6.
            train("big", 12, {"a100": 2.0, "h100": 4.0}, tenant="research", locality="domain"),
            # Elastic: best is 4 GPUs on h100 (3.0).
            train("small", shapes={2: {"a100": 1.0, "h100": 2.0}, 4: {"a100": 1.5, "h100": 3.0}}),
            # 2 replicas of 1 GPU, spread over the two zones.
            serve("chat", gpus={"h100": 1, "a100": 2}, rps={"h100": 10, "a100": 6}, target_rps=30,
                  min_replicas=2, spread="zone", tenant="product", weight=3.0),
        ],
    )  # fmt: skip


def mixed_plan() -> Plan:
    return plan_of(
        place("big", ("a1", 6), ("a2", 6), type="a100"),
        place("small", ("a3", 2)),
        place("chat", ("h1", 1), ("h2", 1), type="h100"),
    )


def test_a_correct_plan_has_no_violations() -> None:
    report = verify(mixed_problem(), mixed_plan())
    assert report.violations == ()
    assert report.ok


def test_objectives_and_metrics_of_the_correct_plan() -> None:
    p, plan = mixed_problem(), mixed_plan()
    # big:   w = 1 × 2 (research) = 2;  ρ = 2.0 / max(2.0, 4.0) = 0.5      -> 1.0
    # small: w = 1;                      ρ = 1.0 / max(1, 2, 1.5, 3) = 1/3  -> 1/3
    # chat:  w = 3 × 1 = 3;              f = min(1, 2 × 10 / 30) = 2/3      -> 2.0
    assert objective(p, plan.placements, "throughput") == pytest.approx(1.0 + 1 / 3 + 2.0)
    # cost: 14 a100 × $2 + 2 h100 × $4 = $36/h
    assert objective(p, plan.placements, "cost") == pytest.approx(-36.0)
    # fairness: min(0.5 / 2, (1/3) / 1, (2/3) / 3) = 2/9
    assert objective(p, plan.placements, "fairness") == pytest.approx(2 / 9)
    for baseline in ("fcfs", "sjf", "priority", "first-fit", "best-fit"):
        assert objective(p, plan.placements, baseline) == pytest.approx(1.0 + 1 / 3 + 2.0)

    report = verify(p, plan, policy="cost")
    assert report.objective == pytest.approx(-36.0)
    assert report.metrics == PlanMetrics(
        gpus_used=16,
        gpus_total=32,
        cost_per_hour=pytest.approx(36.0),  # type: ignore[arg-type]
        normalized_throughput=pytest.approx(1 + 1 / 3),  # type: ignore[arg-type]
        served_fraction=pytest.approx(2.0),  # type: ignore[arg-type]
        migrations=0,
        placed=3,
        unplaced=0,
    )


def test_fairness_of_an_empty_plan_is_zero() -> None:
    p = problem(nodes=[node("n1")], workloads=[train("j")])
    assert objective(p, (), "fairness") == 0.0
    report = verify(p, plan_of(unplaced=["j"]), policy="fairness")
    assert report.ok
    assert report.objective == 0.0
    assert report.metrics.unplaced == 1


def test_unknown_policy_is_an_error() -> None:
    p = mixed_problem()
    with pytest.raises(UnknownPolicyError, match="nope"):
        objective(p, (), "nope")
    with pytest.raises(UnknownPolicyError):
        verify(p, mixed_plan(), policy="nope")


def test_rho_only_counts_usable_types() -> None:
    # h100 would give 10, but it is not allowed; l4 has too little memory (24 < 40).
    p = problem(
        nodes=[node("n1")],
        workloads=[train("j", 2, {"a100": 2.0, "h100": 10.0, "l4": 20.0}, allowed=("a100", "l4"),
                         gpu_memory_gib=40)],
    )  # fmt: skip
    assert objective(p, [place("j", ("n1", 2))], "throughput") == pytest.approx(1.0)


def test_served_fraction_is_capped_at_one_and_uses_the_tenant_weight() -> None:
    p = problem(
        nodes=[node("n1")],
        tenants=[tenant("t", weight=0.5)],
        workloads=[serve("s", rps=10, target_rps=15, tenant="t", weight=4)],
    )
    # 3 × 10 rps ≥ 15: f = 1; w = 4 × 0.5 = 2.
    assert objective(p, [place("s", ("n1", 1), ("n1", 1), ("n1", 1))], "throughput") == pytest.approx(2.0)
    # unknown price counts as 0
    p2 = problem(nodes=[node("n1", "x")], gpu_types=[gpu_type("x")], workloads=[serve("s", types=["x"])])
    assert objective(p2, [place("s", ("n1", 1))], "cost") == 0.0


# ---------------------------------------------------------------------------
# Rule 1: references


def test_references() -> None:
    p = problem(nodes=[node("n1")], workloads=[train("j1"), train("j2"), train("j3"), train("j4")])
    plan = plan_of(
        place("ghost", ("n1", 1)),
        place("j1", ("n1", 1)),
        place("j1", ("n1", 1)),
        place("j2", ("n9", 1)),
        place("j3"),
        unplaced=["j1", "nobody", "j3", "j3"],
    )
    assert violations(p, plan) == [
        'placement of unknown workload "ghost"',
        'workload "j1" is placed more than once',
        'workload "j2" has a shard on unknown node "n9"',
        'workload "j3" has a placement with no shards',
        'workload "j1" is both placed and listed as unplaced',
        'unplaced entry for unknown workload "nobody"',
        'workload "j3" is both placed and listed as unplaced',
        'workload "j3" is listed as unplaced more than once',
        'workload "j4" is neither placed nor listed as unplaced',
    ]


def test_zero_gpu_shard() -> None:
    p = problem(nodes=[node("n1")], workloads=[serve("s", gpus=1)])
    found = violations(p, plan_of(place("s", ("n1", 1), ("n1", 0))))
    assert 'workload "s" has a shard of 0 GPUs on node "n1"' in found


# ---------------------------------------------------------------------------
# Rule 2: node states


def test_nothing_on_down_nodes() -> None:
    p = problem(nodes=[node("n1", state="down")], workloads=[train("j")])
    only(p, plan_of(place("j", ("n1", 1))), 'workload "j" has a shard on node "n1", which is down')


def test_draining_nodes_keep_only_what_runs_there() -> None:
    p = problem(
        nodes=[node("n1", state="draining")],
        workloads=[train("j", 2), serve("s")],
        current=[place("j", ("n1", 2)), place("s", ("n1", 1))],
    )
    assert violations(p, plan_of(place("j", ("n1", 2)), place("s", ("n1", 1)))) == []
    # A second replica there is new.
    only(
        p,
        plan_of(place("j", ("n1", 2)), place("s", ("n1", 1), ("n1", 1))),
        'workload "s" gets a new shard of 1 GPUs on node "n1", which is draining',
    )
    fresh = problem(nodes=p.nodes, workloads=[train("k")])
    only(fresh, plan_of(place("k", ("n1", 1))), "draining")


def test_a_training_gang_that_changes_keeps_nothing_on_a_draining_node() -> None:
    """A resized gang is relaunched whole: its shard on a draining node is a new one.
    (Hypothesis found the solver's bound below such a plan, which the rule allowed.)"""
    p = problem(
        nodes=[node("n1", gpus=2), node("n3", gpus=2, state="draining")],
        workloads=[train("j", shapes={1: 0.5, 3: 1.0})],
        current=[place("j", ("n3", 1))],
    )
    assert violations(p, plan_of(place("j", ("n3", 1)))) == []  # stays as it runs
    only(
        p,
        plan_of(place("j", ("n1", 2), ("n3", 1))),
        'workload "j" gets a new shard of 1 GPUs on node "n3", which is draining',
    )


# ---------------------------------------------------------------------------
# Rule 3: capacity


def test_gpu_capacity() -> None:
    p = problem(nodes=[node("n1", gpus=4)], workloads=[train("j1", 3), train("j2", 2)])
    only(p, plan_of(place("j1", ("n1", 3)), place("j2", ("n1", 2))), 'node "n1" is given 5 GPUs but has 4')


def test_cpu_and_memory_capacity() -> None:
    p = problem(
        nodes=[node("n1", gpus=8, cpus=16, memory_gib=100)],
        workloads=[
            train("j", 4, cpus_per_gpu=3, memory_gib_per_gpu=20),  # 12 CPUs, 80 GiB
            serve("s", cpus_per_replica=5, memory_gib_per_replica=30),  # 5 CPUs, 30 GiB
        ],
    )
    only(
        p,
        plan_of(place("j", ("n1", 4)), place("s", ("n1", 1))),
        'node "n1" is given 17 CPUs but has 16',
        'node "n1" is given 110 GiB of memory but has 100',
    )
    assert violations(p, plan_of(place("j", ("n1", 4)), unplaced=["s"])) == []


def test_zero_cpus_or_memory_means_not_tracked() -> None:
    p = problem(
        nodes=[node("n1", gpus=8)],
        workloads=[train("j", 4, cpus_per_gpu=100, memory_gib_per_gpu=1000)],
    )
    assert violations(p, plan_of(place("j", ("n1", 4)))) == []


# ---------------------------------------------------------------------------
# Rule 4: types, labels and shapes


def test_one_gpu_type_per_workload() -> None:
    p = problem(
        nodes=[node("a", "a100", 4), node("h", "h100", 4)], workloads=[serve("s", types=["a100", "h100"])]
    )
    only(p, plan_of(place("s", ("a", 1), ("h", 1))), 'workload "s" mixes GPU types a100, h100')
    only(
        p,
        plan_of(place("s", ("a", 1), type="h100")),
        'workload "s" is placed as GPU type "h100" on nodes of type a100',
    )


def test_allowed_types_and_selector() -> None:
    p = problem(
        nodes=[node("h", "h100", 4, labels={"pool": "batch"}), node("a", "a100", labels={"pool": "prod"})],
        workloads=[train("j", 2, {"a100": 1, "h100": 2}, allowed=["a100"], selector={"pool": "prod"})],
    )
    assert violations(p, plan_of(place("j", ("a", 2)))) == []
    only(
        p,
        plan_of(place("j", ("h", 2))),
        'workload "j" runs on GPU type "h100", which it does not allow',
        'workload "j" is on node "h", which lacks its node_selector labels',
    )


def test_training_memory_and_shapes() -> None:
    p = problem(
        nodes=[node("l", "l4", 8), node("a", "a100", 8)],
        workloads=[
            train("j", 2, {"a100": 1, "l4": 1}, gpu_memory_gib=40),
            train("e", shapes={2: {"a100": 1.0}, 4: {"a100": 0.0, "l4": 1.0}}),
        ],
    )
    only(
        p,
        plan_of(place("j", ("l", 2)), place("e", ("a", 3))),
        'workload "j" needs 40 GiB per GPU but "l4" has 24',
        'workload "e" gets 3 GPUs, not one of its shapes (2, 4)',
    )
    only(
        p,
        plan_of(place("j", ("a", 2)), place("e", ("a", 4))),
        'workload "e" has no throughput with 4 GPUs of type "a100"',
    )


def test_replica_types_and_sizes() -> None:
    p = problem(
        nodes=[node("a", "a100"), node("l", "l4")],
        workloads=[serve("s", gpus={"a100": 1}, rps={"a100": 5}), serve("t", gpus=2, min_replicas=2)],
    )
    only(
        p,
        plan_of(place("s", ("l", 1)), place("t", ("a", 2), ("a", 1))),
        'service "s" cannot run on GPU type "l4"',
        'service "t" has a replica of 1 GPUs on node "a", needs 2',
    )


# ---------------------------------------------------------------------------
# Rule 5: gangs and locality


def test_a_gang_that_fits_on_one_node_is_one_shard() -> None:
    p = problem(nodes=[node("n1", gpus=8), node("n2", gpus=8)], workloads=[train("j", 8)])
    only(p, plan_of(place("j", ("n1", 4), ("n2", 4))), 'training job "j" (8 GPUs) fits on node "n1"')
    only(
        p,
        plan_of(place("j", ("n1", 4), ("n1", 4))),
        'training job "j" has 2 shards on node "n1"',
        "fits on node",
    )


def test_multi_node_gangs() -> None:
    p = problem(
        nodes=[
            node("a1", gpus=4, zone="z1", domain="r1"),
            node("a2", gpus=4, zone="z1", domain="r2"),
            node("a3", gpus=4, zone="z2", domain="r1"),
            node("b1", gpus=2, zone="z1", domain="r1"),
        ],
        workloads=[
            train("node", 6, locality="node"),
            train("dom", 6, locality="domain"),
            train("zone", 6, locality="zone"),
            train("any", 6, locality="any"),
        ],
    )
    only(p, plan_of(place("node", ("a1", 3), ("a2", 3)), unplaced=["dom", "zone", "any"]),
         'training job "node" has locality node but spans 2 nodes')  # fmt: skip
    only(p, plan_of(place("dom", ("a1", 3), ("a2", 3)), unplaced=["node", "zone", "any"]),
         'training job "dom" has locality domain but spans several domains')  # fmt: skip
    only(p, plan_of(place("zone", ("a2", 3), ("a3", 3)), unplaced=["node", "dom", "any"]),
         'training job "zone" has locality zone but spans several zones')  # fmt: skip
    assert violations(p, plan_of(place("zone", ("a1", 3), ("a2", 3)), unplaced=["node", "dom", "any"])) == []
    assert violations(p, plan_of(place("any", ("a2", 3), ("a3", 3)), unplaced=["node", "dom", "zone"])) == []
    only(p, plan_of(place("any", ("a1", 4), ("b1", 2)), unplaced=["node", "dom", "zone"]),
         'training job "any" spans nodes of different sizes (2, 4)',
         'training job "any" is split unevenly (4, 2 GPUs)')  # fmt: skip
    only(p, plan_of(place("any", ("a1", 2), ("a2", 2), ("a3", 2)), unplaced=["node", "dom", "zone"]),
         'training job "any" (6 GPUs) uses 3 nodes, should use 2')  # fmt: skip


def test_multi_node_gangs_take_whole_nodes() -> None:
    p = problem(nodes=nodes("a", 2, gpus=4), workloads=[train("g", 6), train("x", 1), serve("s")])
    only(
        p,
        plan_of(place("g", ("a1", 3), ("a2", 3)), place("x", ("a1", 1)), place("s", ("a2", 1))),
        'multi-node training job "g" shares node "a1" with "x"',
        'multi-node training job "g" shares node "a2" with "s"',
    )


# ---------------------------------------------------------------------------
# Rule 6: replicas and spread


def test_replica_bounds() -> None:
    p = problem(nodes=[node("n1")], workloads=[serve("s", min_replicas=2, max_replicas=3)])
    only(p, plan_of(place("s", ("n1", 1))), 'service "s" has 1 replicas, fewer than min_replicas 2')
    only(p, plan_of(place("s", *[("n1", 1)] * 4)), 'service "s" has 4 replicas, more than max_replicas 3')
    assert violations(p, plan_of(place("s", *[("n1", 1)] * 3))) == []


def test_zone_spread() -> None:
    p = problem(
        nodes=[node("a", zone="z1"), node("b", zone="z2"), node("c", zone="z3", state="down")],
        workloads=[serve("s", min_replicas=3, spread="zone")],
    )
    # Two eligible zones (z3 is down): at most ceil(3 / 2) = 2 per zone.
    assert violations(p, plan_of(place("s", ("a", 1), ("a", 1), ("b", 1)))) == []
    only(
        p,
        plan_of(place("s", ("a", 1), ("a", 1), ("a", 1))),
        'service "s" has 3 of 3 replicas in zone "z1" (at most 2 over 2 units)',
    )


def test_domain_and_node_spread() -> None:
    p = problem(
        nodes=[
            node("a", zone="z", domain="d1"),
            node("b", zone="z", domain="d1"),
            node("c", zone="z", domain="d2"),
        ],
        workloads=[
            serve("dom", min_replicas=2, spread="domain"),
            serve("per-node", min_replicas=3, spread="node"),
        ],
    )
    only(
        p,
        plan_of(place("dom", ("a", 1), ("b", 1)), place("per-node", ("a", 1), ("b", 1), ("c", 1))),
        'service "dom" has 2 of 2 replicas in domain "z/d1" (at most 1 over 2 units)',
    )
    only(
        p,
        plan_of(place("dom", ("a", 1), ("c", 1)), place("per-node", ("a", 1), ("a", 1), ("c", 1))),
        'service "per-node" has 2 of 3 replicas in node "a"',
    )


def test_spread_units_only_count_nodes_that_can_host_a_replica() -> None:
    # z2 only has an l4 (not usable), z3 a node without the label, z4 a node too small.
    p = problem(
        nodes=[
            node("a", zone="z1", labels={"env": "prod"}),
            node("l", "l4", zone="z2", labels={"env": "prod"}),
            node("b", zone="z3"),
            node("c", gpus=1, zone="z4", labels={"env": "prod"}),
        ],
        workloads=[serve("s", gpus=2, min_replicas=2, spread="zone", selector={"env": "prod"})],
    )
    assert violations(p, plan_of(place("s", ("a", 2), ("a", 2)))) == []


# ---------------------------------------------------------------------------
# Rule 7: quotas


def test_quotas() -> None:
    p = problem(
        nodes=[node("a"), node("h", "h100")],
        tenants=[tenant("t", 6, per_type={"h100": 2})],
        workloads=[train("j1", 4, tenant="t"), train("j2", 3, {"h100": 1.0}, tenant="t"), train("j3", 4)],
    )
    # j3 has no tenant: no quota.
    only(
        p,
        plan_of(place("j1", ("a", 4)), place("j2", ("h", 3)), place("j3", ("a", 4))),
        'tenant "t" holds 7 GPUs, quota 6',
        'tenant "t" holds 3 GPUs of type "h100", quota 2',
    )


# ---------------------------------------------------------------------------
# Rule 8: migrations


def migration_problem() -> Problem:
    return problem(
        nodes=[node("n1"), node("n2"), node("n3", state="down"), node("n4", state="draining")],
        workloads=[
            train("pinned", 2, preemptible=False),
            train("mover", 2),
            train("dead", 2, preemptible=False),
            train("drained", 2, preemptible=False),
            serve("s", min_replicas=2),
        ],
        current=[
            place("pinned", ("n1", 2)),
            place("mover", ("n1", 2)),
            place("dead", ("n3", 2)),  # on a down node: not running
            place("drained", ("n4", 2)),
            place("s", ("n1", 1), ("n2", 1)),
        ],
    )


def test_migrations_are_counted_and_penalized() -> None:
    p = migration_problem()
    plan = plan_of(
        place("pinned", ("n1", 2)),
        place("mover", ("n2", 2)),  # moved: 1
        place("dead", ("n2", 2)),  # restarted after its node died: not a migration
        place("drained", ("n2", 2)),  # moved off a draining node: 2
        place("s", ("n2", 1), ("n1", 1)),  # same multiset of shards: kept
    )
    report = verify(p, plan, migration_penalty=0.5)
    assert report.ok, report.violations
    assert report.metrics.migrations == 2
    # 4 training jobs with ρ = 1 and a fully served service, minus 2 × 0.5
    assert report.objective == pytest.approx(5 - 1.0)
    # "drained" had to move (its node drains): forced moves are always allowed, others count.
    only(
        p,
        plan,
        "2 migrations (mover, drained, 1 of them forced), more than max_migrations 1",
        max_migrations=1,
    )
    assert violations(p, plan, max_migrations=2) == []


def test_non_preemptible_jobs_stay() -> None:
    p = migration_problem()
    only(
        p,
        plan_of(
            place("mover", ("n1", 2)),
            place("s", ("n1", 1), ("n2", 1)),
            unplaced=["pinned", "dead", "drained"],
        ),
        'non-preemptible training job "pinned" is stopped',
    )
    only(
        p,
        plan_of(place("pinned", ("n2", 2)), place("mover", ("n1", 2)), place("s", ("n1", 1), ("n2", 1)),
                unplaced=["dead", "drained"]),
        'non-preemptible training job "pinned" is moved',
    )  # fmt: skip


def test_workloads_gone_from_the_problem_are_not_migrations() -> None:
    p = problem(nodes=[node("n1")], workloads=[train("j")], current=[place("old", ("n1", 8))])
    assert verify(p, plan_of(place("j", ("n1", 1)))).metrics.migrations == 0


# ---------------------------------------------------------------------------
# Rule 9: strict priority


def test_a_higher_priority_job_left_out_for_a_lower_one() -> None:
    p = problem(
        nodes=[node("n1", gpus=8)], workloads=[train("hi", 8, priority=5), train("lo", 4, priority=1)]
    )
    only(
        p,
        plan_of(place("lo", ("n1", 4)), unplaced=["hi"]),
        'workload "hi" (priority 5) is left out while lower-priority work holds node "n1"',
    )
    # Equal priority: a policy choice, not a priority violation.
    same = problem(nodes=p.nodes, workloads=[train("hi", 8, priority=1), train("lo", 4, priority=1)])
    assert violations(same, plan_of(place("lo", ("n1", 4)), unplaced=["hi"])) == []


def test_priority_respects_cpus_and_fit() -> None:
    p = problem(
        nodes=[node("n1", gpus=8, cpus=10)],
        workloads=[
            train("hi", 4, cpus_per_gpu=2, priority=5),  # needs 8 CPUs
            train("mid", 4, cpus_per_gpu=2.5, priority=5),  # holds 10 CPUs: hi can never fit
            train("huge", 16, priority=9),  # larger than any node: not checked
        ],
    )
    assert violations(p, plan_of(place("mid", ("n1", 4)), unplaced=["hi", "huge"])) == []


def test_no_priority_violation_when_lower_work_cannot_be_removed() -> None:
    p = problem(
        nodes=[node("n1", gpus=8)],
        workloads=[train("hi", 8, priority=5), train("lo", 4, priority=1, preemptible=False)],
        current=[place("lo", ("n1", 4))],
    )
    assert violations(p, plan_of(place("lo", ("n1", 4)), unplaced=["hi"])) == []
    # Preemptible but kept under a migration cap: removing it would be a migration.
    p2 = problem(nodes=p.nodes, workloads=[train("hi", 8, priority=5), train("lo", 4, priority=1)],
                 current=p.current)  # fmt: skip
    assert violations(p2, plan_of(place("lo", ("n1", 4)), unplaced=["hi"]), max_migrations=0) == []
    only(p2, plan_of(place("lo", ("n1", 4)), unplaced=["hi"]), "left out")


def test_no_priority_violation_when_it_fits_without_removals() -> None:
    # "hi" could go to n2 as it is: leaving it out is the policy's business, not priority's.
    p = problem(
        nodes=nodes("n", 2, gpus=8), workloads=[train("hi", 8, priority=5), train("lo", 8, priority=1)]
    )
    assert violations(p, plan_of(place("lo", ("n1", 8)), unplaced=["hi"])) == []


def test_priority_over_quota() -> None:
    p = problem(
        nodes=nodes("n", 2, gpus=8),
        tenants=[tenant("t", 8)],
        workloads=[train("hi", 8, tenant="t", priority=5), train("lo", 8, tenant="t", priority=1)],
    )
    only(p, plan_of(place("lo", ("n1", 8)), unplaced=["hi"]), 'workload "hi" (priority 5) is left out')


def test_priority_for_services() -> None:
    p = problem(
        nodes=[node("a", gpus=2, zone="z1"), node("b", gpus=2, zone="z2")],
        workloads=[
            serve("hi", gpus=2, min_replicas=2, spread="zone", priority=3),
            train("lo", 2, priority=0),
        ],
    )
    only(
        p,
        plan_of(place("lo", ("a", 2)), unplaced=["hi"]),
        'service "hi" (priority 3) is left out while lower-priority work holds the capacity',
    )
    # Only one zone has room even after removals: two replicas cannot spread.
    p2 = problem(
        nodes=[node("a", gpus=4, zone="z1"), node("b", gpus=4, zone="z2")],
        workloads=[serve("hi", gpus=2, min_replicas=2, spread="zone", priority=3),
                   train("lo", 2, priority=0), train("mid", 4, priority=3)],
    )  # fmt: skip
    assert violations(p2, plan_of(place("lo", ("a", 2)), place("mid", ("b", 4)), unplaced=["hi"])) == []


def test_priority_treats_multi_node_gang_nodes_as_full() -> None:
    def case(gang_priority: int) -> tuple[Problem, Plan]:
        p = problem(
            nodes=[*nodes("n", 2, gpus=8), node("l1", "l4", 8)],
            tenants=[tenant("t", 10)],
            workloads=[
                train("gang", 9, priority=gang_priority),  # 5 + 4 on n1, n2: both nodes whole
                train("lo", 8, {"l4": 1.0}, tenant="t", priority=0),
                train("hi", 4, tenant="t", priority=5),  # quota: 8 + 4 > 10 unless "lo" goes
            ],
        )
        return p, plan_of(place("gang", ("n1", 5), ("n2", 4)), place("lo", ("l1", 8)), unplaced=["hi"])

    # n2's 4 idle GPUs belong to the gang: "hi" has nowhere to go.
    assert violations(*case(gang_priority=9)) == []
    # A lower-priority gang could be removed, freeing n1 and n2.
    only(*case(gang_priority=1), 'workload "hi" (priority 5) is left out')


def test_service_migrations() -> None:
    p = problem(
        nodes=[node("n1"), node("n2"), node("gone", state="down")],
        workloads=[serve("grow"), serve("shrink", min_replicas=1), serve("lost"), serve("half")],
        current=[
            place("grow", ("n1", 1)),
            place("shrink", ("n1", 1), ("n2", 1)),
            place("lost", ("gone", 1)),  # only on a down node: not running
            place("half", ("gone", 1), ("n2", 1)),  # still runs on n2
        ],
    )
    plan = plan_of(
        place("grow", ("n1", 1), ("n2", 1)),  # adding a replica moves nothing
        place("shrink", ("n1", 1)),  # loses its n2 replica: a migration
        place("lost", ("n1", 1)),
        place("half", ("n2", 1), ("n1", 1)),  # keeps its live replica
    )
    report = verify(p, plan)
    assert report.ok, report.violations
    assert report.metrics.migrations == 1
    assert verify(p, plan_of(*plan.placements[:3], unplaced=["half"])).metrics.migrations == 2


def test_moves_forced_by_a_changed_input() -> None:
    # "fixed" runs on 4 GPUs but now asks for 8: it cannot stay, even though it is
    # non-preemptible, and that move does not count against the cap.
    p = problem(
        nodes=nodes("n", 2, gpus=8),
        workloads=[train("fixed", 8, preemptible=False), train("free", 2)],
        current=[place("fixed", ("n1", 4)), place("free", ("n2", 2))],
    )
    plan = plan_of(place("fixed", ("n1", 8)), place("free", ("n2", 2)))
    assert violations(p, plan, max_migrations=0) == []
    moved = plan_of(place("fixed", ("n2", 8)), place("free", ("n1", 2)))
    only(
        p, moved, "2 migrations (fixed, free, 1 of them forced), more than max_migrations 1", max_migrations=1
    )
    assert violations(p, moved, max_migrations=2) == []


def test_spread_units_are_counted_for_the_service_type() -> None:
    # Three zones have a100s, but the service runs on h100s, found in two zones only.
    p = problem(
        nodes=[
            node("a1", zone="z1"),
            node("a2", zone="z2"),
            node("a3", zone="z3"),
            node("h1", "h100", zone="z1"),
            node("h2", "h100", zone="z2"),
        ],
        workloads=[serve("s", types=["a100", "h100"], min_replicas=3, spread="zone")],
    )
    # On h100: 2 units, at most ceil(3 / 2) = 2 per zone (3 units would allow only 1).
    assert violations(p, plan_of(place("s", ("h1", 1), ("h1", 1), ("h2", 1)))) == []
    # On a100: 3 units, at most 1 per zone.
    only(
        p,
        plan_of(place("s", ("a1", 1), ("a1", 1), ("a2", 1))),
        'service "s" has 2 of 3 replicas in zone "z1" (at most 1 over 3 units)',
    )
