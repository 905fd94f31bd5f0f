"""``cost``: meet every demand at the least $/hour.

Stages: coverage of every priority tier (all workloads that can run do run),
inference demand (met where possible), then maximize minus the $/hour of the
GPUs held (GPU types without a price count as free), minus the migration
penalty. The objective is therefore negative: -cost.
"""

from __future__ import annotations

from solver.formulation import Formulation
from solver.model import PlanOptions
from solver.policies.base import OptimizingPolicy, Stage, demand_stage, tier_stages

__all__ = ["CostPolicy"]


class CostPolicy(OptimizingPolicy):
    name = "cost"
    polish = "exchange"
    description = "place all demand, then minimize $/hour"
    prefer = "cost"

    def stages(self, form: Formulation, options: PlanOptions) -> list[Stage]:
        # Cuts (12): a service's $/hour is at least the convex envelope of what whole
        # replicas cost for the fraction it serves (else the LP bound is weak).
        form.service_cost_cuts()
        stages = tier_stages(form, include_lowest=True) + demand_stage(form)
        moves, constant = form.moves(options.migration_penalty)
        stages.append(Stage("cost", form.cost() + moves, constant, primary=True))
        return stages
