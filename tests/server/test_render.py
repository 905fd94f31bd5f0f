"""server.render and the CLI's progress line, on hand-made plans (no solver run)."""

from __future__ import annotations

import io

from server.cli import _Progress
from server.render import render_explanation, render_plan, table
from solver import (
    GangShape,
    GpuType,
    InferenceSpec,
    Node,
    Placement,
    Plan,
    PlanMetrics,
    PlanStatus,
    Problem,
    Reason,
    ReasonCode,
    Shard,
    Shortfall,
    TrainingSpec,
    Unplaced,
    Workload,
)

PROBLEM = Problem(
    gpu_types=(GpuType("h100-80g", 80.0),),
    nodes=(Node("n1", "h100-80g", 8), Node("n2", "h100-80g", 8)),
    workloads=(
        Workload("train", training=TrainingSpec((GangShape(16, {"h100-80g": 1.0}),))),
        Workload("chat", inference=InferenceSpec({"h100-80g": 1}, {"h100-80g": 10.0}, 100.0)),
        Workload("big", training=TrainingSpec((GangShape(64, {"h100-80g": 1.0}),))),
    ),
)

PLAN = Plan(
    status=PlanStatus.FEASIBLE,
    policy="throughput",
    objective=1.5,
    best_bound=1.6,
    gap=0.0625,
    placements=(
        Placement("train", (Shard("n1", 8), Shard("n2", 8)), "h100-80g"),
        Placement("chat", (Shard("n1", 1), Shard("n2", 1), Shard("n1", 1)), "h100-80g"),
    ),
    unplaced=(
        Unplaced(
            "big", (Reason(ReasonCode.TOO_LARGE, "needs 64 GPUs"), Reason(ReasonCode.QUOTA, "over quota"))
        ),
    ),
    shortfalls=(Shortfall("chat", 30.0, 100.0, (Reason(ReasonCode.CAPACITY, "held by train"),)),),
    stage_times_s={"validate": 0.25, "solve": 1.0},
    shadow_prices={"h100-80g": 0.125},
    metrics=PlanMetrics(gpus_used=19, gpus_total=16, placed=2, unplaced=1),
    work_s=1.5,
    stopped_by="work_limit",
)


def test_render_plan_sections() -> None:
    text = render_plan(PLAN, PROBLEM)
    lines = text.splitlines()
    assert lines[0] == (
        "FEASIBLE  policy throughput  objective 1.5  bound 1.6  gap 6.25%  time 1.25 s"
        "  work 1.50  stopped by work_limit"
    )
    assert "  train     training   h100-80g    16  2 nodes         n1:8 n2:8" in lines
    assert "  chat      inference  h100-80g     3  3 replicas      n1:1×2 n2:1" in lines
    assert "  big       training  TOO_LARGE: needs 64 GPUs" in lines
    assert "                      QUOTA: over quota" in lines  # one reason per line
    assert "  chat              30         100  CAPACITY: held by train" in lines
    assert "  h100-80g  0.125" in lines
    assert "  solve       1.000" in lines


def test_render_heuristic_plan_without_bound() -> None:
    plan = Plan(PlanStatus.HEURISTIC, "first-fit", 1.0, None, None, ())
    text = render_plan(plan, PROBLEM)
    assert text.splitlines()[0].endswith("bound -  gap -  time 0.00 s")
    assert "(none)" in text and "Unplaced" not in text and "Stage times" not in text


def test_table_aligns_numbers_right() -> None:
    assert table(["NAME", "N"], [["a", 1], ["bbb", 22]], indent="") == ["NAME   N", "a      1", "bbb   22"]


def test_render_explanation() -> None:
    assert render_explanation("big", False, "big is not placed", ["[TOO_LARGE] x"]) == (
        "big: not placed\n  big is not placed\n  - [TOO_LARGE] x\n"
    )


def test_progress_lines() -> None:
    plain = io.StringIO()
    progress = _Progress(plain, tty=False)
    progress("validate", 0.0)
    progress("solve", 1.25)
    progress.close()
    assert plain.getvalue() == "apportion: validate at 0.00 s\napportion: solve at 1.25 s\n"
    tty = io.StringIO()
    progress = _Progress(tty, tty=True)
    progress("solve", 1.25)
    progress.close()
    assert tty.getvalue() == "\r\x1b[Kplanning: solve (1.2 s)\r\x1b[K"


def test_list_shows_gpus_age_queue_position_and_the_pending_reason() -> None:
    from server.render import render_workloads

    now = 10_000.0
    statuses = [
        {
            "workload": {"id": "run", "tenant": "t", "training": {"gpus": 4}},
            "state": "RUNNING",
            "version": 1,
            "placement": {
                "gpu_type": "h100",
                "shards": [{"node_id": "n1", "gpus": 2}, {"node_id": "n2", "gpus": 2}],
            },
            "created_at": now - 7200,
        },
        {
            "workload": {"id": "low", "priority": 0, "training": {"elastic": [{"gpus": 8}, {"gpus": 2}]}},
            "state": "PENDING",
            "version": 1,
            "reasons": [{"code": "CAPACITY", "message": "no room"}],
            "created_at": now - 30,
        },
        {
            "workload": {
                "id": "high",
                "priority": 5,
                "inference": {"gpus_per_replica": {"h100": 2}, "min_replicas": 3},
            },
            "state": "PENDING",
            "version": 1,
            "reasons": [{"code": "HIGHER_PRIORITY", "message": "held"}],
            "created_at": now - 5,
        },
    ]
    lines = render_workloads(statuses, now=now).splitlines()
    assert lines[0].split() == [
        "ID", "TENANT", "KIND", "STATE", "VERSION", "GPUS", "AGE", "QUEUE", "PLACEMENT", "/", "REASON"
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["run"][5:8] == ["4", "2h", "-"]
    assert rows["high"][5:8] == ["6", "5s", "1"]  # 3 replicas of 2 GPUs; first: the higher priority
    assert rows["low"][5:8] == ["2", "30s", "2"] and "CAPACITY: no room" in lines[2] + lines[3]
