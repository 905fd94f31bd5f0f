"""``plan(problem, policy, options) -> Plan``: the pipeline, each stage timed.

1. validate      every violation at once, by path (``solver.validate``)
2. aggregate     node shapes and workload classes (``solver.aggregate``)
3. greedy        two greedy seeds (largest-first, smallest-first); the better
                 one is the first incumbent and the floor on quality
4. model         the aggregated formulation and the policy's stages
5. per stage     ``lp``: the LP relaxation (one warm GLOP model; bound, and for
                 the primary stage the duals); ``round``: the LP solution rounded,
                 packed on nodes and completed greedily, kept if it beats the
                 incumbent and keeps the earlier stages' floors; ``solve: NAME``:
                 CP-SAT (or CBC) hinted with the incumbent, only while the stage is
                 not proven and the model is small enough to gain from it; then
                 the stage's value becomes a floor for the next
6. disaggregate  the incumbent is already a concrete plan (else: pack the counts)
7. repair        strict priority on concrete nodes, fill what is free, move jobs
                 that do not run yet to better options where room is free
8. verify        the independent checker recomputes feasibility and objective
9. explain       a reason for every unplaced workload and every shortfall

Incumbents are always concrete, verified-shaped plans: a solver solution of the
aggregated model (a relaxation where sizes do not divide node sizes) replaces
the incumbent only as packed. The plan returned is never worse than the greedy
seed on the policy's stages.

Bound and gap: ``best_bound`` is the smaller of the LP bound and CP-SAT's
bound on the primary stage, given the floors that earlier stages set (for
priority tiers and inference demand); ``gap`` compares it with the objective
of the verified concrete plan, so packing losses show in the gap. ``OPTIMAL``
needs the gap within ``relative_gap`` and every earlier stage proven and met.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from solver import clock
from solver.aggregate import Index, build_index, usable_training_types
from solver.backends import Backend, get_backend
from solver.disaggregate import disaggregate
from solver.errors import SolverError, ValidationError, Violation
from solver.exchange import exchange_services, raise_minimum
from solver.explain import Explainer
from solver.formulation import Formulation, build_formulation, option_values, round_down
from solver.greedy import complete, greedy_place, improve, repair_priority
from solver.levels import bisect_levels, job_floors, level_plan, type_level_model
from solver.linear import LinearModel, Solution, SolveStatus
from solver.model import (
    Placement,
    Plan,
    PlanOptions,
    PlanStatus,
    Problem,
    Reason,
    ReasonCode,
    Shortfall,
    Unplaced,
)
from solver.policies import HeuristicPolicy, OptimizingPolicy, get_policy
from solver.policies.base import Levels, Stage
from solver.reassign import reassign_services
from solver.validate import validate
from solver.verify import verify

__all__ = ["Explanation", "explain", "plan"]


class _Timer:
    def __init__(self, options: PlanOptions) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.progress = options.progress

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.progress is not None:
            self.progress(name, t0 - self.start)
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _stage_values(form: Formulation, stages: list[Stage], values: Mapping[int, float]) -> list[float]:
    return [sum(a * values.get(v.index, 0.0) for v, a in st.terms) + st.constant for st in stages]


def _upper(form: Formulation, st: Stage) -> float:
    """A trivial upper bound of a stage: every variable at its most favourable bound."""
    model = form.model
    total = st.constant
    for v, a in st.terms:
        var = model.vars[v.index]
        total += a * (var.ub if a > 0 else var.lb)
    return total


def _level_rest(form: Formulation, st: Stage, level: Levels) -> float:
    """The most a max-min stage's other terms (the migration penalty) add to its
    level over their variables' bounds."""
    model = form.model
    return st.constant + sum(
        a * (model.vars[v.index].ub if a > 0 else model.vars[v.index].lb)
        for v, a in st.terms
        if v.index != level.var.index
    )


def _level_bound(
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
    answers are used: an LP that runs out of time proves nothing. ``current``
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


def _tier_floors(stages: list[Stage], floors: list[float]) -> dict[int, float]:
    """The floor set so far on each priority tier's coverage, by tier."""
    return {x.tier: f for x, f in zip(stages, floors, strict=False) if x.tier is not None}


def _lex_better(a: list[float], b: list[float]) -> bool:
    """Whether stage values ``a`` beat ``b`` lexicographically (with a tolerance)."""
    for x, y in zip(a, b, strict=True):
        tol = 1e-6 * max(1.0, abs(x), abs(y))
        if x > y + tol:
            return True
        if x < y - tol:
            return False
    return False


def plan(problem: Problem, policy: str = "throughput", options: PlanOptions | None = None) -> Plan:
    """Plan ``problem`` under ``policy``. Raises ValidationError on bad input,
    UnknownPolicyError for an unknown policy or backend.

    The search spends ``options.work_budget()`` of deterministic work
    (``solver.clock``); the wall-clock limit is a safety cap on it."""
    options = options or PlanOptions()
    timer = _Timer(options)
    # The cap on the search leaves the rest of the limit to the uncounted steps after
    # it (verification, explanations; measured: about 5% of the time at 1k
    # workloads, 10-15% at 10k) and to the solvers' own overrun of their last limit.
    reserve = min(0.35, 0.15 + 3e-5 * len(problem.workloads))
    work = clock.Clock(options.time_limit_s * (1 - reserve), options.work_budget() * (1 - reserve))
    with clock.running(work):
        return _plan(problem, policy, options, timer, reserve)


def _plan(problem: Problem, policy: str, options: PlanOptions, timer: _Timer, reserve: float) -> Plan:
    pol = get_policy(policy)
    get_backend(options.backend)  # fail fast on an unknown backend
    with timer.stage("validate"):
        validate(problem)
    with timer.stage("aggregate"):
        index = build_index(problem)
    if isinstance(pol, HeuristicPolicy):
        with timer.stage("greedy"):
            placed = greedy_place(index, pol.order)
        return _finish(
            index,
            pol.name,
            "throughput",
            placed,
            None,
            {},
            timer,
            options,
            PlanStatus.HEURISTIC,
            strict_priority=pol.respects_priority,
        )
    assert isinstance(pol, OptimizingPolicy)
    with timer.stage("greedy"):
        seeds = [greedy_place(index, order, prefer=pol.prefer) for order in ("best-fit", "smallest-first")]
    with timer.stage("model"):
        form = build_formulation(index, options.max_migrations)
        stages = pol.stages(form, options)
        # The seed: the lexicographically better of largest-first (packs well) and
        # smallest-first (runs the most workloads) on the policy's stages.
        hints = [form.hint(s.values()) for s in seeds]
        best = (
            1
            if _lex_better(_stage_values(form, stages, hints[1]), _stage_values(form, stages, hints[0]))
            else 0
        )
        seed, hint = seeds[best], hints[best]
    greedy_stage_values = _stage_values(form, stages, hint)
    backend = get_backend(options.backend)
    # The work budget is shared the same way: the search stages first, then the
    # polish and the final bound (packing and repair are counted in the stages).
    work_limit = options.work_budget()
    deadline = work_limit * (1 - reserve)
    bound: float | None = None
    kept_jobs: dict[int, float] = {}  # fairness: the least Σ w of each tier's jobs (levels.job_floors)
    duals: Mapping[str, float] = {}
    values: dict[int, float] = dict(hint)
    nvars = len(form.model.vars)

    def vector(vals: Mapping[int, float]) -> tuple[float, ...]:
        return tuple(vals.get(i, 0.0) for i in range(nvars))

    def concrete(
        counts: Mapping[tuple[int, int], int], preplaced: Mapping[str, Placement] | None = None
    ) -> tuple[dict[str, Placement], dict[int, float]]:
        """A solution's counts packed on nodes and completed greedily, with its variable values."""
        partial, _ = disaggregate(index, counts, preplaced)
        full = complete(index, partial, pol.prefer)
        return full, form.hint(full.values())

    def tiered(
        counts: Mapping[tuple[int, int], int], keep: Mapping[str, Placement]
    ) -> tuple[dict[str, Placement], dict[int, float]]:
        """Like ``concrete``, one priority tier at a time, highest first: each tier's
        counts are packed and then completed greedily before the next tier is packed,
        so a lower tier never takes the room a higher tier's job lost in rounding or
        packing (the LP may trade a tier's jobs for fractional service coverage).
        Non-preemptible running jobs of every tier stay where they run first (else a
        higher tier's gang could take their node: found by Hypothesis)."""
        placed_t = dict(keep)
        pinned = {key: n for key, n in counts.items() if index.classes[key[0]].pinned}
        if pinned:
            placed_t, _ = disaggregate(index, pinned, placed_t)
        # Then every tier's jobs that the counts keep where they run: a higher tier's
        # gang packed first could take their node, and a job moved to another node of
        # the same shape is a migration the aggregated model does not see (found by
        # Hypothesis: two migrations under max_migrations 1).
        staying = {key: n for key, n in counts.items() if index.classes[key[0]].current_option == key[1]}
        if staying:
            placed_t, _ = disaggregate(index, staying, placed_t)
        for tier in index.tiers:
            part = {key: n for key, n in counts.items() if index.classes[key[0]].tier == tier}
            placed_t, _ = disaggregate(index, part, placed_t)
            placed_t = complete(index, placed_t, pol.prefer, tier=tier)
        return placed_t, form.hint(placed_t.values())

    def restored(
        counts: Mapping[tuple[int, int], int], keep: Mapping[str, Placement]
    ) -> tuple[dict[str, Placement], dict[int, float]]:
        """Like ``concrete``, then strict priority restored on the nodes: a higher
        tier's job that rounding or packing left out (the LP may trade a tier's jobs
        for fractional service coverage under the same floor) takes the room of
        lower-priority work, which is placed again where it fits; repeated while that
        changes the plan (a middle tier's evicted job gets its turn), at most 3 times."""
        partial, _ = disaggregate(index, counts, keep)
        full = complete(index, partial, pol.prefer)
        for _ in range(3):
            again = complete(index, repair_priority(index, full, options.max_migrations), pol.prefer)
            if again == full:
                break
            full = again
        return full, form.hint(full.values())

    incumbent: dict[str, Placement] | None = dict(seed)  # concrete plan behind ``values``, if any
    # Hard rows a packed candidate can break although the LP or CP-SAT solution held them.
    guarded = [c for c in form.model.constraints if c.name == "migrations" or c.name.startswith("pin[")]

    floors: list[float] = []  # floor of each stage solved so far
    unproven: list[str] = []  # earlier stages whose optimum is not proven

    def admissible(vals: Mapping[int, float]) -> bool:
        """Keeps the hard rows and the floors of the stages solved so far."""
        probe = LinearModel()
        probe.vars, probe.constraints = form.model.vars, guarded
        if probe.violations(vector(vals)):
            return False
        done = _stage_values(form, stages[: len(floors)], vals)
        return all(v >= f - 1e-9 * max(1.0, abs(f)) for v, f in zip(done, floors, strict=True))

    def at_least(vals: Mapping[int, float], k: int, strictly: bool) -> bool:
        """Admissible, and at least as good as the incumbent on stage k (or better)."""
        if not admissible(vals):
            return False
        new, old = _stage_values(form, [stages[k]], vals)[0], _stage_values(form, [stages[k]], values)[0]
        tol = 1e-9 * max(1.0, abs(old))
        return new > old + tol if strictly else new >= old - tol

    def rounded(
        k: int, lp_values: tuple[float, ...], end: float, later: int
    ) -> tuple[dict[str, Placement], dict[int, float]] | None:
        """The LP solution of stage ``k`` rounded, packed and completed: the best of a
        few roundings that keeps the floors and beats the incumbent on stage ``k``
        (None if none does). Later roundings run only while time is left before
        ``end``; once one has succeeded, only while that leaves the ``later`` stages
        that share ``end`` time for a rounding each."""
        best: tuple[dict[str, Placement], dict[int, float]] | None = None
        best_value = -math.inf

        def consider(found: tuple[dict[str, Placement], dict[int, float]]) -> None:
            nonlocal best, best_value
            if at_least(found[1], k, strictly=True):
                value = _stage_values(form, [stages[k]], found[1])[0]
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
        floor_vars = {v.index for st_ in stages[:k] for v, _a in st_.terms}
        protected = {
            w
            for w in incumbent or {}
            if any(v.index in floor_vars for v in form.class_vars(index.workload_class[w]))
        }
        services = {
            w: p for w, p in (incumbent or {}).items() if w in protected and index.workloads[w].inference
        }
        attempts: list[Callable[[], tuple[dict[str, Placement], dict[int, float]]]] = [
            lambda: concrete(counts)
        ]
        if form.f:
            # Rounded down (leaves room to others), and up (where the packing happens to
            # find room for them all).
            attempts.append(lambda: concrete(round_down(form, lp_values, services="down")))
            attempts.append(lambda: concrete(round_down(form, lp_values, services="up")))
        if protected:
            attempts[:0] = [lambda: restored(counts, services), lambda: tiered(counts, services)]
        else:
            attempts.append(lambda: tiered(counts, services))
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
            assert incumbent is not None
            consider(concrete(counts, {w: incumbent[w] for w in protected}))
        return best

    def refilled(k: int, st: Stage) -> tuple[dict[str, Placement], dict[int, float]] | None:
        """For a tier's coverage stage that found no time for its LP: the incumbent
        with that tier's and lower tiers' jobs placed again smallest first, if that
        keeps the floors and covers more (None otherwise)."""
        if st.tier is None or incumbent is None:
            return None
        keep = {
            wid: p
            for wid, p in incumbent.items()
            if index.workloads[wid].priority > st.tier
            or index.workloads[wid].inference is not None
            or wid in index.current
        }
        again = complete(index, keep, pol.prefer, order_name="smallest-first")
        again_values = form.hint(again.values())
        return (again, again_values) if at_least(again_values, k, strictly=True) else None

    # Stages before the primary share at most 60% of the time; the primary gets the rest.
    early_until = clock.now() + 0.6 * max(0.0, deadline - clock.now())
    primary_index = next((i for i, x in enumerate(stages) if x.primary), len(stages))
    objective_vars: set[int] = set()
    for k, st in enumerate(stages):
        form.model.maximize(st.terms, st.constant)
        objective_vars.update(v.index for v, _a in st.terms)
        # Classes no objective so far can use are held at 0 (for a priority stage:
        # every lower tier), which keeps early models small.
        fixed = frozenset() if st.primary and k == len(stages) - 1 else form.idle_classes(objective_vars)
        early_left = sum(1 for x in stages[k:] if not x.primary)
        stage_end = deadline if st.primary else early_until
        stage_start = clock.now()
        current = form.model.objective_value(vector(values))
        tol = 1e-9 * max(1.0, abs(current))
        if not st.primary and clock.now() >= early_until:
            # Out of time for earlier stages: the incumbent's value is this stage's floor.
            # Its lower tiers were completed largest first (packs well); for a tier's
            # coverage, smallest first runs more of them (measured at 10k, on a slow
            # run where the lowest tier's stage found no time: 2,745 -> 5,574 of its
            # 6,673 jobs), so that is tried first (0.2 s there).
            found = refilled(k, st)
            if found is not None:
                incumbent, values = found
                current = form.model.objective_value(vector(values))
            floors.append(form.set_floor(st.terms, st.constant, current, f"floor[{st.name}]", st.tolerance))
            unproven.append(st.name)
            continue
        if not st.primary and current >= _upper(form, st) - tol:
            # The incumbent already reaches this stage's trivial bound (e.g. every
            # workload of the tier runs): no solve needed.
            floors.append(form.set_floor(st.terms, st.constant, current, f"floor[{st.name}]", st.tolerance))
            continue
        # LP relaxation: a bound, duals, and (rounded down, completed) a candidate.
        # Every stage rests on it (the primary's is the plan's bound and shadow prices),
        # so it runs to its end whatever the budget (only the wall-clock cap stops it),
        # and what it took comes off the budget of the steps after it. Cut by a budget,
        # a stage lost its floor's proof and the primary its bound (measured on trtllm
        # at 1k, `cost`, 5 s: the first coverage LP needed more than the 0.84 work
        # seconds left to it, and the plan reported the trivial bound).
        with timer.stage("lp"):
            lp = backend.solve_lp(form.model, time_limit_s=math.inf, fixed_zero=fixed)
        lp_bound = lp.objective if lp.status is SolveStatus.OPTIMAL else math.inf
        if lp.status is not SolveStatus.OPTIMAL and st.primary:
            # Every optimizing plan carries a bound: without the LP's (out of time on a
            # large instance), the stage's trivial one, every variable at its best bound
            # (a solver's proven bound replaces it below when it is tighter).
            bound = _upper(form, st)
        if lp.status is not SolveStatus.OPTIMAL and not st.primary:
            # The LP ran out of time: as above, where the stage found none.
            found = refilled(k, st)
            if found is not None:
                incumbent, values = found
                current = form.model.objective_value(vector(values))
        if lp.status is SolveStatus.OPTIMAL:
            if st.primary:
                bound, duals = lp.objective, lp.duals
            levels = pol.levels(form) if st.primary and bound is not None else None
            if levels and incumbent is not None and stage_end - clock.now() > 0.1 * work_limit:
                # Raise the incumbent's minimum first: the bisection on the whole model
                # then starts from it (not worth its time where that bisection will not
                # run: at 10k it took 1.6 s and left the bisection none).
                with timer.stage("round"):
                    lifted = raise_minimum(index, improve(index, incumbent, pol.prefer, stage_end), stage_end)
                    lifted_values = form.hint(lifted.values())
                if at_least(lifted_values, k, strictly=True):
                    incumbent, values = lifted, lifted_values
                    current = form.model.objective_value(vector(values))
            if levels:
                rest = _level_rest(form, st, levels)
                # First on the type-level relaxation (a small LP: about 1-2 s at 10k
                # workloads; it gets up to 10% of the limit past the stage's end, like
                # the primary LP), then on the whole model below what that proved.
                # Strict priority in the max-min: what the coverage stages run of every
                # tier's jobs but the lowest's stays (solver/levels.py, job_floors).
                kept_jobs = job_floors(index, incumbent or {})
                small, small_holds = type_level_model(index, _tier_floors(stages, floors), kept_jobs)
                with timer.stage("lp"):
                    level_bound, _ = _level_bound(
                        small,
                        get_backend(options.backend),
                        small_holds,
                        levels.below,
                        rest,
                        frozenset(),
                        current,
                        lp_bound,
                        max(stage_end, clock.now() + 0.1 * work_limit),
                    )
                if level_bound is not None and bound is not None and level_bound < bound:
                    bound = level_bound
                    lp_bound = min(lp_bound, level_bound)
                with timer.stage("lp"):
                    level_bound, guide = _level_bound(
                        form.model,
                        backend,
                        levels.holds,
                        levels.below,
                        rest,
                        fixed,
                        current,
                        lp_bound,
                        stage_end,
                    )
                if level_bound is not None and bound is not None and level_bound < bound:
                    bound = level_bound
                    lp_bound = min(lp_bound, level_bound)
                if guide is not None and lp_bound > current + tol and k + 1 < len(stages):
                    # A plan above the incumbent's level may exist: round the LP with
                    # everything below that level held at 0 (most throughput, the
                    # tie-break's objective), then raise its minimum.
                    with timer.stage("round"):
                        form.model.maximize(stages[k + 1].terms, stages[k + 1].constant)
                        guided = backend.solve_lp(
                            form.model,
                            time_limit_s=max(0.2, stage_end - clock.now()),
                            fixed_zero=guide,
                        )
                        form.model.maximize(st.terms, st.constant)
                        cand: dict[str, Placement] | None = None
                        if guided.status is SolveStatus.OPTIMAL:
                            cand, _ = restored(round_down(form, guided.values, services="fit"), {})
                    if cand is not None:
                        with timer.stage("round"):
                            lifted = raise_minimum(
                                index, improve(index, cand, pol.prefer, stage_end), stage_end
                            )
                            lifted_values = form.hint(lifted.values())
                        if at_least(lifted_values, k, strictly=True):
                            incumbent, values = lifted, lifted_values
                            current = form.model.objective_value(vector(values))
            # Rounding can only help where the LP leaves room above the incumbent. Once
            # one rounding has succeeded, an early stage leaves the early stages still
            # to come the time for theirs.
            # (For a policy whose polish chooses the plan again, not past the stage's
            # end: at 10k the rounding took 0.9 s that the polish needs.)
            late = st.primary and pol.polish == "minimum" and clock.now() >= stage_end
            if lp_bound > current + tol and not late:
                with timer.stage("round"):
                    found = rounded(
                        k, lp.values, stage_end, 0 if st.primary else max(0, primary_index - k - 1)
                    )
                if found is not None:
                    incumbent, values = found
                    current = form.model.objective_value(vector(values))
            if st.tier is not None and lp_bound > current + tol:
                # A tier's coverage counts jobs: the incumbent with that tier's and lower
                # tiers' jobs placed again smallest first often runs more of them than
                # the rounding (slow_fleet at 1k, lowest tier: 695 -> 735 of the LP's
                # 741.4, in 0.02 s), which leaves the stage's MIP less to find.
                with timer.stage("round"):
                    found = refilled(k, st)
                if found is not None:
                    incumbent, values = found
                    current = form.model.objective_value(vector(values))
        target = options.relative_gap if st.primary else 0.0
        proven = lp_bound - current <= max(target * max(abs(lp_bound), 1e-9), 1e-9 * max(1.0, abs(current)))
        left = deadline - clock.now()
        # An early stage's search may use the early stages' time that is left, less what
        # the early stages after it need for their LP and rounding (as long as this
        # one's took, at least 0.2 s each): the MIP stops as soon as the stage is
        # proven, and a coverage stage left short sets a floor that later stages
        # cannot make up for (measured on slow_fleet at 1k: the lowest tier's coverage
        # needed 2.7 s of HiGHS to reach 741 from the rounding's 695; with an even
        # share it got none, and the cost plan filled the rest greedily at twice the
        # cost the bound allowed).
        later_need = (early_left - 1) * max(0.2, clock.now() - stage_start)
        search_end = deadline if st.primary else max(clock.now(), early_until - later_need)
        search_left = search_end - clock.now()
        sol: Solution | None = None
        if not proven and left > 0.05 and backend.mip_worth_starting(form.model, search_left):
            later = len(stages) - k - 1
            budget = left / (later + 1) if st.primary and later else search_end - clock.now()
            with timer.stage(f"solve: {st.name}"):
                sol = backend.solve_mip(
                    form.model,
                    hint=vector(values),
                    time_limit_s=max(0.05, budget),
                    seed=options.seed,
                    relative_gap=options.relative_gap if st.primary else max(options.relative_gap, 1e-3),
                    num_workers=options.num_workers,
                    fixed_zero=fixed,
                )
            if sol.status is SolveStatus.INFEASIBLE and k == 0 and not seed:
                raise SolverError(
                    f"stage {st.name!r}: the model is infeasible (this is a bug; please report it)"
                )
            # An infeasible later stage can only come from rounding a floor: keep the incumbent.
            if sol.has_values and form.model.objective_value(sol.values) > current + tol:
                # The aggregated model is a relaxation (sizes that do not divide the node
                # size): only the solution as packed on the nodes (and, for a stage that
                # ignores lower tiers, completed greedily) can replace the incumbent.
                with timer.stage("complete"):
                    filled_placed, filled = concrete(option_values(form, sol.values))
                if at_least(filled, k, strictly=True):
                    values, incumbent = filled, filled_placed
            if st.primary and sol.has_values and math.isfinite(sol.bound):
                bound = sol.bound if bound is None else min(bound, sol.bound)
        achieved = form.model.objective_value(vector(values))
        if st.primary and bound is not None:
            bound = max(bound, achieved)
        if not st.primary:
            stage_bound = lp_bound
            if sol is not None and sol.has_values and math.isfinite(sol.bound):
                stage_bound = min(stage_bound, sol.bound)
            if achieved < stage_bound - 1e-6 * max(1.0, abs(stage_bound)):
                unproven.append(st.name)
        if k < len(stages) - 1:
            floors.append(form.set_floor(st.terms, st.constant, achieved, f"floor[{st.name}]", st.tolerance))
    with timer.stage("disaggregate"):
        if incumbent is not None:
            placed = incumbent
        else:
            placed, _ = disaggregate(index, option_values(form, vector(values)))
    with timer.stage("repair"):
        repaired = repair_priority(index, complete(index, placed, pol.prefer), options.max_migrations)
        placed = improve(
            index,
            complete(index, repaired, pol.prefer),
            pol.prefer,
            work_limit * (1 - reserve / 2),
        )
    # The policy's local search (solver/exchange.py) is timed as part of "repair", the
    # one in the primary stage as "round" and the level bisection as "lp": stage names
    # that clients know the order of (server/cli.py orders a server's stage times).
    polish_until = work_limit * (1 - reserve / 2)
    if pol.polish == "exchange" and form.f:
        with timer.stage("repair"):
            placed = _exchange(form, stages, floors, placed, polish_until, get_backend(options.backend))
    fallback: dict[str, Placement] | None = None  # if the polished plan fails verification
    if pol.polish == "minimum":
        with timer.stage("repair"):
            primary_value = _stage_values(form, stages, form.hint(placed.values()))[primary_index]
            if bound is None or bound - primary_value > max(options.relative_gap * abs(bound), 1e-6):
                # The plan's own tiers' jobs where it runs more of them than the bound
                # assumed (repair, completion): fewer would fail the verifier's rule.
                now_jobs = job_floors(index, placed)
                tiers = now_jobs.keys() | kept_jobs.keys()
                least_jobs = {t: max(now_jobs.get(t, 0.0), kept_jobs.get(t, 0.0)) for t in tiers}
                leveled = _level_plan(form, stages, floors, placed, polish_until, options, least_jobs)
                if leveled is not placed:
                    fallback, placed = placed, leveled
            # The level plan may leave services at the minimum that this search lifts
            # (at 10k: 0.048 -> 0.119 in 0.3-0.4 s): it gets at least 3% of the limit.
            # It may move lower-priority work into room a left-out job of a higher tier
            # could use, which the verifier's strict-priority rule rejects (found on
            # zonal at 1k, work limit 2.5): the plan before it is the fallback then.
            if fallback is None:
                fallback = placed
            placed = raise_minimum(index, placed, max(polish_until, clock.now() + 0.03 * work_limit))
    # Never worse than the greedy seed.
    final_values = _stage_values(form, stages, form.hint(placed.values()))
    if _lex_better(greedy_stage_values, final_values):
        placed, final_values = seed, greedy_stage_values
    if bound is not None:
        # Only with time left before the reserve that verifying and explaining need (at
        # 10k `cost`, run after the exchange, it pushed the plan to 20.85 s of a 20 s limit).
        with timer.stage("lp"):
            bound = _rebound(form, stages, floors, final_values, bound, backend, polish_until)
    shadow: dict[str, float] = {}
    for name, si in form.gpu_rows.items():
        t = index.shapes[si].gpu_type
        shadow[t] = max(shadow.get(t, 0.0), duals.get(name, 0.0))
    for t in index.types:
        shadow.setdefault(t, 0.0)
    below = [
        stages[j].name
        for j, f in enumerate(floors)
        if j < len(stages) - 1 and final_values[j] < f - 1e-6 * max(1.0, abs(f))
    ]
    status = PlanStatus.FEASIBLE if unproven or below else None
    if fallback is not None and _lex_better(
        greedy_stage_values, _stage_values(form, stages, form.hint(fallback.values()))
    ):
        fallback = seed
    return _finish(
        index, pol.name, pol.name, placed, bound, shadow, timer, options, status, fallback=fallback
    )


def _rebound(
    form: Formulation,
    stages: list[Stage],
    floors: list[float],
    final_values: list[float],
    bound: float,
    backend: Backend,
    end: float,
) -> float:
    """The primary stage's bound at the final plan's own values of the stages before it.

    ``bound`` is of the primary stage given the floors the earlier stages set. Repair
    and completion add what fits, so the final plan may cover more than those floors
    (more jobs of a tier, more demand); a plan that covers less is lexicographically
    worse, so the bound to compare with is the one at the plan's values: the LP with
    those floors raised (a tighter bound, still valid). Measured on slow_fleet at 1k,
    ``cost``: a coverage stage short of time set a floor of 735 jobs, the final plan ran
    747, and the bound at 735 (-6213 $/h) was below what running 747 allows (-6508)."""
    primary = next(j for j, st in enumerate(stages) if st.primary)
    raised = [
        j
        for j in range(min(primary, len(floors)))
        if final_values[j] > floors[j] + 1e-6 * max(1.0, abs(floors[j]))
    ]
    if not raised or clock.now() >= end:
        return bound
    for j in raised:
        st = stages[j]
        form.set_floor(st.terms, st.constant, final_values[j], f"floor[{st.name}] (final)", st.tolerance)
    st = stages[primary]
    form.model.maximize(st.terms, st.constant)
    lp = backend.solve_lp(form.model, time_limit_s=max(0.05, end - clock.now()))
    if lp.status is not SolveStatus.OPTIMAL:
        return bound
    return max(min(bound, lp.objective), final_values[primary])


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
    values = _stage_values(form, [stages[j] for j in early], form.hint(placed.values()))
    slack = [v - floors[j] for v, j in zip(values, early, strict=True)]
    if any(s < 0 for s in slack):
        return placed
    # First every movable service chosen again at once (an LP over whole choices),
    # kept only if the floors hold as the model counts them and the $/hour went down.
    for _round in range(3):
        before = _stage_values(form, stages, form.hint(placed.values()))[-1]
        moved = reassign_services(index, placed, gains, slack, resolution, backend, deadline)
        got = _stage_values(form, stages, form.hint(moved.values()))
        new_slack = [got[j] - floors[j] for j in early]
        if any(s < 0 for s in new_slack) or got[-1] <= before + 1e-9 * max(1.0, abs(before)):
            break
        placed, slack = moved, new_slack
    # Passes while one lowers the $/hour and time is left: an exchange changes the
    # slack and the room that the next pass can use.
    for _pass in range(10):
        before = _stage_values(form, stages, form.hint(placed.values()))[-1]
        placed = exchange_services(index, placed, gains, slack, resolution, deadline)
        values = _stage_values(form, [stages[j] for j in early], form.hint(placed.values()))
        slack = [v - floors[j] for v, j in zip(values, early, strict=True)]
        after = _stage_values(form, stages, form.hint(placed.values()))[-1]
        if (
            any(s < 0 for s in slack)
            or after <= before + 1e-9 * max(1.0, abs(before))
            or clock.now() > deadline
        ):
            break
    return placed


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
        index, placed, _tier_floors(stages, floors), 1000, get_backend(options.backend), deadline, kept_jobs
    )
    if candidate is None:
        return placed
    old = _stage_values(form, stages, form.hint(placed.values()))
    new = _stage_values(form, stages, form.hint(candidate.values()))
    primary = next(i for i, x in enumerate(stages) if x.primary)
    if new[primary] <= old[primary] + 1e-9 * max(1.0, abs(old[primary])):
        return placed
    if any(new[j] < f - 1e-9 * max(1.0, abs(f)) for j, f in enumerate(floors) if j < primary):
        return placed
    return candidate


def _finish(
    index: Index,
    policy: str,
    score_policy: str,
    placed: Mapping[str, Placement],
    bound: float | None,
    shadow: Mapping[str, float],
    timer: _Timer,
    options: PlanOptions,
    status: PlanStatus | None,
    strict_priority: bool = True,
    fallback: Mapping[str, Placement] | None = None,
) -> Plan:
    """Verify, score and explain the plan. ``fallback``: a plan to return instead if
    this one fails verification (a polish that may break a rule the pipeline does
    not model exactly); without one, a failure is a bug and raises."""
    problem = index.problem
    placements = tuple(sorted(placed.values(), key=lambda p: p.workload_id))
    draft = Plan(
        PlanStatus.FEASIBLE,
        policy,
        0.0,
        None,
        None,
        placements,
        tuple(Unplaced(w.id, ()) for w in problem.workloads if w.id not in placed),
    )
    with timer.stage("verify"):
        report = verify(
            problem, draft, score_policy, options.migration_penalty, options.max_migrations, strict_priority
        )
    if not report.ok and fallback is not None:
        return _finish(
            index,
            policy,
            score_policy,
            fallback,
            bound,
            shadow,
            timer,
            options,
            PlanStatus.FEASIBLE,
            strict_priority,
        )
    if not report.ok:
        raise SolverError(
            "the plan failed verification (this is a bug; please report it):\n  "
            + "\n  ".join(report.violations)
        )
    objective = report.objective
    gap: float | None = None
    if bound is not None:
        bound = max(bound, objective)
        # As documented on Plan.gap: relative to the bound (for cost, whose objective
        # is negative, the stricter of the two usual choices).
        gap = max(0.0, bound - objective) / max(abs(bound), 1e-9)
        if bound - objective <= 1e-6:  # below the solvers' own tolerances
            gap = 0.0
    if status is None:
        status = (
            PlanStatus.OPTIMAL
            if gap is not None and gap <= max(options.relative_gap, 1e-6)
            else PlanStatus.FEASIBLE
        )
    with timer.stage("explain"):
        explainer = Explainer(index, placed, gap, options.max_migrations)
        unplaced = []
        for w in sorted(problem.workloads, key=lambda w: w.id):
            if w.id in placed:
                continue
            reasons = explainer.unplaced(w)
            if not reasons:
                reasons = (
                    Reason(ReasonCode.PACKING, "fits the aggregated model but not the concrete nodes"),
                )
            unplaced.append(Unplaced(w.id, reasons))
        shortfalls = []
        for p in placements:
            w = index.workloads[p.workload_id]
            if w.inference is None:
                continue
            served = len(p.shards) * w.inference.replica_rps.get(p.gpu_type, 0.0)
            if served + 1e-9 < w.inference.target_rps:
                shortfalls.append(
                    Shortfall(w.id, served, w.inference.target_rps, explainer.shortfall(w, p, served))
                )
    return Plan(
        status=status,
        policy=policy,
        objective=objective,
        best_bound=bound,
        gap=gap,
        placements=placements,
        unplaced=tuple(unplaced),
        shortfalls=tuple(shortfalls),
        stage_times_s=dict(timer.times),
        shadow_prices=dict(sorted(shadow.items())),
        metrics=report.metrics,
        work_s=round(clock.current().work, 6),
        stopped_by=_stopped_by(status, bound, clock.current()),
    )


def _stopped_by(status: PlanStatus, bound: float | None, work: clock.Clock) -> str:
    if status is PlanStatus.HEURISTIC or bound is None:
        return "heuristic"
    if work.cut:
        return "wall_clock"
    if status is PlanStatus.OPTIMAL:
        return "gap"
    return "work_limit" if work.work >= work.budget else "exhausted"


@dataclass(frozen=True)
class Explanation:
    """Why a workload is where it is, or why it is not placed.

    Attributes:
        workload_id: the workload.
        placed: whether the plan runs it.
        summary: one line for people.
        details: the reasons and facts behind the summary, one per line.
        placement: where it runs (None if unplaced).
    """

    workload_id: str
    placed: bool
    summary: str
    details: tuple[str, ...]
    placement: Placement | None = None


def explain(problem: Problem, plan_: Plan, workload_id: str) -> Explanation:
    """Explain one workload of ``plan_`` (made for ``problem``)."""
    index = build_index(problem)
    w = index.workloads.get(workload_id)
    if w is None:
        raise ValidationError([Violation("workload_id", f"unknown workload {workload_id!r}")])
    placed = {p.workload_id: p for p in plan_.placements}
    p = placed.get(workload_id)
    if p is None:
        un = next((u for u in plan_.unplaced if u.workload_id == workload_id), None)
        reasons = (
            un.reasons
            if un is not None and un.reasons
            else Explainer(index, placed, plan_.gap, None).unplaced(w)
        )
        return Explanation(
            workload_id,
            False,
            f"{workload_id} is not placed",
            tuple(f"[{r.code.value}] {r.message}" for r in reasons),
        )
    details: list[str] = []
    nodes = ", ".join(f"{s.node_id}×{s.gpus}" for s in p.shards)
    t = p.gpu_type or index.nodes[p.shards[0].node_id].gpu_type
    cur = index.current.get(workload_id)
    if cur is not None:
        same = sorted((s.node_id, s.gpus) for s in cur.shards) == sorted(
            (s.node_id, s.gpus) for s in p.shards
        )
        details.append(
            "stays where it runs now"
            if same
            else "moves from " + ", ".join(f"{s.node_id}×{s.gpus}" for s in cur.shards)
        )
    if w.training is not None:
        usable = usable_training_types(w, index.types)
        best = max((s.throughput.get(u, 0.0) for s in w.training.shapes for u in usable), default=0.0)
        shape = next((s for s in w.training.shapes if s.gpus == p.gpus), None)
        thr = shape.throughput.get(t, 0.0) if shape else 0.0
        rho = thr / best if best else 0.0
        details.append(
            f"runs {p.gpus} GPUs of {t} at {thr:g} work units/s, {rho:.0%} of its best ({best:g} units/s)"
        )
        if rho < 1 - 1e-9:
            others = {o: placed_o for o, placed_o in placed.items() if o != workload_id}
            ex = Explainer(index, others, plan_.gap, None)
            better = {
                u
                for u in usable
                if max((s.throughput.get(u, 0.0) for s in w.training.shapes), default=0.0) > thr
            }
            for r in ex.unplaced(w):
                if any(r.message.startswith(f"on {u}:") for u in better):
                    details.append(f"why not better: [{r.code.value}] {r.message}")
        summary = f"{workload_id} runs on {t}: {nodes}"
    else:
        spec = w.inference
        assert spec is not None
        served = len(p.shards) * spec.replica_rps.get(t, 0.0)
        details.append(f"{len(p.shards)} replicas on {t} serve {served:g} of {spec.target_rps:g} req/s")
        for sf in plan_.shortfalls:
            if sf.workload_id == workload_id:
                details += [f"short of target: [{r.code.value}] {r.message}" for r in sf.reasons]
        per_node: dict[str, int] = {}
        for shard in p.shards:
            per_node[shard.node_id] = per_node.get(shard.node_id, 0) + 1
        gpus = p.shards[0].gpus
        where = ", ".join(f"{n}×{k}" for n, k in per_node.items())
        summary = f"{workload_id} serves from {t}: {len(p.shards)} replicas of {gpus} GPU(s) on {where}"
    return Explanation(workload_id, True, summary, tuple(details), p)
