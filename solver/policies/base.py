"""The policy interface.

An optimizing policy turns the shared formulation into a list of *stages*:
objectives solved one after another, each one's optimum kept as a floor for
the next (lexicographic optimization). Exactly one stage is ``primary``: its
objective is the policy's objective, the one reported with a bound and a gap.

Strict priority tiers come first: for tiers t1 > t2 > ... the coverage of t1
(weighted count of its running jobs plus weighted served fraction of its
services) is maximized, then that of
t2 with t1's kept, and so on, so a higher tier never loses a workload to make
room for a lower one.

A heuristic policy (a baseline) instead names a greedy order (``solver.greedy``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from solver.formulation import Formulation, Terms
from solver.linear import Var
from solver.model import Placement, PlanOptions

if TYPE_CHECKING:
    from solver.search import Search

__all__ = [
    "HeuristicPolicy",
    "Levels",
    "OptimizingPolicy",
    "Policy",
    "Stage",
    "demand_stage",
    "lex_better",
    "stage_values",
    "tier_floors",
    "tier_stages",
    "upper",
]


@dataclass(frozen=True)
class Levels:
    """What the pipeline needs to bound a max-min stage by bisection on its level.

    Attributes:
        var: the level variable (the minimum, fairness' t).
        holds: (v, variables): a plan whose minimum is >= tau holds these variables
            at 0 for every tau > v (what would run at a value below the minimum).
        below: below(tau) = the largest value the minimum of an integer plan can
            take that is < tau (the minimum is one of finitely many values).
    """

    var: Var
    holds: list[tuple[float, list[int]]]
    below: Callable[[float], float]


@dataclass(frozen=True)
class Stage:
    """One objective of a lexicographic solve. ``tolerance``: how far (relative)
    later stages may let its value fall below the optimum found; ``tier``: set on
    the coverage stage of a priority tier."""

    name: str
    terms: Terms
    constant: float = 0.0
    primary: bool = False
    tolerance: float = 0.0
    tier: int | None = None  # the priority tier whose coverage this stage is, if it is one


def demand_stage(form: Formulation) -> list[Stage]:
    """Inference demand of every service (after the tiers, which cover their own)."""
    return [Stage("inference demand", form.served())] if form.f else []


class Policy:
    """A common base: the two kinds below define what a policy does."""

    name: str = ""
    description: str = ""
    heuristic: bool = False


class OptimizingPolicy(Policy, ABC):
    #: what the greedy seed and completions try first: "value" (throughput) or "cost"
    prefer: str = "value"
    #: whether :meth:`improve` chooses the plan again (fairness' level plan): the
    #: primary stage's rounding then does not run past the stage's budget
    replans: bool = False

    @abstractmethod
    def stages(self, form: Formulation, options: PlanOptions) -> list[Stage]:
        """Stages to solve in order (may add variables and constraints to ``form``)."""

    def improve(
        self, search: Search, placed: dict[str, Placement], until: float
    ) -> tuple[dict[str, Placement], dict[str, Placement] | None]:
        """The policy's own steps on the repaired plan of ``search``, with work until
        ``until``. Returns the plan and a plan to fall back on if it fails
        verification (a step that may break a rule the search does not model
        exactly), or None. Default: none."""
        return placed, None

    def levels(self, form: Formulation) -> Levels | None:
        """For a max-min primary stage, what bounds it by bisection on its level
        (see :class:`Levels`). None: not a max-min stage."""
        return None


class HeuristicPolicy(Policy):
    heuristic = True
    order: str = ""
    #: False for classic orders that ignore priority (fcfs, sjf): their plans are
    #: not held to strict priority tiers.
    respects_priority: bool = True


def tier_stages(form: Formulation, include_lowest: bool) -> list[Stage]:
    """Coverage stages, highest priority first (the lowest tier only if asked)."""
    tiers = form.index.tiers if include_lowest else form.index.tiers[:-1]
    stages = []
    for t in tiers:
        terms = form.coverage(t)
        if terms:
            stages.append(Stage(f"priority {t}", terms, tier=t))
    return stages


def stage_values(form: Formulation, stages: list[Stage], values: Mapping[int, float]) -> list[float]:
    return [sum(a * values.get(v.index, 0.0) for v, a in st.terms) + st.constant for st in stages]


def upper(form: Formulation, st: Stage) -> float:
    """A trivial upper bound of a stage: every variable at its most favourable bound."""
    model = form.model
    total = st.constant
    for v, a in st.terms:
        var = model.vars[v.index]
        total += a * (var.ub if a > 0 else var.lb)
    return total


def tier_floors(stages: list[Stage], floors: list[float]) -> dict[int, float]:
    """The floor set so far on each priority tier's coverage, by tier."""
    return {x.tier: f for x, f in zip(stages, floors, strict=False) if x.tier is not None}


def lex_better(a: list[float], b: list[float]) -> bool:
    """Whether stage values ``a`` beat ``b`` lexicographically (with a tolerance)."""
    for x, y in zip(a, b, strict=True):
        tol = 1e-6 * max(1.0, abs(x), abs(y))
        if x > y + tol:
            return True
        if x < y - tol:
            return False
    return False
