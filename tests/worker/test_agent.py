"""The agent's pieces without a server: argv of each runtime kind, the environment
of a rank, APPORTION_* lines, GPU options, and the clean-up of leftover processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from worker import agent


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
    env = agent.shard_env(launch, 1, 2, "3", Path("/ckpt/job"), base={"PYTHONPATH": "/mine"})
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
    env = agent.shard_env(launch, 0, 1, "", Path("/ckpt/chat"), base={})
    assert env["APPORTION_SERVE_HOST"] == "10.0.0.7" and env["APPORTION_REPLICA_ID"] == "2"
    assert "APPORTION_SERVE_HOST" not in agent.shard_env(
        wpb.Launch(workload_id="job", workload=pb.Workload(id="job", training=pb.TrainingSpec(gpus=1))),
        0, 1, "", Path("/ckpt/job"), base={},
    )  # fmt: skip


def test_serve_from_a_training_workloads_id_is_its_checkpoint_directory() -> None:
    def serve_from(value: str) -> str:
        service = pb.Workload(
            id="chat", runtime=pb.Runtime(builtin="serve-lm", env={"APPORTION_SERVE_FROM": value})
        )
        service.inference.target_rps = 10
        launch = wpb.Launch(workload_id="chat", gpus=1, workload=service)
        return agent.shard_env(launch, 0, 1, "", Path("/w/checkpoints/chat"), base={})["APPORTION_SERVE_FROM"]

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
