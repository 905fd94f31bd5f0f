"""Built-in training runtime ``train-lm``: ``python -m worker.runtimes.train_lm``.

Trains the small byte-level transformer of ``worker.runtimes.model`` on the
generated text of ``worker.runtimes.data`` with DistributedDataParallel over
the ranks it is started as, checkpointing and resuming, until a total number
of steps. Configured only by its environment:

torchrun's variables (set by the worker agent, one process per local rank):

- ``RANK``, ``WORLD_SIZE`` (default 0 and 1: a single process), ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (the rank-0 worker's
  address; read by torch.distributed when ``WORLD_SIZE`` > 1),
  ``CUDA_VISIBLE_DEVICES`` (may be empty or absent on CPU).

Apportion's:

- ``APPORTION_WORKLOAD_ID``: recorded in checkpoints and logs.
- ``APPORTION_CHECKPOINT_DIR``: the checkpoint directory, shared by the ranks
  of a node (and by nodes that share a file system; if they do not, the agent
  copies checkpoints through the server, ``worker.checkpoint_sync``); created if
  missing (default ``./apportion-checkpoints/ID``). Layout in
  ``worker.runtimes.checkpoint``.
- ``APPORTION_TOTAL_STEPS`` (required): the step to reach in total; a job that
  resumes at step N trains TOTAL_STEPS - N more.
- ``APPORTION_CHECKPOINT_EVERY`` (default 50): steps between checkpoints.
- ``APPORTION_RUNTIME_ARGS`` (optional): a JSON list of options, read before
  the command line's own (the agent passes a workload's ``runtime.args`` as
  arguments): ``--d-model``, ``--layers``, ``--heads``, ``--seq-len``,
  ``--batch-size`` (per rank), ``--lr``, ``--seed``. A resumed job keeps the
  model shape of its checkpoint.
- ``APPORTION_DEVICE``: ``cpu`` or ``cuda`` (default cuda when torch sees a GPU):
  gloo on CPU, NCCL on CUDA.
- ``APPORTION_PROGRESS_INTERVAL_S`` (default 2): the most seconds between progress lines.
- ``APPORTION_DIST_TIMEOUT_S`` (default 300): how long collectives (and meeting
  the other ranks) may wait before the process fails.

Behaviour:

- Every rank draws its own batches (``data.batch`` of (step, rank)): the data
  is sharded across ranks, and a resumed job sees the batches it would have.
- On start, every rank resumes from the directory's latest checkpoint if there
  is one (model, optimizer, step, RNG state). The ranks of a gang resume from
  rank 0's: when their directories (one per node, without a shared file
  system) hold different steps, rank 0 sends its checkpoint (or the news that
  it has none) to the others, which log ``took rank 0's checkpoint``.
- Rank 0 writes ``ckpt-STEP.pt`` every CHECKPOINT_EVERY steps and at the end,
  atomically, and prints to stdout, flushed::

      APPORTION_PROGRESS {"step": 120, "total_steps": 400, "loss": 2.31, "samples_per_s": 512.0,
                          "world_size": 2, "state": "running", "checkpoint": "ckpt-100.pt"}

  at least every PROGRESS_INTERVAL_S, at every checkpoint (``checkpoint`` is
  present on those lines only) and at the end. ``loss`` is the mean over all
  ranks and the steps since the previous line; ``samples_per_s`` counts the
  samples of all ranks. ``state`` is ``running``, then ``done`` (step reached
  total_steps) or ``stopped`` (SIGTERM) on the last line.
- Normal completion: final checkpoint, final progress line, exit 0. Every rank
  logs ``train_lm: rank R done at step N, param_sha256 HEX`` on stderr (the
  digests of all ranks are equal).
- SIGTERM (or SIGINT) on any rank: the ranks agree to stop after the current
  step (a flag in the per-step all-reduce), rank 0 checkpoints that step, and
  every rank exits 0.
- Errors: a message on stderr and a non-zero exit (2 for a bad environment).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from worker.runtimes import checkpoint, data
from worker.runtimes.common import (
    PROGRESS_PREFIX,
    ConfigError,
    cpu_threads,
    emit,
    env_args,
    env_device,
    env_float,
    env_int,
    log,
)
from worker.runtimes.model import ModelConfig, TinyLM

RUNTIME = "train_lm"
WARMUP_STEPS = 10
GRAD_CLIP = 1.0


@dataclass
class TrainConfig:
    rank: int
    world_size: int
    workload_id: str
    checkpoint_dir: Path
    total_steps: int
    checkpoint_every: int
    device: torch.device
    progress_interval_s: float
    dist_timeout_s: float
    model: ModelConfig = field(default_factory=ModelConfig)
    seq_len: int = 64
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str], argv: Sequence[str] = ()) -> TrainConfig:
        rank = env_int(env, "RANK", 0, minimum=0)
        world = env_int(env, "WORLD_SIZE", 1, minimum=1)
        if rank >= world:
            raise ConfigError(f"RANK {rank} is not below WORLD_SIZE {world}")
        if world > 1:
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if not env.get(name):
                    raise ConfigError(f"{name} must be set when WORLD_SIZE > 1")
        workload = env.get("APPORTION_WORKLOAD_ID", "") or "train-lm"
        ckpt_dir = env.get("APPORTION_CHECKPOINT_DIR", "") or os.path.join("apportion-checkpoints", workload)
        parser = argparse.ArgumentParser(prog="train_lm", exit_on_error=False, add_help=False)
        parser.add_argument("--d-model", type=int, default=64)
        parser.add_argument("--layers", type=int, default=2)
        parser.add_argument("--heads", type=int, default=4)
        parser.add_argument("--seq-len", type=int, default=64)
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--lr", type=float, default=3e-3)
        parser.add_argument("--seed", type=int, default=0)
        try:
            args, unknown = parser.parse_known_args([*env_args(env), *argv])
        except argparse.ArgumentError as exc:
            raise ConfigError(f"runtime args: {exc}") from None
        if unknown:
            raise ConfigError(f"runtime args: unknown options {unknown}")
        if min(args.d_model, args.layers, args.heads, args.seq_len, args.batch_size) < 1 or args.lr <= 0:
            raise ConfigError("runtime args: sizes and --lr must be positive")
        if args.d_model % args.heads:
            raise ConfigError("runtime args: --d-model must be a multiple of --heads")
        return cls(
            rank=rank,
            world_size=world,
            workload_id=workload,
            checkpoint_dir=Path(ckpt_dir),
            total_steps=env_int(env, "APPORTION_TOTAL_STEPS", minimum=0),
            checkpoint_every=env_int(env, "APPORTION_CHECKPOINT_EVERY", 50, minimum=1),
            device=env_device(env),
            progress_interval_s=env_float(env, "APPORTION_PROGRESS_INTERVAL_S", 2.0),
            dist_timeout_s=env_float(env, "APPORTION_DIST_TIMEOUT_S", 300.0, minimum=1.0),
            model=ModelConfig(
                d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, max_seq=max(128, args.seq_len)
            ),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )


class StopFlag:
    """Set by SIGTERM/SIGINT; read between steps."""

    def __init__(self) -> None:
        self.set = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.set = True


class Progress:
    """Rank 0's progress lines: loss and samples/s since the previous line."""

    def __init__(self, cfg: TrainConfig, last_loss: float | None) -> None:
        self.cfg = cfg
        self.samples_per_step = cfg.batch_size * cfg.world_size
        self.last_loss = last_loss  # a line right after another repeats the latest loss
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since = now
        self.steps = 0
        self.loss_sum = 0.0

    def step(self, loss: float) -> None:
        self.steps += 1
        self.loss_sum += loss
        self.last_loss = loss

    def _loss(self) -> float | None:
        """The mean loss since the previous line; just after one, the latest loss."""
        loss = self.loss_sum / self.steps if self.steps else self.last_loss
        return None if loss is None else round(loss, 5)

    def due(self) -> bool:
        return time.monotonic() - self.since >= self.cfg.progress_interval_s

    def report(self, step: int, state: str = "running", ckpt: str | None = None) -> None:
        now = time.monotonic()
        elapsed = now - self.since
        payload: dict[str, Any] = {
            "step": step,
            "total_steps": self.cfg.total_steps,
            "loss": self._loss(),
            "samples_per_s": round(self.steps * self.samples_per_step / elapsed, 2) if self.steps else 0.0,
            "world_size": self.cfg.world_size,
            "state": state,
        }
        if ckpt is not None:
            payload["checkpoint"] = ckpt
        emit(PROGRESS_PREFIX, payload)
        self._reset(now)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rank0_checkpoint(cfg: TrainConfig, state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from: rank 0's. Ranks compare steps (-1: none);
    only when they differ does rank 0 send its state to the others."""
    device = cfg.device if cfg.device.type == "cuda" else torch.device("cpu")
    mine = torch.tensor([int(state["step"]) if state is not None else -1], dtype=torch.int64, device=device)
    steps = [torch.zeros_like(mine) for _ in range(cfg.world_size)]
    dist.all_gather(steps, mine)
    values = [int(t.item()) for t in steps]
    if len(set(values)) == 1:
        return state
    box: list[Any] = [state if cfg.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device)
    if cfg.rank != 0:
        log(
            RUNTIME,
            f"rank {cfg.rank}: took rank 0's checkpoint (step {values[0]}; this node had {values[cfg.rank]})",
        )
    received: dict[str, Any] | None = box[0]
    return received


def train(cfg: TrainConfig, stop: StopFlag) -> str:
    """Train to cfg.total_steps (or until stopped); returns the final state, ``done`` or ``stopped``."""
    distributed = cfg.world_size > 1
    if distributed:
        backend = "nccl" if cfg.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=cfg.rank,
            world_size=cfg.world_size,
            timeout=datetime.timedelta(seconds=cfg.dist_timeout_s),
            device_id=cfg.device if cfg.device.type == "cuda" else None,
        )
    lead = cfg.rank == 0
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model
    start = 0
    last_loss: float | None = None
    state: dict[str, Any] | None = None
    latest = checkpoint.latest_path(cfg.checkpoint_dir)
    if latest is not None:
        state = checkpoint.load(latest)
    if distributed:
        state = _rank0_checkpoint(cfg, state)
    if state is not None:
        start = int(state["step"])
        loss = state.get("loss")
        last_loss = float(loss) if isinstance(loss, float) and math.isfinite(loss) else None
        model_cfg = ModelConfig.from_dict(state["model_config"])
        if lead:
            log(RUNTIME, f"resumed from {latest} at step {start}")
    model = TinyLM(model_cfg).to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if cfg.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], cfg.device)
    del state
    net: torch.nn.Module = model
    if distributed:
        device_ids = [cfg.device.index] if cfg.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    corpus = data.corpus_tensor()
    if lead:
        log(
            RUNTIME,
            f"{cfg.workload_id}: steps {start} to {cfg.total_steps} on {cfg.world_size} rank(s), "
            f"device {cfg.device}, {sum(p.numel() for p in model.parameters()):,} parameters",
        )
    progress = Progress(cfg, last_loss)
    saved = start

    def save(step: int) -> str:
        path = checkpoint.save(
            cfg.checkpoint_dir,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(cfg.device),
                "model_config": model_cfg.to_dict(),
                "loss": last_loss,
                "world_size": cfg.world_size,
                "workload_id": cfg.workload_id,
                "param_sha256": checkpoint.param_digest(model),
            },
        )
        return path.name

    step = start
    final = "done"
    sync = torch.zeros(2, dtype=torch.float64, device=cfg.device)
    while step < cfg.total_steps:
        if not distributed and stop.set:
            final = "stopped"
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / WARMUP_STEPS)
        x, y = data.batch(corpus, step, cfg.rank, cfg.batch_size, cfg.seq_len, cfg.seed)
        x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)  # early loss spikes without it
        optimizer.step()
        step += 1
        if distributed:
            # one small all-reduce per step: the mean loss, and whether any rank was told to stop
            sync[0] = loss.detach()
            sync[1] = 1.0 if stop.set else 0.0
            dist.all_reduce(sync)
            last_loss = float(sync[0]) / cfg.world_size
            stopping = bool(sync[1] > 0)
        else:
            last_loss = loss.item()
            stopping = stop.set
        if lead:
            progress.step(last_loss)
            if step % cfg.checkpoint_every == 0 and step < cfg.total_steps:
                progress.report(step, ckpt=save(step))
                saved = step
            elif progress.due() and not stopping and step < cfg.total_steps:  # the last step: the final line
                progress.report(step)
        if stopping and step < cfg.total_steps:
            final = "stopped"
            break
    if lead:
        name = save(step) if step > saved or latest is None else None
        progress.report(step, state=final, ckpt=name)
    log(RUNTIME, f"rank {cfg.rank} {final} at step {step}, param_sha256 {checkpoint.param_digest(model)}")
    if distributed:
        dist.barrier()  # rank 0's final checkpoint is written before any rank reports success
        dist.destroy_process_group()
    return final


def main(env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> int:
    stop = StopFlag()
    stop.install()
    env = os.environ if env is None else env
    try:
        cfg = TrainConfig.from_env(env, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        log(RUNTIME, f"error: {exc}")
        return 2
    if cfg.device.type == "cpu":
        cpu_threads(env)
    try:
        train(cfg, stop)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        log(RUNTIME, f"error: rank {cfg.rank}: {type(exc).__name__}: {exc}")
        return 1
    return 0


def exit_now(code: int) -> None:
    """End the process with ``code`` once its output is flushed, without the interpreter's
    teardown: after ``destroy_process_group`` a gloo thread can still be joinable when
    C++ static destructors run, and std::terminate then aborts a rank that had finished
    (SIGABRT, "terminate called without an active exception": seen in about one of four
    full test runs, a finished job reported as crashed). Everything the job writes
    (checkpoints, progress) is written and closed before ``main`` returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
