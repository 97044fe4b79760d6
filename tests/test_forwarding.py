"""The forwarding path to the app: framing, keep-alive reuse, flow control and the pool.

Most tests talk to the sidecar over raw sockets, so they see exactly what goes on the
wire.  Some need an app that does what aiohttp will not (close a kept-alive connection
without a word, send trailers): ``RawApp`` is a real TCP server whose requests are
parsed by httptools, and which keeps its own log of every request it received.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Self

import aiohttp
import httptools
import pytest
from aiohttp import web

from tests.apps.upstream import make_app, pattern
from tests.conftest import (
    StartSidecar,
    free_port,
    metric,
    raw_request,
    read_response,
    upstream_url,
)

Reply = Callable[[asyncio.Transport], None]


def _ok(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


class RawApp:
    """A real app server on a free port; ``log`` holds (connection number, method, target).

    The sidecar's startup probe opens (and closes) one connection too; ``open`` and
    ``most_open`` count only connections that carried a request.
    """

    def __init__(self) -> None:
        self.log: list[tuple[int, str, str]] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.holds: dict[str, asyncio.Event] = {}
        self.server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def hold(self, key: str) -> asyncio.Event:
        return self.holds.setdefault(key, asyncio.Event())

    def reply(self, target: str, transport: asyncio.Transport) -> None:
        if target == "/ok-then-close":  # keep-alive promised (HTTP/1.1), then closed anyway
            transport.write(_ok(b"first"))
            transport.close()
        elif target == "/swallow":  # reads the request, closes without an answer
            transport.close()
        elif target == "/trailers":
            transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n")
        elif target == "/early-hints":  # an interim 103, then the answer
            transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                            + _ok(b"final"))
        elif target == "/until-close":  # no length: the body ends with the connection
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
            transport.close()
        elif target == "/ok-then-babble":  # stray bytes after the answer: nothing was asked
            transport.write(_ok(b"first"))
            asyncio.get_running_loop().call_later(0.05, transport.write, b"HTTP/1.1 200 OK\r\n")
        elif target == "/garbage":
            transport.write(b"SPDY/9 what\r\n\r\n")
        elif target.startswith("/hold/"):
            event = self.hold(target[6:])

            async def later() -> None:
                await asyncio.wait_for(event.wait(), 30)
                if not transport.is_closing():
                    transport.write(_ok(target.encode()))

            asyncio.ensure_future(later())
        else:
            transport.write(_ok(target.encode()))

    async def __aenter__(self) -> Self:
        app = self

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                app.connections += 1
                self.number = app.connections
                self.used = False
                self.transport = transport
                self.parser = httptools.HttpRequestParser(self)
                self.target = ""

            def connection_lost(self, exc: Exception | None) -> None:
                if self.used:
                    app.open -= 1

            def data_received(self, data: bytes) -> None:
                self.parser.feed_data(data)

            def on_url(self, url: bytes) -> None:
                self.target = url.decode()

            def on_message_complete(self) -> None:
                if not self.used:  # count connections that carry requests (not the startup probe)
                    self.used = True
                    app.open += 1
                    app.most_open = max(app.most_open, app.open)
                app.log.append((self.number, self.parser.get_method().decode(), self.target))
                app.reply(self.target, self.transport)  # type: ignore[arg-type]

        self.server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for event in self.holds.values():
            event.set()
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def raw_app() -> AsyncIterator[RawApp]:
    async with RawApp() as app:
        yield app


@pytest.fixture
async def proxied(start_sidecar: StartSidecar, upstream):  # type: ignore[no-untyped-def]
    # A GiB each way must not meet upstream.timeout on a loaded machine.
    return await start_sidecar({"upstream": {"timeout": "300s"}}, upstream=upstream_url(upstream))


async def test_pipelined_requests_are_answered_in_order(proxied) -> None:
    """Requests sent back to back on one connection get their own answers, in order."""
    reader, writer = await raw_request(proxied.port, b"".join(
        b"GET /headers/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
    try:
        for i in range(5):
            status, _, body = await read_response(reader)
            assert status == "HTTP/1.1 200 OK"
            assert f'"raw_path": "/headers/{i}"' in body.decode()
    finally:
        writer.close()


async def test_head_then_get_on_one_connection_both_framed_right(proxied) -> None:
    """A HEAD answer has no body (even with Content-Length), and the next answer is intact."""
    reader, writer = await raw_request(
        proxied.port, b"HEAD /bytes?n=1000 HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /bytes?n=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 1000" in head
        status, _, body = await read_response(reader)  # the GET's, right after the head
        assert status == "HTTP/1.1 200 OK" and body == pattern(10)
    finally:
        writer.close()


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses_carry_no_body_and_the_connection_goes_on(proxied, code: int) -> None:
    """204 and 304 answers end at their head; the next request on the connection works."""
    reader, writer = await raw_request(
        proxied.port, b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n" % code)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 %d" % code)
        assert b"transfer-encoding" not in head.lower()
        status, _, body = await read_response(reader)
        assert status == "HTTP/1.1 200 OK" and b'"raw_path": "/headers"' in body
    finally:
        writer.close()


async def test_chunked_response_with_trailers_keeps_its_body_and_drops_the_trailers(
        start_sidecar: StartSidecar, raw_app: RawApp, client: aiohttp.ClientSession) -> None:
    """Trailers are not forwarded (documented); the body arrives whole; the app connection is reused."""
    sidecar = await start_sidecar(upstream=raw_app.url)
    for _ in range(2):
        async with client.get(sidecar.url + "/trailers") as resp:
            assert resp.status == 200
            assert await resp.read() == b"hello world"
            assert "X-Sum" not in resp.headers and "Trailer" not in resp.headers
    (first, *_), (second, *_) = raw_app.log
    assert first == second, "the pooled connection was not reused after a chunked answer"


async def test_interim_1xx_is_skipped_and_the_final_answer_forwarded(
        start_sidecar: StartSidecar, raw_app: RawApp, client: aiohttp.ClientSession) -> None:
    """A 103 Early Hints from the app is not passed on; the 200 after it is, on a reusable connection."""
    sidecar = await start_sidecar(upstream=raw_app.url)
    for _ in range(2):
        async with client.get(sidecar.url + "/early-hints") as resp:
            assert resp.status == 200 and await resp.read() == b"final"
            assert "Link" not in resp.headers
    (first, *_), (second, *_) = raw_app.log
    assert first == second


async def test_body_delimited_by_the_close_arrives_whole(
        start_sidecar: StartSidecar, raw_app: RawApp, client: aiohttp.ClientSession) -> None:
    """An answer with neither Content-Length nor chunked ends when the app closes: complete, 200."""
    sidecar = await start_sidecar(upstream=raw_app.url)
    async with client.get(sidecar.url + "/until-close") as resp:
        assert resp.status == 200 and await resp.read() == b"all of it"
    async with client.get(sidecar.url + "/next") as resp:  # on a new connection
        assert resp.status == 200


async def test_an_answer_that_is_not_http_is_a_502_and_the_proxy_goes_on(
        start_sidecar: StartSidecar, raw_app: RawApp, client: aiohttp.ClientSession) -> None:
    """An unparseable answer from the app: 502 counted reset, logged in words; next request fine."""
    sidecar = await start_sidecar(upstream=raw_app.url)
    async with client.get(sidecar.url + "/garbage") as resp:
        assert resp.status == 502
    entry = await sidecar.wait_log("upstream error")
    assert entry["kind"] == "reset" and entry["error"].startswith("invalid response from the upstream")
    async with client.get(sidecar.url + "/next") as resp:
        assert resp.status == 200 and await resp.read() == b"/next"


async def test_pooled_connection_closed_by_the_app_is_not_reused(
        start_sidecar: StartSidecar, raw_app: RawApp, client: aiohttp.ClientSession) -> None:
    """An app that closes a kept-alive connection: the next request goes on a new one, sent once."""
    sidecar = await start_sidecar(upstream=raw_app.url)
    async with client.get(sidecar.url + "/ok-then-close") as resp:
        assert await resp.read() == b"first"
    async with client.get(sidecar.url + "/next") as resp:
        assert resp.status == 200 and await resp.read() == b"/next"
    (first, *sent_first), (second, *sent_next) = raw_app.log  # each request exactly once
    assert sent_first == ["GET", "/ok-then-close"] and sent_next == ["GET", "/next"]
    assert first != second


async def test_pooled_connection_the_app_wrote_on_unasked_is_not_reused(
        start_sidecar: StartSidecar, raw_app: RawApp, client: aiohttp.ClientSession) -> None:
    """Bytes from the app on an idle connection: it is closed, the next request gets a new one."""
    sidecar = await start_sidecar(upstream=raw_app.url)
    async with client.get(sidecar.url + "/ok-then-babble") as resp:
        assert await resp.read() == b"first"
    for _ in range(500):  # until the sidecar has closed the babbling connection
        if raw_app.open == 0:
            break
        await asyncio.sleep(0.01)
    assert raw_app.open == 0
    async with client.get(sidecar.url + "/next") as resp:
        assert resp.status == 200 and await resp.read() == b"/next"
    (first, *_), (second, *_) = raw_app.log
    assert first != second


async def test_request_the_app_may_have_read_is_never_sent_twice(
        start_sidecar: StartSidecar, raw_app: RawApp, client: aiohttp.ClientSession) -> None:
    """The app closes a reused connection after reading the request: 502 counted reset, no retry."""
    sidecar = await start_sidecar(upstream=raw_app.url)
    async with client.get(sidecar.url + "/warm") as resp:
        assert resp.status == 200
    async with client.post(sidecar.url + "/swallow", data=b"pay once") as resp:
        assert resp.status == 502
        assert await resp.text() == "502 upstream closed the connection\n"
    (first, *warm), (second, *swallow) = raw_app.log  # /swallow reached the app once
    assert warm == ["GET", "/warm"] and swallow == ["POST", "/swallow"]
    assert first == second, "the request was not sent on the reused connection"
    assert await metric(client, sidecar.admin, 'sidecar_upstream_errors_total{kind="reset"}') == 1
    entry = await sidecar.wait_log("upstream error")
    assert entry["kind"] == "reset" and "closed the connection" in entry["error"]
    async with client.get(sidecar.url + "/after") as resp:  # and the proxy goes on
        assert resp.status == 200


async def test_connection_pool_never_exceeds_max_connections(
        start_sidecar: StartSidecar, raw_app: RawApp, client: aiohttp.ClientSession) -> None:
    """upstream.max_connections bounds the connections to the app; extra requests wait their turn."""
    sidecar = await start_sidecar({"upstream": {"max_connections": 2}}, upstream=raw_app.url)
    tasks = [asyncio.ensure_future(client.get(sidecar.url + f"/hold/{i}")) for i in range(4)]
    try:
        for _ in range(500):  # two reach the app; the others wait in the sidecar
            if len(raw_app.log) >= 2:
                break
            await asyncio.sleep(0.01)
        for i in range(4):
            raw_app.hold(str(i)).set()
        for task in tasks:
            resp = await asyncio.wait_for(task, 15)
            assert resp.status == 200
            resp.release()
    finally:
        for task in tasks:
            task.cancel()
    assert len(raw_app.log) == 4
    assert raw_app.most_open == 2 and len({number for number, *_ in raw_app.log}) == 2


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


GIB = 1 << 30


async def test_one_gib_download_grows_peak_memory_by_less_than_20_mib(proxied, client) -> None:
    """Flow control from the app to the client: the sidecar holds a bounded window, not the body."""
    before = _hwm_kib(proxied.proc.pid)
    size = 0
    async with client.get(proxied.url + f"/bytes?n={GIB}&chunked=1") as resp:
        async for chunk in resp.content.iter_chunked(1 << 20):
            size += len(chunk)
    assert size == GIB
    assert _hwm_kib(proxied.proc.pid) - before < 20 * 1024


async def test_one_gib_chunked_upload_grows_peak_memory_by_less_than_20_mib(proxied, client) -> None:
    """Flow control from the client to the app, for a body sent without a length (re-chunked)."""
    before = _hwm_kib(proxied.proc.pid)
    block = pattern(1 << 20)
    expected = hashlib.sha256()
    for _ in range(GIB // len(block)):
        expected.update(block)

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(GIB // len(block)):
            yield block

    async with client.post(proxied.url + "/upload", data=body()) as resp:
        result = await resp.json()
    assert result == {"size": GIB, "sha256": expected.hexdigest()}
    assert _hwm_kib(proxied.proc.pid) - before < 20 * 1024


async def test_unix_socket_upstream_streams_bodies_and_reuses_connections(
        start_sidecar: StartSidecar, tmp_path: Path, client: aiohttp.ClientSession) -> None:
    """Over a unix socket: an upload with and without a length, and keep-alive between them."""
    sock = str(tmp_path / "app.sock")
    runner = web.AppRunner(make_app())
    await runner.setup()
    await web.UnixSite(runner, sock).start()
    try:
        sidecar = await start_sidecar(upstream=f"unix:{sock}")
        data = pattern(3 << 20)
        for payload in (io.BytesIO(data), _chunks(data)):
            async with client.post(sidecar.url + "/upload", data=payload) as resp:
                assert (await resp.json())["sha256"] == hashlib.sha256(data).hexdigest()
        async with client.get(sidecar.url + "/headers") as resp:
            assert dict((await resp.json())["headers"])["Host"].startswith("127.0.0.1:")
    finally:
        await runner.cleanup()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1 << 18):
        yield data[i:i + (1 << 18)]


async def test_expect_100_continue_gets_100_then_the_answer(proxied) -> None:
    """A client that waits for 100 Continue gets it, sends its body, and gets the app's answer."""
    reader, writer = await raw_request(
        proxied.port, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                      b"Expect: 100-continue\r\n\r\n")
    try:
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        status, _, body = await read_response(reader)
        assert status == "HTTP/1.1 200 OK"
        assert f'"sha256": "{hashlib.sha256(b"hello").hexdigest()}"' in body.decode()
    finally:
        writer.close()


async def test_unreachable_upstream_is_logged_in_words_not_as_a_repr(
        start_sidecar: StartSidecar, client: aiohttp.ClientSession) -> None:
    """The log says what failed and where (issue 9 §4), with the kind counted in the metric."""
    port = free_port()  # nothing listens there
    sidecar = await start_sidecar(upstream=f"http://127.0.0.1:{port}")
    async with client.get(sidecar.url + "/x") as resp:
        assert resp.status == 502
    entry = await sidecar.wait_log("upstream error")
    assert entry["kind"] == "connect"
    assert entry["error"] == f"connection refused by 127.0.0.1:{port}"


async def test_timeout_after_the_head_went_out_cuts_the_client_connection(
        start_sidecar: StartSidecar, upstream, client: aiohttp.ClientSession) -> None:  # type: ignore[no-untyped-def]
    """A stream still open at upstream.timeout is cut, never ended as if complete; counted timeout."""
    sidecar = await start_sidecar({"upstream": {"timeout": "300ms"}}, upstream=upstream_url(upstream))
    async with client.get(sidecar.url + "/stream?key=cut") as resp:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b"data: first\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.content.read(), 5)
    assert await metric(client, sidecar.admin, 'sidecar_upstream_errors_total{kind="timeout"}') == 1
    entry = await sidecar.wait_log("upstream error")
    assert entry == {**entry, "kind": "timeout", "error": "no complete answer within 0.3s"}
