"""The closing instant: idle keep-alive connections close one by one during ``draining``
(drain.close_spread), not all at once when admission stops; a connection with a request in
progress is never cut; a request already sent when the listener closes is served, not reset."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar.config import ConfigError, load, to_yaml
from tests.conftest import (
    ROOT,
    StartSidecar,
    raw_request,
    read_response,
    upstream_events,
    upstream_url,
)

IDLE = 5


async def _get(client: aiohttp.ClientSession, url: str) -> None:
    async with client.get(url) as resp:
        assert resp.status == 200


async def _idle_connections(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """n keep-alive connections that have each carried one request and now sit idle."""
    conns = []
    for k in range(n):
        reader, writer = await raw_request(port, f"GET /headers?id=idle-{k} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, _ = await read_response(reader)
        assert status == "HTTP/1.1 200 OK" and headers.get("connection") != "close"
        conns.append((reader, writer))
    return conns


def _index(logs: list[dict[str, Any]], msg: str) -> int:
    return next(i for i, e in enumerate(logs) if e.get("msg") == msg)


async def test_idle_connections_close_one_by_one_during_draining_and_busy_ones_are_never_cut(
        start_sidecar: StartSidecar, upstream, client) -> None:
    """Every idle keep-alive connection is closed during draining, one per step of the spread
    (none left for the closing instant), while a held request and a stream that began before
    the trigger run to completion on their own connections."""
    sidecar = await start_sidecar(
        {"drain": {"delay": "3s", "timeout": "10s", "close_spread": "2s"}},
        upstream=upstream_url(upstream))
    idle = await _idle_connections(sidecar.port, IDLE)
    held_r, held_w = await raw_request(sidecar.port, b"GET /hold?key=busy&id=busy HTTP/1.1\r\nHost: x\r\n\r\n")
    stream_r, stream_w = await raw_request(sidecar.port, b"GET /stream?key=st&id=st HTTP/1.1\r\nHost: x\r\n\r\n")
    await _get(client, upstream_url(upstream) + "/__started?key=busy")
    assert b"200 OK" in await asyncio.wait_for(stream_r.readuntil(b"data: first\n\n\r\n"), 10)

    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state draining")
    await _get(client, upstream_url(upstream) + "/__go?key=st")  # the stream ends during draining
    assert (await asyncio.wait_for(stream_r.readuntil(b"0\r\n\r\n"), 10)).endswith(b"0\r\n\r\n")
    for reader, writer in idle:  # each idle connection is closed by the sidecar
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    # The stream's connection, idle once the stream ended, is closed by the spread too.
    assert await asyncio.wait_for(stream_r.read(), 10) == b""
    stream_w.close()

    await sidecar.wait_log("state closing")
    await _get(client, upstream_url(upstream) + "/__go?key=busy")
    status, headers, _ = await read_response(held_r)  # never cut: answered in full
    assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
    held_w.close()
    assert await sidecar.wait_exit() == 0

    steps = [e for e in sidecar.logs if e.get("msg") == "closed idle connections"]
    closing = _index(sidecar.logs, "state closing")
    assert sum(e["closed"] for e in steps) == IDLE + 1, steps
    assert all(sidecar.logs.index(e) < closing for e in steps), "an idle connection was left for closing"
    assert [e["closed"] for e in steps] == [1] * (IDLE + 1), f"not one at a time: {steps}"
    received = {e["id"] for e in upstream_events(upstream) if e["event"] == "received"}
    assert received == {*(f"idle-{k}" for k in range(IDLE)), "busy", "st"}
    assert (await sidecar.wait_log("drain finished"))["aborted"] == 0


async def test_close_spread_zero_keeps_idle_connections_until_admission_stops(
        start_sidecar: StartSidecar, upstream, client) -> None:
    """With close_spread 0s, idle connections stay open through draining (a request on one
    is still forwarded) and are closed when admission stops."""
    sidecar = await start_sidecar(
        {"drain": {"delay": "1s", "timeout": "10s", "close_spread": "0s"}},
        upstream=upstream_url(upstream))
    (reader, writer), (late_r, late_w) = await _idle_connections(sidecar.port, 2)
    holder = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=h0"))  # keeps closing open
    await _get(client, upstream_url(upstream) + "/__started?key=h0")
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state draining")
    late_w.write(b"GET /headers?id=during HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await read_response(late_r)
    assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
    late_w.close()
    await sidecar.wait_log("state closing")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await _get(client, upstream_url(upstream) + "/__go?key=h0")
    assert (await asyncio.wait_for(holder, 10)).status == 200
    assert await sidecar.wait_exit() == 0
    assert not [e for e in sidecar.logs if e.get("msg") == "closed idle connections"]


@pytest.mark.parametrize("value", ["soon", "-1s", [1]])
def test_invalid_close_spread_is_rejected_naming_the_key(tmp_path, value: object) -> None:
    """A bad drain.close_spread is a config error naming the key, like every other key."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"drain": {"close_spread": value}}))
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert any(p.startswith("drain.close_spread") for p in err.value.problems), err.value.problems


def test_close_spread_from_the_environment_is_printed_by_check_config() -> None:
    """SIDECAR_DRAIN_CLOSE_SPREAD sets the key; check-config prints it back, exit 0; a bad value
    exits 2 naming the key and the variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    ok = subprocess.run([sys.executable, "-m", "sidecar", "check-config"], capture_output=True, text=True,
                        env={**env, "SIDECAR_DRAIN_CLOSE_SPREAD": "1500ms"}, timeout=20, cwd=ROOT,
                        check=False)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["drain"]["close_spread"] == "1.5s"
    assert load(None, env={"SIDECAR_DRAIN_CLOSE_SPREAD": "250ms"}).drain.close_spread == 0.25
    assert "close_spread: 2s" in to_yaml(load(None))
    bad = subprocess.run([sys.executable, "-m", "sidecar", "check-config"], capture_output=True, text=True,
                         env={**env, "SIDECAR_DRAIN_CLOSE_SPREAD": "later"}, timeout=20, cwd=ROOT,
                         check=False)
    assert bad.returncode == 2
    assert "drain.close_spread" in bad.stderr and "SIDECAR_DRAIN_CLOSE_SPREAD" in bad.stderr


async def test_requests_sent_on_connections_not_yet_accepted_when_admission_stops_are_served(
        start_sidecar: StartSidecar, upstream) -> None:
    """A client whose connection the kernel completed, and which sent its request, just as the
    listener closes is answered 200 (with Connection: close), not reset: the sidecar takes
    such connections from the accept queue before the socket goes, and forwards what they sent.

    The sidecar is stopped (SIGSTOP) while the connections queue up and SIGTERM arrives, so
    on SIGCONT the drain (delay 0s) may stop admission before the loop has accepted them."""
    sidecar = await start_sidecar({"drain": {"delay": "0s", "timeout": "10s"}},
                                  upstream=upstream_url(upstream))
    sidecar.send(signal.SIGSTOP)
    try:
        conns = [await raw_request(sidecar.port, f"GET /headers?id=queued-{k} HTTP/1.1\r\nHost: x\r\n\r\n"
                                   .encode()) for k in range(8)]
        sidecar.send(signal.SIGTERM)
    finally:
        sidecar.send(signal.SIGCONT)
    for reader, writer in conns:
        status, headers, _ = await read_response(reader, timeout=15)
        assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
        writer.close()
    assert await sidecar.wait_exit() == 0
    received = {e["id"] for e in upstream_events(upstream) if e["event"] == "received"}
    assert received == {f"queued-{k}" for k in range(8)}
    opening = [e for e in sidecar.logs if e.get("msg") == "connections still opening as the listener closes"]
    print(f"\nqueued connections: {opening or 'all accepted before admission stopped'}")
