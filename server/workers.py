"""The ``Workers`` service: node agents register, keep a stream, and run what the plan says.

A worker (``apportion worker``, :mod:`worker.agent`) calls ``Register`` with its
node, then keeps one ``Connect`` stream open: heartbeats, shard statuses and
log lines go up, ``Launch`` and ``Stop`` come down. This module holds the
servicer, the table of sessions (:class:`Workers`) and the :class:`Dispatcher`
that turns the stored plan into launches and stops and the workers' reports
into workload states.

Decisions (DESIGN.md is silent on them):

* Auth. ``Register`` and ``Connect`` need a node token for the node registered
  (``{node: ID}`` in the tokens file; :mod:`server.auth`) or the admin role.
  A node token can register only the node it names and attach only to that
  node's session; it cannot read or change anything through ``Allocator``. On
  the stream, a worker's statuses and log lines count only for shards its
  session was sent (or reported running when it registered): a worker cannot
  report for, or write into the logs of, a workload placed elsewhere. Its
  checkpoint uploads and downloads are limited the same way
  (:mod:`server.checkpoints`). Without tokens (``--insecure`` on loopback)
  every caller is the admin.
* ``APPORTION_SERVE_FROM``. A service's runtime env may name a training
  workload whose checkpoints it serves. The Launch carries it only when that
  workload is a training workload of the service's own tenant; otherwise it is
  dropped from the Launch (the replica starts a fresh model, as when the
  trainer has no checkpoint yet) and a warning is logged. Submission refuses
  such a name outright where it can tell (:mod:`server.service`).
* Register upserts the node with state ``ready`` (a node an admin drained stays
  ``draining``) and the label :data:`WORKER_LABEL` (the worker's advertised
  address), and answers a fresh session id; the previous session of the same
  node, if any, ends (its stream is closed). The node must validate against the
  stored inventory (its GPU type must exist: the agent adds a missing type
  through ``UpsertNodes`` first); violations are INVALID_ARGUMENT with paths
  under ``node``.
* Fencing. The server answers every heartbeat with a Lease of
  :attr:`WorkersConfig.lease_s` (the heartbeat timeout less a margin); the worker's watchdog
  (``worker.watchdog``, a process of its own, so it acts also while the agent is
  stopped) SIGKILLs the worker's shards when the last lease runs out. A worker cut
  off from the server, or frozen, has therefore stopped its shards before the
  server marks the node down and places them elsewhere: a job never runs twice.
  MASTER_PORT is drawn per launch (the gang's nodes and its restarts count), so a
  relaunch never collides with a copy that is still shutting down.
* Liveness. Every message on the stream refreshes the session. A session
  silent for ``heartbeat_timeout_s`` is dropped and its node marked ``down``
  in the store, and the control loop re-plans (a down node's work counts as
  not running, so it is placed elsewhere). A server that restarts marks the
  nodes registered by workers (those with :data:`WORKER_LABEL`) down if their
  worker has not registered again within ``heartbeat_timeout_s``.
  A stream that breaks while its session is alive may reconnect with the same
  session id; a reconnect with an unknown (expired, superseded, or a previous
  server's) session id is FAILED_PRECONDITION and the worker registers again.
* Dispatch. Only PLACED or RUNNING workloads with a ``runtime`` are dispatched
  (planning-only workloads never are). A training placement is one gang:
  shard ``i`` has node_rank ``i``, one process per GPU (at least one per
  shard), world_size the gang's processes, rank_offset the processes of the
  shards before it, MASTER_ADDR the advertised address of shard 0's worker and
  MASTER_PORT ``29500 + crc32(id/version/nodes) % 1000``. A gang is launched only when every
  node it spans has a connected worker, and stopped as a whole when one of them
  is lost. An inference placement is one independent replica per shard (each
  its own little gang of one node, MASTER_ADDR its own worker). What a worker
  was sent is remembered per session; the dispatcher sends the difference
  between that and what the plan wants (a changed gang — new version, other
  ranks, a shard on another node — is stopped and launched again), and stops shards a worker reports
  alive that nobody wants (e.g. left over from before a server restart).
* Moves of training jobs: break before make. When the plan moves a training
  workload (a migration, a re-plan with measured throughput, a drained or down
  node) or relaunches its gang in place with other ranks, the old shards are
  stopped at once (every shard of the gang when one of its shards moves: the
  shards that stay are relaunched too, as a rank whose gang lost a member
  cannot go on) and the new shards' Launch waits until every old shard has
  reported its end (STOPPED, SUCCEEDED or FAILED) or its node is down (its
  session expired), at most ``stop_grace_s`` + :data:`MOVE_MARGIN_S`
  (:meth:`Dispatcher.move_timeout_s`; then it is launched anyway, with a
  warning). train-lm checkpoints the step it reached on SIGTERM, and the agent
  uploads a shard's last checkpoint before it reports the shard's end, so the
  new node downloads that checkpoint: a planned move loses no step, and two
  copies of a job never run at once (nor write one shared checkpoint
  directory). The same wait holds a gang restarted after a crash until the
  shards told to stop have ended. A shard a worker reports still running
  where the plan still wants it, never told to stop (a worker that registered
  again after a server restart), is not waited for. Services keep
  make-before-break (below).
* Rollouts. Replica ``i`` of version ``v`` of a service runs as shard index
  :func:`replica_index` (``i`` for odd versions, ``1000 + i`` for even ones),
  so a new version's replicas and the old ones can run side by side on one
  worker. When the plan switches a service to a new version, the old version's
  replicas are not stopped but *retire*: they stay in the router and keep
  serving. A new replica is launched on a worker at once where the node has
  GPUs free beside the retiring ones; otherwise it waits. Once every new
  replica launched reports an endpoint (is ready): if none waits, every
  retiring replica is stopped; if some wait for GPUs, one retiring replica on
  such a node is stopped (one at a time) to make room, and the next only when
  the replica that took its place is ready — but never when that would leave
  fewer ready replicas than the service's ``min_replicas``: then the rollout
  waits, the old version serving, until there is room beside it (or
  ``min_replicas`` is lowered). A stopped replica leaves the router at once
  (its in-flight requests finish in its stop grace). So with room for the new
  replicas beside the old (a surge) the service never has fewer ready replicas
  than before; updated in place, it has at most one fewer, and never fewer
  than ``min_replicas``. A new replica waiting
  to be restarted after a crash counts as not ready. A retiring replica that
  exits is not restarted. Two updates in a row: replicas of the version
  before the last are replaced in place where their shard index is the new
  version's (same parity). (The control loop decides where the new version
  runs — with the old one's replicas as its current placement — and keeps the
  old version placed while the new one cannot get ``min_replicas``.)
* Results. A workload becomes RUNNING when every shard reports RUNNING; a
  training workload SUCCEEDED when every shard has exited 0. A shard that exits
  otherwise (or any exit of a serving replica) is a crash: the whole gang (a
  training job) or the replica (a service) is stopped and launched again after
  a back-off of ``restart_backoff_s`` doubling per restart; after
  ``max_restarts`` restarts the next crash makes the workload FAILED, with the
  exit status and the tail of its log in the message. Statuses that arrive
  while a restart is pending (the rest of a broken gang exiting) are not
  counted again. A shard stopped on command reports STOPPED: not a crash.
* Progress (step, loss, samples/s of shard 0; a service's requests/s, latency
  and running replicas) is kept in memory and written to the workload's message
  at most every ``progress_interval_s``: "step 120/400 loss 2.3100 1500
  samples/s", "2 replicas running, 41.5 requests/s, p50 21 ms, p99 50 ms" (the
  replicas' requests/s summed; p50 their medians weighted by their requests/s,
  p99 the highest replica's; no latency until a replica reports one).
* Measured throughput. For a training workload, the step (work units done)
  in shard 0's RUNNING statuses is timed on arrival: each interval of at least
  :data:`RATE_WINDOW_S` between two reports gives work units/s of the whole
  gang, folded into a moving average (time constant :data:`SMOOTHING_S`; the
  runtime's samples/s likewise). The first progress report after a launch
  starts the first interval, so start-up and checkpoint loading are not
  counted; a relaunch or a crash starts again (the averages go on from what is
  stored for that GPU type and gang size). Written with the progress message
  (the store's ``observed``: work done, and per GPU type work units/s,
  samples/s, seconds measured) and on success; the control loop is notified
  when a type's rate has :data:`server.control.FEEDBACK_MIN_S` seconds behind
  it and again when it moves by more than :data:`FEEDBACK_CHANGE`.
* Logs. Log lines are kept in memory (the last :data:`LOG_LINES` per workload) for
  failure messages, and separately (:class:`LogBuffer`, the last
  :data:`LOG_LINES` of each of the last :data:`LOG_WORKLOADS` workloads that
  logged, kept after the workload ends) for ``Allocator.Logs``
  (``apportion logs ID [-f]``). They are lost when the server restarts; the
  workers keep each shard's full log on disk (``<work-dir>/logs/<id>/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from apportion.v1 import workers_pb2_grpc
from server import aio, convert
from server.aio import Outbox, Wakeup
from server.auth import Principal
from server.control import FEEDBACK_MIN_S
from server.convert import SERVE_FROM, checkpoint_name, serve_from
from server.errors import FailedPrecondition, NotFound, PermissionDenied, ServiceError, Unavailable
from server.rpc import Shared, async_stream, unary
from server.store import FAILED, PLACED, RUNNING, SUCCEEDED, TERMINAL, Observation, Store, WorkloadRow

log = logging.getLogger("apportion.workers")

WORKER_LABEL = "apportion.io/worker"  # on nodes registered by a worker: its advertised address
LOG_LINES = 200  # log lines kept per workload
LOG_WORKLOADS = 1000  # workloads whose log lines are kept after they end
TAIL_LINES = 20  # of them, in a failure message
BASE_PORT = 29500
REPLICA_STRIDE = 1000  # a service's even versions number their replicas from here (see "Rollouts")
UNATTACHED_FACTOR = 3  # of the heartbeat timeout, for a session no stream has served yet
REFRESH_EVENTS = 2000  # changes applied one by one; more are read whole
STREAM_POLL_S = 2.0  # a Connect wakes on every message to send; the poll only notices a stop
RATE_WINDOW_S = 1.0  # the shortest interval a work rate is measured over
SMOOTHING_S = 30.0  # time constant of the moving average of measured rates
FEEDBACK_CHANGE = 0.1  # relative change of a measured rate that makes the control loop re-plan
MOVE_MARGIN_S = 30.0  # beyond the stop grace, how long a moved training job waits for its old shards
LEASE_MARGIN = 0.25  # the least share of the heartbeat timeout a lease ends before it


@dataclass(frozen=True)
class WorkersConfig:
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 10.0
    max_restarts: int = 3
    restart_backoff_s: float = 1.0
    stop_grace_s: float = 10.0
    progress_interval_s: float = 2.0
    tick_s: float = 0.25  # how often liveness and restart back-offs are checked

    @property
    def lease_s(self) -> float:
        """How long a worker may run its shards after a heartbeat the server answered: the
        heartbeat timeout less a margin (two heartbeat intervals, at least a quarter of
        the timeout), so a cut-off worker has stopped them before the server marks its
        node down and places them elsewhere (see "Fencing"); with the defaults 6 s."""
        margin = max(2 * self.heartbeat_interval_s, LEASE_MARGIN * self.heartbeat_timeout_s)
        return max(0.0, self.heartbeat_timeout_s - margin)


def master_port(key: str) -> int:
    """A deterministic port per launch of a gang (its id, version and nodes: a gang moved
    elsewhere gets another port than the copy that may still be shutting down), or
    ``id/shard`` for a replica."""
    return BASE_PORT + zlib.crc32(key.encode()) % 1000


def shard_key(workload_id: str, shard_index: int) -> str:
    return f"{workload_id}/{shard_index}"


def replica_index(version: int, i: int) -> int:
    """The shard index replica ``i`` of version ``version`` of a service runs as: odd
    versions 0, 1, ..., even ones :data:`REPLICA_STRIDE` + i, so that the replicas of
    two successive versions can run side by side on one worker during a rollout."""
    return i + REPLICA_STRIDE * ((version - 1) % 2)


def _ms(seconds: float) -> str:
    """A latency in milliseconds: "21 ms", "4.5 ms"."""
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def _copy(node: pb.Node) -> pb.Node:
    out = pb.Node()
    out.CopyFrom(node)
    return out


# ----------------------------------------------------------------------------- sessions


class Session:
    def __init__(self, node_id: str, advertise: str, running: set[str]) -> None:
        self.id = uuid.uuid4().hex
        self.node_id = node_id
        self.advertise = advertise
        self.last_seen = time.monotonic()
        self.outbox: Outbox[wpb.ServerMessage] = Outbox()  # sent by its Connect stream
        self.stream = 0  # generation of the Connect stream that serves it
        self.connected = False
        self.attached = False  # a Connect stream has served it (connected: one serves it now)
        self.registered_at = 0.0  # on the dispatcher's clock
        self.closed = False
        self.sent: dict[str, tuple[Any, ...]] = {}  # shard key -> signature of the Launch sent
        self.alive: set[str] = set(running)  # shard keys the worker reports alive
        # replicas of a service's previous version kept serving during a rollout: key -> [gpus, stop sent]
        self.retiring: dict[str, list[Any]] = {}
        self.stopping: dict[str, float] = {}  # shard key -> when a Stop was last sent
        self.usage = wpb.Heartbeat()
        self.known: set[str] = set(running)  # shard keys sent or reported at registration: reports count
        self.workloads: set[str] = {k.rsplit("/", 1)[0] for k in running}  # may upload their checkpoints
        self.readable: set[str] = set(self.workloads)  # workloads whose checkpoints it may download

    def close(self) -> None:
        """End the session; its stream, if any, ends."""
        self.closed = True
        self.outbox.wakeup.fire()


class _Advertised(Mapping[str, str]):
    """The advertised address of each connected worker, looked up when asked (a dict of
    every connected worker's, built on every pass, cost as much as the pass itself)."""

    def __init__(self, sessions: dict[str, Session]) -> None:
        self._sessions = sessions

    def __getitem__(self, node_id: str) -> str:
        session = self._sessions[node_id]
        if not session.connected:
            raise KeyError(node_id)
        return session.advertise

    def __iter__(self) -> Iterator[str]:
        return (n for n, s in self._sessions.items() if s.connected)

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass(frozen=True)
class _Want:
    """One shard a worker should run."""

    node_id: str
    launch: wpb.Launch
    gang: tuple[str, ...] = ()  # a training job's nodes, shard by shard: one that moves relaunches them all

    @property
    def key(self) -> str:
        return shard_key(self.launch.workload_id, self.launch.shard_index)

    @property
    def signature(self) -> tuple[Any, ...]:
        x = self.launch
        return (x.version, x.gpus, x.node_rank, x.nnodes, x.world_size, x.rank_offset, x.master_addr,
                x.master_port, self.gang)  # fmt: skip


@dataclass
class _Track:
    """What the dispatcher knows of one dispatched workload (in memory)."""

    kind: str
    shards: int = 0
    total_steps: float = 0.0
    restarts: int = 0
    hold_until: float = 0.0  # a restart waits for its back-off
    hold_shard: int | None = None  # a service's replica being restarted (None: the whole gang)
    running: dict[int, str] = field(default_factory=dict)  # shard index -> the node it runs on
    succeeded: set[int] = field(default_factory=set)
    step: float = 0.0
    loss: float = 0.0
    samples_per_s: float = 0.0
    requests_per_s: dict[int, float] = field(default_factory=dict)
    latency_s: dict[int, tuple[float, float]] = field(default_factory=dict)  # replica -> (p50, p99)
    endpoints: dict[int, str] = field(default_factory=dict)
    endpoint_nodes: dict[int, str] = field(default_factory=dict)  # shard index -> the node it is on

    def drop_endpoint(self, index: int, node_id: str | None = None) -> None:
        """Take a replica out of the router (only if it is the one on ``node_id``, when given)."""
        if node_id is None or self.endpoint_nodes.get(index) == node_id:
            self.endpoints.pop(index, None)
            self.endpoint_nodes.pop(index, None)

    message: str = ""
    written_at: float = 0.0
    logs: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    # measured throughput (training): where it runs, the start of the current interval, the averages
    gpu_type: str = ""
    gpus: int = 0
    base: tuple[float, float] | None = None  # (step, monotonic time)
    # samples/s reported since ``base``, weighted by the time each report covers
    sampled: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (Σ rate·dt, Σ dt, time of the last report)
    work_per_s: float = 0.0
    rate_samples_per_s: float = 0.0
    measured_s: float = 0.0
    told: dict[str, float] = field(default_factory=dict)  # GPU type -> the rate the control loop last heard

    def restart_rate(self, observed: dict[str, Any]) -> None:
        """Measure afresh from the next report, the averages continuing what is stored for
        the GPU type it runs on now."""
        self.base = None
        stored = (observed.get("throughput") or {}).get(self.gpu_type) or {}
        same_gang = int(stored.get("gpus", -1)) == self.gpus
        self.work_per_s = float(stored.get("work_per_s", 0.0)) if same_gang else 0.0
        self.rate_samples_per_s = float(stored.get("samples_per_s", 0.0)) if same_gang else 0.0
        self.measured_s = float(stored.get("seconds", 0.0)) if same_gang else 0.0

    def measure(self, step: float, samples_per_s: float, now: float) -> None:
        """Shard 0 reports ``step`` at ``now``: the work rate of the interval since the
        last report that started one, folded into the moving averages."""
        if step <= 0:
            return  # nothing done yet (a fresh launch reports 0 before its first progress line)
        if self.base is None or step < self.base[0]:
            self.base = (step, now)  # the first progress of a (re)launch: startup and resume not counted
            self.sampled = (0.0, 0.0, now)
            return
        # The runtime's samples/s covers only its last progress interval (a stall there
        # -- two ranks and a server on 2 cores -- reads as a rate 4x too low): over the
        # window it is the mean of the reports, each weighted by the time since the one
        # before, as the work rate is over the same window.
        acc, span, last = self.sampled
        dt = max(0.0, now - last)
        self.sampled = (acc + samples_per_s * dt, span + dt, now)
        steps, seconds = step - self.base[0], now - self.base[1]
        if seconds < RATE_WINDOW_S or steps <= 0:
            return
        rate = steps / seconds
        acc, span, _last = self.sampled
        window_samples = acc / span if span > 0 else samples_per_s
        if self.measured_s <= 0:
            self.work_per_s, self.rate_samples_per_s = rate, window_samples
        else:
            alpha = 1.0 - math.exp(-seconds / SMOOTHING_S)
            self.work_per_s += alpha * (rate - self.work_per_s)
            self.rate_samples_per_s += alpha * (window_samples - self.rate_samples_per_s)
        self.measured_s += seconds
        self.base = (step, now)
        self.sampled = (0.0, 0.0, now)

    def observation(self) -> Observation | None:
        if self.kind != "training" or self.step <= 0:
            return None
        rated = self.measured_s > 0 and self.work_per_s > 0 and bool(self.gpu_type)
        return Observation(
            work_done=self.step,
            gpu_type=self.gpu_type,
            gpus=self.gpus,
            work_per_s=round(self.work_per_s, 6) if rated else None,
            samples_per_s=round(self.rate_samples_per_s, 3),
            seconds=round(self.measured_s, 3),
        )


@dataclass(frozen=True)
class LogEntry:
    seq: int  # increasing per server, for followers
    workload_id: str
    shard_index: int
    rank: int
    text: str
    time: float


class LogBuffer:
    """The last :data:`LOG_LINES` log lines of the last :data:`LOG_WORKLOADS` workloads, and a
    condition that followers wait on."""

    def __init__(self, lines: int = LOG_LINES, workloads: int = LOG_WORKLOADS) -> None:
        self._lines = lines
        self._workloads = workloads
        self._lock = threading.Lock()
        self.changed = Wakeup()  # fired on every added chunk: what followers (Logs) await
        self._seq = 0
        self._by_workload: OrderedDict[str, deque[LogEntry]] = OrderedDict()

    def add(self, chunk: wpb.LogChunk) -> None:
        now = time.time()
        with self._lock:
            kept = self._by_workload.get(chunk.workload_id)
            if kept is None:
                kept = self._by_workload[chunk.workload_id] = deque(maxlen=self._lines)
                while len(self._by_workload) > self._workloads:
                    self._by_workload.popitem(last=False)
            else:
                self._by_workload.move_to_end(chunk.workload_id)
            for line in chunk.text.splitlines():
                self._seq += 1
                kept.append(LogEntry(self._seq, chunk.workload_id, chunk.shard_index, chunk.rank, line, now))
        self.changed.fire()

    def after(self, workload_id: str, seq: int) -> list[LogEntry]:
        """The kept lines of a workload newer than ``seq`` (0: all kept), oldest first."""
        with self._lock:
            kept = self._by_workload.get(workload_id)
            return [e for e in kept if e.seq > seq] if kept else []


class Dispatcher:
    """Sessions, and the plan turned into launches and stops (see the module docstring)."""

    def __init__(self, shared: Shared, config: WorkersConfig) -> None:
        self.shared = shared
        self.config = config
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}  # node id -> its current session
        self._by_id: dict[str, Session] = {}
        self._tracks: dict[str, _Track] = {}
        self._rollout_waits: set[str] = set()  # services whose in-place rollout waits (logged once)
        self._moves: dict[str, float] = {}  # training workload -> until when its launch waits (0: waited)
        self.log_buffer = LogBuffer()
        self._dirty = threading.Event()
        self._seen_revision = -1
        self._rows: list[WorkloadRow] = []
        self._node_gpus: dict[str, int] = {}
        # nodes whose session has (or had) shards sent, alive or retiring: what reconcile
        # visits besides the nodes the plan wants something on (kept under _lock, pruned
        # there). With 4,000 idle workers, visiting every session on every pass was most
        # of the dispatcher's time.
        self._with_work: set[str] = set()
        self._placed: dict[str, WorkloadRow] = {}  # the PLACED and RUNNING workloads, by id
        self._unattached: dict[str, Session] = {}  # registered, no stream served yet (by session id)
        self._serve_from_ok: dict[str, bool] = {}  # service -> may it serve the training workload it names
        self._started = time.monotonic()
        # the clock silences are measured on: the server sets its stream loop's
        # (server.aio.EventLoop.clock), which stands still while that loop is behind
        self.clock: Callable[[], float] = time.monotonic
        self._orphans_checked = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="apportion-workers", daemon=True)

    @property
    def store(self) -> Store:
        return self.shared.store

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._dirty.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._lock:
            for s in self._sessions.values():
                s.close()

    def notify(self) -> None:
        """The plan or the workloads changed: reconcile soon."""
        self._dirty.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._dirty.wait(self.config.tick_s)
            if self._stopped.is_set():
                return
            self._dirty.clear()
            try:
                self._expire()
                self.reconcile()
            except Exception:  # never let the thread die
                log.exception("dispatch failed")

    # -- sessions --------------------------------------------------------------

    def _refuse_while_behind(self, node_id: str) -> None:
        """Backpressure: while a registered worker has waited half the heartbeat timeout
        for its stream to be served, refuse new registrations (UNAVAILABLE, retried by
        the worker). Each registration is an event for every watch; when they come faster
        than the server serves their streams, the sessions expired unserved, the workers
        registered again and the ramp collapsed (bench/streams.py --watches-first)."""
        now = self.clock()
        with self._lock:
            waiting = [s.registered_at for s in self._unattached.values() if not s.closed]
        if waiting and now - min(waiting) > self.config.heartbeat_timeout_s / 2:
            raise Unavailable(
                f"{len(waiting)} workers wait for their streams to be served; registering {node_id!r} "
                "later (retry shortly)"
            )

    def register(self, node: pb.Node, advertise: str, running: list[str]) -> Session:
        self._refuse_while_behind(node.id)
        try:
            old = self.store.get_node(node.id).spec
        except NotFound:
            old = {}
        node = _copy(node)
        node.state = "draining" if old.get("state") == "draining" else "ready"
        node.labels[WORKER_LABEL] = advertise
        # Checked alone: no rule relates one node to another but unique ids, which the
        # registration keeps (it replaces the stored node with its id). With every stored
        # node, 4,000 workers registering took minutes (each check built the whole cluster).
        convert.check_worker_node(
            node, gpu_types=self.store.gpu_types(), nodes=[], tenants=self.store.tenants()
        )
        self.store.upsert_inventory(nodes=[convert.message_to_dict(node)])
        session = Session(node.id, advertise, set(running))
        session.registered_at = self.clock()
        with self._lock:
            self._unattached[session.id] = session
            previous = self._sessions.get(node.id)
            if previous is not None:
                previous.close()
                self._by_id.pop(previous.id, None)
            self._sessions[node.id] = session
            self._by_id[session.id] = session
            if running:
                self._with_work.add(node.id)
        log.info(
            "worker registered", extra={"node": node.id, "advertise": advertise, "running": len(running)}
        )
        self.shared.loop.notify()
        self.notify()
        return session

    def attach(self, session_id: str, who: Principal) -> tuple[Session, int]:
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None or session.closed:
                raise FailedPrecondition("unknown or expired session: register again")
            who.require_node(session.node_id, "connecting a worker")  # before it displaces a stream
            session.stream += 1
            session.attached = True
            self._unattached.pop(session.id, None)
            session.outbox.wakeup.fire()  # a stream it displaces ends
            session.connected = True
            session.last_seen = time.monotonic()
        self.notify()
        return session, session.stream

    def detach(self, session: Session, generation: int) -> None:
        with self._lock:
            if session.stream == generation:
                session.connected = False

    def sessions(self) -> dict[str, Session]:
        with self._lock:
            return dict(self._sessions)

    def _expire(self) -> None:
        now = time.monotonic()
        timeout = self.config.heartbeat_timeout_s
        with self._lock:
            silent = self.clock()  # stands still while the stream loop is behind (server.aio)
            # A session whose stream was never attached has been sent nothing: it gets
            # longer. (Under load the server accepts new streams late: with 100 watches
            # open while 4,000 workers registered, Connects came after the timeout, each
            # worker registered again, and every registration was another event.)
            lost = [
                s
                for s in self._sessions.values()
                if silent - s.last_seen > (timeout if s.attached else UNATTACHED_FACTOR * timeout)
            ]
            for s in lost:
                s.close()
                del self._sessions[s.node_id]
                self._by_id.pop(s.id, None)
            for sid in [sid for sid, s in self._unattached.items() if s.closed]:
                del self._unattached[sid]
            live = set(self._sessions)
        down = [s.node_id for s in lost]
        if not self._orphans_checked and now - self._started > timeout:
            self._orphans_checked = True  # nodes of workers from before a restart that never came back
            down += [
                n.id
                for n in self.store.all_nodes()
                if WORKER_LABEL in (n.spec.get("labels") or {}) and n.id not in live and n.id not in down
            ]
        if down:
            self._mark_down(down)

    def _mark_down(self, node_ids: list[str]) -> None:
        """Mark the nodes of lost workers down, all in one write (one write per node made
        a storm of losses slower than the losses came)."""
        specs = []
        for node_id in node_ids:
            try:
                row = self.store.get_node(node_id)
            except NotFound:
                continue
            if row.spec.get("state") != "down":
                log.warning("worker lost: node marked down", extra={"node": node_id})
                specs.append({**row.spec, "state": "down"})
        if specs:
            self.store.upsert_inventory(nodes=specs)
            self.shared.loop.notify()
            self.notify()

    # -- reports from workers -----------------------------------------------------

    def on_message(self, session: Session, msg: wpb.WorkerMessage) -> None:
        session.last_seen = time.monotonic()
        body = msg.WhichOneof("body")
        if body == "heartbeat":
            session.usage = msg.heartbeat
            session.outbox.put(wpb.ServerMessage(lease=wpb.Lease(valid_s=self.config.lease_s)))
        elif body == "status":
            if self._reported_by(session, msg.status.workload_id, msg.status.shard_index):
                self._on_status(session, msg.status)
        elif body == "log" and self._reported_by(session, msg.log.workload_id, msg.log.shard_index):
            self.log_buffer.add(msg.log)
            with self._lock:
                track = self._tracks.get(msg.log.workload_id)
                if track is not None:
                    for line in msg.log.text.splitlines():
                        track.logs.append(f"[{msg.log.shard_index}:{msg.log.rank}] {line}")

    def _reported_by(self, session: Session, workload_id: str, shard_index: int) -> bool:
        """Whether ``session``'s worker may report for this shard (it was sent it)."""
        key = shard_key(workload_id, shard_index)
        with self._lock:
            if key in session.known:
                return True
        log.warning("a report for a shard this worker was never sent: ignored",
                    extra={"node": session.node_id, "shard": key})  # fmt: skip
        return False

    def may_upload(self, who: Principal, workload_id: str) -> bool:
        """Whether ``who`` may store a checkpoint of ``workload_id``: the admin, or the node
        whose current session was sent one of its shards."""
        if who.admin:
            return True
        with self._lock:
            session = self._sessions.get(who.node or "")
            return session is not None and workload_id in session.workloads

    def may_download(self, who: Principal, workload_id: str) -> bool:
        """Whether ``who`` may read ``workload_id``'s checkpoint: the admin, or the node
        running one of its shards or a service of the same tenant that serves from it."""
        if who.admin:
            return True
        with self._lock:
            session = self._sessions.get(who.node or "")
            return session is not None and workload_id in session.readable

    def _on_status(self, session: Session, status: wpb.ShardStatus) -> None:
        key = shard_key(status.workload_id, status.shard_index)
        with self._lock:
            if status.state in ("STARTING", "RUNNING"):
                session.alive.add(key)
                self._with_work.add(session.node_id)
            else:
                session.alive.discard(key)
                session.stopping.pop(key, None)
            track = self._tracks.get(status.workload_id)
            if key in session.retiring and status.state not in ("STARTING", "RUNNING"):
                del session.retiring[key]  # a retiring replica has exited: its GPUs are free
                if track is not None:
                    track.drop_endpoint(status.shard_index, session.node_id)
                    track.running.pop(status.shard_index, None)
                return
            if track is None or key not in session.sent:
                if track is not None and status.state not in ("STARTING", "RUNNING"):
                    track.drop_endpoint(status.shard_index, session.node_id)  # one stopped elsewhere
                return  # not (or no longer) what this worker was asked to run
            i = status.shard_index
            if status.state == "RUNNING":
                track.running[i] = session.node_id
                if status.endpoint:
                    track.endpoints[i] = status.endpoint
                    track.endpoint_nodes[i] = session.node_id
                if i == 0 and track.kind == "training":
                    track.step = status.step
                    track.loss = status.loss
                    track.samples_per_s = status.samples_per_s
                    track.measure(status.step, status.samples_per_s, time.monotonic())
                if track.kind == "inference":
                    track.requests_per_s[i] = status.requests_per_s
                    track.latency_s[i] = (status.latency_p50_s, status.latency_p99_s)
            elif status.state == "SUCCEEDED" and track.kind == "training":
                track.running.pop(i, None)
                track.succeeded.add(i)
                if i == 0 and status.step:
                    track.step = status.step
            elif status.state in ("FAILED", "SUCCEEDED"):
                track.running.pop(i, None)
                track.drop_endpoint(i, session.node_id)
                self._crashed(session, status, track)
            elif status.state == "STOPPED" and track.running.get(i) == session.node_id:
                track.running.pop(i, None)
                track.drop_endpoint(i, session.node_id)
        self.notify()

    def _crashed(self, session: Session, status: wpb.ShardStatus, track: _Track) -> None:
        now = time.monotonic()
        if track.hold_until > now and (track.hold_shard is None or track.hold_shard == status.shard_index):
            return  # the rest of a gang that is being restarted
        what = f"shard {status.shard_index} on node {session.node_id} exited with status {status.exit_code}"
        tail = status.message or "\n".join(list(track.logs)[-TAIL_LINES:])
        if track.restarts >= self.config.max_restarts:
            message = f"{what} after {track.restarts} restarts; log tail:\n{tail}"
            log.warning("workload failed", extra={"workload": status.workload_id, "exit": status.exit_code})
            self._finish(status.workload_id, FAILED, message)
            return
        track.restarts += 1
        delay = self.config.restart_backoff_s * 2 ** (track.restarts - 1)
        track.hold_until = now + delay
        track.hold_shard = status.shard_index if track.kind == "inference" else None
        if track.hold_shard is None:
            track.running.clear()
        else:
            track.running.pop(status.shard_index, None)
        track.succeeded.clear()
        track.base = None
        log.info(
            "shard crashed; restarting",
            extra={"workload": status.workload_id, "exit": status.exit_code, "restart": track.restarts},
        )
        # forget what was sent, so that the gang (or replica) is launched again after the hold
        for s in self._sessions.values():
            for key in list(s.sent):
                wid, _, index = key.rpartition("/")
                if wid == status.workload_id and (track.hold_shard is None or int(index) == track.hold_shard):
                    del s.sent[key]
                    if key in s.alive:
                        self._send_stop(s, key, "restarting after a crash")

    def _finish(
        self, workload_id: str, state: str, message: str, observation: Observation | None = None
    ) -> None:
        with contextlib.suppress(NotFound, FailedPrecondition):  # cancelled or finished meanwhile
            self.store.set_workload_state(workload_id, state, message, observation=observation)
        self.shared.loop.notify()
        self._dirty.set()

    # -- the plan -> launches and stops ---------------------------------------------

    def _wanted(self, rows: list[WorkloadRow], advertise: Mapping[str, str]) -> list[_Want]:
        out: list[_Want] = []
        for row in rows:
            if row.state not in (PLACED, RUNNING) or not row.placement:
                continue
            placement = row.placement
            old = placement.get("spec")
            version = placement.get("version", row.version)
            spec = old if version != row.version and isinstance(old, dict) else row.spec
            if not spec.get("runtime"):
                continue
            shards = placement.get("shards") or []
            workload = convert.workload_from_dict(spec)
            if not self._serve_from_ok.get(row.id, True) and SERVE_FROM in workload.runtime.env:
                del workload.runtime.env[SERVE_FROM]  # another tenant's (or no) training workload
            gpu_type = str(placement.get("gpu_type", ""))
            if row.kind == "training":
                out += self._gang(row.id, version, workload, gpu_type, shards, advertise)
            else:
                for i, shard in enumerate(shards):
                    node = str(shard.get("node_id", ""))
                    if node not in advertise:
                        continue
                    gpus = int(shard.get("gpus", 0))
                    index = replica_index(version, i)
                    launch = wpb.Launch(
                        workload_id=row.id, version=version, shard_index=index, gpus=gpus, gpu_type=gpu_type,
                        node_rank=0, nnodes=1, world_size=max(1, gpus), rank_offset=0,
                        master_addr=advertise[node], master_port=master_port(shard_key(row.id, index)),
                        workload=workload,
                    )  # fmt: skip
                    out.append(_Want(node, launch))
        return out

    def _gang(
        self,
        workload_id: str,
        version: int,
        workload: pb.Workload,
        gpu_type: str,
        shards: list[dict[str, Any]],
        advertise: Mapping[str, str],
    ) -> list[_Want]:
        nodes = [str(s.get("node_id", "")) for s in shards]
        if not nodes or any(n not in advertise for n in nodes):
            return []  # launched only whole: a gang with a missing member would hang
        procs = [max(1, int(s.get("gpus", 0))) for s in shards]
        out = []
        for i, shard in enumerate(shards):
            launch = wpb.Launch(
                workload_id=workload_id, version=version, shard_index=i, gpus=int(shard.get("gpus", 0)),
                gpu_type=gpu_type, node_rank=i, nnodes=len(shards), world_size=sum(procs),
                rank_offset=sum(procs[:i]), master_addr=advertise[nodes[0]],
                master_port=master_port(f"{workload_id}/{version}/{'/'.join(nodes)}"), workload=workload,
            )  # fmt: skip
            out.append(_Want(nodes[i], launch, tuple(nodes)))
        return out

    def _refresh(self) -> bool:
        """Bring the placed and running workloads and the nodes' GPU counts up to date from
        the events since the last look (every change is one, with the row as it became:
        re-reading every node's count on each node event took up to 0.3 s with 4,000);
        read them whole at first, after a compaction, or when more than a batch changed.
        Whether anything changed. (Reading the placed workloads whole on every change
        cost ~20 ms a pass with 900 of them, while 4,000 workers heartbeat.)"""
        revision = self.store.revision()
        if revision == self._seen_revision:
            return False
        events = None
        if self._seen_revision >= 0:
            with contextlib.suppress(FailedPrecondition):
                events = self.store.events_after(self._seen_revision, limit=REFRESH_EVENTS)
        if events is None or len(events) >= REFRESH_EVENTS:
            self._placed = {r.id: r for r in self.store.workloads_in((PLACED, RUNNING))}
            self._node_gpus = self.store.node_gpus()
            self._seen_revision = revision  # read before: the events after it are applied again
        else:
            for event in events:
                if event.kind == "node" and event.action == "deleted":
                    self._node_gpus.pop(event.id, None)
                elif event.kind == "node":  # the event's data is the node's row
                    self._node_gpus[event.id] = int(event.data.get("spec", {}).get("gpus", 0) or 0)
                elif event.kind == "workload" and event.action == "deleted":
                    self._placed.pop(event.id, None)
                elif event.kind == "workload":
                    row = WorkloadRow(**event.data)
                    if row.state in (PLACED, RUNNING):
                        self._placed[row.id] = row
                    else:
                        self._placed.pop(row.id, None)
            self._seen_revision = events[-1].revision if events else revision
        self._rows = sorted(self._placed.values(), key=lambda r: r.id)
        return True

    def reconcile(self) -> None:
        sessions = self.sessions()
        if not sessions and not self._tracks:
            return  # no workers: planning-only use costs nothing
        if self._refresh():
            self._serve_from_ok = self._serve_from_allowed(self._rows)
            self._sync_tracks(self._rows)
        rows = self._rows
        advertise = _Advertised(sessions)
        now = time.monotonic()
        with self._lock:
            wants, held = [], set()
            for w in self._wanted(rows, advertise):
                if self._held(w, now):
                    held.add(w.launch.workload_id)  # restarting after a crash
                else:
                    wants.append(w)
            by_node: dict[str, dict[str, _Want]] = {}
            serving_version: dict[str, int] = {}  # service -> the version the plan wants
            for w in wants:
                by_node.setdefault(w.node_id, {})[w.key] = w
                if w.launch.workload.WhichOneof("spec") == "inference":
                    serving_version[w.launch.workload_id] = w.launch.version
            blocked: dict[str, list[tuple[Session, _Want]]] = {}  # service -> launches waiting for GPUs
            # a session with nothing sent, alive or retiring and nothing wanted has nothing to do
            worked = {n: sessions[n] for n in self._with_work if n in sessions}
            visit = sorted(worked.keys() | by_node.keys())  # sorted: launches go out in one order
            busy = {n: sessions[n] for n in visit if n in sessions and sessions[n].connected}
            for node_id, session in busy.items():
                mine = by_node.get(node_id, {})
                for key in list(session.sent):
                    if key not in mine:
                        sig = session.sent.pop(key)
                        wid = key.rpartition("/")[0]
                        if wid in serving_version and sig[0] != serving_version[wid]:
                            session.retiring[key] = [int(sig[1]), False]  # serves until the new version does
                            self._with_work.add(node_id)
                            log.info("replica retiring", extra={"node": node_id, "shard": key})
                            continue
                        self._send_stop(session, key, "no longer in the plan")
                        track = self._tracks.get(wid)
                        if track is not None:  # a replica moved or scaled away: out of the router now
                            track.drop_endpoint(int(key.rpartition("/")[2]), node_id)
                for key, w in mine.items():  # a training shard relaunched in place is stopped first
                    sent = session.sent.get(key)
                    if (
                        sent is not None
                        and sent != w.signature
                        and w.launch.workload.WhichOneof("spec") == "training"
                    ):
                        del session.sent[key]
                        if key in session.alive:
                            self._send_stop(session, key, "the gang changed")
                for key in list(session.retiring):
                    if key.rpartition("/")[0] not in serving_version:  # the service is gone or moved
                        self._retire(session, key, "no longer in the plan")
                for key in list(session.alive):
                    if key not in mine and key not in session.sent and key not in session.retiring:
                        last = session.stopping.get(key, 0.0)
                        if now - last > max(5.0, self.config.stop_grace_s):
                            self._send_stop(session, key, "not in the plan")
            ending = self._ending(worked, wants, by_node, now)
            for node_id, session in busy.items():
                mine = by_node.get(node_id, {})
                free = self._free_gpus(node_id, session, mine) if session.retiring else None
                for key, w in mine.items():
                    sig = w.signature
                    if session.sent.get(key) == sig:
                        continue
                    if w.launch.workload_id in ending:
                        continue  # break before make: the old shards of a training job end first
                    if free is not None and key not in session.sent:
                        if w.launch.gpus > free:
                            blocked.setdefault(w.launch.workload_id, []).append((session, w))
                            continue  # its GPUs are still held by retiring replicas
                        free -= w.launch.gpus
                    replaced = key in session.sent or session.retiring.pop(key, None) is not None
                    if key in session.sent:
                        self._send_stop(session, key, "the gang changed")
                    track = self._tracks.get(w.launch.workload_id)
                    if track is not None:
                        track.base = None  # a (re)launch: its startup is not measured
                        if replaced:  # the worker replaces the process: its endpoint goes with it
                            track.drop_endpoint(w.launch.shard_index, node_id)
                    session.sent[key] = sig
                    self._with_work.add(node_id)
                    self._grant(session, w.launch)
                    session.outbox.put(wpb.ServerMessage(launch=w.launch))
                    log.info(
                        "launch", extra={"node": node_id, "shard": key, "world_size": w.launch.world_size}
                    )
            self._roll(sessions, busy, wants, blocked, held)
            self._update_states(rows, wants, now)
            self._with_work = {n for n, s in worked.items() if s.sent or s.alive or s.retiring}
            self._with_work.update(n for n, s in busy.items() if s.sent or s.alive or s.retiring)

    @staticmethod
    def _grant(session: Session, launch: wpb.Launch) -> None:
        """What a Launch lets its worker report, upload and download (under the lock)."""
        session.known.add(shard_key(launch.workload_id, launch.shard_index))
        session.workloads.add(launch.workload_id)
        session.readable.add(launch.workload_id)
        source = serve_from(launch.workload)
        if source is not None:  # already checked against the service's tenant (_serve_from_allowed)
            session.readable.add(source)

    def _serve_from_allowed(self, rows: list[WorkloadRow]) -> dict[str, bool]:
        """Service id -> whether the training workload its APPORTION_SERVE_FROM names is
        one of its own tenant's (services naming none are left out)."""
        allowed: dict[str, bool] = {}
        for row in rows:
            if row.kind == "training":
                continue
            env = (row.spec.get("runtime") or {}).get("env") or {}
            name = checkpoint_name(str(env.get(SERVE_FROM, "")))
            if name is None:
                continue
            try:
                source = self.store.get_workload(name)
            except NotFound:
                allowed[row.id] = False
                continue
            allowed[row.id] = source.kind == "training" and source.tenant == row.tenant
            if not allowed[row.id]:
                log.warning(
                    f"{row.id}: {SERVE_FROM} names {name!r}, not a training workload of tenant "
                    f"{row.tenant!r}: the replicas start without it",
                    extra={"workload": row.id},
                )
        return allowed

    # -- moves of training jobs -----------------------------------------------------------

    def _ending(
        self,
        sessions: dict[str, Session],
        wants: list[_Want],
        by_node: dict[str, dict[str, _Want]],
        now: float,
    ) -> set[str]:
        """The training workloads whose launches wait (break before make): those with a
        shard that a live worker still runs where the plan no longer wants it, or that
        was told to stop (a gang relaunched in place, a crash), until each such shard has
        reported its end or its node is down, or :meth:`move_timeout_s` has passed since
        the wait began. (A shard the plan still wants where it runs, never told to stop —
        a worker that registered again — is not waited for.)"""
        training = {w.launch.workload_id for w in wants if w.launch.workload.WhichOneof("spec") == "training"}
        old: dict[str, list[str]] = {}
        for node_id, session in sessions.items():  # live sessions: a down node's shards count as ended
            mine = by_node.get(node_id, {})
            for key in session.alive:
                wid = key.rpartition("/")[0]
                if wid in training and (key not in mine or key in session.stopping):
                    old.setdefault(wid, []).append(f"{key}@{node_id}")
        for wid in list(self._moves):
            if wid not in old:
                del self._moves[wid]
                log.info("the old shards have ended: launching", extra={"workload": wid})
        out = set()
        for wid, shards in old.items():
            deadline = self._moves.get(wid)
            if deadline is None:
                deadline = self._moves[wid] = now + self.move_timeout_s
                log.info("launch waits for the old shards to end", extra={"workload": wid, "shards": shards})
            if now < deadline:
                out.add(wid)
            elif deadline > 0:
                self._moves[wid] = 0.0  # once: launched anyway from now on
                log.warning(
                    "old shards did not report their end in time: launching anyway",
                    extra={"workload": wid, "shards": shards, "waited_s": self.move_timeout_s},
                )
        return out

    @property
    def move_timeout_s(self) -> float:
        """How long a moved training job's launch waits for its old shards: the stop grace,
        and :data:`MOVE_MARGIN_S` for the last checkpoint's upload and the report."""
        return self.config.stop_grace_s + MOVE_MARGIN_S

    # -- rollouts -----------------------------------------------------------------------

    def _free_gpus(self, node_id: str, session: Session, mine: dict[str, _Want]) -> int:
        """GPUs of a node with retiring replicas that a new launch may take: what the
        launches sent and kept, and the retiring replicas (until they have exited), leave."""
        used = sum(w.launch.gpus for key, w in mine.items() if key in session.sent)
        used += sum(int(gpus) for gpus, _ in session.retiring.values())
        return self._node_gpus.get(node_id, 0) - used

    def _roll(
        self,
        sessions: dict[str, Session],
        busy: dict[str, Session],
        wants: list[_Want],
        blocked: dict[str, list[tuple[Session, _Want]]],
        held: set[str],
    ) -> None:
        """Move each service in a rollout on: its retiring replicas are stopped once every
        replica of the new version is launched and ready; while some new replicas wait
        for GPUs that retiring ones hold, and every new replica launched is ready, one
        retiring replica on such a node is stopped to make room (one at a time)."""
        retiring: dict[str, list[tuple[Session, str]]] = {}
        for session in busy.values():  # the connected sessions with something to do
            if session.connected:
                for key in session.retiring:
                    retiring.setdefault(key.rpartition("/")[0], []).append((session, key))
        for wid, old in retiring.items():
            track = self._tracks.get(wid)
            if track is None or wid in held:
                continue  # (a new replica restarting after a crash: not ready)
            launched = [w for w in wants if w.launch.workload_id == wid and w.key in sessions[w.node_id].sent]
            if any(w.launch.shard_index not in track.endpoints for w in launched):
                continue  # new replicas starting: the old ones serve meanwhile
            waiting = blocked.get(wid, [])
            if not waiting:
                for session, key in old:
                    self._retire(session, key, "the new version serves")
                continue
            if any(session.retiring[key][1] for session, key in old):
                continue  # one is stopping already: its GPUs come free when it has exited
            spec = waiting[0][1].launch.workload.inference
            least = spec.min_replicas if spec.HasField("min_replicas") else 1
            if len(track.endpoints) - 1 < least:
                # making room would leave fewer than min_replicas serving: the old version
                # keeps serving until there is room beside it (or min_replicas is lowered)
                if wid not in self._rollout_waits:
                    self._rollout_waits.add(wid)
                    log.info(
                        "rollout waits: no room for a new replica without going below min_replicas",
                        extra={"workload": wid, "ready": len(track.endpoints), "min_replicas": least},
                    )
                continue
            self._rollout_waits.discard(wid)
            nodes = {session.node_id for session, _ in waiting}
            for session, key in old:
                if session.node_id in nodes:
                    self._retire(session, key, "making room for the new version")
                    break

    def _retire(self, session: Session, key: str, reason: str) -> None:
        """Stop a retiring replica: out of the router at once; its GPUs count as held until
        the worker reports it gone."""
        entry = session.retiring.get(key)
        if entry is None or entry[1]:
            return
        entry[1] = True
        wid, _, index = key.rpartition("/")
        track = self._tracks.get(wid)
        if track is not None:
            track.drop_endpoint(int(index), session.node_id)
            track.running.pop(int(index), None)
        if key in session.alive:
            self._send_stop(session, key, reason)
        else:
            del session.retiring[key]

    def _held(self, want: _Want, now: float) -> bool:
        track = self._tracks.get(want.launch.workload_id)
        if track is None or track.hold_until <= now:
            return False
        return track.hold_shard is None or track.hold_shard == want.launch.shard_index

    def _send_stop(self, session: Session, key: str, reason: str) -> None:
        wid, _, index = key.rpartition("/")
        session.stopping[key] = time.monotonic()
        stop = wpb.Stop(
            workload_id=wid, shard_index=int(index), reason=reason, grace_s=self.config.stop_grace_s
        )
        session.outbox.put(wpb.ServerMessage(stop=stop))
        log.info("stop", extra={"node": session.node_id, "shard": key, "reason": reason})

    def _sync_tracks(self, rows: list[WorkloadRow]) -> None:
        with self._lock:
            live = {r.id for r in rows if r.spec.get("runtime")}
            for wid in list(self._tracks):
                if wid not in live:
                    del self._tracks[wid]
            for row in rows:
                if row.id not in live:
                    continue
                track = self._tracks.get(row.id)
                fresh = track is None
                if track is None:
                    track = self._tracks[row.id] = _Track(kind=row.kind)
                placement = row.placement or {}
                shards = placement.get("shards") or []
                track.shards = len(shards)
                remaining = (row.spec.get("training") or {}).get("remaining_work")
                track.total_steps = float(remaining or 0)
                gpu_type = str(placement.get("gpu_type", ""))
                gpus = sum(int(s.get("gpus", 0)) for s in shards)
                if fresh or (gpu_type, gpus) != (track.gpu_type, track.gpus):
                    track.gpu_type, track.gpus = gpu_type, gpus
                    track.restart_rate(row.observed)

    def _update_states(self, rows: list[WorkloadRow], wants: list[_Want], now: float) -> None:
        wanted: dict[str, list[_Want]] = {}
        for w in wants:
            wanted.setdefault(w.launch.workload_id, []).append(w)
        for row in rows:
            track = self._tracks.get(row.id)
            if track is None or row.state in TERMINAL:
                continue
            n = track.shards
            if track.kind == "training" and n and len(track.succeeded) >= n:
                message = f"done: {self._progress(track)}".rstrip(": ")
                self._finish(row.id, SUCCEEDED, message, track.observation())
                del self._tracks[row.id]
                continue
            mine = wanted.get(row.id, [])
            all_running = (
                n > 0
                and len(mine) == n
                and all(track.running.get(w.launch.shard_index) == w.node_id for w in mine)
            )
            message = self._progress(track)
            due = now - track.written_at >= self.config.progress_interval_s
            start = all_running and row.state == PLACED
            progress = row.state == RUNNING and bool(message) and message != row.message and due
            if start or progress:
                self._write(row.id, RUNNING, message, track, now)

    def _write(self, workload_id: str, state: str, message: str, track: _Track, now: float) -> None:
        track.written_at = now
        track.message = message
        observation = track.observation()
        with contextlib.suppress(NotFound, FailedPrecondition):
            self.store.set_workload_state(workload_id, state, message, observation=observation)
        if observation is None or observation.work_per_s is None or observation.seconds < FEEDBACK_MIN_S:
            return
        told = track.told.get(observation.gpu_type)
        if told is None or abs(observation.work_per_s - told) > FEEDBACK_CHANGE * told:
            track.told[observation.gpu_type] = observation.work_per_s
            log.info(
                "measured throughput",
                extra={
                    "workload": workload_id,
                    "gpu_type": observation.gpu_type,
                    "work_per_s": observation.work_per_s,
                    "measured_s": observation.seconds,
                },
            )
            self.shared.loop.notify()  # plans may change with it (control: throughput feedback)

    @staticmethod
    def _progress(track: _Track) -> str:
        if track.kind == "training":
            if not track.step and not track.loss:
                return ""
            total = f"/{track.total_steps:g}" if track.total_steps else ""
            text = f"step {track.step:g}{total} loss {track.loss:.4f}"
            if track.samples_per_s:
                text += f" {track.samples_per_s:.0f} samples/s"
            return text
        if not track.running:
            return ""
        rps = sum(track.requests_per_s.get(i, 0.0) for i in track.running)
        text = f"{len(track.running)} replicas running, {rps:.1f} requests/s"
        latency = [
            (track.requests_per_s.get(i, 0.0), *track.latency_s[i])
            for i in track.running
            if i in track.latency_s
        ]
        latency = [x for x in latency if x[1] > 0]
        if latency:  # p50: the replicas' medians weighted by their requests/s; p99: the highest replica's
            weight = sum(r for r, _, _ in latency)
            p50 = (
                sum(r * p for r, p, _ in latency) / weight
                if weight > 0
                else sum(p for _, p, _ in latency) / len(latency)
            )
            text += f", p50 {_ms(p50)}, p99 {_ms(max(p for _, _, p in latency))}"
        return text

    # -- for other parts of the server ------------------------------------------------

    def endpoints(self, workload_id: str) -> dict[int, str]:
        """A service's ready replicas: shard index -> endpoint."""
        with self._lock:
            track = self._tracks.get(workload_id)
            return dict(track.endpoints) if track else {}

    def logs(self, workload_id: str) -> list[str]:
        with self._lock:
            track = self._tracks.get(workload_id)
            return list(track.logs) if track else []


# ----------------------------------------------------------------------------- the servicer


class WorkersServicer(workers_pb2_grpc.WorkersServicer):
    NODES_ALLOWED = True  # the worker protocol: node tokens may call it (each method checks which node)

    def __init__(self, shared: Shared, dispatcher: Dispatcher) -> None:
        self.shared = shared
        self.dispatcher = dispatcher

    @unary
    def Register(
        self, request: wpb.RegisterRequest, context: grpc.ServicerContext, who: Principal
    ) -> wpb.RegisterResponse:
        who.require_node(request.node.id, "registering a worker")
        session = self.dispatcher.register(request.node, request.advertise_address, list(request.running))
        config = self.dispatcher.config
        return wpb.RegisterResponse(
            session_id=session.id,
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            lease_s=config.lease_s,
        )

    @async_stream
    async def Connect(
        self,
        request_iterator: AsyncIterator[wpb.WorkerMessage],
        context: grpc.aio.ServicerContext[Any, Any],
        who: Principal,
    ) -> AsyncIterator[wpb.ServerMessage]:
        if not (who.admin or who.node):
            raise PermissionDenied(f"connecting a worker needs a node token; the caller is {who.name}")
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if not first.session_id:
            raise FailedPrecondition("the first message must carry the session id from Register")
        session, generation = await asyncio.to_thread(self.dispatcher.attach, first.session_id, who)
        await self._receive(session, first)
        reader = asyncio.create_task(self._read(request_iterator, session, generation))
        reader.add_done_callback(lambda _: session.outbox.wakeup.fire())
        try:
            while not reader.done() and not self.shared.stopping:
                if session.closed or session.stream != generation:
                    break
                sent = session.outbox.wakeup.ticket()  # before the look: no message waits a poll
                item = session.outbox.take()
                if item is None:
                    await aio.wait(sent, STREAM_POLL_S)
                    continue
                yield item
        finally:
            reader.cancel()
            self.dispatcher.detach(session, generation)

    async def _read(
        self, request_iterator: AsyncIterator[wpb.WorkerMessage], session: Session, generation: int
    ) -> None:
        """The worker's messages, in order, until its stream ends or is displaced."""
        try:
            async for msg in request_iterator:
                if session.closed or session.stream != generation:
                    break
                await self._receive(session, msg)
        except (grpc.RpcError, ServiceError, ValueError):
            pass
        except Exception:
            log.exception("worker stream failed", extra={"node": session.node_id})

    async def _receive(self, session: Session, msg: wpb.WorkerMessage) -> None:
        """A heartbeat is handled on the loop (it takes no lock); a status or log line,
        which may wait for the dispatcher's lock or write the store, in a thread."""
        if msg.WhichOneof("body") == "heartbeat":
            self.dispatcher.on_message(session, msg)
        else:
            await asyncio.to_thread(self.dispatcher.on_message, session, msg)
