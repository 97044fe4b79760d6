"""gRPC through the proxy port (h2c with prior knowledge), with real grpcio clients and a
real grpcio app: every kind of call, metadata and trailers, status codes, deadlines and
cancellation, 16 MiB messages, 500 concurrent streams on one channel; each stream is a
request in the metrics and the access log; HTTP/1.1 on the same port is unchanged."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import aiohttp
import grpc
import grpc.aio
import hpack
import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame

from tests.conftest import StartSidecar, free_port, metric
from tests.grpc_fixtures import GrpcApp, sidecar_for
from tests.h2client import PREFACE, RawH2, grpc_message

MAX = 32 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX),
           ("grpc.enable_retries", 0)]


@pytest.fixture
async def channel(start_sidecar: StartSidecar, grpc_app: GrpcApp) -> AsyncIterator[grpc.aio.Channel]:
    sidecar = await sidecar_for(start_sidecar, grpc_app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}", options=OPTIONS) as ch:
        ch.sidecar = sidecar  # type: ignore[attr-defined]
        yield ch


def unary(ch: grpc.aio.Channel, name: str = "Unary") -> grpc.aio.UnaryUnaryMultiCallable:
    return ch.unary_unary(f"/test.Echo/{name}")


async def test_unary_call_passes_with_its_metadata_and_trailers(channel, grpc_app) -> None:
    call = unary(channel)(b"hello", metadata=(("x-echo-a", "1"), ("x-id", "u1")), timeout=10)
    assert await call == b"hello"
    assert ("x-echo-a", "1") in tuple(await call.initial_metadata())
    assert ("x-trailer", "done") in tuple(await call.trailing_metadata())
    assert await call.code() == grpc.StatusCode.OK
    assert [c["x-id"] for c in grpc_app.calls() if c["method"] == "Unary"] == ["u1"]


@pytest.mark.parametrize("code", ["NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED",
                                  "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED"])
async def test_error_status_and_details_reach_the_client_trailers_only(channel, code) -> None:
    """A trailers-only response (HEADERS with END_STREAM and grpc-status) stays one."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(channel, "Fail")(f"{code}:details of {code}".encode(), timeout=10)
    assert err.value.code() == grpc.StatusCode[code]
    assert err.value.details() == f"details of {code}"


async def test_client_server_and_bidi_streaming(channel) -> None:
    upload = channel.stream_unary("/test.Echo/Upload")
    assert await upload(iter([b"a" * 1000] * 50), timeout=10) == b"50:50000"

    download = channel.unary_stream("/test.Echo/Download")
    got = [m async for m in download(b"200:1000", timeout=10)]
    assert len(got) == 200 and all(len(m) == 1000 for m in got)

    chat = channel.stream_stream("/test.Echo/Chat")(timeout=10)
    for i in range(20):
        await chat.write(b"m%d" % i)
        assert await chat.read() == b"m%d" % i
    await chat.done_writing()
    assert await chat.code() == grpc.StatusCode.OK


async def test_16_mib_messages_both_ways(channel) -> None:
    """Flow control stays end to end: a message far over every window passes whole."""
    big = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    assert await unary(channel)(big, timeout=60) == big
    download = channel.unary_stream("/test.Echo/Download")
    got = [m async for m in download(b"2:%d" % (16 * 1024 * 1024), timeout=60)]
    assert [len(m) for m in got] == [16 * 1024 * 1024] * 2


async def test_500_concurrent_streams_on_one_channel(channel, grpc_app) -> None:
    calls = [unary(channel)(b"%d" % i, timeout=60) for i in range(500)]
    assert await asyncio.gather(*calls) == [b"%d" % i for i in range(500)]
    sidecar = channel.sidecar
    async with aiohttp.ClientSession() as s:
        assert await metric(s, sidecar.admin,
                            'sidecar_requests_total{code="200",method="POST"}') == 500
        assert await metric(s, sidecar.admin, "sidecar_requests_in_flight") == 0


async def test_deadline_and_cancellation_reach_the_app(channel, grpc_app) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(channel, "Slow")(b"30", timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await grpc_app.wait_call("Slow", "cancelled")

    call = unary(channel, "Slow")(b"30", timeout=30)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(grpc_app.calls("start")) < 2 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    deadline = loop.time() + 10
    while len(grpc_app.calls("cancelled")) < 2 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert len(grpc_app.calls("cancelled")) == 2
    sidecar = channel.sidecar
    async with aiohttp.ClientSession() as s:
        assert await metric(s, sidecar.admin, "sidecar_requests_in_flight") == 0


async def test_each_stream_is_counted_and_logged_with_its_path(channel) -> None:
    await unary(channel)(b"x", timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await unary(channel, "Fail")(b"NOT_FOUND:nope", timeout=10)
    sidecar = channel.sidecar
    line = await sidecar.wait_log("POST /test.Echo/Fail")
    assert line["status"] == 200 and line["path"] == "/test.Echo/Fail"
    line = await sidecar.wait_log("POST /test.Echo/Unary")
    assert line["status"] == 200
    async with aiohttp.ClientSession() as s:
        assert await metric(s, sidecar.admin,
                            'sidecar_requests_total{code="200",method="POST"}') == 2
        assert await metric(s, sidecar.admin,
                            'sidecar_request_duration_seconds_count{method="POST"}') == 2
        async with s.get(sidecar.admin + "/status") as resp:
            assert (await resp.json())["connections"] == 1  # the channel's h2 connection


async def test_app_unreachable_is_502_unavailable_for_the_grpc_client(start_sidecar) -> None:
    sidecar = await start_sidecar({"logging": {"access_log": True}},
                                  upstream=f"http://127.0.0.1:{free_port()}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}", options=OPTIONS) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(ch)(b"x", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "502" in (err.value.details() or "")
    line = await sidecar.wait_log("POST /test.Echo/Unary")
    assert line["status"] == 502
    await sidecar.wait_log("upstream error", kind="connect")


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
async def test_curl_http2_prior_knowledge_and_http1_share_the_port(start_sidecar, upstream) -> None:
    """The issue's reproduction: curl --http2-prior-knowledge through the proxy port got an
    empty reply.  Here the app speaks HTTP/1.1 only, so the h2 stream gets a 502 (the app
    does not speak h2c), while HTTP/1.1 on the same port is answered by the app."""
    from tests.conftest import upstream_url
    sidecar = await start_sidecar(upstream=upstream_url(upstream))
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
        "--http2-prior-knowledge", sidecar.url + "/headers", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert out.decode() == "2 502"
    async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/headers") as resp:
        assert resp.status == 200 and resp.version == aiohttp.HttpVersion11


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
async def test_curl_http2_prior_knowledge_reaches_an_h2c_app(start_sidecar, grpc_app) -> None:
    sidecar = await sidecar_for(start_sidecar, grpc_app)
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
        "--http2-prior-knowledge", "-H", "content-type: application/grpc", "-H", "te: trailers",
        "--data-binary", "@-", sidecar.url + "/test.Echo/Unary",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(b"\x00\x00\x00\x00\x02hi"), 20)
    assert out.decode() == "2 200"
    assert [c["method"] for c in grpc_app.calls()] == ["Unary"]


async def test_upstream_timeout_bounds_the_wait_for_response_headers_only(
        start_sidecar, grpc_app) -> None:
    """``upstream.timeout`` is the time from the end of the request to the response
    headers, not the stream's length: a call whose answer is late gets 504 (gRPC:
    UNAVAILABLE) and is cancelled at the app; a client stream that takes longer than the
    timeout to send, and a stream that has its headers, run on."""
    sidecar = await sidecar_for(start_sidecar, grpc_app, {"upstream": {"timeout": "1s"}})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}", options=OPTIONS) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(ch, "Slow")(b"5", timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "504" in (err.value.details() or "")
        await grpc_app.wait_call("Slow", "cancelled")

        async def slow_upload() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"x" * 10
                await asyncio.sleep(0.6)  # 1.8 s of sending, over upstream.timeout

        upload = ch.stream_unary("/test.Echo/Upload")
        assert await upload(slow_upload(), timeout=20) == b"3:30"
        chat = ch.stream_stream("/test.Echo/Chat")(timeout=20)
        await chat.write(b"first")
        assert await chat.read() == b"first"
        await asyncio.sleep(1.5)  # past upstream.timeout, on a stream that has its headers
        await chat.write(b"later")
        assert await chat.read() == b"later"
        await chat.done_writing()
        assert await chat.code() == grpc.StatusCode.OK
    await sidecar.wait_log("upstream error", kind="timeout")


async def test_unix_socket_app(start_sidecar, start_grpc_app, tmp_path) -> None:
    sock = tmp_path / "grpc.sock"
    await start_grpc_app("--unix", str(sock))
    sidecar = await start_sidecar(upstream=f"unix:{sock}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}", options=OPTIONS) as ch:
        assert await unary(ch)(b"over a unix socket", timeout=10) == b"over a unix socket"


async def test_idle_connection_gets_goaway_at_the_idle_timeout(start_sidecar, grpc_app) -> None:
    """``client.idle_timeout``: no stream that long, the connection is ended with a GOAWAY
    naming its last stream (the client reconnects when it needs to)."""
    sidecar = await sidecar_for(start_sidecar, grpc_app, {"client": {"idle_timeout": "1s"}})
    client = await RawH2.open(sidecar.port)
    sid = client.request("/test.Echo/Unary", b"x")
    assert (await client.response(sid))["trailers"]["grpc-status"] == "0"
    goaway = await client.wait(lambda f: isinstance(f, GoAwayFrame))
    assert (goaway.last_stream_id, goaway.error_code) == (sid, 0)
    await client.wait_eof()
    await client.close()


async def test_streams_while_starting_get_503_and_never_reach_the_app(
        start_sidecar, grpc_app) -> None:
    """Before the app is healthy (here its HTTP health path never answers), a stream gets
    503 with Retry-After (gRPC: UNAVAILABLE), is counted rejected as starting, and the app
    never sees it; the connection is kept, and its HPACK state with the app stays right."""
    sidecar = await sidecar_for(start_sidecar, grpc_app, {"upstream": {"health_path": "/h"}})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}", options=OPTIONS) as ch:
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(b"x", metadata=(("x-id", "early"),), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "503" in (err.value.details() or "")
    assert grpc_app.calls() == []
    async with aiohttp.ClientSession() as s:
        assert await metric(s, sidecar.admin,
                            'sidecar_requests_rejected_total{reason="starting"}') == 2


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_client_that_stops_reading_holds_no_memory_in_the_proxy(
        start_sidecar, grpc_app) -> None:
    """A client that opens every window wide (2^31-1) and then stops reading: the app
    would send 256 MiB, but the sidecar stops reading the app while the client's socket
    is full, so its memory stays flat; the download then completes when the client reads."""
    sidecar = await sidecar_for(start_sidecar, grpc_app)
    before = rss_kib(sidecar.proc.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"),
                                    (":path", "/test.Echo/Download"), (":authority", "t"),
                                    ("content-type", "application/grpc"), ("te", "trailers")])
    frames = [SettingsFrame(0, settings={4: 2**31 - 1}),
              WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535),
              HeadersFrame(1, data=block, flags=["END_HEADERS"]),
              DataFrame(1, data=grpc_message(b"256:1048576"), flags=["END_STREAM"])]
    writer.write(PREFACE + b"".join(bytes(f.serialize()) for f in frames))
    await grpc_app.wait_call("Download", "start")
    await asyncio.sleep(3)  # the app writes as fast as it can; nobody reads
    grown = rss_kib(sidecar.proc.pid) - before
    assert grown < 48 * 1024, f"the sidecar grew by {grown} KiB while the client did not read"
    total = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
        total += len(chunk)
        if total > 256 * 1048576:
            break
    assert total > 256 * 1048576
    writer.close()
    await writer.wait_closed()
