"""The agent's pieces without a server: argv of each runtime kind, the environment
of a rank, APPORTION_* lines, GPU options, and the clean-up of leftover processes."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from worker import agent

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_argv_for_each_kind() -> None:
    py = "/usr/bin/python3"
    builtin = pb.Runtime(builtin="train-lm", args=["--steps", "5"])
    assert agent.runtime_argv(builtin, py) == [py, "-m", "worker.runtimes.train_lm", "--steps", "5"]
    assert agent.runtime_argv(pb.Runtime(builtin="serve-lm"), py) == [py, "-m", "worker.runtimes.serve_lm"]
    entry = pb.Runtime(entrypoint="pkg.mod:main", args=["x"])
    assert agent.runtime_argv(entry, py) == [py, "-c", "import pkg.mod; pkg.mod.main()", "x"]
    command = pb.Runtime(command=["echo", "hi"], args=["there"])
    assert agent.runtime_argv(command, py) == ["echo", "hi", "there"]
    for bad in (pb.Runtime(), pb.Runtime(builtin="nope"), pb.Runtime(entrypoint="no-colon")):
        with pytest.raises(agent.AgentError):
            agent.runtime_argv(bad, py)


def test_the_environment_of_a_rank() -> None:
    launch = wpb.Launch(
        workload_id="job", version=2, shard_index=1, gpus=2, node_rank=1, nnodes=2, world_size=4,
        rank_offset=2, master_addr="10.0.0.1", master_port=29601,
        workload=pb.Workload(
            id="job",
            training=pb.TrainingSpec(gpus=4, remaining_work=400.0),
            runtime=pb.Runtime(command=["x"], env={"EXTRA": "1", "LOCAL_RANK": "overridden"}),
        ),
    )  # fmt: skip
    env = agent.shard_env(
        launch, 1, 2, "3", agent.ShardDirs(Path("/run"), Path("/ckpt/job")), base={"PYTHONPATH": "/mine"}
    )
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29601"
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["GROUP_RANK"] == "1"
    assert env["APPORTION_TOTAL_STEPS"] == "400" and env["APPORTION_CHECKPOINT_DIR"] == "/ckpt/job"
    assert env["APPORTION_WORKLOAD_ID"] == "job" and env["EXTRA"] == "1"
    assert env["LOCAL_RANK"] == "overridden"  # the runtime's env comes last
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths[-1] == "/mine" and len(paths) >= 2


def test_a_replica_listens_on_its_workers_advertised_address() -> None:
    service = pb.Workload(id="chat", runtime=pb.Runtime(builtin="serve-lm"))
    service.inference.target_rps = 10
    launch = wpb.Launch(workload_id="chat", shard_index=2, gpus=1, master_addr="10.0.0.7", workload=service)
    env = agent.shard_env(launch, 0, 1, "", agent.ShardDirs(Path("/run"), Path("/ckpt/chat")), base={})
    assert env["APPORTION_SERVE_HOST"] == "10.0.0.7" and env["APPORTION_REPLICA_ID"] == "2"
    assert "APPORTION_SERVE_HOST" not in agent.shard_env(
        wpb.Launch(workload_id="job", workload=pb.Workload(id="job", training=pb.TrainingSpec(gpus=1))),
        0, 1, "", agent.ShardDirs(Path("/run"), Path("/ckpt/job")), base={},
    )  # fmt: skip


def test_serve_from_a_training_workloads_id_is_its_checkpoint_directory() -> None:
    def serve_from(value: str) -> str:
        service = pb.Workload(
            id="chat", runtime=pb.Runtime(builtin="serve-lm", env={"APPORTION_SERVE_FROM": value})
        )
        service.inference.target_rps = 10
        launch = wpb.Launch(workload_id="chat", gpus=1, workload=service)
        dirs = agent.ShardDirs(Path("/w/runs/chat.0"), Path("/w/checkpoints/chat"))
        return agent.shard_env(launch, 0, 1, "", dirs, base={})["APPORTION_SERVE_FROM"]

    assert serve_from("trainer") == str(Path("/w/checkpoints/trainer"))
    assert serve_from("/data/ckpt") == "/data/ckpt"
    assert serve_from("./ckpt/step-1.pt") == "./ckpt/step-1.pt"


def test_apportion_lines_are_parsed_and_the_rest_is_log() -> None:
    assert agent.parse_line('APPORTION_PROGRESS {"step": 3, "loss": 1.5}') == (
        "progress",
        {"step": 3, "loss": 1.5},
    )
    assert agent.parse_line('APPORTION_READY {"endpoint": "h:1"}') == ("ready", {"endpoint": "h:1"})
    assert agent.parse_line("APPORTION_PROGRESS not json") is None
    assert agent.parse_line("APPORTION_PROGRESS [1]") is None
    assert agent.parse_line("plain output") is None


def test_gpu_options() -> None:
    gpus = agent.detect_gpus("2", "sim", 16.0)
    assert (gpus.count, gpus.gpu_type, gpus.simulated) == (2, "sim", True)
    with pytest.raises(agent.AgentError, match="--gpu-type"):
        agent.detect_gpus("2", None, None)
    with pytest.raises(agent.AgentError, match="auto or a number"):
        agent.detect_gpus("many", "sim", None)


def test_auto_without_nvidia_smi_says_how_to_simulate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.shutil, "which", lambda name: None)
    with pytest.raises(agent.AgentError, match="--gpus N --gpu-type T"):
        agent.detect_gpus("auto", None, None)


def test_leftover_process_groups_are_killed_and_recycled_pids_are_not(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        (tmp_path / "a.pid").write_text(f"{child.pid} {agent._start_time(child.pid)}\n")
        (tmp_path / "b.pid").write_text(f"{os.getpid()} 1\n")  # our pid, another start time: not ours
        (tmp_path / "c.pid").write_text("garbage")
        assert agent.kill_leftovers(tmp_path) == [child.pid]
        assert child.wait(10) == -9
        assert not list(tmp_path.glob("*.pid"))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_memory_and_heartbeat_numbers_are_sane() -> None:
    total, used = agent.memory_gib()
    assert total >= used >= 0
    started = time.monotonic()
    assert agent.gpu_usage() == [] or agent.shutil.which("nvidia-smi")
    assert time.monotonic() - started < 15


# Serves a moment, reports its requests/s and latency (as serve-lm does), exits 0.
SERVING = """\
import json, time
time.sleep(0.7)  # past the agent's least time between two progress statuses
print("APPORTION_PROGRESS " + json.dumps({"requests_per_s": 41.5, "latency_p50_s": 0.021,
                                          "latency_p99_s": 0.05, "requests": 83}), flush=True)
time.sleep(0.5)
"""


def test_a_replicas_requests_per_s_and_latency_reach_its_statuses(tmp_path: Path) -> None:
    config = agent.AgentConfig(server="127.0.0.1:1", gpus="1", gpu_type="sim", work_dir=tmp_path)
    a = agent.Agent(config)  # no server: the statuses stay in its outbox
    a.pid_dir.mkdir(parents=True)
    workload = pb.Workload(
        id="chat",
        inference=pb.InferenceSpec(gpus_per_replica={"sim": 1}, replica_rps={"sim": 10}, target_rps=10),
        runtime=pb.Runtime(command=[sys.executable, "-c", SERVING]),
    )
    launch = wpb.Launch(workload_id="chat", version=1, shard_index=0, gpus=1, gpu_type="sim", nnodes=1,
                        world_size=1, master_addr="127.0.0.1", workload=workload)  # fmt: skip
    statuses: list[wpb.ShardStatus] = []
    try:
        a.launch(launch)
        deadline = time.monotonic() + 30
        while not statuses or statuses[-1].state not in ("SUCCEEDED", "FAILED"):
            assert time.monotonic() < deadline, statuses
            msg = a._outbox.get(timeout=30)
            if msg is not None and msg.WhichOneof("body") == "status":
                statuses.append(msg.status)
    finally:
        a.client.close()
    assert statuses[-1].state == "SUCCEEDED", statuses[-1]
    reported = [s for s in statuses if s.state == "RUNNING" and s.requests_per_s]
    assert reported, statuses
    for s in (reported[0], statuses[-1]):
        assert (s.requests_per_s, s.latency_p50_s, s.latency_p99_s) == (41.5, 0.021, 0.05)
    assert statuses[0].latency_p50_s == 0.0  # nothing measured before the first progress line


def test_a_job_sees_only_the_passed_part_of_the_agents_environment() -> None:
    agent_env = {
        "PATH": "/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "NCCL_DEBUG": "INFO", "HOME": "/root",
        "APPORTION_TOKEN": "secret-token-0123456789", "APPORTION_SERVER": "10.0.0.1:50051",
        "AWS_SECRET_ACCESS_KEY": "aws", "MY_SETTING": "1", "MY_OTHER": "2",
    }  # fmt: skip
    passed = agent.passed_env(agent_env)
    assert passed == {"PATH": "/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "NCCL_DEBUG": "INFO"}
    more = agent.passed_env(agent_env, (*agent.PASSED_ENV, "MY_*", "APPORTION_TOKEN"))
    assert more["MY_SETTING"] == "1" and more["MY_OTHER"] == "2" and "APPORTION_TOKEN" not in more
    launch = wpb.Launch(workload_id="job", workload=pb.Workload(id="job", training=pb.TrainingSpec(gpus=1)))
    env = agent.shard_env(launch, 0, 1, "", agent.ShardDirs(Path("/w/runs/job.0"), Path("/c")), base=passed)
    assert "APPORTION_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["HOME"] == "/w/runs/job.0" and env["PATH"] == "/bin"


def test_the_credential_comes_from_a_file_or_the_environment_and_leaves_it(tmp_path: Path) -> None:
    environ = {"APPORTION_TOKEN": "from-env-0123456789abcdef", "PATH": "/bin"}
    assert agent.read_credential(None, environ) == "from-env-0123456789abcdef"
    assert "APPORTION_TOKEN" not in environ and environ == {"PATH": "/bin"}
    token_file = tmp_path / "token"
    token_file.write_text("from-file-0123456789abcdef\n")
    environ["APPORTION_TOKEN"] = "ignored-0123456789abcdef"
    assert agent.read_credential(token_file, environ) == "from-file-0123456789abcdef"
    assert "APPORTION_TOKEN" not in environ
    token_file.write_text("\n")
    with pytest.raises(agent.AgentError, match="is empty"):
        agent.read_credential(token_file, {})
    with pytest.raises(agent.AgentError, match="cannot read --token-file"):
        agent.read_credential(tmp_path / "missing", {})


def test_job_uid_ranges_and_paths_inside_a_run_directory() -> None:
    assert agent.parse_uid_range("60000-60999") == (60000, 60999)
    assert agent.parse_uid_range("61000") == (61000, 61000)
    for bad in ("0-10", "60000-59999", "a-b", "60000-"):
        with pytest.raises(agent.AgentError):
            agent.parse_uid_range(bad)
    run = Path("/w/runs/job.0")
    assert agent.inside(run, "ckpt") == run / "ckpt"
    assert agent.inside(run, "a/../b") == run / "b"
    for escape in ("/etc", "../other.0", "a/../../x", ".."):
        assert agent.inside(run, escape) is None


def test_an_upload_reads_only_regular_files(tmp_path: Path) -> None:
    from worker import checkpoint_sync

    secret = tmp_path / "secret"
    secret.write_bytes(b"the agent's")
    planted = tmp_path / "ckpt-99.pt"
    planted.symlink_to(secret)
    with pytest.raises(OSError):
        checkpoint_sync.open_regular(planted)
    fifo = tmp_path / "ckpt-98.pt"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        checkpoint_sync.open_regular(fifo)
    with checkpoint_sync.open_regular(secret) as f:
        assert f.read() == b"the agent's"


def test_the_agent_is_not_dumpable_once_it_says_so() -> None:
    code = (
        "import ctypes; from worker import agent; ok = agent.make_undumpable(); "
        "print(ok, ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "0"]
    if os.geteuid() == 0:  # root reads any process's environ: the same-user read is for other users
        return
    holder = "from worker import agent; agent.make_undumpable(); import time; time.sleep(5)"
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], env={**os.environ, "APPORTION_TOKEN": "s-0123456789"}
    )
    try:
        time.sleep(1.0)
        reader = subprocess.run(["cat", f"/proc/{proc.pid}/environ"], capture_output=True, check=False)
        assert reader.returncode != 0 and b"s-0123456789" not in reader.stdout
    finally:
        proc.kill()
        proc.wait()


def test_a_launch_with_an_unsafe_id_builds_no_path(tmp_path: Path) -> None:
    node = agent.Agent(
        agent.AgentConfig(server="127.0.0.1:1", gpus="1", gpu_type="sim", work_dir=tmp_path / "w")
    )
    try:
        for bad in ("../../escape", "/abs", "..", "a/b"):
            launch = wpb.Launch(
                workload_id=bad, workload=pb.Workload(id=bad, runtime=pb.Runtime(command=["x"]))
            )
            with pytest.raises(agent.AgentError, match="not a safe name"):
                node._prepare_dirs(launch, None)
        assert not (tmp_path / "escape").exists() and not (tmp_path / "w").exists()
    finally:
        node.client.close()


def test_a_worker_started_before_its_server_says_it_is_retrying(tmp_path: Path) -> None:
    # (it went through the client's GPU type check, which said nothing: 25 s of silence)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]))
    env.pop("APPORTION_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "worker", "--server", f"127.0.0.1:{port}", "--node-id", "early",
         "--gpus", "1", "--gpu-type", "h100", "--gpu-memory-gib", "80", "--work-dir", str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or ()], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 10  # its first retry is due after 0.2 s
        seen = []
        while "server unavailable; retrying" not in "".join(seen):
            left = deadline - time.monotonic()
            assert left > 0, f"nothing said in 10 s: {''.join(seen)!r}"
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=left))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()
