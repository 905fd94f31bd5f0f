"""The ``apportion`` command line.

Files (no server):

    apportion plan --inventory FILE --workloads FILE [--current PLAN.json]
                   [--policy NAME] [--time-limit S] [--seed N] [--max-migrations N]
                   [--backend ortools|pulp] [--format table|json] [-o FILE]
    apportion explain WORKLOAD_ID --inventory FILE --workloads FILE [...]
    apportion serve [--listen ADDR] [--db PATH] [--tls-cert PEM --tls-key PEM] [--tokens FILE] ...
    apportion worker --server ADDR [--gpus auto|N --gpu-type T] [--node-id ID] ...   # the node agent
    apportion --version

A client of a server (``apportion serve``):

    apportion plan --server ADDR --inventory FILE --workloads FILE [...]   # the Plan RPC
    apportion explain WORKLOAD_ID [--server ADDR]     # without --inventory/--workloads
    apportion submit -f WORKLOADS_FILE
    apportion get WORKLOAD_ID
    apportion list [--tenant T] [--kind training|inference] [--state STATE]
    apportion cancel WORKLOAD_ID
    apportion get-plan                                # the plan the server runs now
    apportion nodes                                   # nodes, GPU types, tenants
    apportion apply-inventory -f INVENTORY_FILE       # add or replace them (admin)
    apportion drain NODE_ID                           # (admin)
    apportion watch [--from-revision N] [--tenant T] [--limit N]
    apportion logs WORKLOAD_ID [-f] [--tail N]        # its processes' output, kept by the server
    apportion generate SERVICE --prompt TEXT [--max-tokens N] [--temperature T]

    common to them: [--server ADDR] [--token TOKEN] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM]
                    [--timeout S] [-o table|json]

Thin on purpose: parse the arguments, load the files through
:mod:`server.convert`, call :func:`solver.plan` / :func:`solver.explain` or the
server through :class:`apportion.client.Client`, render.

The server is ``--server`` or else ``$APPORTION_SERVER`` or else
``127.0.0.1:50051``; the token ``--token`` or else ``$APPORTION_TOKEN``. The
channel is plain text to a loopback address and TLS otherwise, or whenever a
``--tls-*`` file is given (``--tls-cert``/``--tls-key``: mutual TLS).
``plan`` and ``explain`` keep working on files alone: ``plan`` calls the
server only with an explicit ``--server`` (then the server plans the same
files with the same options, and the output is the local one's: same table,
same JSON, stage times aside — they are measured, and the server's map does not
keep their order, so they are listed in pipeline order); ``explain`` asks the
server when it is given no ``--inventory``/``--workloads``.

Output. ``-o table`` (the default) is for people; ``-o json`` prints the
answer's JSON mapping (field names as in the files, the files' own format):
``get`` a workload status; ``submit``, ``list`` and ``cancel``
``{"workloads": [...]}``; ``nodes`` an inventory document (what
``apply-inventory`` reads); ``drain`` the node; ``get-plan`` the plan document
(what ``plan --format json`` prints and ``--current`` reads; its revision is in
the table); ``watch`` one event per line (JSON lines); ``logs`` one line per
log line, ``[SHARD:RANK] TEXT`` (``-o json``: the LogLine's JSON per line);
``generate`` the generated text (``-o json``: the whole response). ``plan`` and ``explain``
keep ``--format``. As in every proto3 JSON mapping, 64-bit integers (revisions)
are written as strings.

``submit`` checks the whole file first (structure, as ``plan`` does), then
sends each workload with a request id derived from its content, so running it
again on the same file creates nothing twice and shows the workloads' states.
Workloads the server rejects are reported (with their file paths,
``workloads[2].training.gpus``) and the others are still submitted.

Exit status:

    0    done (a plan was made: workloads left unplaced are part of a plan, not an error)
    1    the solver failed or the model was infeasible (the plan is still printed); or the
         server answered NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, PERMISSION_DENIED,
         UNAUTHENTICATED, RESOURCE_EXHAUSTED or another error, or cannot be reached
         (UNAVAILABLE: "cannot reach the server at ADDR") — one line on stderr
    2    bad input or usage: every offending field is named on stderr by its path,
         without a traceback — found in the files before any call, or by the server
         (INVALID_ARGUMENT, whose field violations are printed the same way)
    130  interrupted (Ctrl-C), except ``watch``, for which Ctrl-C is the way to stop: 0

``--format json`` prints exactly the plan JSON on stdout; progress lines and
messages go to stderr. Progress is shown when stderr is a terminal, or always
with ``--progress`` (``--no-progress`` turns it off).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from grpc import StatusCode

import solver
from apportion.client import ApportionError, Client, ConfigError
from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from server import convert, render
from server.auth import DEFAULT_RATE_PER_S
from solver import PlanOptions, PlanStatus, Problem, ValidationError, Violation
from solver.backends import BACKENDS
from solver.model import WORK_SHARE

if TYPE_CHECKING:
    from server import app

__all__ = ["main"]

M = TypeVar("M", pb.WorkloadList, pb.Inventory)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DEFAULT_SERVER = "127.0.0.1:50051"
SERVER_ENV = "APPORTION_SERVER"
TOKEN_ENV = "APPORTION_TOKEN"
STATES = ("PENDING", "PLACED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
PLAN_MARGIN_S = 30.0  # of a Plan call's deadline beyond the solver's time limit
# Pipeline stages in the order solver.plan runs them ("solve: NAME" stages after "round").
PIPELINE: tuple[str, ...] = ("validate", "aggregate", "greedy", "model", "lp", "round", "solve")
PIPELINE += ("complete", "disaggregate", "repair", "verify", "explain")
# Errors after which submitting the next workloads of a file is pointless.
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
FATAL = frozenset(
    {
        StatusCode.UNAVAILABLE,
        StatusCode.UNAUTHENTICATED,
        StatusCode.PERMISSION_DENIED,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.RESOURCE_EXHAUSTED,
    }
)


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

    inputs = _inputs_parser(required=True)
    explain_inputs = _inputs_parser(required=False)

    plan = sub.add_parser(
        "plan",
        parents=[inputs],
        help="compute a plan from files (here, or on a server with --server)",
        description="Compute a plan for the workloads on the inventory: here, or with --server ADDR "
        "on that server (the Plan RPC: stateless, no server state touched), with the same output.",
    )
    plan.add_argument(
        "-o",
        "--output",
        "--format",
        dest="format",
        choices=("table", "json"),
        default="table",
        help="output format, as in every command (default: table)",
    )
    plan.add_argument("--out", type=Path, metavar="FILE", help="write the output to FILE instead of stdout")
    _remote_options(plan, explicit=True)
    plan.set_defaults(run=_cmd_plan)

    explain = sub.add_parser(
        "explain",
        parents=[explain_inputs],
        help="why a workload is placed where it is, or not",
        description="Explain one workload's placement or why it is left out: of a plan of the files "
        "(--inventory and --workloads; planned on --server if given), or else of the server's plan.",
    )
    explain.add_argument("workload_id", metavar="WORKLOAD_ID")
    explain.add_argument(
        "--format", "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    _remote_options(explain, explicit=True)
    explain.set_defaults(run=_cmd_explain)

    _client_commands(sub)

    serve = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the Apportion gRPC server: durable state in SQLite, continuous re-planning.",
    )
    _serve_options(serve)
    serve.set_defaults(run=_cmd_serve)

    worker = sub.add_parser(
        "worker",
        help="run the node agent: register this machine's GPUs and run what the plan gives them",
        description="Run the Apportion node agent (worker.agent): register this node with the server, "
        "keep its stream, launch and stop the processes of the shards the plan puts here.",
    )
    _worker_options(worker)
    worker.set_defaults(run=_cmd_worker)
    return parser


def _worker_options(parser: argparse.ArgumentParser) -> None:
    from worker import agent  # grpc and the agent only for this command

    agent.add_arguments(parser)


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker import agent

    return agent.run_command(args)


def _inputs_parser(*, required: bool) -> _Parser:
    """The files and solver options of ``plan`` and ``explain`` (a parent parser)."""
    inputs = _Parser(add_help=False)
    group = inputs.add_argument_group("input")
    group.add_argument(
        "--inventory", required=required, type=Path, metavar="FILE", help="inventory (YAML or JSON)"
    )
    group.add_argument(
        "--workloads", required=required, type=Path, metavar="FILE", help="workloads (YAML or JSON)"
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
        help=f"wall-clock limit of the whole command in seconds (default: {PlanOptions.time_limit_s:g})",
    )
    solve.add_argument(
        "--work-limit",
        type=_positive_float,
        default=None,
        metavar="S",
        help="the search's budget of deterministic work in work seconds, about a CPU second each on"
        f" the reference machine (default: {WORK_SHARE:g} x --time-limit); the same input, seed and"
        " work limit give the same plan on any machine, unless the time limit cuts it",
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
        choices=BACKENDS,
        default=PlanOptions.backend,
        help=f"solver backend (default: {PlanOptions.backend}; ortools: CP-SAT, pulp: CBC)",
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
    return inputs


def _remote_options(parser: argparse.ArgumentParser, *, explicit: bool = False) -> None:
    """``--server``, ``--token``, TLS files and ``--timeout`` of the client commands."""
    group = parser.add_argument_group("server")
    where = (
        "call this server (default: work on the files here)"
        if explicit
        else f"the server (default: ${SERVER_ENV}, else {DEFAULT_SERVER})"
    )
    group.add_argument("--server", metavar="ADDR", help=where)
    group.add_argument("--token", metavar="TOKEN", help=f"bearer token (default: ${TOKEN_ENV})")
    group.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA to trust (default: the system's)")
    group.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key (mutual TLS)")
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="deadline of each call in seconds (default: 30; plan: its time limit + 30)",
    )


def _output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format (default: table)"
    )


def _client_commands(sub: Any) -> None:
    def command(name: str, help: str, run: Any, *, output: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + "."
        )
        if output:
            _output_option(parser)
        _remote_options(parser)
        parser.set_defaults(run=run)
        return parser

    submit = command("submit", "submit the workloads of a file to the server", _cmd_submit)
    submit.add_argument(
        "-f", "--file", required=True, type=Path, metavar="FILE", help="workloads (YAML or JSON)"
    )
    apply_workloads = command(
        "apply",
        "make the server's workloads what a file says: create the new ones, update the changed "
        "ones (a new version), leave the others; says which per workload",
        _cmd_apply_workloads,
    )
    apply_workloads.add_argument(
        "-f", "--file", required=True, type=Path, metavar="FILE", help="workloads (YAML or JSON)"
    )
    get = command("get", "show a workload of the server", _cmd_get)
    get.add_argument("workload_id", metavar="WORKLOAD_ID")
    listing = command("list", "list the server's workloads", _cmd_list)
    listing.add_argument("--tenant", default="", help="only this tenant's (admin; default: all you may see)")
    listing.add_argument("--kind", choices=("training", "inference"), default="", help="only this kind")
    listing.add_argument(
        "--state",
        type=str.upper,
        choices=STATES,
        default="",
        metavar="STATE",
        help=f"only in this state: {', '.join(STATES)}",
    )
    trail = command("audit", "show the audit trail: who changed what, when, how it ended (admin)", _cmd_audit)
    trail.add_argument("--principal", default="", help="only this caller's (as the trail names it)")
    trail.add_argument("--id", default="", help="only requests naming this workload, node or GPU type")
    trail.add_argument("--since", type=float, default=0.0, metavar="UNIX_S", help="from this time")
    trail.add_argument("--until", type=float, default=0.0, metavar="UNIX_S", help="to this time")
    trail.add_argument("--limit", type=_non_negative_int, default=100, metavar="N", help="at most N (0: all)")
    cancel = command("cancel", "cancel a workload", _cmd_cancel)
    cancel.add_argument("workload_id", metavar="WORKLOAD_ID")
    command("get-plan", "show the plan the server runs now", _cmd_get_plan)
    command("nodes", "show the server's nodes, GPU types and tenants", _cmd_nodes)
    apply = command(
        "apply-inventory", "add or replace the GPU types, nodes and tenants of a file (admin)", _cmd_apply
    )
    apply.add_argument(
        "-f", "--file", required=True, type=Path, metavar="FILE", help="inventory (YAML or JSON)"
    )
    drain = command(
        "drain", "mark a node draining: its workloads move off, nothing new lands (admin)", _cmd_drain
    )
    drain.add_argument("node_id", metavar="NODE_ID")
    undrain = command(
        "undrain", "mark a draining node ready again: new work may land on it (admin)", _cmd_undrain
    )
    undrain.add_argument("node_id", metavar="NODE_ID")
    usage = command(
        "usage", "show each tenant's GPUs held (placed and running) against its quotas", _cmd_usage
    )
    usage.add_argument("--tenant", default="", help="only this tenant (admin; default: all you may see)")
    watch = command("watch", "follow the server's changes, one line each, until Ctrl-C", _cmd_watch)
    watch.add_argument(
        "--from-revision",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="start after this revision (default: 0, everything the server keeps)",
    )
    watch.add_argument("--tenant", default="", help="only this tenant's workloads (admin)")
    watch.add_argument(
        "--limit", type=_positive_int, metavar="N", help="stop after N events (default: never)"
    )

    logs = command("logs", "show a workload's log lines the server keeps", _cmd_logs)
    logs.add_argument("workload_id", metavar="WORKLOAD_ID")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until the workload ends"
    )
    logs.add_argument(
        "--tail", type=_non_negative_int, default=0, metavar="N", help="only the last N lines (0: all)"
    )
    generate = command("generate", "generate text with an inference service", _cmd_generate)
    generate.add_argument("service", metavar="SERVICE", help="the inference workload's id")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument(
        "--max-tokens", type=_non_negative_int, default=0, metavar="N", help="tokens to generate (default 32)"
    )
    generate.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature (default: greedy)"
    )


def _serve_options(serve: argparse.ArgumentParser) -> None:
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
        "--throughput-feedback",
        choices=("observed", "scaled", "off"),
        default="observed",
        help="plan training with the throughput the workers measured: on the GPU types measured "
        "(observed, default), also scaling the declared numbers of the other types (scaled), or not (off)",
    )
    serve.add_argument(
        "--admission",
        choices=("on", "off"),
        default="on",
        help="place new work that fits in free capacity at once, between planning rounds (default on)",
    )
    workers = serve.add_argument_group("workers")
    workers.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="how often workers send heartbeats (default 2)",
    )
    workers.add_argument(
        "--heartbeat-timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="silence after which a worker's node is marked down and its work re-planned (default 10)",
    )
    workers.add_argument(
        "--max-restarts",
        type=_non_negative_int,
        default=3,
        metavar="N",
        help="restarts of a crashed workload before it is FAILED (default 3)",
    )
    workers.add_argument(
        "--restart-backoff",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="wait before the first restart, doubled for each next one (default 1)",
    )
    workers.add_argument(
        "--stop-grace",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="time a stopped process has between SIGTERM and SIGKILL (default 10)",
    )
    serve.add_argument(
        "--solver-processes",
        type=_positive_int,
        default=2,
        metavar="N",
        help="the control loop's solver processes",
    )
    serve.add_argument(
        "--plan-processes",
        type=_positive_int,
        default=1,
        metavar="N",
        help="solver processes for Plan calls, apart from the control loop's (default 1)",
    )
    serve.add_argument(
        "--threads",
        type=_positive_int,
        default=32,
        metavar="N",
        help="threads for unary calls and checkpoint transfers (streams hold none)",
    )
    serve.add_argument(
        "--max-streams-per-caller",
        type=_positive_int,
        default=64,
        metavar="N",
        help="open Watch and Logs streams one caller may have (default 64; RESOURCE_EXHAUSTED past it)",
    )
    serve.add_argument(
        "--rate-limit",
        type=float,
        default=DEFAULT_RATE_PER_S,
        metavar="R",
        help=f"requests/s per caller, bursts of twice that (default {DEFAULT_RATE_PER_S:g}; 0: none)",
    )
    serve.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format")
    serve.add_argument("--log-level", default="INFO", help="log level")


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
    # The time limit is the whole command's: what starting Python, reading the files
    # and writing the plan take comes off the solver's budget.
    spent = _since_process_start()
    budget = max(0.05, args.time_limit * (1 - OUTPUT_SHARE) - spent)
    options = PlanOptions(
        time_limit_s=budget,
        # From the limit asked for, not the budget left: the plan must not depend on
        # how long starting up took.
        work_limit_s=PlanOptions(time_limit_s=args.time_limit, work_limit_s=args.work_limit).work_budget(),
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


OUTPUT_SHARE = 0.03  # of the time limit, kept for writing the plan out


def _since_process_start() -> float:
    """Seconds since this process started (Linux: /proc), else since this module loaded."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _LOADED_AT


_LOADED_AT = time.perf_counter()


def _write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    output.write_text(text, encoding="utf-8")


def _cmd_plan(args: argparse.Namespace) -> int:
    problem = _load(args)
    plan = _solve(args, problem) if args.server is None else _solve_remote(args, problem)
    text = _json(convert.plan_to_dict(plan)) if args.format == "json" else render.render_plan(plan, problem)
    try:
        _write(text, args.out)
    except OSError as exc:
        raise ValidationError(
            [Violation("--out", f"cannot write {args.out}: {exc.strerror or exc}")]
        ) from exc
    return EXIT_FAILED if plan.status is PlanStatus.INFEASIBLE else EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    if args.inventory is None and args.workloads is None:
        return _explain_remote(args)
    if args.inventory is None or args.workloads is None:
        given, missing = (
            ("--inventory", "--workloads") if args.workloads is None else ("--workloads", "--inventory")
        )
        raise ValidationError(
            [Violation(missing, f"needed with {given} (or give neither to ask the server)")]
        )
    problem = _load(args)
    if all(w.id != args.workload_id for w in problem.workloads):
        raise ValidationError(
            [Violation("WORKLOAD_ID", f'no workload "{args.workload_id}" in {args.workloads}')]
        )
    plan = _solve(args, problem) if args.server is None else _solve_remote(args, problem)
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
        text = _json(data)
    else:
        text = render.render_explanation(
            explanation.workload_id, explanation.placed, explanation.summary, explanation.details
        )
    _write(text, None)
    return EXIT_FAILED if plan.status is PlanStatus.INFEASIBLE else EXIT_OK


def _json(data: object) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------
# Client commands


def _address(args: argparse.Namespace) -> str:
    return str(args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER)


def _client(args: argparse.Namespace, *, timeout: float | None = None) -> Client:
    """A client of the server the arguments name (``args.address`` is set for error messages)."""

    args.address = _address(args)
    return Client(
        args.address,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        timeout=timeout if timeout is not None else args.timeout,
    )


def _in_pipeline_order(plan: solver.Plan) -> solver.Plan:
    """A plan from the server with its stage times in pipeline order (a protobuf map has none)."""

    def key(item: tuple[str, float]) -> tuple[int, str]:
        head = item[0].split(":", 1)[0]
        return (PIPELINE.index(head) if head in PIPELINE else len(PIPELINE), item[0])

    return dataclasses.replace(plan, stage_times_s=dict(sorted(plan.stage_times_s.items(), key=key)))


def _solve_remote(args: argparse.Namespace, problem: Problem) -> solver.Plan:
    """The Plan RPC on the problem of the files, with the options of the command line."""

    inventory, workloads = convert.problem_to_messages(problem)
    current = (
        pb.Plan(placements=[convert.placement_to_message(p) for p in problem.current])
        if args.current is not None
        else None
    )
    options = apb.PlanOptions(
        time_limit_s=args.time_limit,
        seed=args.seed,
        relative_gap=args.relative_gap,
        backend=args.backend,
        num_workers=args.num_workers,
    )
    if args.work_limit is not None:
        options.work_limit_s = args.work_limit
    if args.max_migrations is not None:
        options.max_migrations = args.max_migrations
    show = sys.stderr.isatty() if args.progress is None else args.progress
    start = time.perf_counter()
    with _client(args, timeout=args.time_limit + PLAN_MARGIN_S) as client:
        if show:
            sys.stderr.write(f"apportion: planning on the server at {args.address}\n")
        response = client.plan_response(inventory, workloads, args.policy, options, current)
    if show:
        elapsed = time.perf_counter() - start
        sys.stderr.write(f"apportion: planned in {elapsed:.2f} s (solver {response.solve_time_s:.2f} s)\n")
    return _in_pipeline_order(convert.plan_from_message(response.plan))


def _explain_remote(args: argparse.Namespace) -> int:
    with _client(args) as client:
        explanation = client.explain(args.workload_id)
    if args.format == "json":
        data = {
            "workload_id": explanation.workload_id,
            "placed": explanation.placed,
            "summary": explanation.summary,
            "details": list(explanation.details),
            "placement": convert.message_to_dict(explanation.placement)
            if explanation.HasField("placement")
            else None,
            "state": explanation.state,
        }
        _write(_json(data), None)
    else:
        text = render.render_explanation(
            explanation.workload_id, explanation.placed, explanation.summary, explanation.details
        )
        _write(text, None)
    return EXIT_OK


def _load_message(path: Path, message: type[M]) -> tuple[M, list[Violation]]:
    """A file as a message, with every structural problem (paths as in the file) and
    the problems of building the domain objects (node states, spreads...)."""
    data, violations = convert.check_document(
        convert.load_document(path), message.DESCRIPTOR, source=str(path)
    )
    if message is pb.WorkloadList:
        msg: Any = convert.workloads_from_data(data)
        inventory, workloads = pb.Inventory(), msg
    else:
        msg = convert.inventory_from_data(data)
        inventory, workloads = msg, pb.WorkloadList()
    bad = [v.path for v in violations if v.path]
    try:
        convert.problem_from_messages(inventory, workloads)
    except ValidationError as exc:  # on fields not already reported
        violations += [v for v in exc.violations if not any(_within(v.path, b) for b in bad)]
    return msg, violations


def _within(path: str, outer: str) -> bool:
    return path == outer or path.startswith((f"{outer}.", f"{outer}["))


def _entry(v: Violation) -> int:
    """The index of the file's entry a violation is about (file order; whole-file problems first)."""
    head = v.path.split(".", 1)[0]
    if "[" not in head or "]" not in head:
        return -1
    try:
        return int(head[head.index("[") + 1 : head.index("]")])
    except ValueError:
        return -1


def _load_workloads(path: Path) -> list[pb.Workload]:
    """A workloads file, checked as far as it can be without the server's inventory:
    structure, the rules of building the domain objects, ids present and unique."""
    listed, violations = _load_message(path, pb.WorkloadList)
    seen: dict[str, int] = {}
    for i, w in enumerate(listed.workloads):
        if not w.id:
            violations.append(Violation(f"workloads[{i}].id", "must not be empty"))
        elif w.id in seen:
            also = f"workloads[{seen[w.id]}]"
            violations.append(Violation(f"workloads[{i}].id", f'duplicate id "{w.id}" (also {also})'))
        else:
            seen[w.id] = i
    if violations:
        raise ValidationError(sorted(violations, key=_entry))
    return list(listed.workloads)


def _request_id(workload: pb.Workload) -> str:
    """The same workload (same content) gets the same request id: submitting a file
    twice creates its workloads once."""
    canonical = json.dumps(convert.message_to_dict(workload), sort_keys=True, separators=(",", ":"))
    return "cli-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _rebase(violations: Iterable[tuple[str, str]], old: str, new: str) -> list[Violation]:
    out = []
    for path, message in violations:
        if path == old or path.startswith((f"{old}.", f"{old}[")):
            path = new + path[len(old) :]
        out.append(Violation(path, message))
    return out


def _print_statuses(args: argparse.Namespace, statuses: Sequence[Mapping[str, Any]]) -> None:
    if args.output == "json":
        _write(_json({"workloads": list(statuses)}), None)
    else:
        _write(render.render_workloads(statuses), None)


def _cmd_submit(args: argparse.Namespace) -> int:

    workloads = _load_workloads(args.file)
    done: list[dict[str, Any]] = []
    invalid: list[Violation] = []
    failed = False
    with _client(args) as client:
        for i, workload in enumerate(workloads):
            try:
                done.append(
                    convert.message_to_dict(client.submit(workload, request_id=_request_id(workload)))
                )
            except ApportionError as exc:
                if exc.code is StatusCode.INVALID_ARGUMENT and exc.violations:
                    invalid.extend(_rebase(exc.violations, "workload", f"workloads[{i}]"))
                elif exc.code in FATAL:
                    if done:
                        _print_statuses(args, done)
                    raise
                else:
                    sys.stderr.write(f"apportion: {workload.id}: {exc.message}\n")
                    failed = True
    if done or args.output == "json":
        _print_statuses(args, done)
    if invalid:
        _report(invalid)
        return EXIT_BAD_INPUT
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_apply_workloads(args: argparse.Namespace) -> int:
    """``apply -f``: per workload of the file, created, updated (a new version) or
    unchanged, like ``kubectl apply``. A workload that exists and has ended is reported
    (its id is never reused), not changed."""
    workloads = _load_workloads(args.file)
    results: list[dict[str, Any]] = []
    failed = False
    with _client(args) as client:
        for workload in workloads:
            try:
                action, status = _apply_one(client, workload)
            except ApportionError as exc:
                if exc.code in FATAL:
                    raise
                sys.stderr.write(f"apportion: {workload.id}: {exc.message}\n")
                failed = True
                continue
            results.append({"id": workload.id, "action": action, "status": convert.message_to_dict(status)})
    if args.output == "json":
        _write(_json({"workloads": results}), None)
    else:
        rows = [
            [r["id"], r["action"], r["status"].get("state", ""), r["status"].get("version", 0)]
            for r in results
        ]
        _write("\n".join(render.table(["ID", "ACTION", "STATE", "VERSION"], rows, indent="")) + "\n", None)
    return EXIT_FAILED if failed else EXIT_OK


def _apply_one(client: Client, workload: pb.Workload) -> tuple[str, apb.WorkloadStatus]:
    """(created | updated | unchanged | ended, the status) of one workload of a file."""
    try:
        current = client.get(workload.id)
    except ApportionError as exc:
        if exc.code is not StatusCode.NOT_FOUND:
            raise
        return "created", client.submit(workload, request_id=_request_id(workload))
    wanted = pb.Workload()
    wanted.CopyFrom(workload)
    # what the server fills in when the file leaves it out
    if not wanted.submit_time_s:
        wanted.submit_time_s = current.workload.submit_time_s
    if not wanted.tenant:
        wanted.tenant = current.workload.tenant
    if convert.message_to_dict(wanted) == convert.message_to_dict(current.workload):
        return "unchanged", current
    if current.state in TERMINAL_STATES:
        return f"ended ({current.state}): not changed", current
    # the request id names the version it replaces too: applying A, B, then A again is
    # three updates, not a replay of the first
    key = hashlib.sha256(f"{_request_id(wanted)}@{current.version}".encode()).hexdigest()[:32]
    return "updated", client.update(wanted, request_id=f"cli-{key}")


def _cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = convert.message_to_dict(client.get(args.workload_id))
    _write(_json(status) if args.output == "json" else render.render_workload(status), None)
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        statuses = [
            convert.message_to_dict(s)
            for s in client.list(tenant=args.tenant, kind=args.kind, state=args.state, page_size=1000)
        ]
    _print_statuses(args, statuses)
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = convert.message_to_dict(client.cancel(args.workload_id))
    _print_statuses(args, [status])
    return EXIT_OK


def _cmd_get_plan(args: argparse.Namespace) -> int:
    with _client(args) as client:
        record = client.current_plan()
        kinds = (
            {}
            if args.output == "json"
            else {s.workload.id: s.workload.WhichOneof("spec") or "?" for s in client.list(page_size=1000)}
        )
    plan = _in_pipeline_order(convert.plan_from_message(record.plan))
    if args.output == "json":
        _write(_json(convert.plan_to_dict(plan)), None)
        return EXIT_OK
    made = render.format_time(record.created_at)
    head = (
        f"current plan: revision {record.revision} (of the state at revision {record.based_on}),"
        f" made {made}, solved in {record.solve_time_s:.2f} s\n\n"
    )
    _write(head + render.render_plan(plan, kinds=kinds), None)
    return EXIT_OK


def _inventory_dict(nodes: Iterable[Any], gpu_types: Iterable[Any], tenants: Iterable[Any]) -> dict[str, Any]:
    return {
        "gpu_types": [convert.message_to_dict(t) for t in gpu_types],
        "nodes": [convert.message_to_dict(n) for n in nodes],
        "tenants": [convert.message_to_dict(t) for t in tenants],
    }


def _cmd_nodes(args: argparse.Namespace) -> int:
    """The inventory; the table also shows what is placed on each node (the workloads the
    caller may see). JSON stays the inventory file's format (apply-inventory reads it)."""
    held: dict[str, list[tuple[str, int]]] = {}
    with _client(args) as client:
        nodes, gpu_types, tenants = client.nodes()
        if args.output != "json":
            for state in ("PLACED", "RUNNING"):
                for status in client.list(state=state):
                    for shard in status.placement.shards:
                        held.setdefault(shard.node_id, []).append((status.workload.id, shard.gpus))
    data = _inventory_dict(nodes, gpu_types, tenants)
    _write(_json(data) if args.output == "json" else render.render_inventory(data, held), None)
    return EXIT_OK


def _cmd_apply(args: argparse.Namespace) -> int:
    inventory, violations = _load_message(args.file, pb.Inventory)
    if violations:
        raise ValidationError(violations)
    with _client(args) as client:
        response = client.upsert_nodes(inventory.gpu_types, inventory.nodes, inventory.tenants)
    if args.output == "json":
        _write(_json(convert.message_to_dict(response)), None)
        return EXIT_OK
    counts = (
        f"{len(inventory.gpu_types)} GPU type(s), {len(inventory.nodes)} node(s),"
        f" {len(inventory.tenants)} tenant(s)"
    )
    lines = [f"applied {counts} at revision {response.revision}"]
    nodes = [convert.message_to_dict(n) for n in response.nodes]
    if nodes:
        lines += ["", *render.render_nodes(nodes)]
    _write("\n".join(lines) + "\n", None)
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        entries = client.audit(
            principal=args.principal, id=args.id, since=args.since, until=args.until, limit=args.limit
        )
        for entry in entries:
            data = convert.message_to_dict(entry)
            if args.output == "json":
                line = json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"
            else:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.time))
                what = ",".join(entry.ids[:5]) + ("…" if len(entry.ids) > 5 else "")
                line = f"{entry.seq:>8} {when} {entry.principal} {entry.method} {what} {entry.code}\n"
            sys.stdout.write(line)
    return EXIT_OK


def _cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        node = convert.message_to_dict(client.drain(args.node_id))
    _write(_json(node) if args.output == "json" else "\n".join(render.render_nodes([node])) + "\n", None)
    return EXIT_OK


def _cmd_undrain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        node = convert.message_to_dict(client.undrain(args.node_id))
    _write(_json(node) if args.output == "json" else "\n".join(render.render_nodes([node])) + "\n", None)
    return EXIT_OK


def _cmd_usage(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _nodes, _types, tenants = client.nodes()
        held: dict[str, dict[str, int]] = {}
        for state in ("PLACED", "RUNNING"):
            for status in client.list(tenant=args.tenant, state=state):
                by_type = held.setdefault(status.workload.tenant, {})
                gpu_type = status.placement.gpu_type
                by_type[gpu_type] = by_type.get(gpu_type, 0) + sum(s.gpus for s in status.placement.shards)
    data = _usage(held, {t.name: convert.message_to_dict(t) for t in tenants}, args.tenant)
    _write(_json(data) if args.output == "json" else render.render_usage(data), None)
    return EXIT_OK


def _usage(
    held: Mapping[str, Mapping[str, int]], tenants: Mapping[str, Mapping[str, Any]], only: str
) -> dict[str, Any]:
    """Per tenant (those holding GPUs and those with a quota): GPUs held per type and in
    all, and the quotas."""
    names = sorted((set(held) | set(tenants)) if not only else {only})
    rows = []
    for name in names:
        spec = tenants.get(name, {})
        by_type = dict(sorted(held.get(name, {}).items()))
        rows.append(
            {
                "tenant": name,
                "gpus": sum(by_type.values()),
                "max_gpus": spec.get("max_gpus"),
                "gpus_per_type": by_type,
                "max_gpus_per_type": dict(spec.get("max_gpus_per_type") or {}),
            }
        )
    return {"tenants": rows}


def _cmd_watch(args: argparse.Namespace) -> int:
    count = 0
    with _client(args) as client:
        events = client.watch(from_revision=args.from_revision, tenant=args.tenant)
        try:
            for event in events:
                data = convert.message_to_dict(event)
                if args.output == "json":
                    line = json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"
                else:
                    line = render.render_event(data)
                sys.stdout.write(line)
                sys.stdout.flush()
                count += 1
                if args.limit is not None and count >= args.limit:
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends
        finally:
            events.close()
    return EXIT_OK


def _cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        lines = client.logs(args.workload_id, follow=args.follow, tail=args.tail)
        try:
            for line in lines:
                if args.output == "json":
                    data = convert.message_to_dict(line)
                    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
                else:
                    text = f"[{line.shard_index}:{line.rank}] {line.text}"
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # Ctrl-C ends a follow
        finally:
            lines.close()
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.generate(
            args.service, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature
        )
    if args.output == "json":
        print(_json(convert.message_to_dict(reply)))
    else:
        print(reply.text)
    return EXIT_OK


def _server_error(exc: ApportionError, address: str) -> int:
    """Report an error answer of the server (see the exit status table)."""
    code = exc.code
    if code is StatusCode.INVALID_ARGUMENT:
        if exc.violations:
            _report([Violation(path, message) for path, message in exc.violations])
        else:
            sys.stderr.write(f"apportion: invalid input: {exc.message}\n")
        return EXIT_BAD_INPUT
    if code is StatusCode.UNAVAILABLE and exc.from_server:
        line = f"the server says: {exc.message}"  # e.g. a service with no live replica
    elif code is StatusCode.UNAVAILABLE:
        line = f"cannot reach the server at {address} ({exc.message})"
    elif code is StatusCode.DEADLINE_EXCEEDED:
        line = f"the server at {address} did not answer in time ({exc.message})"
    elif code is StatusCode.UNAUTHENTICATED:
        line = f"not authenticated: {exc.message} (give --token or set ${TOKEN_ENV})"
    elif code is StatusCode.PERMISSION_DENIED:
        line = f"permission denied: {exc.message}"
    elif code in (
        StatusCode.NOT_FOUND,
        StatusCode.ALREADY_EXISTS,
        StatusCode.FAILED_PRECONDITION,
        StatusCode.RESOURCE_EXHAUSTED,
    ):
        line = exc.message
    else:
        line = f"server error {code.name}: {exc.message}"
    sys.stderr.write(f"apportion: {line}\n")
    return EXIT_FAILED


def serve_config(args: argparse.Namespace) -> app.ServerConfig:
    """The server's configuration from ``apportion serve``'s options.

    Raises:
        ValidationError: an unknown policy, or a heartbeat timeout not longer than the interval.
    """
    from server import app  # grpc and the server only when serving
    from server.admission import AdmissionConfig
    from server.control import LoopConfig
    from server.workers import WorkersConfig

    if args.policy not in solver.policy_names():
        known = ", ".join(solver.policy_names())
        raise ValidationError([Violation("--policy", f'unknown policy "{args.policy}" (known: {known})')])
    if args.heartbeat_timeout <= args.heartbeat_interval:
        raise ValidationError([Violation("--heartbeat-timeout", "must be longer than --heartbeat-interval")])
    return app.ServerConfig(
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
            throughput_feedback=args.throughput_feedback,
        ),
        admission=AdmissionConfig(enabled=args.admission == "on"),
        solver_processes=args.solver_processes,
        plan_processes=args.plan_processes,
        threads=args.threads,
        max_streams_per_caller=args.max_streams_per_caller,
        rate_limit=args.rate_limit,
        rate_burst=max(1, int(2 * args.rate_limit)),
        workers=WorkersConfig(
            heartbeat_interval_s=args.heartbeat_interval,
            heartbeat_timeout_s=args.heartbeat_timeout,
            max_restarts=args.max_restarts,
            restart_backoff_s=args.restart_backoff,
            stop_grace_s=args.stop_grace,
        ),
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from server import app, auth, logs  # grpc and the server only when serving

    logs.configure(args.log_level, args.log_format)
    config = serve_config(args)
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
    except ApportionError as exc:
        return _server_error(exc, getattr(args, "address", None) or _address(args))
    except ConfigError as exc:
        sys.stderr.write(f"apportion: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("apportion: interrupted\n")
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
