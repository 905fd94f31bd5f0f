"""Solver backends: each turns a :class:`~solver.linear.LinearModel` into a
:class:`~solver.linear.Solution`, as an integer program (``solve_mip``) or as
its LP relaxation (``solve_lp``, which also returns duals). ``fixed_zero``
names variables held at 0 for that solve (classes a stage cannot use).

``highs`` (HiGHS for the integer model, GLOP for the LP; both bundled with
OR-Tools) is the default; ``ortools`` uses CP-SAT for the integer model instead;
``pulp`` (the CBC bundled with pulp) solves the same models and is used to
cross-check. Backends import their solver library lazily, on first solve.
Limits are work seconds (``solver.clock``): each backend stops its solver on a
deterministic measure of work and charges the plan's clock with what it did.
``mip_worth_starting`` says whether a budget pays for what a backend's integer
solver needs before it can gain anything.
"""

from __future__ import annotations

from typing import Protocol

from solver.errors import UnknownPolicyError
from solver.linear import LinearModel, Solution

__all__ = ["BACKENDS", "Backend", "get_backend"]


class Backend(Protocol):
    name: str

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
    ) -> Solution: ...

    def solve_lp(
        self, model: LinearModel, *, time_limit_s: float, fixed_zero: frozenset[int] = frozenset()
    ) -> Solution: ...

    def mip_worth_starting(self, model: LinearModel, seconds: float) -> bool: ...


BACKENDS = ("highs", "ortools", "pulp")


def get_backend(name: str) -> Backend:
    if name == "highs":
        from solver.backends.ortools_backend import HighsBackend

        return HighsBackend()
    if name == "ortools":
        from solver.backends.ortools_backend import OrToolsBackend

        return OrToolsBackend()
    if name == "pulp":
        from solver.backends.pulp_backend import PulpBackend

        return PulpBackend()
    raise UnknownPolicyError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
