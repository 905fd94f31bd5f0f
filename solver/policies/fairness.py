"""``fairness``: heterogeneity-aware max-min fairness, as Gavel defines it.

Gavel maximizes min_j rho_j / w_j, where rho_j is job j's throughput on its
allocation normalized by its best throughput. Gavel's allocation is a fraction
of time on each type (an LP); Apportion plans whole GPUs, so:

1. coverage of every tier first (as many workloads run as can);
2. primary: maximize t subject to t <= rho_o / w_j for every option o that any
   member of class j runs as (t <= f_i / w_i for services), minus the
   migration penalty;
3. tie-break: the throughput objective with t kept.

Strict priority holds inside stage 2 too: besides every tier's coverage floor,
the Σ w of the training jobs that the coverage stages run in each tier but the
lowest is kept (``solver.levels.job_floors``). A tier's coverage counts its
services' served demand as well, so under its floor alone the max-min could
leave out a higher tier's jobs whose options are slow, make up the coverage
with its services, and give the GPUs to lower tiers' jobs: a higher-priority
workload left out so that lower ones run better, which the verifier's
strict-priority rule rejects wherever lower-priority work holds room the job
fits in (at 10k: the bound 0.1625 needed 31 such top-tier jobs out; every plan
that tried failed verification). The bound is of the problem with that rule.

Gavel's LP optimum bounds stage 2 from above when every job fits; the
benchmark reports both.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from solver import clock
from solver.backends import get_backend
from solver.exchange import raise_minimum
from solver.formulation import Formulation, Terms
from solver.levels import job_floors, level_plan
from solver.linear import Sense, Var
from solver.model import Placement, PlanOptions
from solver.policies.base import Levels, OptimizingPolicy, Stage, stage_values, tier_floors, tier_stages

if TYPE_CHECKING:
    from solver.search import Search

__all__ = ["FairnessPolicy"]


class FairnessPolicy(OptimizingPolicy):
    name = "fairness"
    replans = True
    description = "max-min weighted normalized throughput (Gavel), then throughput"

    def improve(
        self, search: Search, placed: dict[str, Placement], until: float
    ) -> tuple[dict[str, Placement], dict[str, Placement] | None]:
        """Where the plan is not proven: the level plan (``solver.levels``), then the
        workloads at the minimum raised (``solver.exchange``). Either may meet the
        verifier's strict-priority rule differently from the search: the plan
        before them is the fallback."""
        form, stages, options = search.form, search.stages, search.options
        fallback: dict[str, Placement] | None = None
        primary_value = stage_values(form, stages, form.hint(placed.values()))[search.primary_index]
        bound = search.bound
        if bound is None or bound - primary_value > max(options.relative_gap * abs(bound), 1e-6):
            # The plan's own tiers' jobs where it runs more of them than the bound
            # assumed (repair, completion): fewer would fail the verifier's rule.
            now_jobs = job_floors(search.index, placed)
            tiers = now_jobs.keys() | search.kept_jobs.keys()
            least_jobs = {t: max(now_jobs.get(t, 0.0), search.kept_jobs.get(t, 0.0)) for t in tiers}
            leveled = _level_plan(form, stages, search.floors, placed, until, options, least_jobs)
            if leveled is not placed:
                fallback, placed = placed, leveled
        # The level plan may leave services at the minimum that this search lifts (at
        # 10k: 0.048 -> 0.119 in 0.3-0.4 s): it gets at least 3% of the budget. It may
        # move lower-priority work into room a left-out job of a higher tier could
        # use, which the verifier's strict-priority rule rejects (found on zonal at
        # 1k, work limit 2.5): the plan before it is the fallback then.
        if fallback is None:
            fallback = placed
        placed = raise_minimum(search.index, placed, max(until, clock.now() + 0.03 * search.work_limit))
        return placed, fallback

    def stages(self, form: Formulation, options: PlanOptions) -> list[Stage]:
        stages = tier_stages(form, include_lowest=True)
        model = form.model
        weights = [c.weight for c in form.index.classes]
        big = 1.0 / min(weights) if weights else 1.0
        t = form.level = model.num_var(0, big, "t", resolution=10_000)
        running: list[tuple[Var, float]] = []  # t is 0 unless something runs
        used: dict[tuple[int, int], Var] = {}
        for c in form.index.classes:
            if c.is_training:
                for o, opt in enumerate(c.options):
                    n = form.n[c.index, o]
                    u = model.bool_var(f"u[{c.index},{o}]")
                    used[c.index, o] = u
                    model.add([(n, 1.0), (u, -float(c.count))], Sense.LE, 0, f"used[{c.index},{o}]")
                    model.add(
                        [(t, 1.0), (u, big)], Sense.LE, opt.value / c.weight + big, f"min[{c.index},{o}]"
                    )
                    running.append((u, -big))
            elif c.index in form.f:
                y, f = form.y[c.index], form.f[c.index]
                model.add([(t, 1.0), (y, big), (f, -1.0 / c.weight)], Sense.LE, big, f"min[{c.index}]")
                running.append((y, -big))
        model.add([(t, 1.0), *running], Sense.LE, 0, "t-needs-work")

        def fill(values: dict[int, float]) -> None:
            """t and the u indicators for a hint made from a concrete plan."""
            low = big
            anything = False
            for (ci, o), u in used.items():
                n = values.get(form.n[ci, o].index, 0.0)
                values[u.index] = 1.0 if n > 0.5 else 0.0
                if n > 0.5:
                    c = form.index.classes[ci]
                    low, anything = min(low, c.options[o].value / c.weight), True
            for c in form.index.classes:
                if c.index in form.y and values.get(form.y[c.index].index, 0.0) > 0.5:
                    low = min(low, values.get(form.f[c.index].index, 0.0) / c.weight)
                    anything = True
            values[t.index] = math.floor((low if anything else 0.0) * t.resolution) / t.resolution

        form.derived.append(fill)
        moves, constant = form.moves(options.migration_penalty)
        primary: Terms = [(t, 1.0), *moves]
        stages.append(Stage("max-min", primary, constant, primary=True))
        tmoves, tconst = form.moves(options.migration_penalty)
        stages.append(Stage("throughput tie-break", form.throughput() + tmoves, tconst))
        return stages

    def levels(self, form: Formulation) -> Levels | None:
        """A plan whose minimum is >= tau runs no training option of rho / w < tau,
        and no service of 1 / w < tau (its f / w is at most 1 / w): their count,
        replica, type and served-fraction variables are then 0.

        The minimum itself (as the verifier scores it) is 0 (nothing runs), some
        option's rho / w, or a service's min(1, k rps_t / target) / w for k replicas
        of type t: finitely many values, so below(tau) is the largest of them < tau.
        """
        if form.level is None:
            return None
        holds: list[tuple[float, list[int]]] = []
        training: list[float] = [0.0]
        services: list[tuple[float, float, list[float]]] = []  # (weight, target, rps per type)
        for c in form.index.classes:
            if c.is_training:
                for o, opt in enumerate(c.options):
                    holds.append((opt.value / c.weight, [form.n[c.index, o].index]))
                    training.append(opt.value / c.weight)
            elif c.index in form.y:
                held = [form.y[c.index].index, form.f[c.index].index]
                held += [form.n[c.index, o].index for o in range(len(c.options))]
                held += [v.index for (ci, _t), v in form.z.items() if ci == c.index]
                holds.append((1.0 / c.weight, held))
                spec = c.members[0].inference
                assert spec is not None
                services.append((c.weight, spec.target_rps, sorted({opt.value for opt in c.options})))
        training.sort()

        def below(tau: float) -> float:
            i = bisect.bisect_left(training, tau) - 1
            best = training[i] if i >= 0 else 0.0
            for w, target, rates in services:
                if 1.0 / w < tau:
                    best = max(best, 1.0 / w)
                for rps in rates:
                    # the most replicas k with min(1, k rps / target) / w < tau
                    k = math.ceil(tau * w * target / rps) - 1
                    while k >= 1 and min(1.0, k * rps / target) / w >= tau:
                        k -= 1
                    if k >= 1:
                        best = max(best, min(1.0, k * rps / target) / w)
            return best

        return Levels(form.level, holds, below)


def _level_plan(
    form: Formulation,
    stages: list[Stage],
    floors: list[float],
    placed: dict[str, Placement],
    deadline: float,
    options: PlanOptions,
    kept_jobs: Mapping[int, float],
) -> dict[str, Placement]:
    """``solver.levels.level_plan`` on the plan, kept if it raises the primary stage
    and keeps every floor, and ``kept_jobs`` (else ``placed`` itself is returned).
    A different set of jobs could meet the verifier's strict-priority rule
    differently: the caller keeps ``placed`` to fall back on if the final plan
    fails verification."""
    index = form.index
    candidate = level_plan(
        index, placed, tier_floors(stages, floors), 1000, get_backend(options.backend), deadline, kept_jobs
    )
    if candidate is None:
        return placed
    old = stage_values(form, stages, form.hint(placed.values()))
    new = stage_values(form, stages, form.hint(candidate.values()))
    primary = next(i for i, x in enumerate(stages) if x.primary)
    if new[primary] <= old[primary] + 1e-9 * max(1.0, abs(old[primary])):
        return placed
    if any(new[j] < f - 1e-9 * max(1.0, abs(f)) for j, f in enumerate(floors) if j < primary):
        return placed
    return candidate
