"""The classic baselines from the scheduling literature, behind the same
interface. They are what the optimizer is measured against (``best-fit`` also
seeds it). Their plans are scored with the ``throughput`` objective and carry
no bound. Orders and node choice: see ``solver.greedy``.
"""

from __future__ import annotations

from solver.policies.base import HeuristicPolicy

__all__ = ["BASELINES"]


def _baseline(name: str, description: str, respects_priority: bool = True) -> HeuristicPolicy:
    p = HeuristicPolicy()
    p.name = name
    p.order = name
    p.description = description
    p.respects_priority = respects_priority
    return p


BASELINES = (
    _baseline("fcfs", "first come, first served; first-fit nodes", respects_priority=False),
    _baseline("sjf", "shortest remaining time first; first-fit nodes", respects_priority=False),
    _baseline("priority", "highest priority first, then submission order; first-fit nodes"),
    _baseline("first-fit", "priority, then largest first (first-fit decreasing)"),
    _baseline(
        "best-fit", "priority, then largest first onto the fullest node that fits (best-fit decreasing)"
    ),
)
