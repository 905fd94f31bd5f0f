"""The ``apportion`` command line, in-process through ``main([...])`` and as a
subprocess (``python -m server``): plans on small files, the JSON shape, and
bad input answered with every offending path, exit status 2 and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import solver
from apportion.v1 import allocator_pb2 as apb
from server import convert
from server.cli import main

ROOT = Path(__file__).resolve().parents[2]
Write = Callable[[str, str], Path]
FAST = ["--time-limit", "5"]
PLAN_KEYS = {"status", "policy", "objective", "placements", "unplaced", "shortfalls", "stage_times_s"}
PLAN_KEYS |= {"shadow_prices", "metrics"}
METRIC_KEYS = {"gpus_used", "gpus_total", "cost_per_hour", "normalized_throughput", "served_fraction"}
METRIC_KEYS |= {"migrations", "placed", "unplaced"}


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m server ARGS`` with the checkout importable (installed or not)."""
    env = dict(os.environ)
    paths = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), str(ROOT / "proto")])
    return subprocess.run(
        [sys.executable, "-m", "server", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def files(inventory: Path, workloads: Path) -> list[str]:
    return ["--inventory", str(inventory), "--workloads", str(workloads)]


def check_plan_json(data: dict[str, object], policy: str) -> None:
    assert set(data) >= PLAN_KEYS
    assert data["policy"] == policy
    assert data["status"] in {s.value for s in solver.PlanStatus}
    assert isinstance(data["objective"], float)
    if data["status"] in ("OPTIMAL", "FEASIBLE"):
        assert isinstance(data["best_bound"], float) and isinstance(data["gap"], float)
    assert isinstance(data["metrics"], dict) and set(data["metrics"]) == METRIC_KEYS
    placements = data["placements"]
    assert isinstance(placements, list)
    for p in placements:
        assert set(p) == {"workload_id", "gpu_type", "shards"}
        assert all(set(s) == {"node_id", "gpus"} and isinstance(s["gpus"], int) for s in p["shards"])
    unplaced = data["unplaced"]
    assert isinstance(unplaced, list)
    for u in unplaced:
        assert set(u) == {"workload_id", "reasons", "details"} and u["reasons"]
        assert all(d["code"] in {c.value for c in solver.ReasonCode} for d in u["details"])
    ids = {p["workload_id"] for p in placements} | {u["workload_id"] for u in unplaced}
    assert ids == {"llm-pretrain", "chat", "finetune"}  # every workload is placed or explained


# ---------------------------------------------------------------------------
# Plans


def test_plan_json(inventory_file: Path, workloads_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *files(inventory_file, workloads_file), *FAST, "--format", "json"]) == 0
    out = capsys.readouterr().out
    check_plan_json(json.loads(out), "throughput")


@pytest.mark.parametrize("policy", solver.policy_names())
def test_plan_every_policy(
    policy: str, inventory_file: Path, workloads_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", *files(inventory_file, workloads_file), *FAST, "--policy", policy, "--format", "json"]
    assert main(argv) == 0
    check_plan_json(json.loads(capsys.readouterr().out), policy)


def test_plan_table(inventory_file: Path, workloads_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *files(inventory_file, workloads_file), *FAST]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for word in ("policy throughput", "objective", "bound", "gap", "time"):
        assert word in header
    assert "Placements" in out and "WORKLOAD" in out


def test_plan_o_is_the_output_format_as_in_every_command(
    inventory_file: Path,
    workloads_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `plan -o json` wrote a table to a file named "json"; now -o is the format everywhere
    monkeypatch.chdir(tmp_path)
    assert main(["plan", *files(inventory_file, workloads_file), *FAST, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["placements"]
    assert not (tmp_path / "json").exists()
    assert main(["plan", *files(inventory_file, workloads_file), *FAST, "-o", "plan.json"]) == 2
    assert "invalid choice: 'plan.json'" in capsys.readouterr().err


def test_plan_to_file_and_replan_from_it(
    inventory_file: Path, workloads_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "plan.json"
    argv = ["plan", *files(inventory_file, workloads_file), *FAST, "--format", "json", "--out", str(first)]
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    before = json.loads(first.read_text())
    argv = [
        "plan",
        *files(inventory_file, workloads_file),
        *FAST,
        "--format",
        "json",
        "--current",
        str(first),
    ]
    assert main([*argv, "--max-migrations", "0"]) == 0
    after = json.loads(capsys.readouterr().out)
    check_plan_json(after, "throughput")
    assert after["metrics"]["migrations"] == 0
    assert {p["workload_id"] for p in before["placements"]} <= {p["workload_id"] for p in after["placements"]}


def test_explain(inventory_file: Path, workloads_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "chat", *files(inventory_file, workloads_file), *FAST, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workload_id"] == "chat" and isinstance(data["placed"], bool)
    assert data["summary"] and isinstance(data["details"], list)
    assert (data["placement"] is not None) == data["placed"]
    assert main(["explain", "chat", *files(inventory_file, workloads_file), *FAST]) == 0
    assert capsys.readouterr().out.startswith("chat: ")


def test_progress_goes_to_stderr_only(inventory_file: Path, workloads_file: Path, tmp_path: Path) -> None:
    result = run_cli(
        "plan", *files(inventory_file, workloads_file), *FAST, "--format", "json", "--progress", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    check_plan_json(json.loads(result.stdout), "throughput")  # stdout is only the JSON
    assert "apportion: " in result.stderr


def test_subprocess_plan_json(inventory_file: Path, workloads_file: Path, tmp_path: Path) -> None:
    result = run_cli("plan", *files(inventory_file, workloads_file), *FAST, "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress when stderr is not a terminal
    check_plan_json(json.loads(result.stdout), "throughput")


# ---------------------------------------------------------------------------
# Bad input: exit status 2, every path, no traceback


BAD_INVENTORY = """\
gpu_types:
  - {name: h100-80g, memory_gib: 80}
nodes:
  - {id: n1, gpu_type: h100-80g, gpus: 8}
  - {id: n2, gpu_type: h100-80g, gpus: 8}
  - {id: n3, gpu_type: h100-80g, gpus: 8}
  - {id: n4, gpu_type: h100-80g, gpus: eight}
"""

BAD_WORKLOADS = """\
workloads:
  - id: a
    training: {gpus: 8, throughput: {h100-80g: 1}}
  - id: b
    inference: {gpus_per_replica: {h100-80g: 1}, replica_rps: {h100-80g: 5}, target_rps: 0}
  - id: c
    training: {gpus: 8, throughput: {h100-80g: 1}, locality: rack}
"""


def test_bad_input_names_every_path(write: Write, capsys: pytest.CaptureFixture[str]) -> None:
    inv, wl = write("inventory.yaml", BAD_INVENTORY), write("workloads.yaml", BAD_WORKLOADS)
    assert main(["plan", *files(inv, wl), "--format", "json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert 'nodes[3].gpus: expected an integer, got "eight"' in captured.err
    assert "workloads[1].inference.target_rps: must be > 0" in captured.err
    assert (
        'workloads[2].training.locality: must be one of node, domain, zone, any; got "rack"' in captured.err
    )


def test_semantic_errors_exit_2(write: Write, capsys: pytest.CaptureFixture[str]) -> None:
    inv = write(
        "inventory.yaml", "gpu_types: [{name: t, memory_gib: 80}]\nnodes: [{id: n1, gpu_type: t, gpus: 8}]\n"
    )
    wl = write(
        "workloads.yaml", "workloads: [{id: a, inference: {gpus_per_replica: {t: 1}, replica_rps: {t: 1}}}]\n"
    )
    assert main(["plan", *files(inv, wl)]) == 2
    assert "workloads[0].inference.target_rps: must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--policy", "fastest"], '--policy: unknown policy "fastest" (known: throughput, '),
        (["--current", "missing.json"], "cannot read missing.json: "),
        (["--time-limit", "-1"], "argument --time-limit: must be > 0"),
        (["--backend", "gurobi"], "argument --backend: invalid choice: 'gurobi'"),
        (["--max-migrations", "few"], "argument --max-migrations: expected an integer, got 'few'"),
    ],
)
def test_bad_arguments_exit_2(
    extra: list[str],
    expected: str,
    inventory_file: Path,
    workloads_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["plan", *files(inventory_file, workloads_file), *extra]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and captured.out == ""


def test_unknown_workload_to_explain(
    inventory_file: Path, workloads_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "nope", *files(inventory_file, workloads_file)]) == 2
    assert 'WORKLOAD_ID: no workload "nope"' in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["plan", "--inventory", "x.yaml"]) == 2
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --workloads" in err
    assert "usage: apportion" in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("apportion ")
    assert main(["plan", "--help"]) == 0
    assert "--inventory" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("inventory", "workloads", "expected"),
    [
        (BAD_INVENTORY, BAD_WORKLOADS, 'nodes[3].gpus: expected an integer, got "eight"'),
        ("nodes:\n  - {id: n1\n", "workloads: []\n", "not valid YAML or JSON: line 3, column 1"),
        ("[1, 2]", "workloads: {}", "workloads: expected a list, got a mapping"),
        (
            "gpu_types: []",
            "workloads: [{id: a, training: 8}]",
            "workloads[0].training: expected a mapping, got 8",
        ),
    ],
)
def test_subprocess_bad_input_exit_2_without_traceback(
    inventory: str, workloads: str, expected: str, write: Write, tmp_path: Path
) -> None:
    inv, wl = write("inventory.yaml", inventory), write("workloads.yaml", workloads)
    result = run_cli("plan", *files(inv, wl), "--format", "json", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert expected in result.stderr
    assert result.stdout == ""


def test_subprocess_missing_file(tmp_path: Path) -> None:
    result = run_cli("plan", "--inventory", "nope.yaml", "--workloads", "nope2.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "cannot read nope.yaml" in result.stderr and "cannot read nope2.yaml" in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000, "cannot be read: nested too deeply"),
        ("bigint.json", '{"gpu_types": [{"name": "a", "memory_gib": ' + "9" * 5000 + "}]}", "4300 digits"),
        ("nul.yaml", "gpu_types: []\x00\n", "not valid YAML or JSON"),
        ("deep.yaml", "a: " + "[" * 100_000 + "]" * 100_000, "not valid YAML or JSON"),
    ],
)
def test_hostile_files_exit_2_without_a_traceback(
    name: str, content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert main(["plan", "--inventory", str(path), "--workloads", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fifos_devices_and_huge_files_are_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # no writer: reading it would hang
    for path in (fifo, Path("/dev/zero")):
        assert main(["plan", "--inventory", str(path), "--workloads", str(path)]) == 2
        assert f"cannot read {path}: not a regular file" in capsys.readouterr().err
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 * 1024 * 1024))
    monkeypatch.setenv("APPORTION_MAX_INPUT_MIB", "1")
    assert main(["plan", "--inventory", str(big), "--workloads", str(big)]) == 2
    assert "larger than the input limit of 1 MiB (set APPORTION_MAX_INPUT_MIB" in capsys.readouterr().err


def test_the_time_limit_is_the_whole_commands(tmp_path: Path) -> None:
    """Issue 11: starting Python, reading the files and writing the plan come off the
    solver's budget, so `--time-limit 5` ends within about 5 s of wall time."""
    import yaml

    from bench import instances

    inv, wl = convert.problem_to_messages(instances.problem(1000, 1000, seed=0))
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(convert.message_to_dict(inv)))
    (tmp_path / "wl.yaml").write_text(yaml.safe_dump(convert.message_to_dict(wl)))
    start = time.monotonic()
    done = run_cli(
        "plan", "--inventory", "inv.yaml", "--workloads", "wl.yaml", "--policy", "cost",
        "--relative-gap", "0", "--time-limit", "5", "--format", "json", "--out", "plan.json",
        cwd=tmp_path,
    )  # fmt: skip
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert wall < 6.5, wall
    assert json.loads((tmp_path / "plan.json").read_text())["placements"]


def test_plan_work_limit_makes_the_same_plan_and_says_what_stopped_it(
    inventory_file: Path, workloads_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "plan",
        *files(inventory_file, workloads_file),
        "--time-limit",
        "60",
        "--work-limit",
        "0.5",
        "-o",
        "json",
    ]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        data = json.loads(capsys.readouterr().out)
        runs.append((data["objective"], data["work_s"], data["stopped_by"], data["placements"]))
    assert runs[0] == runs[1]
    assert runs[0][2] in {"gap", "work_limit", "exhausted"} and runs[0][1] > 0
    assert main(["plan", *files(inventory_file, workloads_file), "--work-limit", "0"]) == 2


def test_plan_options_bound_the_work_limit() -> None:
    assert convert.plan_options(apb.PlanOptions(work_limit_s=3.0)).work_limit_s == 3.0
    # Without one, the budget comes from the limit asked for, also where a deadline cuts it.
    cut = convert.plan_options(apb.PlanOptions(time_limit_s=10.0), deadline_s=2.0)
    assert cut.time_limit_s == 2.0 and cut.work_budget() == pytest.approx(5.0)
    for bad in (0.0, -1.0, 1e9, float("nan")):
        with pytest.raises(solver.ValidationError, match="work_limit_s"):
            convert.plan_options(apb.PlanOptions(work_limit_s=bad))
