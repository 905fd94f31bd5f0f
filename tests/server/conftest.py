"""Input files for the conversion and CLI tests: the example of DESIGN.md,
made valid (its `product` tenant is declared) and small enough to plan in well
under a second."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

INVENTORY_YAML = """\
gpu_types:
  - {name: h100-80g, memory_gib: 80, cost_per_hour: 4.0}
  - {name: a100-40g, memory_gib: 40, cost_per_hour: 1.8}
nodes:
  - {id: n1, gpu_type: h100-80g, gpus: 8, cpus: 96, memory_gib: 1024, zone: z1, domain: rack1}
  - {id: n2, gpu_type: h100-80g, gpus: 8, cpus: 96, memory_gib: 1024, zone: z1, domain: rack1,
     labels: {pool: batch}}
  - {id: n3, gpu_type: a100-40g, gpus: 8, cpus: 64, memory_gib: 512, zone: z2, domain: rack2, state: draining}
tenants:
  - {name: research, max_gpus: 64, max_gpus_per_type: {h100-80g: 16}}
  - {name: product, weight: 2}
"""

WORKLOADS_YAML = """\
workloads:
  - id: llm-pretrain
    tenant: research
    priority: 10
    training:
      gpus: 16
      gpu_memory_gib: 60
      locality: domain
      throughput: {h100-80g: 3.1, a100-40g: 1.0}
      remaining_work: 200000
  - id: chat
    tenant: product
    inference:
      gpus_per_replica: {h100-80g: 1, a100-40g: 2}
      replica_rps: {h100-80g: 14, a100-40g: 9}
      target_rps: 100
      min_replicas: 2
      spread: zone
  - id: finetune
    tenant: research
    weight: 0.5
    allowed_gpu_types: [h100-80g]
    node_selector: {pool: batch}
    submit_time_s: 12
    training:
      elastic:
        - {gpus: 2, throughput: {h100-80g: 1.0}}
        - {gpus: 4, throughput: {h100-80g: 1.8}}
      preemptible: false
      deadline_s: 3600
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """write(name, text) -> path of a new file in the test's temporary directory."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


@pytest.fixture
def inventory_file(write: Callable[[str, str], Path]) -> Path:
    return write("inventory.yaml", INVENTORY_YAML)


@pytest.fixture
def workloads_file(write: Callable[[str, str], Path]) -> Path:
    return write("workloads.yaml", WORKLOADS_YAML)


# -- TLS certificates (openssl command-line tool) ------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA
    stranger_cert: Path  # a client certificate signed by other_ca
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate it signed,
    and an unrelated second CA with a client certificate of its own (openssl command-line tool)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is not installed")
    d = tmp_path_factory.mktemp("certs")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(
        d, "server", "ca",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )  # fmt: skip
    client_ext = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
    _make_leaf(d, "client", "ca", client_ext)
    _make_leaf(d, "stranger", "other-ca", client_ext)
    return Certs(
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        other_ca=d / "other-ca.crt",
        stranger_cert=d / "stranger.crt",
        stranger_key=d / "stranger.key",
    )
