"""The proxy port's client connections: aiohttp's server, set up for clients that misbehave.

aiohttp parses every request (strictly: conflicting or duplicate framing headers,
bad chunk sizes, obsolete line folding, NUL or bare CR in a header, a request line or
header over 8 KiB and more than 128 headers are all answered 400 and the connection is
closed).  This module adds what a reverse proxy needs on top, without parsing anything:

- ``client.header_timeout``: a request head must be complete within this long of the
  connection opening, or of the first byte of the next request on a kept-alive
  connection (nginx ``client_header_timeout``, Envoy ``request_headers_timeout``).  A
  client that sent part of a head gets 408 and the connection is closed; one that sent
  nothing is closed quietly, as HAProxy does, since it may be a pre-connect.
- ``client.idle_timeout``: aiohttp's keep-alive timeout.
- Requests that parse but cannot be forwarded are answered 400 and never reach the app:
  ``CONNECT`` (this is not a forward proxy), the ``*`` target, and transfer codings
  other than ``chunked`` (the app would get a body it cannot decode).
- An absolute-form target (``GET http://host/path``) is forwarded in origin form with
  ``Host`` set to the target's authority, as RFC 9112 section 3.2.2 requires.
- A malformed request is one ``bad request`` log line at info level, not an error
  with a traceback: clients on the internet send garbage, the sidecar is fine.
- A connection that opens with the HTTP/2 preface (prior knowledge, RFC 9113 §3.3) is
  handed to ``h2`` before aiohttp parses a byte: only a connection's first bytes are
  looked at, so the cost per HTTP/1.1 request is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .h2wire import PREFACE

__all__ = ("ClientServer", "H2HandOff")

# Takes over a connection that opened with the HTTP/2 preface: (transport, bytes read, client).
H2HandOff = Callable[[asyncio.Transport, bytes, "str | None"], None]

logger = logging.getLogger("sidecar")

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 35\r\nConnection: close\r\n\r\nrequest head not received in time\r\n"
)


class ClientServer(web.Server):
    """``web.Server`` whose connections enforce the header timeout and refuse what
    cannot be forwarded (see the module docstring)."""

    def __init__(self, handler: _RequestHandler, *, header_timeout: float,
                 h2: H2HandOff | None = None, **kwargs: Any) -> None:
        super().__init__(self._guard, **kwargs)
        self._forward = handler
        self._header_timeout = header_timeout
        self._h2 = h2

    def __call__(self) -> RequestHandler:
        return ClientConnection(self, loop=self._loop, header_timeout=self._header_timeout,
                                h2=self._h2, **self._kwargs)

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        authority = message.url.host_port_subcomponent if message.url.absolute else None
        if authority:  # absolute form: the target's authority wins over any Host header
            headers = CIMultiDict(message.headers)
            headers["Host"] = authority
            message = message._replace(headers=CIMultiDictProxy(headers))
        return super()._make_request(message, payload, protocol, writer, task)

    async def _guard(self, request: web.BaseRequest) -> web.StreamResponse:
        reason = _not_forwardable(request)
        if reason is None:
            return await self._forward(request)
        _log_bad_request(request.remote, 400, reason)
        resp = web.Response(status=400, text=f"400 Bad Request: {reason}\n")
        resp.force_close()  # what follows on the connection (a tunnel, a body) is not HTTP
        return resp


def _not_forwardable(request: web.BaseRequest) -> str | None:
    if request.method == "CONNECT":
        return "CONNECT is not supported (this is a reverse proxy)"
    target = request.raw_path
    if not target.startswith("/") and _scheme(target) not in ("http", "https"):
        return f"the request target {target[:50]!r} cannot be forwarded"
    codings = [c.strip().lower() for value in request.headers.getall("Transfer-Encoding", ())
               for c in value.split(",")]
    if codings and codings != ["chunked"]:
        return "only Transfer-Encoding: chunked is supported"
    return None


def _scheme(target: str) -> str | None:
    try:
        return URL(target).scheme
    except ValueError:
        return None


class ClientConnection(RequestHandler):
    """One client connection: aiohttp's handler plus the request-head deadline."""

    def __init__(self, manager: web.Server, *, header_timeout: float,
                 h2: H2HandOff | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._h2 = h2
        self._first: bytes | None = b"" if h2 is not None else None  # until told h2 or not
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes received while the head deadline runs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()  # a new connection owes us a request head

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._first is not None:  # the connection's first bytes: HTTP/2 or HTTP/1.1?
            data = self._sniff(data)
            if not data:
                return
        heads = self._request_count
        waiting = self._waiter is not None and not self._waiter.done()  # idle between requests
        super().data_received(data)
        if self._request_count != heads:  # a complete head (or a parse error) arrived
            self._disarm_head_timer()
        elif self._head_timer is not None:
            self._head_bytes += len(data)
        elif waiting and data:  # the first byte of the next request on a kept-alive connection
            self._arm_head_timer()
            self._head_bytes = len(data)

    def _sniff(self, data: bytes) -> bytes:
        """Return what aiohttp is to parse: nothing while the bytes could still be the
        HTTP/2 preface (which may come in pieces), and nothing once it came whole, since
        the connection is then handed over (aiohttp forgets it through its own
        ``connection_lost``, with the transport taken away so it is not closed)."""
        assert self._first is not None
        seen = self._first + data
        if seen[:len(PREFACE)] != PREFACE[:len(seen)]:
            self._first = None
            return seen
        if len(seen) < len(PREFACE):
            self._first = seen
            return b""
        self._first = None
        transport, peer = cast(asyncio.Transport, self.transport), _peer(self.peername)
        assert transport is not None and self._h2 is not None
        self.transport = None
        self.connection_lost(None)
        self._h2(transport, seen, peer)
        return b""

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = 0
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        if self._head_bytes:
            logger.info("request head timeout", extra={"fields": {
                "client": _peer(self.peername), "bytes": self._head_bytes,
                "header_timeout": self._header_timeout}})
            self.transport.write(_TIMEOUT_408)
        self.force_close()  # transport.close() sends what is buffered first

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            _log_bad_request(_peer(self.peername), exc.code, exc.message)
        else:  # a real bug: keep aiohttp's error line with its traceback
            super().log_exception(*args, **kwargs)


def _peer(peername: Any) -> str | None:
    return str(peername[0]) if isinstance(peername, tuple) else None


def _log_bad_request(client: str | None, status: int, reason: str) -> None:
    logger.info("bad request", extra={"fields": {
        "client": client, "status": status, "reason": str(reason)[:200]}})
