"""Defence in depth: the sidecar put in front of a port that does not speak HTTP says so.

`sidecar inject` never fronts such a port on its own (tests/test_inject_ports.py), but a user
can choose it, or a port can say nothing about itself (the contract's rule 5).  Then the proxy
answers 502 with "the app on HOST:PORT did not answer HTTP" (and logs the same), and readiness
without upstream.health_path does not turn green: its first probe writes half an HTTP request
(the line ``OPTIONS * HTTP/1.1``, which an HTTP server waits to complete) and gets bytes that
are not HTTP.  An app that stays silent (every HTTP server, and an h2c-only gRPC server) still
counts as "its port accepts", as before; so does an h2c-only server that sends its HTTP/2
server preface first (grpc-go, nghttpd).

The non-HTTP app is a real TCP server that answers every line like Redis (``-ERR ...``), and the
real ``redis-server`` when it is installed.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from hyperframe.frame import GoAwayFrame, SettingsFrame

from tests.conftest import StartSidecar, free_port, upstream_events, wait_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

FAST = {"upstream": {"health_interval": "200ms", "connect_timeout": "1s"}}


async def _redis_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each line as Redis answers an unknown command; HTTP is a few unknown commands."""
    try:
        while await reader.readline():
            writer.write(b"-ERR unknown command\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, read, never answer (until the peer goes away)."""
    try:
        while await reader.read(4096):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def tcp_app() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        sock: socket.socket = server.sockets[0]
        return int(sock.getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _status(admin: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(admin + "/status") as resp:
        data: dict[str, object] = await resp.json()
        return data


async def _readyz(admin: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(admin + "/readyz") as resp:
        return resp.status


async def _wait_upstream_error(admin: str, text: str, within: float = 15.0) -> str:
    async def poll() -> str:
        while True:
            upstream = (await _status(admin))["upstream"]
            assert isinstance(upstream, dict)
            error = str(upstream.get("last_error") or "")
            if text in error:
                return error
            await asyncio.sleep(0.05)
    return await asyncio.wait_for(poll(), within)


async def test_a_request_to_an_app_that_is_not_http_gets_a_502_saying_so(
        start_sidecar: StartSidecar, tcp_app: Callable[[Handler], Awaitable[int]]) -> None:
    """Redis behind the proxy: the client gets 502 "the app on 127.0.0.1:PORT did not answer
    HTTP" (not a bare "closed the connection"), and the log line says the same."""
    port = await tcp_app(_redis_like)
    sidecar = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as session, session.get(sidecar.url + "/") as resp:
        assert resp.status == 502
        assert await resp.text() == f"502 the app on 127.0.0.1:{port} did not answer HTTP\n"
    entry = await sidecar.wait_log("upstream error")
    assert entry["error"] == ("invalid response from the upstream: the app on "
                              f"127.0.0.1:{port} did not answer HTTP")
    assert entry["kind"] == "reset"


async def test_readiness_without_health_path_stays_red_for_an_app_that_is_not_http(
        start_sidecar: StartSidecar, tcp_app: Callable[[Handler], Awaitable[int]]) -> None:
    """Its port accepts, but it never speaks HTTP: /readyz says 503 with the reason, and keeps
    saying it probe after probe (the app is asked again each time)."""
    port = await tcp_app(_redis_like)
    sidecar = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{port}")
    error = await _wait_upstream_error(sidecar.admin, "did not answer HTTP")
    assert error == f"the app on 127.0.0.1:{port} did not answer HTTP"
    for _ in range(5):  # several probe intervals later: still red
        await asyncio.sleep(0.2)
        assert await _readyz(sidecar.admin) == 503


async def test_readiness_without_health_path_is_green_for_any_http_answer(
        start_sidecar: StartSidecar, tcp_app: Callable[[Handler], Awaitable[int]],
        upstream: aiohttp.test_utils.TestServer) -> None:
    """An HTTP app waits for the rest of the probe's request (so none of its handlers sees it:
    the test app records nothing) and is up; so is any app that accepts and stays silent: only
    a non-HTTP answer is held against it."""
    sidecar = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{upstream.port}")
    await asyncio.wait_for(_until_ready(sidecar.admin), 15)
    assert upstream_events(upstream) == []
    silent = await tcp_app(_silent)
    quiet = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{silent}")
    await asyncio.wait_for(_until_ready(quiet.admin), 15)


async def _h2c_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Speak first as grpc-go's server does: the server preface (SETTINGS), then read; on a
    client preface that is not one, a GOAWAY(PROTOCOL_ERROR) (RFC 9113 §3.4) and the end."""
    try:
        writer.write(SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100})
                     .serialize())
        await writer.drain()
        if await reader.read(24) != PREFACE:
            writer.write(GoAwayFrame(0, last_stream_id=0, error_code=1).serialize())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_readiness_without_health_path_is_green_for_an_h2c_only_server(
        start_sidecar: StartSidecar, tcp_app: Callable[[Handler], Awaitable[int]]) -> None:
    """A gRPC server that sends its HTTP/2 server preface before it reads (grpc-go, nghttpd)
    answers the probe's line with SETTINGS then GOAWAY: that is HTTP (h2c), so readiness turns
    green and gRPC calls can be forwarded; it used to say "did not answer HTTP" forever."""
    port = await tcp_app(_h2c_server)
    sidecar = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{port}")
    await asyncio.wait_for(_until_ready(sidecar.admin), 15)


async def _until_ready(admin: str) -> None:
    while await _readyz(admin) != 200:
        await asyncio.sleep(0.05)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
async def test_the_real_redis_behind_the_sidecar_is_refused_in_words(
        start_sidecar: StartSidecar, tmp_path: object) -> None:
    """The real thing: redis-server on loopback behind the sidecar."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_port(port)
        sidecar = await start_sidecar(FAST, upstream=f"http://127.0.0.1:{port}")
        await _wait_upstream_error(sidecar.admin, "did not answer HTTP")
        assert await _readyz(sidecar.admin) == 503
        async with aiohttp.ClientSession() as session, session.get(sidecar.url + "/") as resp:
            assert resp.status == 502
            assert "did not answer HTTP" in await resp.text()
    finally:
        proc.kill()
        await proc.wait()
