"""The audit trail through a real server with tokens: every mutating request, its
caller and outcome, refused ones too; read by the admin only, filtered, over the CLI
as well; it survives a restart (it is in the store)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from server.auth import fingerprint
from server.cli import main
from tests.server.serving import (
    ADMIN_TOKEN,
    PRODUCT_TOKEN,
    RESEARCH_TOKEN,
    TOKENS_YAML,
    inventory_request,
    metadata,
    running_server,
)


def job(workload_id: str, tenant: str) -> pb.Workload:
    w = pb.Workload(id=workload_id, tenant=tenant)
    w.training.gpus = 1
    w.training.throughput["h100-80g"] = 1.0
    return w


def entries(stub: object, **filters: object) -> list[apb.AuditEntry]:
    deadline = time.monotonic() + 10
    while True:  # entries are committed with the writer's next group commit
        got = list(stub.Audit(apb.AuditRequest(**filters), metadata=metadata(ADMIN_TOKEN)).entries)  # type: ignore[attr-defined]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_every_mutating_request_is_recorded_with_its_caller_and_outcome(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(tmp_path, tokens=tokens) as srv:
        stub = srv.stub()
        admin, research, product = (metadata(t) for t in (ADMIN_TOKEN, RESEARCH_TOKEN, PRODUCT_TOKEN))
        stub.UpsertNodes(inventory_request(), metadata=admin)
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=job("r-job", "research")), metadata=research)
        with pytest.raises(grpc.RpcError):  # another tenant's workload
            stub.CancelWorkload(apb.CancelWorkloadRequest(id="r-job"), metadata=product)
        with pytest.raises(grpc.RpcError):  # nodes need the admin
            stub.DrainNode(apb.DrainNodeRequest(id="n1"), metadata=research)
        stub.GetWorkload(apb.GetWorkloadRequest(id="r-job"), metadata=research)  # a read: not recorded
        time.sleep(0.3)

        trail = entries(stub)
        assert [(e.method, e.code) for e in trail] == [
            ("UpsertNodes", "OK"),
            ("SubmitWorkload", "OK"),
            ("CancelWorkload", "NOT_FOUND"),
            ("DrainNode", "PERMISSION_DENIED"),
        ]
        assert trail[0].principal == f"admin#{fingerprint(ADMIN_TOKEN)}" and "n1" in trail[0].ids
        assert trail[1].tenant == "research" and list(trail[1].ids) == ["r-job"]
        assert trail[2].principal == f"tenant:product#{fingerprint(PRODUCT_TOKEN)}" and trail[2].message
        assert [e.method for e in entries(stub, id="r-job")] == ["SubmitWorkload", "CancelWorkload"]
        assert [e.code for e in entries(stub, principal=trail[3].principal)] == ["OK", "PERMISSION_DENIED"]
        assert entries(stub, since=time.time() + 60) == []
        assert all(t not in json.dumps([str(e) for e in trail]) for t in (ADMIN_TOKEN, RESEARCH_TOKEN))

        with pytest.raises(grpc.RpcError) as denied:
            stub.Audit(apb.AuditRequest(), metadata=research)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        code = main(["audit", "--server", srv.address, "--token", ADMIN_TOKEN, "--id", "r-job", "-o", "json"])
        out = capsys.readouterr().out
        assert code == 0
        assert [json.loads(line)["method"] for line in out.splitlines()] == [
            "SubmitWorkload",
            "CancelWorkload",
        ]

    with running_server(tmp_path, tokens=tokens) as again:  # the same store: the trail is kept
        assert len(entries(again.stub())) >= 4


def test_the_trail_is_kept_within_its_bounds(tmp_path: Path) -> None:
    from server import audit
    from server.audit import AuditTrail

    trail = AuditTrail(tmp_path / "t.audit", max_entries=5, max_age_s=3600.0)
    try:
        for i in range(audit.PRUNE_EVERY):  # one entry a flush: the last flush prunes
            trail.record("CancelWorkload", None, apb.CancelWorkloadRequest(id=f"w{i}"), "OK", "")
            trail.flush()
        kept = trail.entries(limit=10_000)
        assert [e.ids[0] for e in kept] == [f"w{i}" for i in range(audit.PRUNE_EVERY - 5, audit.PRUNE_EVERY)]
        assert all(e.principal == "unauthenticated" for e in kept)
    finally:
        trail.close()
