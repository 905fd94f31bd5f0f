"""apportion.client.Client against real servers on loopback ports: every method,
idempotent retries with the same request id, errors with their field
violations, pagination, auth and TLS.

One plain-text server per module (no tokens: every caller is the admin), one
with tokens for the auth cases and one with mutual TLS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from apportion.client import ApportionError, Client, ConfigError, is_loopback
from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from server import convert
from tests.server.conftest import INVENTORY_YAML, WORKLOADS_YAML, Certs
from tests.server.serving import (
    ADMIN_TOKEN,
    PRODUCT_TOKEN,
    RESEARCH_TOKEN,
    ROOT,
    TOKENS_YAML,
    Running,
    free_port,
    running_server,
)

INVENTORY: dict[str, Any] = convert.parse_document(INVENTORY_YAML)
WORKLOADS: dict[str, Any] = convert.parse_document(WORKLOADS_YAML)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_server(tmp_path_factory.mktemp("client")) as running:
        with Client(running.address) as client:
            client.upsert_nodes(**INVENTORY)
            for w in WORKLOADS["workloads"]:
                client.submit(w, request_id=f"seed-{w['id']}")
        running.settle()
        yield running


@pytest.fixture
def client(srv: Running) -> Iterator[Client]:
    with Client(srv.address, timeout=30) as c:
        yield c


def training(id: str, gpus: int = 1, tenant: str = "research") -> dict[str, Any]:
    return {"id": id, "tenant": tenant, "training": {"gpus": gpus, "throughput": {"h100-80g": 1.0}}}


def error_of(call: Callable[[], object]) -> ApportionError:
    with pytest.raises(ApportionError) as info:
        call()
    return info.value


# -- transport -----------------------------------------------------------------


def test_the_module_imports_nothing_of_the_server_or_the_solver() -> None:
    code = (
        "import sys, apportion.client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'solver', 'ortools'))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "proto"))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60, cwd=ROOT / "proto")


@pytest.mark.parametrize(
    ("address", "kwargs", "tls"),
    [
        ("127.0.0.1:1", {}, False),
        ("localhost:1", {}, False),
        ("[::1]:1", {}, False),
        ("10.1.2.3:443", {}, True),
        ("apportion.example.com:443", {}, True),
        ("127.0.0.1:1", {"insecure": False}, True),
        ("10.1.2.3:443", {"insecure": True}, False),
        ("127.0.0.1:1", {"ca": b"-----BEGIN CERTIFICATE-----"}, True),
    ],
)
def test_tls_is_the_default_off_loopback(address: str, kwargs: dict[str, Any], tls: bool) -> None:
    with Client(address, **kwargs) as c:
        assert c.tls is tls
    assert is_loopback(address) is (address.startswith(("127.", "localhost", "[::1]")))


def test_bad_tls_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs its key"):
        Client("127.0.0.1:1", cert=b"x")
    with pytest.raises(ConfigError, match=r"cannot read the CA certificate .*missing\.pem"):
        Client("127.0.0.1:1", ca=tmp_path / "missing.pem")


def test_unreachable_server_is_unavailable_after_retries() -> None:
    with Client(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.01) as c:
        err = error_of(lambda: c.get("x"))
    assert err.code is grpc.StatusCode.UNAVAILABLE
    assert err.violations == []


def test_health(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"


# -- workloads -------------------------------------------------------------------


def test_submit_get_cancel(client: Client) -> None:
    status = client.submit(training("c-one"))
    assert (status.workload.id, status.state, status.version) == ("c-one", "PENDING", 1)
    got = client.get("c-one")
    assert got.workload.tenant == "research" and got.version == 1
    cancelled = client.cancel("c-one")
    assert cancelled.state == "CANCELLED"
    assert client.cancel("c-one").state == "CANCELLED"  # idempotent
    message = pb.Workload(id="c-two")
    message.training.gpus = 1
    message.training.throughput["h100-80g"] = 1.0
    assert client.submit(message).workload.id == "c-two"  # a message works as well as a dict


def test_the_same_request_id_creates_one_workload(client: Client) -> None:
    first = client.submit(training("c-idem"), request_id="r-idem")
    again = client.submit(training("c-idem"), request_id="r-idem")
    assert again.created_at == first.created_at and again.version == 1
    err = error_of(lambda: client.submit(training("c-idem")))  # a new request id
    assert err.code is grpc.StatusCode.ALREADY_EXISTS
    assert "c-idem" in err.message


def test_update_makes_a_new_version(client: Client) -> None:
    client.submit(training("c-upd", gpus=1))
    updated = client.update(training("c-upd", gpus=2))
    assert updated.version == 2 and updated.workload.training.gpus == 2
    err = error_of(lambda: client.update(training("c-nope")))
    assert err.code is grpc.StatusCode.NOT_FOUND


def test_errors_carry_every_field_violation(client: Client) -> None:
    bad = {
        "id": "c-bad",
        "inference": {
            "gpus_per_replica": {"z100": 1},
            "replica_rps": {"z100": 10},
            "target_rps": -5,
        },
    }
    err = error_of(lambda: client.submit(bad))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    fields = [field for field, _ in err.violations]
    assert "workload.inference.target_rps" in fields
    assert any("z100" in field or "z100" in text for field, text in err.violations)
    assert len(err.violations) >= 2
    assert str(err).startswith("INVALID_ARGUMENT: ")
    missing = error_of(lambda: client.get("c-does-not-exist"))
    assert missing.code is grpc.StatusCode.NOT_FOUND and missing.violations == []


def test_list_follows_pages_and_filters(client: Client) -> None:
    for i in range(7):
        client.submit(training(f"c-page-{i}", tenant="product"), request_id=f"page-{i}")
    ids = [s.workload.id for s in client.list(tenant="product", page_size=2)]
    pages = [f"c-page-{i}" for i in range(7)]
    assert [i for i in ids if i.startswith("c-page-")] == pages
    assert len(ids) == len(set(ids))
    assert "chat" in ids  # the seeded product workload
    assert all(s.workload.tenant == "product" for s in client.list(tenant="product"))
    inference = [s.workload.id for s in client.list(kind="inference")]
    assert inference == ["chat"]
    client.cancel("c-page-3")
    assert "c-page-3" in [s.workload.id for s in client.list(state="CANCELLED", page_size=1)]
    err = error_of(lambda: client.list(kind="batch", state="ASLEEP"))  # the first page: raised at once
    assert {f for f, _ in err.violations} == {"kind", "state"}


# -- inventory -------------------------------------------------------------------


def test_nodes_and_drain(client: Client, srv: Running) -> None:
    response = client.upsert_nodes(nodes=[{"id": "c-n9", "gpu_type": "a100-40g", "gpus": 2}])
    assert [n.id for n in response.nodes] == ["c-n9"] and response.revision > 0
    nodes, gpu_types, tenants = client.nodes(page_size=1)  # one node a page
    ids = [n.id for n in nodes]
    assert ids == sorted(ids) and {"n1", "n2", "n3", "c-n9"} <= set(ids)
    assert {t.name for t in gpu_types} == {"h100-80g", "a100-40g"}
    assert {t.name for t in tenants} == {"research", "product"}
    drained = client.drain("c-n9")
    assert drained.state == "draining"
    assert error_of(lambda: client.drain("c-nope")).code is grpc.StatusCode.NOT_FOUND
    err = error_of(lambda: client.upsert_nodes(nodes=[pb.Node(id="c-bad", gpu_type="z100", gpus=-1)]))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in err.violations} >= {"nodes[0].gpus", "nodes[0].gpu_type"}


# -- planning --------------------------------------------------------------------


def test_plan_is_stateless_and_takes_dicts(client: Client) -> None:
    plan = client.plan(INVENTORY, WORKLOADS, "throughput", {"seed": 0, "time_limit_s": 10})
    assert plan.status == "OPTIMAL" and plan.policy == "throughput"
    placed = {p.workload_id for p in plan.placements} | {u.workload_id for u in plan.unplaced}
    assert placed == {"llm-pretrain", "chat", "finetune"}
    as_list = client.plan(convert.inventory_from_data(INVENTORY), WORKLOADS["workloads"])
    assert as_list.status == "OPTIMAL"
    response = client.plan_response(INVENTORY, WORKLOADS, current={"placements": []})
    assert response.solve_time_s > 0
    bad = {"nodes": [{"id": "x", "gpu_type": "h100-80g", "gpus": -1}], "gpu_types": INVENTORY["gpu_types"]}
    err = error_of(lambda: client.plan(bad, [], "nope", apb.PlanOptions(time_limit_s=-1)))
    assert {f for f, _ in err.violations} == {"policy", "options.time_limit_s", "nodes[0].gpus"}


def test_current_plan_and_explain(client: Client, srv: Running) -> None:
    srv.settle()
    record = client.current_plan()
    assert record.revision > 0 and record.plan.status
    placed = client.explain("chat")
    assert placed.workload_id == "chat" and placed.placed and placed.placement.shards
    pending = client.explain("llm-pretrain")
    assert not pending.placed and pending.summary
    assert error_of(lambda: client.explain("c-nope")).code is grpc.StatusCode.NOT_FOUND


def test_watch_resumes_from_a_revision(client: Client) -> None:
    events = client.watch(from_revision=0)
    first = [next(events) for _ in range(5)]
    events.close()
    revisions = [e.revision for e in first]
    assert revisions == sorted(revisions) and len(set(revisions)) == 5
    assert all(e.WhichOneof("object") for e in first)
    resumed = client.watch(from_revision=revisions[2])
    assert [next(resumed).revision for _ in range(2)] == revisions[3:5]
    resumed.close()
    bad = client.watch(from_revision=-1)
    assert error_of(lambda: next(bad)).code is grpc.StatusCode.INVALID_ARGUMENT


# -- retries ---------------------------------------------------------------------


class _Lost(grpc.RpcError, grpc.Call, grpc.Future):  # type: ignore[misc]
    """A failed call as the client sees it: UNAVAILABLE, no details."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "connection lost (injected)"

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> Any:
        return self

    def traceback(self, timeout: float | None = None) -> Any:
        return None

    def trailing_metadata(self) -> Any:
        return ()

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def add_callback(self, callback: Any) -> bool:
        return False

    def add_done_callback(self, fn: Any) -> None:
        fn(self)


class LoseReplies(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Lets the first ``lose`` SubmitWorkload calls reach the server, then reports
    them failed with ``code`` (the reply was lost); records every request id sent.
    With ``forward=False`` the failing calls never reach the server."""

    def __init__(self, lose: int, code: grpc.StatusCode, *, forward: bool = True) -> None:
        self.lose = lose
        self.code = code
        self.forward = forward
        self.request_ids: list[str] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if not details.method.endswith("/SubmitWorkload"):
            return continuation(details, request)
        self.request_ids.append(request.request_id)
        if len(self.request_ids) > self.lose:
            return continuation(details, request)
        if self.forward:
            continuation(details, request).result()  # the server accepts it...
        return _Lost(self.code)  # ...and the reply is lost


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_submit_retries_with_the_same_request_id(srv: Running, code: grpc.StatusCode) -> None:
    lossy = LoseReplies(2, code)
    wid = f"c-retry-{code.name.lower()}"
    with Client(srv.address, interceptors=[lossy], backoff_s=0.01) as c:
        status = c.submit(training(wid))
        assert status.workload.id == wid and status.version == 1
        assert len(lossy.request_ids) == 3 and len(set(lossy.request_ids)) == 1
        assert [s.workload.id for s in c.list(tenant="research") if s.workload.id == wid] == [wid]


def test_retries_give_up_and_reads_do_not_retry_deadlines(srv: Running) -> None:
    lossy = LoseReplies(10, grpc.StatusCode.UNAVAILABLE, forward=False)
    with Client(srv.address, interceptors=[lossy], retries=2, backoff_s=0.01) as c:
        err = error_of(lambda: c.submit(training("c-never")))
        assert err.code is grpc.StatusCode.UNAVAILABLE and len(lossy.request_ids) == 3
        assert error_of(lambda: c.get("c-never")).code is grpc.StatusCode.NOT_FOUND


# -- auth and TLS ----------------------------------------------------------------


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    path = tmp_path_factory.mktemp("client-auth")
    tokens = path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(path, tokens=tokens) as running:
        with Client(running.address, token=ADMIN_TOKEN) as admin:
            admin.upsert_nodes(**INVENTORY)
        yield running


def test_tokens(authed: Running) -> None:
    with Client(authed.address) as anonymous:
        assert error_of(lambda: anonymous.get("x")).code is grpc.StatusCode.UNAUTHENTICATED
    with Client(authed.address, token=RESEARCH_TOKEN) as research:
        mine = research.submit(training("c-mine", tenant=""))
        assert mine.workload.tenant == "research"
        err = error_of(lambda: research.upsert_nodes(nodes=[{"id": "x", "gpu_type": "h100-80g", "gpus": 1}]))
        assert err.code is grpc.StatusCode.PERMISSION_DENIED
    with Client(authed.address, token=PRODUCT_TOKEN) as product:
        assert error_of(lambda: product.get("c-mine")).code is grpc.StatusCode.NOT_FOUND
        assert "c-mine" not in [s.workload.id for s in product.list()]


def test_mutual_tls(tmp_path: Path, certs: Certs) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    port = free_port()
    with running_server(
        tmp_path,
        listen=f"localhost:{port}",
        insecure=False,
        tokens=tokens,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    ):
        address = f"localhost:{port}"
        kwargs: dict[str, Any] = {"token": ADMIN_TOKEN, "ca": certs.ca, "retries": 0}
        with Client(address, cert=certs.client_cert, key=certs.client_key, **kwargs) as c:
            assert c.tls
            assert c.health() == "SERVING"
            assert error_of(lambda: c.get("x")).code is grpc.StatusCode.NOT_FOUND
        with Client(address, **kwargs) as no_cert:  # TLS, but no client certificate
            assert error_of(no_cert.health).code is grpc.StatusCode.UNAVAILABLE
