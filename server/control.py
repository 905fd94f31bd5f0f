"""The control loop: keep the cluster's plan current as workloads and nodes change.

Writes that matter to the plan (a workload submitted, updated or cancelled; a
node added, changed or drained) call :meth:`ControlLoop.notify`. The loop waits
until changes stop for ``debounce_s`` (or ``max_delay_s`` has passed since the
first one, so a steady stream of submissions still gets planned), then plans
the whole state in a solver process and records the plan and each workload's
new state in one transaction of the store. Changes that arrive while a plan is
being solved start the next round; a workload changed meanwhile (a new
version, cancelled) keeps its new state: the store only applies a plan's
assignment to the version the plan was computed for.

Migration-aware: every round passes the placements that run now as the
solver's ``current``, and the solver charges ``migration_penalty`` for each
running workload it moves or stops, so running workloads are only reshuffled
for a gain larger than that (``max_migrations`` caps the moves of one round).
The penalty is in the policy's objective units; with the default
``throughput`` policy, 0.05 is 5% of one workload's normalized throughput.

State moves PENDING -> PLACED (the plan places it) and back to PENDING (a
later plan cannot place it: a higher tier took its GPUs, its node went down);
RUNNING and the terminal states SUCCEEDED / FAILED come from the workers.
CANCELLED comes from the client; it frees the workload's GPUs in the next plan.

Rolling update of a service: the new version is planned with the old one's
replicas as ``current`` (replicas stay where they are when they still fit).
If the new version cannot get ``min_replicas`` replicas, the old version keeps
serving: the round is solved again with the old spec (kept in the stored
placement) in its place, so the recorded plan is always feasible, and the
workload reports the version that serves (``serving_version``) and why the
new one waits; every later round tries the new version again.

Throughput feedback. A training workload is planned with :func:`planned_spec`
of its stored spec and what the workers measured of it (``WorkloadRow.observed``,
kept by :mod:`server.workers`): its ``remaining_work`` counted down by the work
done (never below :data:`MIN_REMAINING`; always, whatever the mode: it is
progress, not an estimate), and, by ``throughput_feedback``:

* ``observed`` (the default): on each GPU type it was measured on (for at least
  :data:`FEEDBACK_MIN_S` seconds, on the gang size the spec declares), the
  measured work units/s replace the declared ones (an elastic job: that shape's
  number, and the other shapes of that type scaled by the same measured/declared
  ratio). Types never measured keep their declared numbers, so a job that runs
  slower than declared moves to another type that declares more (if the gain
  beats the migration penalty); measured there too, it goes where it is faster
  and stays (both numbers are measured then: no ping-pong; measured rates
  within :data:`FEEDBACK_BAND` of the best measured one count as equal to it,
  so measurement noise moves nothing).
* ``scaled``: as ``observed``, and the declared numbers of the types never
  measured are scaled by the mean measured/declared ratio, for users whose
  numbers are uniformly optimistic (the job then stays where it is measured
  unless its declared ranking says otherwise).
* ``off``: declared numbers only.

The stored spec is never changed; Explain explains with the numbers the plan
used. The dispatcher re-plans (``notify``) when a type's rate is first
planned with and when it moves by more than 10%.

A state the solver rejects (a workload that no longer validates against a
changed inventory) does not stop the loop: that workload is left PENDING with
the violation as its reason and the rest is planned. A round whose solve fails
in any other way (a solver error, an input validation did not foresee: once a
``target_rps`` of 1e300 failed every round until it was cancelled) is retried
without the workload that makes it fail, found by bisection over the active
workloads (each probe a round with a 1 s budget; only failing matters): that
workload becomes FAILED with the error as its message, and the rest is planned.
A failure that no single workload explains is retried with back-off. A round
that overruns its deadline (4 × the time limit + 120 s) is killed from outside
(``server.solving``).

On start the loop plans once, so work accepted before a restart resumes.

Cost to the server. A round reads the store, then everything else — building
the domain problem from the stored documents, solving, turning the plan into
documents and assignments — runs in a solver process (:func:`plan_round`), so
the server's threads keep the interpreter lock for the RPCs; the round ends
with one write of the store. After a round the loop rests for as long as the
round took, twice over (``REST_FACTOR``), so under a steady stream of changes
planning takes at most about a third of the machine (the plan then trails the
changes by a few rounds) and submissions keep their latency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import solver
from server import convert
from server.errors import FailedPrecondition, NotFound
from server.solving import SolverCrashed, SolverPool, SolverTimeout
from server.store import (
    ACTIVE,
    FAILED,
    PENDING,
    PLACED,
    RUNNING,
    Assignment,
    Store,
    WorkloadRow,
    read_snapshot,
)
from server.usage import Usage, placement_use
from solver import Plan, PlanOptions, Problem, ValidationError

log = logging.getLogger("apportion.control")

REST_FACTOR = 2.0
ROUND_DEADLINE_FACTOR = 4.0  # a planning round is killed past this many times its time limit ...
ROUND_DEADLINE_GRACE_S = 120.0  # ... plus this (building the problem and the documents)
PROBE_LIMIT_S = 1.0  # solver budget of a round that only tests whether planning fails
FEEDBACK_MODES = ("observed", "scaled", "off")
FEEDBACK_MIN_S = 10.0  # seconds of measurement before a measured throughput is planned with
FEEDBACK_BAND = 0.1  # measured rates within 10% of the best measured one count as equal to it
MIN_REMAINING = 1e-3  # work units: what is left of a job past its declared work (the solver wants > 0)
_WORKLOAD_PATH = re.compile(r"^workloads\[(\d+)\]")
_CURRENT_PATH = re.compile(r"^current\[(\d+)\]")


@dataclass(frozen=True)
class LoopConfig:
    policy: str = "throughput"
    time_limit_s: float = 5.0
    relative_gap: float = 1e-3
    migration_penalty: float = 0.05
    max_migrations: int | None = None
    debounce_s: float = 0.2
    max_delay_s: float = 2.0
    throughput_feedback: str = "observed"  # one of FEEDBACK_MODES


class PlanInfo:
    """The latest plan of this process. The domain problem and plan are rebuilt
    (once) only when an explanation needs them: from the stored plan and the
    specs of the workloads it was solved for, at the versions it saw."""

    def __init__(self, revision: int, result: RoundResult, feedback: str = "observed") -> None:
        self.revision = revision
        self.feedback = feedback
        self.included = result.included  # workload id -> the version the plan saw
        self.pinned_old = frozenset(result.pinned_old)
        # (not the result itself: its plan JSON, tens of MB at 100k workloads, is in the store)
        self._lock = threading.Lock()
        self._solved: tuple[Problem, Plan] | None = None

    def problem_and_plan(self, store: Store) -> tuple[Problem, Plan]:
        with self._lock:
            if self._solved is None:
                record = store.latest_plan()
                if record is None or record.revision != self.revision:
                    raise FailedPrecondition("a newer plan is being recorded; ask again")
                rows = [r for r in store.list_workloads(limit=2**62) if r.id in self.included]
                specs: dict[str, dict[str, Any]] = {}
                for row in rows:
                    old = (row.placement or {}).get("spec")
                    pinned = row.id in self.pinned_old and isinstance(old, dict)
                    specs[row.id] = (
                        old
                        if pinned and isinstance(old, dict)
                        else planned_spec(row.spec, row.observed, self.feedback)
                    )
                nodes = [n.spec for n in store.all_nodes()]
                node_ids = {n.get("id") for n in nodes}
                known = {str(t.get("name", "")) for t in store.gpu_types()}
                specs = {id: convert.without_unknown_types(spec, known) or spec for id, spec in specs.items()}
                current = [p for row in rows if (p := _current_placement(row, node_ids, any_state=True))]
                problem = convert.state_problem(
                    gpu_types=store.gpu_types(),
                    nodes=nodes,
                    tenants=store.tenants(),
                    workloads=[specs[row.id] for row in rows],
                    current=current,
                )
                plan = convert.plan_from_message(convert.plan_from_data(record.plan))
                self._solved = (problem, plan)
            return self._solved


PlanCallback = Callable[["RoundResult"], None]


class ControlLoop:
    def __init__(
        self,
        store: Store,
        pool: SolverPool,
        config: LoopConfig | None = None,
        *,
        on_plan: PlanCallback | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.config = config or LoopConfig()
        self.on_plan = on_plan
        self._cond = threading.Condition()
        self._dirty = True  # plan once on start: resume what was accepted before a restart
        self._first_change = 0.0
        self._last_change = 0.0
        self._stopped = False
        self._busy = False
        self._latest: PlanInfo | None = None
        self._notified = 1  # notify() calls so far; the start counts as one
        self._covered = 0  # notify() calls that a recorded plan has taken into account
        self._failures = 0
        self._last_round_s = 0.0
        self._rested_at = 0.0
        self.listeners: list[Callable[[], None]] = []  # called on every notify (the admission)
        self._thread = threading.Thread(target=self._run, name="apportion-control", daemon=True)

    # -- control ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def notify(self) -> None:
        """Something the plan depends on changed (call after the write is durable)."""
        now = time.monotonic()
        with self._cond:
            if not self._dirty:
                self._first_change = now
            self._dirty = True
            self._last_change = now
            self._notified += 1
            self._cond.notify_all()
        for listener in self.listeners:
            listener()

    def wait_settled(self, timeout: float) -> bool:
        """Block until a recorded plan covers every change notified before this call
        (and the plan of the start). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._notified
            while self._covered < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._cond.wait(left)
            return True

    @property
    def latest(self) -> PlanInfo | None:
        return self._latest

    # -- the loop --------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._ready():
                    self._cond.wait(self._wait_time())
                if self._stopped:
                    return
                self._dirty = False
                self._busy = True
                covers = self._notified
            try:
                self._round()
                self._failures = 0
                with self._cond:
                    self._covered = max(self._covered, covers)
            except Exception:  # never let the loop die; back off and retry
                if self._stopped or getattr(self.pool, "closed", False):
                    return  # a round cut short by shutdown (its solver killed) is no failure
                self._failures += 1
                log.exception("planning round failed", extra={"failures": self._failures})
                with self._cond:
                    self._dirty = True
                    self._first_change = self._last_change = time.monotonic()
                    self._cond.wait(min(30.0, 0.5 * 2 ** min(self._failures, 6)))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _fails(self, exclude: frozenset[str], probe: LoopConfig) -> bool:
        """Whether a round without ``exclude`` fails (not for lack of time or a process)."""
        try:
            self.pool.call(
                plan_round, str(self.store.path), probe, exclude, deadline_s=ROUND_DEADLINE_GRACE_S
            )
        except SolverCrashed:
            return False  # not the failure sought (a timeout, a dead process, shutdown)
        except Exception:
            return True
        return False

    def _isolate(self, error: Exception) -> str | None:
        """After a round failed with ``error``: the one workload without which rounds
        succeed, found by bisection over the active workloads (each probe a round with a
        short time limit: only success matters), marked FAILED with the reason; None if
        the failure does not depend on one workload (then the loop backs off and retries).
        One culprit per failure; another, if any, is found by the next round's."""
        probe = dataclasses.replace(self.config, time_limit_s=min(self.config.time_limit_s, PROBE_LIMIT_S))
        suspects = [r.id for r in self.store.active_workloads()]
        if not suspects or self._fails(frozenset(suspects), probe):
            return None  # fails without any workload: the inventory, not a workload
        cleared: set[str] = set()  # excluded for good: the failure lies elsewhere
        while len(suspects) > 1 and not self._stopped:
            half = suspects[: len(suspects) // 2]
            if self._fails(frozenset(cleared | set(half)), probe):
                cleared |= set(half)  # still fails without them: the culprit is in the rest
                suspects = suspects[len(half) :]
            else:
                suspects = half
        if self._stopped or len(suspects) != 1 or self._fails(frozenset({suspects[0]}), probe):
            return None
        culprit = suspects[0]
        reason = (
            f"planning failed with this workload, and succeeds without it: {type(error).__name__}: {error}"
        )
        log.error(
            "a workload makes planning fail: marked FAILED", extra={"workload": culprit, "error": str(error)}
        )
        with contextlib.suppress(NotFound, FailedPrecondition):
            self.store.set_workload_state(culprit, FAILED, reason[:1000])
        return culprit

    def _ready(self) -> bool:
        if not self._dirty:
            return False
        now = time.monotonic()
        if now < self._rested_at:
            return False
        quiet = now - self._last_change >= self.config.debounce_s
        overdue = now - self._first_change >= self.config.max_delay_s
        return quiet or overdue

    def _wait_time(self) -> float | None:
        if not self._dirty:
            return None
        now = time.monotonic()
        until_quiet = self._last_change + self.config.debounce_s - now
        until_overdue = self._first_change + self.config.max_delay_s - now
        return max(0.001, self._rested_at - now, min(until_quiet, until_overdue))

    # -- one round -------------------------------------------------------

    def _round(self) -> None:
        start = time.perf_counter()
        # A round builds the problem and the plan's documents too (about 40 s at 100,000
        # workloads on 8 nodes): its deadline is generous, but it has one.
        deadline = ROUND_DEADLINE_FACTOR * self.config.time_limit_s + ROUND_DEADLINE_GRACE_S
        try:
            result = self.pool.call(plan_round, str(self.store.path), self.config, deadline_s=deadline)
        except SolverTimeout:
            raise  # the same state would overrun again: back off (the loop's retry)
        except SolverCrashed:
            if self._stopped:
                raise
            result = self.pool.call(  # on a fresh process
                plan_round, str(self.store.path), self.config, deadline_s=deadline
            )
        except Exception as exc:  # the solver failed on this state: find what makes it fail
            culprit = self._isolate(exc)
            if culprit is None:
                raise
            self.notify()  # the next round plans without it
            return
        revision = self.store.apply_plan(
            result.plan_json,
            status=result.status,
            gap=result.gap,
            solve_s=result.solve_time_s,
            based_on=result.based_on,
            assignments=result.assignments,
            summary={"objective": result.objective, "placed": result.placed, "unplaced": result.unplaced},
            usage=result.usage,
        )
        self._latest = PlanInfo(revision, result, self.config.throughput_feedback)
        self._last_round_s = time.perf_counter() - start
        # the next round waits REST_FACTOR times as long as this one took: under a
        # stream of changes planning takes at most a third of the machine
        self._rested_at = time.monotonic() + REST_FACTOR * self._last_round_s
        log.info(
            "plan recorded",
            extra={
                "revision": revision,
                "status": result.status,
                "gap": result.gap,
                "placed": result.placed,
                "unplaced": result.unplaced,
                "workloads": len(result.included),
                "changed": len(result.assignments),
                "solve_s": round(result.solve_time_s, 4),
                "round_s": round(self._last_round_s, 4),
            },
        )
        if self.on_plan is not None:
            self.on_plan(result)


@dataclass(frozen=True)
class RoundResult:
    """What a solver process sends back: the plan document (as JSON text) and the
    assignments that change something."""

    based_on: int  # the revision of the state it was solved from
    plan_json: str
    status: str
    gap: float | None
    objective: float
    placed: int
    unplaced: int
    solve_time_s: float  # reading the state, building, solving, making the documents
    assignments: dict[str, Assignment]  # only those that change a workload
    included: dict[str, int]  # workload id -> version, of the workloads the problem had
    pinned_old: tuple[str, ...]  # services planned with their old version (a waiting rollout)
    usage: Usage = dataclasses.field(default_factory=Usage)  # what the plan holds, per node and tenant


def plan_round(db_path: str, config: LoopConfig, exclude: frozenset[str] = frozenset()) -> RoundResult:
    """One round's computation, in a solver process: read the state from the
    store, build the problem, solve (twice when a rolling update must keep its
    old version), and make the store's documents. The server's process only
    writes the result, so its threads keep answering RPCs. Workloads in ``exclude``
    are left out (the search for one that makes rounds fail: ``ControlLoop``)."""
    start = time.perf_counter()
    snapshot = read_snapshot(db_path)
    rows = [r for r in snapshot.rows if r.id not in exclude]
    nodes = list(snapshot.nodes)
    node_ids = {n.get("id") for n in nodes}
    specs = {r.id: planned_spec(r.spec, r.observed, config.throughput_feedback) for r in rows}
    pinned_old: set[str] = set()
    options = PlanOptions(
        time_limit_s=config.time_limit_s,
        relative_gap=config.relative_gap,
        migration_penalty=config.migration_penalty,
        max_migrations=config.max_migrations,
    )
    for _ in range(2):  # a second solve only when a rolling update must keep its old version
        gpu_types, tenants = list(snapshot.gpu_types), list(snapshot.tenants)
        problem, invalid = _problem(rows, specs, gpu_types, tenants, nodes, node_ids)
        plan = solver.plan(problem, config.policy, options)
        stuck = _stuck_updates(rows, plan) - pinned_old
        if not stuck:
            break
        for row in rows:
            if row.id in stuck and row.placement and isinstance(row.placement.get("spec"), dict):
                specs[row.id] = row.placement["spec"]
                pinned_old.add(row.id)
    assignments = _assignments(rows, plan, invalid, pinned_old)
    by_id = {r.id: r for r in rows}
    changed = {
        id: a
        for id, a in assignments.items()
        if (a.state, a.placement, a.reasons) != (by_id[id].state, by_id[id].placement, by_id[id].reasons)
    }
    versions = {r.id: r.version for r in rows}
    usage = Usage()
    for p in plan.placements:
        row = by_id[p.workload_id]
        held = placement_use(specs[row.id], convert.placement_to_dict(p))
        usage.add(row.tenant, p.gpu_type, held)
    return RoundResult(
        based_on=snapshot.revision,
        plan_json=json.dumps(convert.plan_to_dict(plan), separators=(",", ":"), allow_nan=False),
        status=plan.status.value,
        gap=plan.gap,
        objective=plan.objective,
        placed=len(plan.placements),
        unplaced=len(plan.unplaced),
        solve_time_s=time.perf_counter() - start,
        assignments=changed,
        included={w.id: versions[w.id] for w in problem.workloads},
        pinned_old=tuple(sorted(pinned_old)),
        usage=usage,
    )


def planned_spec(spec: dict[str, Any], observed: dict[str, Any], feedback: str) -> dict[str, Any]:
    """The spec a training workload is planned with: ``spec`` with its ``remaining_work``
    counted down by the work done, and, unless ``feedback`` is ``off``, its throughput
    on each GPU type it was measured on replaced by the measurement (see the module
    docstring). ``spec`` itself when nothing changes; never modified."""
    training = spec.get("training")
    if not isinstance(training, dict) or not observed:
        return spec
    out = dict(training)
    done = float(observed.get("work_done") or 0.0)
    remaining = training.get("remaining_work")
    if done > 0 and isinstance(remaining, (int, float)):
        out["remaining_work"] = max(float(remaining) - done, MIN_REMAINING)
    rates = {
        t: r
        for t, r in (observed.get("throughput") or {}).items()
        if float(r.get("seconds", 0.0)) >= FEEDBACK_MIN_S and float(r.get("work_per_s", 0.0)) > 0
    }
    if feedback != "off" and rates:
        if training.get("elastic"):
            shapes = [dict(s) for s in training["elastic"]]
            tables = [dict(s.get("throughput") or {}) for s in shapes]
            sizes = [int(s.get("gpus", 0)) for s in shapes]
        else:
            tables = [dict(training.get("throughput") or {})]
            sizes = [int(training.get("gpus") or 0)]
        ratios: dict[str, float] = {}  # GPU type -> measured / declared, on the gang size measured
        for gpu_type, rate in rates.items():
            for table, size in zip(tables, sizes, strict=True):
                declared = table.get(gpu_type)
                if size == int(rate.get("gpus", -1)) and isinstance(declared, (int, float)) and declared > 0:
                    ratios[gpu_type] = float(rate["work_per_s"]) / float(declared)
        if ratios:
            overall = sum(ratios.values()) / len(ratios)
            for table, size in zip(tables, sizes, strict=True):
                for gpu_type, declared in list(table.items()):
                    rate = rates.get(gpu_type)
                    if gpu_type in ratios and rate is not None and size == int(rate.get("gpus", -1)):
                        table[gpu_type] = float(rate["work_per_s"])  # what was measured
                    elif gpu_type in ratios:
                        table[gpu_type] = declared * ratios[gpu_type]  # another gang size, same type
                    elif feedback == "scaled":
                        table[gpu_type] = declared * overall
                measured = [t for t in table if t in ratios]
                best = max((table[t] for t in measured), default=0.0)
                for gpu_type in measured:  # noise: no move between measured types for less than the band
                    if table[gpu_type] * (1 + FEEDBACK_BAND) >= best:
                        table[gpu_type] = best
            if training.get("elastic"):
                out["elastic"] = [{**s, "throughput": t} for s, t in zip(shapes, tables, strict=True)]
            else:
                out["throughput"] = tables[0]
    if out == training:
        return spec
    return {**spec, "training": out}


def _problem(
    rows: list[WorkloadRow],
    specs: dict[str, dict[str, Any]],
    gpu_types: list[dict[str, Any]],
    tenants: list[dict[str, Any]],
    nodes: list[dict[str, Any]],
    node_ids: set[Any],
) -> tuple[Problem, dict[str, list[dict[str, Any]]]]:
    """The problem of the state; workloads that do not validate are left out
    (returned with their violations), current placements that do not are dropped."""
    included = list(rows)
    invalid: dict[str, list[dict[str, Any]]] = {}
    current = {r.id: _current_placement(r, node_ids) for r in included}
    # What a workload says of GPU types not in the inventory yet (accepted at submission)
    # is left out where it names a type that is; else it waits with NO_GPU_TYPE.
    known = {str(t.get("name", "")) for t in gpu_types}
    specs = {id: convert.without_unknown_types(spec, known) or spec for id, spec in specs.items()}
    for _ in range(len(rows) + 2):
        workloads = [specs[r.id] for r in included]
        placements = [p for r in included if (p := current.get(r.id)) is not None]
        try:
            problem = convert.state_problem(
                gpu_types=gpu_types, nodes=nodes, tenants=tenants, workloads=workloads, current=placements
            )
            return problem, invalid
        except ValidationError as exc:
            bad_workloads: set[int] = set()
            bad_current: set[int] = set()
            for v in exc.violations:
                if m := _WORKLOAD_PATH.match(v.path):
                    bad_workloads.add(int(m.group(1)))
                elif m := _CURRENT_PATH.match(v.path):
                    bad_current.add(int(m.group(1)))
            if not bad_workloads and not bad_current:
                raise  # the inventory itself is invalid: nothing to plan around
            placed_ids = [r.id for r in included if current.get(r.id) is not None]
            for i in bad_current:
                current[placed_ids[i]] = None
            for i in sorted(bad_workloads, reverse=True):
                row = included.pop(i)
                mine = [v for v in exc.violations if v.path.startswith(f"workloads[{i}]")]
                unknown = convert.unknown_gpu_types(mine)
                invalid[row.id] = (
                    convert.unknown_type_reasons(unknown, sorted(known))
                    if unknown
                    else [{"code": "INVALID", "message": str(v)} for v in mine]
                )
    raise RuntimeError("could not build a valid problem from the state")


def _stuck_updates(rows: list[WorkloadRow], plan: Plan) -> set[str]:
    """Services whose new version gets fewer than its minimum replicas while the
    old version (still recorded in the placement) serves."""
    stuck = set()
    for row in rows:
        p = row.placement
        if not p or p.get("version", row.version) == row.version or row.kind != "inference":
            continue
        minimum = int(row.spec.get("inference", {}).get("min_replicas", 1) or 1)
        new = plan.placement(row.id)
        if new is None or len(new.shards) < minimum:
            stuck.add(row.id)
    return stuck


def _assignments(
    rows: list[WorkloadRow],
    plan: Plan,
    invalid: dict[str, list[dict[str, Any]]],
    pinned_old: set[str],
) -> dict[str, Assignment]:
    unplaced = {u.workload_id: u for u in plan.unplaced}
    shortfalls = {s.workload_id: s for s in plan.shortfalls}
    out: dict[str, Assignment] = {}
    for row in rows:
        if row.id in invalid:
            out[row.id] = Assignment(row.version, PENDING, None, invalid[row.id])
            continue
        p = plan.placement(row.id)
        if p is None:
            u = unplaced.get(row.id)
            reasons = convert.reasons_to_dicts(u.reasons) if u is not None else []
            out[row.id] = Assignment(row.version, PENDING, None, reasons)
            continue
        placement = convert.placement_to_dict(p)
        shards = placement["shards"]
        if row.id in pinned_old and row.placement is not None:
            placement["version"] = row.placement.get("version", row.version)
            placement["spec"] = row.placement.get("spec")
            reasons = [
                {
                    "code": "ROLLOUT",
                    "message": f"version {row.version} waits: it cannot get its minimum replicas; "
                    f"version {placement['version']} keeps serving",
                }
            ]
        else:
            placement = placement_doc(row, placement)
            s = shortfalls.get(row.id)
            reasons = convert.reasons_to_dicts(s.reasons) if s is not None else []
        old = row.placement or {}
        unchanged = old.get("shards") == shards and old.get("version") == placement["version"]
        state = RUNNING if row.state == RUNNING and unchanged else PLACED
        out[row.id] = Assignment(row.version, state, placement, reasons)
    return out


def placement_doc(row: WorkloadRow, placement: dict[str, Any]) -> dict[str, Any]:
    """A placement as stored for ``row``: with the version it places (and a service's
    spec, kept so that a later update can fall back to it)."""
    placement["version"] = row.version
    if row.kind == "inference":
        placement["spec"] = row.spec
    return placement


def _current_placement(
    row: WorkloadRow, node_ids: set[Any], *, any_state: bool = False
) -> dict[str, Any] | None:
    """What runs now for ``row``, as a placement dict, without shards on nodes that are gone."""
    if (row.state not in (PLACED, RUNNING) and not any_state) or not row.placement:
        return None
    shards = [s for s in row.placement.get("shards", []) if s.get("node_id") in node_ids]
    if not shards:
        return None
    return {"workload_id": row.id, "gpu_type": row.placement.get("gpu_type", ""), "shards": shards}


Explained = tuple[solver.Explanation, str]  # an explanation and the workload's state


def _told(row: WorkloadRow, summary: str, details: Iterable[str] = (), placed: bool = False) -> Explained:
    """An answer of ``explain`` that needs no plan: what the row itself says."""
    return solver.Explanation(
        workload_id=row.id, placed=placed, summary=summary, details=tuple(details)
    ), row.state


def explain(loop: ControlLoop, store: Store, workload_id: str) -> Explained:
    """Why ``workload_id`` is where it is (by the latest plan), with its state."""
    row = store.get_workload(workload_id)  # NotFound for an unknown id
    latest = loop.latest
    if row.state not in ACTIVE:
        return _told(
            row, f"{row.state.lower()}: it is not planned any more", (row.message,) if row.message else ()
        )
    waiting_for_types = [r.get("message", "") for r in row.reasons if r.get("code") == "NO_GPU_TYPE"]
    if waiting_for_types and (latest is None or row.id not in latest.included):
        return _told(
            row, "pending: it names only GPU types the inventory does not have yet", waiting_for_types
        )
    invalid = [r.get("message", "") for r in row.reasons if r.get("code") == "INVALID"]
    if invalid:
        return _told(row, "pending: its spec does not validate against the inventory as it is now", invalid)
    if latest is not None and row.id in latest.included and latest.included[row.id] != row.version:
        summary = f"version {row.version} arrived after the latest plan; the next plan includes it"
        return _told(row, summary, placed=bool(row.placement))
    if latest is None or row.id not in latest.included:
        admitted = row.state in (PLACED, RUNNING) and row.placement is not None
        summary = (
            "admitted at once into free capacity after the latest plan (server/admission.py); "
            "the next plan includes it and may move it"
            if admitted
            else "pending: it arrived after the latest plan; the next plan includes it"
        )
        return _told(row, summary, placed=admitted)
    problem, plan = latest.problem_and_plan(store)
    return solver.explain(problem, plan, row.id), row.state
