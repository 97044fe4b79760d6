"""One HTTP/1.1 connection to the app, as an asyncio protocol: one exchange at a time.

The response is parsed by llhttp through ``httptools``; nothing is parsed by hand.
The exchange that owns the connection calls ``begin()``, which gives it a fresh
``Response`` (everything one exchange learns: head, body chunks, end or error), writes
the request, then awaits ``response_head()`` and ``read()`` until it returns ``b""``.

Invariants:
- Flow control both ways.  Response body bytes are buffered up to ``HIGH_WATER``,
  then the socket stops being read until the reader takes them (a read takes all
  that is buffered); request writes wait in ``drain()`` while the transport's write
  buffer is over its high-water mark.  So a stream of any size stays bounded.
- ``reusable`` is true only after a complete response on a connection the app
  keeps alive, and with nothing unexpected received.  Bytes from the app while the
  connection is idle, EOF, or a parse error close it.
- A HEAD response ends with its head (llhttp cannot be told the request was HEAD,
  so the parser is replaced for the next exchange); 1xx interim responses are
  skipped, and one that has a body (RFC 9112 6.3: none may) or is a ``101`` (no
  upgrade was asked for) fails the exchange; a body delimited by the connection
  close (no length, or a Transfer-Encoding not ending in ``chunked``) ends at EOF,
  and not at a reset, which is an error (RFC 9112 section 8).
- The response head (1xx heads included) is at most ``max_head`` bytes: llhttp has
  no limit of its own, so an app sending header lines without end would grow the
  sidecar until it is killed.  Past it, the exchange fails (502).
- Header bytes are decoded as UTF-8 with ``surrogateescape``, so obs-text (a latin-1
  ``\xe9``) survives the round trip; ``front.responses.FaithfulHeadResponse`` writes it back.
- Trailers of a chunked response are parsed and dropped: the body is passed on,
  the trailer fields are not (the client side cannot send them).
- Every failure wakes the waiting reader with an ``UpstreamError``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import cast

import httptools

from .response import NotHTTP, Response, UpstreamError, closed_early, peer_of

__all__ = ("HIGH_WATER", "Connection", "NotHTTP", "Response", "UpstreamError")


HIGH_WATER = 256 * 1024  # response bytes buffered before the socket stops being read
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # RFC 9112 4: HTAB / SP / VCHAR / obs-text


class Connection(asyncio.Protocol):
    """A keep-alive connection to the app; ``on_idle_close`` is told when it ends while idle."""

    def __init__(self, on_idle_close: Callable[[Connection], None], *, max_head: int) -> None:
        self._on_idle_close = on_idle_close
        self._max_head = max_head
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()  # once: each call is a getpid() system call
        self._parser = httptools.HttpResponseParser(self)
        self._fresh_parser = False
        self.idle = False  # set by the pool while the connection waits in it
        self.closed = False
        self.idle_since = 0.0
        self.response = Response(head_only=False, complete=True)  # none asked for yet
        self._dirty = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._write_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False

    # --- asyncio protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if self.idle or resp.complete:  # nothing was asked: the connection is not trustworthy
            self._dirty = True
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101 nobody asked for: not HTTP any more
            self.fail(UpstreamError("reset", "the upstream switched protocols (101) unasked"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback raised
            if isinstance(cause, UpstreamError):
                self.fail(cause)
            elif not resp.status_seen:  # not even a status line: not an HTTP server
                self.fail(NotHTTP(peer_of(self.transport)))
            else:
                self.fail(UpstreamError("reset", f"invalid response from the upstream: {exc}"))
            return
        if not resp.head_done:
            resp.head_bytes += len(data)
            if resp.head_bytes > self._max_head:
                self.fail(UpstreamError("reset", "the upstream's response head is over "
                                        f"upstream.max_response_head ({self._max_head} bytes)"))

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- httptools callbacks -------------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        resp = self.response
        resp.status_seen = True
        if not _REASON.fullmatch(reason):  # llhttp lets a NUL through; the client side refuses it
            raise UpstreamError("reset", "invalid response from the upstream: "
                                f"a control character in the reason phrase {reason[:40]!r}")
        resp.reason = reason.decode("utf-8", "surrogateescape")
        if not reason.isascii():
            resp.ascii_head = False

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.response
        if not resp.head_done:  # afterwards: trailer fields, dropped
            resp.headers.append(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))
            if not value.isascii():  # llhttp lets only token characters into a name
                resp.ascii_head = False

    def on_message_begin(self) -> None:
        if self.response.complete:  # a second answer to one request: the connection is not reused
            self._dirty = True

    def on_headers_complete(self) -> None:
        resp = self.response
        if resp.complete:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # interim response (103 Early Hints): skip it
            resp.headers = []
            resp.interim = True
            return
        resp.status = status
        resp.head_done = True
        resp.keep_alive = self._parser.should_keep_alive()  # llhttp forgets it after the body
        if resp.head_only:  # HEAD: the response ends here, whatever its headers announce
            self._fresh_parser = True
            resp.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.response
        if resp.complete:  # bytes after a HEAD response's head
            self._dirty = True
            return
        if resp.interim:  # llhttp reads a body for a 1xx other than 100-103: none may have one
            # Raised, not just failed: it stops llhttp, so nothing after it is parsed.
            raise UpstreamError("reset", "invalid response from the upstream: a 1xx with a body")
        resp.chunks.append(body)
        resp.buffered += len(body)
        if resp.buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        resp = self.response
        resp.interim = False
        if resp.head_done and not resp.complete:
            resp.complete = True
            self._wake()

    # --- the exchange's side -------------------------------------------------------------------

    def begin(self, *, head_only: bool) -> Response:
        """Start a new exchange on this (idle, open) connection."""
        if self._fresh_parser:
            self._parser = httptools.HttpResponseParser(self)
            self._fresh_parser = False
        self.response = Response(head_only=head_only)
        return self.response

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the app is not reading what we send."""
        if self._writing_paused and not self.closed:
            self._write_waiter = self._loop.create_future()
            await self._write_waiter
        resp = self.response
        if self.closed and not resp.complete:
            raise resp.error or closed_early()

    async def response_head(self) -> Response:
        resp = self.response
        while not resp.head_done:
            if resp.error is not None:
                raise resp.error
            await self._wait()
        return resp

    def read_nowait(self) -> bytes:
        """Whatever body bytes are buffered (``b""`` if none)."""
        resp = self.response
        chunks = resp.chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        resp.buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    @property
    def at_eof(self) -> bool:
        """The whole response has been received and read."""
        return self.response.complete and not self.response.chunks

    async def read(self) -> bytes:
        """The next body bytes; ``b""`` once the response is complete."""
        resp = self.response
        while not resp.chunks:
            if resp.complete:
                return b""
            if resp.error is not None:
                raise resp.error
            await self._wait()
        return self.read_nowait()

    @property
    def reusable(self) -> bool:
        resp = self.response
        return resp.complete and not self.closed and not self._dirty and resp.keep_alive

    def close(self) -> None:
        """Abort the connection (the app sees it go away at once)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- internals -----------------------------------------------------------------------------

    def _ended(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.idle:
            self._on_idle_close(self)  # the pool forgets it (a no-op if the pool closed it)
            return
        resp = self.response
        if exc is not None and not resp.complete:  # a reset is not an end (RFC 9112 8)
            self.fail(UpstreamError("reset", f"the upstream connection failed: {exc}"))
        elif resp.head_done and not resp.complete and resp.until_close():
            resp.complete = True  # a body delimited by the connection close
        elif not resp.complete:
            self.fail(closed_early())
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        """End the exchange with this error and close the connection."""
        resp = self.response
        if resp.error is None:
            resp.error = error
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wait(self) -> asyncio.Future[None]:
        """A future ``_wake`` resolves (a plain future, not a coroutine: one frame less on
        every resumption; a finished or cancelled one is never woken again)."""
        waiter = self._waiter = self._loop.create_future()
        return waiter
