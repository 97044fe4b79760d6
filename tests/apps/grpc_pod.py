"""A gRPC "pod" app for the rolling tests and benchmarks: grpcio, with the standard health service.

    python tests/apps/grpc_pod.py --port P [--calls FILE] [--log FILE]
                                  [--health SERVICE=STATUS ...]
                                  [--on-sigterm graceful|die] [--grace S]

Serves ``/test.Echo/Hold`` (unary, raw bytes, no .proto needed): the request is JSON
``{"id": "...", "ms": N}``; the app appends the id to --calls (one line, flushed, before it
answers), holds N ms, and answers the id.  --log writes the pod-termination replay's format
(tests/k8s_replay.py, like tests/apps/replay_app.py): ``recv ID T`` when a call arrives, ``done ID
T`` just before it is answered, ``sigterm - T`` (T = time.monotonic()), each one unbuffered write
that survives the process dying.  ``grpc.health.v1.Health`` comes from
grpcio-health-checking's servicer; --health sets a service's status ("" = the whole server;
default: "" and "test.Echo" SERVING).  SIGUSR1 sets every service NOT_SERVING.

On SIGTERM, ``graceful`` stops accepting and lets calls in flight finish within --grace s
(``server.stop(grace)``), then exits; ``die`` keeps Python's default, so the process dies at
once, as a gRPC server written without shutdown code does (after logging ``sigterm`` to --log,
it re-raises the signal with the default action: the exit status is still "killed by SIGTERM").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

STATUSES = {"SERVING": health_pb2.HealthCheckResponse.SERVING,
            "NOT_SERVING": health_pb2.HealthCheckResponse.NOT_SERVING,
            "UNKNOWN": health_pb2.HealthCheckResponse.UNKNOWN}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--calls", default=None)
    parser.add_argument("--log", default=None)
    parser.add_argument("--health", action="append", default=None, metavar="SERVICE=STATUS")
    parser.add_argument("--on-sigterm", choices=("graceful", "die"), default="graceful")
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=64)
    args = parser.parse_args()

    lock = threading.Lock()
    calls = open(args.calls, "a", encoding="utf-8") if args.calls else None  # noqa: SIM115
    log = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if args.log else None

    def record(event: str, rid: str = "-") -> None:
        if log is not None:
            os.write(log, f"{event} {rid} {time.monotonic():.6f}\n".encode())

    def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        call = json.loads(request)
        if calls is not None:
            with lock:
                calls.write(call["id"] + "\n")
                calls.flush()
        record("recv", call["id"])
        time.sleep(call.get("ms", 0) / 1000)
        record("done", call["id"])
        return str(call["id"]).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                         options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Hold": grpc.unary_unary_rpc_method_handler(hold)}),))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for item in args.health or ["=SERVING", "test.Echo=SERVING"]:
        name, _, status = item.partition("=")
        servicer.set(name, STATUSES[status])
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()

    def not_serving(signum: int, frame: object) -> None:
        for item in args.health or ["=SERVING", "test.Echo=SERVING"]:
            servicer.set(item.partition("=")[0], health_pb2.HealthCheckResponse.NOT_SERVING)

    signal.signal(signal.SIGUSR1, not_serving)
    if args.on_sigterm == "graceful":
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
        while not stopping.wait(0.05):
            pass
        server.stop(args.grace).wait()
    else:
        def die(signum: int, frame: object) -> None:
            record("sigterm")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, die)
        server.wait_for_termination()


if __name__ == "__main__":
    main()
