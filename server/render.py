"""Plain-text rendering of plans and explanations for people (``--format table``).

Machines read ``--format json`` (the plan JSON of :mod:`server.convert`); this
module only lays out what a person wants to see first: the status line with
the bound and gap, then where each workload runs, what is left out and why,
shortfalls, shadow prices and stage times. Empty sections are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from solver import Placement, Plan, Problem, Reason

__all__ = ["render_explanation", "render_plan", "table"]

MAX_SHARDS_SHOWN = 8


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, indent: str = "  ") -> list[str]:
    """Lines of a table: columns padded to their widest cell, numeric columns right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    return _layout(headers, cells, indent)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_number(text: str) -> bool:
    if text in ("-", ""):
        return True
    try:
        float(text.rstrip("%"))
    except ValueError:
        return False
    return True


def _layout(headers: Sequence[str], cells: list[list[str]], indent: str) -> list[str]:
    widths = [max([len(h)] + [len(row[c]) for row in cells]) for c, h in enumerate(headers)]
    right = [bool(cells) and all(_is_number(row[c]) for row in cells) for c in range(len(headers))]
    last = len(headers) - 1

    def line(values: Sequence[str]) -> str:
        parts = []
        for c, v in enumerate(values):
            if right[c]:
                parts.append(v.rjust(widths[c]))
            elif c == last:
                parts.append(v)
            else:
                parts.append(v.ljust(widths[c]))
        return (indent + "  ".join(parts)).rstrip()

    return [line(list(headers)), *(line(row) for row in cells)]


def _number(value: float | None, spec: str = ".6g") -> str:
    return "-" if value is None else format(value, spec)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _shards(p: Placement) -> str:
    """``node:gpus`` per shard; equal shards (replicas on one node) written once with a count:
    ``n3:2×4``, in order of first appearance."""
    counts: dict[tuple[str, int], int] = {}
    for shard in p.shards:
        key = (shard.node_id, shard.gpus)
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{node}:{gpus}" + (f"×{n}" if n > 1 else "") for (node, gpus), n in counts.items()]
    if len(parts) > MAX_SHARDS_SHOWN:
        parts = [*parts[:MAX_SHARDS_SHOWN], f"… +{len(parts) - MAX_SHARDS_SHOWN} more"]
    return " ".join(parts)


def _reason_rows(first: list[object], reasons: Sequence[Reason]) -> list[list[object]]:
    """One row per reason: the first carries the other cells, the next ones leave them blank."""
    texts = [f"{r.code.value}: {r.message}" for r in reasons] or ["-"]
    blank: list[object] = [""] * len(first)
    return [[*(first if i == 0 else blank), text] for i, text in enumerate(texts)]


def render_plan(plan: Plan, problem: Problem) -> str:
    """The plan as text: a status line, a summary line and one table per section."""
    kinds = {w.id: ("training" if w.training is not None else "inference") for w in problem.workloads}
    total_s = sum(plan.stage_times_s.values())
    gap = "-" if plan.gap is None else f"{plan.gap:.2%}"
    out = [
        f"{plan.status.value}  policy {plan.policy}  objective {_number(plan.objective)}"
        f"  bound {_number(plan.best_bound)}  gap {gap}  time {total_s:.2f} s",
        f"GPUs {plan.metrics.gpus_used}/{plan.metrics.gpus_total} used"
        f"  cost {plan.metrics.cost_per_hour:.2f} per hour"
        f"  placed {plan.metrics.placed}  unplaced {plan.metrics.unplaced}"
        f"  migrations {plan.metrics.migrations}",
        "",
        "Placements",
    ]
    if plan.placements:
        rows = []
        for p in plan.placements:
            kind = kinds.get(p.workload_id, "?")
            spread = (
                _count(len(p.shards), "replica")
                if kind == "inference"
                else _count(len({s.node_id for s in p.shards}), "node")
            )
            rows.append([p.workload_id, kind, p.gpu_type or "-", p.gpus, spread, _shards(p)])
        out += table(["WORKLOAD", "KIND", "TYPE", "GPUS", "NODES/REPLICAS", "SHARDS"], rows)
    else:
        out.append("  (none)")
    if plan.unplaced:
        out += ["", "Unplaced"]
        rows = [
            r
            for u in plan.unplaced
            for r in _reason_rows([u.workload_id, kinds.get(u.workload_id, "?")], u.reasons)
        ]
        out += table(["WORKLOAD", "KIND", "REASONS"], rows)
    if plan.shortfalls:
        out += ["", "Shortfalls"]
        rows = [
            r
            for s in plan.shortfalls
            for r in _reason_rows(
                [s.workload_id, _number(s.served_rps, ".4g"), _number(s.target_rps, ".4g")], s.reasons
            )
        ]
        out += table(["WORKLOAD", "SERVED RPS", "TARGET RPS", "REASONS"], rows)
    if plan.shadow_prices:
        out += ["", "Shadow prices (objective gained per extra GPU)"]
        out += table(
            ["GPU TYPE", "PRICE"],
            [[name, _number(price, ".4g")] for name, price in sorted(plan.shadow_prices.items())],
        )
    if plan.stage_times_s:
        out += ["", "Stage times"]
        out += table(["STAGE", "SECONDS"], [[name, f"{s:.3f}"] for name, s in plan.stage_times_s.items()])
    return "\n".join(out) + "\n"


def render_explanation(workload_id: str, placed: bool, summary: str, details: Sequence[str]) -> str:
    """An explanation as text: one line with the verdict, then the summary and details."""
    lines = [f"{workload_id}: {'placed' if placed else 'not placed'}", f"  {summary}"]
    lines += [f"  - {d}" for d in details]
    return "\n".join(lines) + "\n"
