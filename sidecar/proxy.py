"""Forwarding: one request or websocket, streamed both ways, tracked as a Flight.

The proxy listener is aiohttp's low-level ``web.Server`` (no router, no
middlewares) bound with ``loop.create_server`` so the server socket is ours to
close when admission stops.  Upstream traffic goes through one pooled
``ClientSession``.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from .config import Config
from .drain import Drain, Flight
from .headers import request_headers, response_headers
from .listener import ClientServer
from .log import access_logger
from .metrics import Metrics
from .responses import ProxyResponse, rejection, upstream_error, upstream_error_kind
from .upstream import base_url, connector
from .websocket import relay_websocket

__all__ = ("Proxy",)

CLIENT_CLOSED = 499  # nginx's code for "client went away before the answer was complete"
FRESH_GRACE = 0.5  # seconds a just-accepted, still silent connection gets once closing
# Idle pooled upstream connections are dropped before common app servers drop them
# (uvicorn 5 s, node 5 s), so a request is not sent on a socket the app is closing.
UPSTREAM_IDLE = 4.0


class _RequestFlight(Flight):
    __slots__ = ("request",)

    def __init__(self, request: web.BaseRequest, started: float) -> None:
        super().__init__(request.method, request.raw_path, started)
        self.request = request

    def abort(self) -> None:
        """Cut the client connection; the handler task is cancelled, and the upstream
        request with it."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        self.request.task.cancel()


class Proxy:
    """The proxy listener and the upstream client, wired to the drain."""

    def __init__(self, config: Config, *, drain: Drain, metrics: Metrics) -> None:
        self._config = config
        self._drain = drain
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        up = config.upstream
        self._base = base_url(up)
        self._timeout = aiohttp.ClientTimeout(
            total=up.timeout or None, sock_connect=up.connect_timeout, connect=None
        )
        self._retry_after = str(config.drain.retry_after)
        self._access_log = config.logging.access_log
        self._websockets_close = config.drain.websockets == "close"
        self._session: aiohttp.ClientSession | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._closing: set[asyncio.Future[bool]] = set()
        self.websockets: set[web.WebSocketResponse] = set()
        self.web_server = ClientServer(
            self.handle, handler_cancellation=True, access_log=None,
            header_timeout=config.client.header_timeout,
            keepalive_timeout=config.client.idle_timeout,
        )

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        up = self._config.upstream
        self._session = aiohttp.ClientSession(
            connector=connector(up, limit=up.max_connections, keepalive_timeout=UPSTREAM_IDLE),
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    async def listen(self) -> int:
        """Bind the proxy listener; return the port (useful with port 0)."""
        addr = self._config.listen
        self._listener = await self._loop.create_server(
            self.web_server, addr.host, addr.port, reuse_address=True, backlog=1024
        )
        return int(self._listener.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self.web_server.connections)

    async def stop_admission(self) -> None:
        """Stop accepting, close connections with no request in progress, end websockets."""
        if self._listener is not None:
            self._listener.close()
            await asyncio.sleep(0)  # uvloop closes the socket on the next loop turn
        self.close_idle()
        if self._websockets_close:
            for ws in list(self.websockets):
                # Not awaited: each relay ends (and leaves the in-flight set) on its own.
                task = asyncio.ensure_future(
                    ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"going away"))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def close_idle(self) -> None:
        """Close connections with no request in progress.

        A connection that has carried requests and sits idle, or holds a partly
        received request, is closed at once.  One accepted but still silent gets
        ``FRESH_GRACE`` seconds: its request is most likely on the wire, and a clear
        503 beats a reset that leaves the client unsure whether it was processed.
        """
        busy = self._busy()
        for conn in self.web_server.connections:
            if conn not in busy:
                if getattr(conn, "_request_count", 1) == 0:
                    self._loop.call_later(FRESH_GRACE, self._close_if_idle, conn)
                else:
                    conn.force_close()

    def _busy(self) -> set[RequestHandler]:
        """Connections with a request in flight, queued, or whose answer is being written."""
        busy = {f.request.protocol for f in self._drain.flights() if isinstance(f, _RequestFlight)}
        busy.update(c for c in self.web_server.connections
                    if getattr(c, "_request_in_progress", False) or getattr(c, "_messages", None))
        return busy

    def _close_if_idle(self, conn: RequestHandler) -> None:
        if conn not in self._busy():
            conn.force_close()

    async def close(self) -> None:
        for conn in self.web_server.connections:
            conn.force_close()
        if self._session is not None:
            await self._session.close()

    # --- one request ---------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        drain = self._drain
        if not drain.forwarding:
            return self._reject(request, "draining" if drain.triggered else "starting")

        started = monotonic()  # not loop.time(): uvloop's clock ticks in whole milliseconds
        flight = _RequestFlight(request, started)
        drain.add(flight)
        status = CLIENT_CLOSED
        resp: web.StreamResponse | None = None
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                resp, status = await self._websocket(request)
            else:
                resp, status = await self._forward(request)
            return resp
        finally:
            drain.done(flight)
            if not drain.admitting and resp is not None and not getattr(
                    request.protocol, "_messages", None):
                # Admission has stopped: the connection ends with this response.
                resp.force_close()
            elapsed = monotonic() - started
            self._metrics.request_done(request.method, status, elapsed)
            if self._access_log:
                _log_access(request, status, elapsed)

    def _reject(self, request: web.BaseRequest, reason: str) -> web.Response:
        if reason == "draining":
            self._metrics.rejected_draining.inc()
            self._drain.rejected()
        else:
            self._metrics.rejected_starting.inc()
        self._metrics.request_done(request.method, 503, 0.0)  # answered, so counted too
        if self._access_log:
            _log_access(request, 503, 0.0)
        return rejection(reason, self._retry_after)

    def _url(self, request: web.BaseRequest) -> URL:
        target = request.raw_path
        if not target.startswith("/"):  # absolute-form request target
            target = URL(target).raw_path_qs
        return URL(self._base + target, encoded=True)

    async def _forward(self, request: web.BaseRequest) -> tuple[web.StreamResponse, int]:
        session = self._session
        assert session is not None
        body = None
        if request.body_exists:
            body = request.content
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = request_headers(request.headers, client=request.remote)
        resp: ProxyResponse | None = None
        try:
            async with session.request(
                request.method, self._url(request), headers=headers, data=body,
                allow_redirects=False, compress=None, chunked=None,
            ) as up:
                resp = ProxyResponse(status=up.status, reason=up.reason)
                resp.headers.extend(response_headers(up.headers))
                if self._drain.triggered:
                    resp.force_close()
                writer = await resp.prepare(request)  # the head waits for the first body bytes
                content = up.content
                chunk = content.read_nowait()
                if content.at_eof():  # the whole body is here: one write for head and body
                    await resp.write_eof(chunk)
                    return resp, up.status
                if chunk:
                    await resp.write(chunk)
                elif writer is not None:  # a stream with nothing to say yet: the head goes now
                    writer.send_headers()
                while chunk := await content.readany():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp, up.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            if resp is not None and resp.prepared:
                # Headers are out: cut the connection so the client never takes a
                # truncated body for a complete one.
                self._count_error(exc)
                transport = request.transport
                if transport is not None:
                    transport.abort()
                return resp, resp.status
            if isinstance(exc, ConnectionResetError) and request.transport is None:
                raise  # the client went away; nothing to answer
            error = self._error_response(exc)
            return error, error.status

    def _count_error(self, exc: BaseException) -> str:
        kind = upstream_error_kind(exc)
        self._metrics.upstream_errors.labels(kind).inc()
        return kind

    def _error_response(self, exc: BaseException) -> web.Response:
        kind = self._count_error(exc)
        logger.warning("upstream error", extra={"fields": {"kind": kind, "error": repr(exc)[:300]}})
        resp = upstream_error(kind)
        if self._drain.triggered:
            resp.force_close()
        return resp

    async def _websocket(self, request: web.BaseRequest) -> tuple[web.StreamResponse, int]:
        session = self._session
        assert session is not None
        headers = request_headers(request.headers, client=request.remote)
        for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                     "Sec-WebSocket-Protocol", "Content-Length"):
            headers.popall(name, None)
        try:
            return await relay_websocket(
                request, session, self._url(request), headers,
                track=self.websockets,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if isinstance(exc, aiohttp.WSServerHandshakeError):
                resp = web.Response(status=exc.status, text=f"{exc.status} {exc.message}\n")
                return resp, exc.status
            resp = self._error_response(exc)
            return resp, resp.status


logger = logging.getLogger("sidecar")


def _log_access(request: web.BaseRequest, status: int, seconds: float) -> None:
    access_logger.info(
        "%s %s %d", request.method, request.raw_path, status,
        extra={"fields": {"method": request.method, "path": request.raw_path, "status": status,
                          "duration_ms": round(seconds * 1000, 3), "client": request.remote}},
    )

