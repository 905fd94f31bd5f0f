"""``greedy.repair_priority``: strict priority restored on concrete nodes, for jobs and
for services."""

from __future__ import annotations

from solver.aggregate import build_index
from solver.greedy import complete, repair_priority
from tests.builders import node, place, problem, serve, train


def test_a_left_out_service_takes_the_room_of_lower_priority_jobs() -> None:
    # n1 (2 GPUs) and n2 (2 GPUs) are full of priority-0 one-GPU jobs; the priority-10
    # service needs 2 replicas on 2 nodes (spread over nodes): one job per node goes.
    p = problem(
        [node("n1", gpus=2), node("n2", gpus=2)],
        [
            serve("svc", 1, 10.0, 20.0, min_replicas=2, spread="node", priority=10),
            *[train(f"j{i}", 1, 1.0) for i in range(4)],
        ],
    )
    index = build_index(p)
    placed = {f"j{i}": place(f"j{i}", (f"n{1 + i // 2}", 1), type="a100") for i in range(4)}
    out = repair_priority(index, placed, None)
    assert "svc" in out and sorted(s.node_id for s in out["svc"].shards) == ["n1", "n2"]
    refilled = complete(index, out, "value")  # what the pipeline does next
    assert len([j for j in refilled if j.startswith("j")]) == 2  # the two that still fit


def test_a_service_that_cannot_fit_even_so_changes_nothing() -> None:
    p = problem(
        [node("n1", gpus=2)],
        [serve("svc", 4, 10.0, 20.0, priority=10), train("j0", 2, 1.0)],
    )
    index = build_index(p)
    placed = {"j0": place("j0", ("n1", 2), type="a100")}
    assert repair_priority(index, placed, None) == placed  # a 4-GPU replica never fits a 2-GPU node


def test_a_service_lost_in_packing_is_packed_again_first() -> None:
    # Two 2-GPU nodes in one zone, full in the solution: "z" (2 replicas spread over
    # zones: both may share a node here) and "n" (2 replicas on distinct nodes). Packed
    # zone-spread first, best fit put both of z's replicas on one node and n found one
    # node with room (found on the trtllm family: services lost, the solution wasted);
    # the second packing, with n first, places both.
    from solver.disaggregate import disaggregate

    p = problem(
        [node("n1", gpus=2, zone="z0", domain="r0"), node("n2", gpus=2, zone="z0", domain="r0")],
        [
            serve("z", 1, 10.0, 20.0, min_replicas=2, spread="zone", priority=10),
            serve("n", 1, 10.0, 20.0, min_replicas=2, spread="node", priority=10),
        ],
    )
    index = build_index(p)
    counts = {}
    for c in index.classes:
        o = next(o for o, opt in enumerate(c.options) if opt.kind.value == "replica")
        counts[c.index, o] = 2
    placed, lost = disaggregate(index, counts)
    assert not lost, lost
    assert sorted(s.node_id for s in placed["n"].shards) == ["n1", "n2"]
    assert len(placed["z"].shards) == 2
