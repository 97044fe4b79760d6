"""What the sidecar itself puts on the wire: the proxied response's head, and its own
short plain-text answers (503 while starting or draining, 502/504 for upstream failures).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from ..upstream.connection import NotHTTP, UpstreamError

__all__ = (
    "ProxyResponse", "describe_error", "rejection", "request_timeout", "upstream_error",
    "upstream_error_kind",
)


class ProxyResponse(web.StreamResponse):
    """A response that adds nothing the upstream did not send but Date.

    aiohttp fills in ``Content-Type: application/octet-stream`` and its own
    ``Server`` when they are missing; a proxy must pass the upstream's headers as
    they are.  The head is held until the first body bytes so that both leave in
    one write (``_forward`` flushes it at once for a stream that has nothing yet).
    """

    _send_headers_immediately = False

    async def _prepare_headers(self) -> None:
        headers = self.headers
        had_type = "Content-Type" in headers
        had_server = "Server" in headers
        await super()._prepare_headers()
        if not had_type:
            headers.pop("Content-Type", None)
        if not had_server:
            headers.pop("Server", None)


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
