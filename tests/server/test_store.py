"""The SQLite store (server/store.py) on real database files: every read and
write with its errors, idempotency under 32 racing threads, plans that skip
changed workloads, the event log with compaction, wake-ups, reopening, refusal
of foreign or newer databases, and durability across SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from server.errors import AlreadyExists, FailedPrecondition, NotFound
from server.store import (
    ACTIVE,
    CANCELLED,
    FAILED,
    PENDING,
    PLACED,
    RUNNING,
    SCHEMA_VERSION,
    STATES,
    SUCCEEDED,
    TERMINAL,
    Assignment,
    Event,
    Store,
    StoreError,
    WorkloadRow,
    _Tx,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = {"tenant": "research", "training": {"gpus": 2, "throughput": {"h100-80g": 1.5}}}
PLACEMENT = {"workload_id": "w1", "shards": [{"node_id": "n1", "gpus": 2}]}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    with Store(path) as s:
        yield s


def submit(store: Store, id: str, tenant: str = "research", kind: str = "training", **kw: Any) -> WorkloadRow:
    row, created = store.submit_workload(
        id, tenant, kind, {**SPEC, "id": id}, request_key=kw.pop("key", None), **kw
    )
    assert created
    return row


def all_events(store: Store) -> list[Event]:
    return store.events_after(store.oldest_revision() - 1, limit=10**9)


def assert_gap_free(store: Store) -> None:
    revisions = [e.revision for e in all_events(store)]
    assert revisions == list(range(store.oldest_revision(), store.revision() + 1))


def place(store: Store, id: str, state: str = PLACED, placement: dict[str, Any] | None = None) -> None:
    version = store.get_workload(id).version
    assignment = Assignment(version, state, placement or PLACEMENT, [])
    store.apply_plan({}, status="OPTIMAL", gap=0.0, solve_s=0.1, based_on=0, assignments={id: assignment})


# --------------------------------------------------------------------------- workloads


def test_a_new_store_is_empty(store: Store) -> None:
    assert store.revision() == 0
    assert store.oldest_revision() == 1
    assert store.events_after(0) == []
    assert store.list_workloads() == [] and store.active_workloads() == []
    assert store.counts_by_state() == dict.fromkeys(STATES, 0)
    assert store.list_nodes() == [] and store.all_nodes() == []
    assert store.gpu_types() == [] and store.tenants() == []
    assert store.latest_plan() is None
    assert set(STATES) == ACTIVE | TERMINAL and not ACTIVE & TERMINAL


def test_submit_creates_version_1_pending_with_an_event(store: Store) -> None:
    row, created = store.submit_workload("w1", "research", "training", SPEC, request_key="r1", now=100.0)
    assert created
    assert row == WorkloadRow(
        id="w1",
        tenant="research",
        kind="training",
        state=PENDING,
        version=1,
        spec=SPEC,
        placement=None,
        reasons=[],
        message="",
        created_at=100.0,
        updated_at=100.0,
        revision=1,
    )
    assert store.get_workload("w1") == row
    assert store.revision() == 1
    assert store.events_after(0) == [Event(1, 100.0, "workload", "created", "w1", "research", row.as_dict())]


def test_submit_is_idempotent_by_request_key(store: Store) -> None:
    first, _ = store.submit_workload("w1", "research", "inference", SPEC, request_key="r1")
    again, created = store.submit_workload("w1", "research", "inference", SPEC, request_key="r1")
    assert (again, created) == (first, False)
    assert store.revision() == 1
    # A retry after the workload changed gets its current row, and still creates nothing.
    updated = store.update_workload("w1", {"changed": True})
    again, created = store.submit_workload("w1", "research", "inference", SPEC, request_key="r1")
    assert (again, created) == (updated, False)
    assert store.revision() == 2


def test_a_taken_id_already_exists_in_any_state(store: Store) -> None:
    submit(store, "w1", key="r1")
    with pytest.raises(AlreadyExists, match="'w1'"):
        store.submit_workload("w1", "research", "training", SPEC, request_key="r2")
    store.cancel_workload("w1")
    with pytest.raises(AlreadyExists) as taken:
        store.submit_workload("w1", "other", "training", SPEC, request_key=None)
    assert str(taken.value) == "workload 'w1' already exists"  # another tenant learns nothing more
    # its own tenant learns what happened and what to do
    with pytest.raises(AlreadyExists, match="'w1' already exists and is CANCELLED: an id is never reused"):
        store.submit_workload("w1", "research", "training", SPEC, request_key=None)
    assert store.revision() == 2
    # The failed request did not remember its key: it is free for another workload.
    submit(store, "w2", key="r2")


def test_a_request_key_reused_for_another_request_is_refused(store: Store) -> None:
    submit(store, "w1", key="r1")
    submit(store, "w2")
    with pytest.raises(FailedPrecondition, match="already used to submit workload 'w1'"):
        store.submit_workload("w3", "research", "training", SPEC, request_key="r1")
    with pytest.raises(FailedPrecondition):
        store.update_workload("w1", SPEC, request_key="r1")
    store.update_workload("w2", SPEC, request_key="u1")
    with pytest.raises(FailedPrecondition):
        store.submit_workload("w2", "research", "training", SPEC, request_key="u1")
    assert store.revision() == 3


def test_submit_refuses_an_unknown_kind_or_a_non_json_spec(store: Store) -> None:
    with pytest.raises(ValueError, match="kind"):
        store.submit_workload("w1", "research", "batch", SPEC, request_key=None)
    with pytest.raises(ValueError):
        store.submit_workload("w1", "research", "training", {"x": float("nan")}, request_key=None)
    assert store.revision() == 0


def test_get_an_unknown_workload_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="no workload 'nope'"):
        store.get_workload("nope")


def test_update_makes_a_new_version_and_keeps_state_and_placement(store: Store) -> None:
    submit(store, "w1")
    place(store, "w1")
    placed = store.get_workload("w1")
    new_spec = {**SPEC, "priority": 5}
    row = store.update_workload("w1", new_spec, request_key="u1")
    assert (row.version, row.spec, row.state, row.placement) == (2, new_spec, PLACED, PLACEMENT)
    assert row.created_at == placed.created_at and row.revision == store.revision()
    assert store.get_workload("w1") == row
    assert all_events(store)[-1].data == row.as_dict()
    # The same request again changes nothing; a new one makes version 3.
    assert store.update_workload("w1", {"ignored": 1}, request_key="u1") == row
    assert store.update_workload("w1", SPEC).version == 3
    assert_gap_free(store)


def test_update_refuses_unknown_and_terminal_workloads(store: Store) -> None:
    with pytest.raises(NotFound):
        store.update_workload("nope", SPEC)
    submit(store, "w1")
    store.cancel_workload("w1")
    with pytest.raises(FailedPrecondition, match="CANCELLED"):
        store.update_workload("w1", SPEC, request_key="u1")
    # A refused request's key is not remembered.
    submit(store, "w2")
    assert store.update_workload("w2", SPEC, request_key="u1").version == 2


def test_cancel(store: Store) -> None:
    submit(store, "w1")
    place(store, "w1")
    row = store.cancel_workload("w1")
    assert (row.state, row.placement, row.reasons, row.version) == (CANCELLED, None, [], 1)
    revision = store.revision()
    assert store.cancel_workload("w1") == row  # no-op, no event
    assert store.revision() == revision
    for state in (SUCCEEDED, FAILED):
        submit(store, state)
        store.set_workload_state(state, state)
        with pytest.raises(FailedPrecondition, match=state):
            store.cancel_workload(state)
    with pytest.raises(NotFound):
        store.cancel_workload("nope")


def test_set_workload_state(store: Store) -> None:
    submit(store, "w1")
    place(store, "w1")
    row = store.set_workload_state("w1", RUNNING, "started on n1")
    assert (row.state, row.message, row.placement) == (RUNNING, "started on n1", PLACEMENT)
    revision = store.revision()
    assert store.set_workload_state("w1", RUNNING, "started on n1") == row
    assert store.revision() == revision
    done = store.set_workload_state("w1", SUCCEEDED)
    assert (done.state, done.message, done.placement) == (SUCCEEDED, "", None)
    assert store.set_workload_state("w1", SUCCEEDED) == done
    with pytest.raises(FailedPrecondition):
        store.set_workload_state("w1", RUNNING)
    with pytest.raises(ValueError, match="state"):
        store.set_workload_state("w1", "LOST")
    with pytest.raises(NotFound):
        store.set_workload_state("nope", RUNNING)


def test_list_workloads_filters_and_pages(store: Store) -> None:
    for i in range(25):
        submit(store, f"w{i:02d}", tenant=("a", "b")[i % 2], kind=("training", "inference")[i % 3 == 0])
    for i in range(0, 25, 4):
        store.cancel_workload(f"w{i:02d}")
    store.set_workload_state("w01", RUNNING)

    def ids(rows: list[WorkloadRow]) -> list[str]:
        return [r.id for r in rows]

    pages: list[str] = []
    after = ""
    while page := store.list_workloads(after_id=after, limit=7):
        assert len(page) <= 7
        pages += ids(page)
        after = page[-1].id
    assert pages == [f"w{i:02d}" for i in range(25)]
    assert ids(store.list_workloads(tenant="b")) == [f"w{i:02d}" for i in range(1, 25, 2)]
    assert ids(store.list_workloads(kind="inference")) == [f"w{i:02d}" for i in range(0, 25, 3)]
    assert ids(store.list_workloads(tenant="a", kind="inference", limit=2)) == ["w00", "w06"]
    assert ids(store.list_workloads(tenant="a", kind="inference", after_id="w06")) == ["w12", "w18", "w24"]
    assert ids(store.list_workloads(state=CANCELLED)) == [f"w{i:02d}" for i in range(0, 25, 4)]
    assert ids(store.list_workloads(state=[RUNNING, CANCELLED], tenant="b")) == ["w01"]
    assert ids(store.list_workloads(tenant="nobody")) == []
    active = [f"w{i:02d}" for i in range(25) if i % 4]
    assert ids(store.active_workloads()) == active
    assert store.counts_by_state() == {**dict.fromkeys(STATES, 0), PENDING: 17, RUNNING: 1, CANCELLED: 7}


# --------------------------------------------------------------------------- inventory


def test_upsert_inventory_records_only_changes(store: Store) -> None:
    h100 = {"name": "h100-80g", "memory_gib": 80, "cost_per_hour": 4.0}
    a100 = {"name": "a100-40g", "memory_gib": 40, "cost_per_hour": 1.8}
    research = {"name": "research", "max_gpus": 64}
    n1 = {"id": "n1", "gpu_type": "h100-80g", "gpus": 8, "zone": "z1"}
    n2 = {"id": "n2", "gpu_type": "a100-40g", "gpus": 8, "zone": "z2"}
    rows = store.upsert_inventory(gpu_types=[h100, a100], nodes=[n2, n1], tenants=[research])
    assert [(r.id, r.spec) for r in rows] == [("n2", n2), ("n1", n1)]
    assert store.revision() == 5
    assert store.gpu_types() == [a100, h100] and store.tenants() == [research]
    assert store.all_nodes() == sorted(rows, key=lambda r: r.id)
    events = store.events_after(0)
    assert [(e.kind, e.action, e.id, e.tenant) for e in events] == [
        ("inventory", "created", "h100-80g", ""),
        ("inventory", "created", "a100-40g", ""),
        ("inventory", "created", "research", ""),
        ("node", "created", "n2", ""),
        ("node", "created", "n1", ""),
    ]
    assert events[0].data == {"gpu_type": h100} and events[2].data == {"tenant": research}
    assert events[3].data == rows[0].as_dict() and rows[0].revision == 4

    # Unchanged items get no event and keep their rows; changed ones get one each.
    n1_big = {**n1, "gpus": 16}
    rows2 = store.upsert_inventory(
        gpu_types=[h100], nodes=[n1_big, n2], tenants=[{**research, "max_gpus": 8}]
    )
    assert rows2[1] == rows[0]
    assert (rows2[0].spec, rows2[0].revision) == (n1_big, 7)
    assert [(e.kind, e.action, e.id) for e in store.events_after(5)] == [
        ("inventory", "updated", "research"),
        ("node", "updated", "n1"),
    ]
    assert store.upsert_inventory(nodes=[n1_big]) == [rows2[0]]
    assert store.revision() == 7
    with pytest.raises(ValueError, match="'id'"):
        store.upsert_inventory(nodes=[{"gpus": 8}])
    with pytest.raises(ValueError, match="'name'"):
        store.upsert_inventory(gpu_types=[{"name": ""}])


def test_nodes_page_drain_and_delete(store: Store) -> None:
    store.upsert_inventory(gpu_types=[], tenants=[], nodes=[{"id": f"n{i}", "gpus": 8} for i in range(5)])
    assert [r.id for r in store.list_nodes(limit=2)] == ["n0", "n1"]
    assert [r.id for r in store.list_nodes(after_id="n1", limit=2)] == ["n2", "n3"]
    assert [r.id for r in store.list_nodes(after_id="n3")] == ["n4"]
    drained = store.drain_node("n2")
    assert drained.spec == {"id": "n2", "gpus": 8, "state": "draining"}
    assert store.get_node("n2") == drained and drained.revision == store.revision() == 6
    assert store.drain_node("n2") == drained and store.revision() == 6
    deleted = store.delete_node("n2")
    assert deleted == drained
    assert store.events_after(6) == [
        Event(7, store.events_after(6)[0].time, "node", "deleted", "n2", "", drained.as_dict())
    ]
    for call in (store.get_node, store.drain_node, store.delete_node):
        with pytest.raises(NotFound, match="no node 'n2'"):
            call("n2")
    assert [r.id for r in store.all_nodes()] == ["n0", "n1", "n3", "n4"]


# --------------------------------------------------------------------------- plans


def test_apply_plan_skips_workloads_that_changed(store: Store) -> None:
    for id in ("same", "noop", "updated", "cancelled", "running"):
        submit(store, id)
    place(store, "noop", placement={"shards": []})
    store.update_workload("updated", SPEC)
    store.cancel_workload("cancelled")
    store.set_workload_state("running", RUNNING)
    before = {r.id: r for r in store.list_workloads()}
    base = store.revision()
    reasons = [{"code": "capacity", "message": "no h100 free"}]
    plan = {"status": "FEASIBLE", "objective": 12.5, "placements": [{}, {}], "unplaced": [{}]}
    revision = store.apply_plan(
        plan,
        status="FEASIBLE",
        gap=0.01,
        solve_s=1.5,
        based_on=3,
        assignments={
            "same": Assignment(1, PLACED, PLACEMENT, []),
            "noop": Assignment(1, PLACED, {"shards": []}, []),  # nothing changes: no event
            "updated": Assignment(1, PLACED, PLACEMENT, []),  # solved for version 1, now 2: skipped
            "cancelled": Assignment(1, PENDING, None, reasons),  # terminal: skipped
            "running": Assignment(1, PENDING, None, reasons),
            "unknown": Assignment(1, PLACED, PLACEMENT, []),
        },
    )
    assert revision == base + 3 == store.revision()
    assert store.get_workload("same").placement == PLACEMENT and store.get_workload("same").state == PLACED
    running = store.get_workload("running")
    assert (running.state, running.placement, running.reasons) == (PENDING, None, reasons)
    for id in ("noop", "updated", "cancelled"):
        assert store.get_workload(id) == before[id]
    events = store.events_after(base)
    assert [(e.kind, e.id) for e in events] == [
        ("workload", "same"),
        ("workload", "running"),
        ("plan", str(revision)),
    ]
    assert events[-1].data == {
        "status": "FEASIBLE",
        "gap": 0.01,
        "objective": 12.5,
        "placed": 2,
        "unplaced": 1,
        "solve_s": 1.5,
    }
    latest = store.latest_plan()
    assert latest is not None
    assert (latest.revision, latest.plan, latest.status, latest.gap, latest.solve_s, latest.based_on) == (
        revision,
        plan,
        "FEASIBLE",
        0.01,
        1.5,
        3,
    )


def test_plan_history_is_bounded(path: Path) -> None:
    with Store(path, plan_history=3) as store:
        revisions = [
            store.apply_plan({"n": i}, status="OPTIMAL", gap=None, solve_s=0.0, based_on=0, assignments={})
            for i in range(6)
        ]
        assert revisions == [1, 2, 3, 4, 5, 6]
        latest = store.latest_plan()
        assert latest is not None and latest.plan == {"n": 5} and latest.gap is None
        stored = sqlite3.connect(path).execute("SELECT revision FROM plans ORDER BY revision").fetchall()
        assert stored == [(4,), (5,), (6,)]


def test_apply_plan_refuses_a_terminal_assignment(store: Store) -> None:
    with pytest.raises(ValueError, match="SUCCEEDED"):
        store.apply_plan(
            {},
            status="OPTIMAL",
            gap=0,
            solve_s=0,
            based_on=0,
            assignments={"w": Assignment(1, SUCCEEDED, None, [])},
        )
    assert store.revision() == 0 and store.latest_plan() is None


# --------------------------------------------------------------------------- the writer


def test_a_failing_operation_rolls_back_alone_in_its_batch(store: Store) -> None:
    """Three writes queued behind a blocked writer commit as one batch; the middle one fails."""
    gate = threading.Event()
    blocked = threading.Event()

    def block(tx: _Tx) -> None:
        blocked.set()
        gate.wait(5)

    def broken(tx: _Tx) -> None:
        tx.event("workload", "created", "ghost", "", {}, 0.0)
        tx.execute("INSERT INTO nodes (id, spec, revision, updated_at) VALUES ('ghost', '{}', 0, 0)")
        raise RuntimeError("boom")

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(store._write, block)
        assert blocked.wait(5)
        a = pool.submit(submit, store, "a")
        while store._queue.qsize() < 1:
            time.sleep(0.001)
        bad = pool.submit(store._write, broken)
        while store._queue.qsize() < 2:
            time.sleep(0.001)
        b = pool.submit(submit, store, "b")
        while store._queue.qsize() < 3:
            time.sleep(0.001)
        gate.set()
        first.result()
        assert (a.result().revision, b.result().revision) == (1, 2)
        with pytest.raises(RuntimeError, match="boom"):
            bad.result()
    assert store.revision() == 2
    assert [e.id for e in store.events_after(0)] == ["a", "b"]
    assert store.all_nodes() == []


def test_32_threads_submitting_with_retries_lose_and_duplicate_nothing(store: Store) -> None:
    """Every workload is submitted by two threads at once, twice each (a retry), with one request key."""
    ids = [f"w{i:03d}" for i in range(256)]
    results: list[tuple[str, WorkloadRow, bool]] = []
    lock = threading.Lock()

    def client(thread: int) -> None:
        mine = [id for i, id in enumerate(ids) if i % 16 == thread % 16] * 2
        random.Random(thread).shuffle(mine)
        for id in mine:
            row, created = store.submit_workload(id, "t", "inference", {"id": id}, request_key=f"key-{id}")
            with lock:
                results.append((id, row, created))

    threads = [threading.Thread(target=client, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32 * 16 * 2
    assert sorted(id for id, _, created in results if created) == ids
    assert all(row.id == id and row.version == 1 for id, row, _ in results)
    assert [r.id for r in store.list_workloads(limit=1000)] == ids
    assert store.revision() == len(ids)
    assert_gap_free(store)
    assert sorted(e.id for e in all_events(store)) == ids


# --------------------------------------------------------------------------- events


def test_events_are_compacted_beyond_the_history(path: Path) -> None:
    with Store(path, event_history=10) as store:
        for i in range(25):
            submit(store, f"w{i:02d}")
        assert (store.revision(), store.oldest_revision()) == (25, 16)
        assert [e.revision for e in store.events_after(15)] == list(range(16, 26))
        assert [e.revision for e in store.events_after(20, limit=2)] == [21, 22]
        assert store.events_after(25) == []
        with pytest.raises(FailedPrecondition, match="revision 14 is compacted"):
            store.events_after(14)
        with pytest.raises(FailedPrecondition):
            store.events_after(0)
        with pytest.raises(ValueError):
            store.events_after(-1)
        assert len(store.list_workloads(limit=100)) == 25  # rows are never compacted
    with Store(path, event_history=10) as store:
        assert (store.revision(), store.oldest_revision()) == (25, 16)
        submit(store, "w25")
        assert (store.revision(), store.oldest_revision()) == (26, 17)
        assert_gap_free(store)


def test_the_default_history_compacts_in_steps(path: Path) -> None:
    with Store(path, event_history=200) as store:  # slack: 2 events
        store.upsert_inventory(nodes=[{"id": f"n{i:03d}"} for i in range(201)])
        assert store.oldest_revision() == 1
        store.upsert_inventory(nodes=[{"id": "n999"}])
        assert (store.revision(), store.oldest_revision()) == (202, 3)
        assert_gap_free(store)


def test_wait_for_change(store: Store) -> None:
    assert store.wait_for_change(0, timeout=0.01) == 0
    submit(store, "w0")
    assert store.wait_for_change(0, timeout=5) == 1  # already past: no wait
    woke: list[float] = []

    def waiter() -> None:
        start = time.monotonic()
        assert store.wait_for_change(1, timeout=5) == 2
        woke.append(time.monotonic() - start)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)
    submit(store, "w1")
    thread.join(5)
    assert len(woke) == 1 and woke[0] < 2


def test_reads_in_a_long_lived_thread_see_every_returned_write(store: Store) -> None:
    def read(id: str, after: int) -> tuple[WorkloadRow, int]:
        return store.get_workload(id), store.events_after(after)[-1].revision

    with ThreadPoolExecutor(1) as reader:
        for i in range(20):
            row = submit(store, f"w{i:02d}")
            assert reader.submit(read, row.id, i).result() == (row, row.revision)


# --------------------------------------------------------------------------- files


def test_reopening_keeps_everything(path: Path) -> None:
    with Store(path) as store:
        submit(store, "w1", key="k1")
        submit(store, "w2")
        place(store, "w1")
        store.update_workload("w2", {"v": 2}, request_key="u2")
        store.upsert_inventory(gpu_types=[{"name": "h100"}], nodes=[{"id": "n1"}], tenants=[{"name": "t"}])
        store.drain_node("n1")
        snapshot = (
            store.revision(),
            store.list_workloads(),
            store.all_nodes(),
            store.gpu_types(),
            store.tenants(),
            store.latest_plan(),
            store.events_after(0),
            store.counts_by_state(),
        )
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    with Store(path) as store:
        again = (
            store.revision(),
            store.list_workloads(),
            store.all_nodes(),
            store.gpu_types(),
            store.tenants(),
            store.latest_plan(),
            store.events_after(0),
            store.counts_by_state(),
        )
        assert again == snapshot
        # Request keys survive, and revisions go on from where they were.
        assert store.submit_workload("w1", "research", "training", SPEC, request_key="k1")[1] is False
        assert store.update_workload("w2", {"v": 3}, request_key="u2").version == 2
        assert submit(store, "w3").revision == snapshot[0] + 1
        assert_gap_free(store)


def test_a_newer_schema_is_refused(path: Path) -> None:
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(StoreError, match=f"newer Apportion \\(store schema {SCHEMA_VERSION + 1}\\)"):
        Store(path)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not an Apportion store"):
        Store(garbage)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StoreError, match="no meta table"):
        Store(other)


def test_one_store_per_file_and_closed_stores_refuse_work(path: Path) -> None:
    store = Store(path)
    with pytest.raises(StoreError, match="open in another"):
        Store(path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        submit(store, "w1")
    with pytest.raises(StoreError, match="closed"):
        store.list_workloads()
    assert store.wait_for_change(0, timeout=5) == 0  # returns at once
    with pytest.raises(ValueError):
        Store(path, event_history=0)
    Store(path).close()


def test_no_acknowledged_write_is_lost_to_sigkill(path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "proto"), env.get("PYTHONPATH")) if p
    )
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("store_child.py")), str(path)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    acked = [child.stdout.readline() for _ in range(400)]
    os.kill(child.pid, signal.SIGKILL)
    acked += child.stdout.read().splitlines(keepends=True)  # what it printed before it died
    child.wait(10)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    ids = [line[:-1] for line in acked if line.endswith("\n")]
    assert len(ids) >= 400
    with Store(path) as store:
        stored = {r.id for r in store.list_workloads(limit=10**9)}
        assert set(ids) <= stored
        assert store.revision() == len(stored)
        assert_gap_free(store)
        assert store.oldest_revision() == 1


def test_gpu_types_and_tenants_are_cached_and_the_cache_follows_every_upsert(
    store: Store, path: Path
) -> None:
    h100 = {"name": "h100-80g", "memory_gib": 80}
    store.upsert_inventory(gpu_types=[h100])
    assert store.gpu_types() == [h100] and store.tenants() == []
    assert store.gpu_types() is store.gpu_types()  # served from the cache
    research = {"name": "research", "max_gpus": 8}
    store.upsert_inventory(tenants=[research], gpu_types=[{**h100, "memory_gib": 94}])
    assert store.tenants() == [research]
    assert store.gpu_types() == [{**h100, "memory_gib": 94}]
    # and another store on the same file (a reopen) reads what was written
    store.close()
    with Store(path) as again:
        assert again.gpu_types() == [{**h100, "memory_gib": 94}] and again.tenants() == [research]


def test_a_request_key_resent_with_another_spec_is_already_exists(store: Store) -> None:
    first, created = store.submit_workload(
        "w1", "t", "training", SPEC, request_key="r1", request_digest="aaa"
    )
    assert created
    again, created = store.submit_workload(
        "w1", "t", "training", SPEC, request_key="r1", request_digest="aaa"
    )
    assert again == first and not created  # a retry
    with pytest.raises(AlreadyExists, match="another spec"):
        store.submit_workload("w1", "t", "training", {**SPEC, "x": 2}, request_key="r1", request_digest="bbb")
    store.update_workload("w1", SPEC, request_key="u1", request_digest="ccc")
    with pytest.raises(AlreadyExists, match="another spec"):
        store.update_workload("w1", SPEC, request_key="u1", request_digest="ddd")
