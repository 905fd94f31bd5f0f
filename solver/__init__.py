"""Apportion's planning core: pure, typed, deterministic for a given seed.

One entry point::

    from solver import plan, Problem, PlanOptions
    result = plan(problem, policy="throughput", options=PlanOptions(time_limit_s=5))

No I/O, no grpc, no torch. OR-Tools (or pulp) is imported only inside the
backends when a model is solved.
"""

from __future__ import annotations

from solver.errors import ApportionError, SolverError, UnknownPolicyError, ValidationError, Violation
from solver.model import (
    GangShape,
    GpuType,
    InferenceSpec,
    Locality,
    Node,
    NodeState,
    Placement,
    Plan,
    PlanMetrics,
    PlanOptions,
    PlanStatus,
    Problem,
    Reason,
    ReasonCode,
    Shard,
    Shortfall,
    Spread,
    Tenant,
    TrainingSpec,
    Unplaced,
    Workload,
)
from solver.pipeline import Explanation, explain, plan
from solver.policies import POLICIES, policy_names
from solver.validate import validate
from solver.verify import VerifyReport, verify

__all__ = [
    "POLICIES",
    "ApportionError",
    "Explanation",
    "GangShape",
    "GpuType",
    "InferenceSpec",
    "Locality",
    "Node",
    "NodeState",
    "Placement",
    "Plan",
    "PlanMetrics",
    "PlanOptions",
    "PlanStatus",
    "Problem",
    "Reason",
    "ReasonCode",
    "Shard",
    "Shortfall",
    "SolverError",
    "Spread",
    "Tenant",
    "TrainingSpec",
    "UnknownPolicyError",
    "Unplaced",
    "ValidationError",
    "VerifyReport",
    "Violation",
    "Workload",
    "explain",
    "plan",
    "policy_names",
    "validate",
    "verify",
]
