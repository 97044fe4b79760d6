"""The upstream leg in process: Pool, Connection and Exchange against a real socket app.

Nothing of aiohttp's server is involved: the request body is a plain ``Body`` and the
client's side a recording ``Sink``, so each promise of the leg (reuse rules, framing,
flow of the body, errors and their kinds) is checked on its own.  The app is a real
asyncio server on loopback, scripted per test, that keeps the raw bytes it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from sidecar.upstream.connection import UpstreamError
from sidecar.upstream.exchange import Exchange, request_head
from sidecar.upstream.pool import Pool

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class App:
    port: int
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)


@contextlib.asynccontextmanager
async def app(script: Script) -> AsyncIterator[App]:
    """A loopback server running ``script`` for each connection."""
    state = App(port=0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader, into: bytearray) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    into += head
    return head


def pool(port: int, *, limit: int = 0, max_head: int = 64 * 1024) -> Pool:
    return Pool(host="127.0.0.1", port=port, connect_timeout=2.0, limit=limit,
                idle_timeout=30.0, max_head=max_head)


class Body:
    """A request body that arrives in pieces, as a client sends it."""

    def __init__(self, *pieces: bytes, stall: bool = False) -> None:
        self._pieces = list(pieces)
        self._stall = stall

    def read_nowait(self) -> bytes:
        return b""

    def at_eof(self) -> bool:
        return not self._pieces and not self._stall

    async def readany(self) -> bytes:
        if not self._pieces:
            if self._stall:
                await asyncio.Event().wait()  # the client sends no more
            return b""
        await asyncio.sleep(0)
        return self._pieces.pop(0)


class Sink:
    """Records what the client's side would be sent."""

    def __init__(self) -> None:
        self.events: list[object] = []

    async def start(self) -> None:
        self.events.append("start")

    def flush_head(self) -> None:
        self.events.append("flush")

    async def write(self, data: bytes) -> None:
        self.events.append(data)

    async def finish(self, data: bytes = b"") -> None:
        self.events.append(data)
        self.events.append("finish")

    @property
    def body(self) -> bytes:
        return b"".join(e for e in self.events if isinstance(e, bytes))


def get(target: str = "/") -> bytes:
    return request_head("GET", target, [("Host", "app")], host=None, body=False, has_length=False)


async def exchange(p: Pool, head: bytes, body: Body | None = None, *, chunked: bool = False,
                   head_only: bool = False) -> tuple[int, Sink]:
    ex = Exchange(p, timeout=10.0)
    try:
        resp = await ex.send(head, body, chunked=chunked, head_only=head_only)
        sink = Sink()
        await ex.relay(sink)
        return resp.status, sink
    finally:
        ex.close()


def keep_alive(*bodies: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for body in bodies:
            await read_head(reader, bytearray())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()
        await reader.read()
    return script


async def test_a_kept_alive_connection_is_reused_and_one_the_app_closed_never_is() -> None:
    async with app(keep_alive(b"one", b"two")) as a:
        p = pool(a.port)
        assert (await exchange(p, get()))[1].body == b"one"
        assert (await exchange(p, get()))[1].body == b"two"
        assert a.connections == 1  # the second request went on the pooled connection
        p.close()


async def test_an_idle_connection_the_app_closes_is_dropped_before_reuse() -> None:
    answered = asyncio.Event()

    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if a.connections == 1:
            await read_head(reader, bytearray())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
            await writer.drain()
            answered.set()
            return  # then closes: the pooled connection is dead
        await keep_alive(b"B")(reader, writer)

    async with app(close_after_one) as a:
        p = pool(a.port)
        assert (await exchange(p, get()))[1].body == b"A"
        await asyncio.wait_for(answered.wait(), 5)
        for _ in range(1000):  # until the EOF has taken the connection out of the pool
            if not p._idle:  # the pool's own queue
                break
            await asyncio.sleep(0.005)
        assert (await exchange(p, get()))[1].body == b"B"
        assert a.connections == 2
        p.close()


async def test_the_pool_limit_makes_the_next_caller_wait_for_a_release() -> None:
    async with app(keep_alive(b"x", b"y")) as a:
        p = pool(a.port, limit=1)
        first = await p.acquire()
        second = asyncio.ensure_future(p.acquire())
        await asyncio.sleep(0.05)
        assert not second.done()
        first.close()
        p.release(first, reuse=False)
        conn = await asyncio.wait_for(second, 5)
        p.release(conn, reuse=False)
        p.close()


async def test_a_refused_connection_is_a_connect_error_naming_the_address() -> None:
    async with app(keep_alive()) as a:
        port = a.port
    p = pool(port)
    with pytest.raises(UpstreamError) as err:
        await exchange(p, get())
    assert err.value.kind == "connect" and f"127.0.0.1:{port}" in str(err.value)


async def test_a_body_streamed_without_a_length_is_sent_chunked_as_the_client_sent_it() -> None:
    got = bytearray()

    async def echo_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader, got)
        got.extend(await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with app(echo_chunked) as a:
        p = pool(a.port)
        head = request_head("POST", "/up", [("Host", "app")], host=None, body=True,
                            has_length=False)
        status, _ = await exchange(p, head, Body(b"hello ", b"world"), chunked=True)
        assert status == 204
        assert got.startswith(b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert got.endswith(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
        p.close()


async def test_head_waits_for_the_first_body_byte_and_a_stalled_client_is_its_own_fault() -> None:
    async with app(keep_alive(b"never")) as a:
        p = pool(a.port)
        head = request_head("POST", "/up", [("Host", "app"), ("Content-Length", "5")],
                            host=None, body=True, has_length=True)
        ex = Exchange(p, timeout=0.2)
        with pytest.raises(UpstreamError) as err:
            await ex.send(head, Body(stall=True), chunked=False, head_only=False)
        assert err.value.kind == "client_timeout"
        ex.close()
        assert a.connections == 0  # the app never saw a head whose body never came
        p.close()


async def test_interim_responses_are_skipped_and_a_head_response_ends_with_its_head() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader, bytearray())
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_head(reader, bytearray())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")  # HEAD: no body follows
        await read_head(reader, bytearray())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes")
        await writer.drain()
        await reader.read()

    async with app(script) as a:
        p = pool(a.port)
        status, sink = await exchange(p, get())
        assert (status, sink.body) == (200, b"ok")
        head = request_head("HEAD", "/", [("Host", "app")], host=None, body=False,
                            has_length=False)
        status, sink = await exchange(p, head, head_only=True)
        assert (status, sink.body, sink.events[-1]) == (200, b"", "finish")
        assert (await exchange(p, get()))[1].body == b"yes"  # the connection stayed in step
        assert a.connections == 1
        p.close()


async def test_a_close_delimited_body_ends_at_eof_but_a_reset_fails_the_exchange() -> None:
    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader, bytearray())
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader, bytearray())
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN (linger 0)

    async with app(close_delimited) as a:
        p = pool(a.port)
        status, sink = await exchange(p, get())
        assert (status, sink.body, sink.events[-1]) == (200, b"until the end", "finish")
        p.close()
    async with app(reset) as b:
        p = pool(b.port)
        with pytest.raises(UpstreamError) as err:
            await exchange(p, get())
        assert err.value.kind == "reset"
        p.close()


async def test_a_response_head_over_the_cap_fails_the_exchange() -> None:
    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader, bytearray())
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 4000 + b"\r\n")
        for _ in range(100):
            writer.write(b"X-More: " + b"b" * 1000 + b"\r\n")
            await writer.drain()
        await reader.read()

    async with app(endless_head) as a:
        p = pool(a.port, max_head=16 * 1024)
        with pytest.raises(UpstreamError) as err:
            await exchange(p, get())
        assert err.value.kind == "reset" and "max_response_head" in str(err.value)
        p.close()


async def test_an_app_slower_than_the_timeout_fails_the_exchange_as_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader, bytearray())
        await reader.read()  # never answers

    async with app(silent) as a:
        p = pool(a.port)
        ex = Exchange(p, timeout=0.2)
        with pytest.raises(UpstreamError) as err:
            await ex.send(get(), None, chunked=False, head_only=False)
        assert err.value.kind == "timeout"
        ex.close()
        p.close()


async def test_an_exchange_closed_before_its_end_closes_the_connection_the_app_sees_it() -> None:
    gone = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader, bytearray())
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        if await reader.read() == b"":
            gone.set()

    async with app(slow) as a:
        p = pool(a.port)
        ex = Exchange(p, timeout=10.0)
        resp = await ex.send(get(), None, chunked=False, head_only=False)
        assert resp.status == 200
        ex.close()  # a client that went away, or the drain's deadline
        await asyncio.wait_for(gone.wait(), 5)
        p.close()
