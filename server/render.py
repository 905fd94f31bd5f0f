"""Plain-text rendering of plans and explanations for people (``--format table``).

Machines read ``--format json`` (the plan JSON of :mod:`server.convert`); this
module only lays out what a person wants to see first: the status line with
the bound and gap, then where each workload runs, what is left out and why,
shortfalls, shadow prices and stage times. Empty sections are left out.

The client commands (``apportion get``, ``list``, ``nodes``, ``watch``...)
render the server's answers from their JSON mapping (the plain dicts that
``-o json`` prints, made by :func:`server.convert.message_to_dict`), so this
module never sees a protobuf message: :func:`render_workloads`,
:func:`render_workload`, :func:`render_inventory`, :func:`render_nodes`,
:func:`render_event`.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from server.usage import least_gpus
from solver import Placement, Plan, Problem, Reason

__all__ = [
    "format_time",
    "render_event",
    "render_explanation",
    "render_inventory",
    "render_nodes",
    "render_plan",
    "render_workload",
    "render_workloads",
    "table",
]

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
    right = [
        any(row[c] not in ("-", "") for row in cells) and all(_is_number(row[c]) for row in cells)
        for c in range(len(headers))
    ]
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
    return _shard_text((s.node_id, s.gpus) for s in p.shards)


def _shard_text(shards: Iterable[tuple[str, int]]) -> str:
    counts: dict[tuple[str, int], int] = {}
    for key in shards:
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


def render_plan(plan: Plan, problem: Problem | None = None, *, kinds: Mapping[str, str] | None = None) -> str:
    """The plan as text: a status line, a summary line and one table per section.

    The kind of each workload comes from ``problem``, or from ``kinds`` (id ->
    ``training`` / ``inference``) for a plan without its problem (the server's).
    """
    known = dict(kinds or {})
    if problem is not None:
        known.update((w.id, "training" if w.training is not None else "inference") for w in problem.workloads)
    kinds = known
    total_s = sum(plan.stage_times_s.values())
    gap = "-" if plan.gap is None else f"{plan.gap:.2%}"
    out = [
        f"{plan.status.value}  policy {plan.policy}  objective {_number(plan.objective)}"
        f"  bound {_number(plan.best_bound)}  gap {gap}  time {total_s:.2f} s"
        + (
            ""
            if plan.stopped_by == "heuristic"
            else f"  work {plan.work_s:.2f}  stopped by {plan.stopped_by}"
        ),
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


# ---------------------------------------------------------------------------
# The server's answers, from their JSON mapping


def format_time(seconds: object) -> str:
    """Unix seconds as a UTC date and time; ``-`` for none."""
    if not isinstance(seconds, int | float) or not seconds:
        return "-"
    moment = datetime.datetime.fromtimestamp(float(seconds), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _kind(workload: Mapping[str, Any]) -> str:
    if "training" in workload:
        return "training"
    if "inference" in workload:
        return "inference"
    return "?"


def _placement_text(placement: Mapping[str, Any] | None) -> str:
    if not placement or not placement.get("shards"):
        return "-"
    shards = _shard_text((s.get("node_id", ""), int(s.get("gpus", 0))) for s in placement["shards"])
    gpu_type = placement.get("gpu_type", "")
    return f"{gpu_type} {shards}" if gpu_type else shards


def _where(status: Mapping[str, Any]) -> str:
    """Where it runs, or the first reason it does not."""
    placement = status.get("placement")
    if placement and placement.get("shards"):
        return _placement_text(placement)
    reasons = status.get("reasons") or []
    if reasons:
        first = reasons[0]
        more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
        return f"{first.get('code', '')}: {first.get('message', '')}{more}"
    return status.get("message") or "-"


def render_workloads(statuses: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """Workload statuses (``WorkloadStatus`` dicts) as one table: a row each. GPUS: what
    it holds where placed, else the fewest it can run on; AGE: since it was submitted;
    QUEUE: a pending workload's place among the pending ones listed, by priority, then
    submission (the order admission and the greedy try them; the optimizer may place
    another first where that serves its objective better)."""
    if not statuses:
        return "(no workloads)\n"
    now = time.time() if now is None else now
    queue = _queue_positions(statuses)
    rows = []
    for s in statuses:
        w = s.get("workload", {})
        version = str(s.get("version", 0))
        if "serving_version" in s:
            version += f" (serving {s['serving_version']})"
        rows.append(
            [
                w.get("id", ""),
                w.get("tenant") or "-",
                _kind(w),
                s.get("state", ""),
                version,
                _gpus(s),
                _age(now - float(s.get("created_at", now) or now)),
                queue.get(w.get("id", ""), "-"),
                _where(s),
            ]
        )
    headers = ["ID", "TENANT", "KIND", "STATE", "VERSION", "GPUS", "AGE", "QUEUE", "PLACEMENT / REASON"]
    return "\n".join(table(headers, rows, indent="")) + "\n"


def _queue_positions(statuses: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    pending = [s for s in statuses if s.get("state") == "PENDING"]
    pending.sort(
        key=lambda s: (
            -int(s.get("workload", {}).get("priority", 0) or 0),
            float(s.get("created_at", 0) or 0),
            s.get("workload", {}).get("id", ""),
        )
    )
    return {s.get("workload", {}).get("id", ""): k for k, s in enumerate(pending, start=1)}


def _gpus(status: Mapping[str, Any]) -> int:
    placement = status.get("placement") or {}
    if placement.get("shards"):
        return sum(int(x.get("gpus", 0) or 0) for x in placement["shards"])
    return least_gpus(status.get("workload", {}))


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def render_workload(status: Mapping[str, Any]) -> str:
    """One workload status in full: its fields, placement and reasons."""
    w = status.get("workload", {})
    version = str(status.get("version", 0))
    if "serving_version" in status:
        version += f" (version {status['serving_version']} still serves)"
    fields = [
        ("id", w.get("id", "")),
        ("tenant", w.get("tenant") or "-"),
        ("kind", _kind(w)),
        ("state", status.get("state", "")),
        ("version", version),
        ("placement", _placement_text(status.get("placement"))),
        ("message", status.get("message") or "-"),
        ("created", format_time(status.get("created_at"))),
        ("updated", format_time(status.get("updated_at"))),
        ("revision", status.get("revision", 0)),
    ]
    width = max(len(name) for name, _ in fields)
    lines = [f"{name + ':':<{width + 1}}  {value}" for name, value in fields]
    reasons = status.get("reasons") or []
    if reasons:
        lines.append("reasons:")
        lines += [f"  - {r.get('code', '')}: {r.get('message', '')}" for r in reasons]
    return "\n".join(lines) + "\n"


def _labels(labels: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


def render_nodes(
    nodes: Sequence[Mapping[str, Any]],
    *,
    indent: str = "",
    held: Mapping[str, Sequence[tuple[str, int]]] | None = None,
) -> list[str]:
    """Lines of a table of nodes (``Node`` dicts). With ``held`` (node id -> the
    (workload, GPUs) placed or running there): GPUs used and free, and the workloads."""
    headers = ["ID", "TYPE", "GPUS", "STATE", "ZONE", "DOMAIN", "CPUS", "MEMORY GIB", "LABELS"]
    if held is not None:
        headers[3:3] = ["USED", "FREE"]
        headers.append("WORKLOADS")
    rows = []
    for n in nodes:
        row: list[object] = [
            n.get("id", ""),
            n.get("gpu_type", ""),
            n.get("gpus", 0),
            n.get("state") or "ready",
            n.get("zone") or "-",
            n.get("domain") or "-",
            f"{float(n.get('cpus', 0.0)):g}",
            f"{float(n.get('memory_gib', 0.0)):g}",
            _labels(n.get("labels")),
        ]
        if held is not None:
            here = held.get(n.get("id", ""), ())
            used = sum(g for _w, g in here)
            row[3:3] = [used, int(n.get("gpus", 0)) - used]
            row.append(_names_of(sorted(w for w, _g in here)))
        rows.append(row)
    return table(headers, rows, indent=indent)


def _names_of(ids: Sequence[str], limit: int = 3) -> str:
    if not ids:
        return "-"
    return ",".join(ids[:limit]) + (f" +{len(ids) - limit} more" if len(ids) > limit else "")


def render_inventory(
    inventory: Mapping[str, Any], held: Mapping[str, Sequence[tuple[str, int]]] | None = None
) -> str:
    """An inventory (``{"gpu_types", "nodes", "tenants"}``, as the inventory file):
    the nodes (with ``held``: what is placed on each, see :func:`render_nodes`), then
    the GPU types and the tenants."""
    nodes = inventory.get("nodes") or []
    out = ["Nodes"]
    out += render_nodes(nodes, indent="  ", held=held) if nodes else ["  (none)"]
    gpu_types = inventory.get("gpu_types") or []
    if gpu_types:
        used: dict[str, int] = {}
        for n in nodes:
            used[n.get("gpu_type", "")] = used.get(n.get("gpu_type", ""), 0) + int(n.get("gpus", 0))
        out += ["", "GPU types"]
        out += table(
            ["NAME", "MEMORY GIB", "COST/HOUR", "GPUS"],
            [
                [
                    t.get("name", ""),
                    f"{float(t.get('memory_gib', 0.0)):g}",
                    _number(t.get("cost_per_hour"), ".4g"),
                    used.get(t.get("name", ""), 0),
                ]
                for t in gpu_types
            ],
        )
    tenants = inventory.get("tenants") or []
    if tenants:
        out += ["", "Tenants"]
        out += table(
            ["NAME", "MAX GPUS", "PER TYPE", "WEIGHT"],
            [
                [
                    t.get("name", ""),
                    t.get("max_gpus", "-"),
                    ",".join(f"{k}={v}" for k, v in sorted((t.get("max_gpus_per_type") or {}).items()))
                    or "-",
                    _number(t.get("weight", 1.0), "g"),
                ]
                for t in tenants
            ],
        )
    return "\n".join(out) + "\n"


def render_usage(usage: Mapping[str, Any]) -> str:
    """``apportion usage``: per tenant and GPU type, GPUs held against the quota."""
    rows: list[list[object]] = []
    for t in usage.get("tenants", []):
        name = t["tenant"] or "(none)"
        limit = t.get("max_gpus")
        rows.append([name, "all", t["gpus"], "-" if limit is None else limit])
        per_type = t.get("max_gpus_per_type", {})
        for gpu_type in sorted(set(t.get("gpus_per_type", {})) | set(per_type)):
            cap = per_type.get(gpu_type)
            rows.append([name, gpu_type, t["gpus_per_type"].get(gpu_type, 0), "-" if cap is None else cap])
    if not rows:
        return "no tenant holds GPUs or has a quota\n"
    return "\n".join(table(["TENANT", "GPU TYPE", "HELD", "QUOTA"], rows, indent="")) + "\n"


def render_event(event: Mapping[str, Any]) -> str:
    """A ``Watch`` event on one line: revision, time, action, what changed."""
    head = f"{event.get('revision', 0):>6}  {format_time(event.get('time'))}  {event.get('action', ''):<7}"
    if "workload" in event:
        s = event["workload"]
        w = s.get("workload", {})
        what = f"workload {w.get('id', '')}  {s.get('state', '')}  v{s.get('version', 0)}  {_where(s)}"
    elif "node" in event:
        n = event["node"]
        state = n.get("state") or "ready"
        what = f"node {n.get('id', '')}  {n.get('gpu_type', '')}×{n.get('gpus', 0)}  {state}"
    elif "plan" in event:
        p = event["plan"]
        gap = "-" if p.get("gap") is None else f"{p['gap']:.2%}"
        what = (
            f"plan {p.get('status', '')}  objective {_number(p.get('objective', 0.0))}  gap {gap}"
            f"  placed {p.get('placed', 0)}  unplaced {p.get('unplaced', 0)}"
            f"  solve {float(p.get('solve_time_s', 0.0)):.2f} s"
        )
    elif "gpu_type" in event:
        what = f"gpu_type {event['gpu_type'].get('name', '')}"
    elif "tenant" in event:
        what = f"tenant {event['tenant'].get('name', '')}"
    else:
        what = "-"
    return f"{head}  {what}".rstrip() + "\n"
