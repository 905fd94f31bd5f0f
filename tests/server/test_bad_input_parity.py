"""Every bad-input case of the CLI that a typed message can carry gets the same
answer from the server: the `Plan` RPC returns INVALID_ARGUMENT with exactly
the CLI's violations (same paths, same messages, same order), and for a single
workload `SubmitWorkload` returns them rebased to `workload.*`.

(Structural problems of files — wrong types, unknown fields, bad YAML — cannot
occur in a protobuf message; the CLI's client mode reports them before
contacting the server.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from server import cli, convert
from tests.server.serving import Running, running_server

INVENTORY = """\
gpu_types:
  - {name: h100, memory_gib: 80, cost_per_hour: 4}
  - {name: a100, memory_gib: 40}
nodes:
  - {id: n1, gpu_type: h100, gpus: 8, zone: z1, domain: r1}
  - {id: n2, gpu_type: a100, gpus: 8, zone: z2, domain: r2}
tenants:
  - {name: research, max_gpus: 8}
"""

GOOD_WORKLOAD = "  - {id: ok, tenant: research, training: {gpus: 2, throughput: {h100: 1}}}\n"

# (name, inventory, workloads): each is invalid in a way a typed message can carry
CASES = [
    (
        "gpu types",
        "gpu_types:\n  - {name: h100, memory_gib: 0}\n  - {name: h100, memory_gib: 80, cost_per_hour: -1}\n",
        "workloads: []\n",
    ),
    (
        "nodes",
        "gpu_types: [{name: h100, memory_gib: 80}]\nnodes:\n"
        "  - {id: n1, gpu_type: tpu, gpus: 0}\n  - {id: n1, gpu_type: h100, gpus: 8, state: asleep}\n"
        "  - {id: '', gpu_type: h100, gpus: 8, cpus: -1}\n",
        "workloads: []\n",
    ),
    (
        "tenants",
        INVENTORY + "  - {name: research, max_gpus: -1, max_gpus_per_type: {tpu: 2}}\n",
        "workloads: []\n",
    ),
    (
        "training",
        INVENTORY,
        "workloads:\n" + GOOD_WORKLOAD + "  - {id: ok, training: {gpus: 2, throughput: {h100: 1}}}\n"
        "  - {id: t1, tenant: nobody, training: {gpus: 0, throughput: {tpu: 1}}}\n"
        "  - {id: t2, training: {gpus: 2, throughput: {h100: 1}, locality: rack, gpu_memory_gib: -4}}\n"
        "  - {id: t3, training: {gpus: 2, elastic: [{gpus: 2, throughput: {h100: 1}}]}}\n"
        "  - {id: t4, training: {elastic: [{gpus: 2, throughput: {h100: 1}},"
        " {gpus: 2, throughput: {h100: 2}}]}}\n"
        "  - {id: t5, training: {gpus: 2, throughput: {h100: 1}, remaining_work: -1, deadline_s: 0}}\n"
        "  - {id: t6}\n",
    ),
    (
        "inference",
        INVENTORY,
        "workloads:\n"
        "  - {id: s1, inference: {gpus_per_replica: {h100: 1}, replica_rps: {h100: 5}, target_rps: 0}}\n"
        "  - {id: s2, inference: {gpus_per_replica: {h100: 0, tpu: 1}, replica_rps: {a100: 5},"
        " target_rps: 10, spread: rack}}\n"
        "  - {id: s3, inference: {gpus_per_replica: {h100: 1}, replica_rps: {h100: 5}, target_rps: 10,"
        " min_replicas: 3, max_replicas: 2, cpus_per_replica: -1}}\n",
    ),
    (
        "workload fields",
        INVENTORY,
        "workloads:\n"
        "  - {id: w1, weight: -1, allowed_gpu_types: [tpu], training: {gpus: 1, throughput: {h100: 1}}}\n"
        "  - {id: w2, weight: 0, training: {gpus: 1, throughput: {h100: 1}}}\n",
    ),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_server(tmp_path_factory.mktemp("parity")) as running:
        inv = convert.inventory_from_data(convert.parse_document(INVENTORY))
        running.stub().UpsertNodes(
            apb.UpsertNodesRequest(gpu_types=inv.gpu_types, nodes=inv.nodes, tenants=inv.tenants)
        )
        yield running


def cli_violations(
    tmp_path: Path, inventory: str, workloads: str, capsys: pytest.CaptureFixture[str]
) -> list[str]:
    inv, wl = tmp_path / "inventory.yaml", tmp_path / "workloads.yaml"
    inv.write_text(inventory)
    wl.write_text(workloads)
    assert cli.main(["plan", "--inventory", str(inv), "--workloads", str(wl), "--time-limit", "2"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("apportion: invalid input")
    return [line.strip() for line in lines[1:]]


def rpc_violations(call: object) -> list[str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None
    return [str(v) for v in convert.field_violations(status)]


@pytest.mark.parametrize(("name", "inventory", "workloads"), CASES, ids=[c[0] for c in CASES])
def test_plan_rpc_reports_what_the_cli_reports(
    srv: Running,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    inventory: str,
    workloads: str,
) -> None:
    expected = cli_violations(tmp_path, inventory, workloads, capsys)
    assert expected
    inv = convert.inventory_from_data(convert.parse_document(inventory))
    wl = convert.workloads_from_data(convert.parse_document(workloads))
    stub = srv.stub()
    got = rpc_violations(lambda: stub.Plan(apb.PlanRequest(inventory=inv, workloads=wl.workloads)))
    assert got == expected


@pytest.mark.parametrize("case", ["training", "inference", "workload fields"])
def test_submit_reports_what_the_cli_reports_for_each_workload(
    srv: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    _, inventory, workloads = next(c for c in CASES if c[0] == case)
    stub = srv.stub()
    for i, w in enumerate(convert.workloads_from_data(convert.parse_document(workloads)).workloads):
        single = pb.WorkloadList(workloads=[w])
        text = convert.message_to_dict(single)
        expected = [
            line.replace("workloads[0]", "workload", 1)
            for line in _cli_single(tmp_path / str(i), inventory, text, capsys)
        ]
        if not expected:
            continue  # valid on its own (the case's problem was a duplicate id)
        got = rpc_violations(lambda w=w: stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=w)))
        assert got == expected, w.id


def _cli_single(
    tmp_path: Path, inventory: str, workloads: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> list[str]:
    import json

    tmp_path.mkdir()
    inv, wl = tmp_path / "inventory.yaml", tmp_path / "workloads.json"
    inv.write_text(inventory)
    wl.write_text(json.dumps(workloads))
    status = cli.main(["plan", "--inventory", str(inv), "--workloads", str(wl), "--time-limit", "2"])
    err = capsys.readouterr().err.splitlines()
    if status == 0:
        return []
    assert status == 2, err
    return [line.strip() for line in err[1:]]
