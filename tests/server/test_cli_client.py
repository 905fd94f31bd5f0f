"""The ``apportion`` client commands against a real server, through ``main([...])``:
tables and JSON, exit statuses, files checked before any call, the server's
errors as one line (or every field violation, exit 2), and ``plan --server``
printing what the file mode prints.

One plain-text server per module (no tokens), one with tokens for the auth cases.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apportion.client import Client
from server.cli import main
from tests.server.conftest import INVENTORY_YAML, WORKLOADS_YAML
from tests.server.serving import (
    ADMIN_TOKEN,
    RESEARCH_TOKEN,
    TOKENS_YAML,
    Running,
    free_port,
    running_server,
)

Capsys = pytest.CaptureFixture[str]
Write = Callable[[str, str], Path]
FAST = ["--time-limit", "10"]

# A file whose second workload the server rejects (unknown GPU type, negative target)
# while its first is fine.
HALF_BAD_YAML = """\
workloads:
  - id: cli-ok
    tenant: product
    training: {gpus: 1, throughput: {h100-80g: 1.0}}
  - id: cli-bad
    inference:
      gpus_per_replica: {z100: 1}
      replica_rps: {z100: 10}
      target_rps: -5
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    path = tmp_path_factory.mktemp("cli-client")
    (path / "inventory.yaml").write_text(INVENTORY_YAML)
    (path / "workloads.yaml").write_text(WORKLOADS_YAML)
    with running_server(path) as running:
        assert main(["apply-inventory", "-f", str(path / "inventory.yaml"), "--server", running.address]) == 0
        assert main(["submit", "-f", str(path / "workloads.yaml"), "--server", running.address]) == 0
        running.settle()
        yield running


@pytest.fixture
def at(srv: Running, monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> list[str]:
    """``--server ADDR`` of the module's server; the environment left out of it."""
    monkeypatch.delenv("APPORTION_SERVER", raising=False)
    monkeypatch.delenv("APPORTION_TOKEN", raising=False)
    capsys.readouterr()  # what the fixtures printed
    return ["--server", srv.address]


def unused() -> list[str]:
    """``--server`` of a port nothing listens on: a call there would fail with exit 1."""
    return ["--server", f"127.0.0.1:{free_port()}"]


def run(capsys: Capsys, *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# -- plan --server: the file mode's output, computed by the server ---------------


def _without_times(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "stage_times_s": list(data["stage_times_s"])}  # names in order; seconds vary


@pytest.mark.parametrize("policy", ["throughput", "cost", "fcfs"])
def test_plan_on_the_server_prints_the_file_modes_json(
    at: list[str], inventory_file: Path, workloads_file: Path, capsys: Capsys, policy: str
) -> None:
    files = ["--inventory", inventory_file, "--workloads", workloads_file, "--policy", policy, *FAST]
    code, local, _ = run(capsys, "plan", *files, "--format", "json", "--seed", "3")
    assert code == 0
    code, remote, _ = run(capsys, "plan", *files, "--format", "json", "--seed", "3", *at)
    assert code == 0
    assert _without_times(json.loads(remote)) == _without_times(json.loads(local))
    assert list(json.loads(remote)) == list(json.loads(local))  # the same keys in the same order


def test_plan_on_the_server_prints_the_file_modes_table_and_current(
    at: list[str], inventory_file: Path, workloads_file: Path, tmp_path: Path, capsys: Capsys
) -> None:
    files = ["--inventory", inventory_file, "--workloads", workloads_file, *FAST]
    current = tmp_path / "current.json"
    assert main([*map(str, ["plan", *files]), "--format", "json", "--out", str(current)]) == 0

    def masked(text: str) -> str:
        text = re.sub(r"time \d+\.\d+ s", "time T s", text)
        return text.split("Stage times")[0]

    code, local, _ = run(capsys, "plan", *files, "--current", current)
    assert code == 0
    code, remote, _ = run(capsys, "plan", *files, "--current", current, *at)
    assert code == 0
    assert masked(remote) == masked(local)
    assert "Placements" in remote and "migrations 0" in remote


def test_plan_bad_files_exit_2_before_any_call(write: Write, workloads_file: Path, capsys: Capsys) -> None:
    bad = write("inventory.yaml", "nodes:\n  - {id: n1, gpus: eight, colour: red}\n")
    code, out, err = run(capsys, "plan", "--inventory", bad, "--workloads", workloads_file, *unused())
    assert code == 2 and out == ""
    assert "nodes[0].gpus" in err and "nodes[0].colour" in err
    assert "cannot reach" not in err


def test_plan_semantic_errors_on_the_server_match_the_file_mode(
    at: list[str], write: Write, workloads_file: Path, capsys: Capsys
) -> None:
    inventory = write(
        "inventory.yaml",
        "gpu_types: [{name: h100-80g, memory_gib: 80}]\n"
        "nodes: [{id: n1, gpu_type: h100-80g, gpus: -2}, {id: n1, gpu_type: z100, gpus: 8}]\n",
    )
    files = ["--inventory", inventory, "--workloads", workloads_file]
    local = run(capsys, "plan", *files)
    remote = run(capsys, "plan", *files, *at)
    assert local[0] == remote[0] == 2
    assert remote[2] == local[2]
    assert "nodes[0].gpus" in remote[2] and "nodes[1].id" in remote[2]


def test_plan_on_an_unreachable_server(inventory_file: Path, workloads_file: Path, capsys: Capsys) -> None:
    server = unused()
    code, out, err = run(
        capsys, "plan", "--inventory", inventory_file, "--workloads", workloads_file, *server
    )
    assert code == 1 and out == ""
    assert err.startswith(f"apportion: cannot reach the server at {server[1]}")
    assert err.count("\n") == 1


# -- workloads ------------------------------------------------------------------


def test_submit_prints_a_table_and_is_idempotent(at: list[str], write: Write, capsys: Capsys) -> None:
    path = write(
        "w.yaml",
        "workloads:\n"
        "  - {id: cli-a, tenant: research, training: {gpus: 1, throughput: {h100-80g: 1.0}}}\n"
        "  - {id: cli-b, tenant: product, training: {gpus: 2, throughput: {h100-80g: 1.0}}}\n",
    )
    code, out, _ = run(capsys, "submit", "-f", path, *at)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID", "TENANT", "KIND", "STATE", "VERSION", "GPUS", "AGE", "QUEUE", "PLACEMENT", "/", "REASON"
    ]  # fmt: skip
    assert [line.split()[:5] for line in lines[1:]] == [
        ["cli-a", "research", "training", "PENDING", "1"],
        ["cli-b", "product", "training", "PENDING", "1"],
    ]
    code, out, _ = run(capsys, "submit", "-f", path, "-o", "json", *at)  # again: nothing new
    assert code == 0
    data = json.loads(out)
    assert [(s["workload"]["id"], s["version"]) for s in data["workloads"]] == [("cli-a", 1), ("cli-b", 1)]


def test_apply_creates_updates_and_leaves_unchanged_per_workload(
    at: list[str], write: Write, capsys: Capsys
) -> None:
    def apply(speed: float, gpus: int) -> dict[str, tuple[str, int]]:
        path = write(
            "apply.yaml",
            f"""workloads:
  - {{id: ap-one, tenant: product, training: {{gpus: 1, throughput: {{h100-80g: {speed}}}}}}}
  - {{id: ap-two, tenant: research, training: {{gpus: {gpus}, throughput: {{h100-80g: 1.0}}}}}}
""",
        )
        code, out, _ = run(capsys, "apply", "-f", path, "-o", "json", *at)
        assert code == 0
        return {r["id"]: (r["action"], r["status"]["version"]) for r in json.loads(out)["workloads"]}

    assert apply(2.0, 1) == {"ap-one": ("created", 1), "ap-two": ("created", 1)}
    assert apply(2.0, 1) == {"ap-one": ("unchanged", 1), "ap-two": ("unchanged", 1)}
    assert apply(3.0, 1) == {"ap-one": ("updated", 2), "ap-two": ("unchanged", 1)}
    assert apply(2.0, 1) == {"ap-one": ("updated", 3), "ap-two": ("unchanged", 1)}  # back: a third version
    assert apply(3.0, 1)["ap-one"] == ("updated", 4)  # not a replay of the second
    assert run(capsys, "cancel", "ap-two", *at)[0] == 0
    assert apply(3.0, 2)["ap-two"] == ("ended (CANCELLED): not changed", 1)
    one = write(
        "one.yaml",
        "workloads: [{id: ap-one, tenant: product, training: {gpus: 1, throughput: {h100-80g: 3.0}}}]",
    )
    code, out, _ = run(capsys, "apply", "-f", one, *at)
    assert code == 0 and re.search(r"^ap-one\s+unchanged\s+\w+\s+4$", out, re.M), out


def test_submit_checks_the_file_before_any_call(write: Write, capsys: Capsys) -> None:
    path = write(
        "w.yaml",
        "workloads:\n"
        "  - {id: x, training: {gpus: two}}\n"
        "  - {id: y, inference: {spread: everywhere}}\n"
        "  - {id: x, training: {gpus: 1}}\n",
    )
    code, out, err = run(capsys, "submit", "-f", path, *unused())
    assert code == 2 and out == ""
    assert "invalid input (3 problems)" in err
    assert "workloads[0].training.gpus" in err
    assert "workloads[1].inference.spread" in err
    assert 'workloads[2].id: duplicate id "x" (also workloads[0])' in err
    assert "cannot reach" not in err
    code, _, err = run(capsys, "submit", "-f", path.with_name("missing.yaml"), *unused())
    assert code == 2 and "cannot read" in err


def test_submit_reports_what_the_server_rejects_with_file_paths(
    at: list[str], write: Write, capsys: Capsys
) -> None:
    path = write("w.yaml", HALF_BAD_YAML)
    code, out, err = run(capsys, "submit", "-f", path, *at)
    assert code == 2
    assert "cli-ok" in out and "cli-bad" not in out  # the good one is submitted all the same
    assert "workloads[1].inference.target_rps" in err
    assert "z100" in err
    assert "workload." not in err  # the server's paths, rebased onto the file


def test_get_table_json_and_unknown(at: list[str], capsys: Capsys) -> None:
    code, out, _ = run(capsys, "get", "chat", *at)
    assert code == 0
    assert re.search(r"^id:\s+chat$", out, re.M) and re.search(r"^kind:\s+inference$", out, re.M)
    assert re.search(r"^state:\s+PLACED$", out, re.M)
    code, out, _ = run(capsys, "get", "chat", "-o", "json", *at)
    assert code == 0
    data = json.loads(out)
    assert data["workload"]["id"] == "chat" and data["state"] == "PLACED" and data["placement"]["shards"]
    code, out, err = run(capsys, "get", "nope", *at)
    assert (code, out) == (1, "")
    assert err == "apportion: no workload 'nope'\n" or err.startswith("apportion: no workload")
    assert err.count("\n") == 1


def test_list_with_filters(at: list[str], capsys: Capsys) -> None:
    code, out, _ = run(capsys, "list", *at)
    assert code == 0
    ids = [line.split()[0] for line in out.splitlines()[1:]]
    assert {"chat", "finetune", "llm-pretrain"} <= set(ids)
    code, out, _ = run(capsys, "list", "--kind", "inference", "-o", "json", *at)
    assert [s["workload"]["id"] for s in json.loads(out)["workloads"]] == ["chat"]
    code, out, _ = run(capsys, "list", "--state", "pending", "--tenant", "research", "-o", "json", *at)
    assert code == 0
    assert "llm-pretrain" in [s["workload"]["id"] for s in json.loads(out)["workloads"]]
    assert all(s["state"] == "PENDING" for s in json.loads(out)["workloads"])
    code, _, err = run(capsys, "list", "--state", "asleep", *at)
    assert code == 2 and "invalid choice" in err


def test_cancel(at: list[str], write: Write, capsys: Capsys) -> None:
    path = write("w.yaml", "workloads: [{id: cli-c, training: {gpus: 1, throughput: {h100-80g: 1}}}]\n")
    assert main(["submit", "-f", str(path), *at]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "cancel", "cli-c", *at)
    assert code == 0 and "CANCELLED" in out
    code, out, _ = run(capsys, "cancel", "cli-c", "-o", "json", *at)
    assert code == 0 and json.loads(out)["workloads"][0]["state"] == "CANCELLED"
    code, _, err = run(capsys, "cancel", "nope", *at)
    assert code == 1 and "no workload" in err


# -- inventory, the plan, explanations -----------------------------------------------


def test_nodes_round_trip_through_apply_inventory(at: list[str], tmp_path: Path, capsys: Capsys) -> None:
    code, out, _ = run(capsys, "nodes", *at)
    assert code == 0
    assert out.startswith("Nodes\n") and "GPU types" in out and "Tenants" in out
    # per node: GPUs used and free, and what runs there (the module's workloads hold n1 and n2)
    row = re.search(
        r"^\s+n2\s+h100-80g\s+8\s+(\d+)\s+(\d+)\s+ready\s+z1\s+rack1.*pool=batch\s+(\S.*)$", out, re.M
    )
    assert row is not None, out
    used, free, names = int(row[1]), int(row[2]), row[3]
    assert used + free == 8
    placed = [
        (w.workload.id, s.gpus)
        for w in Client(at[1]).list()
        if w.state in ("PLACED", "RUNNING")
        for s in w.placement.shards
        if s.node_id == "n2"
    ]
    assert used == sum(g for _w, g in placed) and (names == "-") == (not placed)
    code, out, _ = run(capsys, "nodes", "-o", "json", *at)
    assert code == 0
    inventory = json.loads(out)
    assert {n["id"] for n in inventory["nodes"]} >= {"n1", "n2", "n3"}
    saved = tmp_path / "inventory.json"
    saved.write_text(out)
    code, out, _ = run(capsys, "apply-inventory", "-f", saved, *at)
    assert code == 0 and out.startswith("applied 2 GPU type(s)")
    code, out, _ = run(capsys, "apply-inventory", "-f", saved, "-o", "json", *at)
    assert code == 0 and int(json.loads(out)["revision"]) > 0


def test_apply_inventory_errors(at: list[str], write: Write, capsys: Capsys) -> None:
    structural = write("i.yaml", "nodes: [{id: n9, gpus: many}]\n")
    code, _, err = run(capsys, "apply-inventory", "-f", structural, *unused())
    assert code == 2 and "nodes[0].gpus" in err and "cannot reach" not in err
    semantic = write("i.yaml", "nodes: [{id: n9, gpu_type: z100, gpus: 4}]\n")
    code, _, err = run(capsys, "apply-inventory", "-f", semantic, *at)
    assert code == 2 and "nodes[0].gpu_type" in err


def test_drain(at: list[str], write: Write, capsys: Capsys) -> None:
    path = write("i.yaml", "nodes: [{id: cli-n, gpu_type: a100-40g, gpus: 2}]\n")
    assert main(["apply-inventory", "-f", str(path), *at]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "drain", "cli-n", *at)
    assert code == 0 and re.search(r"^cli-n\s+a100-40g\s+2\s+draining", out, re.M)
    code, out, _ = run(capsys, "drain", "cli-n", "-o", "json", *at)
    assert json.loads(out)["state"] == "draining"
    code, _, err = run(capsys, "drain", "nope", *at)
    assert code == 1 and err.startswith("apportion: ")


def test_undrain(at: list[str], write: Write, capsys: Capsys) -> None:
    path = write("i.yaml", "nodes: [{id: cli-u, gpu_type: a100-40g, gpus: 2, zone: z9}]\n")
    assert main(["apply-inventory", "-f", str(path), *at]) == 0
    code, _, err = run(capsys, "undrain", "cli-u", *at)
    assert code == 1 and err == "apportion: node 'cli-u' is ready, not draining\n"
    assert run(capsys, "drain", "cli-u", *at)[0] == 0
    code, out, _ = run(capsys, "undrain", "cli-u", "-o", "json", *at)
    node = json.loads(out)
    assert code == 0 and node["state"] == "ready" and node["zone"] == "z9"  # the rest kept
    code, out, _ = run(capsys, "nodes", "-o", "json", *at)
    assert next(n for n in json.loads(out)["nodes"] if n["id"] == "cli-u")["state"] == "ready"
    code, _, err = run(capsys, "undrain", "nope", *at)
    assert code == 1 and err == "apportion: no node 'nope'\n"


def test_usage_counts_what_each_tenant_holds_against_its_quota(
    at: list[str], srv: Running, capsys: Capsys
) -> None:
    held: dict[str, dict[str, int]] = {}
    for w in Client(srv.address).list():
        if w.state in ("PLACED", "RUNNING"):
            t = held.setdefault(w.workload.tenant, {})
            t[w.placement.gpu_type] = t.get(w.placement.gpu_type, 0) + sum(x.gpus for x in w.placement.shards)
    assert held  # the module's workloads run
    code, out, _ = run(capsys, "usage", "-o", "json", *at)
    assert code == 0
    rows = {r["tenant"]: r for r in json.loads(out)["tenants"]}
    for tenant, by_type in held.items():
        assert rows[tenant]["gpus_per_type"] == by_type and rows[tenant]["gpus"] == sum(by_type.values())
    # the inventory's quotas: research max 64, h100-80g 16
    assert rows["research"]["max_gpus"] == 64 and rows["research"]["max_gpus_per_type"] == {"h100-80g": 16}
    code, out, _ = run(capsys, "usage", *at)
    assert code == 0 and re.search(r"^research\s+h100-80g\s+\d+\s+16$", out, re.M), out


def test_get_plan(at: list[str], srv: Running, capsys: Capsys) -> None:
    srv.settle()
    code, out, _ = run(capsys, "get-plan", *at)
    assert code == 0
    assert out.startswith("current plan: revision ")
    assert re.search(r"^\s+chat\s+inference\s+h100-80g", out, re.M)  # kinds from the server's workloads
    code, out, _ = run(capsys, "get-plan", "-o", "json", *at)
    data = json.loads(out)
    assert data["status"] in ("OPTIMAL", "FEASIBLE") and "placements" in data


def test_explain_asks_the_server(at: list[str], capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, "explain", "chat", *at)
    assert code == 0 and out.startswith("chat: placed\n")
    code, out, _ = run(capsys, "explain", "llm-pretrain", "--format", "json", *at)
    data = json.loads(out)
    assert data["placed"] is False and data["placement"] is None and data["state"] == "PENDING"
    monkeypatch.setenv("APPORTION_SERVER", at[1])  # the default server
    code, _, err = run(capsys, "explain", "nope")
    assert code == 1 and "no workload" in err


def test_explain_needs_both_files_or_neither(inventory_file: Path, capsys: Capsys) -> None:
    code, _, err = run(capsys, "explain", "chat", "--inventory", inventory_file, *unused())
    assert code == 2 and "--workloads: needed with --inventory" in err


def test_explain_plans_the_files_on_the_server(
    at: list[str], inventory_file: Path, workloads_file: Path, capsys: Capsys
) -> None:
    files = ["--inventory", inventory_file, "--workloads", workloads_file, *FAST, "--format", "json"]
    local = run(capsys, "explain", "chat", *files)
    remote = run(capsys, "explain", "chat", *files, *at)
    assert local[0] == remote[0] == 0 and json.loads(remote[1]) == json.loads(local[1])


# -- watch -----------------------------------------------------------------------


def test_watch_lines_and_json_lines(at: list[str], capsys: Capsys) -> None:
    code, out, _ = run(capsys, "watch", "--limit", "4", *at)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4 and [int(line.split()[0]) for line in lines] == sorted(
        int(line.split()[0]) for line in lines
    )
    code, out, _ = run(capsys, "watch", "--limit", "3", "--from-revision", "2", "-o", "json", *at)
    events = [json.loads(line) for line in out.splitlines()]
    assert [int(e["revision"]) for e in events] == [3, 4, 5]
    assert all(e["action"] in ("created", "updated", "deleted") for e in events)


def test_watch_stops_cleanly_on_ctrl_c(
    at: list[str], capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Client.watch

    def interrupted(self: Client, from_revision: int = 0, tenant: str = "") -> Iterator[Any]:
        events = real(self, from_revision, tenant)
        yield next(events)
        events.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "watch", interrupted)
    code, out, err = run(capsys, "watch", *at)
    assert code == 0 and len(out.splitlines()) == 1 and err == ""


# -- where the server is, and who calls --------------------------------------------


def test_unreachable_server_one_line(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("APPORTION_SERVER", address)
    for args in (["get", "x"], ["watch"]):
        code, out, err = run(capsys, *args)
        assert (code, out) == (1, ""), args
        assert err.startswith(f"apportion: cannot reach the server at {address}") and err.count("\n") == 1


def test_the_servers_own_unavailable_is_not_a_server_it_cannot_reach(at: list[str], capsys: Capsys) -> None:
    # generate to a training workload: the server answers UNAVAILABLE with its reason
    # (it was reported as "cannot reach the server")
    code, out, err = run(capsys, "generate", "llm-pretrain", "--prompt", "hi", *at)
    assert (code, out) == (1, "")
    said = '"llm-pretrain" is a training workload, not an inference service'
    assert err == f"apportion: the server says: {said}\n"


def test_tls_files_that_cannot_be_read(tmp_path: Path, capsys: Capsys) -> None:
    code, _, err = run(capsys, "list", "--tls-ca", tmp_path / "nope.pem", *unused())
    assert code == 2 and "cannot read the CA certificate" in err
    code, _, err = run(capsys, "list", "--tls-cert", tmp_path / "c.pem", *unused())
    assert code == 2 and "needs its key" in err


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    path = tmp_path_factory.mktemp("cli-auth")
    tokens = path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(path, tokens=tokens) as running:
        yield running


def test_tokens(authed: Running, capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPORTION_TOKEN", raising=False)
    at = ["--server", authed.address]
    code, out, err = run(capsys, "list", *at)
    assert (code, out) == (1, "")
    assert err.startswith("apportion: not authenticated: ") and "--token" in err
    code, _, err = run(capsys, "list", "--token", "not-a-known-token-at-all", *at)
    assert code == 1 and "not authenticated" in err
    monkeypatch.setenv("APPORTION_TOKEN", RESEARCH_TOKEN)
    code, out, _ = run(capsys, "list", *at)
    assert code == 0 and out == "(no workloads)\n"
    code, _, err = run(capsys, "drain", "n1", *at)
    assert code == 1 and err.startswith("apportion: permission denied: ")
    code, _, _ = run(capsys, "nodes", "--token", ADMIN_TOKEN, *at)
    assert code == 0
