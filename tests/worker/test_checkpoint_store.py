"""The server's store of checkpoints (``server.checkpoints``) through a real gRPC server, and the
agent's side of it (``worker.checkpoint_sync``): uploads, downloads, what is refused."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from apportion.v1 import workers_pb2_grpc
from server import checkpoints, convert
from server.checkpoints import CHUNK_BYTES, CheckpointStore, escape, root_for
from tests.e2e.cluster import wait_for
from tests.server.serving import (
    ADMIN_TOKEN,
    RESEARCH_TOKEN,
    TOKENS_YAML,
    Running,
    inventory_request,
    metadata,
    running_server,
)
from worker import agent, checkpoint_sync
from worker.runtimes import ckpt_files


def training(workload_id: str) -> dict[str, Any]:
    return {
        "id": workload_id,
        "tenant": "research",
        "training": {"gpus": 1, "throughput": {"h100-80g": 1.0}, "remaining_work": 100},
    }


def submit(srv: Running, *workloads: dict[str, Any], token: str | None = None) -> None:
    stub = srv.stub()
    stub.UpsertNodes(inventory_request(), metadata=metadata(token))
    for w in workloads:
        msg = convert.workloads_from_data({"workloads": [w]}).workloads[0]
        stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=msg), metadata=metadata(token))


def chunks(workload_id: str, step: int, data: bytes, *, sha: str | None = None, size: int | None = None,
           chunk: int = 1000) -> list[wpb.CheckpointChunk]:  # fmt: skip
    header = wpb.CheckpointChunk(
        workload_id=workload_id,
        step=step,
        name=f"ckpt-{step}.pt",
        size=len(data) if size is None else size,
        sha256=hashlib.sha256(data).hexdigest() if sha is None else sha,
        data=data[:chunk],
    )
    return [header, *(wpb.CheckpointChunk(data=data[i : i + chunk]) for i in range(chunk, len(data), chunk))]


def get(
    stub: workers_pb2_grpc.WorkersStub, workload_id: str, md: Any = None, **kw: Any
) -> tuple[wpb.CheckpointChunk, bytes]:
    answer = list(stub.GetCheckpoint(wpb.GetCheckpointRequest(workload_id=workload_id, **kw), metadata=md))
    return answer[0], b"".join(c.data for c in answer)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def stored_dirs(db: Path, workload_id: str) -> list[str]:
    d = root_for(db) / escape(workload_id)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def incoming(db: Path) -> list[Path]:
    return list((root_for(db) / checkpoints.INCOMING).iterdir())


def test_a_checkpoint_goes_up_in_chunks_and_comes_back_whole(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        submit(srv, training("job"))
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        assert code_of(lambda: get(stub, "job")) == grpc.StatusCode.NOT_FOUND  # none stored yet
        data = os.urandom(2 * CHUNK_BYTES + 123)
        reply = stub.PutCheckpoint(iter(chunks("job", 20, data, chunk=CHUNK_BYTES)))
        assert reply.step == 20
        header, got = get(stub, "job")
        assert got == data
        assert (header.step, header.size, header.name) == (20, len(data), "ckpt-20.pt")
        assert header.sha256 == hashlib.sha256(data).hexdigest()
        # newer_than: only the header when the stored one is not newer
        only, rest = get(stub, "job", newer_than=20)
        assert only.step == 20 and rest == b""
        assert get(stub, "job", newer_than=19)[1] == data
        # a newer step replaces it, on disk too: one checkpoint per workload
        stub.PutCheckpoint(iter(chunks("job", 30, b"thirty")))
        assert get(stub, "job")[1] == b"thirty"
        assert len(stored_dirs(tmp_path / "state.db", "job")) == 1
        # the same step replaces it as well
        stub.PutCheckpoint(iter(chunks("job", 30, b"thirty again")))
        assert get(stub, "job")[1] == b"thirty again"
        # the store keeps it across a restart of the server (a new CheckpointStore on the directory)
    again = CheckpointStore(root_for(tmp_path / "state.db"))
    stored = again.latest("job")
    assert stored is not None and stored.step == 30 and stored.path.read_bytes() == b"thirty again"


def test_an_older_step_is_refused_and_the_stored_one_kept(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        submit(srv, training("job"))
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        stub.PutCheckpoint(iter(chunks("job", 50, b"fifty")))
        older = code_of(lambda: stub.PutCheckpoint(iter(chunks("job", 40, b"forty"))))
        assert older == grpc.StatusCode.FAILED_PRECONDITION
        header, data = get(stub, "job")
        assert (header.step, data) == (50, b"fifty")
        assert incoming(tmp_path / "state.db") == []


def test_a_digest_or_size_that_does_not_match_stores_nothing(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with running_server(tmp_path) as srv:
        submit(srv, training("job"))
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        data = os.urandom(5000)
        bad_sha = hashlib.sha256(b"something else").hexdigest()
        assert code_of(lambda: stub.PutCheckpoint(iter(chunks("job", 10, data, sha=bad_sha)))) == (
            grpc.StatusCode.DATA_LOSS
        )
        assert code_of(lambda: get(stub, "job")) == grpc.StatusCode.NOT_FOUND
        short = code_of(lambda: stub.PutCheckpoint(iter(chunks("job", 10, data, size=6000))))
        long = code_of(lambda: stub.PutCheckpoint(iter(chunks("job", 10, data, size=4000))))
        assert short == long == grpc.StatusCode.DATA_LOSS
        stub.PutCheckpoint(iter(chunks("job", 10, data)))
        # a corrupt newer one leaves the stored one as it was
        assert code_of(lambda: stub.PutCheckpoint(iter(chunks("job", 20, data, sha=bad_sha)))) == (
            grpc.StatusCode.DATA_LOSS
        )
        header, got = get(stub, "job")
        assert (header.step, got) == (10, data)
        assert incoming(db) == [] and len(stored_dirs(db, "job")) == 1


def test_an_upload_that_breaks_mid_way_leaves_nothing_visible(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with running_server(tmp_path) as srv:
        submit(srv, training("job"))
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        stub.PutCheckpoint(iter(chunks("job", 10, b"ten")))
        data = os.urandom(3 * CHUNK_BYTES)
        sent: list[int] = []

        def broken() -> Iterator[wpb.CheckpointChunk]:
            for i, c in enumerate(chunks("job", 20, data, chunk=CHUNK_BYTES)):
                if i == 2:
                    raise RuntimeError("the worker died")
                sent.append(i)
                yield c

        with pytest.raises(grpc.RpcError):
            stub.PutCheckpoint(broken())
        assert sent == [0, 1]
        header, got = get(stub, "job")
        assert (header.step, got) == (10, b"ten")
        wait_for(lambda: incoming(db) == [], 10, "the broken upload's files to go")
        assert len(stored_dirs(db, "job")) == 1


def test_what_may_be_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 3 * CHUNK_BYTES
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", limit)
    service = {
        "id": "chat",
        "tenant": "research",
        "inference": {"target_rps": 1, "replica_rps": {"h100-80g": 1}, "gpus_per_replica": {"h100-80g": 1}},
    }
    with running_server(tmp_path) as srv:
        submit(srv, training("job"), service)
        stub = workers_pb2_grpc.WorkersStub(srv.channel())

        def put(*msgs: wpb.CheckpointChunk) -> grpc.StatusCode:
            return code_of(lambda: stub.PutCheckpoint(iter(msgs)))

        assert put(*chunks("nope", 1, b"x")) == grpc.StatusCode.NOT_FOUND
        assert put(*chunks("chat", 1, b"x")) == grpc.StatusCode.FAILED_PRECONDITION
        too_big = chunks("job", 1, b"x", size=limit + 1)[:1]  # refused on its header
        assert put(*too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED
        big_chunk = chunks("job", 1, b"x" * (CHUNK_BYTES + 1), chunk=CHUNK_BYTES + 1)
        assert put(*big_chunk) == grpc.StatusCode.INVALID_ARGUMENT
        bad_name = chunks("job", 1, b"x")
        bad_name[0].name = "../escape"
        assert put(*bad_name) == grpc.StatusCode.INVALID_ARGUMENT
        bad_sha = chunks("job", 1, b"x")
        bad_sha[0].sha256 = "abc"
        assert put(*bad_sha) == grpc.StatusCode.INVALID_ARGUMENT
        assert put() == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: get(stub, "job")) == grpc.StatusCode.NOT_FOUND
        assert incoming(tmp_path / "state.db") == []
        at_limit = os.urandom(limit)
        assert stub.PutCheckpoint(iter(chunks("job", 1, at_limit, chunk=CHUNK_BYTES))).step == 1
        assert get(stub, "job")[1] == at_limit


def test_checkpoint_calls_need_the_admin_role(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    with running_server(tmp_path, tokens=tokens) as srv:
        submit(srv, training("job"), token=ADMIN_TOKEN)
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        msgs = chunks("job", 5, b"five")
        request = wpb.GetCheckpointRequest(workload_id="job")
        refusals = {None: grpc.StatusCode.UNAUTHENTICATED, RESEARCH_TOKEN: grpc.StatusCode.PERMISSION_DENIED}
        for token, code in refusals.items():
            assert code_of(lambda t=token: stub.PutCheckpoint(iter(msgs), metadata=metadata(t))) == code
            assert code_of(lambda t=token: list(stub.GetCheckpoint(request, metadata=metadata(t)))) == code
        assert stub.PutCheckpoint(iter(msgs), metadata=metadata(ADMIN_TOKEN)).step == 5
        assert get(stub, "job", metadata(ADMIN_TOKEN))[1] == b"five"
        # an agent whose token may not store checkpoints stops trying
        local = tmp_path / "w" / "job"
        write_ckpt(local, 10, b"ten")
        uploader = checkpoint_sync.Uploader(stub, metadata(RESEARCH_TOKEN) or (), "job", local, poll_s=0.05)
        uploader.start()
        wait_for(lambda: not uploader._thread.is_alive(), 20, "the uploader to give up")
        assert uploader.uploads == 0 and get(stub, "job", metadata(ADMIN_TOKEN))[0].step == 5


def test_a_cancelled_workloads_checkpoint_is_deleted_a_succeeded_ones_kept(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with running_server(tmp_path) as srv:
        submit(srv, training("dropped"), training("done"))
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        stub.PutCheckpoint(iter(chunks("dropped", 10, b"a")))
        stub.PutCheckpoint(iter(chunks("done", 10, b"b")))
        srv.server.store.set_workload_state("done", "SUCCEEDED")
        srv.stub().CancelWorkload(apb.CancelWorkloadRequest(id="dropped"))
        wait_for(lambda: not stored_dirs(db, "dropped"), 20, "the cancelled workload's checkpoint to go")
        assert code_of(lambda: get(stub, "dropped")) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: stub.PutCheckpoint(iter(chunks("dropped", 20, b"a")))) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        assert get(stub, "done")[1] == b"b"
        stub.PutCheckpoint(iter(chunks("done", 11, b"c")))  # a SUCCEEDED job's last upload is still taken
        assert get(stub, "done")[1] == b"c"


def test_a_crash_mid_upload_or_mid_replace_is_cleaned_up_at_start(tmp_path: Path) -> None:
    root = tmp_path / "db.checkpoints"
    store = CheckpointStore(root)
    header = chunks("job", 7, b"seven")[0]
    store.put(header, iter(()))
    (root / checkpoints.INCOMING / "deadbeef").mkdir()
    (root / checkpoints.INCOMING / "deadbeef" / "data").write_bytes(b"half")
    older = root / escape("job") / f"{3:012d}-{'0' * 32}"  # a replaced one a crash left behind
    older.mkdir()
    again = CheckpointStore(root)
    assert list((root / checkpoints.INCOMING).iterdir()) == []
    assert not older.exists()
    stored = again.latest("job")
    assert stored is not None and stored.step == 7 and stored.path.read_bytes() == b"seven"
    assert escape("a/../b c") == "a%2F%2E%2E%2Fb%20c" and escape("x" * 200).startswith("#")


# ----------------------------------------------------------------------------- the agent's side


def write_ckpt(directory: Path, step: int, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ckpt_files.name_for(step)
    ckpt_files.write_atomic(path, lambda f: f.write(data))
    ckpt_files.point_latest(directory, step)
    return path


def test_the_agent_fetches_only_a_newer_checkpoint(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        submit(srv, training("job"))
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        local = tmp_path / "w" / "checkpoints" / "job"
        assert checkpoint_sync.fetch(stub, (), "job", local) == (-1, False)  # none on the server
        assert not local.exists()
        data = os.urandom(CHUNK_BYTES + 10)
        stub.PutCheckpoint(iter(chunks("job", 40, data, chunk=CHUNK_BYTES)))
        assert checkpoint_sync.fetch(stub, (), "job", local) == (40, True)
        assert ckpt_files.latest_path(local) == local / "ckpt-40.pt"
        assert (local / "ckpt-40.pt").read_bytes() == data
        assert checkpoint_sync.fetch(stub, (), "job", local) == (40, False)  # as new: nothing
        write_ckpt(local, 60, b"local and newer")  # e.g. a work directory shared with the old worker
        assert checkpoint_sync.fetch(stub, (), "job", local) == (40, False)
        assert ckpt_files.latest_path(local) == local / "ckpt-60.pt"
        assert sorted(p.name for p in local.iterdir()) == ["ckpt-40.pt", "ckpt-60.pt", "latest"]


def test_the_uploader_sends_each_new_checkpoint_and_the_last_one_on_finish(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        submit(srv, training("job"))
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        local = tmp_path / "a" / "checkpoints" / "job"
        uploader = checkpoint_sync.Uploader(stub, (), "job", local, poll_s=0.05).start()
        write_ckpt(local, 10, b"ten")
        wait_for(lambda: uploader.server_step == 10, 20, "step 10 uploaded")
        write_ckpt(local, 20, b"twenty")
        wait_for(lambda: uploader.server_step == 20, 20, "step 20 uploaded")
        assert get(stub, "job")[1] == b"twenty"
        uploader._stop.set()  # no more polling: finish() alone must send the last one
        uploader._thread.join(10)
        write_ckpt(local, 30, b"thirty")
        uploader.finish(30)
        header, data = get(stub, "job")
        assert (header.step, data) == (30, b"thirty") and uploader.uploads == 3

        # another worker's directory gets it; an older local one is not sent up
        other = tmp_path / "b" / "checkpoints" / "job"
        write_ckpt(other, 5, b"old")
        assert checkpoint_sync.fetch(stub, (), "job", other) == (30, True)
        assert (other / "ckpt-30.pt").read_bytes() == b"thirty"
        stale = checkpoint_sync.Uploader(stub, (), "job", tmp_path / "c", poll_s=0.05)
        write_ckpt(tmp_path / "c", 25, b"stale")
        assert not stale.upload_latest()  # the server has 30: refused, and not tried again
        assert stale.server_step == 25 and get(stub, "job")[0].step == 30


def test_which_launches_download_and_which_upload(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        submit(srv, training("job"))
        stub = workers_pb2_grpc.WorkersStub(srv.channel())
        stub.PutCheckpoint(iter(chunks("job", 40, b"forty")))
        node = agent.Agent(
            agent.AgentConfig(server=srv.address, gpus="2", gpu_type="h100-80g", work_dir=tmp_path)
        )
        try:
            ckpts = tmp_path / "checkpoints"

            def launch(workload_id: str, runtime: pb.Runtime, rank_offset: int = 0) -> wpb.Launch:
                spec = pb.Workload(id=workload_id, runtime=runtime)
                return wpb.Launch(workload_id=workload_id, rank_offset=rank_offset, workload=spec)

            def sync(x: wpb.Launch) -> checkpoint_sync.Uploader | None:
                return node._sync_checkpoints(x, node._prepare_dirs(x, None))

            # a command runtime: nothing fetched, nothing uploaded
            assert sync(launch("job", pb.Runtime(command=["true"]))) is None
            assert not any((ckpts / "job").iterdir())
            # a train-lm shard without rank 0: the checkpoint comes down, nothing goes up
            assert sync(launch("job", pb.Runtime(builtin="train-lm"), rank_offset=2)) is None
            assert (ckpts / "job" / "ckpt-40.pt").read_bytes() == b"forty"
            # a serve-lm of the training workload: into that workload's directory
            serve = pb.Runtime(builtin="serve-lm", env={"APPORTION_SERVE_FROM": "job"})
            shutil.rmtree(ckpts / "job")
            assert sync(launch("chat", serve)) is None
            assert (ckpts / "job" / "ckpt-40.pt").read_bytes() == b"forty" and not any(
                (ckpts / "chat").iterdir()
            )
            assert (
                sync(launch("chat", pb.Runtime(builtin="serve-lm", env={"APPORTION_SERVE_FROM": "/a/path"})))
                is None
            )
            # rank 0 of a train-lm job, with its own directory: fetched there, and an uploader watching it
            own = tmp_path / "own"
            uploader = sync(
                launch("job", pb.Runtime(builtin="train-lm", env={"APPORTION_CHECKPOINT_DIR": str(own)}))
            )
            assert uploader is not None and uploader.directory == own and uploader.server_step == 40
            assert (own / "ckpt-40.pt").read_bytes() == b"forty"
            write_ckpt(own, 50, b"fifty")
            uploader.finish(30)
            assert get(stub, "job")[1] == b"fifty"
        finally:
            node.client.close()
