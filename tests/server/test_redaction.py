"""A tenant never reads another tenant's workload ids (hardening: "held by
higher-priority workloads: b-job" was shown to another tenant). Through a real server
with tokens: the pending workload's status, Explain, GetPlan and Watch name the other
tenant's workload only as "another tenant's workload"; the admin sees the id."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import grpc

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from server.redact import FOREIGN
from tests.server.serving import (
    ADMIN_TOKEN,
    PRODUCT_TOKEN,
    RESEARCH_TOKEN,
    TOKENS_YAML,
    metadata,
    running_server,
)

SECRET = "research-secret-project"


def job(workload_id: str, tenant: str, priority: int) -> pb.Workload:
    w = pb.Workload(id=workload_id, tenant=tenant, priority=priority)
    w.training.gpus = 8
    w.training.throughput["h100"] = 1.0
    return w


def test_explanations_name_other_tenants_workloads_only_as_such(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(tmp_path, tokens=tokens) as srv:
        stub = srv.stub()
        admin, product = metadata(ADMIN_TOKEN), metadata(PRODUCT_TOKEN)
        stub.UpsertNodes(
            apb.UpsertNodesRequest(
                gpu_types=[pb.GpuType(name="h100", memory_gib=80)],
                nodes=[pb.Node(id="n1", gpu_type="h100", gpus=8)],
                tenants=[pb.Tenant(name="research"), pb.Tenant(name="product")],
            ),
            metadata=admin,
        )
        stub.SubmitWorkload(
            apb.SubmitWorkloadRequest(workload=job(SECRET, "research", 10)), metadata=metadata(RESEARCH_TOKEN)
        )
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=job("mine", "product", 0)), metadata=product)
        deadline = time.monotonic() + 30
        while not stub.GetWorkload(apb.GetWorkloadRequest(id="mine"), metadata=admin).reasons:
            assert time.monotonic() < deadline, "no plan"
            time.sleep(0.1)
        as_admin = str(stub.Explain(apb.ExplainRequest(id="mine"), metadata=admin))
        assert SECRET in as_admin  # the admin sees who holds the node
        seen = [
            str(stub.GetWorkload(apb.GetWorkloadRequest(id="mine"), metadata=product)),
            str(stub.ListWorkloads(apb.ListWorkloadsRequest(), metadata=product)),
            str(stub.Explain(apb.ExplainRequest(id="mine"), metadata=product)),
            str(stub.GetPlan(apb.GetPlanRequest(), metadata=product)),
        ]
        events = stub.Watch(apb.WatchRequest(from_revision=0), metadata=product, timeout=3)
        with contextlib.suppress(grpc.RpcError):  # the deadline ends the stream
            seen += [str(e) for e in events]
        for text in seen:
            assert SECRET not in text, text
        details = stub.Explain(apb.ExplainRequest(id="mine"), metadata=product).details
        assert any(f"held by higher-priority workloads: {FOREIGN}" in d for d in details), details
