"""Rounding an LP solution that splits services over GPU types
(``solver.formulation.round_down``): a service runs on one type, so where the
type the LP put most of it on cannot hold it, it moves whole to a type with
room rather than losing replicas; and in "first" mode, services (a higher tier)
come before the jobs of lower tiers."""

from __future__ import annotations

from solver.aggregate import build_index
from solver.formulation import Formulation, build_formulation, round_down
from tests.builders import node, problem, serve, train


def _lp_values(form: Formulation, replicas: dict[tuple[str, str], float]) -> tuple[float, ...]:
    """LP values that run ``replicas[(service, type)]`` replicas (fractions allowed)."""
    values = [0.0] * len(form.model.vars)
    index = form.index
    for (wid, t), r in replicas.items():
        c = index.classes[index.workload_class[wid]]
        o = next(o for o, opt in enumerate(c.options) if opt.gpu_type == t)
        values[form.n[c.index, o].index] = r
        values[form.y[c.index].index] = 1.0
    return tuple(values)


def _types(form: Formulation, counts: dict[tuple[int, int], int]) -> dict[str, tuple[str, int]]:
    index = form.index
    out: dict[str, tuple[str, int]] = {}
    for (ci, o), k in counts.items():
        c = index.classes[ci]
        if not c.is_training:
            t, n = out.get(c.members[0].id, (c.options[o].gpu_type, 0))
            out[c.members[0].id] = (t, n + k)
    return out


def test_a_split_service_moves_whole_to_a_type_with_room() -> None:
    # Two 1-GPU a100 nodes, two 1-GPU h100 nodes; three services of one replica each.
    # The LP put 0.6 of each on a100 (2 GPUs for 3 services) and 0.4 on h100.
    types = ("a100", "h100")
    p = problem(
        [node("a0", "a100", 1), node("a1", "a100", 1), node("h0", "h100", 1), node("h1", "h100", 1)],
        [serve(f"s{i}", types=types) for i in range(3)],
    )
    form = build_formulation(build_index(p))
    values = _lp_values(form, {(f"s{i}", t): 0.6 if t == "a100" else 0.4 for i in range(3) for t in types})
    placed = _types(form, round_down(form, values, services="fit"))
    assert sorted(placed.values()) == [("a100", 1), ("a100", 1), ("h100", 1)]  # none lost


def test_first_rounding_lets_lower_tier_jobs_give_way_to_services() -> None:
    # One 2-GPU node; a priority-10 service of 2 replicas that the LP served halfway,
    # and a priority-0 job of 1 GPU the LP ran whole.
    p = problem(
        [node("a0", "a100", 2)],
        [serve("svc", target_rps=20.0, priority=10), train("job", 1, {"a100": 1.0})],
    )
    form = build_formulation(build_index(p))
    values = list(_lp_values(form, {("svc", "a100"): 1.5}))
    index = form.index
    job = index.classes[index.workload_class["job"]]
    values[form.n[job.index, 0].index] = 1.0
    fit = round_down(form, tuple(values), services="fit")
    first = round_down(form, tuple(values), services="first")
    assert _types(form, fit) == {"svc": ("a100", 1)} and (job.index, 0) in fit  # the job keeps its GPU
    assert _types(form, first) == {"svc": ("a100", 2)} and (job.index, 0) not in first
