"""The node agent: ``apportion worker --server ADDR ...`` (also ``python -m worker ...``).

It presents this machine's GPUs (found with ``nvidia-smi``, or ``--gpus N
--gpu-type T`` simulated ones on a CPU-only machine) as one node, registers it
with the server's ``Workers`` service, keeps one ``Connect`` stream
(heartbeats with usage, shard statuses and log lines up; ``Launch`` and
``Stop`` down) and runs the processes of the shards it is given. It never
imports torch: the runtimes do (``worker.runtimes``).

Processes. A shard runs one process per GPU (one if it has none), each in its
own session and process group (``start_new_session``), with a clean environment
(of the agent's only what :data:`PASSED_ENV` and ``--pass-env`` name, never an
``APPORTION_*`` variable; ``HOME`` is its run directory) and the torchrun environment:
RANK (rank_offset + local rank), WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK (node_rank), MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES (the
local GPU given to that rank; empty for simulated GPUs), and APPORTION_WORKLOAD_ID,
APPORTION_SHARD_INDEX, APPORTION_CHECKPOINT_DIR (``<work-dir>/checkpoints/<id>``,
shared by the workers of one machine that share ``--work-dir``),
APPORTION_TOTAL_STEPS (``training.remaining_work``), APPORTION_REPLICA_ID (a
service's shard index), then the runtime's own env (which may override any).
An APPORTION_SERVE_FROM in the runtime's env (``serve-lm``: what to load) that
is a bare name, not a path, is a training workload's id and becomes that
workload's checkpoint directory, ``<work-dir>/checkpoints/<name>``; a path is
left as it is.
PYTHONPATH gets the directories this agent's packages come from, so the
built-in runtimes import from a checkout too. The working directory is
``<work-dir>/runs/<id>.<shard>``.

The runtime's argv: ``builtin: train-lm`` -> ``python -m worker.runtimes.train_lm
ARGS``, ``serve-lm`` -> ``worker.runtimes.serve_lm``; ``entrypoint:
"mod:fn"`` -> ``python -c "import mod; mod.fn()" ARGS``; ``command: [...]`` ->
that argv followed by ARGS.

Output. stdout and stderr are read together, line by line. ``APPORTION_PROGRESS
{json}`` (step, total_steps, loss, samples_per_s, requests_per_s,
latency_p50_s, latency_p99_s) and
``APPORTION_READY {"endpoint": "host:port"}`` lines become ShardStatus (from
local rank 0; at most :data:`PROGRESS_EVERY_S` apart); every other line goes to
the server as a LogChunk and to ``<work-dir>/logs/<id>/shard-<i>.log``. A shard
ends when all its processes have; the first process to fail takes the rest of
the shard down (a gang that lost a rank cannot go on). Its status: STOPPED if a
Stop asked for it, SUCCEEDED if every process exited 0, else FAILED with the
exit status (a signal as ``-N``) and the log tail in the message.

Checkpoints (``worker.checkpoint_sync``). Before a shard of a ``train-lm`` job
starts (or a ``serve-lm`` whose APPORTION_SERVE_FROM names a training
workload), the agent downloads the server's checkpoint of that workload into
``<work-dir>/checkpoints/<id>`` when it is newer than the newest one there, so
a job resumes on any node without a shared file system. For the shard with
global rank 0 of a ``train-lm`` job a background thread uploads each new
checkpoint the runtime writes; when the shard ends, its last checkpoint is
uploaded (at most ``upload_finish_s``) before its end is reported.

Stop: SIGTERM to each process group, SIGKILL after ``grace_s``. A Launch of a
shard that runs with the same parameters is answered with its status; with
other parameters it is stopped and started again.

Fencing. The server answers each heartbeat with a lease (``Lease``; the lease
from registering comes with ``RegisterResponse.lease_s``); the agent writes its
end to ``<work-dir>/leases/<node>``, and its watchdog (``worker.watchdog``, a
process in a session of its own, so it acts also while the agent is frozen)
SIGKILLs the shards when the lease runs out or the agent is gone. The server
places a lost node's work elsewhere only after its heartbeat timeout, which is
longer than the lease: a job never runs on two nodes at once.

Restarts and orphans. Each process has a pid file under ``<work-dir>/pids/``
(pid and its start time, so a recycled pid is never killed). On start the agent
kills every process group those files name that still exists and removes the
files: nothing survives an agent, and the server launches again what the plan
still wants (simplest, and no orphan can keep GPUs). On SIGTERM/SIGINT it stops
its processes (their grace, bounded by ``--stop-grace``) and exits 0. If the
stream breaks it reconnects with back-off; if the server no longer knows the
session (a server restart) it registers again, telling the server which shards
still run so the server can keep or stop them. ``Register`` retries while the
server is unavailable.

GPU type. The node's GPU type must exist on the server; if it does not, the
agent adds it (``UpsertNodes``) with ``--gpu-memory-gib`` (or the memory
``nvidia-smi`` reports) when its token may (the admin's; with a node token the
admin adds the type, and Register says when it is missing).

The credential, and what a job can reach. Registering needs, when the server has
tokens, a node token for this node (``{node: ID}``) or the admin's, read from
``--token-file`` or ``$APPORTION_TOKEN`` (removed from the agent's environment at
once); ``--token`` is refused, as a command line is readable by every process on
the machine. The agent marks itself not dumpable, so processes of its user read
neither its ``/proc/PID/environ`` nor its memory. With ``--job-uids FIRST-LAST``
(the agent as root) each shard runs as a user id of its own from that range, in a
fresh run directory (mode 0700) that also holds its checkpoint directory and
what it serves from; the id's processes are all killed before it is used again.
As root with a credential and no ``--job-uids`` the agent refuses to start, unless
``--allow-root-jobs``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc

from apportion.client import ApportionError, Client
from apportion.v1 import types_pb2 as pb
from apportion.v1 import workers_pb2 as wpb
from apportion.v1 import workers_pb2_grpc
from worker import checkpoint_sync, watchdog

log = logging.getLogger("apportion.worker")

PROGRESS_PREFIX = "APPORTION_PROGRESS "
READY_PREFIX = "APPORTION_READY "
PROGRESS_EVERY_S = 0.5  # least time between two progress statuses of one shard
TAIL_LINES = 20
OUTBOX_LIMIT = 10_000  # queued messages; log lines beyond are dropped (statuses never are)
GIB = 1024**3
TOKEN_ENV = "APPORTION_TOKEN"
SAFE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")  # solver.validate.NAME_RULE
PR_SET_DUMPABLE = 4  # prctl(2)


class AgentError(Exception):
    """A configuration the agent cannot run with (reported on stderr, exit 2)."""


# ----------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Gpus:
    count: int
    gpu_type: str
    memory_gib: float | None
    simulated: bool


def detect_gpus(spec: str, gpu_type: str | None, memory_gib: float | None) -> Gpus:
    """``--gpus auto|N``: real GPUs through nvidia-smi, or N simulated ones of ``gpu_type``."""
    if spec != "auto":
        try:
            count = int(spec)
        except ValueError:
            raise AgentError(f"--gpus must be auto or a number, not {spec!r}") from None
        if count < 0:
            raise AgentError("--gpus must be ≥ 0")
        if not gpu_type:
            raise AgentError("--gpus N needs --gpu-type T (the GPU type to present)")
        return Gpus(count, gpu_type, memory_gib, simulated=True)
    rows = _nvidia_smi("name,memory.total", timeout=20)
    if not rows:
        raise AgentError(
            "--gpus auto found no GPU (nvidia-smi is missing or lists none); "
            "to present simulated GPUs pass --gpus N --gpu-type T"
        )
    name = rows[0][0]
    memory = memory_gib if memory_gib is not None else round(float(rows[0][1]) / 1024, 1)
    default_type = name.lower().replace("nvidia ", "").replace(" ", "-")
    return Gpus(len(rows), gpu_type or default_type, memory, simulated=False)


def memory_gib() -> tuple[float, float]:
    """(total, used) host memory in GiB, from /proc/meminfo (zeros where it is missing)."""
    info: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = float(rest.split()[0]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    total = info.get("MemTotal", 0.0)
    return total, total - info.get("MemAvailable", total)


def gpu_usage() -> list[wpb.GpuUsage]:
    """Utilization and memory of the real GPUs (nvidia-smi); empty when it fails."""
    try:
        return [
            wpb.GpuUsage(index=int(index), utilization=float(util) / 100, memory_used_gib=float(used) / 1024)
            for index, util, used in _nvidia_smi("index,utilization.gpu,memory.used", timeout=10)
        ]
    except ValueError:
        return []


def _nvidia_smi(query: str, timeout: float) -> list[list[str]]:
    """The rows of ``nvidia-smi --query-gpu=QUERY`` (CSV, no units); empty when it is
    missing or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- what to run


def package_roots() -> list[str]:
    """Directories to put on a child's PYTHONPATH so ``worker`` and ``apportion`` import."""
    import apportion
    import worker

    roots = [
        str(Path(worker.__file__).resolve().parents[1]),
        str(Path(apportion.__file__).resolve().parents[1]),
    ]
    return list(dict.fromkeys(roots))


def runtime_argv(runtime: pb.Runtime, python: str = sys.executable) -> list[str]:
    """The argv of a workload's runtime (see the module docstring)."""
    args = list(runtime.args)
    if runtime.builtin:
        modules = {"train-lm": "worker.runtimes.train_lm", "serve-lm": "worker.runtimes.serve_lm"}
        if runtime.builtin not in modules:
            raise AgentError(f"unknown builtin runtime {runtime.builtin!r} (known: {', '.join(modules)})")
        return [python, "-m", modules[runtime.builtin], *args]
    if runtime.entrypoint:
        module, sep, function = runtime.entrypoint.partition(":")
        if not sep or not module or not function.isidentifier():
            raise AgentError(f"entrypoint must be 'module:function', not {runtime.entrypoint!r}")
        return [python, "-c", f"import {module}; {module}.{function}()", *args]
    if runtime.command:
        return [*runtime.command, *args]
    raise AgentError("the workload's runtime names no builtin, entrypoint or command")


PASSED_ENV = (
    "PATH", "PYTHONPATH", "LANG", "LANGUAGE", "LC_*", "TZ", "LD_LIBRARY_PATH", "OPENBLAS_*", "OMP_*",
    "MKL_*", "NCCL_*", "CUDA_HOME", "CUDA_PATH", "NVIDIA_*",
)  # fmt: skip
"""What a job gets of the agent's own environment (``*``: any name with that prefix);
``--pass-env NAME`` adds names. Nothing else of it, and never an ``APPORTION_*``
variable (the agent's credential, ``$APPORTION_TOKEN``, among them)."""

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def passed_env(environ: Mapping[str, str], names: Sequence[str] = PASSED_ENV) -> dict[str, str]:
    """The variables of ``environ`` a job may see: those ``names`` allows (``X*`` is a
    prefix), never ``APPORTION_*``."""
    exact = {n for n in names if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in names if n.endswith("*"))
    return {
        k: v
        for k, v in environ.items()
        if not k.startswith("APPORTION_") and (k in exact or (prefixes and k.startswith(prefixes)))
    }


@dataclass(frozen=True)
class ShardDirs:
    """Where one shard runs: its working directory (also its HOME and TMPDIR's parent),
    the checkpoint directory it writes, and where a service's training checkpoint is
    fetched to (None: it names none)."""

    run: Path
    checkpoints: Path
    serve_from: Path | None = None


def shard_env(
    launch: wpb.Launch,
    local_rank: int,
    procs: int,
    devices: str,
    dirs: ShardDirs,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one process of a shard: ``base`` (default: what
    :func:`passed_env` keeps of the agent's), the torchrun and APPORTION_* contract,
    then the workload's own env."""
    env = dict(passed_env(os.environ) if base is None else base)
    env.setdefault("PATH", DEFAULT_PATH)
    paths = [*package_roots(), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["HOME"] = str(dirs.run)
    training = launch.workload.training
    env.update(
        RANK=str(launch.rank_offset + local_rank),
        WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(procs),
        GROUP_RANK=str(launch.node_rank),
        NODE_RANK=str(launch.node_rank),
        NNODES=str(launch.nnodes),
        MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
        CUDA_VISIBLE_DEVICES=devices,
        APPORTION_WORKLOAD_ID=launch.workload_id,
        APPORTION_SHARD_INDEX=str(launch.shard_index),
        APPORTION_VERSION=str(launch.version),
        APPORTION_CHECKPOINT_DIR=str(dirs.checkpoints),
        APPORTION_TOTAL_STEPS=str(int(training.remaining_work))
        if training.HasField("remaining_work")
        else "0",
    )
    if launch.workload.WhichOneof("spec") == "inference":
        env["APPORTION_REPLICA_ID"] = str(launch.shard_index)
        # a replica listens on this worker's advertised address, so the router reaches it from anywhere
        env["APPORTION_SERVE_HOST"] = launch.master_addr or "127.0.0.1"
    env.update(launch.workload.runtime.env)
    serve_from = checkpoint_sync.serve_from_workload(env.get("APPORTION_SERVE_FROM", ""))
    if serve_from is not None:  # a training workload's id: where its checkpoint is on this machine
        env["APPORTION_SERVE_FROM"] = str(dirs.serve_from or dirs.checkpoints.parent / serve_from)
    return env


def parse_line(line: str) -> tuple[str, dict[str, Any]] | None:
    """``("progress"|"ready", data)`` for an APPORTION_* line, else None (a log line)."""
    for prefix, kind in ((PROGRESS_PREFIX, "progress"), (READY_PREFIX, "ready")):
        if line.startswith(prefix):
            try:
                data = json.loads(line[len(prefix) :])
            except ValueError:
                return None
            return (kind, data) if isinstance(data, dict) else None
    return None


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot), "" if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def kill_leftovers(pid_dir: Path) -> list[int]:
    """Kill the process groups that pid files under ``pid_dir`` name (if still the same
    processes) and remove the files; the pids killed."""
    killed = []
    for path in sorted(pid_dir.glob("*.pid")) if pid_dir.is_dir() else []:
        try:
            pid_text, started = path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if started and _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
        path.unlink(missing_ok=True)
    return killed


# ----------------------------------------------------------------------------- isolation


def make_undumpable() -> bool:
    """Mark this process not dumpable (``prctl(PR_SET_DUMPABLE, 0)``): processes of the same
    user can then read neither its ``/proc/PID/environ`` nor its memory, nor trace it. Its
    children are dumpable again once they exec. False where it is not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def read_credential(token_file: Path | None, environ: MutableMapping[str, str]) -> str | None:
    """The agent's bearer token: the first line of ``token_file``, else ``$APPORTION_TOKEN``,
    which is removed from ``environ`` so nothing started later inherits it."""
    from_env = environ.pop(TOKEN_ENV, None)
    if token_file is None:
        return from_env or None
    try:
        lines = token_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentError(f"cannot read --token-file {token_file}: {exc}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise AgentError(f"--token-file {token_file} is empty; its first line is the token")
    return token


def parse_uid_range(text: str) -> tuple[int, int]:
    """``--job-uids FIRST-LAST`` (e.g. ``60000-60999``): the user ids jobs run as."""
    first_text, sep, last_text = text.partition("-")
    try:
        first, last = int(first_text), int(last_text if sep else first_text)
    except ValueError:
        raise AgentError(f"--job-uids must be FIRST-LAST (e.g. 60000-60999), not {text!r}") from None
    if not 1000 <= first <= last < 2**31 - 1:
        raise AgentError(f"--job-uids {text}: ids must be in 1000..2147483646 and FIRST ≤ LAST")
    return first, last


def processes_of(uid: int) -> list[int]:
    """The pids of the live processes (not zombies) whose real or effective user id is ``uid``."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(x.split(":", 1) for x in status.read_text().splitlines() if ":" in x)
        except OSError:
            continue
        if str(uid) in fields.get("Uid", "").split()[:2] and not fields.get("State", "").strip().startswith(
            "Z"
        ):
            pids.append(int(status.parent.name))
    return pids


def kill_user(uid: int) -> list[int]:
    """SIGKILL every process of ``uid`` (whatever left its shard's process group); the pids."""
    killed = []
    for _ in range(3):  # a fork between the scan and the kill is caught by the next scan
        pids = processes_of(uid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    return killed


class UidPool:
    """The user ids jobs run as (``--job-uids``): each running shard has one of its own,
    so two shards on a machine cannot read each other's files or processes. An id is
    handed out only after every process still running as it has been killed."""

    def __init__(self, first: int, last: int) -> None:
        self._free = set(range(first, last + 1))
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if not self._free:
                raise AgentError("every --job-uids id is in use: give the agent a larger range")
            uid = min(self._free)
            self._free.discard(uid)
        kill_user(uid)
        return uid

    def give(self, uid: int) -> None:
        kill_user(uid)
        with self._lock:
            self._free.add(uid)


def hand_over(directory: Path, uid: int) -> None:
    """Make ``directory`` and what the agent put in it ``uid``'s (mode 0700). Called only
    before the job starts, so nothing in it is the job's (no link it planted is followed)."""
    os.lchown(directory, uid, uid)
    os.chmod(directory, 0o700)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


def check_traversable(directory: Path) -> None:
    """Jobs under ``--job-uids`` reach their run directory through ``directory``: it and
    every directory above it must be searchable by others (``o+x``)."""
    for d in (directory, *directory.parents):
        if not d.stat().st_mode & stat.S_IXOTH:
            raise AgentError(
                f"--job-uids: jobs cannot reach {directory}: {d} is not searchable by others "
                f"(chmod o+x {d}, or choose another --work-dir)"
            )


def inside(base: Path, relative: str) -> Path | None:
    """``base / relative`` if that stays inside ``base`` (no absolute path, no ``..`` out)."""
    path = Path(os.path.normpath(base / relative))
    return path if not Path(relative).is_absolute() and path.is_relative_to(base) else None


# ----------------------------------------------------------------------------- shards


@dataclass
class _Shard:
    launch: wpb.Launch
    signature: tuple[Any, ...]
    devices: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pid_files: list[Path] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)  # local rank -> exit status
    first_failure: tuple[int, int] | None = None  # (local rank, exit status) of the first to fail
    stop_requested: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    step: float = 0.0
    loss: float = 0.0
    samples_per_s: float = 0.0
    requests_per_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    endpoint: str = ""
    reported_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    uploader: checkpoint_sync.Uploader | None = None  # rank 0 of a train-lm job: its checkpoints go up
    uid: int | None = None  # the user id its processes run as (--job-uids), None: the agent's

    @property
    def key(self) -> str:
        return f"{self.launch.workload_id}/{self.launch.shard_index}"


def _signature(x: wpb.Launch) -> tuple[Any, ...]:
    return (
        x.version,
        x.gpus,
        x.node_rank,
        x.nnodes,
        x.world_size,
        x.rank_offset,
        x.master_addr,
        x.master_port,
    )


@dataclass(frozen=True)
class AgentConfig:
    server: str
    token: str | None = None
    node_id: str = ""
    zone: str = ""
    domain: str = ""
    gpus: str = "auto"
    gpu_type: str | None = None
    gpu_memory_gib: float | None = None
    advertise: str = ""
    work_dir: Path = Path("apportion-worker")
    heartbeat_s: float | None = None  # None: what the server says
    stop_grace_s: float = 30.0  # at most this per Stop, whatever the server asks
    upload_finish_s: float = 60.0  # at most this for a shard's last checkpoint upload
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    job_uids: tuple[int, int] | None = None  # jobs run as these user ids, one per shard (agent as root)
    allow_root_jobs: bool = False  # as root with a credential and no job_uids: run jobs as root anyway
    pass_env: tuple[str, ...] = ()  # more of the agent's environment variables a job may see


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.gpus = detect_gpus(config.gpus, config.gpu_type, config.gpu_memory_gib)
        self.node_id = config.node_id or socket.gethostname()
        self.advertise = config.advertise or "127.0.0.1"
        self.work_dir = config.work_dir.resolve()
        self.uids = self._job_users(config)
        self.passed_env = passed_env(os.environ, (*PASSED_ENV, *config.pass_env))
        self.pid_dir = self.work_dir / "pids" / self.node_id
        self.lease_file = self.work_dir / "leases" / self.node_id
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._lease_s = 0.0
        self.client = Client(
            config.server, token=config.token, ca=config.tls_ca, cert=config.tls_cert, key=config.tls_key
        )
        self.stub = workers_pb2_grpc.WorkersStub(self.client.channel)
        self.metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        self._lock = threading.RLock()
        self._shards: dict[str, _Shard] = {}
        self._launching: dict[str, threading.Lock] = {}  # one launch or restart of a shard at a time
        self._free = set(range(self.gpus.count))
        self._freed = threading.Condition(self._lock)  # notified when a shard gives its GPUs back
        self._outbox: queue.Queue[wpb.WorkerMessage | None] = queue.Queue()
        self._stopping = threading.Event()
        self._session = ""
        self._interval = 2.0
        self._call: Any = None

    @staticmethod
    def _job_users(config: AgentConfig) -> UidPool | None:
        """The pool of job user ids, or None (jobs run as the agent's user); refuses to run
        tenants' jobs as root beside the agent's credential unless told to."""
        root = os.geteuid() == 0
        if config.job_uids is not None:
            if not root:
                raise AgentError("--job-uids needs the agent to run as root (it starts jobs as those ids)")
            return UidPool(*config.job_uids)
        if root and config.token and not config.allow_root_jobs:
            raise AgentError(
                "the agent runs as root with a credential: jobs would run as root and could read it. "
                "Give --job-uids FIRST-LAST (unused user ids, one per running shard), or "
                "--allow-root-jobs to run them as root anyway"
            )
        return None

    # -- the node --------------------------------------------------------------

    def node(self) -> pb.Node:
        total, _ = memory_gib()
        return pb.Node(
            id=self.node_id,
            gpu_type=self.gpus.gpu_type,
            gpus=self.gpus.count,
            cpus=float(os.cpu_count() or 1),
            memory_gib=round(total, 1),
            zone=self.config.zone,
            domain=self.config.domain,
        )

    def ensure_gpu_type(self) -> None:
        try:
            _, types, _ = self.client.nodes()
        except ApportionError as exc:
            if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                raise
            return  # a node token: the admin defines GPU types; Register says if this one is missing
        if any(t.name == self.gpus.gpu_type for t in types):
            return
        if self.gpus.memory_gib is None:
            raise AgentError(
                f"the server has no GPU type {self.gpus.gpu_type!r}: pass --gpu-memory-gib G to add it"
            )
        self.client.upsert_nodes(
            gpu_types=[pb.GpuType(name=self.gpus.gpu_type, memory_gib=self.gpus.memory_gib)]
        )

    def register(self) -> None:
        """Register (again), retrying while the server is unavailable."""
        delay = 0.2
        while not self._stopping.is_set():
            try:
                self.ensure_gpu_type()
                with self._lock:
                    running = [k for k, s in self._shards.items() if not s.done.is_set()]
                reply = self.stub.Register(
                    wpb.RegisterRequest(node=self.node(), advertise_address=self.advertise, running=running),
                    metadata=self.metadata,
                    timeout=30,
                )
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                self._say_retrying(details or "", delay)
            except ApportionError as exc:
                if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                # (the GPU type check goes through the client: it was silent here, and a
                # worker started before its server said nothing for 25 s)
                self._say_retrying(exc.message, delay)
            else:
                self._session = reply.session_id
                self._interval = self.config.heartbeat_s or reply.heartbeat_interval_s or 2.0
                self._lease_s = reply.lease_s
                self.renew_lease(reply.lease_s)
                log.info("registered", extra={"node": self.node_id, "session": reply.session_id})
                return
            self._stopping.wait(delay)
            delay = min(5.0, delay * 2)

    def _say_retrying(self, error: str, delay: float) -> None:
        log.info(
            "server unavailable; retrying",
            extra={"server": self.config.server, "error": error[:300], "retry_in_s": round(delay, 2)},
        )

    # -- the stream --------------------------------------------------------------

    def send(self, msg: wpb.WorkerMessage, *, droppable: bool = False) -> None:
        if droppable and self._outbox.qsize() >= OUTBOX_LIMIT:
            return
        self._outbox.put(msg)

    def _outgoing(self, first: wpb.WorkerMessage, generation: list[bool]) -> Iterator[wpb.WorkerMessage]:
        yield first
        while generation[0] and not self._stopping.is_set():
            try:
                msg = self._outbox.get(timeout=0.25)
            except queue.Empty:
                continue
            if msg is None:
                return
            msg.session_id = self._session
            yield msg

    def _heartbeats(self) -> None:
        while not self._stopping.wait(self._interval):
            self.send(wpb.WorkerMessage(heartbeat=self.heartbeat()))
            self._check_watchdog()

    def heartbeat(self) -> wpb.Heartbeat:
        cpus = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0] / cpus
        except OSError:
            load = 0.0
        _, used = memory_gib()
        beat = wpb.Heartbeat(cpu_utilization=min(1.0, load), memory_used_gib=used)
        if self.gpus.simulated:
            with self._lock:
                busy = {d for s in self._shards.values() if not s.done.is_set() for d in s.devices}
            beat.gpus.extend(
                wpb.GpuUsage(index=i, utilization=1.0 if i in busy else 0.0) for i in range(self.gpus.count)
            )
        else:
            beat.gpus.extend(gpu_usage())
        return beat

    def run(self) -> int:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.uids is not None:
            check_traversable(self.work_dir)
        killed = kill_leftovers(self.pid_dir)
        if killed:
            log.warning("killed processes left by a previous agent", extra={"pids": killed})
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.lease_file.parent.mkdir(parents=True, exist_ok=True)
        self.lease_file.unlink(missing_ok=True)  # a previous agent's lease is not ours
        self._start_watchdog()
        self.register()
        threading.Thread(target=self._heartbeats, name="heartbeats", daemon=True).start()
        delay = 0.2
        while not self._stopping.is_set():
            generation = [True]
            first = wpb.WorkerMessage(session_id=self._session, heartbeat=self.heartbeat())
            try:
                self._call = self.stub.Connect(self._outgoing(first, generation), metadata=self.metadata)
                for command in self._call:
                    delay = 0.2
                    self.handle(command)
                if self._stopping.is_set():
                    break
                log.info("stream ended; reconnecting")
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    break
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    log.info("the server does not know this session; registering again")
                    self.register()
                    for shard in self._live_shards():
                        self.report(shard, "RUNNING")
                    continue
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise
                log.info("stream broken; reconnecting", extra={"code": code.name if code else ""})
            finally:
                generation[0] = False
            self._stopping.wait(delay)
            delay = min(5.0, delay * 2)
        self.shutdown()
        return 0

    def stop(self) -> None:
        """Leave: stop the processes, close the stream (from a signal handler or another thread)."""
        self._stopping.set()
        call = self._call
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()

    def shutdown(self) -> None:
        shards = self._live_shards()
        for shard in shards:
            self._terminate(shard, self.config.stop_grace_s)
        for shard in shards:
            shard.done.wait(self.config.stop_grace_s + 5)
        if self._watchdog is not None and self._watchdog.poll() is None:
            self._watchdog.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(5)
        self.client.close()

    def _live_shards(self) -> list[_Shard]:
        with self._lock:
            return [s for s in self._shards.values() if not s.done.is_set()]

    # -- commands ----------------------------------------------------------------

    def renew_lease(self, valid_s: float) -> None:
        """The server heard from this worker: its shards may run ``valid_s`` more seconds
        (0: the server grants no lease, nothing is fenced on time)."""
        if valid_s > 0:
            watchdog.write_deadline(self.lease_file, time.monotonic() + valid_s)

    def _start_watchdog(self) -> None:
        """The fencing watchdog (``worker.watchdog``), in a session of its own."""
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "PYTHONPATH": os.pathsep.join(package_roots())}
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.watchdog",
                str(self.lease_file),
                str(self.pid_dir),
                str(os.getpid()),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _check_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.poll() is not None and not self._stopping.is_set():
            log.warning(
                "the fencing watchdog exited; starting it again", extra={"code": self._watchdog.returncode}
            )
            self._start_watchdog()

    def handle(self, command: wpb.ServerMessage) -> None:
        body = command.WhichOneof("body")
        if body == "lease":
            self.renew_lease(command.lease.valid_s)
        elif body == "launch":
            launch = command.launch
            threading.Thread(target=self.launch, args=(launch,), daemon=True).start()
        elif body == "stop":
            key = f"{command.stop.workload_id}/{command.stop.shard_index}"
            with self._lock:
                shard = self._shards.get(key)
            if shard is not None and not shard.done.is_set():
                grace = min(command.stop.grace_s or self.config.stop_grace_s, self.config.stop_grace_s)
                threading.Thread(target=self._terminate, args=(shard, grace), daemon=True).start()

    def launch(self, launch: wpb.Launch) -> None:
        key = f"{launch.workload_id}/{launch.shard_index}"
        with self._lock:
            serial = self._launching.setdefault(key, threading.Lock())
        with serial:
            self._launch(key, launch)

    def _launch(self, key: str, launch: wpb.Launch) -> None:
        signature = _signature(launch)
        with self._lock:
            old = self._shards.get(key)
        if old is not None and not old.done.is_set():
            if old.signature == signature:
                self.report(old, "RUNNING")
                return
            self._terminate(old, self.config.stop_grace_s)
            old.done.wait()
        procs = max(1, launch.gpus)
        with self._lock:
            # The plan may give a shard GPUs that a shard it stopped still holds while that one stops
            # (a service cancelled and another placed at once): wait for them, as long as a stop may take.
            self._freed.wait_for(lambda: len(self._free) >= launch.gpus, self.config.stop_grace_s + 5.0)
            if len(self._free) < launch.gpus:
                shard = _Shard(launch, signature, [])
                shard.done.set()
                self.report(shard, "FAILED", exit_code=-1, message=f"needs {launch.gpus} free GPUs; "
                            f"{len(self._free)} of {self.gpus.count} are free on {self.node_id}")  # fmt: skip
                return
            devices = sorted(self._free)[: launch.gpus]
            self._free -= set(devices)
            shard = _Shard(launch, signature, devices)
            self._shards[key] = shard
        try:
            argv = runtime_argv(launch.workload.runtime)
            if self.uids is not None:
                shard.uid = self.uids.take()
            dirs = self._prepare_dirs(launch, shard.uid)
        except (AgentError, OSError) as exc:
            self._release(shard)
            shard.done.set()
            self.report(shard, "FAILED", exit_code=-1, message=str(exc))
            return
        log_dir = self.work_dir / "logs" / launch.workload_id
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = (log_dir / f"shard-{launch.shard_index}.log").open("a", encoding="utf-8")
        self.report(shard, "STARTING")
        shard.uploader = self._sync_checkpoints(launch, dirs)
        if shard.uid is not None:
            hand_over(dirs.run, shard.uid)
        try:
            with shard.lock:
                for local in range(procs):
                    if shard.stop_requested:  # a Stop came while the checkpoint was fetched: start nothing
                        break
                    devices_text = "" if self.gpus.simulated or not devices else str(devices[local])
                    env = shard_env(launch, local, procs, devices_text, dirs, base=self.passed_env)
                    proc = subprocess.Popen(
                        argv,
                        cwd=dirs.run,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        **self._as_job_user(shard.uid),
                    )
                    pid_file = self.pid_dir / f"{launch.workload_id}.{launch.shard_index}.{local}.pid"
                    pid_file.write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
                    shard.procs.append(proc)
                    shard.pid_files.append(pid_file)
        except OSError as exc:
            shard.tail.append(f"cannot start {argv[0]}: {exc}")
            self._terminate(shard, 0)
            with shard.lock:
                codes = {i: 127 for i in range(len(shard.procs), procs)}
                shard.codes.update(codes)
        log.info("launched", extra={"shard": key, "pids": [p.pid for p in shard.procs]})
        if shard.procs:
            self.report(shard, "RUNNING")
        readers = [
            threading.Thread(target=self._read, args=(shard, local, proc, log_file), daemon=True)
            for local, proc in enumerate(shard.procs)
        ]
        for t in readers:
            t.start()
        threading.Thread(target=self._watch, args=(shard, readers, procs, log_file), daemon=True).start()

    @staticmethod
    def _as_job_user(uid: int | None) -> dict[str, Any]:
        """Popen's arguments that start a process as ``uid`` (its own group, no other)."""
        if uid is None:
            return {}
        return {"user": uid, "group": uid, "extra_groups": [], "umask": 0o077}

    def _prepare_dirs(self, launch: wpb.Launch, uid: int | None) -> ShardDirs:
        """The shard's directories, created. Jobs as the agent's user share
        ``<work-dir>/checkpoints/<id>`` with the other shards of the machine; a job under
        ``--job-uids`` gets a fresh run directory of its own (the previous launch's is
        deleted) holding its checkpoint directory and what it serves from, and its
        ``APPORTION_CHECKPOINT_DIR`` may only be a relative path inside it."""
        if not SAFE_NAME.fullmatch(launch.workload_id):  # the server checks; paths are built only after
            raise AgentError(f"workload id {launch.workload_id[:40]!r} is not a safe name: not run")
        run = self.work_dir / "runs" / f"{launch.workload_id}.{launch.shard_index}"
        runtime = launch.workload.runtime
        named = checkpoint_sync.serve_from_workload(runtime.env.get("APPORTION_SERVE_FROM", ""))
        own = runtime.env.get("APPORTION_CHECKPOINT_DIR", "")
        if uid is None:
            shared = self.work_dir / "checkpoints"
            checkpoints = (run / own) if own else shared / launch.workload_id
            dirs = ShardDirs(run, checkpoints, None if named is None else shared / named)
        else:
            checkpoints_in = inside(run, own) if own else run / "checkpoint"
            if checkpoints_in is None:
                raise AgentError(f"APPORTION_CHECKPOINT_DIR must be a relative path inside the job's "
                                 f"directory, not {own!r}")  # fmt: skip
            shutil.rmtree(run, ignore_errors=True)
            dirs = ShardDirs(run, checkpoints_in, None if named is None else run / "serve-from")
        for d in (dirs.run, dirs.checkpoints, *([dirs.serve_from] if dirs.serve_from else [])):
            d.mkdir(parents=True, exist_ok=True)
        return dirs

    def _sync_checkpoints(self, launch: wpb.Launch, dirs: ShardDirs) -> checkpoint_sync.Uploader | None:
        """Before a launch: download the server's checkpoint of a train-lm job (or of the
        training workload a serve-lm loads) when it is newer than the local one; for the
        shard with global rank 0 of a train-lm job, the uploader of its new checkpoints."""
        runtime = launch.workload.runtime
        if runtime.builtin == "train-lm":
            source, directory = launch.workload_id, dirs.checkpoints
        elif runtime.builtin == "serve-lm" and dirs.serve_from is not None:
            named = checkpoint_sync.serve_from_workload(runtime.env.get("APPORTION_SERVE_FROM", ""))
            assert named is not None  # dirs.serve_from is set only then
            source, directory = named, dirs.serve_from
        else:
            return None
        server_step = -1
        try:
            server_step, _ = checkpoint_sync.fetch(self.stub, self.metadata, source, directory)
        except Exception as exc:  # the shard starts with what is here, whatever went wrong
            detail = exc.details() if isinstance(exc, grpc.Call) else f"{type(exc).__name__}: {exc}"
            log.warning(
                f"cannot fetch the server's checkpoint of {source}: {detail}",
                extra={"workload": source, "error": detail},
            )
        if runtime.builtin != "train-lm" or launch.rank_offset != 0:
            return None
        uploader = checkpoint_sync.Uploader(
            self.stub, self.metadata, launch.workload_id, directory, server_step=server_step
        )
        return uploader.start()

    def _read(self, shard: _Shard, local: int, proc: subprocess.Popen[bytes], log_file: IO[str]) -> None:
        launch = shard.launch
        stream = proc.stdout
        assert stream is not None
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            parsed = parse_line(line)
            if parsed is None:
                shard.tail.append(line)
                with contextlib.suppress(ValueError):
                    log_file.write(f"[rank {launch.rank_offset + local}] {line}\n")
                    log_file.flush()
                self.send(
                    wpb.WorkerMessage(
                        log=wpb.LogChunk(
                            workload_id=launch.workload_id,
                            shard_index=launch.shard_index,
                            rank=launch.rank_offset + local,
                            text=line,
                        )
                    ),
                    droppable=True,
                )
                continue
            if local != 0:
                continue
            kind, data = parsed
            if kind == "ready":
                shard.endpoint = str(data.get("endpoint", ""))
                self.report(shard, "RUNNING")
                continue
            with contextlib.suppress(TypeError, ValueError):
                shard.step = float(data.get("step", shard.step))
                shard.loss = float(data.get("loss", shard.loss))
                shard.samples_per_s = float(data.get("samples_per_s", shard.samples_per_s))
                shard.requests_per_s = float(data.get("requests_per_s", shard.requests_per_s))
                shard.latency_p50_s = float(data.get("latency_p50_s", shard.latency_p50_s))
                shard.latency_p99_s = float(data.get("latency_p99_s", shard.latency_p99_s))
            now = time.monotonic()
            if now - shard.reported_at >= PROGRESS_EVERY_S:
                self.report(shard, "RUNNING")
        stream.close()
        code = proc.wait()
        with shard.lock:
            shard.codes[local] = code
            failed = code != 0 and not shard.stop_requested
            if failed and shard.first_failure is None:
                shard.first_failure = (local, code)
        if failed:  # the rest of the shard cannot go on without this rank
            self._terminate(shard, min(5.0, self.config.stop_grace_s), requested=False)

    def _watch(self, shard: _Shard, readers: list[threading.Thread], procs: int, log_file: IO[str]) -> None:
        for t in readers:
            t.join()
        for proc in shard.procs:
            proc.wait()
        log_file.close()
        for path in shard.pid_files:
            path.unlink(missing_ok=True)
        if shard.uid is not None and self.uids is not None:
            self.uids.give(shard.uid)  # also kills what the job left outside its process group
        self._release(shard)
        if shard.uploader is not None:  # its last checkpoint is on the server before its end is reported
            shard.uploader.finish(self.config.upload_finish_s)
        codes = [shard.codes.get(i, -1) for i in range(procs)]
        failed = [(i, c) for i, c in enumerate(codes) if c != 0]
        if shard.stop_requested:
            state, code = "STOPPED", failed[0][1] if failed else 0
        elif not failed:
            state, code = "SUCCEEDED", 0
        else:
            state, code = "FAILED", (shard.first_failure or failed[0])[1]
        message = "\n".join(shard.tail) if state == "FAILED" else ""
        log.info("shard ended", extra={"shard": shard.key, "state": state, "exit": code})
        self.report(shard, state, exit_code=code, message=message)  # before a relaunch's STARTING
        shard.done.set()

    def _release(self, shard: _Shard) -> None:
        with self._lock:
            self._free |= set(shard.devices)
            shard.devices = []
            self._freed.notify_all()

    def _terminate(self, shard: _Shard, grace: float, *, requested: bool = True) -> None:
        """SIGTERM to the shard's process groups, SIGKILL to those left after ``grace``."""
        with shard.lock:
            if requested:
                shard.stop_requested = True
            procs = list(shard.procs)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: also what the process left behind

    def report(self, shard: _Shard, state: str, *, exit_code: int = 0, message: str = "") -> None:
        shard.reported_at = time.monotonic()
        self.send(
            wpb.WorkerMessage(
                status=wpb.ShardStatus(
                    workload_id=shard.launch.workload_id,
                    version=shard.launch.version,
                    shard_index=shard.launch.shard_index,
                    state=state,
                    exit_code=exit_code,
                    step=shard.step,
                    loss=shard.loss,
                    samples_per_s=shard.samples_per_s,
                    requests_per_s=shard.requests_per_s,
                    latency_p50_s=shard.latency_p50_s,
                    latency_p99_s=shard.latency_p99_s,
                    message=message,
                    endpoint=shard.endpoint,
                )
            )
        )


# ----------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``apportion worker`` (server.cli adds the subcommand)."""
    parser.add_argument("--server", metavar="ADDR", help="the server (default: $APPORTION_SERVER)")
    parser.add_argument("--token", help=argparse.SUPPRESS)  # refused: a command line is public
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file whose first line is this node's bearer token (default: $APPORTION_TOKEN); chmod 600",
    )
    parser.add_argument(
        "--job-uids",
        metavar="FIRST-LAST",
        help="run each job as its own user id from this range (agent as root; ids no one else uses)",
    )
    parser.add_argument(
        "--allow-root-jobs",
        action="store_true",
        help="as root with a credential and no --job-uids: run jobs as root anyway (they can read it)",
    )
    parser.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help="also give jobs this variable of the agent's environment (NAME* for a prefix; repeatable)",
    )
    parser.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA to trust")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key (mutual TLS)")
    parser.add_argument("--node-id", default="", metavar="ID", help="node id (default: the host name)")
    parser.add_argument("--zone", default="", metavar="Z", help="failure zone")
    parser.add_argument("--domain", default="", metavar="D", help="fast-interconnect group (rack)")
    parser.add_argument(
        "--gpus", default="auto", metavar="auto|N", help="auto: detect (nvidia-smi); N: simulate N GPUs"
    )
    parser.add_argument("--gpu-type", metavar="T", help="GPU type name (required with --gpus N)")
    parser.add_argument(
        "--gpu-memory-gib", type=float, metavar="G", help="memory of one GPU (to add an unknown GPU type)"
    )
    parser.add_argument(
        "--advertise",
        default="",
        metavar="HOST",
        help="address other workers reach this one at (MASTER_ADDR)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("apportion-worker"),
        metavar="DIR",
        help="logs, pid files, checkpoints",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        metavar="S",
        help="seconds between heartbeats (default: what the server says)",
    )
    parser.add_argument(
        "--stop-grace", type=float, default=30.0, metavar="S", help="most seconds a process gets to stop"
    )
    parser.add_argument("--log-level", default="INFO", help="log level")


def run_command(args: argparse.Namespace) -> int:
    """``apportion worker``: run the agent until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.token is not None:
        sys.stderr.write(
            "apportion worker: --token is refused: a command line is readable by every process on "
            "the machine, a tenant's job among them. Use --token-file FILE or $APPORTION_TOKEN\n"
        )
        return 2
    if not make_undumpable():
        log.warning("cannot mark the agent undumpable: same-user processes may read its memory")
    try:
        token = read_credential(args.token_file, os.environ)
        job_uids = None if args.job_uids is None else parse_uid_range(args.job_uids)
    except AgentError as exc:
        sys.stderr.write(f"apportion worker: {exc}\n")
        return 2
    if args.token_file is not None and (loose := _loose(args.token_file)) is not None:
        log.warning(f"--token-file: {loose}")
    config = AgentConfig(
        server=args.server or os.environ.get("APPORTION_SERVER", "127.0.0.1:50051"),
        token=token,
        node_id=args.node_id,
        zone=args.zone,
        domain=args.domain,
        gpus=args.gpus,
        gpu_type=args.gpu_type,
        gpu_memory_gib=args.gpu_memory_gib,
        advertise=args.advertise,
        work_dir=args.work_dir,
        heartbeat_s=args.heartbeat,
        stop_grace_s=args.stop_grace,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        job_uids=job_uids,
        allow_root_jobs=args.allow_root_jobs,
        pass_env=tuple(args.pass_env),
    )
    try:
        agent = Agent(config)
    except AgentError as exc:
        sys.stderr.write(f"apportion worker: {exc}\n")
        return 2

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal received; stopping", extra={"signal": signal.Signals(signum).name})
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return agent.run()
    except AgentError as exc:
        sys.stderr.write(f"apportion worker: {exc}\n")
        agent.shutdown()
        return 2
    except grpc.RpcError as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        sys.stderr.write(f"apportion worker: the server refused: {detail}\n")
        agent.shutdown()
        return 1
    except ApportionError as exc:
        sys.stderr.write(f"apportion worker: the server refused: {exc}\n")
        agent.shutdown()
        return 1


def _loose(path: Path) -> str | None:
    """Why a credential file is readable by others than its owner, or None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return (
        f"{path} is readable by others than its owner (mode {mode & 0o777:04o}); chmod 600 it"
        if (mode & 0o077)
        else None
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apportion worker", description="Run the Apportion node agent.")
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
