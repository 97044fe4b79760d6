"""The drain, driven like the kubelet and like real clients: real signals, raw sockets."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    StartSidecar,
    raw_request,
    read_response,
    upstream_events,
    upstream_url,
)

SLOW = {"drain": {"delay": "30s", "timeout": "30s", "grace_period": "70s"}}
NO_DELAY = {"drain": {"delay": "0s", "timeout": "20s"}}


async def get_json(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as resp:
        return resp.status, await resp.json()


async def go(client: aiohttp.ClientSession, upstream: Any, key: str) -> None:
    async with client.get(upstream_url(upstream) + f"/__go?key={key}") as resp:
        assert resp.status == 200


async def started(client: aiohttp.ClientSession, upstream: Any, key: str) -> None:
    async with client.get(upstream_url(upstream) + f"/__started?key={key}") as resp:
        assert resp.status == 200


async def metrics(client: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    async with client.get(admin + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        text = await resp.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def ids_seen(upstream: Any) -> set[str]:
    return {e["id"] for e in upstream_events(upstream) if e["event"] == "received" and e["id"]}


async def test_sigterm_fails_readiness_at_once_and_keeps_forwarding_with_connection_close(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar(SLOW, upstream=upstream_url(upstream))
    assert (await get_json(client, sidecar.admin + "/readyz"))[0] == 200
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state draining", trigger="SIGTERM")
    status, body = await get_json(client, sidecar.admin + "/readyz")
    assert status == 503
    assert body["ready"] is False and body["state"] == "draining" and body["reason"]
    async with client.get(sidecar.url + "/headers?id=during-delay") as resp:
        assert resp.status == 200
        assert resp.headers["Connection"] == "close"
    assert "during-delay" in ids_seen(upstream)
    sidecar.send(signal.SIGINT)  # skip to the deadline: nothing in flight, so a clean exit
    assert await sidecar.wait_exit() == 0


async def test_response_of_a_request_in_flight_at_the_trigger_carries_connection_close(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar(SLOW, upstream=upstream_url(upstream))
    pending = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=t1"))
    await started(client, upstream, "t1")
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state draining")
    await go(client, upstream, "t1")
    resp = await asyncio.wait_for(pending, 10)
    assert resp.status == 200 and resp.headers["Connection"] == "close"
    resp.release()
    sidecar.send(signal.SIGINT)
    assert await sidecar.wait_exit() == 0


async def test_keep_alive_connection_opened_before_the_trigger_cannot_reach_the_upstream_after_closing(
        start_sidecar: StartSidecar, upstream, client) -> None:
    """The seed pitfall: stop listening is not enough, idle keep-alive sockets must go too."""
    sidecar = await start_sidecar(NO_DELAY, upstream=upstream_url(upstream))
    reader, writer = await raw_request(sidecar.port, b"GET /headers?id=before HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 200 OK" and headers.get("connection") != "close"
    holder = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=k1"))  # keeps the drain open
    await started(client, upstream, "k1")
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state closing")
    try:
        writer.write(b"GET /headers?id=after HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        answer = b""
    writer.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
    assert "after" not in ids_seen(upstream)
    await go(client, upstream, "k1")
    assert (await asyncio.wait_for(holder, 10)).status == 200
    assert await sidecar.wait_exit() == 0


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
    return head + body


async def test_request_on_a_surviving_connection_gets_503_with_retry_after_and_is_never_forwarded(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s", "linger": "30s"}}, upstream=upstream_url(upstream))
    # A stream whose headers went out before the trigger, with a request pipelined behind it.
    reader, writer = await raw_request(sidecar.port, b"GET /stream?key=p1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                       b"GET /headers?id=late HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"data: first\n\n\r\n"), 10)
    assert b"200 OK" in head
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state closing")
    await go(client, upstream, "p1")
    assert (await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)).endswith(b"0\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert headers["retry-after"] == "5" and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection closes
    writer.close()
    assert "late" not in ids_seen(upstream)
    summary = await sidecar.wait_log("drain finished")
    assert summary["rejected"] == 1
    seen = await metrics(client, sidecar.admin)  # lingering: the final numbers are scrapeable
    assert seen['sidecar_requests_rejected_total{reason="draining"}'] == 1
    assert seen['sidecar_requests_total{code="503",method="GET"}'] == 1
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit() == 0


async def test_new_connections_are_refused_once_closing(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar(NO_DELAY, upstream=upstream_url(upstream))
    holder = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=r1"))
    await started(client, upstream, "r1")
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state closing")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", sidecar.port)
    await go(client, upstream, "r1")
    assert (await asyncio.wait_for(holder, 10)).status == 200
    assert await sidecar.wait_exit() == 0


async def test_slow_request_streamed_download_and_slow_upload_in_flight_all_complete(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar(NO_DELAY, upstream=upstream_url(upstream))
    upload_gate = asyncio.Event()

    async def slow_body():  # type: ignore[no-untyped-def]
        yield b"a" * 65536
        await upload_gate.wait()  # the rest arrives after closing has started
        for _ in range(31):
            yield b"a" * 65536

    async def upload() -> Any:
        async with client.post(sidecar.url + "/upload", data=slow_body()) as resp:
            return resp.status, await resp.json()

    async def download() -> int:
        async with client.get(sidecar.url + "/stream?key=d1") as resp:
            return len(await resp.read())

    slow = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=s1"))
    uploading = asyncio.ensure_future(upload())
    downloading = asyncio.ensure_future(download())
    await started(client, upstream, "s1")
    for _ in range(200):  # all three have reached the upstream
        if {e["path"] for e in upstream_events(upstream) if e["event"] == "received"} >= {"/upload", "/stream"}:
            break
        await asyncio.sleep(0.01)
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state closing")
    upload_gate.set()
    await go(client, upstream, "s1")
    await go(client, upstream, "d1")
    assert (await asyncio.wait_for(slow, 10)).status == 200
    assert await asyncio.wait_for(uploading, 10) == (200, {"size": 32 * 65536, "sha256": __import__(
        "hashlib").sha256(b"a" * 32 * 65536).hexdigest()})
    assert await asyncio.wait_for(downloading, 10) == len(b"data: first\n\ndata: second\n\n")
    assert await sidecar.wait_exit() == 0
    summary = await sidecar.wait_log("drain finished")
    assert summary["aborted"] == 0 and summary["in_flight_at_trigger"] == 3


async def test_requests_still_in_flight_at_the_deadline_are_aborted_counted_and_logged(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s", "timeout": "300ms", "linger": "30s"}},
                                  upstream=upstream_url(upstream))
    stuck = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=never"))
    await started(client, upstream, "never")
    status, summary = await get_json(client, sidecar.admin + "/drain")  # waits until drained
    assert status == 200
    assert summary["state"] == "drained" and summary["aborted"] == 1 and summary["in_flight"] == 0
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(stuck, 5)
    for _ in range(200):  # the upstream request was cancelled too: the app sees its client go
        if any(e["event"] == "disconnected" and e["key"] == "never" for e in upstream_events(upstream)):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"the upstream request was not cancelled: {upstream_events(upstream)}")
    line = await sidecar.wait_log("aborting request at the drain deadline")
    assert line["method"] == "GET" and line["path"] == "/hold?key=never" and line["age_seconds"] > 0
    seen = await metrics(client, sidecar.admin)  # linger: the admin port is still up
    assert seen['sidecar_requests_aborted_total{reason="drain_timeout"}'] == 1
    assert seen['sidecar_drain_state{state="drained"}'] == 1
    assert seen["sidecar_drain_duration_seconds"] > 0
    begun = time.monotonic()
    sidecar.send(signal.SIGTERM)  # native sidecars get SIGTERM last: exit promptly
    assert await sidecar.wait_exit() == 0
    assert time.monotonic() - begun < 5


async def test_drain_endpoint_then_sigterm_is_one_drain(start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "200ms", "timeout": "5s"}},
                                  upstream=upstream_url(upstream))
    async with client.post(sidecar.admin + "/drain?wait=false") as resp:
        assert resp.status == 202
        assert (await resp.json())["trigger"] == "POST /drain"
    first = await metrics(client, sidecar.admin)
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("drain already under way", trigger="SIGTERM")
    status, summary = await get_json(client, sidecar.admin + "/drain")
    assert status == 200 and summary["trigger"] == "POST /drain"
    assert await sidecar.wait_exit() == 0
    assert [e["msg"] for e in sidecar.logs].count("state draining") == 1
    assert first["sidecar_drain_started_timestamp_seconds"] > 0
    assert summary["duration_seconds"] >= 0.2


async def test_every_waiting_drain_caller_is_answered(start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "100ms", "timeout": "5s"}},
                                  upstream=upstream_url(upstream))
    answers = await asyncio.gather(*(get_json(client, sidecar.admin + "/drain") for _ in range(5)))
    assert [status for status, _ in answers] == [200] * 5
    assert all(body["state"] == "drained" for _, body in answers)
    assert await sidecar.wait_exit() == 0


async def test_drain_endpoint_requires_the_token_when_one_is_set(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s"}}, upstream=upstream_url(upstream),
                                  env={"SIDECAR_ADMIN_TOKEN": "s3cret"})
    for auth in (None, "Bearer wrong", "Basic s3cret"):
        headers = {"Authorization": auth} if auth else {}
        async with client.post(sidecar.admin + "/drain", headers=headers) as resp:
            assert resp.status == 401
    assert (await get_json(client, sidecar.admin + "/readyz"))[0] == 200  # no drain started
    async with client.post(sidecar.admin + "/drain", headers={"Authorization": "Bearer s3cret"}) as resp:
        assert resp.status == 200
    assert await sidecar.wait_exit() == 0


async def test_second_sigint_skips_to_the_deadline(start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar(SLOW, upstream=upstream_url(upstream))
    stuck = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=i1"))
    await started(client, upstream, "i1")
    sidecar.send(signal.SIGINT)
    await sidecar.wait_log("state draining", trigger="SIGINT")
    sidecar.send(signal.SIGINT)
    assert await sidecar.wait_exit(timeout=10) == 0
    summary = await sidecar.wait_log("drain finished")
    assert summary["aborted"] == 1
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(stuck, 5)


async def test_websockets_get_going_away_when_admission_stops(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s", "timeout": "5s"}}, upstream=upstream_url(upstream))
    async with client.ws_connect(sidecar.url + "/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"
        sidecar.send(signal.SIGTERM)
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
    assert await sidecar.wait_exit() == 0
    summary = await sidecar.wait_log("drain finished")
    assert summary["aborted"] == 0


async def test_websockets_wait_mode_keeps_them_running_until_the_deadline(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s", "timeout": "1s", "websockets": "wait"}},
                                  upstream=upstream_url(upstream))
    async with client.ws_connect(sidecar.url + "/ws") as ws:
        sidecar.send(signal.SIGTERM)
        await sidecar.wait_log("state closing")
        await ws.send_str("still here")
        assert (await ws.receive(timeout=5)).data == "echo:still here"
        msg = await ws.receive(timeout=10)  # the deadline cuts it
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    assert await sidecar.wait_exit() == 0
    assert (await sidecar.wait_log("drain finished"))["aborted"] == 1


async def test_drain_state_metrics_follow_the_lifecycle(start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar(SLOW, upstream=upstream_url(upstream))
    before = await metrics(client, sidecar.admin)
    assert before['sidecar_drain_state{state="serving"}'] == 1
    assert before["sidecar_drain_started_timestamp_seconds"] == 0
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state draining")
    during = await metrics(client, sidecar.admin)
    assert during['sidecar_drain_state{state="draining"}'] == 1
    assert during['sidecar_drain_state{state="serving"}'] == 0
    assert abs(during["sidecar_drain_started_timestamp_seconds"] - time.time()) < 30
    _, body = await get_json(client, sidecar.admin + "/status")
    assert body["state"] == "draining" and body["drain"]["trigger"] == "SIGTERM"
    sidecar.send(signal.SIGINT)
    assert await sidecar.wait_exit() == 0


async def test_hundred_keep_alive_clients_through_sigterm_lose_nothing_the_upstream_saw(
        start_sidecar: StartSidecar, upstream) -> None:
    """Every request that reached the app got its 2xx: the app's count equals the 2xx count."""
    sidecar = await start_sidecar({"drain": {"delay": "1s", "timeout": "10s"}},
                                  upstream=upstream_url(upstream))
    ok: list[str] = []
    failed: list[tuple[str, str]] = []
    stop_at = asyncio.get_running_loop().time() + 20
    signalled = asyncio.Event()

    async def worker(n: int, session: aiohttp.ClientSession) -> None:
        i = 0
        while asyncio.get_running_loop().time() < stop_at:
            rid = f"w{n}-{i}"
            i += 1
            try:
                async with session.get(sidecar.url + f"/hold?ms=30&id={rid}") as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok.append(rid)
                    else:
                        failed.append((rid, str(resp.status)))
            except aiohttp.ClientConnectorError:
                if signalled.is_set():
                    return  # the listener is closed: a load balancer would go elsewhere now
                failed.append((rid, "connect"))
            except aiohttp.ClientError as exc:
                failed.append((rid, repr(exc)))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15)) as session:
        session._retry_connection = False  # see the raw loss, no silent client retry
        workers = [asyncio.ensure_future(worker(n, session)) for n in range(100)]
        while len(ok) < 300:
            await asyncio.sleep(0.01)
        sidecar.send(signal.SIGTERM)
        signalled.set()
        await asyncio.wait_for(asyncio.gather(*workers), 30)
    assert await sidecar.wait_exit() == 0
    seen = ids_seen(upstream)
    lost = [f for f in failed if f[0] in seen]
    assert lost == [], f"requests the app received but the client lost: {lost[:10]}"
    assert seen == set(ok)
    assert len(ok) > 300


async def test_slow_client_with_a_partly_received_request_is_closed_when_admission_stops(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar(NO_DELAY, upstream=upstream_url(upstream))
    reader, writer = await raw_request(sidecar.port, b"GET /headers?id=ok HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    writer.write(b"GET /headers?id=slowloris HTTP/1.1\r\nHost: x\r\nX-Slow:")  # head never finished
    await writer.drain()
    holder = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=sl"))
    await started(client, upstream, "sl")
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state closing")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed while the drain goes on
    writer.close()
    assert not holder.done()
    await go(client, upstream, "sl")
    assert (await asyncio.wait_for(holder, 10)).status == 200
    assert await sidecar.wait_exit() == 0
    assert "slowloris" not in ids_seen(upstream)


async def test_linger_keeps_the_admin_listener_up_after_drained(
        start_sidecar: StartSidecar, upstream, client) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s", "linger": "1s"}}, upstream=upstream_url(upstream))
    status, summary = await get_json(client, sidecar.admin + "/drain")
    assert status == 200 and summary["state"] == "drained"
    assert (await metrics(client, sidecar.admin))['sidecar_drain_state{state="drained"}'] == 1
    assert (await get_json(client, sidecar.admin + "/healthz"))[0] == 200
    assert await sidecar.wait_exit() == 0  # on its own once the linger is over
