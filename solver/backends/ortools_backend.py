"""OR-Tools: CP-SAT (``ortools``) or HiGHS through MathOpt (``highs``) for the
integer model, GLOP for the LP relaxation.

HiGHS solves the aggregated model as the MIP it is (continuous variables stay
continuous, coefficients as they are) and finds good solutions at its root
(heuristics, sub-MIPs) where CP-SAT, which must scale rows to integers and
branch from the hint, found none better than LP rounding: measured on the
``slow_fleet`` family at 1,000 nodes (6,510 variables), the primary stage went
from 775.9 (CP-SAT, 7.2 s) to 866.0 in 7.1 s against a bound of 866.7.

CP-SAT needs integer coefficients and integer variables. A continuous variable
``x`` with resolution ``r`` becomes an integer ``X = round(x * r)``; each
constraint row is multiplied by the smallest power of ten that makes its
coefficients integral (up to 10**6, then rounded). The objective may keep
float coefficients (CP-SAT supports a floating-point objective).
"""

from __future__ import annotations

import math
import time
from typing import Any

from solver import clock
from solver.errors import SolverError
from solver.linear import LinearModel, Sense, Solution, SolveStatus

__all__ = ["HighsBackend", "OrToolsBackend"]


def _row_scale(coefs: list[float], rhs: float) -> int:
    for power in range(7):
        factor: int = 10**power
        if all(abs(c * factor - round(c * factor)) <= 1e-9 * max(1.0, abs(c * factor)) for c in coefs):
            return factor
    return 10**6


# Measured over 69 HiGHS solves of the pipeline on 8 instance families (small and
# 1k, three policies): its root took 0.01 to 1.3 LP iterations per unit of the
# model's size (rows + nonzeros), half of them at most 0.06; each branch-and-bound
# node after it about 120.
HIGHS_ROOT_ITERATIONS_PER_SIZE = 0.06
HIGHS_ITERATIONS_PER_NODE = 120


def highs_work(size: int, iterations: int, nodes: int) -> float:
    """What a HiGHS solve of a model of ``size`` took, in work seconds: its LP
    iterations (each grows with the size), its nodes (each copies and updates the
    model's state) and the solve's own start (MathOpt, presolve)."""
    return (
        clock.HIGHS_PER_SOLVE
        + size * clock.HIGHS_PER_SOLVE_NONZERO
        + iterations * size * clock.HIGHS_PER_ITERATION_NONZERO
        + nodes * size * clock.HIGHS_PER_NODE_NONZERO
    )


def highs_root_work(size: int) -> float:
    """What HiGHS' root on a model of ``size`` usually takes, in work seconds (its
    iterations grow with the rows, each with the nonzeros). A root may take many
    times more (1.3 iterations per unit of size at worst above): it is charged as
    it ran, and the wall-clock cap is what stops an extreme one."""
    return highs_work(size, int(HIGHS_ROOT_ITERATIONS_PER_SIZE * size), 1)


def _size(model: LinearModel) -> int:
    """Rows plus nonzeros: what one simplex iteration's work grows with."""
    return len(model.constraints) + sum(len(c.terms) for c in model.constraints)


class OrToolsBackend:
    name = "ortools"

    def mip_worth_starting(self, model: LinearModel, seconds: float) -> bool:
        """Whether a MIP solve of ``model`` can gain anything in ``seconds`` of work.
        CP-SAT needs its presolve before it can improve anything (measured: about 0.4 s
        for 5k variables, over 1 s for 25k), then time to search; above 15,000
        variables it never improved on LP rounding within 20 s (the 10k-workload /
        4k-node benchmark, 27k variables)."""
        nvars = len(model.vars)
        return nvars <= 15_000 and seconds > 0.3 + 3e-4 * nvars

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
        from ortools.sat.python import cp_model

        start = time.perf_counter()
        cp = cp_model.CpModel()
        scale = [1 if v.integer else v.resolution for v in model.vars]
        xs = [
            cp.new_int_var(0, 0, v.name)
            if v.index in fixed_zero
            else cp.new_int_var(math.ceil(v.lb * s - 1e-9), math.floor(v.ub * s + 1e-9), v.name)
            for v, s in zip(model.vars, scale, strict=True)
        ]
        for c in model.constraints:
            if not c.terms:
                ok = {Sense.LE: c.rhs + 1e-9 >= 0, Sense.GE: c.rhs - 1e-9 <= 0, Sense.EQ: abs(c.rhs) <= 1e-9}
                if not ok[c.sense]:
                    return Solution(SolveStatus.INFEASIBLE, (), 0.0, 0.0, time.perf_counter() - start)
                continue
            idx = list(c.terms)
            coefs = [c.terms[i] / scale[i] for i in idx]
            factor = _row_scale(coefs, c.rhs)
            int_coefs = [round(a * factor) for a in coefs]
            expr = cp_model.LinearExpr.weighted_sum([xs[i] for i in idx], int_coefs)
            rhs = c.rhs * factor
            if c.sense is Sense.LE:
                cp.add(expr <= math.floor(rhs + 1e-6))
            elif c.sense is Sense.GE:
                cp.add(expr >= math.ceil(rhs - 1e-6))
            else:
                cp.add(expr == round(rhs))
        obj_idx = list(model.objective)
        cp.maximize(
            cp_model.LinearExpr.weighted_sum(
                [xs[i] for i in obj_idx], [model.objective[i] / scale[i] for i in obj_idx]
            )
        )
        if hint is not None:
            for i, (x, value, s) in enumerate(zip(xs, hint, scale, strict=True)):
                cp.add_hint(x, 0 if i in fixed_zero else round(value * s))
        solver = cp_model.CpSolver()
        # The budget is work (solver.clock): building the model counts, and CP-SAT
        # stops on its own deterministic time; wall time only as the plan's safety cap.
        size = _size(model)
        clock.charge(clock.MODEL_PER_NONZERO * size)
        solver.parameters.max_deterministic_time = max(0.01, time_limit_s - clock.MODEL_PER_NONZERO * size)
        solver.parameters.max_time_in_seconds = clock.current().solver_wall_s()
        solver.parameters.random_seed = seed
        solver.parameters.relative_gap_limit = relative_gap
        solver.parameters.absolute_gap_limit = 1e-7
        solver.parameters.num_workers = max(1, num_workers)
        status = solver.solve(cp)
        clock.charge(solver.response_proto.deterministic_time)
        if status not in (cp_model.OPTIMAL, cp_model.INFEASIBLE) and (
            solver.wall_time >= 0.99 * solver.parameters.max_time_in_seconds
        ):
            clock.current().stopped_by_wall()
        wall = time.perf_counter() - start
        if status == cp_model.MODEL_INVALID:
            raise SolverError(f"CP-SAT rejected the model: {cp.validate()}")
        if status == cp_model.INFEASIBLE:
            return Solution(SolveStatus.INFEASIBLE, (), 0.0, 0.0, wall)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return Solution(SolveStatus.UNKNOWN, (), 0.0, math.inf, wall)
        values = tuple(solver.value(x) / s for x, s in zip(xs, scale, strict=True))
        objective = model.objective_value(values)
        bound = solver.best_objective_bound + model.objective_constant
        if status == cp_model.OPTIMAL:
            # Proven within the gap limits: the bound is no further than they allow
            # (CP-SAT can report its trivial bound with a floating-point objective).
            slack = max(relative_gap * abs(objective), solver.parameters.absolute_gap_limit)
            bound = min(bound, objective + slack)
        st = SolveStatus.OPTIMAL if status == cp_model.OPTIMAL else SolveStatus.FEASIBLE
        return Solution(st, values, objective, max(bound, objective), wall)

    def __init__(self) -> None:
        # One GLOP model per LinearModel, kept warm across solves: a later solve
        # adds only the rows appended since (stage floors) and swaps the objective.
        self._lp: tuple[int, Any, list[Any], list[Any]] | None = None
        self._lp_fixed: frozenset[int] = frozenset()
        self._lp_size = 0  # rows + nonzeros of the rows loaded so far (see _size)

    def solve_lp(
        self, model: LinearModel, *, time_limit_s: float, fixed_zero: frozenset[int] = frozenset()
    ) -> Solution:
        from ortools.linear_solver import pywraplp

        start = time.perf_counter()
        cached = self._lp
        if cached is None or cached[0] != id(model) or len(cached[2]) != len(model.vars):
            lp = pywraplp.Solver.CreateSolver("GLOP")
            if lp is None:  # pragma: no cover - GLOP ships with every OR-Tools wheel
                raise SolverError("GLOP is not available")
            xs: list[Any] = [lp.NumVar(v.lb, v.ub, v.name) for v in model.vars]
            rows: list[Any] = []
            self._lp = cached = (id(model), lp, xs, rows)
            self._lp_fixed = frozenset()
            self._lp_size = 0
        _, lp, xs, rows = cached
        for i in self._lp_fixed - fixed_zero:
            xs[i].SetBounds(model.vars[i].lb, model.vars[i].ub)
        for i in fixed_zero - self._lp_fixed:
            xs[i].SetBounds(0.0, 0.0)
        self._lp_fixed = fixed_zero
        added = model.constraints[len(rows) :]
        added_size = sum(len(c.terms) + 1 for c in added)
        self._lp_size += added_size
        clock.charge(clock.MODEL_PER_NONZERO * added_size)
        for c in added:
            lo = c.rhs if c.sense in (Sense.GE, Sense.EQ) else -lp.infinity()
            hi = c.rhs if c.sense in (Sense.LE, Sense.EQ) else lp.infinity()
            row = lp.RowConstraint(lo, hi, c.name)
            for i, a in c.terms.items():
                row.SetCoefficient(xs[i], a)
            rows.append(row)
        # GLOP stops on its own deterministic time (the budget is work: solver.clock);
        # wall time only as the plan's safety cap. Its presolve costs more than it
        # saves on these models once a stage holds many variables at 0 (measured at
        # 10k x 4k: 2.9 s -> 0.56 s).
        budget = min(max(0.001, time_limit_s), 1e6)
        lp.SetSolverSpecificParametersAsString(
            f"use_preprocessing: false max_deterministic_time: {budget:.6g}"
        )
        lp.SetTimeLimit(max(10, int(min(clock.current().wall_left(), 1e6) * 1000)))
        objective = lp.Objective()
        objective.Clear()
        for i, a in model.objective.items():
            objective.SetCoefficient(xs[i], a)
        objective.SetMaximization()
        status = lp.Solve()
        size = self._lp_size
        clock.charge(
            clock.LP_PER_SOLVE_NONZERO * size
            + min(budget, clock.GLOP_PER_ITERATION * lp.iterations() * size**clock.GLOP_SIZE_POWER)
        )
        wall = time.perf_counter() - start
        if status == pywraplp.Solver.INFEASIBLE:
            return Solution(SolveStatus.INFEASIBLE, (), 0.0, 0.0, wall)
        if status != pywraplp.Solver.OPTIMAL:
            return Solution(SolveStatus.UNKNOWN, (), 0.0, math.inf, wall)
        values = tuple(x.solution_value() for x in xs)
        value = objective.Value() + model.objective_constant
        duals = {c.name: row.dual_value() for c, row in zip(model.constraints, rows, strict=True)}
        return Solution(SolveStatus.OPTIMAL, values, value, value, wall, duals)


class HighsBackend(OrToolsBackend):
    """HiGHS (bundled with OR-Tools, through MathOpt) for the integer model; GLOP for
    the LP, as :class:`OrToolsBackend`."""

    name = "highs"

    def mip_worth_starting(self, model: LinearModel, seconds: float) -> bool:
        """Whether ``seconds`` of work pay for HiGHS' root (presolve, root LP, cuts,
        heuristics), which always runs whole: see :func:`highs_root_work`."""
        return seconds > highs_root_work(_size(model))

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
        import datetime

        from ortools.math_opt.python import mathopt
        from ortools.math_opt.solvers import highs_pb2

        start = time.perf_counter()
        m = mathopt.Model(name="apportion")
        xs = [
            m.add_variable(
                lb=0.0 if v.index in fixed_zero else v.lb,
                ub=0.0 if v.index in fixed_zero else v.ub,
                is_integer=v.integer,
                name=v.name,
            )
            for v in model.vars
        ]
        for c in model.constraints:
            lo = c.rhs if c.sense in (Sense.GE, Sense.EQ) else -math.inf
            hi = c.rhs if c.sense in (Sense.LE, Sense.EQ) else math.inf
            m.add_linear_constraint(
                lb=lo, ub=hi, expr=mathopt.LinearSum(a * xs[i] for i, a in c.terms.items()), name=c.name
            )
        m.maximize(mathopt.LinearSum(a * xs[i] for i, a in model.objective.items()))
        # The budget is work (solver.clock). HiGHS has no deterministic time: it stops
        # after the branch-and-bound nodes that the budget pays for once its root is
        # paid (highs_root_work), and is charged afterwards by the LP iterations it
        # made. No restarts: they repeat the root (measured on slow_fleet at 1k: the
        # root took 14.7k iterations and 8.5 s with them, 8.3k and 4.2 s without, for
        # the same solution). Wall time only as the plan's safety cap.
        size = _size(model)
        clock.charge(clock.MODEL_PER_NONZERO * size)
        per_node = highs_work(size, HIGHS_ITERATIONS_PER_NODE, 1) - highs_work(size, 0, 0)
        left = time_limit_s - clock.MODEL_PER_NONZERO * size - highs_root_work(size)
        nodes = max(1, int(min(10**9, left / per_node)))
        # MathOpt's HiGHS takes no thread count (its MIP search runs on one thread).
        params = mathopt.SolveParameters(
            time_limit=datetime.timedelta(seconds=clock.current().solver_wall_s()),
            node_limit=nodes,
            random_seed=seed,
            relative_gap_tolerance=relative_gap,
            absolute_gap_tolerance=1e-7,
            highs=highs_pb2.HighsOptionsProto(
                bool_options={"mip_detect_symmetry": False, "mip_allow_restart": False}
            ),
        )
        model_params = None
        if hint is not None:
            start_values = {
                x: 0.0 if i in fixed_zero else h for i, (x, h) in enumerate(zip(xs, hint, strict=True))
            }
            model_params = mathopt.ModelSolveParameters(
                solution_hints=[mathopt.SolutionHint(variable_values=start_values)]
            )
        result = mathopt.solve(m, mathopt.SolverType.HIGHS, params=params, model_params=model_params)
        stats = result.solve_stats
        clock.charge(highs_work(size, stats.simplex_iterations, stats.node_count))
        if result.termination.limit == mathopt.Limit.TIME:
            clock.current().stopped_by_wall()
        wall = time.perf_counter() - start
        reason = result.termination.reason
        if reason in (
            mathopt.TerminationReason.INFEASIBLE,
            mathopt.TerminationReason.INFEASIBLE_OR_UNBOUNDED,
        ):
            return Solution(SolveStatus.INFEASIBLE, (), 0.0, 0.0, wall)
        if not result.has_primal_feasible_solution():
            return Solution(SolveStatus.UNKNOWN, (), 0.0, math.inf, wall)
        found = result.variable_values()
        values = tuple(
            float(round(found[x])) if v.integer else float(found[x])
            for x, v in zip(xs, model.vars, strict=True)
        )
        objective = model.objective_value(values)
        bound = result.termination.objective_bounds.dual_bound + model.objective_constant
        if not math.isfinite(bound):
            bound = math.inf
        status = SolveStatus.OPTIMAL if reason == mathopt.TerminationReason.OPTIMAL else SolveStatus.FEASIBLE
        return Solution(status, values, objective, max(bound, objective), wall)
