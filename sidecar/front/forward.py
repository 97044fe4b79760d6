"""Forwarding: one HTTP/1.1 request or websocket, streamed both ways, tracked as a Flight.

HTTP requests go to the app over the sidecar's own keep-alive pool (``upstream.pool``,
``.exchange``, ``.connection``: lean asyncio protocols, responses parsed by httptools);
websockets go through an aiohttp ``ClientSession``.  A request that arrives while the
sidecar is ``starting`` or ``closing`` is answered 503 here and never forwarded; once
admission has stopped, the connection ends with the answer it is given.
"""

from __future__ import annotations

import logging
from time import monotonic

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..config import Config
from ..drain import Drain, Flight
from ..log import log_access
from ..metrics import Metrics
from ..upstream.connection import UpstreamError
from ..upstream.exchange import Exchange, request_head
from ..upstream.pool import Pool
from ..upstream.reach import base_url, host_header, upstream_pool, websocket_session
from .headers import request_headers
from .listener import ClientConnection
from .responses import (
    ProxyResponse,
    describe_error,
    proxy_response,
    rejection,
    request_timeout,
    upstream_error,
    upstream_error_kind,
)
from .websocket import is_handshake, relay_websocket

__all__ = ("CLIENT_CLOSED", "Forwarder", "RequestFlight")

CLIENT_CLOSED = 499  # nginx's code for "client went away before the answer was complete"
# Idle pooled upstream connections are dropped before common app servers drop them
# (uvicorn 5 s, node 5 s), so a request is not sent on a socket the app is closing.
UPSTREAM_IDLE = 4.0

logger = logging.getLogger("sidecar")


class RequestFlight(Flight):
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


class Forwarder:
    """``handle()`` is the proxy port's request handler; ``open()`` and ``close()`` the
    upstream clients it forwards with (the pool, the websocket session)."""

    def __init__(self, config: Config, *, drain: Drain, metrics: Metrics) -> None:
        self._config = config
        self._drain = drain
        self._metrics = metrics
        up = config.upstream
        self._base = base_url(up)
        self._exchange_timeout = up.timeout or None
        self._host = host_header(up)
        self._pool: Pool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retry_after = str(config.drain.retry_after)
        self._access_log = config.logging.access_log
        self.websockets: set[web.WebSocketResponse] = set()

    def open(self) -> None:
        up = self._config.upstream
        self._pool = upstream_pool(up, idle_timeout=UPSTREAM_IDLE)
        self._session = websocket_session(up, idle_timeout=UPSTREAM_IDLE)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        drain = self._drain
        if not drain.forwarding:
            return self._reject(request, "draining" if drain.triggered else "starting")

        started = monotonic()  # not loop.time(): uvloop's clock ticks in whole milliseconds
        flight = RequestFlight(request, started)
        drain.add(flight)
        status = CLIENT_CLOSED
        resp: web.StreamResponse | None = None
        try:
            if is_handshake(request):
                resp, status = await self._websocket(request)
            else:
                resp, status = await self._forward(request)
            return resp
        finally:
            drain.done(flight)
            if not drain.admitting and resp is not None and not _queued(request):
                # Admission has stopped: the connection ends with this response.
                resp.force_close()
            elapsed = monotonic() - started
            self._metrics.request_done(request.method, status, elapsed)
            if self._access_log:
                log_access(request.method, request.raw_path, status, elapsed, request.remote)

    def _reject(self, request: web.BaseRequest, reason: str) -> web.Response:
        if reason == "draining":
            self._metrics.rejected_draining.inc()
            self._drain.rejected()
        else:
            self._metrics.rejected_starting.inc()
        self._metrics.request_done(request.method, 503, 0.0)  # answered, so counted too
        if self._access_log:
            log_access(request.method, request.raw_path, 503, 0.0, request.remote)
        return rejection(reason, self._retry_after)

    def _target(self, request: web.BaseRequest) -> str:
        target = request.raw_path
        if not target.startswith("/"):  # absolute-form request target
            target = URL(target).raw_path_qs
        return target

    def _url(self, request: web.BaseRequest) -> URL:
        return URL(self._base + self._target(request), encoded=True)

    async def _forward(self, request: web.BaseRequest) -> tuple[web.StreamResponse, int]:
        pool = self._pool
        assert pool is not None
        body = None
        if request.body_exists:
            body = request.content
            if (request.headers.get("Expect", "").lower() == "100-continue"
                    and request.version >= aiohttp.HttpVersion11):  # RFC 9110 15.2: no 1xx to 1.0
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        method = request.method
        received = request.headers
        has_length = "Content-Length" in received
        head = request_head(
            method, self._target(request), request_headers(received, client=request.remote),
            host=None if "Host" in received else self._host, body=body is not None,
            has_length=has_length,
        )
        chunked = body is not None and not has_length
        exchange = Exchange(pool, timeout=self._exchange_timeout)
        resp: ProxyResponse | None = None
        try:
            up = await exchange.send(head, body, chunked=chunked, head_only=method == "HEAD")
            resp = proxy_response(request, up)
            if self._drain.triggered:
                resp.force_close()
            await exchange.relay(resp)
            return resp, up.status
        except UpstreamError as exc:
            if exc.kind == "client_timeout":  # the client, not the app, is the slow party
                logger.info("client timeout", extra={"fields": {"error": str(exc)}})
                if resp is not None and resp.prepared:
                    _cut(request)
                    return resp, resp.status
                return request_timeout(), 408
            if resp is None or not resp.prepared:
                error = self._error_response(exc)
                return error, error.status
            # Headers are out: cut the connection so the client never takes a truncated
            # body for a complete one.
            self._upstream_failed(exc)
            _cut(request)
            return resp, resp.status
        except aiohttp.ClientConnectionResetError:  # the client went away during the answer
            if resp is None:
                raise
            _cut(request)
            return resp, CLIENT_CLOSED
        finally:
            exchange.close()  # a no-op after a complete exchange; else the app sees a disconnect

    def _upstream_failed(self, exc: BaseException) -> str:
        """Count and log a failed exchange; return its kind."""
        kind = upstream_error_kind(exc)
        self._metrics.upstream_errors.labels(kind).inc()
        error = describe_error(exc, self._exchange_timeout or 0.0)[:300]
        logger.warning("upstream error", extra={"fields": {"kind": kind, "error": error}})
        return kind

    def _error_response(self, exc: BaseException) -> web.Response:
        resp = upstream_error(self._upstream_failed(exc), exc)
        if self._drain.triggered:
            resp.force_close()
        return resp

    async def _websocket(self, request: web.BaseRequest) -> tuple[web.StreamResponse, int]:
        session = self._session
        assert session is not None
        headers = CIMultiDict(request_headers(request.headers, client=request.remote))
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


def _queued(request: web.BaseRequest) -> bool:
    """A pipelined request waits behind this one on its connection."""
    conn = request.protocol
    return isinstance(conn, ClientConnection) and conn.state.queued


def _cut(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
