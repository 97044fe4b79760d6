"""One request to the app and its response, over a pooled connection.

The request head is serialized once into bytes.  A body that is already fully
received leaves in the same write as the head; any other body is streamed by a
task, with flow control both ways (the client's side is aiohttp's
``StreamReader``, the app's side ``Connection.drain()``), while the response is
awaited: an app may answer before it has read the whole body.  A body without a
Content-Length (the client sent it chunked) is sent chunked.

The head waits for the first body byte: a client that announces a body and sends
none never reaches the app.  When ``upstream.timeout`` fires while the exchange is
waiting for the *client's* body (not for the app to read it), the failure is of
kind ``client_timeout``: the client is the slow party and gets 408, not a 504.

``relay()`` streams the answer into the client's response.  ``close()`` must
follow every exchange: the connection goes back to the pool
only after a complete response with the whole request sent; in every other case
(an error, a timeout, a cancellation by the drain or by a client that went away)
it is closed, so the app sees the disconnect at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiohttp import StreamReader, web

from .connection import Connection, UpstreamError
from .pool import Pool

__all__ = ("Exchange", "request_head")

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


def request_head(
    method: str, target: str, headers: Iterable[tuple[str, str]], *, host: str | None,
    body: bool, has_length: bool,
) -> bytes:
    """The request line and headers; ``host`` (when the client sent none) and the body's
    framing are added."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend([f"{name}: {value}" for name, value in headers])
    if host is not None:
        lines.append(f"Host: {host}")
    if body and not has_length:
        lines.append("Transfer-Encoding: chunked")
    elif not body and not has_length and method in _BODY_METHODS:
        lines.append("Content-Length: 0")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


class Exchange:
    """``send()`` one request, ``relay()`` its response, and always ``close()``."""

    __slots__ = ("_awaiting_client", "_expired", "_pool", "_sender", "_timeout", "_timer", "conn")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.conn: Connection | None = None
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._expired = False
        self._awaiting_client = False  # blocked on the client's request body

    async def send(
        self, head: bytes, body: StreamReader | None, *, chunked: bool, head_only: bool,
        timeout: float | None, task: asyncio.Task[Any],
    ) -> Connection:
        """Send the request; return the connection once the response head is in.

        ``timeout`` bounds the whole exchange, until ``close()``, with one timer: when
        it fires, the exchange fails with an ``UpstreamError`` of kind ``timeout``
        (``task``, the caller, is cancelled if it is still waiting for a connection).
        """
        if timeout is not None:
            self._timeout = timeout
            self._timer = task.get_loop().call_later(timeout, self._expire, task)
        data = b""
        try:
            if body is not None:
                data = body.read_nowait()
                if not data and not body.at_eof():  # the head waits for the body to start
                    self._awaiting_client = True
                    data = await body.readany()
                    self._awaiting_client = False
            conn = self.conn = await self._pool.acquire()
        except asyncio.CancelledError:
            if self._expired and task.uncancel() == 0:
                raise self._timeout_error() from None
            raise
        conn.begin(head_only=head_only)
        if body is None:
            conn.write(head)
        elif body.at_eof():  # all here already: one write
            conn.write(head + _frame(data, chunked) + (b"0\r\n\r\n" if chunked else b""))
        else:
            conn.write(head + _frame(data, chunked))
            self._sender = asyncio.ensure_future(self._send_body(conn, body, chunked))
        await conn.response_head()
        return conn

    async def relay(self, request: web.BaseRequest, resp: web.StreamResponse) -> None:
        """Stream the response body to the client; the head leaves with the first bytes."""
        conn = self.conn
        assert conn is not None
        writer = await resp.prepare(request)  # the head waits for the first body bytes
        chunk = conn.read_nowait()
        if conn.complete:  # the whole body is here: one write for head and body
            self.close()
            await resp.write_eof(chunk)
            return
        if chunk:
            await resp.write(chunk)
        elif writer is not None:  # a stream with nothing to say yet: the head goes now
            writer.send_headers()
        while chunk := await conn.read():
            await resp.write(chunk)
        self.close()  # before the last write: the connection serves the next request sooner
        await resp.write_eof()

    def close(self) -> None:
        """Return the connection to the pool if the exchange completed cleanly, else close it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        sender = self._sender
        sent = sender is None or (sender.done() and not sender.cancelled())
        if sender is not None and not sender.done():
            sender.cancel()
        self._pool.release(conn, reuse=sent and conn.at_eof)

    def _expire(self, task: asyncio.Task[Any]) -> None:
        self._timer = None
        if self.conn is not None:
            self.conn.fail(self._timeout_error())
        else:  # still waiting for a connection
            self._expired = True
            task.cancel()

    def _timeout_error(self) -> UpstreamError:
        if self._awaiting_client:
            return UpstreamError("client_timeout",
                                 f"the client sent no more of its request within {self._timeout:g}s")
        return UpstreamError("timeout", f"no complete answer within {self._timeout:g}s")

    async def _send_body(self, conn: Connection, body: StreamReader, chunked: bool) -> None:
        try:
            while True:
                self._awaiting_client = True
                data = await body.readany()
                self._awaiting_client = False
                if not data:
                    break
                conn.write(_frame(data, chunked))
                await conn.drain()
            if chunked:
                conn.write(b"0\r\n\r\n")
        except UpstreamError:
            pass  # the connection failed: the reader of the response raises it
        except Exception as exc:  # noqa: BLE001 - the client's body broke off: the exchange ends
            conn.fail(UpstreamError("reset", f"request body not received in full: {exc}"))


def _frame(data: bytes, chunked: bool) -> bytes:
    if not chunked or not data:
        return data
    return b"%x\r\n%b\r\n" % (len(data), data)
