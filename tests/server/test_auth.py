"""server.auth: the tokens file, authentication, TLS through a real gRPC server, the listen
checks and the rate limiter."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server import errors
from server.auth import (
    ANONYMOUS,
    AUTH_HINT,
    Authenticator,
    ConfigError,
    Principal,
    RateLimited,
    RateLimiter,
    TokenFileError,
    channel_credentials,
    check_listen,
    fingerprint,
    is_loopback,
    load_tokens,
    loose_permissions,
    server_credentials,
)
from tests.server.conftest import Certs

TENANT_TOKEN = "research-0123456789abcdef"
OTHER_TOKEN = "product-fedcba9876543210"
ADMIN_TOKEN = "admin-00112233445566778899"

TOKENS_YAML = f"""\
{TENANT_TOKEN}: {{tenant: research}}
"{OTHER_TOKEN}": {{tenant: product}}
{ADMIN_TOKEN}: {{role: admin}}
"""


def write(tmp_path: Path, text: str, name: str = "tokens.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- certificates ------------------------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[grpc.Server, list[int]]]:
    """A gRPC server with the health service; the test adds its port(s), then starts it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    ports: list[int] = []
    yield server, ports
    server.stop(None).wait(5)


def _check(address: str, creds: grpc.ChannelCredentials) -> health_pb2.HealthCheckResponse:
    with grpc.secure_channel(address, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response: health_pb2.HealthCheckResponse = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return response


# --- the tokens file ---------------------------------------------------------------------


def test_load_tokens(tmp_path: Path) -> None:
    tokens = load_tokens(write(tmp_path, TOKENS_YAML))
    assert set(tokens) == {TENANT_TOKEN, OTHER_TOKEN, ADMIN_TOKEN}
    research = tokens[TENANT_TOKEN]
    assert research == Principal(f"tenant:research#{fingerprint(TENANT_TOKEN)}", "research", False)
    assert tokens[OTHER_TOKEN].tenant == "product"
    admin = tokens[ADMIN_TOKEN]
    assert (admin.tenant, admin.admin, admin.name) == (None, True, f"admin#{fingerprint(ADMIN_TOKEN)}")
    assert len(fingerprint(ADMIN_TOKEN)) == 8
    for principal in tokens.values():  # the names go to logs: never the token
        assert not any(token in principal.name for token in tokens)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "defines no tokens"),
        ("{}", "defines no tokens"),
        ("- a\n- b\n", "expected a mapping"),
        ("just-a-string-of-text\n", "expected a mapping"),
        ('"": {tenant: a}\n', "empty token"),
        ("shortish: {tenant: a}\n", "at least 16"),
        ("12345678901234567890: {tenant: a}\n", "must be a string; quote it"),
        ('"has a space 0123456789": {tenant: a}\n', "printable ASCII"),
        ("abcdefghij0123456789: {tenant: a}\nabcdefghij0123456789: {tenant: b}\n",
         "line 2: token abcd… appears twice"),
        ("abcdefghij0123456789: {tenant: a, role: admin}\n", "exactly one of"),
        ("abcdefghij0123456789: {tenant: a, tenant: b}\n", "line 1: key 'tenant' appears twice"),
        ("abcdefghij0123456789: {}\n", "exactly one of"),
        ("abcdefghij0123456789: research\n", "exactly one of"),
        ("abcdefghij0123456789: {tenants: a}\n", "unknown key 'tenants'"),
        ("abcdefghij0123456789: {role: viewer}\n", "unknown role 'viewer'"),
        ("abcdefghij0123456789: {tenant: ''}\n", "non-empty name"),
        ("abcdefghij0123456789: {tenant: [a]}\n", "non-empty name"),
        ("abcdefghij0123456789: {tenant: a\n", "not valid YAML"),
        ("abcdefghij0123456789: {node: ''}\n", "non-empty node id"),
        ("abcdefghij0123456789: {node: n1, role: admin}\n", "exactly one of"),
    ],
)  # fmt: skip
def test_load_tokens_refuses(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TokenFileError, match=message) as info:
        load_tokens(path)
    assert str(path) in str(info.value)
    assert "abcdefghij" not in str(info.value)  # a token is shown as its first characters only
    assert "0123456789" not in str(info.value)


def test_load_tokens_names_the_entry(tmp_path: Path) -> None:
    path = write(tmp_path, "abcdefghij0123456789: {tenant: a}\nzyxwvutsrq9876543210: {role: root}\n")
    with pytest.raises(TokenFileError, match=r"token zyxw… *: unknown role 'root'"):
        load_tokens(path)


def test_load_tokens_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(TokenFileError, match=f"{missing}: cannot read the tokens file"):
        load_tokens(missing)


def test_a_node_token_is_neither_tenant_nor_admin(tmp_path: Path) -> None:
    token = "node-token-abcdefghij0123456789"
    node = load_tokens(write(tmp_path, f"{token}: {{node: gpu-7}}\n"))[token]
    assert node == Principal(f"node:gpu-7#{fingerprint(token)}", None, False, node="gpu-7")
    assert not node.can_see("") and not node.can_see("research")
    node.require_node("gpu-7")
    with pytest.raises(errors.PermissionDenied, match=r"concerns node 'gpu-8'.*only for node 'gpu-7'"):
        node.require_node("gpu-8")
    with pytest.raises(errors.PermissionDenied):
        node.require_admin()
    Principal("admin#00000000", None, True).require_node("gpu-8")
    with pytest.raises(errors.PermissionDenied):
        Principal("tenant:research#00000000", "research", False).require_node("gpu-7")


def test_loose_permissions_of_a_credential_file(tmp_path: Path) -> None:
    path = write(tmp_path, TOKENS_YAML)
    path.chmod(0o644)
    assert "readable by others than its owner (mode 0644)" in (loose_permissions(path) or "")
    path.chmod(0o600)
    assert loose_permissions(path) is None


# --- principals and authentication -------------------------------------------------------


def test_principal_permissions() -> None:
    tenant = Principal("tenant:research#00000000", "research", False)
    admin = Principal("admin#00000000", None, True)
    assert tenant.can_see("research") and not tenant.can_see("product")
    assert admin.can_see("research") and admin.can_see("product")
    admin.require_admin()
    admin.require_tenant("product")
    tenant.require_tenant("research")
    with pytest.raises(
        errors.PermissionDenied, match="DrainNode needs the admin role; the caller is tenant:research"
    ):
        tenant.require_admin("DrainNode")
    with pytest.raises(errors.PermissionDenied, match="tenant 'product'"):
        tenant.require_tenant("product")
    assert errors.status_code(errors.PermissionDenied("x")) == grpc.StatusCode.PERMISSION_DENIED


def test_authenticate(tmp_path: Path) -> None:
    auth = Authenticator.from_file(write(tmp_path, TOKENS_YAML))
    assert auth.enabled
    research = auth.authenticate([("authorization", f"Bearer {TENANT_TOKEN}")])
    assert research.tenant == "research"
    # grpc lowercases keys; the scheme is case-insensitive; bytes values and other metadata are fine
    assert auth.authenticate([("user-agent", "x"), ("Authorization", f"bearer  {ADMIN_TOKEN} ")]).admin
    assert auth.authenticate([("authorization", f"Bearer {OTHER_TOKEN}".encode())]).tenant == "product"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, "no credentials"),
        ([], "no credentials"),
        ([("x-token", TENANT_TOKEN)], "no credentials"),
        ([("authorization", TENANT_TOKEN)], "not 'Bearer TOKEN'"),
        ([("authorization", f"Basic {TENANT_TOKEN}")], "not 'Bearer TOKEN'"),
        ([("authorization", "Bearer ")], "not 'Bearer TOKEN'"),
        ([("authorization", "Bearer wrong-0123456789abcdef")], "unknown token"),
        ([("authorization", f"Bearer {TENANT_TOKEN}x")], "unknown token"),
        ([("authorization", f"Bearer {TENANT_TOKEN}"), ("authorization", f"Bearer {ADMIN_TOKEN}")],
         "more than one"),
    ],
)  # fmt: skip
def test_authenticate_refuses(metadata: list[tuple[str, str]] | None, message: str) -> None:
    auth = Authenticator({TENANT_TOKEN: Principal("tenant:research#x", "research", False)})
    with pytest.raises(errors.Unauthenticated, match=message) as info:
        auth.authenticate(metadata)
    assert AUTH_HINT in str(info.value)  # says what to send
    assert errors.status_code(info.value) == grpc.StatusCode.UNAUTHENTICATED


def test_authenticate_insecure_without_tokens() -> None:
    auth = Authenticator(None)
    assert not auth.enabled
    assert auth.authenticate([]) is ANONYMOUS
    assert auth.authenticate([("authorization", "Bearer whatever")]) is ANONYMOUS
    assert ANONYMOUS.admin and ANONYMOUS.can_see("anyone")


def test_authenticate_real_metadata(tmp_path: Path) -> None:
    """The metadata a real gRPC server hands a handler is what authenticate() reads."""
    auth = Authenticator(load_tokens(write(tmp_path, TOKENS_YAML)))

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return auth.authenticate(context.invocation_metadata()).name.encode()
        except errors.Unauthenticated as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # not reached: abort raises

    handler = grpc.method_handlers_generic_handler(
        "test.Auth", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Auth/WhoAmI")
            name = call(b"", metadata=[("authorization", f"Bearer {TENANT_TOKEN}")], timeout=5)
            assert name == f"tenant:research#{fingerprint(TENANT_TOKEN)}".encode()
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer TOKEN" in info.value.details()
    finally:
        server.stop(None).wait(5)


# --- TLS ---------------------------------------------------------------------------------


def test_tls(certs: Certs, health_server: tuple[grpc.Server, list[int]]) -> None:
    server, _ = health_server
    port = server.add_secure_port("127.0.0.1:0", server_credentials(certs.server_cert, certs.server_key))
    server.start()
    response = _check(f"localhost:{port}", channel_credentials(certs.ca))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    # a client that does not trust the server's CA is refused
    with pytest.raises(grpc.RpcError) as info:
        _check(f"localhost:{port}", channel_credentials(certs.other_ca))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls(certs: Certs, health_server: tuple[grpc.Server, list[int]]) -> None:
    server, _ = health_server
    creds = server_credentials(certs.server_cert, certs.server_key, client_ca_path=certs.ca)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    with_cert = channel_credentials(certs.ca, cert_path=certs.client_cert, key_path=certs.client_key)
    assert _check(f"localhost:{port}", with_cert).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:  # no client certificate: refused
        _check(f"localhost:{port}", channel_credentials(certs.ca))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # a client certificate from another CA: refused too
    stranger = channel_credentials(certs.ca, cert_path=certs.stranger_cert, key_path=certs.stranger_key)
    with pytest.raises(grpc.RpcError) as info:
        _check(f"localhost:{port}", stranger)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_file_errors(tmp_path: Path, certs: Certs) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=f"cannot read the TLS certificate {missing}"):
        server_credentials(missing, certs.server_key)
    with pytest.raises(ConfigError, match=f"cannot read the TLS private key {missing}"):
        server_credentials(certs.server_cert, missing)
    with pytest.raises(ConfigError, match=f"cannot read the client CA {missing}"):
        server_credentials(certs.server_cert, certs.server_key, client_ca_path=missing)
    with pytest.raises(ConfigError, match="is not a PEM file with a PRIVATE KEY"):
        server_credentials(certs.server_cert, certs.server_cert)
    garbage = write(tmp_path, "not a certificate\n", "garbage.pem")
    with pytest.raises(ConfigError, match=f"the CA certificate {garbage} is not a PEM file"):
        channel_credentials(garbage)
    with pytest.raises(ConfigError, match="give both or neither"):
        channel_credentials(certs.ca, cert_path=certs.client_cert)
    with pytest.raises(ConfigError, match=f"cannot read the client private key {missing}"):
        channel_credentials(certs.ca, cert_path=certs.client_cert, key_path=missing)
    assert isinstance(channel_credentials(), grpc.ChannelCredentials)  # the system's roots


# --- listening ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:80", True),
        ("localhost:0", True),
        ("LOCALHOST:50051", True),
        ("[::1]:50051", True),
        ("[::ffff:127.0.0.1]:50051", True),
        ("unix:/tmp/apportion.sock", True),
        ("unix-abstract:apportion", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.5:1", False),
        ("[::ffff:10.0.0.5]:1", False),
        (":50051", False),
        ("example.com:50051", False),
        ("localhost.example.com:50051", False),
        ("127.0.0.1", False),  # no port: not a listen address
        ("::1", False),
        ("[::1]", False),
        ("", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize(
    ("address", "insecure", "tls", "tokens", "refusal"),
    [
        ("0.0.0.0:50051", False, True, True, None),
        ("127.0.0.1:50051", False, True, True, None),
        ("[::]:50051", False, False, True, "refuses to start unauthenticated: give --tls-cert/--tls-key, or"),
        ("127.0.0.1:50051", False, True, False, "refuses to start unauthenticated: give --tokens, or"),
        ("127.0.0.1:50051", False, False, False, "give --tls-cert/--tls-key and --tokens"),
        ("127.0.0.1:50051", True, False, False, None),
        ("[::1]:50051", True, False, True, None),
        ("localhost:0", True, True, True, None),
        ("0.0.0.0:50051", True, False, False, "--insecure binds only to loopback"),
        ("[::]:50051", True, False, True, "--insecure binds only to loopback"),
        ("10.0.0.5:1", True, True, True, "--insecure binds only to loopback"),
    ],
)  # fmt: skip
def test_check_listen(address: str, insecure: bool, tls: bool, tokens: bool, refusal: str | None) -> None:
    if refusal is None:
        check_listen(address, insecure=insecure, tls=tls, tokens=tokens)
    else:
        with pytest.raises(ConfigError, match=re.escape(refusal)):
            check_listen(address, insecure=insecure, tls=tls, tokens=tokens)


# --- rate limits -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("tenant:a")
    with pytest.raises(RateLimited, match=r"too many requests from tenant:a: .*retry after 0\.5 s") as info:
        limiter.check("tenant:a")
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert isinstance(info.value, errors.ResourceExhausted)
    assert errors.status_code(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    limiter.check("tenant:b")  # buckets are per principal
    clock.now += 0.25
    with pytest.raises(RateLimited) as info:
        limiter.check("tenant:a")
    assert info.value.retry_after_s == pytest.approx(0.25)
    clock.now += 0.25
    limiter.check("tenant:a")  # refilled one
    clock.now += 100  # refills up to the burst, not beyond
    for _ in range(3):
        limiter.check("tenant:a")
    with pytest.raises(RateLimited):
        limiter.check("tenant:a")


def test_rate_limiter_disabled_and_invalid() -> None:
    limiter = RateLimiter(0, 0)
    assert not limiter.enabled
    for _ in range(1000):
        limiter.check("x")
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(1.0, 0)
    with pytest.raises(ValueError, match="rate_per_s"):
        RateLimiter(-1.0, 1)
    with pytest.raises(ValueError, match="rate_per_s"):
        RateLimiter(float("nan"), 1)


def test_rate_limiter_threads() -> None:
    """Concurrent checks never let more than the burst through (the clock stands still)."""
    limiter = RateLimiter(rate_per_s=1.0, burst=50, clock=lambda: 0.0)
    passed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            try:
                limiter.check("tenant:a")
            except RateLimited:
                continue
            with lock:
                passed.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(passed) == 50
