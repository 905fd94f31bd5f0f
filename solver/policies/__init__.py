"""Policy registry: one interface (``solver.policies.base``), one module per policy."""

from __future__ import annotations

from solver.errors import UnknownPolicyError
from solver.policies.base import HeuristicPolicy, OptimizingPolicy, Policy, Stage
from solver.policies.baselines import BASELINES
from solver.policies.cost import CostPolicy
from solver.policies.fairness import FairnessPolicy
from solver.policies.throughput import ThroughputPolicy

__all__ = ["POLICIES", "HeuristicPolicy", "OptimizingPolicy", "Policy", "Stage", "get_policy", "policy_names"]

POLICIES: dict[str, Policy] = {
    p.name: p for p in (ThroughputPolicy(), CostPolicy(), FairnessPolicy(), *BASELINES)
}


def policy_names() -> tuple[str, ...]:
    return tuple(POLICIES)


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}") from None
