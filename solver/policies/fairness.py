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

from solver.formulation import Formulation, Terms
from solver.linear import Sense, Var
from solver.model import PlanOptions
from solver.policies.base import Levels, OptimizingPolicy, Stage, tier_stages

__all__ = ["FairnessPolicy"]


class FairnessPolicy(OptimizingPolicy):
    name = "fairness"
    polish = "minimum"
    description = "max-min weighted normalized throughput (Gavel), then throughput"

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
