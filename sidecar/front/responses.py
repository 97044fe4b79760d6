"""What the sidecar itself puts on the wire: the proxied response's head, and its own
short plain-text answers (503 while starting or draining, 502/504 for upstream failures).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from ..upstream.connection import NotHTTP, Response, UpstreamError
from .headers import response_headers

__all__ = (
    "FaithfulHeadResponse", "ProxyResponse", "describe_error", "proxy_response", "rejection",
    "request_timeout", "upstream_error", "upstream_error_kind",
)


class ProxyResponse(web.StreamResponse):
    """The app's response on its way to the client: adds nothing the upstream did not send
    but Date, and is the exchange's ``Sink`` (``start``, ``flush_head``, ``write``,
    ``finish``) with no object in between.

    aiohttp fills in ``Content-Type: application/octet-stream`` and its own
    ``Server`` when they are missing; a proxy must pass the upstream's headers as
    they are.  The head is held until the first body bytes so that both leave in
    one write (``flush_head`` sends it at once for a stream that has nothing yet).
    ``codings`` are the app's transfer codings other than chunked (a body still coded):
    the client is told ``Transfer-Encoding: <codings>, chunked``.

    Header bytes that are not UTF-8 (obs-text, a latin-1 ``filename="r\xe9sum\xe9"``)
    arrive as surrogate escapes; aiohttp's serializer writes UTF-8 and drops those, so
    such a head is written by ``FaithfulHeadResponse``, byte for byte (``proxy_response``
    picks the class: the ASCII head of almost every response pays nothing for it).

    The one place the sidecar touches aiohttp's private names, on purpose: aiohttp has
    no public way to (1) not add ``Content-Type``/``Server`` (``_prepare_headers``),
    (2) hold the head for the first body bytes (``_send_headers_immediately``), or
    (3) write header bytes that are not UTF-8 (``_write_headers`` and the writer's
    ``_headers_buf``).  The alternative is to own the whole
    HTTP/1.1 response writer (framing, keep-alive, HEAD/1xx/204/304 rules) beside
    aiohttp's; CI runs the suite on the floor and the newest aiohttp the range allows
    (``.ci/run``), and tests/test_framing.py fails if any of the three stops working.
    """

    _send_headers_immediately = False

    def __init__(self, request: web.BaseRequest, status: int, reason: str,
                 headers: list[tuple[str, str]], codings: str | None) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._client = request
        self._writer: AbstractStreamWriter | None = None
        self.codings = codings

    # --- the exchange's Sink ---------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the head; it leaves with the first body bytes."""
        self._writer = await self.prepare(self._client)

    def flush_head(self) -> None:
        if self._writer is not None:
            self._writer.send_headers()

    finish = web.StreamResponse.write_eof  # the last bytes and the end, in one write

    # --- aiohttp's hooks -------------------------------------------------------------------

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


class FaithfulHeadResponse(ProxyResponse):
    """A ``ProxyResponse`` whose head has bytes over 0x7f: written byte for byte."""

    async def _write_headers(self) -> None:
        await super()._write_headers()
        # aiohttp has validated the head (no CR/LF) and buffered its UTF-8 form without
        # the escaped bytes: put the faithful bytes in its place (aiohttp has no hook).
        writer, version = self._client.writer, self._client.version
        lines = [f"HTTP/{version[0]}.{version[1]} {self.status} {self.reason}",
                 *(f"{k}: {v}" for k, v in self.headers.items())]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        assert isinstance(writer, StreamWriter) and writer._headers_buf is not None
        writer._headers_buf = head


def proxy_response(request: web.BaseRequest, up: Response) -> ProxyResponse:
    """The client's response to the app's ``up``: its status, reason and end-to-end headers."""
    headers, codings = response_headers(up.headers)
    cls = ProxyResponse if up.ascii_head else FaithfulHeadResponse
    return cls(request, up.status, up.reason, headers, codings)


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
