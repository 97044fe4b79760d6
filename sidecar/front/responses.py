"""What the sidecar itself puts on the wire: the proxied response's head, and its own
short plain-text answers (503 while starting or draining, 502/504 for upstream failures).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from ..upstream.connection import NotHTTP, UpstreamError

__all__ = (
    "ClientSink", "ProxyResponse", "describe_error", "rejection", "request_timeout", "upstream_error",
    "upstream_error_kind",
)


class ProxyResponse(web.StreamResponse):
    """A response that adds nothing the upstream did not send but Date.

    aiohttp fills in ``Content-Type: application/octet-stream`` and its own
    ``Server`` when they are missing; a proxy must pass the upstream's headers as
    they are.  The head is held until the first body bytes so that both leave in
    one write (``_forward`` flushes it at once for a stream that has nothing yet).

    Header bytes that are not UTF-8 (obs-text, a latin-1 ``filename="r\xe9sum\xe9"``)
    arrive as surrogate escapes; aiohttp's serializer writes UTF-8 and drops those,
    so a head that has any is serialized here, byte for byte.  ``codings`` are the
    app's transfer codings other than chunked (a body still coded): the client is
    told ``Transfer-Encoding: <codings>, chunked``.

    The one place the sidecar touches aiohttp's private names, on purpose: aiohttp has
    no public way to (1) not add ``Content-Type``/``Server`` (``_prepare_headers``),
    (2) hold the head for the first body bytes (``_send_headers_immediately``), or
    (3) write header bytes that are not UTF-8 (``_write_headers``, ``_payload_writer``,
    ``_req`` and the writer's ``_headers_buf``).  The alternative is to own the whole
    HTTP/1.1 response writer (framing, keep-alive, HEAD/1xx/204/304 rules) beside
    aiohttp's; CI runs the suite on the floor and the newest aiohttp the range allows
    (``.ci/run``), and tests/test_framing.py fails if any of the three stops working.
    """

    _send_headers_immediately = False
    codings: str | None = None

    async def _prepare_headers(self) -> None:
        headers = self.headers
        had_type = "Content-Type" in headers
        had_server = "Server" in headers
        await super()._prepare_headers()
        if not had_type:
            headers.pop("Content-Type", None)
        if not had_server:
            headers.pop("Server", None)
        if self.codings and headers.get("Transfer-Encoding") == "chunked":
            headers["Transfer-Encoding"] = f"{self.codings}, chunked"

    async def _write_headers(self) -> None:
        await super()._write_headers()
        if self.reason.isascii() and "".join(self.headers.values()).isascii():
            return
        # aiohttp has validated the head (no CR/LF) and buffered its UTF-8 form without
        # the escaped bytes: put the faithful bytes in its place (aiohttp has no hook).
        writer = self._payload_writer
        version = self._req.version if self._req is not None else (1, 1)
        lines = [f"HTTP/{version[0]}.{version[1]} {self.status} {self.reason}",
                 *(f"{k}: {v}" for k, v in self.headers.items())]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        assert isinstance(writer, StreamWriter) and writer._headers_buf is not None
        writer._headers_buf = head


class ClientSink:
    """The client's side of an exchange (``upstream.exchange.Sink``): the proxied response
    on aiohttp's writer."""

    __slots__ = ("_request", "_resp", "_writer")

    def __init__(self, request: web.BaseRequest, resp: web.StreamResponse) -> None:
        self._request = request
        self._resp = resp
        self._writer: AbstractStreamWriter | None = None

    async def start(self) -> None:
        self._writer = await self._resp.prepare(self._request)  # the head waits for the body

    def flush_head(self) -> None:
        if self._writer is not None:
            self._writer.send_headers()

    async def write(self, data: bytes) -> None:
        await self._resp.write(data)

    async def finish(self, data: bytes = b"") -> None:
        await self._resp.write_eof(data)


def rejection(reason: str, retry_after: str) -> web.Response:
    """503 for a request that is not forwarded; the connection ends with it."""
    if reason == "draining":
        text = "503 the server is shutting down; retry on another connection\n"
    else:  # starting: the app is not healthy yet
        text, retry_after = "503 the upstream is not ready yet\n", "1"
    resp = web.Response(status=503, text=text, headers={"Retry-After": retry_after})
    resp.force_close()
    return resp


def upstream_error_kind(exc: BaseException) -> str:
    """``connect`` (refused, unreachable), ``timeout`` or ``reset`` (closed mid-exchange)."""
    if isinstance(exc, UpstreamError):
        return exc.kind
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return "connect"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "reset"


def describe_error(exc: BaseException, timeout: float) -> str:
    """A short human message for the log (not a Python repr)."""
    if isinstance(exc, UpstreamError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):  # the websocket leg's client
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {reason.lower()}"
    if isinstance(exc, TimeoutError):
        return f"no complete answer within {timeout:g}s"
    return str(exc) or type(exc).__name__


_UPSTREAM_ERRORS = {
    "connect": (502, "502 upstream unreachable\n"),
    "timeout": (504, "504 upstream timed out\n"),
    "reset": (502, "502 upstream closed the connection\n"),
}


def request_timeout() -> web.Response:
    """408 for a client whose request body stopped arriving; the connection ends with it."""
    resp = web.Response(status=408, text="408 the request body did not arrive in time\n")
    resp.force_close()
    return resp


def upstream_error(kind: str, exc: BaseException | None = None) -> web.Response:
    status, text = _UPSTREAM_ERRORS[kind]
    if isinstance(exc, NotHTTP):  # a port that is not HTTP: say so, it is a deploy mistake
        text = f"502 {exc.what}\n"
    return web.Response(status=status, text=text)
