"""An ``Inference`` replica of fixed capacity, for measuring the router (``bench/workers.py --only router``).

On a GPU node a replica's work happens on its GPU: what limits a service's
requests/s is how many replicas it has, not the CPU of the machine the router
runs on. On this benchmark's CPU-only machine a real ``serve-lm`` replica
computes on the same cores as the router and the clients, so adding replicas
adds no capacity, and the router's scaling cannot be seen with it. This
replica stands in for a GPU-bound one: it answers at most ``--slots`` requests
at a time and holds each for ``--service-ms`` milliseconds, sleeping (no CPU),
so its capacity is ``slots / service_ms`` requests/s wherever it runs and the
CPU it uses is only gRPC's. Everything else in the path is real: it is launched
by a worker as a ``command`` runtime, reports its endpoint with the
``APPORTION_READY`` line as ``serve-lm`` does, and is reached through the
server's router.

Environment (as the agent sets it): ``APPORTION_SERVE_HOST`` (default
127.0.0.1), ``APPORTION_SERVE_PORT`` (default 0: any free port),
``APPORTION_REPLICA_ID``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "proto")]

from apportion.v1 import inference_pb2 as ipb  # noqa: E402
from apportion.v1 import inference_pb2_grpc  # noqa: E402


class FixedReplica(inference_pb2_grpc.InferenceServicer):
    def __init__(self, slots: int, service_s: float) -> None:
        self.slots = threading.BoundedSemaphore(slots)
        self.service_s = service_s

    def Generate(self, request: ipb.GenerateRequest, context: grpc.ServicerContext) -> ipb.GenerateResponse:
        start = time.monotonic()
        with self.slots:
            time.sleep(self.service_s)
        tokens = max(0, request.max_tokens)
        return ipb.GenerateResponse(text="x" * tokens, tokens=tokens, latency_s=time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4, help="requests served at once")
    parser.add_argument("--service-ms", type=float, default=40.0, help="time each request holds a slot")
    args = parser.parse_args()
    host = os.environ.get("APPORTION_SERVE_HOST", "").strip() or "127.0.0.1"
    port = int(os.environ.get("APPORTION_SERVE_PORT", "0") or 0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4 * args.slots + 8))
    inference_pb2_grpc.add_InferenceServicer_to_server(
        FixedReplica(args.slots, args.service_ms / 1000), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready = {"endpoint": f"{host}:{bound}", "replica": os.environ.get("APPORTION_REPLICA_ID", "")}
    print(f"APPORTION_READY {json.dumps(ready)}", flush=True)
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
