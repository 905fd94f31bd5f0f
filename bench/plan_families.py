"""Planning benchmark over instance families (``bench/families.py``), so a change is
judged on clusters of many shapes, not on the one the planner was developed on.

For every family, size and optimizing policy: one plan in a fresh process (as
``bench/plan_scale.py`` runs them: wall time, peak memory, status, gap), the best
greedy baseline under the same objective, and, where it was computed, the exact
reference: the same instance planned offline with minutes and ``relative_gap`` 0
(``--reference``), kept in ``bench/results/families_reference.json``. A reference
whose status is OPTIMAL is the aggregated model's proven optimum; on families whose
sizes nest (all but ``fragmented``) that is the true optimum of the instance.

Targets (issue 11; ratios and gaps, not timed tests): 1k workloads / 1k nodes, gap
<= 1% in <= 5 s; 10k / 4k, gap <= 2% in <= 20 s and <= 2 GiB; never below the best
greedy baseline; within 1% of the reference where there is one. The table reports
each family's worst case over its seeds, not its average.

    python bench/plan_families.py                          # every family, small and 1k, seed 0
    python bench/plan_families.py --sizes 10k --families slow_fleet,bench
    python bench/plan_families.py --families random --seeds 0-9 --sizes small
    python bench/plan_families.py --reference --sizes small   # compute exact references (slow)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path[:0] = [
        str(Path(__file__).resolve().parents[1]),
        str(Path(__file__).resolve().parents[1] / "proto"),
    ]

from bench import provenance
from bench.families import FAMILIES, SIZES
from bench.plan_scale import run_isolated

RESULTS = Path(__file__).resolve().parent / "results"
OPTIMIZING = ("throughput", "cost", "fairness")
BASELINES = ("priority", "first-fit", "best-fit")  # those that keep strict priority tiers
LIMITS_S = {"small": 2.0, "1k": 5.0, "10k": 20.0}
TARGET_GAP = {"small": 0.01, "1k": 0.01, "10k": 0.02}
REFERENCE_LIMIT_S = {"small": 30.0, "1k": 300.0}


def _seeds(text: str) -> list[int]:
    first, sep, last = text.partition("-")
    return list(range(int(first), int(last) + 1)) if sep else [int(x) for x in text.split(",")]


def _spec(
    family: str,
    size: str,
    seed: int,
    policy: str,
    limit: float,
    gap: float = 1e-4,
    work: float | None = None,
) -> dict[str, Any]:
    n_workloads, n_nodes = SIZES[size]
    return {
        "builder": ["family", family, n_workloads, n_nodes],
        "seed": seed,
        "policy": policy,
        "time_limit_s": limit,
        "work_limit_s": work,
        "relative_gap": gap,
    }


def _key(family: str, size: str, seed: int, policy: str) -> str:
    return f"{family}/{size}/{seed}/{policy}"


def reference(args: argparse.Namespace) -> int:
    """Plan every case with minutes and relative_gap 0; keep the best objective and bound."""
    path = RESULTS / "families_reference.json"
    known: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for family in args.families:
        for size in args.sizes:
            limit = REFERENCE_LIMIT_S.get(size)
            if limit is None:
                continue
            for seed in args.seeds:
                for policy in args.policies:
                    key = _key(family, size, seed, policy)
                    out = run_isolated(_spec(family, size, seed, policy, limit, 0.0), limit * 3 + 120)
                    if not out.get("ok"):
                        print(f"{key}: {out.get('error')}", flush=True)
                        continue
                    known[key] = {
                        "objective": out["objective"],
                        "best_bound": out["best_bound"],
                        "status": out["status"],
                        "time_limit_s": limit,
                        "wall_s": out["wall_s"],
                    }
                    print(
                        f"{key}: {out['status']} {out['objective']:.6g} bound {out['best_bound']}", flush=True
                    )
                    path.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
    return 0


def _baselines(family: str, size: str, seed: int) -> dict[str, tuple[float, int]]:
    """Under each optimizing policy's objective, the best (score, placed) of the greedy
    baselines that keep strict priority (one plan each, scored under every objective)."""
    best: dict[str, tuple[float, int]] = {}
    for name in BASELINES:
        out = run_isolated(_spec(family, size, seed, name, 1.0), 600)
        if out.get("ok"):
            for policy, score in out["scores"].items():
                if policy not in best or score > best[policy][0]:
                    best[policy] = (score, int(out["placed"]))
    return best


def bench(args: argparse.Namespace) -> int:
    refs_path = RESULTS / "families_reference.json"
    refs: Mapping[str, Any] = json.loads(refs_path.read_text()) if refs_path.exists() else {}
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for family in args.families:
        for size in args.sizes:
            for seed in args.seeds:
                baselines = _baselines(family, size, seed)
                for policy in args.policies:
                    limit = args.time_limit or LIMITS_S[size]
                    spec = _spec(family, size, seed, policy, limit, work=args.work_limit)
                    out = run_isolated(spec, limit * 4 + 120)
                    ref = refs.get(_key(family, size, seed, policy))
                    row = _row(family, size, seed, policy, limit, out, baselines.get(policy), ref)
                    runs.append(row)
                    print(_line(row), flush=True)
                    _write(args.out, runs, started)
    _write(args.out, runs, started)
    print(_table(runs))
    return 0


def _row(
    family: str,
    size: str,
    seed: int,
    policy: str,
    limit: float,
    out: Mapping[str, Any],
    baseline: tuple[float, int] | None,
    ref: Mapping[str, Any] | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "family": family,
        "size": size,
        "seed": seed,
        "policy": policy,
        "time_limit_s": limit,
    }
    row["ok"] = bool(out.get("ok"))
    if not row["ok"]:
        row["error"] = out.get("error")
        return row
    keys = ("status", "objective", "best_bound", "gap", "wall_s", "work_s", "stopped_by", "peak_rss_mib")
    for key in (*keys, "placed", "unplaced"):
        row[key] = out.get(key)
    row["instance"] = (
        out.get("instance_summary", {}).get("nodes"),
        out.get("instance_summary", {}).get("gpus"),
    )
    row["best_baseline"] = None if baseline is None else {"objective": baseline[0], "placed": baseline[1]}
    objective = float(out["objective"])
    row["vs_baseline"] = None if baseline is None else objective - baseline[0]
    if ref is not None and ref.get("status") != "OPTIMAL":
        ref = None  # not proven: no exact reference (the policies are lexicographic, so an
        # unproven plan with other floors is no yardstick for this one's objective)
    if ref is not None:
        best = max(float(ref["objective"]), objective)
        row["reference"] = dict(ref)
        row["below_reference"] = (best - objective) / max(abs(best), 1e-9)
    row["met"] = {
        "gap": out.get("gap") is not None and out["gap"] <= TARGET_GAP[size],
        "wall": out["wall_s"] <= limit * 1.05,
        # Lexicographic, as the policies are: a baseline that places fewer workloads is
        # worse whatever its cost or minimum (coverage comes first).
        "baseline": baseline is None
        or baseline[1] < int(out["placed"])
        or objective >= baseline[0] - 1e-6 * max(1.0, abs(baseline[0])),
    }
    if size == "10k":
        row["met"]["memory"] = out["peak_rss_mib"] <= 2048
    if ref is not None:
        row["met"]["reference"] = row["below_reference"] <= 0.01
    return row


def _line(row: Mapping[str, Any]) -> str:
    head = f"{row['family']:11s} {row['size']:5s} seed {row['seed']} {row['policy']:10s}"
    if not row["ok"]:
        return f"{head} ERROR {row.get('error')}"
    gap = "—" if row["gap"] is None else f"{100 * row['gap']:.2f}%"
    ref = "" if "below_reference" not in row else f" ref -{100 * row['below_reference']:.2f}%"
    misses = [k for k, v in row["met"].items() if not v]
    return (
        f"{head} {row['status']:9s} gap {gap:>8s} {row['wall_s']:6.2f} s work {row.get('work_s') or 0:6.2f}"
        f" {row.get('stopped_by') or '-':10s} {row['peak_rss_mib']:6.0f} MiB "
        f"placed {row['placed']}{ref}{'  MISSED: ' + ','.join(misses) if misses else ''}"
    )


def _table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Each family's worst case (over its seeds) per size and policy."""
    worst: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for r in runs:
        key = (r["family"], r["size"], r["policy"])
        old = worst.get(key)
        if old is None or not r["ok"] or (old["ok"] and (r["gap"] or 0) > (old["gap"] or 0)):
            worst[key] = r
    lines = ["| family | size | policy | worst gap | wall s | work s | stopped by | vs reference"
             " | vs best baseline | met |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---|"]  # fmt: skip
    for (family, size, policy), r in sorted(worst.items()):
        if not r["ok"]:
            lines.append(f"| {family} | {size} | {policy} | error | | | | | | no |")
            continue
        gap = "—" if r["gap"] is None else f"{100 * r['gap']:.2f}%"
        ref = "—" if "below_reference" not in r else f"-{100 * r['below_reference']:.2f}%"
        vs = "—" if r["vs_baseline"] is None else f"{r['vs_baseline']:+.4g}"
        met = "yes" if all(r["met"].values()) else "no: " + ", ".join(k for k, v in r["met"].items() if not v)
        lines.append(
            f"| {family} | {size} | {policy} | {gap} | {r['wall_s']:.2f} | {r.get('work_s') or 0:.2f}"
            f" | {r.get('stopped_by', '')} | {ref} | {vs} | {met} |"
        )
    return "\n".join(lines)


def _write(path: Path, runs: Sequence[Mapping[str, Any]], started: float) -> None:
    data = {
        "benchmark": "bench/plan_families.py",
        "machine": provenance.machine(),
        "git": provenance.git("solver_dirty", ("solver",)),
        "elapsed_s": time.perf_counter() - started,
        "runs": list(runs),
        "table": _table(runs),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", type=_csv, default=[f for f in FAMILIES if f != "random"])
    parser.add_argument("--sizes", type=_csv, default=["small", "1k"], help=f"of {', '.join(SIZES)}")
    parser.add_argument("--policies", type=_csv, default=list(OPTIMIZING))
    parser.add_argument("--seeds", type=_seeds, default=[0], help="e.g. 0-9 or 0,3")
    parser.add_argument("--time-limit", type=float, default=None, help="override every size's limit (s)")
    parser.add_argument(
        "--work-limit", type=float, default=None, help="the search's work budget (default: time limit / 2)"
    )
    parser.add_argument("--reference", action="store_true", help="compute exact references instead")
    parser.add_argument("--out", type=Path, default=RESULTS / "plan_families.json")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES] + [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown families or sizes: {', '.join(unknown)}")
    return reference(args) if args.reference else bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
