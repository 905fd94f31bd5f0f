"""The agent's fencing watchdog: ``python -m worker.watchdog LEASE_FILE PID_DIR AGENT_PID``.

The server answers each heartbeat with a lease (``Lease.valid_s``, half its heartbeat
timeout); the agent writes the lease's end to ``LEASE_FILE`` (a ``time.monotonic()``
deadline, the same clock in every process of the machine). This process, started by
the agent in a session of its own, SIGKILLs the process groups that ``PID_DIR``'s pid
files name (the shards of that node; ``worker.agent.kill_leftovers``):

- when the lease has run out: the agent has not heard from the server, or is frozen
  (SIGSTOP, a stalled VM) and cannot act itself. The server marks the node down only
  after its full heartbeat timeout, so the shards are gone before it places them
  elsewhere: a job never runs twice;
- when the agent is gone (it died without stopping them): nothing outlives it.

It checks every :data:`POLL_S` and exits once the agent is gone. Without a lease file
(a server that grants none) it never fences on time.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

POLL_S = 0.1


def read_deadline(path: Path) -> float | None:
    """The lease's end (monotonic seconds), None when there is no (readable) lease."""
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def write_deadline(path: Path, deadline: float) -> None:
    """Record the lease's end atomically (the watchdog never reads half a number)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{deadline:.6f}\n")
    os.replace(tmp, path)


def alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` still exists and is the one that started at ``started``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and (not started or fields[19] == started)


def watch(lease: Path, pid_dir: Path, agent_pid: int, agent_started: str) -> int:
    """Fence until the agent is gone; the number of shard processes killed."""
    from worker.agent import kill_leftovers

    killed = 0
    while True:
        if not alive(agent_pid, agent_started):
            killed += len(kill_leftovers(pid_dir))
            return killed
        deadline = read_deadline(lease)
        if deadline is not None and time.monotonic() > deadline:
            fenced = kill_leftovers(pid_dir)
            if fenced:
                killed += len(fenced)
                sys.stderr.write(f"apportion watchdog: lease expired; killed shard processes {fenced}\n")
                sys.stderr.flush()
        time.sleep(POLL_S)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        sys.stderr.write("usage: python -m worker.watchdog LEASE_FILE PID_DIR AGENT_PID\n")
        return 2
    from worker.agent import _start_time

    lease, pid_dir, agent_pid = Path(args[0]), Path(args[1]), int(args[2])
    watch(lease, pid_dir, agent_pid, _start_time(agent_pid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
