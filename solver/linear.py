"""A small backend-neutral linear model.

The formulation is written once against :class:`LinearModel`; each backend
(CP-SAT, GLOP, CBC through pulp) translates it. This is what lets the pulp
backend solve *the same* models as OR-Tools, and the LP relaxation be the very
model the integer solver sees.

Continuous variables carry a ``resolution``: CP-SAT has no continuous
variables, so it models ``x`` as an integer ``X`` with ``x = X / resolution``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Constraint", "LinearModel", "Sense", "Solution", "SolveStatus", "Var"]


@dataclass(frozen=True)
class Var:
    index: int
    name: str
    lb: float
    ub: float
    integer: bool
    resolution: int = 1000


class Sense(enum.Enum):
    LE = "<="
    GE = ">="
    EQ = "=="


@dataclass(frozen=True)
class Constraint:
    name: str
    terms: Mapping[int, float]
    sense: Sense
    rhs: float


class SolveStatus(enum.Enum):
    OPTIMAL = "OPTIMAL"
    FEASIBLE = "FEASIBLE"
    INFEASIBLE = "INFEASIBLE"
    UNKNOWN = "UNKNOWN"  # no solution within the limits


@dataclass(frozen=True)
class Solution:
    """A backend's answer. ``values`` is empty when no solution was found.

    ``bound`` is the proven bound on the (maximized) objective. ``duals`` maps
    constraint names to dual values (LP solves only)."""

    status: SolveStatus
    values: tuple[float, ...]
    objective: float
    bound: float
    wall_s: float
    duals: Mapping[str, float] = field(default_factory=dict)

    @property
    def has_values(self) -> bool:
        return bool(self.values)


class LinearModel:
    """Variables, linear constraints and one linear objective to MAXIMIZE."""

    def __init__(self) -> None:
        self.vars: list[Var] = []
        self.constraints: list[Constraint] = []
        self.objective: dict[int, float] = {}
        self.objective_constant: float = 0.0

    def int_var(self, lb: float, ub: float, name: str) -> Var:
        v = Var(len(self.vars), name, float(lb), float(ub), True)
        self.vars.append(v)
        return v

    def bool_var(self, name: str) -> Var:
        return self.int_var(0, 1, name)

    def num_var(self, lb: float, ub: float, name: str, resolution: int = 1000) -> Var:
        v = Var(len(self.vars), name, float(lb), float(ub), False, resolution)
        self.vars.append(v)
        return v

    def add(self, terms: Iterable[tuple[Var, float]], sense: Sense, rhs: float, name: str) -> Constraint:
        merged: dict[int, float] = {}
        for var, coef in terms:
            if coef:
                merged[var.index] = merged.get(var.index, 0.0) + coef
        c = Constraint(name, {k: v for k, v in merged.items() if v}, sense, float(rhs))
        self.constraints.append(c)
        return c

    def maximize(self, terms: Iterable[tuple[Var, float]], constant: float = 0.0) -> None:
        obj: dict[int, float] = {}
        for var, coef in terms:
            obj[var.index] = obj.get(var.index, 0.0) + coef
        self.objective = {k: v for k, v in obj.items() if v}
        self.objective_constant = constant

    def evaluate(self, terms: Mapping[int, float], values: tuple[float, ...]) -> float:
        return sum(c * values[i] for i, c in terms.items())

    def objective_value(self, values: tuple[float, ...]) -> float:
        return self.evaluate(self.objective, values) + self.objective_constant

    def violations(self, values: tuple[float, ...], tol: float = 1e-6) -> list[str]:
        """Constraints (and bounds) that ``values`` break: used to check hints."""
        bad: list[str] = []
        for v in self.vars:
            x = values[v.index]
            if x < v.lb - tol or x > v.ub + tol:
                bad.append(f"bound {v.name}={x}")
        for c in self.constraints:
            lhs = self.evaluate(c.terms, values)
            slack = tol * max(1.0, abs(c.rhs))
            if (c.sense is Sense.LE and lhs > c.rhs + slack) or (c.sense is Sense.GE and lhs < c.rhs - slack):
                bad.append(f"{c.name}: {lhs} {c.sense.value} {c.rhs}")
            elif c.sense is Sense.EQ and abs(lhs - c.rhs) > slack:
                bad.append(f"{c.name}: {lhs} == {c.rhs}")
        return bad
