"""pulp with its bundled CBC: the alternative backend for the same models.

CBC reports no best bound through pulp, so a MIP solved to optimality (within
the gap) reports its objective as the bound and otherwise an infinite bound;
the pipeline then takes the LP relaxation's bound.

CBC is driven with a wall-clock limit (pulp passes no deterministic one), and
the time it took is charged to the plan's work clock: plans with this backend
are not deterministic under load (use it to cross-check, not to reproduce).
"""

from __future__ import annotations

import math
import time

from solver import clock
from solver.backends.ortools_backend import OrToolsBackend
from solver.linear import LinearModel, Sense, Solution, SolveStatus

__all__ = ["PulpBackend"]


def _cbc(**options: object) -> object:
    """The CBC binary that ships inside the pulp wheel, driven as COIN_CMD
    (PULP_CBC_CMD, the old way to reach it, is deprecated in PuLP 3.3)."""
    import pulp
    from pulp.apis.coin_api import pulp_cbc_path

    return pulp.COIN_CMD(path=pulp_cbc_path, **options)


class PulpBackend:
    # The gating measured for CP-SAT, which CBC shared before backends said their own.
    mip_worth_starting = OrToolsBackend.mip_worth_starting
    name = "pulp"

    def _build(
        self, model: LinearModel, relax: bool, fixed_zero: frozenset[int] = frozenset()
    ) -> tuple[object, list[object], list[object]]:
        import pulp

        prob = pulp.LpProblem("apportion", pulp.LpMaximize)
        xs = [
            prob.add_variable(
                f"x{v.index}",
                lowBound=v.lb,
                upBound=0.0 if v.index in fixed_zero else v.ub,
                cat=pulp.LpInteger if (v.integer and not relax) else pulp.LpContinuous,
            )
            for v in model.vars
        ]
        prob += pulp.lpSum(a * xs[i] for i, a in model.objective.items()) + model.objective_constant
        rows = []
        for k, c in enumerate(model.constraints):
            expr = pulp.lpSum(a * xs[i] for i, a in c.terms.items())
            if c.sense is Sense.LE:
                row = expr <= c.rhs
            elif c.sense is Sense.GE:
                row = expr >= c.rhs
            else:
                row = expr == c.rhs
            prob += row, f"c{k}"
            rows.append(prob.get_constraint_by_name(f"c{k}"))
        return prob, xs, rows

    def solve_mip(
        self,
        model: LinearModel,
        *,
        hint: tuple[float, ...] | None,
        time_limit_s: float,
        seed: int,
        relative_gap: float,
        num_workers: int,
        fixed_zero: frozenset[int] = frozenset(),
    ) -> Solution:
        import pulp

        start = time.perf_counter()
        prob, xs, _ = self._build(model, relax=False, fixed_zero=fixed_zero)
        warm = hint is not None
        if hint is not None:
            for i, (x, value) in enumerate(zip(xs, hint, strict=True)):
                value = 0.0 if i in fixed_zero else value
                x.setInitialValue(round(value) if x.cat == pulp.LpInteger else value)  # type: ignore[attr-defined]
        cmd = _cbc(
            msg=False,
            timeLimit=max(1, math.ceil(min(time_limit_s, 1e6))),
            gapRel=relative_gap,
            warmStart=warm,
            threads=max(1, num_workers),
            options=[f"randomSeed {seed + 1}", f"randomCbcSeed {seed + 1}"],
        )
        prob.solve(cmd)  # type: ignore[attr-defined]
        wall = time.perf_counter() - start
        clock.charge(wall)  # CBC has no deterministic limit here: this backend is not deterministic
        status = prob.status  # type: ignore[attr-defined]
        sol_status = prob.sol_status  # type: ignore[attr-defined]
        if status == pulp.LpStatusInfeasible:
            return Solution(SolveStatus.INFEASIBLE, (), 0.0, 0.0, wall)
        values = tuple(float(x.value()) if x.value() is not None else 0.0 for x in xs)  # type: ignore[attr-defined]
        if sol_status == pulp.LpSolutionOptimal:
            obj = model.objective_value(values)
            return Solution(SolveStatus.OPTIMAL, values, obj, obj, wall)
        if sol_status in (pulp.LpSolutionIntegerFeasible,) and not model.violations(values, 1e-5):
            obj = model.objective_value(values)
            return Solution(SolveStatus.FEASIBLE, values, obj, math.inf, wall)
        return Solution(SolveStatus.UNKNOWN, (), 0.0, math.inf, wall)

    def solve_lp(
        self, model: LinearModel, *, time_limit_s: float, fixed_zero: frozenset[int] = frozenset()
    ) -> Solution:
        import pulp

        start = time.perf_counter()
        prob, xs, rows = self._build(model, relax=True, fixed_zero=fixed_zero)
        prob.solve(_cbc(msg=False, timeLimit=max(1, math.ceil(min(time_limit_s, 1e6)))))  # type: ignore[attr-defined]
        wall = time.perf_counter() - start
        clock.charge(wall)  # CBC has no deterministic limit here: this backend is not deterministic
        if prob.status != pulp.LpStatusOptimal:  # type: ignore[attr-defined]
            status = SolveStatus.INFEASIBLE if prob.status == pulp.LpStatusInfeasible else SolveStatus.UNKNOWN  # type: ignore[attr-defined]
            return Solution(status, (), 0.0, math.inf, wall)
        values = tuple(float(x.value() or 0.0) for x in xs)  # type: ignore[attr-defined]
        obj = model.objective_value(values)
        duals = {c.name: float(r.pi or 0.0) for c, r in zip(model.constraints, rows, strict=True)}  # type: ignore[attr-defined]
        return Solution(SolveStatus.OPTIMAL, values, obj, obj, wall, duals)
