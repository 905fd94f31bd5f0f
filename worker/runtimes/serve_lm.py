"""Built-in inference runtime ``serve-lm``: ``python -m worker.runtimes.serve_lm``.

Serves the byte-level transformer of ``worker.runtimes.model`` as the
``apportion.v1.Inference`` gRPC service (``Generate``), with dynamic batching.
Configured only by its environment:

- ``APPORTION_SERVE_FROM`` (optional): a training workload's checkpoint
  directory (see ``worker.runtimes.checkpoint``) or one checkpoint file; its
  latest checkpoint is loaded. Absent, or a directory with no checkpoint yet:
  a fresh (seeded, untrained) model.
- ``APPORTION_SERVE_HOST`` (default 127.0.0.1) and ``APPORTION_SERVE_PORT``
  (default 0: a free port): where to listen.
- ``APPORTION_MAX_BATCH`` (default 8): the most requests run together.
- ``APPORTION_BATCH_WAIT_MS`` (default 5): how long the batcher waits, after the
  first request of a batch, for more.
- ``APPORTION_WORKLOAD_ID``, ``APPORTION_REPLICA_ID`` (optional): name the
  replica in responses (default ``WORKLOAD@HOST:PORT``).
- ``APPORTION_DEVICE``: ``cpu`` or ``cuda`` (default cuda when torch sees a GPU),
  ``LOCAL_RANK``/``CUDA_VISIBLE_DEVICES`` as for training.
- ``APPORTION_PROGRESS_INTERVAL_S`` (default 2): seconds between progress lines.
- ``APPORTION_STOP_GRACE_S`` (default 5): how long requests in flight may take
  to finish after SIGTERM.

Requests queue up; one batcher thread takes up to MAX_BATCH of them, waiting
at most BATCH_WAIT_MS after the first, and generates for all of them together:
one batched forward pass per new token (prompts left-padded and masked,
``model.generate_batch``). ``max_tokens`` defaults to 32 (at most 1024);
greedy decoding unless ``temperature`` is set and > 0.

stdout, flushed: once serving, ``APPORTION_READY {"endpoint": "host:port",
"replica": ..., "checkpoint_step": N or null}``; then every PROGRESS_INTERVAL_S::

    APPORTION_PROGRESS {"requests_per_s": 41.5, "latency_p50_s": 0.021, "latency_p99_s": 0.05,
                        "requests": 830, "batches": 120, "queued": 0}

(``requests_per_s`` over the interval; latencies, time in the replica, over the
last 1,000 requests; ``requests`` and ``batches`` are totals). SIGTERM or
SIGINT: stop taking requests, finish those in flight (up to STOP_GRACE_S), a
last progress line, exit 0. Errors: a message on stderr, non-zero exit (2 for a
bad environment). Runtime args (APPORTION_RUNTIME_ARGS, the command line)
are ignored.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import torch

from apportion.v1 import inference_pb2, inference_pb2_grpc
from worker.runtimes import checkpoint
from worker.runtimes.common import (
    PROGRESS_PREFIX,
    READY_PREFIX,
    ConfigError,
    cpu_threads,
    emit,
    env_args,
    env_device,
    env_float,
    env_int,
    log,
)
from worker.runtimes.model import ModelConfig, TinyLM, generate_batch

RUNTIME = "serve_lm"
DEFAULT_MAX_TOKENS = 32
MAX_TOKENS_LIMIT = 1024
MAX_PROMPT_BYTES = 65_536
LATENCY_WINDOW = 1000


@dataclass
class ServeConfig:
    serve_from: Path | None
    host: str
    port: int
    max_batch: int
    batch_wait_s: float
    device: torch.device
    progress_interval_s: float
    stop_grace_s: float
    workload_id: str
    replica_id: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServeConfig:
        port = env_int(env, "APPORTION_SERVE_PORT", 0, minimum=0)
        if port > 65535:
            raise ConfigError(f"APPORTION_SERVE_PORT must be a port number, got {port}")
        source = env.get("APPORTION_SERVE_FROM", "").strip()
        return cls(
            serve_from=Path(source) if source else None,
            host=env.get("APPORTION_SERVE_HOST", "").strip() or "127.0.0.1",
            port=port,
            max_batch=env_int(env, "APPORTION_MAX_BATCH", 8, minimum=1),
            batch_wait_s=env_float(env, "APPORTION_BATCH_WAIT_MS", 5.0) / 1000,
            device=env_device(env),
            progress_interval_s=env_float(env, "APPORTION_PROGRESS_INTERVAL_S", 2.0, minimum=0.01),
            stop_grace_s=env_float(env, "APPORTION_STOP_GRACE_S", 5.0),
            workload_id=env.get("APPORTION_WORKLOAD_ID", "") or "serve-lm",
            replica_id=env.get("APPORTION_REPLICA_ID", ""),
        )


def load_model(source: Path | None, device: torch.device) -> tuple[TinyLM, int | None]:
    """The model of ``source``'s latest checkpoint (and its step), or a fresh one (step None)."""
    path = None
    if source is not None:
        path = source if source.is_file() else checkpoint.latest_path(source)
        if path is None:
            log(RUNTIME, f"no checkpoint in {source} yet: serving a fresh model")
    if path is None:
        torch.manual_seed(0)
        return TinyLM().to(device).eval(), None
    state = checkpoint.load(path)
    model = TinyLM(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    log(RUNTIME, f"loaded {path} (step {state['step']}), param_sha256 {checkpoint.param_digest(model)}")
    return model.to(device).eval(), int(state["step"])


@dataclass
class Pending:
    prompt: str
    max_tokens: int
    temperature: float | None
    enqueued: float = field(default_factory=time.monotonic)
    future: futures.Future[tuple[str, float]] = field(default_factory=futures.Future)


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.batches = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._since = time.monotonic()
        self._since_requests = 0

    def record(self, latencies: list[float]) -> None:
        with self._lock:
            self.requests += len(latencies)
            self.batches += 1
            self._latencies.extend(latencies)

    def report(self, queued: int) -> dict[str, Any]:
        """Progress since the previous report (totals since start)."""
        with self._lock:
            now = time.monotonic()
            rate = (self.requests - self._since_requests) / max(now - self._since, 1e-9)
            lat = sorted(self._latencies)
            self._since, self._since_requests = now, self.requests
            requests, batches = self.requests, self.batches

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 6) if lat else 0.0

        return {
            "requests_per_s": round(rate, 3),
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "requests": requests,
            "batches": batches,
            "queued": queued,
        }


class Batcher:
    """One thread that runs queued requests in batches of up to ``max_batch``."""

    def __init__(self, model: TinyLM, max_batch: int, wait_s: float, stats: Stats) -> None:
        self.model = model
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.stats = stats
        self.queue: queue.Queue[Pending] = queue.Queue()
        self.generator = torch.Generator().manual_seed(0)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: Pending) -> futures.Future[tuple[str, float]]:
        if self._stopping.is_set():
            raise RuntimeError("stopping")
        self.queue.put(item)
        return item.future

    def stop(self) -> None:
        """Stop taking requests; fail those still queued; wait for the batch that runs."""
        self._stopping.set()
        self._thread.join()
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("the replica is stopping"))

    def _take(self) -> list[Pending]:
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        # requests whose caller gave up (deadline, cancellation) are dropped here
        return [p for p in batch if p.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while not self._stopping.is_set():
            batch = self._take()
            if not batch:
                continue
            try:
                texts = generate_batch(
                    self.model,
                    [p.prompt for p in batch],
                    [p.max_tokens for p in batch],
                    [p.temperature for p in batch],
                    self.generator,
                )
            except Exception as exc:
                log(RUNTIME, f"error: generation failed: {type(exc).__name__}: {exc}")
                for p in batch:
                    p.future.set_exception(exc)
                continue
            done = time.monotonic()
            latencies = [done - p.enqueued for p in batch]
            self.stats.record(latencies)
            for p, text, latency in zip(batch, texts, latencies, strict=True):
                p.future.set_result((text, latency))


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, batcher: Batcher, replica: str) -> None:
        self.batcher = batcher
        self.replica = replica

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        if not 0 < max_tokens <= MAX_TOKENS_LIMIT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_tokens must be in 1..{MAX_TOKENS_LIMIT}")
        temperature = request.temperature if request.HasField("temperature") else None
        if temperature is not None and not temperature >= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be ≥ 0")
        if len(request.prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt is longer than {MAX_PROMPT_BYTES} bytes")
        try:
            future = self.batcher.submit(Pending(request.prompt, max_tokens, temperature))
        except RuntimeError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the replica is stopping")
        context.add_callback(future.cancel)  # a caller that goes away leaves the queue
        try:
            text, latency = future.result(timeout=context.time_remaining())
        except futures.TimeoutError:
            future.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded in the replica's queue")
        except futures.CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled")
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(exc).__name__}")
        # one token per byte, exactly max_tokens of them (no end-of-text token)
        return inference_pb2.GenerateResponse(
            text=text, tokens=max_tokens, replica=self.replica, latency_s=latency
        )


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(cfg: ServeConfig, stop: threading.Event) -> None:
    model, step = load_model(cfg.serve_from, cfg.device)
    generate_batch(model, ["warm", "up!"], [2, 2], [None, None])  # the first forwards are the slow ones
    generate_batch(model, ["warm", "up"], [2, 2], [None, None])  # (and with padding)
    stats = Stats()
    batcher = Batcher(model, cfg.max_batch, cfg.batch_wait_s, stats)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(16, 2 * cfg.max_batch)))
    port = server.add_insecure_port(_endpoint(cfg.host, cfg.port))
    if not port:
        raise OSError(f"cannot listen on {_endpoint(cfg.host, cfg.port)}")
    endpoint = _endpoint(cfg.host, port)
    replica = cfg.replica_id or f"{cfg.workload_id}@{endpoint}"
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(batcher, replica), server)
    batcher.start()
    server.start()
    emit(READY_PREFIX, {"endpoint": endpoint, "replica": replica, "checkpoint_step": step})
    log(RUNTIME, f"serving {replica} on {cfg.device}, batches of up to {cfg.max_batch}")
    while not stop.wait(cfg.progress_interval_s):
        emit(PROGRESS_PREFIX, stats.report(batcher.queue.qsize()))
    log(RUNTIME, "stopping")
    server.stop(grace=cfg.stop_grace_s).wait()
    batcher.stop()
    emit(PROGRESS_PREFIX, stats.report(batcher.queue.qsize()))


def main(env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    env = os.environ if env is None else env
    try:
        cfg = ServeConfig.from_env(env)
        ignored = [*env_args(env), *(sys.argv[1:] if argv is None else argv)]
    except ConfigError as exc:
        log(RUNTIME, f"error: {exc}")
        return 2
    if ignored:
        log(RUNTIME, f"ignoring runtime args {ignored} (serve_lm is configured by its environment)")
    if cfg.device.type == "cpu":
        cpu_threads(env)
    try:
        serve(cfg, stop)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        log(RUNTIME, f"error: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
