#!/usr/bin/env python3
"""The app behind every target in bench/: a small aiohttp server on uvloop.

  GET /fast              100-byte text body
  GET /sleep?ms=N[&id=X] sleeps N ms, then a short body; X is remembered (see /__stats)
  GET /bytes?n=N         N bytes (any size: streamed in 256 KiB chunks, bounded memory)
  POST /sink             reads and discards the request body (streamed), answers its length
  GET /__stats           JSON counters plus the ids /sleep has seen (started, finished,
                         cancelled): drain.py uses them to tell a request that reached the
                         app and was then cut (lost) from one that never got there

No access log.  Usage: upstream.py --port P [--host 127.0.0.1]
"""
from __future__ import annotations

import argparse
import asyncio
import os

from aiohttp import web

FAST_BODY = (b"fast-response " * 8)[:99] + b"\n"  # exactly 100 bytes
STATS = {"fast": 0, "sleep_started": 0, "sleep_finished": 0, "sleep_cancelled": 0}
IDS: dict[str, set[str]] = {"started": set(), "finished": set(), "cancelled": set()}


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
        IDS["started"].add(rid)
    try:
        await asyncio.sleep(ms / 1000.0)
    except asyncio.CancelledError:  # the client (or the proxy) went away mid-request
        STATS["sleep_cancelled"] += 1
        if rid is not None:
            IDS["cancelled"].add(rid)
        raise
    STATS["sleep_finished"] += 1
    if rid is not None:
        IDS["finished"].add(rid)
    return web.Response(body=b"slept %g ms\n" % ms, content_type="text/plain")


CHUNK = b"x" * 256 * 1024


async def send_bytes(request: web.Request) -> web.StreamResponse:
    try:
        n = int(request.query["n"])
    except (KeyError, ValueError):
        raise web.HTTPBadRequest(text="n=<bytes> required\n")
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


async def stats(request: web.Request) -> web.Response:
    return web.json_response({**STATS, "pid": os.getpid(), **{f"ids_{k}": sorted(v) for k, v in IDS.items()}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    app = web.Application()
    app.router.add_get("/fast", fast)
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/bytes", send_bytes)
    app.router.add_post("/sink", sink)
    app.router.add_get("/__stats", stats)
    # handler_cancellation: a handler is cancelled when its client disconnects, so a proxy that
    # drops a request mid-flight shows up as "cancelled" here.
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=1024,
                shutdown_timeout=5.0, handler_cancellation=True)


if __name__ == "__main__":
    main()
