"""Gavel's heterogeneity-aware max-min fairness LP, as an independent reference.

Gavel (Narayanan et al., OSDI 2020), ``scheduler/policies/max_min_fairness.py``
(``MaxMinFairnessPolicyWithPerf``) allocates to each job ``j`` a fraction of
time ``X[j, t]`` on each GPU type ``t`` and solves::

    maximize    min_j  (sum_t rho[j, t] * X[j, t]) / w_j
    subject to  sum_t X[j, t] <= 1                       for every job j
                sum_j X[j, t] * scale_factor_j <= G_t     for every type t
                X >= 0

Here ``rho[j, t] = thr[j, t] / max_t' thr[j, t']``: a job's throughput on a type
normalised by its best throughput over the types in the cluster (Gavel
normalises by the throughput of an equal-share allocation instead, and also
multiplies the objective by the scale factor; the planner's ``fairness`` policy
uses this max-normalisation, so this is the number to compare it with).

Reading a :class:`~solver.model.Problem`:

* only training jobs take part; ``w_j`` = workload weight x its tenant's weight
  (1 when the tenant is unknown or empty);
* ``scale_factor_j`` and ``thr[j, .]`` come from the job's first shape (the
  smallest, for an elastic job);
* ``G_t`` = GPUs of type ``t`` on READY nodes;
* a type is usable by a job when it has ready GPUs, a positive throughput in
  that shape, is in ``allowed_gpu_types`` (when given) and has at least
  ``gpu_memory_gib`` of memory; node selectors, host resources, locality,
  quotas and priorities are ignored (Gavel has none of them);
* jobs with no usable type are left out of the LP and listed in ``excluded``
  (they would pin the minimum to 0).

Solved with OR-Tools GLOP. Being a relaxation in time (jobs time-share GPUs),
its optimum bounds what any integral plan can give the worst-off job only in
that time-averaged sense; it is a reference value, not a plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from solver.model import NodeState, Problem

__all__ = ["MaxMinResult", "max_min_allocation", "max_min_lp"]


@dataclass(frozen=True)
class MaxMinResult:
    """The LP's optimum and the allocation that reaches it.

    Attributes:
        value: the optimal min_j (sum_t rho X) / w_j.
        allocation: workload id -> GPU type -> time fraction (zeros left out).
        jobs: ids of the jobs in the LP.
        excluded: ids of training jobs with no usable GPU type.
    """

    value: float
    allocation: Mapping[str, Mapping[str, float]]
    jobs: tuple[str, ...]
    excluded: tuple[str, ...]


def max_min_allocation(problem: Problem) -> MaxMinResult:
    """Solve Gavel's max-min fairness LP for the training jobs of ``problem``.

    Raises:
        ValueError: no training job can run on any GPU type of the cluster.
        RuntimeError: GLOP did not report an optimal solution.
    """
    from ortools.linear_solver import pywraplp

    gpus: dict[str, int] = {}
    for node in problem.nodes:
        if node.state is NodeState.READY and node.gpus > 0:
            gpus[node.gpu_type] = gpus.get(node.gpu_type, 0) + node.gpus
    memory = {t.name: t.memory_gib for t in problem.gpu_types}
    tenant_weight = {t.name: t.weight for t in problem.tenants}

    rows: list[tuple[str, int, float, dict[str, float]]] = []  # (id, scale, w, rho)
    excluded: list[str] = []
    for w in problem.workloads:
        spec = w.training
        if spec is None or not spec.shapes:
            continue
        shape = spec.shapes[0]
        thr = {
            t: x
            for t, x in shape.throughput.items()
            if x > 0
            and gpus.get(t, 0) > 0
            and (not w.allowed_gpu_types or t in w.allowed_gpu_types)
            and memory.get(t, float("inf")) >= spec.gpu_memory_gib
        }
        if not thr:
            excluded.append(w.id)
            continue
        best = max(thr.values())
        weight = w.weight * tenant_weight.get(w.tenant, 1.0)
        rows.append((w.id, shape.gpus, weight, {t: x / best for t, x in thr.items()}))
    if not rows:
        raise ValueError("no training job can run on any GPU type of this cluster")

    # Jobs with the same (scale factor, weight, rho) are interchangeable: the LP
    # is convex and symmetric in them, so averaging an optimal solution over
    # their permutations is optimal too and gives them one allocation. Each
    # class of n such jobs is one row whose GPU use counts n times.
    classes: dict[tuple[int, float, tuple[tuple[str, float], ...]], list[int]] = {}
    for j, (_, scale, weight, rho) in enumerate(rows):
        classes.setdefault((scale, weight, tuple(sorted(rho.items()))), []).append(j)

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:  # pragma: no cover - GLOP ships with OR-Tools
        raise RuntimeError("OR-Tools GLOP is not available")
    z = solver.NumVar(0.0, solver.infinity(), "z")
    x: dict[tuple[int, str], Any] = {}
    per_type: dict[str, list[tuple[float, Any]]] = {t: [] for t in gpus}
    members = list(classes.values())
    for k, ((scale, weight, rho_items), jobs) in enumerate(classes.items()):
        fair = solver.Constraint(0.0, solver.infinity())  # sum_t rho X / w - z >= 0
        fair.SetCoefficient(z, -1.0)
        share = solver.Constraint(0.0, 1.0)  # sum_t X <= 1
        for t, r in rho_items:
            var = solver.NumVar(0.0, 1.0, f"x_{k}_{t}")
            x[(k, t)] = var
            fair.SetCoefficient(var, r / weight)
            share.SetCoefficient(var, 1.0)
            per_type[t].append((float(scale * len(jobs)), var))
    for t, terms in per_type.items():
        cap = solver.Constraint(0.0, float(gpus[t]))  # sum_j scale_j X <= G_t
        for coef, var in terms:
            cap.SetCoefficient(var, coef)
    objective = solver.Objective()
    objective.SetCoefficient(z, 1.0)
    objective.SetMaximization()
    status = solver.Solve()
    if status != pywraplp.Solver.OPTIMAL:
        raise RuntimeError(f"GLOP returned status {status}, not OPTIMAL")

    allocation: dict[str, dict[str, float]] = {}
    for (k, t), var in x.items():
        value = float(var.solution_value())
        if value > 1e-9:
            for j in members[k]:
                allocation.setdefault(rows[j][0], {})[t] = value
    return MaxMinResult(
        value=float(z.solution_value()),
        allocation=allocation,
        jobs=tuple(r[0] for r in rows),
        excluded=tuple(excluded),
    )


def max_min_lp(problem: Problem) -> float:
    """The optimum of Gavel's max-min fairness LP (see the module docstring)."""
    return max_min_allocation(problem).value
