"""``cost``: meet every demand at the least $/hour.

Stages: coverage of every priority tier (all workloads that can run do run),
inference demand (met where possible), then maximize minus the $/hour of the
GPUs held (GPU types without a price count as free), minus the migration
penalty. The objective is therefore negative: -cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from solver import clock
from solver.backends import Backend, get_backend
from solver.exchange import exchange_services
from solver.formulation import Formulation
from solver.model import Placement, PlanOptions
from solver.policies.base import OptimizingPolicy, Stage, demand_stage, stage_values, tier_stages
from solver.reassign import reassign_services

if TYPE_CHECKING:
    from solver.search import Search

__all__ = ["CostPolicy"]


class CostPolicy(OptimizingPolicy):
    name = "cost"
    description = "place all demand, then minimize $/hour"
    prefer = "cost"

    def improve(
        self, search: Search, placed: dict[str, Placement], until: float
    ) -> tuple[dict[str, Placement], dict[str, Placement] | None]:
        """Services traded for cheaper ones that serve the same (``_exchange``)."""
        if not search.form.f:
            return placed, None
        backend = get_backend(search.options.backend)  # a fresh LP of its own
        return _exchange(search.form, search.stages, search.floors, placed, until, backend), None

    def stages(self, form: Formulation, options: PlanOptions) -> list[Stage]:
        # Cuts (12): a service's $/hour is at least the convex envelope of what whole
        # replicas cost for the fraction it serves (else the LP bound is weak).
        form.service_cost_cuts()
        stages = tier_stages(form, include_lowest=True) + demand_stage(form)
        moves, constant = form.moves(options.migration_penalty)
        stages.append(Stage("cost", form.cost() + moves, constant, primary=True))
        return stages


def _exchange(
    form: Formulation,
    stages: list[Stage],
    floors: list[float],
    placed: dict[str, Placement],
    deadline: float,
    backend: Backend,
) -> dict[str, Placement]:
    """``solver.reassign`` then ``solver.exchange`` on the plan, with what each
    floored stage gains per unit of each service's served fraction and the plan's
    slack above each floor. A
    service whose other variables appear in a floored stage is left alone. Passes
    are repeated while one lowers the $/hour and the deadline allows (each pass
    keeps every floor, so the slack the next one starts from is >= 0)."""
    index = form.index
    early = [j for j in range(len(floors)) if not stages[j].primary]
    coefs = [{v.index: a for v, a in stages[j].terms} for j in early]
    gains: list[dict[str, float]] = [{} for _ in early]
    resolution = 1000
    for ci, f in form.f.items():
        c = index.classes[ci]
        others = [v.index for v in form.class_vars(ci) if v.index != f.index]
        if any(i in co for co in coefs for i in others):
            continue
        resolution = f.resolution
        for g, co in zip(gains, coefs, strict=True):
            if co.get(f.index, 0.0) > 0:
                g[c.members[0].id] = co[f.index]
    values = stage_values(form, [stages[j] for j in early], form.hint(placed.values()))
    slack = [v - floors[j] for v, j in zip(values, early, strict=True)]
    if any(s < 0 for s in slack):
        return placed
    # First every movable service chosen again at once (an LP over whole choices),
    # kept only if the floors hold as the model counts them and the $/hour went down.
    for _round in range(3):
        before = stage_values(form, stages, form.hint(placed.values()))[-1]
        moved = reassign_services(index, placed, gains, slack, resolution, backend, deadline)
        got = stage_values(form, stages, form.hint(moved.values()))
        new_slack = [got[j] - floors[j] for j in early]
        if any(s < 0 for s in new_slack) or got[-1] <= before + 1e-9 * max(1.0, abs(before)):
            break
        placed, slack = moved, new_slack
    # Passes while one lowers the $/hour and time is left: an exchange changes the
    # slack and the room that the next pass can use.
    for _pass in range(10):
        before = stage_values(form, stages, form.hint(placed.values()))[-1]
        placed = exchange_services(index, placed, gains, slack, resolution, deadline)
        values = stage_values(form, [stages[j] for j in early], form.hint(placed.values()))
        slack = [v - floors[j] for v, j in zip(values, early, strict=True)]
        after = stage_values(form, stages, form.hint(placed.values()))[-1]
        if (
            any(s < 0 for s in slack)
            or after <= before + 1e-9 * max(1.0, abs(before))
            or clock.now() > deadline
        ):
            break
    return placed
