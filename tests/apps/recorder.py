"""A raw-socket app that records exactly what it parsed, for framing and smuggling tests.

Each connection's bytes go through llhttp (``httptools``) in its default, strict mode,
the parser a careful origin server would use.  Every complete request is recorded
(method, target, headers as bytes, body bytes, which connection) and answered by
``reply(request)``, which returns raw response bytes and what to do next (keep the
connection, close it, reset it).  By default the answer is a 200 whose body names the
request (``echo``), so a client can tell which request a response belongs to.

What the app parsed is the ground truth of the smuggling invariant: a request the
proxy did not count, or a body that is not the one the client framed, shows up here.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

__all__ = ("Recorded", "Recorder", "Reply", "echo")


@dataclass
class Recorded:
    conn: int
    method: str = ""
    target: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    answered: bool = False  # early: before its body was read

    def header(self, name: str) -> list[bytes]:
        low = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == low]


@dataclass
class Reply:
    data: bytes
    then: str = "keep"  # keep | close | reset | hold (keep, and park it in ``held``)


def echo(req: Recorded) -> Reply:
    """200 whose body is ``METHOD TARGET sha256(body)[:16]`` and CRLF: which request this answers."""
    body = b"%s %s %s\r\n" % (req.method.encode(), req.target,
                              hashlib.sha256(req.body).hexdigest()[:16].encode())
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    return Reply(head if req.method == "HEAD" else head + body)


class _Conn(asyncio.Protocol):
    def __init__(self, recorder: Recorder, number: int) -> None:
        self._recorder = recorder
        self._number = number
        self._parser = httptools.HttpRequestParser(self)
        self._current: Recorded | None = None
        self._transport: asyncio.Transport | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._recorder.transports.add(transport)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._recorder.received += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._recorder.errors.append(f"conn {self._number}: upgrade")
            self._close()
        except httptools.HttpParserError as exc:
            self._recorder.errors.append(f"conn {self._number}: {exc}")
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._recorder.transports.discard(self._transport)
        if self._current is not None and self._current.method:
            self._recorder.partial.append(self._current)

    def on_message_begin(self) -> None:
        self._current = Recorded(self._number)

    def on_url(self, url: bytes) -> None:
        assert self._current is not None
        self._current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._current is not None
        self._current.method = self._parser.get_method().decode("latin-1")
        self._current.version = self._parser.get_http_version()
        if self._recorder.early is not None and self._recorder.early(self._current):
            self._current.answered = True
            self._answer(self._current)

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        self._current.body += body

    def on_message_complete(self) -> None:
        req, self._current = self._current, None
        assert req is not None
        self._recorder.requests.append(req)
        if not req.answered:
            self._answer(req)

    def _answer(self, req: Recorded) -> None:
        self._recorder.answered.append(req)
        reply = self._recorder.reply(req)
        transport = self._transport
        if self._done or transport is None:
            return
        transport.write(reply.data)
        if reply.then == "reset":
            self._done = True
            Recorder.reset(transport)
        elif reply.then == "close":
            self._close()
        elif reply.then == "hold":
            self._recorder.held.append(transport)

    def _close(self) -> None:
        self._done = True
        if self._transport is not None:
            self._transport.close()


class Recorder:
    """The app: ``start()`` binds loopback port 0; ``requests`` is what it parsed, in order."""

    def __init__(self, reply: Callable[[Recorded], Reply] = echo) -> None:
        self.reply = reply
        self.early: Callable[[Recorded], bool] | None = None  # which requests are answered early
        self.requests: list[Recorded] = []
        self.partial: list[Recorded] = []  # heads whose body never completed
        self.answered: list[Recorded] = []  # in the order answered (early answers: body not read)
        self.errors: list[str] = []  # parse errors (a request the app could not read)
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections = 0
        self.transports: set[object] = set()
        self.held: list[asyncio.Transport] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _protocol(self) -> _Conn:
        self._connections += 1
        return _Conn(self, self._connections)

    async def start(self) -> Recorder:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @staticmethod
    def reset(transport: asyncio.Transport) -> None:
        """End the connection with a TCP reset (RST), not a close."""
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def clear(self) -> None:
        self.requests.clear()
        self.answered.clear()
        self.partial.clear()
        self.errors.clear()
        self.received.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for transport in list(self.transports):
                transport.abort()  # type: ignore[attr-defined]
            await self._server.wait_closed()
