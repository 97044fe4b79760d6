"""The example app of the pod-termination replay (tests/k8s_replay.py): run as
``python tests/apps/replay_app.py --port P --log FILE [--tag T]``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time


def serve_app(port: int, log_path: str) -> None:
    """An upstream that logs every request it receives and finishes, and its SIGTERM.

    GET /work?ms=N answers ``done <X-Request-Id>`` after N ms; any other path is a health check.
    Each log line is one unbuffered write, so it survives the process being killed, and the
    SIGTERM handler (which may interrupt any bytecode) never re-enters a buffered writer.
    """
    from aiohttp import web

    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(event: str, rid: str = "-") -> None:
        os.write(log, f"{event} {rid} {time.monotonic():.6f}\n".encode())

    async def work(request: web.Request) -> web.Response:
        rid = request.headers.get("X-Request-Id", "-")
        record("recv", rid)
        await asyncio.sleep(int(request.query.get("ms", "150")) / 1000)
        record("done", rid)
        return web.Response(text=f"done {rid}\n")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def on_sigterm(signum: int, frame: object) -> None:
        record("sigterm")
        os._exit(128 + signal.SIGTERM)  # drop everything in flight, as a careless app would

    signal.signal(signal.SIGTERM, on_sigterm)
    app = web.Application()
    app.router.add_get("/work", work)
    app.router.add_route("*", "/{tail:.*}", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, handle_signals=False,
                print=None)



if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--tag", default="")  # makes the command line unique (exit.process)
    args = parser.parse_args()
    serve_app(args.port, args.log)
    sys.exit(0)
