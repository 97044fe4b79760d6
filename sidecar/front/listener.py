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
- Request bodies are not decompressed (``auto_decompress`` off): a proxy forwards the
  body bytes as received.  Upgrades other than websocket end the connection after
  their answer (see ``_LOST_TAIL``).
- A malformed request is one ``bad request`` log line at info level, not an error
  with a traceback: clients on the internet send garbage, the sidecar is fine.
- A connection that opens with the HTTP/2 preface (prior knowledge, RFC 9113 §3.3) is
  handed to ``h2`` before aiohttp parses a byte: only a connection's first bytes are
  looked at, so the cost per HTTP/1.1 request is unchanged.

Only aiohttp's public surface is used: ``web.Server`` with ``request_factory=``, our own
protocol factory (``ClientServer`` is what ``loop.create_server`` calls), and
``RequestHandler``'s public methods.  What the drain must know of each connection (has it
carried a request, is one being handled, is a complete head waiting) is a
``ConnectionState`` that the connection owns, fed by ``data_received``, the request
factory and the handler's ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .h2wire import PREFACE
from .state import ConnectionState

__all__ = ("ClientConnection", "ClientServer", "H2HandOff")

# Takes over a connection that opened with the HTTP/2 preface: (transport, bytes read, client).
H2HandOff = Callable[[asyncio.Transport, bytes, "str | None"], None]

# Set on a request carrying an upgrade aiohttp does not support (``h2c``, anything but
# websocket).  It is not honoured: ``Upgrade`` is hop-by-hop and the request goes on
# as plain HTTP/1.1.  But aiohttp's C parser (3.14) drops whatever followed such a
# request in the same read, so the connection ends with its answer: a request
# pipelined behind it sees the close, unanswered and so never processed (RFC 9112
# 9.3.2: the client may retry it), instead of waiting for an answer that cannot come.
_LOST_TAIL = "sidecar.lost_tail"

logger = logging.getLogger("sidecar")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 35\r\nConnection: close\r\n\r\nrequest head not received in time\r\n"
)


class ClientServer:
    """The protocol factory of the proxy port: each connection is a ``ClientConnection``
    of one ``web.Server`` whose request factory and handler keep ``ConnectionState``
    current and refuse what cannot be forwarded (see the module docstring)."""

    def __init__(self, handler: Handler, *, header_timeout: float, keepalive_timeout: float,
                 h2: H2HandOff | None = None, handler_cancellation: bool = True) -> None:
        self._forward = handler
        self._h2 = h2
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._loop = asyncio.get_running_loop()
        self.server = web.Server(self._guard, request_factory=self._build_request,
                                 handler_cancellation=handler_cancellation)

    @property
    def connections(self) -> list[web.RequestHandler]:
        return self.server.connections

    def __call__(self) -> ClientConnection:
        # auto_decompress off: the body is forwarded as the client sent it; decompressing it
        # under the client's Content-Length and Content-Encoding would let a gzip body
        # inflate into a second request (and corrupts every compressed upload).
        return ClientConnection(self.server, loop=self._loop, header_timeout=self._header_timeout,
                                keepalive_timeout=self._keepalive_timeout, access_log=None,
                                auto_decompress=False, h2=self._h2)

    def _build_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, ClientConnection):
            protocol.request_started()
        authority = message.url.host_port_subcomponent if message.url.absolute else None
        if authority:  # absolute form: the target's authority wins over any Host header
            headers = CIMultiDict(message.headers)
            headers["Host"] = authority
            message = message._replace(headers=CIMultiDictProxy(headers))  # a NamedTuple's
        request = web.BaseRequest(message, payload, protocol, writer, task, self._loop)
        if message.upgrade and not _supported_upgrade(message.headers.get("Upgrade", "")):
            request[_LOST_TAIL] = True
        return request

    async def _guard(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            reason = _not_forwardable(request)
            if reason is None:
                resp = await self._forward(request)
                if "Upgrade" in request.headers and request.get(_LOST_TAIL):  # Mapping.get is slow
                    resp.force_close()
            else:
                _log_bad_request(request.remote, 400, reason)
                resp = web.Response(status=400, text=f"400 Bad Request: {reason}\n")
                resp.force_close()  # what follows on the connection (a tunnel, a body) is not HTTP
            if not resp.prepared:  # written here, so the request ends when its answer is out
                await resp.prepare(request)
                await resp.write_eof()
            return resp
        finally:
            protocol = request.protocol
            if isinstance(protocol, ClientConnection):
                protocol.state.in_request = False


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


def _supported_upgrade(upgrade: str) -> bool:
    """The upgrades aiohttp's parser hands over (the rest of the connection becomes the
    upgraded protocol's): only websocket is forwarded as one."""
    return upgrade.isascii() and upgrade.lower() in ("websocket", "tcp")


def _scheme(target: str) -> str | None:
    try:
        return URL(target).scheme
    except ValueError:
        return None


class ClientConnection(web.RequestHandler):
    """One client connection: aiohttp's handler, its ``ConnectionState`` and the
    request-head deadline."""

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop,
                 header_timeout: float, h2: H2HandOff | None = None, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self.state = ConnectionState()
        self._h2 = h2
        self._first: bytes | None = b"" if h2 is not None else None  # until told h2 or not
        self._timer_loop = loop
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
        state = self.state
        heads, idle = state.heads, not state.busy and not state.receiving_head
        state.feed(data)  # before aiohttp wakes the handler: the head is known as it is parsed
        super().data_received(data)
        if state.heads != heads:  # a complete head (or a malformed one) arrived
            self._disarm_head_timer()
        elif self._head_timer is not None:
            self._head_bytes += len(data)
        elif idle and state.requests and data:  # the first bytes of the next request
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

    def request_started(self) -> None:
        """The request factory ran: a request's handling begins."""
        state = self.state
        state.requests += 1
        state.in_request = True
        state.heads = max(state.heads, state.requests)  # one llhttp did not see whole (a 400)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = 0
        self._head_timer = self._timer_loop.call_later(self._header_timeout, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.state.busy or self.transport is None:
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
