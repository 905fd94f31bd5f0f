"""End to end: a real server, real agents (``python -m server worker``) with
simulated GPUs, and command runtimes (small Python scripts) — CPU only."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

from tests.e2e.cluster import GPU_TYPE, alive, cluster, pids_of, training, wait_for

# Writes its environment to OUT/env-<RANK>.json, reports progress, exits 0.
TRAIN = textwrap.dedent(
    """\
    import json, os, sys, time
    out = sys.argv[1]
    with open(os.path.join(out, "env-%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(dict(os.environ), f)
    total = int(os.environ["APPORTION_TOTAL_STEPS"])
    for step in range(1, total + 1):
        print("APPORTION_PROGRESS " + json.dumps({"step": step, "total_steps": total, "loss": 3.0 / step,
                                                  "samples_per_s": 100.0}), flush=True)
        print("trained step", step, flush=True)
        time.sleep(0.05)
    """
)

# Counts its starts in OUT/starts, says something, fails with status 3.
CRASH = textwrap.dedent(
    """\
    import os, sys
    with open(os.path.join(sys.argv[1], "starts"), "a") as f:
        f.write("start\\n")
    print("about to fail: boom", flush=True)
    sys.exit(3)
    """
)

# Records where it runs, then runs until stopped.
FOREVER = textwrap.dedent(
    """\
    import json, os, sys, time
    with open(os.path.join(sys.argv[1], "run-%d.json" % os.getpid()), "w") as f:
        json.dump({"cwd": os.getcwd(), "pid": os.getpid()}, f)
    step = 0
    while True:
        step += 1
        print("APPORTION_PROGRESS " + json.dumps({"step": step, "loss": 1.0}), flush=True)
        time.sleep(0.2)
    """
)


def script(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    out = tmp_path / f"{name}-out"
    out.mkdir()
    return [sys.executable, str(path), str(out)]


def test_a_worker_registers_its_node_with_simulated_gpus(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.worker("w1", gpus=2)
        nodes = c.wait_nodes("w1")
        assert nodes["w1"].gpus == 2 and nodes["w1"].gpu_type == GPU_TYPE
        from apportion.v1 import allocator_pb2 as apb

        types = {t.name: t.memory_gib for t in c.stub.ListNodes(apb.ListNodesRequest()).gpu_types}
        assert types[GPU_TYPE] == 16


def test_a_gang_across_two_workers_runs_with_consistent_ranks_and_succeeds(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.worker("w1")
        c.worker("w2")
        c.wait_nodes("w1", "w2")
        command = script(tmp_path, "train", TRAIN)
        c.submit(training("gang", command, gpus=2, steps=8))
        done = c.wait_state("gang", "SUCCEEDED", timeout=20)
        assert "step 8" in done.message
        out = Path(command[-1])
        envs = [json.loads((out / f"env-{r}.json").read_text()) for r in (0, 1)]
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert {e["LOCAL_RANK"] for e in envs} == {"0"}
        assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"1"}
        assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
        assert 29500 <= int(envs[0]["MASTER_PORT"]) < 30500
        assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {""}
        assert {e["APPORTION_WORKLOAD_ID"] for e in envs} == {"gang"}
        assert {e["APPORTION_TOTAL_STEPS"] for e in envs} == {"8"}
        assert sorted(e["GROUP_RANK"] for e in envs) == ["0", "1"]
        dirs = {e["APPORTION_CHECKPOINT_DIR"] for e in envs}
        assert all(d.endswith(os.path.join("checkpoints", "gang")) for d in dirs)
        # the log tail is kept on disk per shard
        logs = list(tmp_path.glob("w*/logs/gang/shard-*.log"))
        assert len(logs) == 2 and "trained step 8" in logs[0].read_text()


def test_a_crashing_command_is_restarted_then_failed_with_its_status_and_log(tmp_path: Path) -> None:
    with cluster(tmp_path, max_restarts=2) as c:
        c.worker("w1")
        c.wait_nodes("w1")
        command = script(tmp_path, "crash", CRASH)
        c.submit(training("crashy", command))
        failed = c.wait_state("crashy", "FAILED", timeout=20)
        assert "exited with status 3" in failed.message
        assert "after 2 restarts" in failed.message
        assert "boom" in failed.message
        starts = (Path(command[-1]) / "starts").read_text().split()
        assert len(starts) == 3  # the first run and 2 restarts


def test_a_killed_worker_is_marked_down_and_its_work_moves_and_a_restart_leaves_no_orphans(
    tmp_path: Path,
) -> None:
    with cluster(tmp_path) as c:
        workers = {"w1": c.worker("w1"), "w2": c.worker("w2")}
        c.wait_nodes("w1", "w2")
        command = script(tmp_path, "forever", FOREVER)
        c.submit(training("longjob", command))
        running = c.wait_state("longjob", "RUNNING")
        first = running.placement.shards[0].node_id
        other = "w2" if first == "w1" else "w1"
        orphans = wait_for(lambda: pids_of(workers[first].work_dir), 10, "pid files")
        assert all(alive(p) for p in orphans)

        workers[first].kill()  # SIGKILL: its watchdog kills what it ran (and a restart would too)
        c.wait_nodes(first, state="down", timeout=10)
        moved = wait_for(
            lambda: (
                (s := c.get("longjob")).state == "RUNNING" and s.placement.shards[0].node_id == other and s
            ),
            15,
            "the job to run on the other worker",
        )
        wait_for(lambda: "step" in c.get("longjob").message, 10, "progress")
        assert moved.state == "RUNNING"

        # the killed worker comes back: it kills what it had started, registers again
        restarted = c.worker(first)
        c.wait_nodes(first, timeout=10)
        wait_for(lambda: not any(alive(p) for p in orphans), 10, "the orphan to be killed")
        assert restarted.proc is not None and restarted.proc.poll() is None
        assert c.get("longjob").placement.shards[0].node_id == other  # it stays where it runs


def test_a_stopped_worker_stops_its_processes(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        w = c.worker("w1")
        c.wait_nodes("w1")
        command = script(tmp_path, "forever", FOREVER)
        c.submit(training("job", command))
        c.wait_state("job", "RUNNING")
        pids = wait_for(lambda: pids_of(w.work_dir), 10, "pid files")
        assert w.stop() == 0
        assert not any(alive(p) for p in pids)
        assert not pids_of(w.work_dir)


def test_cancel_stops_the_shards(tmp_path: Path) -> None:
    from apportion.v1 import allocator_pb2 as apb

    with cluster(tmp_path) as c:
        w = c.worker("w1")
        c.wait_nodes("w1")
        command = script(tmp_path, "forever", FOREVER)
        c.submit(training("job", command))
        c.wait_state("job", "RUNNING")
        pids = wait_for(lambda: pids_of(w.work_dir), 10, "pid files")
        c.stub.CancelWorkload(apb.CancelWorkloadRequest(id="job"))
        wait_for(lambda: not any(alive(p) for p in pids), 10, "the shard to stop")


# A serving replica: says where it listens, reports its rate, serves until stopped.
SERVE = textwrap.dedent(
    """\
    import json, os, sys, time
    endpoint = "127.0.0.1:%s" % os.environ["MASTER_PORT"]
    print("APPORTION_READY " + json.dumps({"endpoint": endpoint}), flush=True)
    while True:
        print("APPORTION_PROGRESS " + json.dumps({"requests_per_s": 12.5}), flush=True)
        time.sleep(0.2)
    """
)


def test_a_service_replica_runs_and_reports_its_endpoint(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.worker("w1")
        c.wait_nodes("w1")
        command = script(tmp_path, "serve", SERVE)
        c.submit(
            {
                "id": "svc",
                "inference": {
                    "gpus_per_replica": {GPU_TYPE: 1},
                    "replica_rps": {GPU_TYPE: 10},
                    "target_rps": 10,
                },
                "runtime": {"command": command},
            }
        )
        c.wait_state("svc", "RUNNING")
        dispatcher = c.server.server.dispatcher
        endpoints = wait_for(lambda: dispatcher.endpoints("svc"), 10, "the endpoint")
        assert list(endpoints) == [0] and endpoints[0].startswith("127.0.0.1:")
        wait_for(lambda: c.get("svc").message == "1 replicas running, 12.5 requests/s", 10, "progress")


def test_a_frozen_worker_is_fenced_before_its_job_runs_elsewhere(tmp_path: Path) -> None:
    """The hardening issue's reproduction: a worker SIGSTOPped past the heartbeat timeout.
    Its watchdog kills the job when the lease runs out (1.5 s here), before the server
    marks the node down (2 s) and relaunches the job on the other worker: the two copies
    never run at once, and the relaunch gets another MASTER_PORT."""
    import signal
    import time

    with cluster(tmp_path) as c:
        workers = {"w1": c.worker("w1"), "w2": c.worker("w2")}
        c.wait_nodes("w1", "w2")
        c.submit(training("fenced", script(tmp_path, "forever", FOREVER)))
        first = c.wait_state("fenced", "RUNNING").placement.shards[0].node_id
        other = "w2" if first == "w1" else "w1"
        old = wait_for(lambda: pids_of(workers[first].work_dir), 10, "pid files")
        old_port = master_port_of(old[0])
        agent = workers[first].proc
        assert agent is not None
        agent.send_signal(signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            overlap = []
            while time.monotonic() - stopped_at < 20:
                new = pids_of(workers[other].work_dir)
                if new and any(alive(p) for p in new):
                    overlap = [p for p in old if alive(p)]
                    first_new = new[0]
                    new_port = wait_for(lambda p=first_new: master_port_of(p), 5, "the relaunch's env")
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("the job was not relaunched on the other worker")
            assert overlap == [], "the frozen worker's copy still ran when the job started elsewhere"
            fenced_after = time.monotonic() - stopped_at
            assert "lease expired" in workers[first].log()
        finally:
            agent.send_signal(signal.SIGCONT)
        moved = c.wait_state("fenced", "RUNNING", timeout=15)
        assert moved.placement.shards[0].node_id == other and fenced_after < 20
        assert old_port and new_port and old_port != new_port


def master_port_of(pid: int) -> str:
    """MASTER_PORT in a process's environment ("" when it cannot be read yet)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    return next((e[len(b"MASTER_PORT=") :].decode() for e in env if e.startswith(b"MASTER_PORT=")), "")
