"""The lexicographic search: a policy's stages solved one after another on the
aggregated model, each step improving a concrete incumbent plan.

The incumbent starts as the better greedy seed and is always a concrete plan
on the nodes (the aggregated model may be a relaxation). For each stage,
:meth:`Search.solve_stage` runs these steps, each a method:

1. ``_skipped``  an early stage past its share of the budget keeps the
                 incumbent's value as its floor (refilled first); one whose
                 incumbent reaches the stage's trivial bound needs no solve
2. ``_lp``       the LP relaxation: the stage's bound (the primary stage's is
                 the plan's bound, with the shadow prices)
3. ``_levels``   for a max-min stage: its bound by bisection on the level, and
                 a rounding guided by the highest level proven feasible
4. ``_round``    the LP solution rounded, packed and completed (``rounded``);
                 for a tier's coverage, the lower tiers placed again
5. ``_mip``      the aggregated MIP, hinted with the incumbent, while the stage
                 is not proven and the work left pays for the solver's start
6. ``_close``    the value reached becomes a floor for the stages after it

Work, not wall time, decides every "is there budget left?" (``solver.clock``):
the early stages share at most 60% of the search's budget, the primary stage
gets the rest.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

from solver import clock
from solver.aggregate import Index
from solver.backends import Backend, get_backend
from solver.candidates import Candidate, Packer
from solver.errors import SolverError
from solver.exchange import raise_minimum
from solver.formulation import Formulation, option_values, round_down
from solver.greedy import improve
from solver.levels import bisect_levels, job_floors, type_level_model
from solver.linear import LinearModel, Solution, SolveStatus
from solver.model import Placement, PlanOptions
from solver.policies import OptimizingPolicy
from solver.policies.base import Levels, Stage, stage_values, tier_floors, upper

__all__ = ["Search", "level_bound"]


def _level_rest(form: Formulation, st: Stage, level: Levels) -> float:
    """The most a max-min stage's other terms (the migration penalty) add to its
    level over their variables' bounds."""
    model = form.model
    return st.constant + sum(
        a * (model.vars[v.index].ub if a > 0 else model.vars[v.index].lb)
        for v, a in st.terms
        if v.index != level.var.index
    )


def level_bound(
    model: LinearModel,
    backend: Backend,
    holds: list[tuple[float, list[int]]],
    below_value: Callable[[float], float],
    rest: float,
    fixed: frozenset[int],
    current: float,
    cap: float,
    end: float,
) -> tuple[float | None, frozenset[int] | None]:
    """A bound on a max-min stage by bisection on its level (``OptimizingPolicy.levels``).

    ``holds`` pairs values v with the variables of ``model`` that a plan whose
    minimum is >= tau must hold at 0 for every tau > v (what runs at a value below
    the minimum). So if the LP relaxation ``model`` (the aggregated model, or a
    relaxation of it: ``solver.levels.type_level_model``) with every variable of
    value < tau held at 0 (and ``fixed``) is infeasible, no integer plan has a
    minimum >= tau, and its minimum is at most ``below_value(tau)``, the largest
    value a minimum can take below tau. Feasibility is monotone in tau (a larger
    tau holds more at 0), so a bisection over the distinct v finds the smallest
    tau proven infeasible; the bound is below_value(tau) plus ``rest``, the most
    the stage's other terms (the migration penalty) can add. Only INFEASIBLE
    answers are used: an LP that runs out of work proves nothing. ``current``
    (the incumbent's stage value) and ``cap`` (a bound already proven) only
    narrow the search. Returns the bound (None if nothing was proven in time) and
    the variables held at 0 for the largest tau found feasible above the
    incumbent (None if none was), which guides a rounding.
    """
    values = sorted({v for v, _ in holds})
    by_value = sorted(holds, key=lambda x: x[0])
    lo = bisect.bisect_right(values, current - rest + 1e-12) - 1  # the incumbent runs at this level
    top = bisect.bisect_right(values, cap - rest + 1e-12)  # values above the bound are not tried

    def held_below(i: int) -> frozenset[int]:
        held = set(fixed)
        for v, vs in by_value:
            if v >= values[i]:
                break
            held.update(vs)
        return frozenset(held)

    def infeasible(i: int) -> bool | None:
        left = end - clock.now()
        if left <= 0.05:
            return None
        # Feasibility only: no objective (phase one of the simplex is all it needs).
        objective, constant = model.objective, model.objective_constant
        model.objective = {}
        try:
            sol = backend.solve_lp(model, time_limit_s=left, fixed_zero=held_below(i))
        finally:
            model.objective, model.objective_constant = objective, constant
        if sol.status is SolveStatus.INFEASIBLE:
            return True
        return False if sol.status is SolveStatus.OPTIMAL else None

    if lo + 1 >= top:
        return None, None
    start = lo
    if cap - rest <= (current - rest) * 1.05 + 1e-9:
        # The incumbent is close to the bound: try the value just above it first
        # (one LP, and often the proof that the incumbent is optimal).
        answer = infeasible(lo + 1)
        if answer is None:
            return None, None
        if answer:
            return below_value(values[lo + 1]) + rest, None
        lo += 1
    lo, hi = bisect_levels(lo, top, lambda i: None if (a := infeasible(i)) is None else not a)
    bound = below_value(values[hi]) + rest if hi < top else None
    return bound, held_below(lo) if lo > start else None


# The share of the wall time left that an early stage's MIP may take (a safety
# net: the work budget stops it first wherever its work is counted well).
EARLY_SOLVER_WALL_SHARE = 0.5


class _Stage:
    """What one stage's steps share: its index, definition, budget and LP."""

    def __init__(self, k: int, st: Stage, fixed: frozenset[int], end: float, early_left: int) -> None:
        self.k = k
        self.st = st
        self.fixed = fixed  # variables held at 0 (classes no objective so far can use)
        self.end = end  # the work by which the stage's steps should be done
        self.start = clock.now()
        self.early_left = early_left  # early stages from this one on
        self.lp: Solution | None = None
        self.lp_bound = math.inf
        self.mip: Solution | None = None
        self.tol = 0.0  # what counts as better than the incumbent's value at the stage's start


class Search:
    """The search's state: the incumbent (a concrete plan) and its variable values,
    the floors set so far, the primary stage's bound and duals, and what it is
    running in (the formulation, the policy, the budget)."""

    def __init__(
        self,
        form: Formulation,
        pol: OptimizingPolicy,
        stages: list[Stage],
        seed: dict[str, Placement],
        hint: dict[int, float],
        options: PlanOptions,
        stage_timer: Callable[[str], AbstractContextManager[None]],
        work_limit: float,
        deadline: float,
    ) -> None:
        self.form = form
        self.index: Index = form.index
        self.pol = pol
        self.stages = stages
        self.options = options
        self.timed = stage_timer
        self.backend = get_backend(options.backend)
        self.work_limit = work_limit
        self.deadline = deadline
        self.seed = seed
        self.packer = Packer(form, pol.prefer, options.max_migrations)
        self.incumbent: dict[str, Placement] | None = dict(seed)  # concrete plan behind ``values``
        self.values: dict[int, float] = dict(hint)
        self.floors: list[float] = []  # floor of each stage solved so far
        self.unproven: list[str] = []  # earlier stages whose optimum is not proven
        self.bound: float | None = None
        self.duals: Mapping[str, float] = {}
        self.kept_jobs: dict[int, float] = {}  # fairness: the least Σ w of each tier's jobs
        self._nvars = len(form.model.vars)
        # Hard rows a packed candidate can break although the LP or a MIP solution held them.
        self._guarded = [
            c for c in form.model.constraints if c.name == "migrations" or c.name.startswith("pin[")
        ]
        # Stages before the primary share at most 60% of the budget; the primary gets the rest.
        self.early_until = clock.now() + 0.6 * max(0.0, deadline - clock.now())
        self.primary_index = next((i for i, x in enumerate(stages) if x.primary), len(stages))
        self._objective_vars: set[int] = set()

    # -- the incumbent ----------------------------------------------------------------

    def vector(self, vals: Mapping[int, float]) -> tuple[float, ...]:
        return tuple(vals.get(i, 0.0) for i in range(self._nvars))

    def current(self) -> float:
        """The incumbent's value of the objective being solved."""
        return self.form.model.objective_value(self.vector(self.values))

    def _take(self, found: Candidate) -> None:
        self.incumbent, self.values = found

    def admissible(self, vals: Mapping[int, float]) -> bool:
        """Keeps the hard rows and the floors of the stages solved so far."""
        probe = LinearModel()
        probe.vars, probe.constraints = self.form.model.vars, self._guarded
        if probe.violations(self.vector(vals)):
            return False
        done = stage_values(self.form, self.stages[: len(self.floors)], vals)
        return all(v >= f - 1e-9 * max(1.0, abs(f)) for v, f in zip(done, self.floors, strict=True))

    def at_least(self, vals: Mapping[int, float], k: int, strictly: bool) -> bool:
        """Admissible, and at least as good as the incumbent on stage k (or better)."""
        if not self.admissible(vals):
            return False
        st = [self.stages[k]]
        new, old = stage_values(self.form, st, vals)[0], stage_values(self.form, st, self.values)[0]
        tol = 1e-9 * max(1.0, abs(old))
        return new > old + tol if strictly else new >= old - tol

    def gpu_prices(self) -> dict[str, float]:
        """What one more GPU of each type is worth to the primary stage: the largest
        dual of its shapes' GPU rows (0 where no LP told). The plan's shadow prices."""
        prices = {t: 0.0 for t in self.index.types}
        for name, si in self.form.gpu_rows.items():
            t = self.index.shapes[si].gpu_type
            prices[t] = max(prices[t], self.duals.get(name, 0.0))
        return prices

    # -- candidates -------------------------------------------------------------------

    def rounded(self, k: int, lp_values: tuple[float, ...], end: float, later: int) -> Candidate | None:
        """The LP solution of stage ``k`` rounded, packed and completed: the best of a
        few roundings that keeps the floors and beats the incumbent on stage ``k``
        (None if none does). Later roundings run only while work is left before
        ``end``; once one has succeeded, only while that leaves the ``later`` stages
        that share ``end`` the work for a rounding each."""
        form, index, pack = self.form, self.index, self.packer
        best: Candidate | None = None
        best_value = -math.inf

        def consider(found: Candidate) -> None:
            nonlocal best, best_value
            if self.at_least(found[1], k, strictly=True):
                value = stage_values(form, [self.stages[k]], found[1])[0]
                if value > best_value:
                    best, best_value = found, value

        # Services rounded to fit the GPUs of their type (rounded up they keep the
        # LP's demand but overflow a full cluster, and whole services are lost).
        counts = round_down(form, lp_values, services="fit")
        # Packing the rounded solution can lose a little of what earlier stages
        # protect: services' served fraction (to rounding and fragmentation), a
        # tier's jobs (the LP trades them for fractional service coverage under the
        # same floor). Where there are floors, first keep the incumbent's services
        # that those stages count, pack the rest and restore strict priority (else
        # pack the rest tier by tier); then the plain rounding, which may also
        # improve those services.
        incumbent = self.incumbent or {}
        floor_vars = {v.index for st_ in self.stages[:k] for v, _a in st_.terms}
        protected = {
            w
            for w in incumbent
            if any(v.index in floor_vars for v in form.class_vars(index.workload_class[w]))
        }
        services = {w: p for w, p in incumbent.items() if w in protected and index.workloads[w].inference}
        attempts: list[Callable[[], Candidate]] = [lambda: pack.concrete(counts)]
        if form.f:
            # Rounded down (leaves room to others), and up (where the packing happens to
            # find room for them all).
            attempts.append(lambda: pack.concrete(round_down(form, lp_values, services="down")))
            attempts.append(lambda: pack.concrete(round_down(form, lp_values, services="up")))
        if protected:
            attempts[:0] = [lambda: pack.restored(counts, services), lambda: pack.tiered(counts, services)]
        else:
            attempts.append(lambda: pack.tiered(counts, services))
        if form.f:
            # Services first, whole, where the LP split them over types (strict
            # priority: lower tiers' jobs give way), packed tier by tier.
            attempts.append(lambda: pack.tiered(round_down(form, lp_values, services="first"), {}))
        spent = 0.0
        for attempt in attempts:
            left = end - clock.now() - (later * 1.5 * spent if best is not None else 0.0)
            if spent and left < 1.5 * spent:
                break
            t0 = clock.now()
            consider(attempt())
            spent = max(spent, clock.now() - t0)
        if best is None and protected and end - clock.now() > 1.5 * spent:
            # Else keep all of their placements as they are, and round the rest.
            consider(pack.concrete(counts, {w: incumbent[w] for w in protected}))
        return best

    def refilled(self, k: int, st: Stage) -> Candidate | None:
        """For a tier's coverage stage: the incumbent with that tier's and lower tiers'
        jobs placed again smallest first, if that keeps the floors and covers more
        (None otherwise)."""
        if st.tier is None or self.incumbent is None:
            return None
        found = self.packer.refilled(self.incumbent, st.tier)
        return found if self.at_least(found[1], k, strictly=True) else None

    def _lifted(self, placed: Mapping[str, Placement], end: float) -> Candidate:
        """``placed`` improved, then its minimum raised (``solver.exchange``)."""
        lifted = raise_minimum(self.index, improve(self.index, dict(placed), self.pol.prefer, end), end)
        return lifted, self.form.hint(lifted.values())

    # -- the stages -------------------------------------------------------------------

    def run(self) -> None:
        for k, st in enumerate(self.stages):
            self.solve_stage(k, st)

    def solve_stage(self, k: int, st: Stage) -> None:
        form = self.form
        form.model.maximize(st.terms, st.constant)
        self._objective_vars.update(v.index for v, _a in st.terms)
        # Classes no objective so far can use are held at 0 (for a priority stage:
        # every lower tier), which keeps early models small.
        last = st.primary and k == len(self.stages) - 1
        fixed = frozenset() if last else form.idle_classes(self._objective_vars)
        early_left = sum(1 for x in self.stages[k:] if not x.primary)
        s = _Stage(k, st, fixed, self.deadline if st.primary else self.early_until, early_left)
        s.tol = 1e-9 * max(1.0, abs(self.current()))
        if self._skipped(s):
            return
        self._lp(s)
        if s.lp is not None and s.lp.status is SolveStatus.OPTIMAL:
            self._levels(s)
            self._round(s)
        self._mip(s)
        self._close(s)

    def _skipped(self, s: _Stage) -> bool:
        """An early stage that needs no solve (its floor set here), or False."""
        st, k = s.st, s.k
        if st.primary:
            return False
        if clock.now() >= self.early_until:
            # Out of budget for earlier stages: the incumbent's value is this stage's
            # floor. Its lower tiers were completed largest first (packs well); for a
            # tier's coverage, smallest first runs more of them (measured at 10k, on a
            # slow run where the lowest tier's stage found no time: 2,745 -> 5,574 of
            # its 6,673 jobs), so that is tried first (0.2 s there).
            found = self.refilled(k, st)
            if found is not None:
                self._take(found)
            self._set_floor(st, self.current())
            self.unproven.append(st.name)
            return True
        current = self.current()
        if current >= upper(self.form, st) - s.tol:
            # The incumbent already reaches this stage's trivial bound (e.g. every
            # workload of the tier runs): no solve needed.
            self._set_floor(st, current)
            return True
        return False

    def _set_floor(self, st: Stage, value: float) -> None:
        self.floors.append(
            self.form.set_floor(st.terms, st.constant, value, f"floor[{st.name}]", st.tolerance)
        )

    def _lp(self, s: _Stage) -> None:
        """The stage's LP relaxation: a bound, duals, and the values to round.

        Every stage rests on it (the primary's is the plan's bound and shadow prices),
        so it runs to its end whatever the budget (only the wall-clock cap stops it),
        and what it took comes off the budget of the steps after it. Cut by a budget,
        a stage lost its floor's proof and the primary its bound (measured on trtllm
        at 1k, `cost`, 5 s: the first coverage LP needed more than the 0.84 work
        seconds left to it, and the plan reported the trivial bound)."""
        st = s.st
        with self.timed("lp"):
            s.lp = self.backend.solve_lp(self.form.model, time_limit_s=math.inf, fixed_zero=s.fixed)
        if s.lp.status is SolveStatus.OPTIMAL:
            s.lp_bound = s.lp.objective
            if st.primary:
                self.bound, self.duals = s.lp.objective, s.lp.duals
                self.packer.gpu_value = self.gpu_prices()
            return
        if st.primary:
            # Every optimizing plan carries a bound: without the LP's (cut by the wall
            # clock on a large instance), the stage's trivial one, every variable at its
            # best bound (a solver's proven bound replaces it below when it is tighter).
            self.bound = upper(self.form, st)
        else:
            found = self.refilled(s.k, st)  # as where the stage found no budget
            if found is not None:
                self._take(found)

    def _levels(self, s: _Stage) -> None:
        """For a max-min primary stage (``OptimizingPolicy.levels``): its bound by
        bisection on the level, first on the type-level relaxation, then on the whole
        model, and a rounding guided by the highest level proven feasible."""
        st, k = s.st, s.k
        levels = self.pol.levels(self.form) if st.primary and self.bound is not None else None
        if not levels:
            return
        form, index = self.form, self.index
        if self.incumbent is not None and s.end - clock.now() > 0.1 * self.work_limit:
            # Raise the incumbent's minimum first: the bisection on the whole model
            # then starts from it (not worth its work where that bisection will not
            # run: at 10k it took 1.6 s and left the bisection none).
            with self.timed("round"):
                lifted = self._lifted(self.incumbent, s.end)
            if self.at_least(lifted[1], k, strictly=True):
                self._take(lifted)
        current = self.current()
        rest = _level_rest(form, st, levels)
        # First on the type-level relaxation (a small LP: about 1-2 s at 10k
        # workloads; it gets up to 10% of the budget past the stage's end, like
        # the primary LP), then on the whole model below what that proved.
        # Strict priority in the max-min: what the coverage stages run of every
        # tier's jobs but the lowest's stays (solver/levels.py, job_floors).
        self.kept_jobs = job_floors(index, self.incumbent or {})
        small, small_holds = type_level_model(index, tier_floors(self.stages, self.floors), self.kept_jobs)
        with self.timed("lp"):
            proven, _ = level_bound(
                small,
                get_backend(self.options.backend),
                small_holds,
                levels.below,
                rest,
                frozenset(),
                current,
                s.lp_bound,
                max(s.end, clock.now() + 0.1 * self.work_limit),
            )
        self._tighten(s, proven)
        with self.timed("lp"):
            proven, guide = level_bound(
                form.model,
                self.backend,
                levels.holds,
                levels.below,
                rest,
                s.fixed,
                current,
                s.lp_bound,
                s.end,
            )
        self._tighten(s, proven)
        if guide is not None and s.lp_bound > current + s.tol and k + 1 < len(self.stages):
            self._guided_round(s, guide)

    def _tighten(self, s: _Stage, proven: float | None) -> None:
        if proven is not None and self.bound is not None and proven < self.bound:
            self.bound = proven
            s.lp_bound = min(s.lp_bound, proven)

    def _guided_round(self, s: _Stage, guide: frozenset[int]) -> None:
        """A plan above the incumbent's level may exist: round the LP with everything
        below that level held at 0 (most throughput, the tie-break's objective), then
        raise its minimum."""
        st, k, form = s.st, s.k, self.form
        with self.timed("round"):
            after = self.stages[k + 1]
            form.model.maximize(after.terms, after.constant)
            guided = self.backend.solve_lp(
                form.model, time_limit_s=max(0.2, s.end - clock.now()), fixed_zero=guide
            )
            form.model.maximize(st.terms, st.constant)
            cand: dict[str, Placement] | None = None
            if guided.status is SolveStatus.OPTIMAL:
                cand, _ = self.packer.restored(round_down(form, guided.values, services="fit"), {})
        if cand is not None:
            with self.timed("round"):
                lifted = self._lifted(cand, s.end)
            if self.at_least(lifted[1], k, strictly=True):
                self._take(lifted)

    def _round(self, s: _Stage) -> None:
        """The LP rounded, and for a tier's coverage the lower tiers placed again.

        Rounding can only help where the LP leaves room above the incumbent. Once one
        rounding has succeeded, an early stage leaves the early stages still to come
        the work for theirs. (For a policy whose polish chooses the plan again, not
        past the stage's end: at 10k the rounding took 0.9 s that the polish needs.)"""
        st, k = s.st, s.k
        assert s.lp is not None
        current = self.current()
        late = st.primary and self.pol.replans and clock.now() >= s.end
        if s.lp_bound > current + s.tol and not late:
            with self.timed("round"):
                later = 0 if st.primary else max(0, self.primary_index - k - 1)
                found = self.rounded(k, s.lp.values, s.end, later)
            if found is not None:
                self._take(found)
                current = self.current()
        if st.tier is not None and s.lp_bound > current + s.tol:
            # A tier's coverage counts jobs: the incumbent with that tier's and lower
            # tiers' jobs placed again smallest first often runs more of them than
            # the rounding (slow_fleet at 1k, lowest tier: 695 -> 735 of the LP's
            # 741.4, in 0.02 s), which leaves the stage's MIP less to find.
            with self.timed("round"):
                found = self.refilled(k, st)
            if found is not None:
                self._take(found)

    def _mip(self, s: _Stage) -> None:
        """The aggregated MIP, hinted with the incumbent, while the stage is not proven.

        An early stage's search may use the early stages' work that is left, less
        what the early stages after it need for their LP and rounding (as much as this
        one's took, at least 0.2 s each): the MIP stops as soon as the stage is
        proven, and a coverage stage left short sets a floor that later stages cannot
        make up for (measured on slow_fleet at 1k: the lowest tier's coverage needed
        2.7 s of HiGHS to reach 741 from the rounding's 695; with an even share it got
        none, and the cost plan filled the rest greedily at twice the cost the bound
        allowed)."""
        st, k, form, options = s.st, s.k, self.form, self.options
        current = self.current()
        target = options.relative_gap if st.primary else 0.0
        gap = max(target * max(abs(s.lp_bound), 1e-9), 1e-9 * max(1.0, abs(current)))
        proven = s.lp_bound - current <= gap
        left = self.deadline - clock.now()
        later_need = (s.early_left - 1) * max(0.2, clock.now() - s.start)
        search_end = self.deadline if st.primary else max(clock.now(), self.early_until - later_need)
        search_left = search_end - clock.now()
        if proven or left <= 0.05 or not self.backend.mip_worth_starting(form.model, search_left):
            return
        later = len(self.stages) - k - 1
        budget = left / (later + 1) if st.primary and later else search_end - clock.now()
        # Where the work a solve took is far from its count (HiGHS' root), the wall
        # clock may stop it: an early stage's solve keeps half of what is left for
        # the stages after it, the primary stage's LP (its bound) first.
        clock.current().solver_share = 1.0 if st.primary else EARLY_SOLVER_WALL_SHARE
        with self.timed(f"solve: {st.name}"):
            sol = s.mip = self.backend.solve_mip(
                form.model,
                hint=self.vector(self.values),
                time_limit_s=max(0.05, budget),
                seed=options.seed,
                relative_gap=options.relative_gap if st.primary else max(options.relative_gap, 1e-3),
                num_workers=options.num_workers,
                fixed_zero=s.fixed,
            )
        clock.current().solver_share = 1.0
        if sol.status is SolveStatus.INFEASIBLE and k == 0 and not self.seed:
            raise SolverError(f"stage {st.name!r}: the model is infeasible (this is a bug; please report it)")
        # An infeasible later stage can only come from rounding a floor: keep the incumbent.
        if sol.has_values and form.model.objective_value(sol.values) > current + s.tol:
            # The aggregated model is a relaxation (sizes that do not divide the node
            # size): only the solution as packed on the nodes (and, for a stage that
            # ignores lower tiers, completed greedily) can replace the incumbent.
            with self.timed("complete"):
                filled = self.packer.concrete(option_values(form, sol.values))
            if self.at_least(filled[1], k, strictly=True):
                self._take(filled)
        if st.primary and sol.has_values and math.isfinite(sol.bound):
            self.bound = sol.bound if self.bound is None else min(self.bound, sol.bound)

    def _close(self, s: _Stage) -> None:
        """The value reached: the primary's bound is at least it; an early stage's
        becomes a floor (and unproven where below its bound)."""
        st = s.st
        achieved = self.current()
        if st.primary and self.bound is not None:
            self.bound = max(self.bound, achieved)
        if not st.primary:
            stage_bound = s.lp_bound
            if s.mip is not None and s.mip.has_values and math.isfinite(s.mip.bound):
                stage_bound = min(stage_bound, s.mip.bound)
            if achieved < stage_bound - 1e-6 * max(1.0, abs(stage_bound)):
                self.unproven.append(st.name)
        if s.k < len(self.stages) - 1:
            self._set_floor(st, achieved)
