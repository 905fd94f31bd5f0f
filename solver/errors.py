"""Errors raised by the solver.

Tree::

    ApportionError
    ├── ValidationError      the input breaks a rule; lists every violation by path
    ├── UnknownPolicyError   no policy or backend registered under that name
    └── SolverError          a backend failed in a way that is not a plan status

An input that is valid but cannot be fully placed is *not* an error: the plan
lists what is unplaced and why. Solver statuses are results (see PlanStatus).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ApportionError", "SolverError", "UnknownPolicyError", "ValidationError", "Violation"]


class ApportionError(Exception):
    """Base of every error this package raises on purpose."""


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``path`` names the field as in the input files,
    e.g. ``workloads[1].inference.target_rps``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ValidationError(ApportionError):
    """The input is invalid. ``violations`` holds every problem found, not just the first."""

    def __init__(self, violations: list[Violation] | tuple[Violation, ...]) -> None:
        self.violations: tuple[Violation, ...] = tuple(violations)
        super().__init__("\n".join(str(v) for v in self.violations))


class UnknownPolicyError(ApportionError, KeyError):
    """No policy (or backend) of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown policy"


class SolverError(ApportionError):
    """A solver backend failed (crashed, returned a model error)."""
