"""Hostile input on the proxy port: each is answered 4xx or closed, nothing malformed
reaches the app, and the sidecar keeps serving (in-flight back to 0, no traceback)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    Sidecar,
    StartSidecar,
    raw_request,
    statuses,
    upstream_events,
    upstream_url,
)

MALFORMED = {
    "content-length-and-transfer-encoding":
        b"POST /headers?id=m HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-content-length":
        b"POST /headers?id=m HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "duplicate-equal-content-length":
        b"POST /headers?id=m HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "signed-content-length":
        b"POST /headers?id=m HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "chunk-size-not-hex":
        b"POST /headers?id=m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-negative":
        b"POST /headers?id=m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow":
        b"POST /headers?id=m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "transfer-coding-other-than-chunked":
        b"POST /headers?id=m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "obsolete-line-folding": b"GET /headers?id=m HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n",
    "nul-in-header": b"GET /headers?id=m HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bare-cr-in-header": b"GET /headers?id=m HTTP/1.1\r\nHost: x\r\nX-A: a\rb: c\r\n\r\n",
    "space-before-colon": b"GET /headers?id=m HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
    "request-line-64-kib": b"GET /headers?id=m&" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header-64-kib": b"GET /headers?id=m HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 65536 + b"\r\n\r\n",
    "10000-headers": b"GET /headers?id=m HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"X-%d: v\r\n" % i for i in range(10_000)) + b"\r\n",
    "authority-form-target": b"GET evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    "connect": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    "asterisk-form-target": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "http-1.1-without-host": b"GET /headers?id=m HTTP/1.1\r\n\r\n",
    "two-host-headers": b"GET /headers?id=m HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "unknown-http-version": b"GET /headers?id=m HTTP/1.2\r\nHost: x\r\n\r\n",
    "http2-preface-on-http1": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "binary-garbage": bytes(range(256)) * 4,
}


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar, upstream) -> Sidecar:  # type: ignore[no-untyped-def]
    return await start_sidecar({"client": {"header_timeout": "2s"}}, upstream=upstream_url(upstream))


async def read_all(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes | None:
    """Everything until the sidecar closes the connection; None if it reset it."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return None


async def metric(admin: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(admin + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def assert_still_serving(sidecar: Sidecar, upstream: Any) -> None:
    """A normal request succeeds, in-flight is back to 0, and nothing was logged as an error."""
    async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/headers?id=after") as resp:
        assert resp.status == 200
    assert await metric(sidecar.admin, "sidecar_requests_in_flight") == 0
    bad = [line for line in sidecar.raw if "Traceback" in line or '"level": "error"' in line]
    assert not bad, bad


def app_ids(upstream: Any) -> list[str | None]:
    return [e["id"] for e in upstream_events(upstream) if e["event"] == "received"]


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_request_is_refused_and_never_reaches_the_app(sidecar, upstream, name) -> None:
    """Request smuggling and parser-confusion shapes get a 4xx (or a closed connection),
    the app never sees them, and the sidecar keeps serving."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", sidecar.port), 10)
    try:
        writer.write(MALFORMED[name])
        await writer.drain()
    except ConnectionError:
        pass  # the sidecar answered and closed before reading it all: fine
    data = await read_all(reader)
    writer.close()
    codes = statuses(data)
    assert all(400 <= code < 500 for code in codes), data
    assert len(codes) <= 1, data
    assert app_ids(upstream) == [], upstream_events(upstream)
    await assert_still_serving(sidecar, upstream)


async def test_bad_request_is_one_info_line_without_traceback(sidecar, upstream) -> None:
    reader, writer = await raw_request(sidecar.port, MALFORMED["content-length-and-transfer-encoding"])
    assert statuses(await read_all(reader)) == [400]
    writer.close()
    entry = await sidecar.wait_log("bad request")
    assert entry["level"] == "info" and entry["status"] == 400 and "exc" not in entry


async def test_absolute_form_target_reaches_the_app_in_origin_form_with_its_host(sidecar, upstream) -> None:
    """RFC 9112 3.2.2: the target's authority replaces the Host header."""
    reader, writer = await raw_request(
        sidecar.port, b"GET http://app.example:8080/headers?id=abs HTTP/1.1\r\nHost: other\r\n"
                      b"Connection: close\r\n\r\n")
    data = await read_all(reader)
    writer.close()
    assert statuses(data) == [200]
    assert data is not None
    seen = json.loads(data.split(b"\r\n\r\n", 1)[1])
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["raw_path"] == "/headers?id=abs"
    assert headers["host"] == "app.example:8080"
    await assert_still_serving(sidecar, upstream)


async def test_http_1_0_without_keep_alive_is_answered_and_closed(sidecar, upstream) -> None:
    reader, writer = await raw_request(sidecar.port, b"GET /headers?id=h10 HTTP/1.0\r\n\r\n")
    data = await read_all(reader)  # returns only because the sidecar closed the connection
    writer.close()
    assert statuses(data) == [200]
    assert app_ids(upstream) == ["h10"]
    await assert_still_serving(sidecar, upstream)


async def test_http_1_0_with_keep_alive_serves_two_requests_on_one_connection(sidecar, upstream) -> None:
    request = b"GET /headers?id=%s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    reader, writer = await raw_request(sidecar.port, request % b"ka1")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.0 200") and b"Connection: keep-alive" in head
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    await asyncio.wait_for(reader.readexactly(length), 10)
    writer.write(request % b"ka2")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.0 200")
    writer.close()
    assert app_ids(upstream) == ["ka1", "ka2"]
    await assert_still_serving(sidecar, upstream)


async def test_http_0_9_request_is_closed_without_reaching_the_app(start_sidecar, upstream) -> None:
    """An HTTP/0.9 request line never becomes a complete HTTP/1 head: the header timeout
    closes it (idle timeout set far longer, so it is the header timeout that acts)."""
    sidecar = await start_sidecar({"client": {"header_timeout": "500ms", "idle_timeout": "60s"}},
                                  upstream=upstream_url(upstream))
    reader, writer = await raw_request(sidecar.port, b"GET /headers?id=h09\r\n")
    data = await read_all(reader)
    writer.close()
    assert all(400 <= code < 500 for code in statuses(data)), data
    assert app_ids(upstream) == []
    await assert_still_serving(sidecar, upstream)


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "two-writes"])
async def test_pipeline_with_a_malformed_request_in_the_middle(sidecar, upstream, split) -> None:
    """Requests before the malformed one may be answered; the malformed one gets 400 and
    the connection closes: nothing from it or after it reaches the app."""
    good = b"GET /headers?id=p%d HTTP/1.1\r\nHost: x\r\n\r\n"
    first = good % 1 + good % 2
    rest = b"GET /headers?id=bad HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n" + good % 3
    reader, writer = await raw_request(sidecar.port, first if split else first + rest)
    if split:
        for _ in range(2):  # the two good ones are answered before the rest is sent
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await asyncio.wait_for(reader.readexactly(length), 10)
        writer.write(rest)
    data = await read_all(reader)
    writer.close()
    codes = ([200, 200] if split else []) + statuses(data)
    assert codes[-1] == 400 and set(codes[:-1]) <= {200}, codes
    answered = ["p1", "p2"][: len(codes) - 1]
    assert app_ids(upstream) == answered
    await assert_still_serving(sidecar, upstream)


async def test_slowloris_is_cut_at_header_timeout_with_408(start_sidecar, upstream) -> None:
    """A client trickling its head never holds a connection longer than client.header_timeout
    (idle timeout set far longer, so it is the header timeout that acts)."""
    sidecar = await start_sidecar({"client": {"header_timeout": "500ms", "idle_timeout": "60s"}},
                                  upstream=upstream_url(upstream))
    reader, writer = await raw_request(sidecar.port, b"GET /headers?id=slow HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        for i in range(600):  # at most a minute; the sidecar cuts it long before
            writer.write(b"X-%d: v\r\n" % i)
            await writer.drain()
            await asyncio.sleep(0.05)

    dripping = asyncio.ensure_future(trickle())
    try:
        data = await read_all(reader, timeout=30)
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
        writer.close()
    assert statuses(data) in ([408], []), data  # 408, or a reset if it raced our last write
    assert app_ids(upstream) == []
    await sidecar.wait_log("request head timeout")
    await assert_still_serving(sidecar, upstream)


async def test_silent_connection_is_closed_quietly_at_header_timeout(start_sidecar, upstream) -> None:
    sidecar = await start_sidecar({"client": {"header_timeout": "500ms", "idle_timeout": "60s"}},
                                  upstream=upstream_url(upstream))
    reader, writer = await raw_request(sidecar.port, b"")
    assert await read_all(reader, timeout=30) == b""  # closed, and not a byte was sent
    writer.close()
    await assert_still_serving(sidecar, upstream)


async def test_idle_keep_alive_connection_is_closed_at_idle_timeout(start_sidecar, upstream) -> None:
    sidecar = await start_sidecar({"client": {"header_timeout": "60s", "idle_timeout": "500ms"}},
                                  upstream=upstream_url(upstream))
    reader, writer = await raw_request(sidecar.port, b"GET /headers?id=i1 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    await asyncio.wait_for(reader.readexactly(length), 10)
    assert await read_all(reader, timeout=30) == b""  # then the sidecar closed it, quietly
    writer.close()
    await assert_still_serving(sidecar, upstream)


async def test_kept_alive_connection_outlives_header_timeout_while_idle(start_sidecar, upstream) -> None:
    """Between requests the idle timeout applies, not the header timeout: a kept-alive
    connection idle for longer than header_timeout still carries the next request."""
    sidecar = await start_sidecar({"client": {"header_timeout": "500ms", "idle_timeout": "60s"}},
                                  upstream=upstream_url(upstream))
    request = b"GET /headers?id=%s HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await raw_request(sidecar.port, request % b"k1")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    await asyncio.wait_for(reader.readexactly(length), 10)
    # The clock: a silent connection opened now is closed once header_timeout has passed.
    clock_reader, clock_writer = await raw_request(sidecar.port, b"")
    assert await read_all(clock_reader, timeout=30) == b""
    clock_writer.close()
    writer.write(request % b"k2")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    assert app_ids(upstream) == ["k1", "k2"]


async def test_client_whose_body_stalls_gets_408_not_a_gateway_timeout(start_sidecar, upstream) -> None:
    """A client that sends a head promising a body and then stalls is the slow party: it gets
    408, not a 504 that blames (and alerts on) the app, which never saw the request (aiohttp's
    sidecar holds the upstream head until the first body byte)."""
    sidecar = await start_sidecar({"upstream": {"timeout": "300ms"}}, upstream=upstream_url(upstream))
    reader, writer = await raw_request(
        sidecar.port, b"POST /headers?id=stall HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    writer.close()
    assert app_ids(upstream) == []
    assert head.split()[1] == b"408", head


async def test_client_whose_body_stalls_midway_gets_408_and_the_app_is_not_blamed(
        start_sidecar, upstream) -> None:
    """Half a body, then silence: 408 for the client, the app sees the request end (its
    connection is closed), and no upstream timeout is counted against the app."""
    sidecar = await start_sidecar({"upstream": {"timeout": "300ms"}}, upstream=upstream_url(upstream))
    reader, writer = await raw_request(
        sidecar.port, b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    writer.close()
    assert head.split()[1] == b"408", head
    assert await metric(sidecar.admin, 'sidecar_upstream_errors_total{kind="timeout"}') == 0
    assert await metric(sidecar.admin, 'sidecar_requests_total{code="408",method="POST"}') == 1
    await assert_still_serving(sidecar, upstream)


def test_client_timeouts_come_from_env_and_bad_values_name_the_key() -> None:
    from sidecar.config import ConfigError, load

    config = load(None, env={"SIDECAR_CLIENT_HEADER_TIMEOUT": "250ms", "SIDECAR_CLIENT_IDLE_TIMEOUT": "2m"})
    assert (config.client.header_timeout, config.client.idle_timeout) == (0.25, 120.0)
    assert (load(None).client.header_timeout, load(None).client.idle_timeout) == (10.0, 75.0)
    for env, key in (({"SIDECAR_CLIENT_HEADER_TIMEOUT": "0"}, "client.header_timeout"),
                     ({"SIDECAR_CLIENT_IDLE_TIMEOUT": "soon"}, "client.idle_timeout"),
                     ({"SIDECAR_CLIENT_IDEL_TIMEOUT": "5s"}, "SIDECAR_CLIENT_IDEL_TIMEOUT")):
        with pytest.raises(ConfigError) as info:
            load(None, env=env)
        assert info.value.problems[0].startswith(key), info.value.problems
    # A Service named sidecar-client makes Kubernetes inject these: not settings, not errors.
    load(None, env={"SIDECAR_CLIENT_SERVICE_HOST": "10.0.0.1", "SIDECAR_CLIENT_PORT_80_TCP": "tcp://x:80"})
