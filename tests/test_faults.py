"""Faults, black-box: a real upstream process that is killed, frozen and restarted; drains and
signals at awkward moments; wrap mode meeting the wrong process.

Already proven elsewhere, so not repeated here: a port nobody listens on is 502 counted
``connect`` and a slow in-process app is 504 counted ``timeout``, an app that aborts its socket
mid-response is never a complete response (test_proxy.py); a wrapped app that quits on its own
drains at once and passes its exit code (test_exit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    UPSTREAM_APP,
    Sidecar,
    StartSidecar,
    free_port,
    read_events,
    upstream_events,
    upstream_url,
    wait_port,
)

App = Callable[[int], Awaitable[asyncio.subprocess.Process]]
QUICK_PROBE = {"upstream": {"health_interval": "100ms", "timeout": "5s"}}


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    """Start tests/apps/upstream.py as a process on a given port (so it can come back on it)."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(port: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, UPSTREAM_APP, "--port", str(port),
            "--events", str(tmp_path / f"events-{port}.jsonl"), stdin=asyncio.subprocess.DEVNULL)
        procs.append(proc)
        await wait_port(port)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)  # a frozen one cannot die otherwise
            proc.kill()
            await proc.wait()


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.kill()
    await asyncio.wait_for(proc.wait(), 10)


async def metric(client: aiohttp.ClientSession, sidecar: Sidecar, line_start: str) -> float:
    async with client.get(sidecar.admin + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in metrics:\n{text}")


async def readyz(client: aiohttp.ClientSession, sidecar: Sidecar) -> tuple[int, dict[str, Any]]:
    async with client.get(sidecar.admin + "/readyz") as resp:
        return resp.status, await resp.json()


async def next_log(sidecar: Sidecar, msg: str, *, after: int, timeout: float = 15.0) -> dict[str, Any]:
    """The first log line starting with ``msg`` among those logged after the first ``after``."""
    async def wait() -> dict[str, Any]:
        while True:
            for entry in sidecar.logs[after:]:
                if str(entry.get("msg", "")).startswith(msg):
                    return entry
            if sidecar.proc.returncode is not None:
                raise AssertionError(f"sidecar exited before logging {msg!r}:\n" + "\n".join(sidecar.raw))
            await asyncio.sleep(0.02)

    try:
        return await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"no new log {msg!r} within {timeout}s:\n" + "\n".join(sidecar.raw)) from None


# --- the upstream dies, freezes, comes back -------------------------------------------------------

@pytest.mark.parametrize("health_path", [None, "/healthz"], ids=["tcp-probe", "health-path"])
async def test_upstream_killed_then_restarted_502_while_down_and_readiness_follows_it(
        start_sidecar: StartSidecar, app: App, client: aiohttp.ClientSession,
        health_path: str | None) -> None:
    """Down: 502 with a short body, counted connect, /readyz 503 saying why. Back: ready, 200s."""
    port = free_port()
    proc = await app(port)
    config = {"upstream": {**QUICK_PROBE["upstream"], "health_path": health_path}}
    sidecar = await start_sidecar(config, upstream=f"http://127.0.0.1:{port}")
    await sidecar.wait_log("upstream healthy")
    for _ in range(3):  # the pool now holds keep-alive connections to the app
        async with client.get(sidecar.url + "/headers") as resp:
            assert resp.status == 200
    assert (await readyz(client, sidecar))[0] == 200

    seen = len(sidecar.logs)
    await kill(proc)
    for _ in range(2):  # the second one surely on a fresh connection: refused
        async with client.get(sidecar.url + "/headers") as resp:
            body = await resp.text()
            assert resp.status == 502 and "upstream" in body and len(body) < 100
    assert await metric(client, sidecar, 'sidecar_upstream_errors_total{kind="connect"}') >= 1
    unhealthy = await next_log(sidecar, "upstream unhealthy", after=seen)
    assert unhealthy["error"] == f"connect to 127.0.0.1:{port} refused"
    status, body = await readyz(client, sidecar)
    assert status == 503 and body["state"] == "serving"
    assert body["reason"] == f"upstream health check failing: connect to 127.0.0.1:{port} refused"
    assert await metric(client, sidecar, "sidecar_upstream_up") == 0

    seen = len(sidecar.logs)
    await app(port)  # the app is back on its port
    await next_log(sidecar, "upstream healthy", after=seen)
    assert (await readyz(client, sidecar))[0] == 200
    for _ in range(3):
        async with client.get(sidecar.url + "/headers") as resp:
            assert resp.status == 200


async def test_a_frozen_upstream_is_504_at_upstream_timeout_and_the_pool_recovers_when_it_thaws(
        start_sidecar: StartSidecar, app: App, client: aiohttp.ClientSession) -> None:
    """SIGSTOP: the kernel still accepts connections, nothing answers them."""
    port = free_port()
    proc = await app(port)
    sidecar = await start_sidecar({"upstream": {"timeout": "500ms"}}, upstream=f"http://127.0.0.1:{port}")
    async with client.get(sidecar.url + "/headers") as resp:
        assert resp.status == 200
    proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(2):  # on the pooled connection, then on a fresh one
            async with client.get(sidecar.url + "/headers") as resp:
                assert resp.status == 504
    finally:
        proc.send_signal(signal.SIGCONT)
    assert await metric(client, sidecar, 'sidecar_upstream_errors_total{kind="timeout"}') == 2
    async with client.get(sidecar.url + "/headers") as resp:
        assert resp.status == 200


async def test_upstream_process_killed_mid_response_is_an_aborted_response_counted_reset(
        start_sidecar: StartSidecar, app: App, client: aiohttp.ClientSession) -> None:
    """The client must never take the cut-off stream for a complete response."""
    port = free_port()
    proc = await app(port)
    sidecar = await start_sidecar(upstream=f"http://127.0.0.1:{port}")
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(sidecar.url + "/stream?key=cut") as resp:
            assert resp.status == 200
            assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
            await kill(proc)
            await resp.read()
    assert await metric(client, sidecar, 'sidecar_upstream_errors_total{kind="reset"}') == 1
    assert await metric(client, sidecar, "sidecar_requests_in_flight") == 0


# --- drains at awkward moments -------------------------------------------------------------------

async def test_a_drain_while_the_upstream_is_already_dead_finishes_without_waiting_out_its_timeouts(
        start_sidecar: StartSidecar, app: App, client: aiohttp.ClientSession) -> None:
    port = free_port()
    proc = await app(port)
    sidecar = await start_sidecar(
        {"drain": {"delay": "0s", "timeout": "60s", "grace_period": "200s"},
         "exit": {"http": {"url": f"http://127.0.0.1:{port}/quitquitquit"}, "wait": "60s"}},
        upstream=f"http://127.0.0.1:{port}")
    await kill(proc)
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit(timeout=30) == 0  # well inside timeout + exit.wait
    summary = await sidecar.wait_log("drain finished")
    assert (summary["aborted"], summary["in_flight"]) == (0, 0)


async def test_drain_caller_that_disconnects_mid_wait_does_not_stop_the_drain(
        start_sidecar: StartSidecar, upstream: Any, client: aiohttp.ClientSession) -> None:
    sidecar = await start_sidecar({"drain": {"delay": "0s", "timeout": "20s"}},
                                  upstream=upstream_url(upstream))
    held = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=drain-caller"))
    async with client.get(upstream_url(upstream) + "/__started?key=drain-caller"):
        pass
    async with aiohttp.ClientSession() as caller:
        waiting = asyncio.ensure_future(caller.post(sidecar.admin + "/drain"))
        await sidecar.wait_log("state closing")
        waiting.cancel()  # the caller gives up and its connection goes
        await asyncio.gather(waiting, return_exceptions=True)
    async with client.get(upstream_url(upstream) + "/__go?key=drain-caller"):
        pass
    async with await held as resp:
        assert resp.status == 200 and await resp.text() == "released drain-caller\n"
    assert await sidecar.wait_exit() == 0
    summary = await sidecar.wait_log("drain finished")
    assert (summary["completed"], summary["aborted"]) == (1, 0)


async def test_sigterm_while_starting_forwards_nothing_and_exits_without_the_drain_delay(
        start_sidecar: StartSidecar, upstream: Any, client: aiohttp.ClientSession) -> None:
    """Never ready, never in a load balancer: there is nothing to wait for."""
    sidecar = await start_sidecar(
        {"upstream": {"health_path": "/status/503", "health_interval": "100ms"},
         "drain": {"delay": "60s", "timeout": "20s", "grace_period": "200s"}},
        upstream=upstream_url(upstream))
    sidecar.send(signal.SIGTERM)
    await sidecar.wait_log("state draining")
    with_request = asyncio.ensure_future(client.get(sidecar.url + "/headers?id=late"))
    assert await sidecar.wait_exit(timeout=30) == 0  # not after the 60 s delay
    result = (await asyncio.gather(with_request, return_exceptions=True))[0]
    if isinstance(result, aiohttp.ClientResponse):
        assert result.status == 503  # else refused: the listener was already closed
        result.release()
    assert "late" not in {e.get("id") for e in upstream_events(upstream)}


async def test_sigterm_while_a_wrapped_child_is_starting_stops_the_child_and_passes_its_code(
        start_sidecar: StartSidecar) -> None:
    port = free_port()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]  # never listens
    sidecar = await start_sidecar({"drain": {"delay": "60s", "timeout": "20s", "grace_period": "200s"}},
                                  upstream=f"http://127.0.0.1:{port}", command=sleeper)
    await sidecar.wait_log("started child")
    sidecar.send(signal.SIGTERM)
    assert await sidecar.wait_exit(timeout=30) == 128 + signal.SIGTERM


async def test_wrapped_app_killed_by_a_signal_drains_at_once_and_exits_128_plus_n(
        start_sidecar: StartSidecar, tmp_path: Path) -> None:
    port = free_port()
    events = tmp_path / "events.jsonl"
    sidecar = await start_sidecar({"drain": {"delay": "60s", "timeout": "5s", "grace_period": "200s"}},
                                  upstream=f"http://127.0.0.1:{port}",
                                  command=[sys.executable, UPSTREAM_APP, "--port", str(port),
                                           "--events", str(events)])
    await sidecar.wait_log("state serving")
    os.kill((await sidecar.wait_log("started child"))["pid"], signal.SIGKILL)
    assert await sidecar.wait_exit(timeout=30) == 128 + signal.SIGKILL
    assert (await sidecar.wait_log("state draining"))["trigger"] == "child exited"


# --- wrap mode and readiness must not trust the wrong process -----------------------------------

async def test_wrap_mode_refuses_to_start_when_something_already_answers_on_the_upstream_address(
        start_sidecar: StartSidecar, upstream: Any, tmp_path: Path) -> None:
    events = tmp_path / "child-events.jsonl"
    port = upstream.port  # a stray server holds the port the child would listen on
    sidecar = await start_sidecar(
        upstream=f"http://127.0.0.1:{port}", wait=None,
        command=[sys.executable, UPSTREAM_APP, "--port", str(port), "--events", str(events)])
    assert await sidecar.wait_exit() == 78
    message = "\n".join(sidecar.raw)
    assert f"something already answers on the upstream address http://127.0.0.1:{port}" in message
    assert not any(entry.get("msg") == "sidecar started" for entry in sidecar.logs)
    assert read_events(events) == []  # the child was never started
    with pytest.raises(OSError):  # and the proxy port was never bound (nothing there now)
        await asyncio.open_connection("127.0.0.1", sidecar.port)


async def test_without_a_health_path_readiness_fails_at_once_while_the_upstream_refuses(
        start_sidecar: StartSidecar, app: App, client: aiohttp.ClientSession) -> None:
    port = free_port()
    sidecar = await start_sidecar(QUICK_PROBE, upstream=f"http://127.0.0.1:{port}")
    status, body = await readyz(client, sidecar)  # the first probe ran before "sidecar started"
    assert status == 503 and body["state"] == "serving"
    assert body["reason"] == f"upstream health check failing: connect to 127.0.0.1:{port} refused"
    seen = len(sidecar.logs)
    await app(port)
    await next_log(sidecar, "upstream healthy", after=seen)
    assert (await readyz(client, sidecar))[0] == 200


async def test_wrapped_child_on_another_port_is_reported_while_starting(
        start_sidecar: StartSidecar, tmp_path: Path, client: aiohttp.ClientSession) -> None:
    """The child listens on a port other than upstream.url's: the log says what the probe gets."""
    expected, actual = free_port(), free_port()
    sidecar = await start_sidecar(
        upstream=f"http://127.0.0.1:{expected}",
        command=[sys.executable, UPSTREAM_APP, "--port", str(actual),
                 "--events", str(tmp_path / "e.jsonl")])
    line = await sidecar.wait_log("waiting for the upstream", timeout=20)
    assert line["msg"].startswith(f"waiting for the upstream: connect to 127.0.0.1:{expected} refused (")
    assert line["waited_seconds"] >= 1
    status, body = await readyz(client, sidecar)
    assert status == 503 and body["state"] == "starting"
    assert body["reason"].endswith(f"connect to 127.0.0.1:{expected} refused")
    sidecar.send(signal.SIGTERM)  # which also stops the child
    assert await sidecar.wait_exit() == 0


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit(1) from util-linux")
async def test_a_drain_at_the_file_descriptor_limit_still_finishes_the_request_in_flight(
        start_sidecar: StartSidecar, upstream) -> None:
    """Taking in the accept queue as the listener closes needs a spare descriptor: a sidecar
    at its RLIMIT_NOFILE (a flood of connections) warns and drains, never crashes."""
    sidecar = await start_sidecar({"drain": {"delay": "0s", "timeout": "10s"}},
                                  upstream=upstream_url(upstream), prefix=["prlimit", "--nofile=48:48"])
    flood: list[socket.socket] = []
    async with aiohttp.ClientSession() as client:
        held = asyncio.ensure_future(client.get(sidecar.url + "/hold?key=fd"))
        async with client.get(upstream_url(upstream) + "/__started?key=fd"):
            pass
        try:
            for _ in range(80):  # more than the sidecar can take: the rest waits in its backlog
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", sidecar.port))
                flood.append(s)
            fds = f"/proc/{sidecar.proc.pid}/fd"
            for _ in range(500):
                if len(os.listdir(fds)) >= 47:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"the sidecar never reached its limit: {len(os.listdir(fds))} fds")
            sidecar.send(signal.SIGTERM)
            await sidecar.wait_log("state closing")
            async with client.get(upstream_url(upstream) + "/__go?key=fd"):
                pass
            async with await held as resp:
                assert resp.status == 200 and await resp.text() == "released fd\n"
        finally:
            for s in flood:
                s.close()
    assert await sidecar.wait_exit() == 0
    assert not any("Traceback" in line for line in sidecar.raw)
    await sidecar.wait_log("drain finished", aborted=0)
