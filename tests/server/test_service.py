"""Every Allocator RPC through a real server on a loopback port, with status codes.

One server per module (tokens enabled: admin, research, product), a fresh one
where a test needs an empty state or other settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

import solver
from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from bench import instances
from server import convert
from tests.server.serving import (
    ADMIN_TOKEN,
    PRODUCT_TOKEN,
    RESEARCH_TOKEN,
    TOKENS_YAML,
    Running,
    example_workloads,
    inventory_request,
    metadata,
    running_server,
)

ADMIN = metadata(ADMIN_TOKEN)
RESEARCH = metadata(RESEARCH_TOKEN)
PRODUCT = metadata(PRODUCT_TOKEN)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    path = tmp_path_factory.mktemp("service")
    tokens = path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(path, tokens=tokens) as running:
        stub = running.stub()
        stub.UpsertNodes(inventory_request(), metadata=ADMIN)
        for w in example_workloads():
            token = RESEARCH if w.tenant == "research" else PRODUCT
            stub.SubmitWorkload(
                apb.SubmitWorkloadRequest(workload=w, request_id=f"seed-{w.id}"), metadata=token
            )
        running.settle()
        yield running


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def violations_of(call: object) -> list[tuple[str, str]]:
    """The field violations of an INVALID_ARGUMENT answer."""
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    status = rpc_status.from_call(info.value)
    assert status is not None, "INVALID_ARGUMENT without a google.rpc.Status"
    return [(v.path, v.message) for v in convert.field_violations(status)]


def training(id: str, gpus: int = 1, tenant: str = "") -> pb.Workload:
    w = pb.Workload(id=id, tenant=tenant)
    w.training.gpus = gpus
    w.training.throughput["h100-80g"] = 1.0
    return w


def submit(
    stub: object, w: pb.Workload, token: object = RESEARCH, request_id: str = ""
) -> apb.WorkloadStatus:
    return stub.SubmitWorkload(  # type: ignore[attr-defined,no-any-return]
        apb.SubmitWorkloadRequest(workload=w, request_id=request_id), metadata=token
    )


# -- discovery ---------------------------------------------------------------


def test_health_and_reflection_are_served(srv: Running) -> None:
    ch = srv.channel()
    health = health_pb2_grpc.HealthStub(ch)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    reply = health.Check(health_pb2.HealthCheckRequest(service="apportion.v1.Allocator"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"apportion.v1.Allocator", "grpc.health.v1.Health"} <= names


# -- authentication and authorization --------------------------------------


def test_no_token_or_unknown_token_is_unauthenticated(srv: Running) -> None:
    stub = srv.stub()
    assert code_of(lambda: stub.ListNodes(apb.ListNodesRequest())) is grpc.StatusCode.UNAUTHENTICATED
    bad = metadata("not-a-token-of-this-server-000")
    assert (
        code_of(lambda: stub.ListNodes(apb.ListNodesRequest(), metadata=bad))
        is grpc.StatusCode.UNAUTHENTICATED
    )


def test_node_changes_need_admin(srv: Running) -> None:
    stub = srv.stub()
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: stub.UpsertNodes(inventory_request(), metadata=RESEARCH)) is denied
    assert code_of(lambda: stub.DrainNode(apb.DrainNodeRequest(id="n1"), metadata=PRODUCT)) is denied
    # reading the inventory is for everyone
    assert stub.ListNodes(apb.ListNodesRequest(), metadata=RESEARCH).nodes


def test_another_tenants_workload_is_not_visible(srv: Running) -> None:
    stub = srv.stub()
    not_found = grpc.StatusCode.NOT_FOUND
    assert stub.GetWorkload(apb.GetWorkloadRequest(id="chat"), metadata=PRODUCT).workload.tenant == "product"
    assert (
        code_of(lambda: stub.GetWorkload(apb.GetWorkloadRequest(id="chat"), metadata=RESEARCH)) is not_found
    )
    assert (
        code_of(lambda: stub.CancelWorkload(apb.CancelWorkloadRequest(id="chat"), metadata=RESEARCH))
        is not_found
    )
    assert code_of(lambda: stub.Explain(apb.ExplainRequest(id="chat"), metadata=RESEARCH)) is not_found
    listed = stub.ListWorkloads(apb.ListWorkloadsRequest(), metadata=RESEARCH).workloads
    assert listed and {w.workload.tenant for w in listed} == {"research"}
    request = apb.ListWorkloadsRequest(tenant="product")
    assert (
        code_of(lambda: stub.ListWorkloads(request, metadata=RESEARCH)) is grpc.StatusCode.PERMISSION_DENIED
    )
    plan = stub.GetPlan(apb.GetPlanRequest(), metadata=RESEARCH).plan
    assert "chat" not in {p.workload_id for p in plan.placements}
    assert {p.workload_id for p in plan.placements} <= {w.workload.id for w in listed}


def test_a_tenant_cannot_submit_for_another(srv: Running) -> None:
    stub = srv.stub()
    w = training("sneaky", tenant="product")
    assert code_of(lambda: submit(stub, w, RESEARCH)) is grpc.StatusCode.PERMISSION_DENIED
    mine = submit(stub, training("tenant-filled-in"), RESEARCH)
    assert mine.workload.tenant == "research"
    assert mine.state == "PENDING" and mine.version == 1 and mine.workload.submit_time_s > 0


# -- SubmitWorkload ------------------------------------------------------------


def test_submit_is_idempotent_by_request_id(srv: Running) -> None:
    stub = srv.stub()
    w = training("idem-1")
    first = submit(stub, w, request_id="req-idem-1")
    again = submit(stub, w, request_id="req-idem-1")
    # the same workload, not a second one: its current row (the admission may have placed it since)
    assert (again.workload.id, again.version) == ("idem-1", 1) and again.revision >= first.revision
    listed = stub.ListWorkloads(apb.ListWorkloadsRequest(), metadata=RESEARCH).workloads
    assert [w.workload.id for w in listed].count("idem-1") == 1
    other = training("idem-1")
    assert code_of(lambda: submit(stub, other, request_id="req-idem-2")) is grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: submit(stub, other)) is grpc.StatusCode.ALREADY_EXISTS


def test_submit_bad_input_names_every_field_like_the_cli(srv: Running) -> None:
    stub = srv.stub()
    w = pb.Workload(id="bad-service", tenant="product")
    w.inference.gpus_per_replica["h100-80g"] = 1
    w.inference.replica_rps["h100-80g"] = 10
    w.inference.target_rps = -5
    w.inference.spread = "rack"
    found = violations_of(lambda: submit(stub, w, PRODUCT))
    paths = [p for p, _ in found]
    assert paths == ["workload.inference.spread", "workload.inference.target_rps"]  # all at once
    w.inference.spread = "zone"
    found = violations_of(lambda: submit(stub, w, PRODUCT))
    assert ("workload.inference.target_rps", "must be > 0") in found
    # a GPU type the inventory lacks is listed with the other violations of a refused workload
    unknown = training("bad-type")
    unknown.training.throughput["tpu-v9"] = 2.0
    unknown.training.gpu_memory_gib = -1
    found = violations_of(lambda: submit(stub, unknown))
    assert any(p == "workload.training.throughput" and "tpu-v9" in m for p, m in found)
    assert any(p == "workload.training.gpu_memory_gib" for p, _ in found)
    assert violations_of(lambda: submit(stub, pb.Workload(tenant="research"))) == [
        ("workload.id", "must not be empty")
    ]


def test_a_gpu_type_the_inventory_lacks_yet_is_taken_and_waits_for_it(tmp_path: Path) -> None:
    """Workers may register after their work is submitted: a workload that names GPU
    types the server does not know yet (and nothing else wrong) is accepted, PENDING
    with NO_GPU_TYPE (and the closest known name); it is planned on the types it names
    that exist, and once the inventory has the others."""
    with running_server(tmp_path) as srv:
        stub = srv.stub()
        stub.UpsertNodes(
            apb.UpsertNodesRequest(
                gpu_types=[pb.GpuType(name="h100", memory_gib=80)],
                nodes=[pb.Node(id="n1", gpu_type="h100", gpus=8)],
            )
        )
        early = pb.Workload(id="early")
        early.training.gpus = 8
        early.training.throughput["h200"] = 2.0
        status = stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=early))
        assert status.state == "PENDING" and [r.code for r in status.reasons] == ["NO_GPU_TYPE"]
        assert (
            'GPU type "h200" is not in the inventory yet (did you mean "h100"?)' in status.reasons[0].message
        )
        either = pb.Workload(id="either")
        either.training.gpus = 4
        either.training.throughput.update({"h100": 1.0, "b200": 3.0})
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=either))
        srv.settle()
        early_now = stub.GetWorkload(apb.GetWorkloadRequest(id="early"))
        assert early_now.state == "PENDING" and [r.code for r in early_now.reasons] == ["NO_GPU_TYPE"]
        why = stub.Explain(apb.ExplainRequest(id="early"))
        assert "GPU types the inventory does not have yet" in why.summary
        placed = stub.GetWorkload(apb.GetWorkloadRequest(id="either"))
        assert placed.state == "PLACED" and placed.placement.gpu_type == "h100"  # on the type that exists
        assert "either" in {p.workload_id for p in stub.GetPlan(apb.GetPlanRequest()).plan.placements}
        assert stub.Explain(apb.ExplainRequest(id="either")).placed
        stub.UpsertNodes(
            apb.UpsertNodesRequest(
                gpu_types=[pb.GpuType(name="h200", memory_gib=141)],
                nodes=[pb.Node(id="n2", gpu_type="h200", gpus=8)],
            )
        )
        srv.settle()
        now = stub.GetWorkload(apb.GetWorkloadRequest(id="early"))
        assert now.state == "PLACED" and now.placement.gpu_type == "h200" and not now.reasons
        # more unknown types than a real workload names: refused, each one listed
        many = pb.Workload(id="many")
        many.training.gpus = 1
        many.training.throughput.update({f"t{i}": 1.0 for i in range(20)})
        found = violations_of(lambda: stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=many)))
        assert sum(1 for _p, m in found if m.startswith("unknown GPU type")) == 20
        # planning files (the stateless Plan, like `apportion plan`) still refuses them
        inventory = pb.Inventory(
            gpu_types=[pb.GpuType(name="h100", memory_gib=80)],
            nodes=[pb.Node(id="n1", gpu_type="h100", gpus=8)],
        )
        what_if = apb.PlanRequest(inventory=inventory, workloads=[early])
        assert code_of(lambda: stub.Plan(what_if)) is grpc.StatusCode.INVALID_ARGUMENT


def test_submit_messages_match_the_cli_file_mode(srv: Running, tmp_path: Path) -> None:
    """The same bad workload gives the same message from the CLI's validator (path rebased)."""
    stub = srv.stub()
    w = training("neg-gpus")
    w.training.gpus = -2
    found = violations_of(lambda: submit(stub, w))
    inv = inventory_request()
    problem = convert.problem_from_messages(
        pb.Inventory(gpu_types=inv.gpu_types, nodes=inv.nodes, tenants=inv.tenants),
        pb.WorkloadList(workloads=[w]),
    )
    with pytest.raises(solver.ValidationError) as info:
        solver.validate(problem)
    cli = [(v.path.replace("workloads[0]", "workload"), v.message) for v in info.value.violations]
    assert found == cli


# -- Get / List / Cancel / Update ----------------------------------------------


def test_get_unknown_is_not_found(srv: Running) -> None:
    stub = srv.stub()
    request = apb.GetWorkloadRequest(id="no-such-workload")
    assert code_of(lambda: stub.GetWorkload(request, metadata=ADMIN)) is grpc.StatusCode.NOT_FOUND


def test_list_filters_and_pages(srv: Running) -> None:
    stub = srv.stub()
    everything = stub.ListWorkloads(apb.ListWorkloadsRequest(page_size=1000), metadata=ADMIN).workloads
    ids = [w.workload.id for w in everything]
    assert ids == sorted(ids) and len(ids) >= 4
    paged: list[str] = []
    token = ""
    while True:
        page = stub.ListWorkloads(apb.ListWorkloadsRequest(page_size=2, page_token=token), metadata=ADMIN)
        assert len(page.workloads) <= 2
        paged += [w.workload.id for w in page.workloads]
        token = page.next_page_token
        if not token:
            break
    assert paged[: len(ids)] == ids[: len(paged)] and set(ids) <= set(paged)
    services = stub.ListWorkloads(apb.ListWorkloadsRequest(kind="inference"), metadata=ADMIN).workloads
    assert services and all(w.workload.HasField("inference") for w in services)
    for w in stub.ListWorkloads(apb.ListWorkloadsRequest(state="PLACED"), metadata=ADMIN).workloads:
        assert w.state == "PLACED" and w.placement.shards


def test_list_bad_arguments(srv: Running) -> None:
    stub = srv.stub()
    found = violations_of(
        lambda: stub.ListWorkloads(
            apb.ListWorkloadsRequest(kind="batch", state="DONE", page_size=-1), metadata=ADMIN
        )
    )
    assert [p for p, _ in found] == ["kind", "state", "page_size"]
    found = violations_of(
        lambda: stub.ListWorkloads(apb.ListWorkloadsRequest(page_token="%%%"), metadata=ADMIN)
    )
    assert [p for p, _ in found] == ["page_token"]


def test_cancel_and_update(srv: Running) -> None:
    stub = srv.stub()
    submit(stub, training("to-cancel"))
    cancelled = stub.CancelWorkload(apb.CancelWorkloadRequest(id="to-cancel"), metadata=RESEARCH)
    assert cancelled.state == "CANCELLED" and not cancelled.placement.shards
    again = stub.CancelWorkload(apb.CancelWorkloadRequest(id="to-cancel"), metadata=RESEARCH)
    assert again.revision == cancelled.revision
    update = apb.UpdateWorkloadRequest(workload=training("to-cancel", gpus=2))
    assert (
        code_of(lambda: stub.UpdateWorkload(update, metadata=RESEARCH)) is grpc.StatusCode.FAILED_PRECONDITION
    )
    unknown = apb.UpdateWorkloadRequest(workload=training("never-submitted"))
    assert code_of(lambda: stub.UpdateWorkload(unknown, metadata=RESEARCH)) is grpc.StatusCode.NOT_FOUND
    missing = apb.CancelWorkloadRequest(id="never-submitted")
    assert code_of(lambda: stub.CancelWorkload(missing, metadata=ADMIN)) is grpc.StatusCode.NOT_FOUND

    submit(stub, training("to-update"))
    updated = stub.UpdateWorkload(
        apb.UpdateWorkloadRequest(workload=training("to-update", gpus=2)), metadata=RESEARCH
    )
    assert updated.version == 2 and updated.workload.training.gpus == 2
    moved = apb.UpdateWorkloadRequest(workload=training("to-update", tenant="product"))
    assert [p for p, _ in violations_of(lambda: stub.UpdateWorkload(moved, metadata=ADMIN))] == [
        "workload.tenant"
    ]
    srv.settle()
    plan = stub.GetPlan(apb.GetPlanRequest(), metadata=ADMIN)
    placed = {p.workload_id: p for p in plan.plan.placements}
    assert "to-cancel" not in placed
    assert sum(s.gpus for s in placed["to-update"].shards) == 2


# -- nodes -----------------------------------------------------------------------


def test_upsert_nodes_bad_input_names_the_request_fields(srv: Running) -> None:
    stub = srv.stub()
    request = apb.UpsertNodesRequest(
        nodes=[
            pb.Node(id="x1", gpu_type="h100-80g", gpus=8),
            pb.Node(id="x2", gpu_type="no-such-type", gpus=-1, state="sleeping"),
        ]
    )
    paths = [p for p, _ in violations_of(lambda: stub.UpsertNodes(request, metadata=ADMIN))]
    assert paths == ["nodes[1].state", "nodes[1].gpu_type", "nodes[1].gpus"]  # every problem at once


def test_drain_moves_workloads_off_the_node(tmp_path: Path) -> None:
    with running_server(tmp_path) as fresh:
        stub = fresh.stub()
        stub.UpsertNodes(inventory_request())
        for i in range(2):  # 8 of the 16 H100s: they fit on either H100 node alone
            submit(stub, training(f"job-{i}", gpus=4, tenant="research"), None)
        fresh.settle()
        used = {s.node_id for p in stub.GetPlan(apb.GetPlanRequest()).plan.placements for s in p.shards}
        node = sorted(used)[0]
        drained = stub.DrainNode(apb.DrainNodeRequest(id=node))
        assert drained.state == "draining"
        assert code_of(lambda: stub.DrainNode(apb.DrainNodeRequest(id="nope"))) is grpc.StatusCode.NOT_FOUND
        fresh.settle()
        plan = stub.GetPlan(apb.GetPlanRequest()).plan
        assert node not in {s.node_id for p in plan.placements for s in p.shards}
        assert len(plan.placements) == 2


def test_list_nodes_pages_and_inventory_on_the_first_page(srv: Running) -> None:
    stub = srv.stub()
    first = stub.ListNodes(apb.ListNodesRequest(page_size=2), metadata=RESEARCH)
    assert [n.id for n in first.nodes] == ["n1", "n2"] and first.next_page_token
    assert {t.name for t in first.gpu_types} == {"h100-80g", "a100-40g"}
    assert {t.name for t in first.tenants} == {"research", "product"}
    rest = stub.ListNodes(
        apb.ListNodesRequest(page_size=2, page_token=first.next_page_token), metadata=RESEARCH
    )
    assert [n.id for n in rest.nodes] == ["n3"] and not rest.next_page_token and not rest.gpu_types


# -- the plan, explanations ----------------------------------------------------------


def test_get_plan_before_any_state_is_not_found_then_recorded(tmp_path: Path) -> None:
    with running_server(tmp_path) as fresh:
        stub = fresh.stub()
        fresh.settle()
        # an empty state is planned too (nothing to place): the record exists
        record = stub.GetPlan(apb.GetPlanRequest())
        assert record.revision >= 1 and not record.plan.placements
        stub.UpsertNodes(inventory_request())
        w = training("first", gpus=4, tenant="research")
        submit(stub, w, None)
        fresh.settle()
        record = stub.GetPlan(apb.GetPlanRequest())
        assert record.plan.status in ("OPTIMAL", "FEASIBLE")
        assert record.based_on <= record.revision
        status = stub.GetWorkload(apb.GetWorkloadRequest(id=w.id))
        assert status.state == "PLACED", (status, record)
        assert [(s.node_id, s.gpus) for s in status.placement.shards] == [
            (s.node_id, s.gpus) for p in record.plan.placements if p.workload_id == w.id for s in p.shards
        ]


def test_explain_placed_and_pending(srv: Running) -> None:
    stub = srv.stub()
    placed = stub.Explain(apb.ExplainRequest(id="llm-pretrain"), metadata=RESEARCH)
    assert placed.workload_id == "llm-pretrain" and placed.summary and placed.state in ("PLACED", "PENDING")
    assert placed.placed == bool(placed.placement.shards)
    too_big = training("too-big", gpus=64)
    submit(stub, too_big)
    srv.settle()
    pending = stub.Explain(apb.ExplainRequest(id="too-big"), metadata=RESEARCH)
    assert not pending.placed and pending.state == "PENDING" and pending.summary
    status = stub.GetWorkload(apb.GetWorkloadRequest(id="too-big"), metadata=RESEARCH)
    assert status.state == "PENDING" and status.reasons


# -- Watch -------------------------------------------------------------------------


def watch(stub: object, token: object, from_revision: int, until: int) -> list[apb.Event]:
    events = []
    call = stub.Watch(apb.WatchRequest(from_revision=from_revision), metadata=token, timeout=20)  # type: ignore[attr-defined]
    for event in call:
        events.append(event)
        if event.revision >= until:
            call.cancel()
            break
    return events


def test_watch_streams_changes_in_order_and_filters_by_tenant(srv: Running) -> None:
    stub = srv.stub()
    until = submit(stub, training("watched")).revision
    admin = watch(stub, ADMIN, 0, until)
    revisions = [e.revision for e in admin]
    assert revisions == list(range(1, until + 1))  # admin sees every change, gap-free
    research = watch(stub, RESEARCH, 0, until)
    tenants = {e.workload.workload.tenant for e in research if e.WhichOneof("object") == "workload"}
    assert tenants == {"research"}
    kinds = {e.WhichOneof("object") for e in research}
    assert {"node", "workload", "plan"} <= kinds
    # resuming from a revision sends only what follows it
    tail = watch(stub, ADMIN, until - 1, until)
    assert [e.revision for e in tail] == [until] and tail[0].workload.workload.id == "watched"


def test_watch_delivers_new_changes_live(srv: Running) -> None:
    stub = srv.stub()
    now = stub.GetPlan(apb.GetPlanRequest(), metadata=ADMIN).revision
    call = stub.Watch(apb.WatchRequest(from_revision=now), metadata=ADMIN, timeout=20)
    seen: list[apb.Event] = []

    def read() -> None:
        for event in call:
            seen.append(event)
            if event.WhichOneof("object") == "workload" and event.workload.workload.id == "live-1":
                call.cancel()
                return

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)  # the stream is now waiting for changes
    submitted = submit(stub, training("live-1"))
    reader.join(10)
    assert not reader.is_alive()
    assert [e.revision for e in seen] == sorted({e.revision for e in seen})
    assert seen[0].revision == now + 1
    assert seen[-1].revision == submitted.revision


def test_watch_bad_revision(srv: Running) -> None:
    stub = srv.stub()
    found = violations_of(
        lambda: list(stub.Watch(apb.WatchRequest(from_revision=-1), metadata=ADMIN, timeout=5))
    )
    assert [p for p, _ in found] == ["from_revision"]


# -- Plan (stateless) ------------------------------------------------------------------


def test_plan_is_stateless_and_matches_the_solver(srv: Running) -> None:
    stub = srv.stub()
    inv = inventory_request()
    workloads = example_workloads()
    srv.settle()  # earlier tests' changes planned: nothing else writes meanwhile
    before = stub.GetPlan(apb.GetPlanRequest(), metadata=ADMIN).revision
    reply = stub.Plan(
        apb.PlanRequest(
            inventory=pb.Inventory(gpu_types=inv.gpu_types, nodes=inv.nodes, tenants=inv.tenants),
            workloads=workloads,
            policy="throughput",
        ),
        metadata=RESEARCH,
        timeout=60,
    )
    problem = convert.problem_from_messages(
        pb.Inventory(gpu_types=inv.gpu_types, nodes=inv.nodes, tenants=inv.tenants),
        pb.WorkloadList(workloads=workloads),
    )
    local = solver.plan(problem, "throughput")
    assert reply.plan.status == local.status.value
    assert reply.plan.objective == pytest.approx(local.objective)
    assert {p.workload_id for p in reply.plan.placements} == {p.workload_id for p in local.placements}
    assert reply.solve_time_s > 0
    after = stub.GetPlan(apb.GetPlanRequest(), metadata=ADMIN).revision
    assert after == before


def test_plan_bad_input_lists_every_problem(srv: Running) -> None:
    stub = srv.stub()
    request = apb.PlanRequest(
        inventory=pb.Inventory(
            gpu_types=[pb.GpuType(name="h100-80g", memory_gib=80)],
            nodes=[pb.Node(id="n1", gpu_type="h100-80g", gpus=0)],
        ),
        workloads=[training("a", gpus=1), training("a", gpus=1)],
        policy="fastest",
    )
    request.options.time_limit_s = -1
    paths = [p for p, _ in violations_of(lambda: stub.Plan(request, metadata=RESEARCH))]
    assert "policy" in paths and "options.time_limit_s" in paths
    assert "nodes[0].gpus" in paths and "workloads[1].id" in paths


def test_plan_honours_the_deadline(srv: Running) -> None:
    problem = instances.problem(400, 80, seed=3)
    inv, wl = convert.problem_to_messages(problem)
    request = apb.PlanRequest(inventory=inv, workloads=wl.workloads, policy="fairness")
    request.options.time_limit_s = 60
    request.options.relative_gap = 0
    stub = srv.stub()
    start = time.monotonic()
    reply = stub.Plan(request, metadata=RESEARCH, timeout=3.0)
    elapsed = time.monotonic() - start
    assert elapsed < 3.0
    assert reply.plan.status in ("OPTIMAL", "FEASIBLE", "HEURISTIC")
    assert reply.plan.placements


# -- limits --------------------------------------------------------------------------


def test_too_large_and_too_many_requests_are_resource_exhausted(tmp_path: Path) -> None:
    with running_server(tmp_path, max_message_mib=1, rate_limit=5.0, rate_burst=5) as small:
        stub = small.stub()
        huge = apb.PlanRequest(workloads=[training(f"w{i}" + "x" * 200) for i in range(6000)])
        assert code_of(lambda: stub.Plan(huge)) is grpc.StatusCode.RESOURCE_EXHAUSTED
        codes = []
        for _ in range(20):
            try:
                stub.ListNodes(apb.ListNodesRequest())
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and codes[0] is grpc.StatusCode.OK


def test_metrics_count_requests_and_plans(srv: Running) -> None:
    text = srv.server.metrics.render().decode()
    assert 'apportion_requests_total{code="OK",method="SubmitWorkload"}' in text
    assert 'code="UNAUTHENTICATED"' in text
    assert "apportion_plan_solve_seconds_count" in text
    assert 'apportion_workloads{state="PLACED"}' in text


def test_generate_and_logs_follow_the_tenants(srv: Running) -> None:
    from apportion.v1 import inference_pb2 as ipb
    from apportion.v1 import inference_pb2_grpc

    inference = inference_pb2_grpc.InferenceStub(srv.channel())
    request = ipb.GenerateRequest(service="chat", prompt="hi")
    assert code_of(lambda: inference.Generate(request, metadata=RESEARCH)) is grpc.StatusCode.NOT_FOUND
    for who in (PRODUCT, ADMIN):  # its tenant and the admin get past auth: no replica runs it
        assert code_of(lambda w=who: inference.Generate(request, metadata=w)) is grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: inference.Generate(request)) is grpc.StatusCode.UNAUTHENTICATED
    stub = srv.stub()
    logs = apb.LogsRequest(id="chat")
    assert code_of(lambda: list(stub.Logs(logs, metadata=RESEARCH))) is grpc.StatusCode.NOT_FOUND
    assert list(stub.Logs(logs, metadata=PRODUCT)) == []  # nothing ran: no lines
    bad = apb.LogsRequest(id="chat", tail=-1)
    assert code_of(lambda: list(stub.Logs(bad, metadata=PRODUCT))) is grpc.StatusCode.INVALID_ARGUMENT
