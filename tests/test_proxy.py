"""The proxy path: what a client sends reaches the app unchanged, and back."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.apps.upstream import make_app, pattern
from tests.conftest import (
    StartSidecar,
    metric,
    raw_request,
    read_response,
    upstream_events,
    upstream_url,
)

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@pytest.fixture
async def proxied(start_sidecar: StartSidecar, upstream):  # type: ignore[no-untyped-def]
    return await start_sidecar({"upstream": {"timeout": "3s"}}, upstream=upstream_url(upstream))


@pytest.mark.parametrize("method", METHODS)
async def test_every_method_reaches_the_upstream(proxied, client, method: str) -> None:
    async with client.request(method, proxied.url + "/headers", data=b"abc") as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["method"] == method
    assert seen["body_length"] == 3


async def test_head_keeps_content_length_without_body(proxied) -> None:
    reader, writer = await raw_request(
        proxied.port, b"HEAD /bytes?n=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Content-Length: 5000" in head
    writer.write(b"GET /bytes?n=3 HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection still in sync
    status, _, body = await read_response(reader)
    assert status == "HTTP/1.1 200 OK" and body == bytes(range(3))
    writer.close()


async def test_one_mib_body_round_trips_byte_exact(proxied, client) -> None:
    body = pattern(1 << 20)
    async with client.post(proxied.url + "/echo", data=body) as resp:
        assert resp.status == 200
        assert await resp.read() == body


async def test_status_codes_pass_through(proxied, client) -> None:
    for code in (201, 204, 301, 404, 418, 500, 503):
        async with client.get(proxied.url + f"/status/{code}", allow_redirects=False) as resp:
            assert resp.status == code


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_fifty_mib_download_streams_without_growing_memory(proxied, client) -> None:
    n = 50 << 20
    digest = hashlib.sha256()
    async with client.get(proxied.url + f"/bytes?n={n}") as resp:
        assert resp.headers["Content-Length"] == str(n)
        async for chunk in resp.content.iter_chunked(1 << 16):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(pattern(n)).hexdigest()
    assert _rss_kib(proxied.proc.pid) < 80 * 1024, "the sidecar buffered the body"


async def test_fifty_mib_upload_streams_without_growing_memory(proxied, client) -> None:
    n = 50 << 20
    block = pattern(1 << 20)

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(n // len(block)):
            yield block

    async with client.post(proxied.url + "/upload", data=body()) as resp:
        result = await resp.json()
    assert result == {"size": n, "sha256": hashlib.sha256(block * (n // len(block))).hexdigest()}
    assert _rss_kib(proxied.proc.pid) < 80 * 1024, "the sidecar buffered the upload"


async def test_chunked_response_reaches_client_as_produced(proxied, client, upstream) -> None:
    async with client.get(proxied.url + "/stream?key=s1") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first\n\n"  # before the upstream was told to go on
        async with client.get(upstream_url(upstream) + "/__go?key=s1"):
            pass
        assert await asyncio.wait_for(resp.content.read(), 5) == b"data: second\n\n"


async def test_gzip_body_is_passed_through_not_decompressed(proxied, client) -> None:
    async with client.get(proxied.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await resp.read()) == b"hello gzip " * 100


async def test_hop_by_hop_response_headers_are_dropped(proxied, client) -> None:
    async with client.get(proxied.url + "/hop") as resp:
        assert resp.headers["X-End-To-End"] == "kept"
        for name in ("X-Private", "Keep-Alive", "Proxy-Connection", "Trailer"):
            assert name not in resp.headers, name


async def test_hop_by_hop_request_headers_are_dropped(proxied) -> None:
    reader, writer = await raw_request(proxied.port, (
        b"GET /headers HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Private\r\n"
        b"X-Private: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nX-End-To-End: kept\r\n\r\n"))
    _, _, body = await read_response(reader)
    writer.close()
    names = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert names["x-end-to-end"] == "kept"
    for name in ("x-private", "keep-alive", "te", "proxy-connection", "proxy-authorization"):
        assert name not in names, name
    assert names.get("connection", "keep-alive").lower() == "keep-alive"  # aiohttp's own hop


async def test_forwarded_headers_are_set_and_host_passes_through(proxied, client) -> None:
    async with client.get(proxied.url + "/headers", headers={
        "Host": "app.example:8443", "X-Forwarded-For": "203.0.113.9",
    }) as resp:
        headers = {k.lower(): v for k, v in (await resp.json())["headers"]}
    assert headers["host"] == "app.example:8443"
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "app.example:8443"


async def test_forwarded_proto_and_host_from_a_tls_terminating_ingress_are_kept(proxied, client) -> None:
    async with client.get(proxied.url + "/headers", headers={
        "Host": "internal:8080", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "shop.example",
    }) as resp:
        headers = {k.lower(): v for k, v in (await resp.json())["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == "shop.example"
    assert headers["host"] == "internal:8080"


async def test_request_target_is_forwarded_exactly(proxied) -> None:
    target = b"/headers/a%2Fb/../c//d?q=%20x&y=%2f#"
    reader, writer = await raw_request(proxied.port, b"GET " + target.rstrip(b"#")
                                       + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    _, _, body = await read_response(reader)
    writer.close()
    assert json.loads(body)["raw_path"] == target.rstrip(b"#").decode()


async def test_repeated_set_cookie_headers_survive(proxied, client) -> None:
    async with client.get(proxied.url + "/cookies") as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


async def test_websocket_text_binary_ping_and_close_code_pass_both_ways(proxied, client) -> None:
    async with client.ws_connect(proxied.url + "/ws", protocols=("superchat",), autoping=False) as ws:
        assert ws.protocol == "superchat"
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "echo:hello"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive(timeout=5)).data == b"\x03\x02\x01"
        await ws.ping(b"p1")
        pong = await ws.receive(timeout=5)
        assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"p1")
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4001
    assert ws.close_code == 4001


async def test_websocket_close_from_client_reaches_upstream(proxied, client, upstream) -> None:
    async with client.ws_connect(proxied.url + "/ws") as ws:
        await ws.send_str("x")
        await ws.receive(timeout=5)
        await ws.close(code=4002)
    for _ in range(100):
        closed = [e for e in upstream_events(upstream) if e["event"] == "ws_closed"]
        if closed:
            break
        await asyncio.sleep(0.02)
    assert closed and closed[0]["code"] == 4002


async def test_unix_socket_upstream(start_sidecar: StartSidecar, tmp_path: Path, client) -> None:
    sock = str(tmp_path / "app.sock")
    runner = web.AppRunner(make_app())
    await runner.setup()
    await web.UnixSite(runner, sock).start()
    try:
        sidecar = await start_sidecar(upstream=f"unix:{sock}")
        async with client.get(sidecar.url + "/headers?via=unix") as resp:
            assert resp.status == 200
            assert (await resp.json())["raw_path"] == "/headers?via=unix"
    finally:
        await runner.cleanup()


async def test_unreachable_upstream_is_502_and_counted(start_sidecar: StartSidecar, client) -> None:
    from tests.conftest import free_port

    sidecar = await start_sidecar(upstream=f"http://127.0.0.1:{free_port()}")
    async with client.get(sidecar.url + "/x") as resp:
        assert resp.status == 502
        assert "upstream" in await resp.text() and len(await resp.text()) < 100
    assert await metric(client, sidecar.admin, 'sidecar_upstream_errors_total{kind="connect"}') == 1


async def test_slow_upstream_is_504_and_counted(start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"upstream": {"timeout": "200ms"}}, upstream=upstream_url(upstream))
    async with client.get(sidecar.url + "/hold?key=slow") as resp:
        assert resp.status == 504
    assert await metric(client, sidecar.admin, 'sidecar_upstream_errors_total{kind="timeout"}') == 1


@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_upstream_dying_mid_response_is_never_a_complete_response(proxied, client, chunked) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(proxied.url + f"/die?chunked={chunked}") as resp:
            assert resp.status == 200
            await resp.read()
    assert await metric(client, proxied.admin, 'sidecar_upstream_errors_total{kind="reset"}') >= 1


async def test_malformed_request_gets_400_and_the_proxy_keeps_serving(proxied, client) -> None:
    reader, writer = await raw_request(proxied.port, b"GARBAGE\x01 / HTTP/9.9\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status.split()[1] == "400"
    writer.close()
    async with client.get(proxied.url + "/headers") as resp:
        assert resp.status == 200


async def test_admin_paths_on_the_proxy_port_go_to_the_upstream(proxied, client, upstream) -> None:
    for path in ("/metrics", "/readyz", "/drain", "/status"):
        async with client.get(proxied.url + path) as resp:
            assert resp.status == 404  # the upstream's answer, not the sidecar's
    assert {e["path"] for e in upstream_events(upstream)} >= {"/metrics", "/drain"}
    async with client.get(proxied.admin + "/readyz") as resp:
        assert resp.status == 200  # and no drain was started


async def test_in_flight_and_connection_counts_are_exact(proxied, client, upstream) -> None:
    pending = asyncio.ensure_future(client.get(proxied.url + "/hold?key=f1"))
    async with client.get(upstream_url(upstream) + "/__started?key=f1"):
        pass
    async with client.get(proxied.admin + "/status") as resp:
        status = await resp.json()
    assert status["in_flight"] == 1 and status["connections"] >= 1
    assert status["tasks"] >= 1  # the asyncio task count the soak bench watches for leaks
    assert await metric(client, proxied.admin, "sidecar_requests_in_flight") == 1
    async with client.get(upstream_url(upstream) + "/__go?key=f1"):
        pass
    resp = await asyncio.wait_for(pending, 5)
    assert resp.status == 200
    resp.release()
    assert await metric(client, proxied.admin, "sidecar_requests_in_flight") == 0
    assert await metric(client, proxied.admin, 'sidecar_requests_total{code="200",method="GET"}') >= 1


async def test_in_flight_counts_a_websocket_until_it_closes(proxied, client) -> None:
    async with client.ws_connect(proxied.url + "/ws") as ws:
        await ws.send_str("x")
        await ws.receive(timeout=5)
        assert await metric(client, proxied.admin, "sidecar_websockets_open") == 1
        assert await metric(client, proxied.admin, "sidecar_requests_in_flight") == 1
    for _ in range(100):
        if await metric(client, proxied.admin, "sidecar_requests_in_flight") == 0:
            break
        await asyncio.sleep(0.02)
    assert await metric(client, proxied.admin, "sidecar_websockets_open") == 0


async def test_websocket_lives_longer_than_the_upstream_timeout(start_sidecar: StartSidecar, upstream, client) -> None:
    """upstream.timeout bounds an HTTP exchange, not a websocket's lifetime."""
    sidecar = await start_sidecar({"upstream": {"timeout": "300ms"}}, upstream=upstream_url(upstream))
    async with client.ws_connect(sidecar.url + "/ws") as ws:
        for i in range(8):  # ~0.8 s in all, well past the 300 ms timeout
            await ws.send_str(f"m{i}")
            assert (await ws.receive(timeout=5)).data == f"echo:m{i}"
            await asyncio.sleep(0.1)


CONTRACT_METRICS = (
    "sidecar_requests_in_flight", "sidecar_requests_total", "sidecar_request_duration_seconds",
    "sidecar_requests_rejected_total", "sidecar_requests_aborted_total", "sidecar_upstream_errors_total",
    "sidecar_connections_open", "sidecar_websockets_open", "sidecar_drain_state",
    "sidecar_drain_started_timestamp_seconds", "sidecar_drain_duration_seconds", "sidecar_upstream_up",
)


async def test_every_contract_metric_exists_from_startup(proxied, client) -> None:
    async with client.get(proxied.admin + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        assert resp.status == 200
        text = await resp.text()
    declared = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    for name in CONTRACT_METRICS:
        assert name in declared or name.removesuffix("_total") in declared, name
    assert 'sidecar_drain_state{state="serving"} 1.0' in text
    assert 'sidecar_drain_state{state="draining"} 0.0' in text
    assert 'sidecar_requests_rejected_total{reason="draining"} 0.0' in text
    assert 'sidecar_requests_aborted_total{reason="drain_timeout"} 0.0' in text
    for kind in ("connect", "timeout", "reset"):
        assert f'sidecar_upstream_errors_total{{kind="{kind}"}} 0.0' in text
    assert 'sidecar_request_duration_seconds_bucket{le="0.005",method="GET"}' in text
    assert 'sidecar_request_duration_seconds_bucket{le="60.0",method="GET"}' in text


async def test_admin_traffic_is_not_counted_in_request_metrics(proxied, client) -> None:
    for path in ("/readyz", "/healthz", "/status", "/metrics"):
        async with client.get(proxied.admin + path) as resp:
            await resp.read()
    assert await metric(client, proxied.admin, 'sidecar_request_duration_seconds_count{method="GET"}') == 0


async def test_readyz_is_503_starting_until_the_health_path_answers_2xx(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"upstream": {"health_path": "/status/503", "health_interval": "100ms"}},
                                  upstream=upstream_url(upstream))
    async with client.get(sidecar.admin + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 503 and body["state"] == "starting" and body["reason"]
    assert await metric(client, sidecar.admin, "sidecar_upstream_up") == 0
    healthy = await start_sidecar({"upstream": {"health_path": "/status/204"}}, upstream=upstream_url(upstream))
    await healthy.wait_log("state serving")
    async with client.get(healthy.admin + "/readyz") as resp:
        assert resp.status == 200
    assert await metric(client, healthy.admin, "sidecar_upstream_up") == 1


async def test_access_log_and_text_format(start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"logging": {"access_log": True, "format": "text"}},
                                  upstream=upstream_url(upstream), wait=None)
    for _ in range(200):
        if any("sidecar started" in line for line in sidecar.raw):
            break
        await asyncio.sleep(0.02)
    start = next(line for line in sidecar.raw if "sidecar started" in line)
    assert f"listen=127.0.0.1:{sidecar.port}" in start and "upstream=http://127.0.0.1:" in start
    async with client.get(sidecar.url + "/headers?q=1") as resp:
        assert resp.status == 200
    for _ in range(200):
        if any("GET /headers?q=1 200" in line for line in sidecar.raw):
            break
        await asyncio.sleep(0.02)
    line = next(line for line in sidecar.raw if "GET /headers?q=1 200" in line)
    assert "status=200" in line and "duration_ms=" in line


async def test_client_that_goes_away_cancels_the_upstream_request(proxied, client, upstream) -> None:
    _, writer = await raw_request(proxied.port, b"GET /hold?key=gone HTTP/1.1\r\nHost: x\r\n\r\n")
    async with client.get(upstream_url(upstream) + "/__started?key=gone"):
        pass
    writer.close()  # the client gives up before the answer
    for _ in range(200):
        if any(e["event"] == "disconnected" and e["key"] == "gone" for e in upstream_events(upstream)):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"the upstream request was not cancelled: {upstream_events(upstream)}")
    assert await metric(client, proxied.admin, "sidecar_requests_in_flight") == 0
    assert await metric(client, proxied.admin, 'sidecar_requests_total{code="499",method="GET"}') == 1
