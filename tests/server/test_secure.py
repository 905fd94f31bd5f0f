"""The server's security settings end to end: TLS with tokens, mTLS, and the
configurations `apportion serve` refuses to start with."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import allocator_pb2_grpc
from server import auth, cli
from tests.server.conftest import Certs
from tests.server.serving import ADMIN_TOKEN, RESEARCH_TOKEN, TOKENS_YAML, inventory_request, running_server


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_tls_with_tokens(tmp_path: Path, certs: Certs) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(
        tmp_path, insecure=False, tls_cert=certs.server_cert, tls_key=certs.server_key, tokens=tokens
    ) as srv:
        address = f"localhost:{srv.server.port}"
        with grpc.secure_channel(address, auth.channel_credentials(certs.ca)) as channel:
            stub = allocator_pb2_grpc.AllocatorStub(channel)
            stub.UpsertNodes(inventory_request(), metadata=bearer(ADMIN_TOKEN), timeout=10)
            nodes = stub.ListNodes(apb.ListNodesRequest(), metadata=bearer(RESEARCH_TOKEN), timeout=10)
            assert [n.id for n in nodes.nodes] == ["n1", "n2", "n3"]
            with pytest.raises(grpc.RpcError) as info:
                stub.ListNodes(apb.ListNodesRequest(), timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(address) as plain:
            with pytest.raises(grpc.RpcError) as info:
                allocator_pb2_grpc.AllocatorStub(plain).ListNodes(
                    apb.ListNodesRequest(), metadata=bearer(ADMIN_TOKEN), timeout=5
                )
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate(tmp_path: Path, certs: Certs) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(
        tmp_path,
        insecure=False,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
        tokens=tokens,
    ) as srv:
        address = f"localhost:{srv.server.port}"
        good = auth.channel_credentials(certs.ca, certs.client_cert, certs.client_key)
        with grpc.secure_channel(address, good) as channel:
            stub = allocator_pb2_grpc.AllocatorStub(channel)
            assert (
                stub.ListNodes(apb.ListNodesRequest(), metadata=bearer(ADMIN_TOKEN), timeout=10) is not None
            )
        with grpc.secure_channel(address, auth.channel_credentials(certs.ca)) as channel:
            with pytest.raises(grpc.RpcError) as info:
                allocator_pb2_grpc.AllocatorStub(channel).ListNodes(
                    apb.ListNodesRequest(), metadata=bearer(ADMIN_TOKEN), timeout=5
                )
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "127.0.0.1:0"], "refuses to start unauthenticated"),
        (["--insecure", "--listen", "0.0.0.0:0"], "loopback"),
        (["--insecure", "--listen", "127.0.0.1:0", "--tls-cert", "x.pem"], "--tls-key"),
        (["--insecure", "--listen", "127.0.0.1:0", "--tokens", "no-such-tokens.yaml"], "no-such-tokens.yaml"),
    ],
)
def test_serve_refuses_unsafe_or_broken_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    status = cli.main(["serve", "--db", str(tmp_path / "s.db"), *args])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s.db").exists()
