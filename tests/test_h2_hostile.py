"""Hostile HTTP/2 input on the proxy port: each ends its connection with a GOAWAY naming
the error (or is answered as HTTP/1.1), holds no unbounded memory, and the sidecar keeps
serving other connections (a call succeeds after, nothing in flight, no error logged)."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.conftest import Sidecar, StartSidecar, metric
from tests.grpc_fixtures import GrpcApp, sidecar_for
from tests.h2client import PREFACE, RawH2

PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x1, 0x3, 0x6
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar, grpc_app: GrpcApp) -> Sidecar:
    return await sidecar_for(start_sidecar, grpc_app, {"client": {"header_timeout": "1s"}})


async def goaway_then_close(client: RawH2, code: int) -> GoAwayFrame:
    try:
        frame = await client.wait(lambda f: isinstance(f, GoAwayFrame) and f.error_code == code)
        await client.wait_eof()
    finally:
        await client.close()
    return frame


async def assert_still_serving(sidecar: Sidecar) -> None:
    client = await RawH2.open(sidecar.port)
    answer = await client.response(client.request("/test.Echo/Unary", b"after"))
    assert answer["trailers"]["grpc-status"] == "0"
    await client.close()
    async with aiohttp.ClientSession() as s:
        assert await metric(s, sidecar.admin, "sidecar_requests_in_flight") == 0
    bad = [line for line in sidecar.raw if "Traceback" in line or '"level": "error"' in line]
    assert not bad, bad


async def served(port: int) -> RawH2:
    """A connection whose server preface (the app's SETTINGS) has arrived."""
    client = await RawH2.open(port)
    await client.wait(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags)
    return client


async def test_bad_preface_is_answered_as_http1_and_closed(sidecar: Sidecar, grpc_app) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), data
    assert grpc_app.calls() == []
    await assert_still_serving(sidecar)


async def test_preface_then_silence_is_closed_at_the_header_timeout(sidecar: Sidecar) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(PREFACE)
    await asyncio.wait_for(reader.read(), 10)  # closed (after the app's SETTINGS, if it came)
    writer.close()
    await writer.wait_closed()
    await sidecar.wait_log("request head timeout", protocol="h2")
    await assert_still_serving(sidecar)


async def test_oversized_frame_is_frame_size_error_without_buffering_it(sidecar: Sidecar) -> None:
    client = await served(sidecar.port)
    client.send_raw(struct.pack(">I", 0xFFFFFF)[1:] + b"\x00\x00" + struct.pack(">I", 1) + b"x" * 100)
    await goaway_then_close(client, FRAME_SIZE_ERROR)
    await assert_still_serving(sidecar)


async def test_settings_flood_is_enhance_your_calm(sidecar: Sidecar) -> None:
    client = await served(sidecar.port)
    client.send(*[SettingsFrame(0, settings={4: 65535}) for _ in range(5000)])
    await goaway_then_close(client, ENHANCE_YOUR_CALM)
    await assert_still_serving(sidecar)


async def test_ping_flood_is_enhance_your_calm(sidecar: Sidecar) -> None:
    client = await served(sidecar.port)
    client.send(*[PingFrame(0, opaque_data=b"%08d" % i) for i in range(5000)])
    await goaway_then_close(client, ENHANCE_YOUR_CALM)
    await assert_still_serving(sidecar)


async def test_rapid_reset_is_enhance_your_calm(sidecar: Sidecar) -> None:
    """CVE-2023-44487: streams opened and reset at once, thousands of them."""
    client = await served(sidecar.port)
    for _ in range(3000):
        sid = client.request("/test.Echo/Slow", b"10", end=False)
        client.send(RstStreamFrame(sid, error_code=0x8))
    await goaway_then_close(client, ENHANCE_YOUR_CALM)
    await assert_still_serving(sidecar)


async def test_continuation_flood_is_enhance_your_calm(sidecar: Sidecar, grpc_app) -> None:
    """CVE-2024-27316: a header block that never ends is bounded, and never reaches the app."""
    client = await served(sidecar.port)
    block = client.encoder.encode([(":method", "POST"), (":scheme", "http"),
                                   (":path", "/test.Echo/Unary"), (":authority", "x")])
    client.send(HeadersFrame(1, data=block))
    client.send(*[ContinuationFrame(1, data=b"\x40\x01a\x01b") for _ in range(20000)])
    goaway = await goaway_then_close(client, ENHANCE_YOUR_CALM)
    assert goaway.last_stream_id == 0
    assert grpc_app.calls() == []
    await assert_still_serving(sidecar)


async def test_frame_inside_a_header_block_is_protocol_error(sidecar: Sidecar) -> None:
    client = await served(sidecar.port)
    client.send(HeadersFrame(1, data=client.encoder.encode([(":method", "GET")])),
                DataFrame(1, data=b"x"))
    await goaway_then_close(client, PROTOCOL_ERROR)
    await assert_still_serving(sidecar)


async def test_stream_id_reuse_and_decrease_are_protocol_errors(sidecar: Sidecar) -> None:
    client = await served(sidecar.port)
    sid = client.request("/test.Echo/Unary", b"one")
    await client.response(sid)
    client.request("/test.Echo/Unary", b"again", stream_id=sid)
    await goaway_then_close(client, PROTOCOL_ERROR)

    client = await served(sidecar.port)
    client.request("/test.Echo/Slow", b"0.5", stream_id=5)
    client.request("/test.Echo/Unary", b"lower", stream_id=3)
    goaway = await goaway_then_close(client, PROTOCOL_ERROR)
    assert goaway.last_stream_id == 5
    client = await served(sidecar.port)
    client.request("/test.Echo/Unary", b"even", stream_id=2)
    await goaway_then_close(client, PROTOCOL_ERROR)
    await assert_still_serving(sidecar)


async def test_connection_window_overflow_is_flow_control_error(sidecar: Sidecar) -> None:
    """Flow control is end to end, but a WINDOW_UPDATE that would take the app's
    connection window over 2^31-1 is caught by the sidecar (grpcio ignores it)."""
    client = await served(sidecar.port)
    client.send(WindowUpdateFrame(0, window_increment=2**31 - 1),
                WindowUpdateFrame(0, window_increment=2**31 - 1))
    await goaway_then_close(client, FLOW_CONTROL_ERROR)
    await assert_still_serving(sidecar)


async def test_streams_over_the_per_connection_cap_are_refused(sidecar: Sidecar, grpc_app) -> None:
    """At most 1000 open streams per connection; the next is refused (REFUSED_STREAM,
    safe to retry) without reaching the app, and the connection goes on."""
    client = await served(sidecar.port)
    for _ in range(1000):  # requests whose message never comes: the app has not started them
        client.request("/test.Echo/Unary", end=False)
    over = client.request("/test.Echo/Unary", b"over")
    reset = await client.wait(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == over)
    assert reset.error_code == 0x7
    client.send(*[RstStreamFrame(sid, error_code=0x8) for sid in range(1, over, 2)])
    answer = await client.response(client.request("/test.Echo/Unary", b"after"))
    assert answer["trailers"]["grpc-status"] == "0"
    assert b"over" not in b"".join(str(c).encode() for c in grpc_app.calls())
    await client.close()
    await assert_still_serving(sidecar)


async def test_preface_split_across_reads_is_still_http2(sidecar: Sidecar) -> None:
    client = await RawH2.open(sidecar.port, preface=False)
    settings = bytes(SettingsFrame(0).serialize())  # with the last piece: it must come first
    for piece in (PREFACE[:3], PREFACE[3:17], PREFACE[17:] + settings):
        client.send_raw(piece)
        await client.writer.drain()
        await asyncio.sleep(0.05)  # separate reads on the sidecar's side
    answer = await client.response(client.request("/test.Echo/Unary", b"split"))
    assert answer["trailers"]["grpc-status"] == "0"
    await client.close()
