"""``plan(problem, policy, options) -> Plan``: the pipeline, each stage timed.

1. validate      every violation at once, by path (``solver.validate``)
2. aggregate     node shapes and workload classes (``solver.aggregate``)
3. greedy        two greedy seeds (largest-first, smallest-first); the better
                 one is the first incumbent and the floor on quality
4. model         the aggregated formulation and the policy's stages
5. search        the policy's stages one after another (``solver.search``):
                 per stage the LP relaxation (``lp``), its solution rounded,
                 packed and completed (``round``), the MIP hinted with the
                 incumbent while the stage is not proven (``solve: NAME``); the
                 stage's value becomes a floor for the next
6. disaggregate  the incumbent is already a concrete plan (else: pack the counts)
7. repair        strict priority on concrete nodes, fill what is free, move jobs
                 that do not run yet to better options where room is free; then
                 the policy's own steps (``OptimizingPolicy.improve``)
8. verify        the independent checker recomputes feasibility and objective
9. explain       a reason for every unplaced workload and every shortfall

Incumbents are always concrete, verified-shaped plans: a solver solution of the
aggregated model (a relaxation where sizes do not divide node sizes) replaces
the incumbent only as packed. The plan returned is never worse than the greedy
seed on the policy's stages.

Bound and gap: ``best_bound`` is the smaller of the LP bound and the MIP's
bound on the primary stage, given the floors that earlier stages set (for
priority tiers and inference demand); ``gap`` compares it with the objective
of the verified concrete plan, so packing losses show in the gap. ``OPTIMAL``
needs the gap within ``relative_gap`` and every earlier stage proven and met.

The budget is deterministic work (``solver.clock``); the wall-clock limit is a
safety cap that every step checks too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from solver import clock
from solver.aggregate import Index, build_index, usable_training_types
from solver.backends import Backend, get_backend
from solver.disaggregate import disaggregate
from solver.errors import SolverError, ValidationError, Violation
from solver.explain import Explainer
from solver.formulation import Formulation, build_formulation, option_values
from solver.greedy import complete, greedy_place, improve, repair_priority
from solver.linear import SolveStatus
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
from solver.policies.base import Stage, lex_better, stage_values
from solver.search import Search
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


def plan(problem: Problem, policy: str = "throughput", options: PlanOptions | None = None) -> Plan:
    """Plan ``problem`` under ``policy``. Raises ValidationError on bad input,
    UnknownPolicyError for an unknown policy or backend.

    The search spends ``options.work_budget()`` of deterministic work
    (``solver.clock``); the wall-clock limit is a safety cap on it."""
    options = options or PlanOptions()
    timer = _Timer(options)
    # The work budget is shared as the wall-clock limit once was: the search's stages
    # until (1 - reserve) of it, the polish until (1 - reserve / 2). The cap leaves
    # the last reserve / 2 of the limit to the uncounted steps after the polish
    # (verification, explanations; measured: about 5% of the time at 1k workloads,
    # 10-15% at 10k) and to the solvers' own overrun of their last limit.
    reserve = min(0.35, 0.15 + 3e-5 * len(problem.workloads))
    work = clock.Clock(options.time_limit_s * (1 - reserve / 2), options.work_budget() * (1 - reserve))
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
            1 if lex_better(stage_values(form, stages, hints[1]), stage_values(form, stages, hints[0])) else 0
        )
        seed, hint = seeds[best], hints[best]
    greedy_stage_values = stage_values(form, stages, hint)
    # The work budget is shared the same way: the search stages first, then the
    # polish and the final bound (packing and repair are counted in the stages).
    work_limit = options.work_budget()
    search = Search(
        form, pol, stages, seed, hint, options, timer.stage, work_limit, work_limit * (1 - reserve)
    )
    search.run()
    return _conclude(search, timer, options, work_limit * (1 - reserve / 2), greedy_stage_values)


def _conclude(
    search: Search, timer: _Timer, options: PlanOptions, polish_until: float, greedy_stage_values: list[float]
) -> Plan:
    """The search's incumbent repaired on the nodes and improved by the policy's own
    steps, never worse than the greedy seed, with its bound raised to the plan's own
    floors, then verified and explained (``_finish``)."""
    form, index, pol, stages = search.form, search.index, search.pol, search.stages
    with timer.stage("disaggregate"):
        if search.incumbent is not None:
            placed = search.incumbent
        else:
            placed, _ = disaggregate(index, option_values(form, search.vector(search.values)))
    with timer.stage("repair"):
        repaired = repair_priority(index, complete(index, placed, pol.prefer), options.max_migrations)
        placed = improve(index, complete(index, repaired, pol.prefer), pol.prefer, polish_until)
    # The policy's own steps (cost's exchange, fairness' level plan and minimum) are
    # timed as part of "repair", the ones in the primary stage as "round" and the
    # level bisection as "lp": stage names that clients know the order of
    # (server/cli.py orders a server's stage times).
    with timer.stage("repair"):
        placed, fallback = pol.improve(search, placed, polish_until)
    # Never worse than the greedy seed.
    final_values = stage_values(form, stages, form.hint(placed.values()))
    if lex_better(greedy_stage_values, final_values):
        placed, final_values = search.seed, greedy_stage_values
    bound = search.bound
    if bound is not None:
        # Only with work left before the reserve that verifying and explaining need (at
        # 10k `cost`, run after the exchange, it pushed the plan to 20.85 s of a 20 s limit).
        with timer.stage("lp"):
            bound = _rebound(form, stages, search.floors, final_values, bound, search.backend, polish_until)
    shadow = search.gpu_prices()
    below = [
        stages[j].name
        for j, f in enumerate(search.floors)
        if j < len(stages) - 1 and final_values[j] < f - 1e-6 * max(1.0, abs(f))
    ]
    status = PlanStatus.FEASIBLE if search.unproven or below else None
    if fallback is not None and lex_better(
        greedy_stage_values, stage_values(form, stages, form.hint(fallback.values()))
    ):
        fallback = search.seed
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
    if work.cut or work.touched:
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
