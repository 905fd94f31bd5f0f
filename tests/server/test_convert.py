"""server.convert: files -> messages -> domain, domain plan -> message -> JSON, and
every structural error reported with its path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from apportion.v1 import types_pb2 as pb
from server import convert
from solver import (
    GangShape,
    GpuType,
    Locality,
    Node,
    NodeState,
    Placement,
    Plan,
    PlanMetrics,
    PlanStatus,
    Reason,
    ReasonCode,
    Shard,
    Shortfall,
    Spread,
    Tenant,
    Unplaced,
    ValidationError,
)

Write = Callable[[str, str], Path]


def errors(exc: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    return [str(v) for v in exc.value.violations]


# ---------------------------------------------------------------------------
# Files -> domain


def test_design_example_converts_to_domain(inventory_file: Path, workloads_file: Path) -> None:
    problem = convert.load_problem(inventory_file, workloads_file)

    assert problem.gpu_types == (
        GpuType("h100-80g", 80.0, 4.0),
        GpuType("a100-40g", 40.0, 1.8),
    )
    assert [n.id for n in problem.nodes] == ["n1", "n2", "n3"]  # file order
    assert problem.nodes[0] == Node(
        id="n1", gpu_type="h100-80g", gpus=8, cpus=96.0, memory_gib=1024.0, zone="z1", domain="rack1"
    )
    assert problem.nodes[1].labels == {"pool": "batch"}
    assert problem.nodes[2].state is NodeState.DRAINING
    assert problem.tenants == (
        Tenant("research", max_gpus=64, max_gpus_per_type={"h100-80g": 16}, weight=1.0),
        Tenant("product", max_gpus=None, weight=2.0),
    )

    pretrain, chat, finetune = problem.workloads
    assert pretrain.id == "llm-pretrain" and pretrain.priority == 10 and pretrain.weight == 1.0
    assert pretrain.inference is None and pretrain.training is not None
    t = pretrain.training
    assert t.shapes == (GangShape(16, {"h100-80g": 3.1, "a100-40g": 1.0}),)
    assert t.gpu_memory_gib == 60.0 and t.locality is Locality.DOMAIN
    assert t.remaining_work == 200000.0 and t.deadline_s is None and t.preemptible is True

    assert chat.training is None and chat.inference is not None
    s = chat.inference
    assert s.gpus_per_replica == {"h100-80g": 1, "a100-40g": 2}
    assert s.replica_rps == {"h100-80g": 14.0, "a100-40g": 9.0}
    assert s.target_rps == 100.0 and s.min_replicas == 2 and s.max_replicas is None
    assert s.spread is Spread.ZONE

    assert finetune.weight == 0.5 and finetune.allowed_gpu_types == ("h100-80g",)
    assert finetune.node_selector == {"pool": "batch"} and finetune.submit_time_s == 12.0
    assert finetune.training is not None
    assert finetune.training.shapes == (
        GangShape(2, {"h100-80g": 1.0}),
        GangShape(4, {"h100-80g": 1.8}),
    )
    assert finetune.training.preemptible is False and finetune.training.deadline_s == 3600.0
    assert problem.current == ()


def test_defaults_when_fields_are_absent(write: Write) -> None:
    inv = write("i.yaml", "gpu_types: [{name: t, memory_gib: 1}]\nnodes: [{id: n, gpu_type: t, gpus: 1}]\n")
    wl = write(
        "w.yaml",
        """\
        workloads:
          - {id: a, training: {gpus: 1, throughput: {t: 1}}}
          - {id: b, inference: {gpus_per_replica: {t: 1}, replica_rps: {t: 1}, target_rps: 1}}
        """,
    )
    problem = convert.load_problem(inv, wl)
    assert problem.gpu_types[0].cost_per_hour is None
    assert problem.nodes[0].state is NodeState.READY and problem.nodes[0].labels == {}
    assert problem.tenants == ()
    a, b = problem.workloads
    assert a.tenant == "" and a.priority == 0 and a.weight == 1.0 and a.allowed_gpu_types == ()
    assert a.training is not None and a.training.locality is Locality.ANY and a.training.preemptible
    assert b.inference is not None
    assert b.inference.min_replicas == 1 and b.inference.max_replicas is None
    assert b.inference.spread is Spread.NONE


def test_json_files_give_the_same_problem(inventory_file: Path, workloads_file: Path, write: Write) -> None:
    inv_json = write("inventory.json", json.dumps(yaml.safe_load(inventory_file.read_text())))
    wl_json = write("workloads.json", json.dumps(yaml.safe_load(workloads_file.read_text())))
    assert convert.load_problem(inv_json, wl_json) == convert.load_problem(inventory_file, workloads_file)


def test_camel_case_json_names_are_accepted(write: Write) -> None:
    inv = convert.inventory_from_data({"gpuTypes": [{"name": "t", "memoryGib": 8, "costPerHour": 1}]})
    assert inv.gpu_types[0].memory_gib == 8 and inv.gpu_types[0].cost_per_hour == 1


def test_yaml_exponent_numbers_and_integral_floats() -> None:
    data = convert.parse_document("workloads: [{id: a, training: {gpus: 8.0, remaining_work: 2e5}}]")
    msg = convert.workloads_from_data(data)
    assert msg.workloads[0].training.gpus == 8
    assert msg.workloads[0].training.remaining_work == 200000.0


def test_empty_document_is_an_empty_message() -> None:
    assert convert.parse_document("") is None
    assert convert.inventory_from_data(None) == pb.Inventory()


def test_current_plan_file_becomes_problem_current(
    inventory_file: Path, workloads_file: Path, write: Write
) -> None:
    current = write(
        "current.json",
        json.dumps(
            {
                "placements": [
                    {"workload_id": "chat", "gpu_type": "h100-80g", "shards": [{"node_id": "n1", "gpus": 1}]}
                ]
            }
        ),
    )
    problem = convert.load_problem(inventory_file, workloads_file, current)
    assert problem.current == (Placement("chat", (Shard("n1", 1),), "h100-80g"),)


def test_problem_from_messages_reports_enum_like_strings() -> None:
    inventory = pb.Inventory(nodes=[pb.Node(id="n", gpu_type="t", gpus=1, state="gone")])
    workloads = pb.WorkloadList(
        workloads=[pb.Workload(id="a", training=pb.TrainingSpec(gpus=1, locality="rack"))]
    )
    with pytest.raises(ValidationError) as exc:
        convert.problem_from_messages(inventory, workloads)
    assert errors(exc) == [
        'nodes[0].state: must be one of ready, draining, down; got "gone"',
        'workloads[0].training.locality: must be one of node, domain, zone, any; got "rack"',
    ]


# ---------------------------------------------------------------------------
# Structural errors, each with its path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nodes: [{id: n1, gpus: eight}]", 'nodes[0].gpus: expected an integer, got "eight"'),
        ("nodes: [{id: n1, gpus: 2.5}]", "nodes[0].gpus: expected an integer, got 2.5"),
        ("nodes: [{id: n1, gpus: true}]", "nodes[0].gpus: expected an integer, got true"),
        (
            "nodes: [{id: n1, gpus: 3000000000}]",
            "nodes[0].gpus: 3000000000 is out of range (a 32-bit integer)",
        ),
        ("nodes: [{id: n1, cpus: lots}]", 'nodes[0].cpus: expected a number, got "lots"'),
        ("nodes: [{id: 7}]", "nodes[0].id: expected a string, got 7 (quote it)"),
        (
            "nodes: [{id: n1, labels: {tier: yes}}]",
            'nodes[0].labels["tier"]: expected a string, got true (quote it)',
        ),
        ("nodes: [{id: n1, labels: [a]}]", "nodes[0].labels: expected a mapping, got a list"),
        (
            "nodes: [{id: n1, state: broken}]",
            'nodes[0].state: must be one of ready, draining, down; got "broken"',
        ),
        ("nodes: [{id: n1, gpu: 8}]", 'nodes[0].gpu: unknown field (did you mean "gpus"?)'),
        ("nodes: [n1]", 'nodes[0]: expected a mapping, got "n1"'),
        ("nodes: {id: n1}", "nodes: expected a list, got a mapping"),
        ("racks: []", "racks: unknown field (expected one of gpu_types, nodes, tenants)"),
        (
            "gpu_types: [{name: t, cost_per_hour: free}]",
            'gpu_types[0].cost_per_hour: expected a number, got "free"',
        ),
        (
            "tenants: [{name: r, max_gpus_per_type: {t: many}}]",
            'tenants[0].max_gpus_per_type["t"]: expected an integer, got "many"',
        ),
        (
            "tenants: [{name: r, max_gpus_per_type: {80: 1}}]",
            "tenants[0].max_gpus_per_type: keys must be strings, got 80 (quote it)",
        ),
    ],
)
def test_inventory_structural_error_has_its_path(text: str, expected: str) -> None:
    with pytest.raises(ValidationError) as exc:
        convert.problem_from_messages(
            convert.inventory_from_data(convert.parse_document(text)), pb.WorkloadList()
        )
    assert errors(exc) == [expected]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("inference: {target_rps: fast}", 'workloads[0].inference.target_rps: expected a number, got "fast"'),
        (
            "inference: {spread: rack}",
            'workloads[0].inference.spread: must be one of none, node, domain, zone; got "rack"',
        ),
        (
            "inference: {min_replicas: -1.5}",
            "workloads[0].inference.min_replicas: expected an integer, got -1.5",
        ),
        (
            "inference: {gpus_per_replica: {t: two}}",
            'workloads[0].inference.gpus_per_replica["t"]: expected an integer, got "two"',
        ),
        (
            "training: {gpus: 8, locality: rack}",
            'workloads[0].training.locality: must be one of node, domain, zone, any; got "rack"',
        ),
        (
            "training: {gpus: 8, preemptible: maybe}",
            'workloads[0].training.preemptible: expected true or false, got "maybe"',
        ),
        ("training: {elastic: {gpus: 4}}", "workloads[0].training.elastic: expected a list, got a mapping"),
        (
            "training: {elastic: [{gpus: 4, thruput: {}}]}",
            'workloads[0].training.elastic[0].thruput: unknown field (did you mean "throughput"?)',
        ),
        (
            "training: {gpus: 2, elastic: [{gpus: 4}]}",
            "workloads[0].training.gpus: "
            "give either gpus (a fixed gang) or elastic (several sizes), not both",
        ),
        (
            "training: {throughput: {t: 1}, elastic: [{gpus: 4}]}",
            "workloads[0].training.throughput: with elastic, give the throughput inside each elastic entry",
        ),
        (
            "training: {gpus: 1}\n    inference: {target_rps: 1}",
            "workloads[0]: give either training or inference, not both",
        ),
        ("training: 8", "workloads[0].training: expected a mapping, got 8"),
        ("trainig: {gpus: 1}", 'workloads[0].trainig: unknown field (did you mean "training"?)'),
        ("priority: high", 'workloads[0].priority: expected an integer, got "high"'),
        ("allowed_gpu_types: h100", 'workloads[0].allowed_gpu_types: expected a list, got "h100"'),
        (
            "submit_time_s: 2024-01-01",
            "workloads[0].submit_time_s: expected a number, got '2024-01-01' (date)",
        ),
    ],
)
def test_workload_structural_error_has_its_path(spec: str, expected: str) -> None:
    data = convert.parse_document(f"workloads:\n  - id: w\n    {spec}\n")
    with pytest.raises(ValidationError) as exc:
        convert.problem_from_messages(pb.Inventory(), convert.workloads_from_data(data))
    assert errors(exc) == [expected]


def test_every_violation_of_every_file_is_reported_at_once(write: Write) -> None:
    inv = write(
        "inventory.yaml",
        """\
        gpu_types:
          - {name: h100-80g, memory_gib: 80, cost_per_hour: cheap}
        nodes:
          - {id: n1, gpu_type: h100-80g, gpus: 8}
          - {id: n2, gpu_type: h100-80g, gpus: 8}
          - {id: n3, gpu_type: h100-80g, gpus: 8}
          - {id: n4, gpu_type: h100-80g, gpus: eight, state: broken}
        """,
    )
    wl = write(
        "workloads.yaml",
        """\
        workloads:
          - id: a
            training: {gpus: 8, throughput: {h100-80g: 1}, locality: rack}
          - id: b
            inference: {gpus_per_replica: {h100-80g: 1}, replica_rps: {h100-80g: 5}, target_rps: "100"}
        """,
    )
    current = write(
        "current.json", '{"placements": [{"workload_id": "a", "shards": [{"node_id": "n1", "gpus": "8"}]}]}'
    )
    with pytest.raises(ValidationError) as exc:
        convert.load_problem(inv, wl, current)
    assert errors(exc) == [
        'gpu_types[0].cost_per_hour: expected a number, got "cheap"',
        'nodes[3].gpus: expected an integer, got "eight"',
        'nodes[3].state: must be one of ready, draining, down; got "broken"',
        'workloads[0].training.locality: must be one of node, domain, zone, any; got "rack"',
        'workloads[1].inference.target_rps: expected a number, got "100"',
        'current[0].shards[0].gpus: expected an integer, got "8"',
    ]


def test_semantic_violations_are_added_to_structural_ones(write: Write) -> None:
    """solver.validate's findings come along, except on fields already reported."""
    inv = write(
        "inventory.yaml",
        """\
        gpu_types: [{name: t, memory_gib: 80}]
        nodes:
          - {id: n1, gpu_type: t, gpus: eight}
          - {id: n1, gpu_type: nope, gpus: 8}
        """,
    )
    wl = write(
        "workloads.yaml", "workloads: [{id: a, training: {gpus: 1, throughput: {t: 1}, locality: rack}}]\n"
    )
    with pytest.raises(ValidationError) as exc:
        convert.load_problem(inv, wl)
    messages = errors(exc)
    assert 'nodes[0].gpus: expected an integer, got "eight"' in messages
    assert not any(m.startswith("nodes[0].gpus: must") for m in messages)  # not reported twice
    assert any(m.startswith('nodes[1].id: duplicate id "n1"') for m in messages)
    assert 'nodes[1].gpu_type: unknown GPU type "nope"' in messages
    assert (
        messages[-1] == 'workloads[0].training.locality: must be one of node, domain, zone, any; got "rack"'
    )


def test_file_level_problems_name_the_file(write: Write, tmp_path: Path) -> None:
    syntax = write("syntax.yaml", "nodes:\n  - {id: n1\n")
    duplicate = write("dup.yaml", "nodes: []\nnodes: []\n")
    not_a_mapping = write("list.json", "[1, 2]")
    with pytest.raises(ValidationError) as exc:
        convert.load_problem(syntax, duplicate, tmp_path / "missing.json")
    messages = errors(exc)
    assert len(messages) == 3
    assert messages[0].startswith(f"{syntax}: not valid YAML or JSON: line 3, column 1:")
    assert messages[1] == f'{duplicate}: line 2, column 1: duplicate key "nodes"'
    assert messages[2] == f"cannot read {tmp_path / 'missing.json'}: No such file or directory"
    with pytest.raises(ValidationError) as exc:
        convert.inventory_from_data(convert.load_document(not_a_mapping), source=str(not_a_mapping))
    assert errors(exc) == [f"{not_a_mapping}: expected a mapping with gpu_types, nodes, tenants; got a list"]


def test_duplicate_keys_in_json() -> None:
    with pytest.raises(ValidationError) as exc:
        convert.parse_document('{"nodes": [], "nodes": []}', "x.json")
    assert errors(exc) == ['x.json: duplicate key "nodes"']


# ---------------------------------------------------------------------------
# Domain plan -> JSON


def sample_plan(*, bound: float | None = 12.6, gap: float | None = 0.0) -> Plan:
    return Plan(
        status=PlanStatus.OPTIMAL if bound is not None else PlanStatus.HEURISTIC,
        policy="throughput",
        objective=12.5,
        best_bound=bound,
        gap=gap,
        placements=(
            Placement("x", (Shard("n1", 8), Shard("n2", 8)), "h100-80g"),
            Placement("chat", (Shard("n3", 2), Shard("n3", 2)), "a100-40g"),
        ),
        unplaced=(Unplaced("big", (Reason(ReasonCode.NO_GPU_TYPE, "needs 80 GiB per GPU"),)),),
        shortfalls=(Shortfall("chat", 18.0, 100.0, (Reason(ReasonCode.CAPACITY, "held by x"),)),),
        stage_times_s={"validate": 0.001, "lp": 0.02},
        shadow_prices={"h100-80g": 0.25},
        metrics=PlanMetrics(gpus_used=20, gpus_total=24, cost_per_hour=71.2, placed=2, unplaced=1),
        work_s=0.75,
        stopped_by="gap",
    )


def test_plan_json_shape() -> None:
    data = convert.plan_to_dict(sample_plan())
    assert list(data) == [
        "status", "policy", "objective", "best_bound", "gap", "placements", "unplaced",
        "shortfalls", "stage_times_s", "shadow_prices", "metrics", "work_s", "stopped_by",
    ]  # fmt: skip
    assert data["work_s"] == 0.75 and data["stopped_by"] == "gap"
    assert data["status"] == "OPTIMAL" and data["policy"] == "throughput"
    assert data["objective"] == 12.5 and data["best_bound"] == 12.6
    assert data["gap"] == 0.0  # a zero gap is kept
    assert data["placements"][0] == {
        "workload_id": "x",
        "gpu_type": "h100-80g",
        "shards": [{"node_id": "n1", "gpus": 8}, {"node_id": "n2", "gpus": 8}],
    }
    assert data["unplaced"] == [
        {
            "workload_id": "big",
            "reasons": ["needs 80 GiB per GPU"],
            "details": [{"code": "NO_GPU_TYPE", "message": "needs 80 GiB per GPU"}],
        }
    ]
    assert data["shortfalls"] == [
        {
            "workload_id": "chat",
            "served_rps": 18.0,
            "target_rps": 100.0,
            "reasons": ["held by x"],
            "details": [{"code": "CAPACITY", "message": "held by x"}],
        }
    ]
    assert list(data["stage_times_s"].items()) == [("validate", 0.001), ("lp", 0.02)]  # pipeline order
    assert data["shadow_prices"] == {"h100-80g": 0.25}
    assert data["metrics"] == {
        "gpus_used": 20,
        "gpus_total": 24,
        "cost_per_hour": 71.2,
        "normalized_throughput": 0.0,
        "served_fraction": 0.0,
        "migrations": 0,
        "placed": 2,
        "unplaced": 1,
    }
    assert isinstance(data["metrics"]["gpus_used"], int)
    json.dumps(data)  # plain JSON data


def test_heuristic_plan_has_no_bound_or_gap() -> None:
    data = convert.plan_to_dict(sample_plan(bound=None, gap=None))
    assert "best_bound" not in data and "gap" not in data
    assert data["shortfalls"][0]["served_rps"] == 18.0


@pytest.mark.parametrize("bound", [12.6, None])
def test_plan_round_trips_through_json(bound: float | None) -> None:
    plan = sample_plan(bound=bound, gap=None if bound is None else 0.008)
    text = json.dumps(convert.plan_to_dict(plan))
    again = convert.plan_from_message(convert.plan_from_data(convert.parse_document(text)))
    assert again == plan


def test_plan_file_with_unknown_status_is_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        convert.plan_from_message(
            pb.Plan(status="GREAT", unplaced=[pb.Unplaced(details=[pb.Reason(code="X")])])
        )
    assert [v.path for v in exc.value.violations] == ["status", "unplaced[0].details[0].code"]


def test_yaml_to_domain_to_plan_json_round_trip(inventory_file: Path, workloads_file: Path) -> None:
    """A plan over the loaded problem survives JSON and reads back as the --current input."""
    problem = convert.load_problem(inventory_file, workloads_file)
    plan = Plan(
        status=PlanStatus.FEASIBLE,
        policy="cost",
        objective=1.0,
        best_bound=1.5,
        gap=0.5,
        placements=(Placement("chat", (Shard("n1", 1), Shard("n3", 2)), "h100-80g"),),
        unplaced=tuple(
            Unplaced(w.id, (Reason(ReasonCode.CAPACITY, "full"),))
            for w in problem.workloads
            if w.id != "chat"
        ),
    )
    data = convert.plan_to_dict(plan)
    current = convert.plan_from_data(json.loads(json.dumps(data)))
    assert (
        convert.problem_from_messages(pb.Inventory(), pb.WorkloadList(), current).current == plan.placements
    )
