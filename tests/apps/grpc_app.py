"""A gRPC test app (grpcio, generic handlers, bytes in and out: no generated code).

Service ``test.Echo``:
- ``Unary``: echoes the request; echoes ``x-echo-*`` metadata as initial metadata and
  sends a trailer ``x-trailer: done``.
- ``Fail``: request ``b"CODE:details"`` (a ``grpc.StatusCode`` name) ends the call with
  that status before any message: a trailers-only response.
- ``Upload`` (client streaming): answers the total size and count of what it received.
- ``Download`` (server streaming): request ``b"n:size"``: n messages of size bytes.
- ``Chat`` (bidi): echoes each message.
- ``Slow``: request ``b"seconds"``: sleeps (ends early if the call is cancelled).
Every call is logged to ``--log`` as a JSON line (``start``, then ``end`` or
``cancelled``) with its method and request size, so a test can prove what the app saw.
SIGTERM stops the server with a grace of ``--grace`` seconds (grpcio then sends GOAWAY).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

MAX_MESSAGE = 32 * 1024 * 1024


class Log:
    def __init__(self, path: str | None) -> None:
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._lock = threading.Lock()

    def __call__(self, method: str, event: str, **fields: Any) -> None:
        if self._file is not None:
            with self._lock:
                self._file.write(json.dumps({"method": method, "event": event, **fields}) + "\n")


def handlers(log: Log) -> grpc.GenericRpcHandler:
    def logged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            size = len(request) if isinstance(request, bytes) else None
            md = {k: v for k, v in context.invocation_metadata() if k == "x-id"}
            log(name, "start", size=size, **md)
            try:
                result = fn(request, context)
                if isinstance(result, Iterator):
                    return _logged_iter(result, log, name, context)
                log(name, "end" if context.is_active() else "cancelled", **md)
                return result
            except BaseException:
                log(name, "cancelled" if not context.is_active() else "error", **md)
                raise
        return call

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        echo = tuple((k, v) for k, v in context.invocation_metadata() if k.startswith("x-echo-"))
        if echo:
            context.send_initial_metadata(echo)
        context.set_trailing_metadata((("x-trailer", "done"),))
        return request

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        code, _, details = request.decode().partition(":")
        context.abort(grpc.StatusCode[code], details)
        raise AssertionError("unreachable")

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        sizes = [len(r) for r in requests]
        return f"{len(sizes)}:{sum(sizes)}".encode()

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        n, _, size = request.decode().partition(":")
        for i in range(int(n)):
            yield bytes([i % 256]) * int(size or 1)

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        deadline = time.monotonic() + float(request.decode() or "1")
        while time.monotonic() < deadline:
            if not context.is_active():
                return b""
            time.sleep(0.01)
        return b"slept"

    ident = None  # bytes in, bytes out: no (de)serializer
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(logged("Unary", unary), ident, ident),
        "Fail": grpc.unary_unary_rpc_method_handler(logged("Fail", fail), ident, ident),
        "Upload": grpc.stream_unary_rpc_method_handler(logged("Upload", upload), ident, ident),
        "Download": grpc.unary_stream_rpc_method_handler(
            logged("Download", download), ident, ident),
        "Chat": grpc.stream_stream_rpc_method_handler(logged("Chat", chat), ident, ident),
        "Slow": grpc.unary_unary_rpc_method_handler(logged("Slow", slow), ident, ident),
    })


def _logged_iter(it: Iterator[bytes], log: Log, name: str,
                 context: grpc.ServicerContext) -> Iterator[bytes]:
    try:
        yield from it
        log(name, "end")
    except BaseException:
        log(name, "cancelled")
        raise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log")
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--unix", help="also listen on this unix socket")
    args = parser.parse_args()
    log = Log(args.log)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64),
        handlers=[handlers(log)],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.max_send_message_length", MAX_MESSAGE),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=None,
    )
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    if args.unix:
        server.add_insecure_port(f"unix:{args.unix}")
    server.start()
    stopped = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        log("-", "sigterm")
        threading.Thread(target=lambda: (server.stop(args.grace).wait(), stopped.set()),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while not stopped.wait(0.2):
        pass


if __name__ == "__main__":
    main()
