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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = ("ClientServer",)

# Set on a request carrying an upgrade aiohttp does not support (``h2c``, anything but
# websocket).  It is not honoured: ``Upgrade`` is hop-by-hop and the request goes on
# as plain HTTP/1.1.  But aiohttp's C parser (3.14) drops whatever followed such a
# request in the same read, so the connection ends with its answer: a request
# pipelined behind it sees the close, unanswered and so never processed (RFC 9112
# 9.3.2: the client may retry it), instead of waiting for an answer that cannot come.
_LOST_TAIL = "sidecar.lost_tail"

logger = logging.getLogger("sidecar")

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 35\r\nConnection: close\r\n\r\nrequest head not received in time\r\n"
)


class ClientServer(web.Server):
    """``web.Server`` whose connections enforce the header timeout and refuse what
    cannot be forwarded (see the module docstring)."""

    def __init__(self, handler: _RequestHandler, *, header_timeout: float, **kwargs: Any) -> None:
        # The body is forwarded as the client sent it: decompressing it under the
        # client's Content-Length and Content-Encoding would let a gzip body inflate
        # into a second request (and corrupts every compressed upload).
        kwargs["auto_decompress"] = False
        super().__init__(self._guard, **kwargs)
        self._forward = handler
        self._header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return ClientConnection(self, loop=self._loop, header_timeout=self._header_timeout,
                                **self._kwargs)

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
        request = super()._make_request(message, payload, protocol, writer, task)
        if message.upgrade and not _supported_upgrade(message.headers.get("Upgrade", "")):
            request[_LOST_TAIL] = True
        return request

    async def _guard(self, request: web.BaseRequest) -> web.StreamResponse:
        reason = _not_forwardable(request)
        if reason is None:
            resp = await self._forward(request)
            if request.get(_LOST_TAIL):
                resp.force_close()
            return resp
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


def _supported_upgrade(upgrade: str) -> bool:
    """The upgrades aiohttp's parser hands over (the rest of the connection becomes the
    upgraded protocol's): only websocket is forwarded as one."""
    return upgrade.isascii() and upgrade.lower() in ("websocket", "tcp")


def _scheme(target: str) -> str | None:
    try:
        return URL(target).scheme
    except ValueError:
        return None


class ClientConnection(RequestHandler):
    """One client connection: aiohttp's handler plus the request-head deadline."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
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
