"""Planning benchmark: every policy on instances built from real data.

    python bench/plan_scale.py                       # what `make bench` runs
    python bench/plan_scale.py --sizes 1k --policies throughput,best-fit
    python bench/plan_scale.py --quick --out /tmp/plan_scale.json   # smoke test

Instances (``bench/instances.py``; the data in ``data/``):

* ``1k``    ``problem(1000, 1000, seed)``: 1,000 workloads on 1,000 nodes;
* ``10k``   ``problem(10000, 4000, seed)``: 10,000 workloads on 4,000 nodes;
* ``gavel`` ``gavel_problem("artifact_evaluation.trace")``: Gavel's physical
  cluster (48 GPUs) with the 15 jobs of its artifact-evaluation trace;
* ``gavel-mmf`` ``gavel_problem("max_min_fairness.trace")``: the same cluster
  with the 96 jobs (169 GPUs asked) of Gavel's max-min fairness trace.

Each (instance, policy) runs in a fresh process (multiprocessing ``spawn``), so
``peak_rss_mib`` (``ru_maxrss`` of that process) is the peak of one plan: the
interpreter, the instance and everything ``plan()`` allocates. ``wall_s`` is
``time.perf_counter()`` around ``plan()`` alone (instance building excluded);
the optimizers get ``PlanOptions(time_limit_s=T)``, which bounds the solver
stages, not the whole call. Every plan, baselines included, is scored under
the ``throughput``, ``cost`` and ``fairness`` objectives with
``solver.verify.objective``, so each optimizer is compared with the best
greedy baseline under its own objective. On Gavel's traces the ``fairness``
plan's objective is compared with Gavel's max-min LP optimum
(``bench.gavel_lp.max_min_lp``).

A run that raises (or dies, or overruns its guard time) is recorded as an
entry with ``"error"`` and the benchmark goes on. Results go to
``bench/results/plan_scale.json`` (rewritten after every run), a Markdown
table to stdout, one progress line per run to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `python bench/plan_scale.py`
    sys.path.insert(0, str(REPO))

from bench import provenance  # noqa: E402
from solver.policies import HeuristicPolicy, get_policy, policy_names  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "plan_scale.json"
OBJECTIVES = ("throughput", "cost", "fairness")


@dataclass(frozen=True)
class Size:
    """One benchmark instance: how to build it, the time limit, the targets."""

    label: str
    builder: tuple[Any, ...]  # ("problem", n_workloads, n_nodes) or ("gavel", trace file)
    time_limit_s: float
    targets: Mapping[str, float] = field(default_factory=dict)  # wall_s, gap, peak_rss_mib

    def describe(self, seed: int) -> str:
        if self.builder[0] == "problem":
            return f"bench.instances.problem({self.builder[1]}, {self.builder[2]}, seed={seed})"
        return f"bench.instances.gavel_problem({self.builder[1]!r})"


SIZES: dict[str, Size] = {
    "1k": Size("1k workloads / 1k nodes", ("problem", 1000, 1000), 2.0, {"wall_s": 2.0, "gap": 0.01}),
    "10k": Size(
        "10k workloads / 4k nodes",
        ("problem", 10000, 4000),
        20.0,
        {"wall_s": 20.0, "gap": 0.02, "peak_rss_mib": 2048.0},
    ),
    "gavel": Size(
        "Gavel physical cluster, artifact_evaluation.trace", ("gavel", "artifact_evaluation.trace"), 2.0
    ),
    "gavel-mmf": Size(
        "Gavel physical cluster, max_min_fairness.trace", ("gavel", "max_min_fairness.trace"), 2.0
    ),
}
# --quick: the same kinds of instance, tiny, with short limits and no targets (a smoke test).
QUICK_SIZES: dict[str, Size] = {
    "1k": Size("quick: 60 workloads / 24 nodes", ("problem", 60, 24), 0.5),
    "10k": Size("quick: 150 workloads / 60 nodes", ("problem", 150, 60), 0.5),
    "gavel": Size("quick: " + SIZES["gavel"].label, SIZES["gavel"].builder, 0.5),
    "gavel-mmf": Size("quick: " + SIZES["gavel-mmf"].label, SIZES["gavel-mmf"].builder, 0.5),
}
DEFAULT_SIZES = ("1k", "10k", "gavel", "gavel-mmf")


# --------------------------------------------------------------------------- the child process


def _build(builder: Sequence[Any], seed: int) -> Any:
    from bench import instances

    if builder[0] == "problem":
        return instances.problem(int(builder[1]), int(builder[2]), seed)
    if builder[0] == "gavel":
        return instances.gavel_problem(str(builder[1]))
    if builder[0] == "family":
        from bench.families import FAMILIES

        return FAMILIES[str(builder[1])](int(builder[2]), int(builder[3]), seed)
    raise ValueError(f"unknown builder {builder!r}")


def _maxrss_mib() -> float:
    # Linux reports KiB, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _run_one(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Build the instance, plan it once, measure. Runs in a fresh process."""
    from bench.instances import summary
    from solver import PlanOptions, plan
    from solver.verify import objective

    t0 = time.perf_counter()
    problem = _build(spec["builder"], spec["seed"])
    build_s = time.perf_counter() - t0
    rss_before = _maxrss_mib()
    options = PlanOptions(
        time_limit_s=spec["time_limit_s"],
        work_limit_s=spec.get("work_limit_s"),
        seed=spec["seed"],
        relative_gap=spec.get("relative_gap", 1e-4),
    )
    t0 = time.perf_counter()
    result = plan(problem, spec["policy"], options)
    wall = time.perf_counter() - t0
    peak = _maxrss_mib()
    m = result.metrics
    return {
        "instance_summary": dict(summary(problem)),
        "build_s": build_s,
        "wall_s": wall,
        "peak_rss_mib": peak,
        "rss_before_plan_mib": rss_before,
        "status": result.status.value,
        "objective": result.objective,
        "best_bound": result.best_bound,
        "gap": result.gap,
        "work_s": result.work_s,
        "stopped_by": result.stopped_by,
        "placed": m.placed,
        "unplaced": m.unplaced,
        "shortfalls": len(result.shortfalls),
        "gpus_used": m.gpus_used,
        "gpus_total": m.gpus_total,
        "cost_per_hour": m.cost_per_hour,
        "normalized_throughput": m.normalized_throughput,
        "served_fraction": m.served_fraction,
        "stage_times_s": dict(result.stage_times_s),
        # plan() time outside the named stages (building the policy's stages, hints, ...).
        "untimed_s": wall - sum(result.stage_times_s.values()),
        # The same placements under every policy's objective (for optimizer vs baseline).
        "scores": {o: objective(problem, result.placements, o) for o in OBJECTIVES},
    }


def _child(spec: Mapping[str, Any], conn: Any) -> None:
    try:
        out: dict[str, Any] = {"ok": True, **_run_one(spec)}
    except BaseException as e:  # recorded, never raised: the benchmark goes on
        out = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
            "peak_rss_mib": _maxrss_mib(),
        }
    conn.send(out)
    conn.close()


def run_isolated(spec: Mapping[str, Any], guard_s: float) -> dict[str, Any]:
    """Run one plan in a fresh spawned process; errors, crashes and overruns become error entries."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(dict(spec), send), daemon=True)
    started = time.perf_counter()
    proc.start()
    send.close()
    out: dict[str, Any] | None = None
    try:
        if recv.poll(guard_s):
            out = recv.recv()
    except EOFError:  # the child died before sending anything
        out = None
    finally:
        recv.close()
    if out is None:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
            out = {"ok": False, "error": f"no result within the guard time of {guard_s:.0f} s (killed)"}
        else:
            proc.join(5)
            out = {
                "ok": False,
                "error": f"the process died with exit code {proc.exitcode} (killed for memory?)",
            }
    else:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    out["process_s"] = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- the benchmark


def _machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ortools_version = version("ortools")
    except PackageNotFoundError:
        ortools_version = None
    return provenance.machine(
        machine=platform.machine(), processor=platform.processor() or None, ortools=ortools_version
    )


def _git() -> dict[str, Any]:
    return provenance.git("solver_dirty", ("solver",))


def _is_optimizer(policy: str) -> bool:
    return not isinstance(get_policy(policy), HeuristicPolicy)


def _relative(a: float, b: float) -> float | None:
    """(a - b) / |b|: how much better a is than b for a maximized objective."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    if abs(b) < 1e-12:
        return 0.0 if abs(a) < 1e-12 else None
    return (a - b) / abs(b)


def compare(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each optimizer run: its objective and every baseline's, under its own objective.

    ``best_baseline`` is the best of all baselines; ``best_strict_baseline`` the best
    of those that keep strict priority tiers as the optimizers do (fcfs and sjf do not).
    """
    baselines = [r for r in runs if not r["optimizer"] and r.get("ok")]
    out = []
    for r in runs:
        if not r["optimizer"] or not r.get("ok"):
            continue
        pol = r["policy"]
        scores = {b["policy"]: b["scores"][pol] for b in baselines}
        placed = {b["policy"]: b["placed"] for b in baselines}
        strict = [b["policy"] for b in baselines if b.get("respects_priority")]
        entry: dict[str, Any] = {
            "policy": pol,
            "objective": r["objective"],
            "placed": r["placed"],
            "baselines": scores,
            "baselines_placed": placed,
        }
        for key, names in (("best_baseline", list(scores)), ("best_strict_baseline", strict)):
            best = max(names, key=lambda k: scores[k]) if names else None
            entry[key] = best
            entry[f"{key}_objective"] = scores[best] if best else None
            entry[f"{key}_placed"] = placed[best] if best else None
            entry[f"vs_{key}"] = _relative(r["objective"], scores[best]) if best else None
        out.append(entry)
    return out


def check_targets(size: Size, run: Mapping[str, Any]) -> dict[str, Any] | None:
    """Each target of the instance, for an optimizer run: limit, measured value, met."""
    if not size.targets or not run["optimizer"]:
        return None
    if not run.get("ok"):
        return {k: {"limit": v, "value": None, "met": False} for k, v in size.targets.items()}
    out = {}
    for key, limit in size.targets.items():
        value = run.get(key)
        out[key] = {"limit": limit, "value": value, "met": value is not None and value <= limit}
    return out


def gavel_lp(size: Size, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The fairness plan's objective vs Gavel's max-min LP optimum on the same trace."""
    from bench.gavel_lp import max_min_allocation

    if size.builder[0] != "gavel":
        return None
    try:
        lp = max_min_allocation(_build(size.builder, 0))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    fair = next((r for r in runs if r["policy"] == "fairness"), None)
    plan_value = fair["objective"] if fair and fair.get("ok") else None
    return {
        "lp_optimum": lp.value,
        "lp_jobs": len(lp.jobs),
        "lp_excluded": list(lp.excluded),
        "fairness_objective": plan_value,
        "fairness_placed": fair.get("placed") if fair else None,
        "fairness_unplaced": fair.get("unplaced") if fair else None,
        "ratio": plan_value / lp.value if plan_value is not None and lp.value > 0 else None,
        "note": (
            "The LP time-shares GPUs (fractions of time on each type) over all jobs, so it bounds an "
            "integer plan that runs every job at once; the planner's fairness objective is the min of "
            "rho/w over the placed jobs only, so with unplaced jobs the ratio can exceed 1."
        ),
    }


# --------------------------------------------------------------------------- output


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return str(x)


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _signed(x: float | None) -> str:
    if x is None:
        return "—"
    return _pct(0.0) if abs(x) < 5e-5 else ("+" if x > 0 else "") + _pct(x)


def markdown(results: Mapping[str, Any]) -> str:
    lines = [
        "| instance | policy | status | wall s | gap | peak MiB | placed | GPUs used | objective "
        "| best baseline (same objective) | vs best baseline | vs best strict-priority baseline |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for inst in results["instances"]:
        comp = {c["policy"]: c for c in inst["comparison"]}
        for r in inst["runs"]:
            if not r.get("ok"):
                lines.append(
                    f"| {inst['name']} | {r['policy']} | ERROR | | | {_fmt(r.get('peak_rss_mib'), 4)} | | | "
                    f"{r.get('error', '')[:80]} | | | |"
                )
                continue
            c = comp.get(r["policy"])
            best = f"{c['best_baseline']}: {_fmt(c['best_baseline_objective'], 6)}" if c else ""
            vs = _signed(c["vs_best_baseline"]) if c else ""
            vs_strict = f"{_signed(c['vs_best_strict_baseline'])} ({c['best_strict_baseline']})" if c else ""
            lines.append(
                f"| {inst['name']} | {r['policy']} | {r['status']} | {r['wall_s']:.2f} | {_pct(r['gap'])} | "
                f"{r['peak_rss_mib']:.0f} | {r['placed']}/{r['placed'] + r['unplaced']} | "
                f"{r['gpus_used']}/{r['gpus_total']} | {_fmt(r['objective'], 6)} | "
                f"{best} | {vs} | {vs_strict} |"
            )
    gavel = [i for i in results["instances"] if i.get("gavel_lp")]
    if gavel:
        lines += [
            "",
            "| instance | fairness plan (min ρ/w) | Gavel max-min LP | plan / LP | placed |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for inst in gavel:
            g = inst["gavel_lp"]
            if "error" in g:
                lines.append(f"| {inst['name']} | | ERROR: {g['error']} | | |")
                continue
            placed = (
                f"{g['fairness_placed']}/{g['fairness_placed'] + g['fairness_unplaced']}"
                if g["fairness_placed"] is not None
                else "—"
            )
            lines.append(
                f"| {inst['name']} | {_fmt(g['fairness_objective'])} | {_fmt(g['lp_optimum'])} | "
                f"{_fmt(g['ratio'], 3)} | {placed} |"
            )
    targets = [(i, r) for i in results["instances"] for r in i["runs"] if r.get("targets")]
    if targets:
        lines += [
            "",
            "| instance | policy | target | limit | measured | met |",
            "| --- | --- | --- | ---: | ---: | --- |",
        ]
        for inst, r in targets:
            for key, t in r["targets"].items():
                value = _pct(t["value"]) if key == "gap" else _fmt(t["value"], 4)
                limit = _pct(t["limit"], 0) if key == "gap" else _fmt(t["limit"])
                met = "yes" if t["met"] else "NO"
                lines.append(f"| {inst['name']} | {r['policy']} | {key} | {limit} | {value} | {met} |")
    return "\n".join(lines)


def _progress(i: int, n: int, inst: str, r: Mapping[str, Any]) -> None:
    if r.get("ok"):
        gap = "" if r["gap"] is None else f", gap {_pct(r['gap'])}"
        msg = (
            f"{r['status']}, {r['wall_s']:.2f} s{gap}, {r['peak_rss_mib']:.0f} MiB, "
            f"objective {_fmt(r['objective'], 6)}, placed {r['placed']}/{r['placed'] + r['unplaced']}"
        )
    else:
        msg = f"ERROR {r.get('error')}"
    print(f"[{i}/{n}] {inst} {r['policy']}: {msg}", file=sys.stderr, flush=True)


def _write(path: Path, results: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False, default=str) + "\n")
    tmp.replace(path)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--sizes", type=_csv, default=list(DEFAULT_SIZES), help=f"comma-separated, of {', '.join(SIZES)}"
    )
    ap.add_argument(
        "--policies", type=_csv, default=None, help="comma-separated (default: all of solver.policy_names())"
    )
    ap.add_argument("--seed", type=int, default=0, help="instance and solver seed (default 0)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    ap.add_argument("--quick", action="store_true", help="tiny instances and 0.5 s limits (smoke test)")
    ap.add_argument("--time-limit", type=float, default=None, help="override every instance's time limit (s)")
    args = ap.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    bad = [s for s in args.sizes if s not in sizes]
    if bad:
        ap.error(f"unknown sizes {bad}; choose from {', '.join(sizes)}")
    known = policy_names()
    args.policies = list(known) if args.policies is None else args.policies
    bad = [p for p in args.policies if p not in known]
    if bad:
        ap.error(f"unknown policies {bad}; choose from {', '.join(known)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    table = QUICK_SIZES if args.quick else SIZES
    # Optimizers first, then baselines, in the registry's order.
    policies = sorted(args.policies, key=lambda p: (not _is_optimizer(p), policy_names().index(p)))
    command = "python bench/plan_scale.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    results: dict[str, Any] = {
        "benchmark": "plan_scale",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": _machine(),
        "git": _git(),
        "config": {"seed": args.seed, "quick": args.quick, "sizes": args.sizes, "policies": policies},
        "instances": [],
        "errors": [],
    }
    total = len(args.sizes) * len(policies)
    done = 0
    for name in args.sizes:
        size = table[name]
        limit = args.time_limit if args.time_limit is not None else size.time_limit_s
        print(f"== {name}: {size.label}, time limit {limit:g} s", file=sys.stderr, flush=True)
        inst: dict[str, Any] = {
            "name": name,
            "label": size.label,
            "builder": size.describe(args.seed),
            "time_limit_s": limit,
            "targets": dict(size.targets),
            "summary": None,
            "runs": [],
            "comparison": [],
            "gavel_lp": None,
        }
        results["instances"].append(inst)
        for policy in policies:
            spec = {"builder": list(size.builder), "seed": args.seed, "policy": policy, "time_limit_s": limit}
            load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            r = run_isolated(spec, guard_s=max(180.0, 10 * limit + 120))
            r["load_average_before"] = load
            pol = get_policy(policy)
            r = {
                "policy": policy,
                "optimizer": _is_optimizer(policy),
                "respects_priority": getattr(pol, "respects_priority", True),
                **r,
            }
            summary = r.pop("instance_summary", None)
            if inst["summary"] is None and summary is not None:
                inst["summary"] = summary
            r["targets"] = check_targets(size, r)
            if not r.get("ok"):
                results["errors"].append({"instance": name, "policy": policy, "error": r.get("error")})
            inst["runs"].append(r)
            done += 1
            _progress(done, total, name, r)
            inst["comparison"] = compare(inst["runs"])
            _write(args.out, _json_safe(results))
        inst["gavel_lp"] = gavel_lp(size, inst["runs"])
        _write(args.out, _json_safe(results))
    print(markdown(results))
    print(f"\nresults: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
