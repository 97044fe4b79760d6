"""One request to the app and its response, over a pooled connection.

The request head is serialized once into bytes.  A body that is already fully
received leaves in the same write as the head; any other body is streamed by a
task, with flow control both ways (the client's side is the ``Body``'s, the app's
side ``Connection.drain()``), while the response is awaited: an app may answer
before it has read the whole body.  A body without a Content-Length (the client
sent it chunked) is sent chunked.

The head waits for the first body byte: a client that announces a body and sends
none never reaches the app.  The caller bounds the whole exchange (``upstream.timeout``)
with ``asyncio.timeout``; when it fires, ``timeout_error()`` tells whether the exchange
was waiting for the *client's* body (kind ``client_timeout``: the client is the slow
party and gets 408, not a 504) or for the app.

``relay()`` streams the answer into a ``Sink`` (the client's response).  ``close()``
must follow every exchange: the connection goes back to the pool only after a
complete response with the whole request sent; in every other case (an error, a
timeout, a cancellation by the drain or by a client that went away) it is closed, so
the app sees the disconnect at once.

Neither side is an aiohttp type: ``Body`` is what aiohttp's ``StreamReader`` offers and
``Sink`` what the front side's response offers (``front.responses.ProxyResponse``), so the upstream leg is tested
in-process with plain objects (tests/test_upstream_leg.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Protocol, TypeVar

from .connection import Connection, Response, UpstreamError
from .pool import Pool

__all__ = ("Body", "Exchange", "Sink", "request_head")

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
T = TypeVar("T")


class Body(Protocol):
    """A request body as it arrives from the client (aiohttp's ``StreamReader`` is one)."""

    def read_nowait(self) -> bytes: ...
    def at_eof(self) -> bool: ...
    async def readany(self) -> bytes: ...


class Sink(Protocol):
    """Where the response goes: its head is held until the first body bytes."""

    async def start(self) -> None:
        """Prepare the head (not sent yet)."""

    def flush_head(self) -> None:
        """Send the head now: a stream with nothing to say yet."""

    async def write(self, data: bytes) -> None: ...

    async def finish(self, data: bytes = b"") -> None:
        """The last bytes and the end of the response."""


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

    __slots__ = ("_deadline", "_pool", "_sender", "_timeout", "_timer", "awaiting_client", "conn")

    def __init__(self, pool: Pool, *, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.conn: Connection | None = None
        self._sender: asyncio.Task[None] | None = None
        self.awaiting_client = False  # blocked on the client's request body

    async def send(self, head: bytes, body: Body | None, *, chunked: bool,
                   head_only: bool) -> Response:
        """Send the request; return the response once its head is in."""
        loop = self._pool.loop
        if self._timeout is not None:
            self._deadline = loop.time() + self._timeout
        data = b""
        if body is not None:
            data = body.read_nowait()
            if not data and not body.at_eof():  # the head waits for the body to start
                self.awaiting_client = True
                data = await self._bounded(body.readany())
                self.awaiting_client = False
        conn = self._pool.acquire_idle()
        if conn is None:
            conn = await self._bounded(self._pool.acquire())
        self.conn = conn
        if self._deadline is not None:
            self._timer = loop.call_at(self._deadline, self._expire)
        conn.begin(head_only=head_only)
        if body is None:
            conn.write(head)
        elif body.at_eof():  # all here already: one write
            conn.write(head + _frame(data, chunked) + (b"0\r\n\r\n" if chunked else b""))
        else:
            conn.write(head + _frame(data, chunked))
            self._sender = asyncio.ensure_future(self._send_body(conn, body, chunked))
        return await conn.response_head()

    async def relay(self, sink: Sink) -> None:
        """Stream the response body to the client; the head leaves with the first bytes."""
        conn = self.conn
        assert conn is not None
        await sink.start()
        chunk = conn.read_nowait()
        if conn.response.complete:  # the whole body is here: one write for head and body
            self.close()
            await sink.finish(chunk)
            return
        if chunk:
            await sink.write(chunk)
        else:  # a stream with nothing to say yet: the head goes now
            sink.flush_head()
        while chunk := await conn.read():
            await sink.write(chunk)
        self.close()  # before the last write: the connection serves the next request sooner
        await sink.finish()

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

    async def _bounded(self, wait: Awaitable[T]) -> T:
        """``wait`` within the exchange's deadline; past it, an ``UpstreamError``."""
        try:
            async with asyncio.timeout_at(self._deadline):
                return await wait
        except TimeoutError:
            raise self.timeout_error() from None

    def _expire(self) -> None:
        self._timer = None
        if self.conn is not None:
            self.conn.fail(self.timeout_error())

    def timeout_error(self) -> UpstreamError:
        """What an exchange cut by ``upstream.timeout`` failed with, and whose fault it was."""
        timeout = self._timeout or 0.0
        if self.awaiting_client:
            return UpstreamError("client_timeout",
                                 f"the client sent no more of its request within {timeout:g}s")
        return UpstreamError("timeout", f"no complete answer within {timeout:g}s")

    async def _send_body(self, conn: Connection, body: Body, chunked: bool) -> None:
        try:
            while True:
                self.awaiting_client = True
                data = await body.readany()
                self.awaiting_client = False
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
