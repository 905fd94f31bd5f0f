"""Deterministic work: the planner's budget is counted, not timed.

A plan that depends on how fast the machine happened to run is a plan nobody
can reproduce: the same input on a loaded machine stopped its searches earlier
and gave another answer. So every stage of the pipeline measures what it has
done in **work seconds**, a count of deterministic work (simplex iterations
times the model's size, branch-and-bound nodes, CP-SAT's own deterministic time,
candidate nodes checked by the packing heuristics), each kind scaled so that
one work second is about one second of CPU on the reference machine (the 2-core
VM the benchmarks run on; the constants below say what was measured). Every
decision in the pipeline ("is there time for another rounding?", "stop the
exchange") compares this count, never the wall clock, so the same input, seed
and work limit give the same plan whatever the load.

Wall time is only a safety cap: once it is spent, :meth:`Clock.now` answers
a time later than every deadline, every stage stops at its next check, and the plan says
``stopped_by: wall_clock`` (that plan is the only kind that may differ from one
run to the next).

The clock of the plan being made is per thread (the server plans in several
threads): :func:`running` installs one, :func:`current` finds it (an unlimited
clock where none is installed, so a heuristic called on its own runs to its
end).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "CUT",
    "GLOP_PER_ITERATION",
    "GLOP_SIZE_POWER",
    "HIGHS_PER_ITERATION_NONZERO",
    "HIGHS_PER_NODE_NONZERO",
    "HIGHS_PER_SOLVE",
    "HIGHS_PER_SOLVE_NONZERO",
    "LEDGER_CHECK",
    "LEDGER_LOOK",
    "LP_PER_SOLVE_NONZERO",
    "MODEL_PER_NONZERO",
    "PER_ITEM",
    "Clock",
    "charge",
    "current",
    "now",
    "running",
]

# What one unit of each kind of work costs, in seconds of the reference machine,
# measured on the slow_fleet family at 1,000 nodes / 1,000 workloads (a model of
# 6,050 variables, 3,164 rows, 32,945 nonzeros):
# A simplex iteration of GLOP costs GLOP_PER_ITERATION * size ** GLOP_SIZE_POWER
# (size: the model's rows + nonzeros), fitted over 12 solves of the pipeline from
# size 15k to 377k (first solves and warm re-solves of three families at 1k and of
# the 10k benchmark; what each took over the fit: 0.37x to 3.4x). A cost linear in
# the size overcharged the 10k solves 2.7-4.8x.
GLOP_PER_ITERATION = 1.6e-8
GLOP_SIZE_POWER = 0.78
# An LP solve's own work around GLOP, per unit of size (bounds changed, values and
# duals read back): 0.03 s a solve at size 75k with no iteration at all.
LP_PER_SOLVE_NONZERO = 4e-7
# HiGHS' branch and cut, fitted over 69 of its solves in the pipeline on 8
# instance families (small and 1k, three policies; what each took over this
# estimate: 0.2x to 10x, the largest on the smallest solves): an LP iteration
# (its root heuristics, cuts and sub-MIPs come with their iterations) per unit of
# size, a node per unit of size, and a solve's own start: a fixed part and its
# root's presolve, probing and separation, which grow with the size, not with
# the LP iterations.
HIGHS_PER_ITERATION_NONZERO = 1e-8
HIGHS_PER_NODE_NONZERO = 1e-6
HIGHS_PER_SOLVE = 0.02
HIGHS_PER_SOLVE_NONZERO = 2e-5
# Building a solver's copy of the model, per nonzero (Python loops over the rows).
MODEL_PER_NONZERO = 2e-6
# One node checked, taken or released by the packing heuristics' ledger, and one
# node a ledger search looks at (most are passed over before a check: 422k looked
# at, 122k checked in the profile of a fairness plan at 1k); fitted to the greedy
# seeds' wall time on slow_fleet and zonal at 1k.
LEDGER_CHECK = 1.5e-6
LEDGER_LOOK = 5e-7
# One item (a variable or a placement) turned into another form, e.g. a plan into
# the model's variable values: 16 conversions of 7k variables and 1k placements
# took 0.48 s.
PER_ITEM = 4e-6


class Clock:
    """Work done so far (work seconds) against a wall-clock safety cap.

    ``now()`` is the work done, or :data:`CUT` (later than any deadline, but
    finite, so differences of two readings stay numbers) once ``wall_limit_s``
    of real time has passed since the clock was made (``cut`` then becomes True)."""

    def __init__(self, wall_limit_s: float = math.inf, budget: float = math.inf) -> None:
        self.work = 0.0
        self.budget = budget  # the work the search may spend (for reports: nothing enforces it here)
        self.wall_limit_s = wall_limit_s
        self._wall_start = time.perf_counter()
        self.cut = False
        self.touched = False  # a step was stopped by wall time (see stopped_by_wall)
        self.solver_share = 1.0

    def now(self) -> float:
        if not self.cut and time.perf_counter() - self._wall_start > self.wall_limit_s:
            self.cut = True
        return CUT if self.cut else self.work

    def charge(self, seconds: float) -> None:
        self.work += seconds

    def wall_left(self) -> float:
        """Real seconds left before the cap (for a solver's own time limit)."""
        return max(0.0, self.wall_limit_s - (time.perf_counter() - self._wall_start))

    def solver_wall_s(self) -> float:
        """A solver's own wall-clock limit: what is left before the cap, times
        ``solver_share`` (the search keeps part of it for the steps after an early
        stage's MIP, the primary stage's LP first: its bound)."""
        return min(1e6, max(0.01, self.wall_left() * self.solver_share))

    def stopped_by_wall(self) -> None:
        """A solver stopped at its wall-clock limit: the plan may differ from run to
        run, and says so (``stopped_by: wall_clock``), though later steps go on."""
        self.touched = True


CUT = 1e18
_local = threading.local()


def current() -> Clock:
    """The clock of the plan this thread is making (an unlimited one if none)."""
    clock: Clock | None = getattr(_local, "clock", None)
    if clock is None:
        clock = Clock()
        _local.clock = clock
    return clock


def now() -> float:
    return current().now()


def charge(seconds: float) -> None:
    current().work += seconds


@contextmanager
def running(clock: Clock) -> Iterator[Clock]:
    """Make ``clock`` this thread's clock for the block (the previous one after)."""
    before = getattr(_local, "clock", None)
    _local.clock = clock
    try:
        yield clock
    finally:
        _local.clock = before
