"""A real upstream app for the tests: an aiohttp server with endpoints that behave
in every way a proxy must carry (streams, holds, websockets, dying mid-body).

Run in-process (``make_app()``) or as a process:
    python tests/apps/upstream.py --port P [--unix PATH] [--events FILE] [--exit-code N]
As a process it appends one JSON line per event to --events (request received,
request finished, SIGTERM received), so a test can prove what the app saw.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import signal
import struct
import sys
import time

from aiohttp import WSMsgType, web

EVENTS = web.AppKey("events", list)
HOLDS = web.AppKey("holds", dict)
EVENT_FILE = web.AppKey("event_file", str)


def _record(app: web.Application, kind: str, **fields: object) -> None:
    entry = {"t": time.time(), "event": kind, **fields}
    app[EVENTS].append(entry)
    path = app.get(EVENT_FILE)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _hold(app: web.Application, key: str) -> asyncio.Event:
    return app[HOLDS].setdefault(key, asyncio.Event())


@web.middleware
async def record_requests(request: web.Request, handler):  # type: ignore[no-untyped-def]
    rid = request.query.get("id")
    if not request.path.startswith("/__"):
        _record(request.app, "received", path=request.path, id=rid, method=request.method)
    resp = await handler(request)
    if not request.path.startswith("/__"):
        _record(request.app, "answered", path=request.path, id=rid)
    return resp


async def headers(request: web.Request) -> web.Response:
    return web.json_response({
        "method": request.method,
        "raw_path": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_length": len(await request.read()),
    })


async def echo(request: web.Request) -> web.StreamResponse:
    """Stream the request body back as it arrives."""
    resp = web.StreamResponse(headers={"X-Method": request.method})
    if request.content_length is not None:
        resp.content_length = request.content_length
    await resp.prepare(request)
    async for chunk in request.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


def pattern(n: int) -> bytes:
    block = bytes(range(256)) * 4096  # 1 MiB
    return (block * (n // len(block) + 1))[:n]


async def bytes_(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "1024"))
    chunked = request.query.get("chunked") == "1"
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if not chunked:
        resp.content_length = n
    await resp.prepare(request)
    block = bytes(range(256)) * 256  # 64 KiB
    sent = n if request.method == "HEAD" else 0
    while sent < n:
        piece = block[: min(len(block), n - sent)]
        await resp.write(piece)
        sent += len(piece)
    await resp.write_eof()
    return resp


async def stream(request: web.Request) -> web.StreamResponse:
    """Send 'first', then wait for /__go?key=K before sending 'second' (SSE style)."""
    key = request.query.get("key", "stream")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b"data: first\n\n")
    await asyncio.wait_for(_hold(request.app, key).wait(), 30)
    await resp.write(b"data: second\n\n")
    await resp.write_eof()
    return resp


async def hold(request: web.Request) -> web.Response:
    """Answer only once /__go?key=K is called (or after ms=N milliseconds)."""
    key = request.query.get("key", "hold")
    _hold(request.app, "started:" + key).set()
    if "ms" in request.query:
        await asyncio.sleep(int(request.query["ms"]) / 1000)
        return web.Response(text=f"released {key}\n")
    released = _hold(request.app, key)
    try:
        for _ in range(1200):  # up to 60 s; notice when the proxy gives up on us
            try:
                await asyncio.wait_for(asyncio.shield(released.wait()), 0.05)
                return web.Response(text=f"released {key}\n")
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("the proxy closed the connection") from None
        raise TimeoutError
    except (ConnectionResetError, asyncio.CancelledError):  # cancelled: aiohttp's handler_cancellation
        _record(request.app, "disconnected", path=request.path, key=key)
        raise


async def go(request: web.Request) -> web.Response:
    _hold(request.app, request.query["key"]).set()
    return web.Response(text="ok\n")


async def started(request: web.Request) -> web.Response:
    """Wait until a /hold with this key has reached the app."""
    await asyncio.wait_for(_hold(request.app, "started:" + request.query["key"]).wait(), 30)
    return web.Response(text="started\n")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[EVENTS])


async def gz(request: web.Request) -> web.Response:
    return web.Response(body=gzip.compress(b"hello gzip " * 100),
                        headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})


async def cookies(request: web.Request) -> web.Response:
    resp = web.Response(text="cookies\n")
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
    return resp


async def hop(request: web.Request) -> web.Response:
    return web.Response(text="hop\n", headers={
        "Connection": "keep-alive, X-Private",
        "X-Private": "secret",
        "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive",
        "Trailer": "X-Checksum",
        "X-End-To-End": "kept",
    })


async def die(request: web.Request) -> web.StreamResponse:
    """Promise 1000 bytes, send 100, then drop the connection."""
    resp = web.StreamResponse()
    resp.content_length = 1000 if request.query.get("chunked") != "1" else None
    await resp.prepare(request)
    await resp.write(b"x" * 100)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return resp


async def status(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["code"]), text="status\n")


async def quit_(request: web.Request) -> web.Response:
    _record(request.app, "quit")
    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    return web.Response(text="bye\n")


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse(protocols=("chat", "superchat"), autoping=False)
    await sock.prepare(request)
    async for msg in sock:
        if msg.type is WSMsgType.TEXT:
            if msg.data.startswith("close:"):
                await sock.close(code=int(msg.data[6:]), message=b"bye")
                break
            await sock.send_str("echo:" + msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sock.send_bytes(msg.data[::-1])
        elif msg.type is WSMsgType.PING:
            await sock.pong(msg.data)
    _record(request.app, "ws_closed", code=sock.close_code)
    return sock


async def ws_close(request: web.Request) -> web.WebSocketResponse:
    """A websocket whose close handshake the test drives, recording what it received.

    ``?reply=CODE&reason=TEXT``: answer the client's close with this code and reason.
    Text ``close:CODE:REASON``: start the close with that code and reason.
    Text ``vanish``: drop the connection without a close frame.
    """
    sock = web.WebSocketResponse(autoclose=False, autoping=False)
    await sock.prepare(request)
    while not sock.closed:
        msg = await sock.receive()
        if msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
            _, code, reason = msg.data.split(":", 2)
            await sock.send_frame(struct.pack("!H", int(code)) + reason.encode(), WSMsgType.CLOSE)
            reply = await sock.receive(timeout=10)  # the peer's answer, code and reason
            _record(request.app, "ws_reply", code=reply.data, reason=reply.extra)
            await sock.close()
            return sock
        if msg.type is WSMsgType.TEXT and msg.data == "vanish":
            assert request.transport is not None
            request.transport.abort()
            return sock
        if msg.type is WSMsgType.TEXT:
            await sock.send_str("echo:" + msg.data)
        elif msg.type is WSMsgType.CLOSE:
            _record(request.app, "ws_close", code=msg.data, reason=msg.extra)
            code = int(request.query.get("reply", msg.data or 1000))
            await sock.close(code=code, message=request.query.get("reason", msg.extra or "").encode())
            return sock
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
    _record(request.app, "ws_gone", code=sock.close_code)
    return sock


def make_app(event_file: str | None = None) -> web.Application:
    app = web.Application(middlewares=[record_requests], client_max_size=1 << 34)
    app[EVENTS] = []
    app[HOLDS] = {}
    if event_file:
        app[EVENT_FILE] = event_file
    r = app.router
    r.add_route("*", "/headers", headers)
    r.add_route("*", "/headers/{tail:.*}", headers)
    r.add_route("*", "/echo", echo)
    r.add_post("/upload", upload)
    r.add_get("/bytes", bytes_)
    r.add_get("/stream", stream)
    r.add_get("/hold", hold)
    r.add_get("/gzip", gz)
    r.add_get("/cookies", cookies)
    r.add_get("/hop", hop)
    r.add_get("/die", die)
    r.add_get("/status/{code}", status)
    r.add_post("/quitquitquit", quit_)
    r.add_get("/ws", ws)
    r.add_get("/ws/close", ws_close)
    r.add_get("/healthz", healthz)
    r.add_get("/__go", go)
    r.add_get("/__started", started)
    r.add_get("/__stats", stats)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--unix")
    parser.add_argument("--events")
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--delay-start", type=float, default=0.0,
                        help="seconds to wait before listening (a slow-starting app)")
    parser.add_argument("--ignore-sigterm", action="store_true")
    args = parser.parse_args()
    app = make_app(args.events)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_term() -> None:
            _record(app, "sigterm", pid=os.getpid())
            if not args.ignore_sigterm:
                stop.set()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_term)
        await asyncio.sleep(args.delay_start)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site: web.BaseSite = (web.UnixSite(runner, args.unix) if args.unix
                              else web.TCPSite(runner, "127.0.0.1", args.port))
        await site.start()
        _record(app, "listening", pid=os.getpid())
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    sys.exit(args.exit_code)


if __name__ == "__main__":
    main()
