"""A client that is not Python: examples/clients/node (``@grpc/grpc-js``) against a real server.

Skipped when ``node`` or ``npm`` is not on PATH. ``npm ci`` runs only when
``node_modules/`` is missing or older than ``package-lock.json`` (it is
git-ignored and kept between runs); a network failure of ``npm ci`` skips too.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apportion.v1 import allocator_pb2 as apb
from tests.server.serving import ROOT, Running, inventory_request, running_server

CLIENT_DIR = ROOT / "examples" / "clients" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
KNOWN_NODES = {"n1", "n2"}  # the ready nodes of tests.server.conftest.INVENTORY_YAML (n3 is draining)
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH")

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None, reason="node and npm are needed for the Node.js client (not on PATH)"
)


def _installed_at(modules: Path) -> float | None:
    marker = modules / ".package-lock.json"  # npm rewrites it on every install
    for path in (marker, modules):
        if path.exists():
            return path.stat().st_mtime
    return None


@pytest.fixture(scope="module")
def node_client() -> Path:
    """examples/clients/node with its node_modules installed (npm ci when stale)."""
    assert NPM is not None
    modules = CLIENT_DIR / "node_modules"
    lock = CLIENT_DIR / "package-lock.json"
    # One install at a time (parallel test runs).
    with (Path(tempfile.gettempdir()) / "apportion-npm-ci.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        installed = _installed_at(modules)
        if installed is None or installed < lock.stat().st_mtime:
            res = subprocess.run(
                [NPM, "ci", "--no-audit", "--no-fund"],
                cwd=CLIENT_DIR,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if res.returncode != 0:
                out = res.stdout + res.stderr
                if any(e in out for e in NETWORK_ERRORS):
                    pytest.skip(f"npm ci could not reach the registry:\n{out[-2000:]}")
                pytest.fail(f"npm ci failed ({res.returncode}):\n{out[-4000:]}")
    return CLIENT_DIR / "client.js"


def run_client(client: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, str(client), *args], cwd=client.parent, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_server(tmp_path_factory.mktemp("node-client")) as srv:
        srv.stub().UpsertNodes(inventory_request(), timeout=10)  # the inventory, through the Python stub
        yield srv


def _output(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert res.returncode == 0, f"client failed ({res.returncode}):\n{res.stderr}\n{res.stdout}"
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def _check_placed(out: dict[str, Any], workload_id: str, nodes: set[str]) -> None:
    assert out["workload_id"] == workload_id
    assert out["state"] == "PLACED"
    placement = out["placement"]
    assert placement["workload_id"] == workload_id
    assert placement["shards"], out
    assert {s["node_id"] for s in placement["shards"]} <= nodes
    assert all(s["gpus"] >= 1 for s in placement["shards"])
    # It read the plan: the current plan places it the same way, or was recorded before
    # the workload was admitted at once into free capacity (server/admission.py).
    assert out["plan"]["status"] in ("OPTIMAL", "FEASIBLE", "HEURISTIC")
    if out["plan"]["placement"] is None:
        assert int(out["plan"]["revision"]) < int(out["revision"])
    else:
        assert out["plan"]["placement"] == placement
        assert int(out["plan"]["revision"]) >= int(out["revision"])


def test_submits_and_reads_the_plan(node_client: Path, server: Running) -> None:
    res = run_client(node_client, "--server", server.address, "--id", "from-node", "--timeout", "30")
    out = _output(res)
    _check_placed(out, "from-node", KNOWN_NODES)
    assert out["version"] == 1
    # The Python side sees the same workload and placement.
    status = server.stub().GetWorkload(apb.GetWorkloadRequest(id="from-node"), timeout=10)
    assert status.state == "PLACED"
    assert [(s.node_id, s.gpus) for s in status.placement.shards] == [
        (s["node_id"], s["gpus"]) for s in out["placement"]["shards"]
    ]


def test_inventory_and_workload_files(node_client: Path, tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        res = run_client(
            node_client,
            "--server",
            srv.address,
            "--inventory",
            "inventory.json",
            "--workload",
            "workload.json",
        )
    out = _output(res)
    _check_placed(out, "chat", {"n1", "n2"})  # the nodes of examples/clients/node/inventory.json
    assert len(out["placement"]["shards"]) >= 2  # min_replicas
    assert out["inventory"]["nodes"] == 2


def test_errors_print_the_status_code(node_client: Path, server: Running, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "bad", "training": {"gpus": 0}}), encoding="utf-8")
    res = run_client(node_client, "--server", server.address, "--workload", str(bad))
    assert res.returncode == 1, res
    assert "SubmitWorkload: INVALID_ARGUMENT" in res.stderr
    assert "workload.training.gpus" in res.stderr
    assert res.stdout == ""

    res = run_client(node_client, "--server", server.address, "--nonsense")
    assert res.returncode == 2
    assert "unknown argument --nonsense" in res.stderr
