"""``solver.reassign``: every movable service chosen again at once by an LP over
whole choices, then packed; kept only if the floors hold and the $/hour drops."""

from __future__ import annotations

import math

import pytest

from solver.aggregate import build_index
from solver.backends import get_backend
from solver.exchange import exchange_services
from solver.model import Placement, Shard
from solver.reassign import reassign_services
from tests.builders import node, problem, serve

# Prices (tests.builders.TYPES): l4 $0.8, a100 $2, h100 $4 per GPU-hour.
# a: h100 only, one 4-GPU replica serves its target ($16/h), weight 1.
# b: l4 (1 GPU, 10 req/s) or h100 (1 GPU, 40 req/s), target 40: 4 l4 replicas
#    ($3.2/h) or 1 h100 replica ($4/h). Runs on the l4 node, which it fills.
# c: l4 only (1 GPU, 10 req/s), target 40: 4 replicas ($3.2/h). Not placed.
# Floor: served demand 2 (a and b in full). The cheapest plan that keeps it:
# a out, b to h100 (1 replica), c on l4: $7.2/h instead of $19.2/h. That is a
# chain of three changes: taking a out leaves no peer to top up (b is in full,
# c has no room until b moves), so the exchange search cannot make it.
A = serve("a", 4, 10.0, 10.0, types=("h100",))
B = serve("b", 1, {"l4": 10.0, "h100": 40.0}, 40.0, types=("l4", "h100"))
C = serve("c", 1, 10.0, 40.0, types=("l4",))
NODES = [node("h1", "h100", 8), node("l1", "l4", 4)]
PLACED = {
    "a": Placement("a", (Shard("h1", 4),), "h100"),
    "b": Placement("b", tuple(Shard("l1", 1) for _ in range(4)), "l4"),
}
GAINS = [{"a": 1.0, "b": 1.0, "c": 1.0}]


def _dollars(placed: dict[str, Placement]) -> float:
    price = {"l4": 0.8, "a100": 2.0, "h100": 4.0}
    return sum(price[p.gpu_type or ""] * sum(s.gpus for s in p.shards) for p in placed.values())


def test_reassignment_makes_the_chain_that_no_single_exchange_makes() -> None:
    index = build_index(problem(NODES, [A, B, C]))
    assert exchange_services(index, PLACED, GAINS, [0.0], 1000, math.inf) == PLACED
    out = reassign_services(index, PLACED, GAINS, [0.0], 1000, get_backend("ortools"), math.inf)
    assert set(out) == {"b", "c"}
    assert out["b"].gpu_type == "h100" and len(out["b"].shards) == 1
    assert out["c"].gpu_type == "l4" and len(out["c"].shards) == 4
    assert _dollars(out) == pytest.approx(7.2)
    # The input is not changed.
    assert set(PLACED) == {"a", "b"}


def test_reassignment_keeps_the_plan_when_nothing_cheaper_keeps_the_floors() -> None:
    index = build_index(problem(NODES, [A, B, C]))
    backend = get_backend("ortools")
    # Only a counts in the floor: it must keep serving in full, and nothing is cheaper.
    assert reassign_services(index, PLACED, [{"a": 1.0}], [0.0], 1000, backend, math.inf) == PLACED
    # If b could run on l4 only, c would find no room: nothing to gain.
    b_l4 = serve("b", 1, 10.0, 40.0, types=("l4",))
    stuck = build_index(problem(NODES, [A, b_l4, C]))
    assert reassign_services(stuck, PLACED, GAINS, [0.0], 1000, backend, math.inf) == PLACED
    # Out of time: unchanged.
    assert reassign_services(index, PLACED, GAINS, [0.0], 1000, backend, 0.0) == PLACED


def test_services_that_run_now_are_not_moved() -> None:
    # b runs on l1 now: moving it would be a migration, so the chain is not made.
    p = problem(NODES, [A, B, C], current=[PLACED["b"]])
    index = build_index(p)
    out = reassign_services(index, PLACED, GAINS, [0.0], 1000, get_backend("ortools"), math.inf)
    assert out["b"] == PLACED["b"]
    assert "c" not in out


def test_zone_spread_services_pack_first_or_on_the_retry() -> None:
    # Two zones, one 4-GPU l4 node in each. s: 4 replicas spread over the zones (at
    # most 2 in each); t: 4 replicas anywhere. Both fit on l4 only as 2 + 2 of each
    # per node: t packed first (best fit) would fill one node and leave s short
    # (the packing places spread services first, and a retry puts what failed first).
    # Starting from both on h100 ($32/h), the reassignment moves both to l4 ($6.4/h).
    s = serve("s", 1, 10.0, 40.0, types=("l4", "h100"), spread="zone")
    t = serve("t", 1, 10.0, 40.0, types=("l4", "h100"))
    nodes = [
        node("l1", "l4", 4, zone="z1"),
        node("l2", "l4", 4, zone="z2"),
        node("h1", "h100", 8, zone="z1"),
    ]
    placed = {
        "s": Placement("s", tuple(Shard("h1", 1) for _ in range(4)), "h100"),
        "t": Placement("t", tuple(Shard("h1", 1) for _ in range(4)), "h100"),
    }
    p = problem(nodes, [s, t])
    out = reassign_services(
        build_index(p), placed, [{"s": 1.0, "t": 1.0}], [0.0], 1000, get_backend("ortools"), math.inf
    )
    assert out["s"].gpu_type == "l4" and out["t"].gpu_type == "l4"
    zones = [next(n.zone for n in nodes if n.id == sh.node_id) for sh in out["s"].shards]
    assert sorted(zones) == ["z1", "z1", "z2", "z2"]
    assert _dollars(out) == pytest.approx(6.4)


def test_a_service_that_keeps_its_type_keeps_its_nodes() -> None:
    # s runs 4 replicas on a1 for a target 2 meet ($8/h for $4/h of need). The
    # reassignment gives it 2: it keeps 2 of its replicas on a1 (packed afresh, best
    # fit would have put them on the smaller a2).
    s = serve("s", 1, 10.0, 20.0, types=("a100",))
    p = problem([node("a1", "a100", 8), node("a2", "a100", 2)], [s])
    placed = {"s": Placement("s", tuple(Shard("a1", 1) for _ in range(4)), "a100")}
    out = reassign_services(
        build_index(p), placed, [{"s": 1.0}], [0.0], 1000, get_backend("ortools"), math.inf
    )
    assert out["s"].shards == (Shard("a1", 1), Shard("a1", 1))
