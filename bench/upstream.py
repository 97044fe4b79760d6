#!/usr/bin/env python3
"""The app behind every target in bench/: a small aiohttp server on uvloop.

  GET  /fast              100-byte text body
  GET  /sleep?ms=N[&id=X] sleeps N ms, then a short body; X is remembered (see /__stats)
  GET  /bytes?n=N         N bytes (default 1 MiB; any size: streamed in 256 KiB chunks, bounded
                          memory): a download
  POST /sink              reads and discards the (streamed) body, answers its length: an upload
  GET  /ws                websocket echo (text and binary)
  GET  /reset             the connection is aborted without an answer (a failing upstream call)
  GET  /__stats           JSON counters plus the ids /sleep has seen (started, finished,
                          cancelled, and ids started more than once): drain.py and rolling.py use
                          them to tell a request that reached the app and was then cut (lost) from
                          one that never got there

Graceful on SIGTERM/SIGINT (aiohttp's run_app): the listener closes at once, idle keep-alive
connections are closed, requests in progress run to completion (up to --shutdown-timeout, then they
are cancelled), then the process exits 0 — what a well-behaved app does when the kubelet stops it.
With --on-sigterm exit it dies of SIGTERM at once instead, in-flight requests and all (an app
with no signal handling, or one run without an init that forwards signals properly).
With --ids-file, every /sleep id is also appended to that file as it starts ("S id"), finishes
("F id") or is cancelled ("C id"), flushed at once, so the record survives a SIGKILL.

No access log.  Usage:
  upstream.py --port P [--host 127.0.0.1] [--ids-file F] [--shutdown-timeout S] [--on-sigterm exit]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import IO

from aiohttp import WSMsgType, web

FAST_BODY = (b"fast-response " * 8)[:99] + b"\n"  # exactly 100 bytes
CHUNK = b"x" * 256 * 1024
STATS = {"fast": 0, "sleep_started": 0, "sleep_finished": 0, "sleep_cancelled": 0}
IDS: dict[str, set[str]] = {"started": set(), "finished": set(), "cancelled": set()}
DUPLICATES: list[str] = []
IDS_FILE: list[IO[str]] = []  # at most one open file


def remember(kind: str, rid: str) -> None:
    if kind == "started" and rid in IDS["started"]:
        DUPLICATES.append(rid)
    IDS[kind].add(rid)
    for f in IDS_FILE:
        f.write(f"{kind[0].upper()} {rid}\n")
        f.flush()


async def fast(request: web.Request) -> web.Response:
    STATS["fast"] += 1
    return web.Response(body=FAST_BODY, content_type="text/plain")


async def sleep(request: web.Request) -> web.Response:
    try:
        ms = max(float(request.query.get("ms", "10")), 0.0)
    except ValueError:
        raise web.HTTPBadRequest(text="bad ms\n")
    rid = request.query.get("id")
    STATS["sleep_started"] += 1
    if rid is not None:
        remember("started", rid)
    try:
        await asyncio.sleep(ms / 1000.0)
    except asyncio.CancelledError:  # the client (or the proxy) went away mid-request
        STATS["sleep_cancelled"] += 1
        if rid is not None:
            remember("cancelled", rid)
        raise
    STATS["sleep_finished"] += 1
    if rid is not None:
        remember("finished", rid)
    return web.Response(body=b"slept %g ms\n" % ms, content_type="text/plain")


async def send_bytes(request: web.Request) -> web.StreamResponse:
    try:
        n = int(request.query.get("n", "1048576"))
    except ValueError:
        raise web.HTTPBadRequest(text="n=<bytes> expected\n") from None
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    while n > 0:
        await resp.write(CHUNK if n >= len(CHUNK) else CHUNK[:n])  # write() waits for the socket
        n -= len(CHUNK)
    await resp.write_eof()
    return resp


async def sink(request: web.Request) -> web.Response:
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.Response(text=f"{total}\n")


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def reset(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()  # RST, no status line: the proxy must answer 502
    raise asyncio.CancelledError


async def die_on_sigterm(app: web.Application) -> None:
    """--on-sigterm exit: give SIGTERM back its default action (run_app made it graceful)."""
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)


async def stats(request: web.Request) -> web.Response:
    return web.json_response({**STATS, "pid": os.getpid(), "duplicates": DUPLICATES,
                              **{f"ids_{k}": sorted(v) for k, v in IDS.items()}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ids-file", help="append every /sleep id event to this file (survives SIGKILL)")
    ap.add_argument("--shutdown-timeout", type=float, default=5.0,
                    help="on SIGTERM, how long requests in progress may run before being cancelled")
    ap.add_argument("--on-sigterm", choices=("graceful", "exit"), default="graceful")
    args = ap.parse_args()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    if args.ids_file:
        IDS_FILE.append(open(args.ids_file, "a", buffering=1))  # noqa: SIM115 - open for the process' life
    app = web.Application()
    app.router.add_get("/fast", fast)
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/bytes", send_bytes)
    app.router.add_post("/sink", sink)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/reset", reset)
    app.router.add_get("/__stats", stats)
    if args.on_sigterm == "exit":
        app.on_startup.append(die_on_sigterm)
    # handler_cancellation: a handler is cancelled when its client disconnects, so a proxy that
    # drops a request mid-flight shows up as "cancelled" here.
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=1024,
                shutdown_timeout=args.shutdown_timeout, handler_cancellation=True)


if __name__ == "__main__":
    main()
