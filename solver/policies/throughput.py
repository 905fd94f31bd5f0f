"""``throughput`` (default): maximize the weighted normalized throughput.

Objective: sum over training jobs of w_j * rho_j (throughput on the chosen type
and size over the job's best), plus sum over services of w_i * f_i (served
fraction), minus the migration penalty. Inference demand is met whenever it can
be: a stage before the objective maximizes the weighted served fraction, so a
shortfall remains only where demand cannot be met (a penalized shortfall that
is not traded for training throughput).
"""

from __future__ import annotations

from solver.formulation import Formulation
from solver.model import PlanOptions
from solver.policies.base import OptimizingPolicy, Stage, demand_stage, tier_stages

__all__ = ["ThroughputPolicy"]


class ThroughputPolicy(OptimizingPolicy):
    name = "throughput"
    description = "maximize weighted normalized throughput; meet inference demand first"

    def stages(self, form: Formulation, options: PlanOptions) -> list[Stage]:
        stages = tier_stages(form, include_lowest=False) + demand_stage(form)
        moves, constant = form.moves(options.migration_penalty)
        stages.append(Stage("throughput", form.throughput() + moves, constant, primary=True))
        return stages
