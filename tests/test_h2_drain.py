"""The drain, HTTP/2's way (RFC 9113 §6.8), seen on the wire by a raw HTTP/2 client:
GOAWAY(2^31-1) then PING at the trigger, the final GOAWAY naming the last stream at
``closing``, REFUSED_STREAM for a stream opened after it (which the app never sees),
RST_STREAM CANCEL at the drain deadline (counted aborted), and the app's own GOAWAY
reaching the client."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import hpack
import pytest
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.conftest import Sidecar, StartSidecar, free_port, metric, wait_port
from tests.grpc_fixtures import GrpcApp, StartGrpcApp, sidecar_for
from tests.h2client import RawH2, grpc_message

MAX_ID = 2**31 - 1
OURS = b"sidecar\x00"  # the drain PING's payload (the app sends PINGs of its own)
REFUSED_STREAM, CANCEL = 0x7, 0x8


async def trigger(sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as s, s.post(sidecar.admin + "/drain?wait=false") as r:
        assert r.status == 202


def goaways(client: RawH2) -> list[tuple[int, int]]:
    return [(f.last_stream_id, f.error_code) for f in client.of(GoAwayFrame)]


async def test_double_goaway_then_refused_stream_never_reaches_the_app(
        start_sidecar: StartSidecar, grpc_app: GrpcApp) -> None:
    """In flight at the trigger: stream 1 (a 2 s call) completes.  The client gets
    GOAWAY(2^31-1, NO_ERROR), a PING, then at closing GOAWAY(1); stream 3, opened after,
    gets REFUSED_STREAM, is counted rejected, and the app's log shows it never came."""
    sidecar = await sidecar_for(start_sidecar, grpc_app, {
        "drain": {"delay": "1s", "timeout": "10s", "linger": "10s"}})
    client = await RawH2.open(sidecar.port)
    slow = client.request("/test.Echo/Slow", b"2", extra=[("x-id", "slow")])
    await grpc_app.wait_call("Slow", "start")

    await trigger(sidecar)
    first = await client.wait(lambda f: isinstance(f, GoAwayFrame))
    assert (first.last_stream_id, first.error_code) == (MAX_ID, 0)
    ping = await client.wait(lambda f: isinstance(f, PingFrame) and f.opaque_data == OURS)
    assert client.frames.index(ping) > client.frames.index(first)

    final = await client.wait(lambda f: isinstance(f, GoAwayFrame) and f.last_stream_id != MAX_ID)
    assert (final.last_stream_id, final.error_code) == (slow, 0)
    late = client.request("/test.Echo/Unary", b"late", extra=[("x-id", "late")])
    reset = await client.wait(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == late)
    assert reset.error_code == REFUSED_STREAM

    answer = await client.response(slow)
    assert answer["headers"][":status"] == "200" and answer["trailers"]["grpc-status"] == "0"
    await client.wait_eof()  # no stream left after the final GOAWAY: the connection ends
    assert goaways(client) == [(MAX_ID, 0), (slow, 0)]
    assert [c["method"] for c in grpc_app.calls()] == ["Slow"]  # never saw "late"

    await sidecar.wait_log("drain finished", timeout=20)
    async with aiohttp.ClientSession() as s:
        assert await metric(s, sidecar.admin,
                            'sidecar_requests_rejected_total{reason="draining"}') == 1
        assert await metric(s, sidecar.admin,
                            'sidecar_requests_total{code="200",method="POST"}') == 1
    summary = await sidecar.wait_log("drain finished")
    assert (summary["completed"], summary["rejected"], summary["aborted"]) == (1, 1, 0)
    await client.close()


async def test_stream_still_running_at_the_drain_deadline_is_cancelled_both_ways(
        start_sidecar: StartSidecar, grpc_app: GrpcApp) -> None:
    sidecar = await sidecar_for(start_sidecar, grpc_app, {
        "drain": {"delay": "200ms", "timeout": "1s", "linger": "10s"}})
    client = await RawH2.open(sidecar.port)
    slow = client.request("/test.Echo/Slow", b"60")
    await grpc_app.wait_call("Slow", "start")
    await trigger(sidecar)
    reset = await client.wait(lambda f: isinstance(f, RstStreamFrame), timeout=15)
    assert (reset.stream_id, reset.error_code) == (slow, CANCEL)
    await grpc_app.wait_call("Slow", "cancelled")  # the app's side was reset too
    line = await sidecar.wait_log("aborting request at the drain deadline")
    assert line["path"] == "/test.Echo/Slow"
    summary = await sidecar.wait_log("drain finished", timeout=20)
    assert summary["aborted"] == 1
    async with aiohttp.ClientSession() as s:
        assert await metric(s, sidecar.admin,
                            'sidecar_requests_aborted_total{reason="drain_timeout"}') == 1
        assert await metric(s, sidecar.admin, "sidecar_requests_in_flight") == 0
    await client.close()


async def test_connection_made_while_draining_is_served_and_told_at_its_first_stream(
        start_sidecar: StartSidecar, grpc_app: GrpcApp) -> None:
    """A client whose endpoints still list the pod connects during drain.delay: it is not told
    GOAWAY before it has opened a stream (a gRPC client would then never use the connection);
    its first stream is forwarded and followed by GOAWAY(2^31-1) and the PING; a stream it
    opens after reading them is still forwarded (2^31-1); both are answered by the app."""
    sidecar = await sidecar_for(start_sidecar, grpc_app, {"drain": {"delay": "5s"}})
    await trigger(sidecar)
    await sidecar.wait_log("state draining")
    client = await RawH2.open(sidecar.port)
    await client.wait(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags)
    client.send(PingFrame(0, opaque_data=b"roundtrp"))  # the app's ACK follows anything sent
    await client.wait(lambda f: isinstance(f, PingFrame) and f.opaque_data == b"roundtrp")
    assert client.of(GoAwayFrame) == [], client.summary()

    first = client.request("/test.Echo/Unary", b"first")
    goaway = await client.wait(lambda f: isinstance(f, GoAwayFrame))
    assert (goaway.last_stream_id, goaway.error_code) == (MAX_ID, 0)
    ping = await client.wait(lambda f: isinstance(f, PingFrame) and f.opaque_data == OURS)
    assert client.frames.index(ping) > client.frames.index(goaway)
    second = client.request("/test.Echo/Unary", b"second")
    for sid in (first, second):
        answer = await client.response(sid)
        assert answer["trailers"]["grpc-status"] == "0", client.summary()
    assert [c["method"] for c in grpc_app.calls()] == ["Unary", "Unary"]
    assert goaways(client) == [(MAX_ID, 0)]
    await client.close()


async def test_grpc_client_connecting_while_draining_gets_its_calls_served(
        start_sidecar: StartSidecar, grpc_app: GrpcApp) -> None:
    """A real grpcio channel (retries off, so no retry hides a failure) opened during
    drain.delay: each call is served by the app, not failed UNAVAILABLE. (Told GOAWAY with the
    server's SETTINGS, grpcio never sent a call on the connection and reconnected until closing.)"""
    sidecar = await sidecar_for(start_sidecar, grpc_app, {"drain": {"delay": "10s", "timeout": "10s"}})
    await trigger(sidecar)
    await sidecar.wait_log("state draining")
    for n in range(3):  # each call on a new channel, and the channel reconnects after GOAWAY
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}",
                                             options=[("grpc.enable_retries", 0)]) as ch:
            for m in range(2):
                body = f"{n}-{m}".encode()
                assert await ch.unary_unary("/test.Echo/Unary")(body, timeout=10) == body
    assert [c["method"] for c in grpc_app.calls()] == ["Unary"] * 6
    async with aiohttp.ClientSession() as s, s.get(sidecar.admin + "/status") as r:
        assert (await r.json())["state"] == "draining"  # served by draining, not after it


async def test_the_apps_goaway_reaches_the_client(
        start_sidecar: StartSidecar, start_grpc_app: StartGrpcApp) -> None:
    """The app shuts down on its own (grpcio's graceful stop): its GOAWAY is passed on,
    the stream in flight completes, and the connection then ends."""
    app = await start_grpc_app("--grace", "5")
    sidecar = await sidecar_for(start_sidecar, app)
    client = await RawH2.open(sidecar.port)
    slow = client.request("/test.Echo/Slow", b"1")
    await app.wait_call("Slow", "start")
    app.terminate()
    goaway = await client.wait(lambda f: isinstance(f, GoAwayFrame))
    assert goaway.error_code == 0
    answer = await client.response(slow)
    assert answer["trailers"]["grpc-status"] == "0"
    await client.wait_eof(timeout=15)
    await sidecar.wait_log("the app sent GOAWAY")
    await client.close()


async def test_refused_stream_that_changed_the_hpack_table_does_not_desync_the_app(
        start_sidecar: StartSidecar, grpc_app: GrpcApp) -> None:
    """RFC 9113 §4.3: a refused stream's header block never reaches the app, but it added
    ``x-new`` to the client's HPACK table.  The in-flight stream's trailers then name
    ``x-first`` by its index in the client's table (63), an index the app's table does not
    have: forwarded unchanged they would be a COMPRESSION_ERROR for the whole connection.
    The sidecar re-encodes them, and the call completes."""
    sidecar = await sidecar_for(start_sidecar, grpc_app, {
        "drain": {"delay": "500ms", "timeout": "10s"}})
    client = await RawH2.open(sidecar.port)

    def block(path: str, extra: tuple[str, str]) -> bytes:
        plain = [(":method", "POST"), (":scheme", "http"), (":path", path),
                 (":authority", "t"), ("content-type", "application/grpc"), ("te", "trailers")]
        fields = [hpack.NeverIndexedHeaderTuple(n, v) for n, v in plain]
        return client.encoder.encode([*fields[:4], extra, *fields[4:]])

    client.send(HeadersFrame(1, data=block("/test.Echo/Upload", ("x-first", "1")),
                             flags=["END_HEADERS"]),
                DataFrame(1, data=grpc_message(b"abc")))
    await grpc_app.wait_call("Upload", "start")
    await trigger(sidecar)
    await client.wait(lambda f: isinstance(f, GoAwayFrame) and f.last_stream_id == 1)
    client.send(HeadersFrame(3, data=block("/test.Echo/Unary", ("x-new", "v")),
                             flags=["END_HEADERS", "END_STREAM"]))
    reset = await client.wait(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == 3)
    assert reset.error_code == REFUSED_STREAM
    assert client.encoder.header_table.search(b"x-first", b"1")[0] == 63  # x-new is 62
    client.send(HeadersFrame(1, data=bytes([0x80 | 63]), flags=["END_HEADERS", "END_STREAM"]))
    answer = await client.response(1)
    assert answer["trailers"]["grpc-status"] == "0", client.summary()
    assert b"1:3" in answer["data"]
    assert [(g.last_stream_id, g.error_code) for g in client.of(GoAwayFrame)] == [
        (MAX_ID, 0), (1, 0)]
    await client.close()


async def test_final_goaway_comes_even_if_the_client_never_acks_the_ping(
        start_sidecar: StartSidecar, grpc_app: GrpcApp) -> None:
    """The final GOAWAY waits for the PING's ACK (the proof the client saw the first
    GOAWAY), but only briefly: a client that never answers still gets it."""
    sidecar = await sidecar_for(start_sidecar, grpc_app, {"drain": {"delay": "300ms"}})
    client = await RawH2.open(sidecar.port, ack_pings=False)
    sid = client.request("/test.Echo/Slow", b"3")
    await grpc_app.wait_call("Slow", "start")
    await trigger(sidecar)
    await client.wait(lambda f: isinstance(f, PingFrame) and f.opaque_data == OURS)
    final = await client.wait(lambda f: isinstance(f, GoAwayFrame) and f.last_stream_id == sid)
    assert final.error_code == 0
    assert (await client.response(sid))["trailers"]["grpc-status"] == "0"
    await client.wait_eof()
    await client.close()


@pytest.fixture
async def nghttpd(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """nghttp2's HTTP/2 server (h2c), logging every frame it receives."""
    if not shutil.which("nghttpd"):
        pytest.skip("nghttpd is not installed")
    (tmp_path / "index.html").write_text("hello\n")
    port, log = free_port(), tmp_path / "nghttpd.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "nghttpd", "-v", "--no-tls", "-d", str(tmp_path), str(port),
            stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
    try:
        await wait_port(port)
        yield port, log
    finally:
        proc.kill()
        await proc.wait()


async def test_the_drain_ping_ack_is_not_forwarded_but_the_clients_pings_are(
        start_sidecar: StartSidecar, nghttpd: tuple[int, Path]) -> None:
    """Any h2c app (nghttpd here): requests pass; the client's PING reaches the app and its
    ACK comes back; the ACK of the sidecar's own PING is the sidecar's, never the app's."""
    port, log = nghttpd
    sidecar = await start_sidecar({"drain": {"delay": "5s"}}, upstream=f"http://127.0.0.1:{port}")
    client = await RawH2.open(sidecar.port)
    answer = await client.response(client.request("/index.html", method="GET", grpc=False))
    assert (answer["headers"][":status"], answer["data"]) == ("200", b"hello\n")
    client.send(PingFrame(0, opaque_data=b"abcdefgh"))
    await client.wait(lambda f: isinstance(f, PingFrame) and f.opaque_data == b"abcdefgh")
    await trigger(sidecar)
    await client.wait(lambda f: isinstance(f, PingFrame) and f.opaque_data == OURS)
    answer = await client.response(client.request("/index.html", method="GET", grpc=False))
    assert answer["headers"][":status"] == "200"  # after our ACK went out
    seen = log.read_text()
    assert "opaque_data=6162636465666768" in seen  # the client's PING reached the app
    assert OURS.hex() not in seen  # the ACK of ours did not
    await client.close()
