"""The dispatcher's view of the placed workloads and the nodes, kept up to date from the
store's events (server.workers.Dispatcher._refresh), equals a full read after changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from apportion.v1 import allocator_pb2 as apb
from server.store import PLACED, RUNNING
from tests.server.serving import example_workloads, inventory_request, running_server


def test_the_view_follows_the_events_and_equals_a_full_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_server(tmp_path) as srv:
        stub = srv.stub()
        stub.UpsertNodes(inventory_request())
        for w in example_workloads():
            stub.SubmitWorkload(apb.SubmitWorkloadRequest(workload=w))
        srv.settle()
        store, dispatcher = srv.server.store, srv.server.dispatcher
        dispatcher.stop()  # its thread refreshes too: the test drives it alone from here
        dispatcher._refresh()

        def full() -> tuple[list[str], dict[str, int]]:
            return [r.id for r in store.workloads_in((PLACED, RUNNING))], store.node_gpus()

        def view() -> tuple[list[str], dict[str, int]]:
            return [r.id for r in dispatcher._rows], dict(dispatcher._node_gpus)

        assert view() == full() and view()[0], "nothing placed: the test would prove nothing"
        placed = view()[0][0]
        stub.CancelWorkload(apb.CancelWorkloadRequest(id=placed))
        bigger = inventory_request()
        bigger.nodes[0].gpus = 16
        stub.UpsertNodes(bigger)
        srv.settle()

        def no_full_read(*args: object) -> None:
            raise AssertionError("the view was read whole, not from the events")

        monkeypatch.setattr(store, "workloads_in", no_full_read)
        monkeypatch.setattr(store, "node_gpus", no_full_read)
        assert dispatcher._refresh()
        monkeypatch.undo()
        assert placed not in view()[0]
        assert view()[1][bigger.nodes[0].id] == 16
        assert view() == full()
        assert not dispatcher._refresh()  # nothing new since
