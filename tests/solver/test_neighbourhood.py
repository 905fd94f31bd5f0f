"""The RINS step of the pipeline (``solver.pipeline._neighbourhood``): the integer
variables on which the LP optimum and the incumbent agree stay, the rest is searched.
What it returns is a solution of the whole model, no worse than the incumbent."""

from __future__ import annotations

import pytest

from bench.families import FAMILIES
from solver import PlanOptions
from solver.aggregate import build_index
from solver.backends import get_backend
from solver.formulation import build_formulation
from solver.greedy import greedy_place
from solver.linear import SolveStatus
from solver.pipeline import _neighbourhood
from solver.policies import get_policy


@pytest.mark.parametrize("family", ["trtllm", "zonal", "fragmented"])
def test_the_neighbourhood_of_the_incumbent_is_searched_and_its_answer_is_feasible(family: str) -> None:
    index = build_index(FAMILIES[family](60, 30, 1))
    form = build_formulation(index)
    stage = get_policy("throughput").stages(form, PlanOptions())[0]
    form.model.maximize(stage.terms, stage.constant)
    backend = get_backend("highs")
    lp = backend.solve_lp(form.model, time_limit_s=30)
    assert lp.status is SolveStatus.OPTIMAL
    hint = form.hint(greedy_place(index, "smallest-first").values())
    incumbent = tuple(hint.get(i, 0.0) for i in range(len(form.model.vars)))
    found = _neighbourhood(form.model, backend, lp.values, incumbent, frozenset(), 10.0, seed=0)
    assert found is not None
    assert form.model.violations(found) == []
    # the variables where the LP and the incumbent agree kept the incumbent's value
    agree = [
        v.index for v in form.model.vars if v.integer and abs(lp.values[v.index] - incumbent[v.index]) < 1e-6
    ]
    assert agree and all(found[i] == incumbent[i] for i in agree)
    assert form.model.objective_value(found) >= form.model.objective_value(incumbent) - 1e-9
    assert form.model.objective_value(found) <= lp.objective + 1e-6
