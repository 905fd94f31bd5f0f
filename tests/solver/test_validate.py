"""validate(): every rule, reported with its path in the input files' scheme."""

from __future__ import annotations

import math

import pytest

from solver.errors import ValidationError
from solver.model import GangShape, Problem, TrainingSpec, Workload
from solver.validate import validate
from tests.builders import gpu_type, node, place, problem, serve, tenant, train


def errors(p: Problem) -> list[str]:
    """Every violation as ``path: message``; [] for a valid problem."""
    try:
        validate(p)
    except ValidationError as exc:
        assert str(exc) == "\n".join(str(v) for v in exc.violations)
        return [str(v) for v in exc.violations]
    return []


def test_a_valid_problem_passes() -> None:
    p = problem(
        nodes=[node("n1", gpus=8, cpus=64, memory_gib=512, zone="z1"), node("n2", "h100", 4)],
        tenants=[tenant("research", 16, per_type={"h100": 4}, weight=2)],
        workloads=[
            train("j1", gpus=4, throughput={"a100": 1, "h100": 2}, tenant="research", deadline_s=60),
            train("j2", shapes={2: 1.0, 4: {"a100": 1.8, "h100": 0.0}}, remaining_work=1e6),
            serve("s1", gpus={"a100": 1, "l4": 2}, rps={"a100": 10, "l4": 4}, target_rps=30, max_replicas=5),
            serve("s2", min_replicas=0, max_replicas=1, allowed=("a100",)),
        ],
        current=[place("j1", ("n1", 4))],
    )
    assert errors(p) == []
    validate(p)  # does not raise


def test_an_empty_problem_is_valid() -> None:
    assert errors(problem()) == []


def test_gpu_types() -> None:
    p = problem(
        gpu_types=[
            gpu_type("a100", 80, 2.0),
            gpu_type("", 40),
            gpu_type("a100", 0, -1.0),
            gpu_type("x", math.nan, math.inf),
        ]
    )
    assert errors(p) == [
        "gpu_types[1].name: must not be empty",
        'gpu_types[2].name: duplicate name "a100" (also gpu_types[0])',
        "gpu_types[2].memory_gib: must be > 0",
        "gpu_types[2].cost_per_hour: must be ≥ 0",
        "gpu_types[3].memory_gib: must be finite",
        "gpu_types[3].cost_per_hour: must be finite",
    ]


def test_nodes() -> None:
    p = problem(
        nodes=[
            node("n1"),
            node("n1", "h200"),
            node("", gpus=0, cpus=-1, memory_gib=-2),
            node("n3", ""),
        ]
    )
    assert errors(p) == [
        'nodes[1].id: duplicate id "n1" (also nodes[0])',
        'nodes[1].gpu_type: unknown GPU type "h200"',
        "nodes[2].id: must not be empty",
        "nodes[2].gpus: must be ≥ 1",
        "nodes[2].cpus: must be ≥ 0",
        "nodes[2].memory_gib: must be ≥ 0",
        "nodes[3].gpu_type: must not be empty",
    ]


def test_tenants() -> None:
    p = problem(
        tenants=[
            tenant("t1", 0),
            tenant("t1", -1, per_type={"h200": 1, "a100": -2}, weight=0),
            tenant("", weight=-1),
        ]
    )
    assert errors(p) == [
        'tenants[1].name: duplicate name "t1" (also tenants[0])',
        "tenants[1].max_gpus: must be ≥ 0",
        'tenants[1].max_gpus_per_type: unknown GPU type "h200"',
        'tenants[1].max_gpus_per_type["a100"]: must be ≥ 0',
        "tenants[1].weight: must be > 0",
        "tenants[2].name: must not be empty",
        "tenants[2].weight: must be > 0",
    ]


def test_workload_header() -> None:
    p = problem(
        tenants=[tenant("t1")],
        workloads=[
            train("j1", tenant="t1"),
            train("j1", tenant="nobody", weight=0, allowed=("a100", "h200")),
            serve("", weight=-1, submit_time_s=math.inf),
        ],
    )
    assert errors(p) == [
        'workloads[1].id: duplicate id "j1" (also workloads[0])',
        'workloads[1].tenant: unknown tenant "nobody"',
        "workloads[1].weight: must be > 0",
        'workloads[1].allowed_gpu_types[1]: unknown GPU type "h200"',
        "workloads[2].id: must not be empty",
        "workloads[2].weight: must be > 0",
        "workloads[2].submit_time_s: must be finite",
    ]


def test_tenant_names_are_free_when_no_tenants_are_given() -> None:
    assert errors(problem(workloads=[train("j1", tenant="anyone")])) == []


def test_exactly_one_kind() -> None:
    t = train("x").training
    s = serve("x").inference
    p = problem(workloads=[Workload("neither"), Workload("both", training=t, inference=s)])
    assert errors(p) == [
        "workloads[0]: must have exactly one of training or inference",
        "workloads[1]: must have exactly one of training or inference, not both",
    ]


def test_fixed_gang_is_reported_at_training_gpus_and_throughput() -> None:
    p = problem(
        workloads=[
            train("j1", gpus=0, throughput={"a100": -1.0, "h200": 3.0}),
            train("j2", throughput={"a100": 0.0}),
        ]
    )
    assert errors(p) == [
        "workloads[0].training.gpus: must be ≥ 1",
        'workloads[0].training.throughput: unknown GPU type "h200"',
        'workloads[0].training.throughput["a100"]: must be ≥ 0',
        "workloads[0].training.throughput: needs a positive throughput on at least one known GPU type",
        "workloads[1].training.throughput: needs a positive throughput on at least one known GPU type",
    ]


def test_elastic_shapes_are_reported_at_training_elastic() -> None:
    p = problem(workloads=[train("j1", shapes={2: 1.0, 4: {"h200": 2.0}, 0: 0.0})])
    # Two shapes with the same count cannot be written with the builder's dict.
    dup = Workload(
        "j2",
        training=TrainingSpec(shapes=(GangShape(4, {"a100": 1.0}), GangShape(4, {"a100": 2.0}))),
    )
    none = Workload("j3", training=TrainingSpec(shapes=()))
    p = problem(workloads=[*p.workloads, dup, none])
    assert errors(p) == [
        'workloads[0].training.elastic[1].throughput: unknown GPU type "h200"',
        "workloads[0].training.elastic[2].gpus: must be ≥ 1",
        "workloads[1].training.elastic[1].gpus: duplicate GPU count 4 (also elastic[0])",
        "workloads[2].training: needs gpus (or elastic shapes)",
    ]


def test_elastic_without_any_positive_throughput() -> None:
    p = problem(workloads=[train("j1", shapes={2: 0.0, 4: {"h200": 2.0}})])
    assert errors(p) == [
        'workloads[0].training.elastic[1].throughput: unknown GPU type "h200"',
        "workloads[0].training.elastic: needs a positive throughput on at least one known GPU type",
    ]


def test_training_numbers() -> None:
    p = problem(
        workloads=[
            train(
                "j1",
                gpu_memory_gib=-1,
                cpus_per_gpu=-1,
                memory_gib_per_gpu=math.nan,
                remaining_work=0,
                deadline_s=-5,
            ),
            train("j2", remaining_work=None, deadline_s=None),
        ]
    )
    assert errors(p) == [
        "workloads[0].training.gpu_memory_gib: must be ≥ 0",
        "workloads[0].training.cpus_per_gpu: must be ≥ 0",
        "workloads[0].training.memory_gib_per_gpu: must be finite",
        "workloads[0].training.remaining_work: must be > 0",
        "workloads[0].training.deadline_s: must be > 0",
    ]


def test_inference() -> None:
    p = problem(
        workloads=[
            serve(
                "s1",
                gpus={"a100": 0, "h200": 1},
                rps={"a100": 0.0, "l5": 3.0},
                target_rps=0,
                min_replicas=-1,
                cpus_per_replica=-1,
                memory_gib_per_replica=-1,
            ),
            serve("s2", min_replicas=3, max_replicas=2),
            serve("s3", min_replicas=0, max_replicas=0),
            serve("s4", gpus={"a100": 1}, rps={"h100": 5.0}),
        ]
    )
    assert errors(p) == [
        'workloads[0].inference.gpus_per_replica: unknown GPU type "h200"',
        'workloads[0].inference.gpus_per_replica["a100"]: must be ≥ 1',
        'workloads[0].inference.replica_rps: unknown GPU type "l5"',
        'workloads[0].inference.replica_rps["a100"]: must be ≥ 1e-06',
        "workloads[0].inference.target_rps: must be > 0",
        "workloads[0].inference.min_replicas: must be ≥ 0",
        "workloads[0].inference.cpus_per_replica: must be ≥ 0",
        "workloads[0].inference.memory_gib_per_replica: must be ≥ 0",
        "workloads[1].inference.max_replicas: must be ≥ min_replicas (3)",
        "workloads[2].inference.max_replicas: must be ≥ 1",
        "workloads[3].inference: needs a known GPU type present in both gpus_per_replica and replica_rps",
    ]


def test_current() -> None:
    p = problem(
        nodes=[node("n1")],
        workloads=[train("j1", gpus=2), train("j2")],
        current=[
            place("j1", ("n1", 2)),
            place("j1", ("n1", 2)),
            place("ghost", ("n9", 0), ("n1", 1), type="h200"),
            place("j2"),
            place("", ("n1", 1)),
        ],
    )
    assert errors(p) == [
        'current[1].workload_id: duplicate workload "j1" (also current[0])',
        'current[2].workload_id: unknown workload "ghost"',
        'current[2].gpu_type: unknown GPU type "h200"',
        'current[2].shards[0].node_id: unknown node "n9"',
        "current[2].shards[0].gpus: must be ≥ 1",
        "current[3].shards: must not be empty",
        "current[4].workload_id: must not be empty",
    ]


def test_every_violation_is_reported_at_once_in_file_order() -> None:
    p = problem(
        gpu_types=[gpu_type("a100", 0)],
        nodes=[node("n1", "h200", gpus=0)],
        tenants=[tenant("t", -1)],
        workloads=[serve("s", target_rps=-3, tenant="u")],
        current=[place("s", ("n2", 1))],
    )
    with pytest.raises(ValidationError) as info:
        validate(p)
    assert [v.path for v in info.value.violations] == [
        "gpu_types[0].memory_gib",
        "nodes[0].gpu_type",
        "nodes[0].gpus",
        "tenants[0].max_gpus",
        "workloads[0].tenant",
        "workloads[0].inference.target_rps",
        "current[0].shards[0].node_id",
    ]
    assert "workloads[0].inference.target_rps: must be > 0" in str(info.value)


# --- names and ranges (hardening: ids that escape a directory, numbers that stop planning) ---

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from solver.validate import LIMITS, NAME_RULE  # noqa: E402

GOOD_NAME = st.from_regex(NAME_RULE, fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_a_name_is_accepted_exactly_when_it_is_safe_as_a_file_name(name: str) -> None:
    found = errors(problem([node("n1")], [train(name)]))
    safe = (
        len(name) <= 253
        and name[0].isascii()
        and name[0].isalnum()
        and name[-1].isascii()
        and name[-1].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    )
    assert (found == []) == safe, (name, found)
    if not safe:
        assert len(found) == 1 and found[0].startswith("workloads[0].id: must be 1-253 letters")
        assert "\n" not in found[0] and "\x00" not in found[0] and len(found[0]) < 260


@settings(max_examples=50, deadline=None)
@given(GOOD_NAME)
def test_every_name_of_the_grammar_passes(name: str) -> None:
    assert errors(problem([node(name)], [train(name, tenant=name)], tenants=[tenant(name)])) == []


@pytest.mark.parametrize(
    "bad",
    ["../../../escape-rel", "/abs/path", "..", ".", "a/b", "a\x00b", "a\nb", "\x1b[31mred", "a\u202eb",
     "x" * 254, "-leading", "trailing.", "with space"],
)  # fmt: skip
def test_hostile_names_are_refused_everywhere(bad: str) -> None:
    p = problem(
        [node(bad)],
        [train(bad, tenant=bad)],
        gpu_types=[gpu_type("a100"), gpu_type(bad)],
        tenants=[tenant(bad)],
    )
    paths = {e.split(":", 1)[0] for e in errors(p)}
    assert {"gpu_types[1].name", "nodes[0].id", "workloads[0].id", "tenants[0].name"} <= paths


@pytest.mark.parametrize(
    ("workload", "path"),
    [
        (serve("s", target_rps=1e300), "workloads[0].inference.target_rps: must be ≤ 1e+09"),
        (serve("s", target_rps=1e19), "workloads[0].inference.target_rps: must be ≤ 1e+09"),
        (serve("s", rps={"a100": 1e-300}), 'workloads[0].inference.replica_rps["a100"]: must be ≥ 1e-06'),
        (
            serve("s", gpus={"a100": 2**31 - 1}),
            'workloads[0].inference.gpus_per_replica["a100"]: must be ≤ 1024',
        ),
        (serve("s", min_replicas=10**9), "workloads[0].inference.min_replicas: must be ≤ 100000"),
        (train("j", gpus=10**6), "workloads[0].training.gpus: must be ≤ 65536"),
        (train("j", throughput={"a100": 1e300}), 'workloads[0].training.throughput["a100"]: must be ≤ 1e+12'),
        (train("j", remaining_work=1e300), "workloads[0].training.remaining_work: must be ≤ 1e+15"),
        (train("j", weight=1e300), "workloads[0].weight: must be ≤ 1e+06"),
        (train("j", priority=2**31 - 1), "workloads[0].priority: must be between -1e+06 and 1e+06"),
    ],
)
def test_numbers_out_of_range_are_refused(workload: Workload, path: str) -> None:
    assert path in errors(problem([node("n1")], [workload]))


def test_a_node_with_too_many_gpus_is_refused() -> None:
    assert errors(problem([node("n1", gpus=2147483647)], [])) == [
        f"nodes[0].gpus: must be ≤ {LIMITS['node_gpus']:g}"
    ]
