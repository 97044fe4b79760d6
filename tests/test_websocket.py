"""WebSocket close handshakes through the sidecar: codes and reasons pass both ways unchanged.

The app is tests/apps/upstream.py's ``/ws/close``, which records the close frames it
receives; the client is aiohttp's (with ``autoclose=False`` so it can read the reason of
the close frame it gets back) or a raw socket for a client that vanishes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.conftest import Sidecar, StartSidecar, raw_request, upstream_events, upstream_url

CODES = [1000, 1008, 4000, 4999]


@pytest.fixture
async def proxied(start_sidecar: StartSidecar, upstream: Any) -> Sidecar:
    return await start_sidecar(upstream=upstream_url(upstream))


async def app_event(upstream: Any, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """The first event of this kind the app recorded (they arrive after the client's view)."""
    async def wait() -> dict[str, Any]:
        while True:
            for event in upstream_events(upstream):
                if event["event"] == kind:
                    return event
            await asyncio.sleep(0.01)

    try:
        return await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"the app recorded no {kind!r}: {upstream_events(upstream)}") from None


def close_frame(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()


async def echo_once(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str("hi")
    assert (await ws.receive(timeout=10)).data == "echo:hi"


async def test_a_normal_client_close_reads_back_1000_not_going_away(
        proxied: Sidecar, client: aiohttp.ClientSession, upstream: Any) -> None:
    """The reported bug: ws.close() (1000) through the sidecar came back as 1001."""
    async with client.ws_connect(proxied.url + "/ws/close") as ws:
        await echo_once(ws)
        await ws.close()
        assert ws.close_code == 1000
    assert (await app_event(upstream, "ws_close"))["code"] == 1000


@pytest.mark.parametrize("code", CODES)
async def test_client_close_code_and_reason_reach_the_app_and_its_echo_comes_back(
        proxied: Sidecar, client: aiohttp.ClientSession, upstream: Any, code: int) -> None:
    async with client.ws_connect(proxied.url + "/ws/close", autoclose=False) as ws:
        await echo_once(ws)
        await ws.send_frame(close_frame(code, f"client bye {code}"), WSMsgType.CLOSE)
        reply = await ws.receive(timeout=10)
        assert (reply.type, reply.data, reply.extra) == (WSMsgType.CLOSE, code, f"client bye {code}")
    received = await app_event(upstream, "ws_close")
    assert (received["code"], received["reason"]) == (code, f"client bye {code}")


@pytest.mark.parametrize("code", CODES)
async def test_client_close_is_answered_with_the_code_and_reason_the_app_replied_with(
        start_sidecar: StartSidecar, client: aiohttp.ClientSession, upstream: Any, code: int) -> None:
    sidecar = await start_sidecar(upstream=upstream_url(upstream))
    url = sidecar.url + f"/ws/close?reply={code}&reason=app+answers+{code}"
    async with client.ws_connect(url, autoclose=False) as ws:
        await ws.send_frame(close_frame(1000, "done"), WSMsgType.CLOSE)
        reply = await ws.receive(timeout=10)
        assert (reply.type, reply.data, reply.extra) == (WSMsgType.CLOSE, code, f"app answers {code}")


@pytest.mark.parametrize("code", CODES)
async def test_app_close_code_and_reason_reach_the_client_and_its_reply_reaches_the_app(
        proxied: Sidecar, client: aiohttp.ClientSession, upstream: Any, code: int) -> None:
    async with client.ws_connect(proxied.url + "/ws/close", autoclose=False) as ws:
        await echo_once(ws)
        await ws.send_str(f"close:{code}:app bye {code}")
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, code, f"app bye {code}")
        reply_code = 4000 + code % 1000
        await ws.close(code=reply_code, message=f"client answers {code}".encode())
    reply = await app_event(upstream, "ws_reply")
    assert (reply["code"], reply["reason"]) == (reply_code, f"client answers {code}")


async def test_a_client_that_vanishes_without_a_close_frame_is_going_away_for_the_app(
        proxied: Sidecar, upstream: Any) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await raw_request(proxied.port, (
        "GET /ws/close HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101")
    await app_event(upstream, "received")  # the app has the websocket
    writer.transport.abort()  # a reset, no close frame
    received = await app_event(upstream, "ws_close")
    assert (received["code"], received["reason"]) == (1001, "client went away")


async def test_an_app_that_vanishes_without_a_close_frame_is_1011_for_the_client(
        proxied: Sidecar, client: aiohttp.ClientSession) -> None:
    async with client.ws_connect(proxied.url + "/ws/close", autoclose=False) as ws:
        await echo_once(ws)
        await ws.send_str("vanish")
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1011, "upstream connection lost")


async def test_the_drain_still_closes_websockets_with_1001_on_both_sides(
        start_sidecar: StartSidecar, client: aiohttp.ClientSession, upstream: Any) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s", "timeout": "5s"}},
                                  upstream=upstream_url(upstream))
    async with client.ws_connect(sidecar.url + "/ws/close", autoclose=False) as ws:
        await echo_once(ws)
        sidecar.send(signal.SIGTERM)
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        await ws.close(code=1001)
    assert (await app_event(upstream, "ws_close"))["code"] == 1001
    assert await sidecar.wait_exit() == 0
    assert (await sidecar.wait_log("drain finished"))["aborted"] == 0


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask), small payloads only."""
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_after_the_client_answers_an_app_close_the_connection_ends_with_no_second_frame(
        proxied: Sidecar) -> None:
    """Exactly one close frame each way (RFC 6455 5.5.1), then the server ends the TCP connection."""
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await raw_request(proxied.port, (
        "GET /ws/close HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.write(masked_frame(0x1, b"close:4000:bye"))
    close = await asyncio.wait_for(reader.readexactly(2 + 2 + 3), 10)
    assert close == b"\x88\x05" + close_frame(4000, "bye")
    writer.write(masked_frame(0x8, close_frame(4000, "ok")))
    assert await asyncio.wait_for(reader.read(), 10) == b""  # EOF, nothing more
    writer.close()
