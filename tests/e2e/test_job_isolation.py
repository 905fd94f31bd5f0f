"""A tenant's job cannot reach the worker's credential or another tenant's files: a real
server with tokens, a real ``apportion worker`` with a node token, real job processes that
try what an attacker's job would (the reproduction of the hardening issue's first item:
``echo $APPORTION_TOKEN; tr "\\0" " " </proc/$PPID/cmdline``), read back through the
tenant's own ``Logs``.

As root (CI) the agent runs each job as its own user id (``--job-uids``): the job cannot
read the token file, the agent's ``/proc`` entries or another job's directory either.
As another user only what holds without a second user id is checked: the token is not in
the job's environment or the agent's command line, and the agent's ``/proc/PID/environ``
is closed to it (the agent is not dumpable)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from server import convert
from tests.e2e.cluster import FAST_WORKERS, GPU_TYPE, wait_for
from tests.server.serving import (
    ADMIN_TOKEN,
    PRODUCT_TOKEN,
    RESEARCH_TOKEN,
    ROOT,
    Running,
    metadata,
    running_server,
)

NODE_TOKEN = "w1-node-token-0123456789abcdef"
TOKENS = f"""\
{ADMIN_TOKEN}: {{role: admin}}
{RESEARCH_TOKEN}: {{tenant: research}}
{PRODUCT_TOKEN}: {{tenant: product}}
{NODE_TOKEN}: {{node: w1}}
"""
ROOT_USER = os.geteuid() == 0
JOB_UIDS = (61000, 61009)


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A work directory jobs under other user ids can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="apportion-isolation-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_worker(
    address: str, work_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    args = [
        sys.executable, "-m", "server", "worker", "--server", address, "--node-id", "w1",
        "--gpus", "2", "--gpu-type", GPU_TYPE, "--work-dir", str(work_dir / "agent"),
        "--heartbeat", "0.3", "--stop-grace", "2", *extra,
    ]  # fmt: skip
    base = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]), **(env or {}))
    with (work_dir / "agent.log").open("ab") as log:
        return subprocess.Popen(args, cwd=ROOT, env=base, stdout=log, stderr=subprocess.STDOUT)


def submit(srv: Running, token: str, workload: dict[str, Any]) -> None:
    msg = convert.workloads_from_data({"workloads": [workload]}).workloads[0]
    srv.stub().SubmitWorkload(apb.SubmitWorkloadRequest(workload=msg), metadata=metadata(token))


def job(workload_id: str, tenant: str, script: str) -> dict[str, Any]:
    return {
        "id": workload_id,
        "tenant": tenant,
        "training": {"gpus": 1, "throughput": {GPU_TYPE: 1.0}, "remaining_work": 1},
        "runtime": {"command": ["sh", "-c", script]},
    }


def state(srv: Running, workload_id: str) -> apb.WorkloadStatus:
    return srv.stub().GetWorkload(apb.GetWorkloadRequest(id=workload_id), metadata=metadata(ADMIN_TOKEN))


def logs_as(srv: Running, token: str, workload_id: str) -> str:
    lines = srv.stub().Logs(apb.LogsRequest(id=workload_id), metadata=metadata(token), timeout=10)
    return "\n".join(line.text for line in lines)


def test_a_tenants_job_reads_neither_the_credential_nor_another_tenants_files(
    tmp_path: Path, work_dir: Path
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS)
    token_file = work_dir / "node-token"
    token_file.write_text(NODE_TOKEN + "\n")
    token_file.chmod(0o600)
    with running_server(tmp_path, tokens=tokens, workers=FAST_WORKERS) as srv:
        admin = metadata(ADMIN_TOKEN)
        srv.stub().UpsertNodes(
            apb.UpsertNodesRequest(
                gpu_types=[pb.GpuType(name=GPU_TYPE, memory_gib=16)],
                tenants=[pb.Tenant(name="research"), pb.Tenant(name="product")],
            ),
            metadata=admin,
        )
        extra = ["--token-file", str(token_file)]
        if ROOT_USER:
            extra += ["--job-uids", f"{JOB_UIDS[0]}-{JOB_UIDS[1]}"]
        worker = start_worker(srv.address, work_dir, *extra)
        try:
            wait_for(lambda: "w1" in srv.server.dispatcher.sessions(), 20, "the worker to register")
            submit(srv, RESEARCH_TOKEN, job("holder", "research", "echo s3cr3t-weights > secret; sleep 30"))
            wait_for(lambda: state(srv, "holder").state == "RUNNING", 20, "holder running")
            holder_dir = work_dir / "agent" / "runs" / "holder.0"
            wait_for(lambda: (holder_dir / "secret").exists(), 10, "the holder's file")

            thief = (
                'echo "uid=$(id -u)"; echo "token=$APPORTION_TOKEN"; env; '
                'echo "cmdline=$(tr "\\0" " " </proc/$PPID/cmdline)"; '
                'echo "environ=$(tr "\\0" " " </proc/$PPID/environ 2>&1)"; '
                f'echo "file=$(cat {token_file} 2>&1)"; '
                f'echo "other=$(cat {holder_dir}/secret 2>&1)"; '
                'echo "done-marker"'
            )
            submit(srv, PRODUCT_TOKEN, job("thief", "product", thief))
            wait_for(lambda: state(srv, "thief").state in ("SUCCEEDED", "FAILED"), 30, "the thief to end")
            assert state(srv, "thief").state == "SUCCEEDED", state(srv, "thief").message
            seen = wait_for(
                lambda: next((t for t in [logs_as(srv, PRODUCT_TOKEN, "thief")] if "done-marker" in t), None),
                10,
                "the thief's logs",
            )
            assert NODE_TOKEN not in seen, seen  # not in its env, the agent's command line or environ
            assert "cmdline=" in seen and "environ=" in seen  # the reads ran
            assert not any(line.startswith("APPORTION_SERVER=") for line in seen.splitlines())
            if ROOT_USER:
                uid = int(next(line for line in seen.splitlines() if line.startswith("uid="))[4:])
                assert JOB_UIDS[0] <= uid <= JOB_UIDS[1]
                assert "s3cr3t-weights" not in seen and "Permission denied" in seen, seen
                holder_uid = holder_dir.stat().st_uid
                assert JOB_UIDS[0] <= holder_uid <= JOB_UIDS[1] and holder_uid != uid
        finally:
            worker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(20)
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        if ROOT_USER:  # nothing of the jobs' users outlives the agent
            from worker.agent import processes_of

            wait_for(
                lambda: not any(processes_of(u) for u in range(JOB_UIDS[0], JOB_UIDS[1] + 1)),
                10,
                "the jobs' processes to end",
            )


def test_the_agent_refuses_a_token_on_its_command_line_and_root_jobs_beside_a_credential(
    work_dir: Path,
) -> None:
    on_command_line = start_worker("127.0.0.1:1", work_dir, "--token", NODE_TOKEN)
    assert on_command_line.wait(30) == 2
    log = (work_dir / "agent.log").read_text()
    assert "--token is refused" in log and NODE_TOKEN not in log
    if ROOT_USER:
        (work_dir / "agent.log").unlink()
        as_root = start_worker("127.0.0.1:1", work_dir, env={"APPORTION_TOKEN": NODE_TOKEN})
        assert as_root.wait(30) == 2
        assert "--job-uids" in (work_dir / "agent.log").read_text()
