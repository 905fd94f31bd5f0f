"""The ``apportion`` command line.

    apportion plan --inventory FILE --workloads FILE [--current PLAN.json]
                   [--policy NAME] [--time-limit S] [--seed N] [--max-migrations N]
                   [--backend ortools|pulp] [--format table|json] [-o FILE]
    apportion explain WORKLOAD_ID --inventory FILE --workloads FILE [...]
    apportion --version

Thin on purpose: parse the arguments, load the files through
:mod:`server.convert`, call :func:`solver.plan` / :func:`solver.explain`, render.

Exit status: 0 a plan was made (workloads left unplaced are part of a plan, not
an error); 1 the solver failed or the model was infeasible (the plan is still
printed); 2 bad input or usage: every offending field is named on stderr by
its path, without a traceback.

``--format json`` prints exactly the plan JSON on stdout; progress lines and
messages go to stderr. Progress is shown when stderr is a terminal, or always
with ``--progress`` (``--no-progress`` turns it off).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import solver
from server import convert, render
from solver import PlanOptions, PlanStatus, Problem, ValidationError, Violation

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad command-line arguments (argparse's own errors are turned into this)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and sys.exit(2)
        raise UsageError(f"{self.format_usage()}{self.prog}: error: {message}")


def _version() -> str:
    try:
        return metadata.version("apportion")
    except metadata.PackageNotFoundError:
        return "0+unknown (not installed)"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="apportion",
        description="Optimization-based allocation of GPUs to training jobs and inference services.",
    )
    parser.add_argument("--version", action="version", version=f"apportion {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    inputs = _Parser(add_help=False)
    group = inputs.add_argument_group("input")
    group.add_argument(
        "--inventory", required=True, type=Path, metavar="FILE", help="inventory (YAML or JSON)"
    )
    group.add_argument(
        "--workloads", required=True, type=Path, metavar="FILE", help="workloads (YAML or JSON)"
    )
    group.add_argument(
        "--current", type=Path, metavar="PLAN", help="what runs now: a plan JSON, for a stable re-plan"
    )
    solve = inputs.add_argument_group("solver")
    solve.add_argument("--policy", default="throughput", help="objective (default: throughput)")
    solve.add_argument(
        "--time-limit",
        type=_positive_float,
        default=PlanOptions.time_limit_s,
        metavar="S",
        help=f"wall-clock budget of the solver in seconds (default: {PlanOptions.time_limit_s:g})",
    )
    solve.add_argument("--seed", type=int, default=PlanOptions.seed, help="solver random seed (default: 0)")
    solve.add_argument(
        "--relative-gap",
        type=float,
        default=PlanOptions.relative_gap,
        metavar="G",
        help=f"stop once proven this close to the bound (default: {PlanOptions.relative_gap:g})",
    )
    solve.add_argument(
        "--max-migrations",
        type=_non_negative_int,
        metavar="N",
        help="most running workloads to move or stop (with --current)",
    )
    solve.add_argument(
        "--backend",
        choices=("ortools", "pulp"),
        default=PlanOptions.backend,
        help="solver backend (default: ortools)",
    )
    solve.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=PlanOptions.num_workers,
        metavar="N",
        help="CP-SAT search workers (default: 1)",
    )
    solve.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show solver stages on stderr (default: when stderr is a terminal)",
    )

    plan = sub.add_parser(
        "plan",
        parents=[inputs],
        help="compute a plan from files",
        description="Compute a plan for the workloads on the inventory.",
    )
    plan.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    plan.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write the output here instead of stdout"
    )
    plan.set_defaults(run=_cmd_plan)

    explain = sub.add_parser(
        "explain",
        parents=[inputs],
        help="why a workload is placed where it is, or not",
        description="Plan, then explain one workload's placement or why it is left out.",
    )
    explain.add_argument("workload_id", metavar="WORKLOAD_ID")
    explain.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    explain.set_defaults(run=_cmd_explain)

    serve = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the Apportion gRPC server: durable state in SQLite, continuous re-planning.",
    )
    serve.add_argument("--listen", default="127.0.0.1:50051", metavar="ADDR", help="host:port to listen on")
    serve.add_argument("--db", type=Path, default=Path("apportion.db"), help="SQLite state file")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates from this CA (mTLS)",
    )
    serve.add_argument("--tokens", type=Path, metavar="FILE", help="bearer tokens (YAML: TOKEN: {tenant: T})")
    serve.add_argument(
        "--insecure", action="store_true", help="allow plain text (and no tokens), only on a loopback address"
    )
    serve.add_argument("--metrics-port", type=int, metavar="P", help="serve Prometheus metrics on this port")
    serve.add_argument("--policy", default="throughput", help="objective of the control loop's plans")
    serve.add_argument(
        "--plan-time-limit", type=_positive_float, default=5.0, metavar="S", help="solver budget per re-plan"
    )
    serve.add_argument(
        "--migration-penalty",
        type=float,
        default=PlanOptions.migration_penalty,
        metavar="X",
        help="objective a move of a running workload must gain",
    )
    serve.add_argument(
        "--max-migrations",
        type=_non_negative_int,
        metavar="N",
        help="most moves per re-plan",
    )
    serve.add_argument(
        "--debounce", type=_positive_float, default=0.2, metavar="S", help="quiet time before a re-plan"
    )
    serve.add_argument(
        "--solver-processes", type=_positive_int, default=2, metavar="N", help="solver processes"
    )
    serve.add_argument(
        "--rate-limit", type=float, default=0.0, metavar="R", help="requests/s per caller (0: no limit)"
    )
    serve.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format")
    serve.add_argument("--log-level", default="INFO", help="log level")
    serve.set_defaults(run=_cmd_serve)
    return parser


class _Progress:
    """The ``progress`` callback of PlanOptions: one line per stage on stderr
    (rewritten in place on a terminal)."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.shown = False

    def __call__(self, stage: str, elapsed_s: float) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[Kplanning: {stage} ({elapsed_s:.1f} s)")
        else:
            self.stream.write(f"apportion: {stage} at {elapsed_s:.2f} s\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _load(args: argparse.Namespace) -> Problem:
    """The problem from the files, after checking the policy name: every problem at once."""
    violations: list[Violation] = []
    known = solver.policy_names()
    if args.policy not in known:
        violations.append(
            Violation("--policy", f'unknown policy "{args.policy}" (known: {", ".join(known)})')
        )
    try:
        problem = convert.load_problem(args.inventory, args.workloads, args.current)
    except ValidationError as exc:
        violations.extend(exc.violations)
    if violations:
        raise ValidationError(violations)
    return problem


def _solve(args: argparse.Namespace, problem: Problem) -> solver.Plan:
    stderr = sys.stderr
    tty = stderr.isatty()
    show = tty if args.progress is None else args.progress
    progress = _Progress(stderr, tty) if show else None
    options = PlanOptions(
        time_limit_s=args.time_limit,
        seed=args.seed,
        relative_gap=args.relative_gap,
        backend=args.backend,
        max_migrations=args.max_migrations,
        num_workers=args.num_workers,
        progress=progress,
    )
    start = time.perf_counter()
    try:
        return solver.plan(problem, policy=args.policy, options=options)
    finally:
        if progress is not None:
            progress.close()
            if not tty:
                stderr.write(f"apportion: planned in {time.perf_counter() - start:.2f} s\n")


def _write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    output.write_text(text, encoding="utf-8")


def _cmd_plan(args: argparse.Namespace) -> int:
    problem = _load(args)
    plan = _solve(args, problem)
    if args.format == "json":
        text = json.dumps(convert.plan_to_dict(plan), indent=2, ensure_ascii=False) + "\n"
    else:
        text = render.render_plan(plan, problem)
    try:
        _write(text, args.output)
    except OSError as exc:
        raise ValidationError(
            [Violation("--output", f"cannot write {args.output}: {exc.strerror or exc}")]
        ) from exc
    return EXIT_FAILED if plan.status is PlanStatus.INFEASIBLE else EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    problem = _load(args)
    if all(w.id != args.workload_id for w in problem.workloads):
        raise ValidationError(
            [Violation("WORKLOAD_ID", f'no workload "{args.workload_id}" in {args.workloads}')]
        )
    plan = _solve(args, problem)
    explanation = solver.explain(problem, plan, args.workload_id)
    if args.format == "json":
        placement = plan.placement(args.workload_id)
        data = {
            "workload_id": explanation.workload_id,
            "placed": explanation.placed,
            "summary": explanation.summary,
            "details": list(explanation.details),
            "placement": None
            if placement is None
            else convert.message_to_dict(convert.placement_to_message(placement)),
        }
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        text = render.render_explanation(
            explanation.workload_id, explanation.placed, explanation.summary, explanation.details
        )
    _write(text, None)
    return EXIT_FAILED if plan.status is PlanStatus.INFEASIBLE else EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from server import app, auth, logs  # grpc and the server only when serving
    from server.control import LoopConfig

    logs.configure(args.log_level, args.log_format)
    if args.policy not in solver.policy_names():
        known = ", ".join(solver.policy_names())
        raise ValidationError([Violation("--policy", f'unknown policy "{args.policy}" (known: {known})')])
    config = app.ServerConfig(
        listen=args.listen,
        db=args.db,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        tokens=args.tokens,
        insecure=args.insecure,
        metrics_port=args.metrics_port,
        loop=LoopConfig(
            policy=args.policy,
            time_limit_s=args.plan_time_limit,
            migration_penalty=args.migration_penalty,
            max_migrations=args.max_migrations,
            debounce_s=args.debounce,
        ),
        solver_processes=args.solver_processes,
        rate_limit=args.rate_limit,
    )
    try:
        return app.run(config)
    except (auth.ConfigError, auth.TokenFileError) as exc:
        sys.stderr.write(f"apportion: {exc}\n")
        return EXIT_BAD_INPUT


def _report(violations: Sequence[Violation]) -> None:
    count = len(violations)
    noun = "problem" if count == 1 else "problems"
    lines = [f"apportion: invalid input ({count} {noun}):"] + [f"  {v}" for v in violations]
    sys.stderr.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        status: int = args.run(args)
    except ValidationError as exc:
        _report(exc.violations)
        return EXIT_BAD_INPUT
    except solver.UnknownPolicyError as exc:
        sys.stderr.write(f"apportion: {exc}\n")
        return EXIT_BAD_INPUT
    except solver.SolverError as exc:
        sys.stderr.write(f"apportion: solver failed: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("apportion: interrupted\n")
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
