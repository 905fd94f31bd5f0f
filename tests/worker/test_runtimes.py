"""The built-in runtimes (worker/runtimes) with real torch on CPU: the model, the data, checkpoints,
and train_lm / serve_lm as real processes configured by their environment, as the agent starts them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
import torch

from apportion.v1 import inference_pb2, inference_pb2_grpc
from worker import checkpoint_sync
from worker.runtimes import checkpoint, ckpt_files, data
from worker.runtimes.common import ConfigError
from worker.runtimes.model import ModelConfig, TinyLM, generate, generate_batch
from worker.runtimes.train_lm import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60
DONE = re.compile(r"rank (\d+) (done|stopped) at step (\d+), param_sha256 ([0-9a-f]{64})")


def runtime_env(**extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPORTION_")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]),
        CUDA_VISIBLE_DEVICES="",
        APPORTION_DEVICE="cpu",
        APPORTION_PROGRESS_INTERVAL_S="0.05",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(module: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"worker.runtimes.{module}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def protocol_lines(stdout: str, prefix: str = "APPORTION_PROGRESS") -> list[dict[str, Any]]:
    lines = stdout.splitlines()
    return [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith(prefix + " ")]


Progress = list[dict[str, Any]]


def train(ckpt_dir: Path, total: int, every: int = 10, **extra: object) -> tuple[Progress, str]:
    env = runtime_env(
        APPORTION_CHECKPOINT_DIR=ckpt_dir,
        APPORTION_TOTAL_STEPS=total,
        APPORTION_CHECKPOINT_EVERY=every,
        APPORTION_WORKLOAD_ID="t1",
        **extra,
    )
    proc = start("train_lm", env)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
    return protocol_lines(out), err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- model and data, in process --------------------------------------------------------------


def test_greedy_generation_is_deterministic_and_batching_does_not_change_it() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    torch.manual_seed(0)
    twin = TinyLM()
    text = generate(model, "The old fox", max_tokens=24)
    assert len(text.encode("utf-8", errors="surrogatepass")) >= 8
    assert generate(model, "The old fox", max_tokens=24) == text
    assert generate(twin, "The old fox", max_tokens=24, temperature=0) == text
    # prompts of different lengths, one batched forward per token, left-padded: the same answers
    prompts = ["The old fox", "A", "", "12 plus 7 is"]
    batched = generate_batch(model, prompts, [24, 5, 8, 24], [None] * 4)
    assert batched == [generate(model, p, n) for p, n in zip(prompts, [24, 5, 8, 24], strict=True)]
    # sampling is reproducible with a seeded generator
    a = generate(model, "x", 16, 1.0, torch.Generator().manual_seed(3))
    assert a == generate(model, "x", 16, 1.0, torch.Generator().manual_seed(3))


def test_padded_batch_matches_unpadded_logits() -> None:
    torch.manual_seed(1)
    model = TinyLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq=16)).eval()
    short = torch.tensor([[5, 6, 7]])
    tokens = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    with torch.no_grad():
        padded = model(tokens, mask)
        torch.testing.assert_close(padded[0, 2:], model(short)[0])
        torch.testing.assert_close(padded[1], model(tokens[1:])[0])


def test_corpus_is_small_deterministic_and_sharded_by_rank() -> None:
    text = data.corpus()
    assert 50_000 < len(text.encode()) < 200_000
    assert text == data.corpus() and text != data.corpus(seed=1)
    corpus = data.corpus_tensor()
    x0, y0 = data.batch(corpus, step=3, rank=0, batch_size=4, seq_len=16)
    x1, _ = data.batch(corpus, step=3, rank=1, batch_size=4, seq_len=16)
    assert x0.shape == (4, 16) and torch.equal(x0[:, 1:], y0[:, :-1])
    assert torch.equal(x0, data.batch(corpus, step=3, rank=0, batch_size=4, seq_len=16)[0])
    assert not torch.equal(x0, x1)


def test_checkpoints_are_found_and_pruned(tmp_path: Path) -> None:
    assert checkpoint.latest_path(tmp_path / "none") is None
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, {"step": step, "model": {"w": torch.ones(2) * step}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-20.pt", "ckpt-30.pt", "ckpt-40.pt", "latest"]
    latest = checkpoint.latest_path(tmp_path)
    assert latest is not None and latest.name == "ckpt-40.pt"
    assert checkpoint.load(latest)["step"] == 40
    (tmp_path / "latest").unlink()  # without the pointer: the highest step
    assert checkpoint.latest_path(tmp_path) == latest


def test_a_checkpoint_whose_pointer_was_never_written_is_still_the_latest(tmp_path: Path) -> None:
    # a runtime killed between its two atomic writes: ckpt-20.pt is complete, ``latest`` names ckpt-10.pt
    checkpoint.save(tmp_path, {"step": 10, "model": {"w": torch.ones(2)}})
    ckpt_files.write_atomic(tmp_path / "ckpt-20.pt", lambda f: torch.save({"step": 20}, f))
    assert (tmp_path / "latest").read_text().strip() == "ckpt-10.pt"
    latest = checkpoint.latest_path(tmp_path)
    assert latest == tmp_path / "ckpt-20.pt" and checkpoint.load(latest)["step"] == 20
    assert checkpoint_sync.local_step(tmp_path) == 20  # the agent's download-if-newer sees it too
    (tmp_path / ".ckpt-30.pt.tmp-1-2").write_bytes(b"half a checkpoint")  # a write in progress: not one
    assert checkpoint.latest_path(tmp_path) == latest


def test_bad_environment_is_named() -> None:
    with pytest.raises(ConfigError, match="APPORTION_TOTAL_STEPS must be set"):
        TrainConfig.from_env({"APPORTION_DEVICE": "cpu"})
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        TrainConfig.from_env({"APPORTION_TOTAL_STEPS": "5", "RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="unknown options"):
        TrainConfig.from_env({"APPORTION_TOTAL_STEPS": "5", "APPORTION_RUNTIME_ARGS": '["--nope", "1"]'})
    env = {
        "APPORTION_TOTAL_STEPS": "5",
        "APPORTION_DEVICE": "cpu",
        "APPORTION_RUNTIME_ARGS": '["--d-model", "32"]',
    }
    cfg = TrainConfig.from_env(env)
    assert cfg.model.d_model == 32 and cfg.checkpoint_every == 50
    # the agent passes runtime.args on the command line, after APPORTION_RUNTIME_ARGS
    cfg = TrainConfig.from_env(env, ["--d-model", "48", "--heads", "3", "--batch-size", "4"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.batch_size) == (48, 3, 4)


# -- train_lm -------------------------------------------------------------------------------


def test_train_lm_rejects_a_bad_environment_with_status_2() -> None:
    proc = start("train_lm", runtime_env(APPORTION_TOTAL_STEPS="many"))
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 2
    assert "APPORTION_TOTAL_STEPS must be an integer" in err


def test_training_loss_falls_checkpoints_and_resumes(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    lines, err = train(ckpt, total=20)
    assert lines and lines[-1]["step"] == 20 and lines[-1]["state"] == "done"
    assert all(set(ln) >= {"step", "total_steps", "loss", "samples_per_s"} for ln in lines)
    assert [ln["checkpoint"] for ln in lines if "checkpoint" in ln] == ["ckpt-10.pt", "ckpt-20.pt"]
    assert lines[0]["step"] < 20 and lines[-1]["samples_per_s"] > 0
    assert (ckpt / "latest").read_text().strip() == "ckpt-20.pt"
    assert "resumed" not in err

    lines2, err2 = train(ckpt, total=40)
    assert "at step 20" in err2 and "resumed from" in err2
    assert lines2[0]["step"] > 20 and lines2[-1]["step"] == 40 and lines2[-1]["total_steps"] == 40
    state = checkpoint.load(ckpt / "ckpt-40.pt")
    assert state["step"] == 40 and state["workload_id"] == "t1"
    # from about ln(256) = 5.5 at first to about 3 at step 20 and 2.7 at step 40
    assert lines[0]["loss"] > 5.0 and lines[-1]["loss"] < lines[0]["loss"] - 1.0, lines
    assert lines2[-1]["loss"] < lines[0]["loss"] - 1.5, (lines, lines2)


def test_two_ranks_train_together_and_agree(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    common = {
        "WORLD_SIZE": 2,
        "LOCAL_WORLD_SIZE": 2,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": free_port(),
        "APPORTION_CHECKPOINT_DIR": ckpt,
        "APPORTION_TOTAL_STEPS": 30,
        "APPORTION_CHECKPOINT_EVERY": 10,
    }
    procs = [start("train_lm", runtime_env(RANK=r, LOCAL_RANK=r, **common)) for r in (0, 1)]
    results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    assert protocol_lines(results[1][0]) == []  # only rank 0 reports
    lines = protocol_lines(results[0][0])
    assert lines[-1]["step"] == 30 and lines[-1]["world_size"] == 2 and lines[-1]["state"] == "done"
    done = [DONE.search(err) for _, err in results]
    assert done[0] and done[1]
    assert (done[0][1], done[1][1]) == ("0", "1")
    assert done[0][4] == done[1][4]  # identical parameters on both ranks
    state = checkpoint.load(ckpt / "ckpt-30.pt")
    assert state["world_size"] == 2 and state["param_sha256"] == done[0][4]


def test_ranks_without_a_shared_directory_resume_from_rank_0s_checkpoint(tmp_path: Path) -> None:
    node_a, node_b = tmp_path / "a", tmp_path / "b"  # one checkpoint directory per node
    train(node_a, total=10)
    common = {
        "WORLD_SIZE": 2,
        "LOCAL_WORLD_SIZE": 1,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": free_port(),
        "APPORTION_TOTAL_STEPS": 20,
        "APPORTION_CHECKPOINT_EVERY": 10,
        "APPORTION_DIST_TIMEOUT_S": 60,
    }
    procs = [
        start("train_lm", runtime_env(RANK=r, LOCAL_RANK=0, APPORTION_CHECKPOINT_DIR=d, **common))
        for r, d in ((0, node_a), (1, node_b))
    ]
    results = [p.communicate(timeout=TIMEOUT_S * 2) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    assert "took rank 0's checkpoint (step 10; this node had -1)" in results[1][1]
    assert "took rank 0's checkpoint" not in results[0][1]
    lines = protocol_lines(results[0][0])
    assert lines[0]["step"] > 10 and lines[-1]["step"] == 20
    done = [DONE.search(err) for _, err in results]
    assert done[0] and done[1] and done[0][3] == done[1][3] == "20"
    assert done[0][4] == done[1][4]  # identical parameters on both ranks
    assert checkpoint.latest_path(node_b) is None  # only rank 0 writes


def test_sigterm_checkpoints_and_exits_0(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    env = runtime_env(
        APPORTION_CHECKPOINT_DIR=ckpt, APPORTION_TOTAL_STEPS=10**6, APPORTION_CHECKPOINT_EVERY=10**6
    )
    proc = start("train_lm", env)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # training has started
    assert first.startswith("APPORTION_PROGRESS")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
    last = protocol_lines(out)[-1]
    assert last["state"] == "stopped" and 0 < last["step"] < 1_000_000
    assert last["checkpoint"] == f"ckpt-{last['step']}.pt"
    latest = checkpoint.latest_path(ckpt)
    assert latest is not None and checkpoint.load(latest)["step"] == last["step"]


# -- serve_lm -------------------------------------------------------------------------------


def _read_lines(stream: IO[str], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


def wait_for(found: Callable[[], list[dict[str, Any]]], proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """``found()`` once it is not empty (the process must stay up meanwhile)."""
    deadline = time.monotonic() + TIMEOUT_S / 2
    while time.monotonic() < deadline:
        if result := found():
            return result
        assert proc.poll() is None, f"exited with {proc.returncode}"
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_serve_lm_answers_concurrent_requests_in_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, {"step": 7, "model": model.state_dict(), "model_config": model.cfg.to_dict()})
    env = runtime_env(
        APPORTION_SERVE_FROM=ckpt,
        APPORTION_SERVE_PORT=0,
        APPORTION_MAX_BATCH=8,
        APPORTION_BATCH_WAIT_MS=50,
        APPORTION_WORKLOAD_ID="chat",
    )
    proc = start("serve_lm", env)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        readies = wait_for(lambda: protocol_lines("".join(lines), "APPORTION_READY"), proc)
        ready = readies[0]
        assert ready["checkpoint_step"] == 7
        prompts = [f"The {i} old foxes" * (i % 3 + 1) for i in range(16)]
        with grpc.insecure_channel(ready["endpoint"]) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            def ask(prompt: str) -> inference_pb2.GenerateResponse:
                response: inference_pb2.GenerateResponse = stub.Generate(
                    inference_pb2.GenerateRequest(service="chat", prompt=prompt, max_tokens=12), timeout=30
                )
                return response

            with ThreadPoolExecutor(len(prompts)) as pool:
                answers = list(pool.map(ask, prompts))
            with pytest.raises(grpc.RpcError) as bad:
                stub.Generate(inference_pb2.GenerateRequest(prompt="x", max_tokens=-1), timeout=30)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [a.text for a in answers] == [generate(model, p, 12) for p in prompts]
        assert all(a.tokens == 12 and a.replica == f"chat@{ready['endpoint']}" for a in answers)
        assert all(0 < a.latency_s < 30 for a in answers)
        progress = wait_for(lambda: [p for p in protocol_lines("".join(lines)) if p["requests"] == 16], proc)[
            -1
        ]
        assert 2 <= progress["batches"] < progress["requests"] == 16
        assert progress["latency_p50_s"] > 0 and "requests_per_s" in progress
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=TIMEOUT_S)
        reader.join(timeout=TIMEOUT_S)  # stdout was the reader thread's
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
    assert returncode == 0, err


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    common = {
        "WORLD_SIZE": 2,
        "LOCAL_WORLD_SIZE": 2,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": free_port(),
        "APPORTION_CHECKPOINT_DIR": ckpt,
        "APPORTION_TOTAL_STEPS": 10**6,
    }
    procs = [start("train_lm", runtime_env(RANK=r, LOCAL_RANK=r, **common)) for r in (0, 1)]
    assert procs[0].stdout is not None
    assert procs[0].stdout.readline().startswith("APPORTION_PROGRESS")  # both ranks are training
    procs[1].send_signal(signal.SIGTERM)
    results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    done = [DONE.search(err) for _, err in results]
    assert done[0] and done[1]
    assert done[0].groups()[1:] == done[1].groups()[1:]  # stopped, same step, same parameters
    last = protocol_lines(results[0][0])[-1]
    assert last["state"] == "stopped" and last["step"] == int(done[0][3])
    assert checkpoint.load(ckpt / f"ckpt-{last['step']}.pt")["param_sha256"] == done[0][4]
