"""Readiness for gRPC apps: ``upstream.health_grpc`` asks the app's grpc.health.v1.Health/Check.

The app is a real grpcio server with grpcio-health-checking's servicer (tests/apps/grpc_pod.py),
as its own process; the sidecar is ``python -m sidecar run``.  Each test states what /readyz
answers, and why in words, for one thing the app's health service can say.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from grpc_health.v1 import health_pb2

from sidecar.upstream.grpc_health import decode_response, encode_request
from tests.conftest import ROOT, StartSidecar, StartUpstream, free_port, metric, wait_port

GRPC_APP = str(ROOT / "tests" / "apps" / "grpc_pod.py")
QUICK = {"health_interval": "100ms"}

StartGrpcApp = Callable[..., Awaitable[tuple[asyncio.subprocess.Process, int]]]


@pytest.fixture
async def grpc_app() -> AsyncIterator[StartGrpcApp]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(*health: str) -> tuple[asyncio.subprocess.Process, int]:
        port = free_port()
        args = [sys.executable, GRPC_APP, "--port", str(port)]
        for item in health:
            args += ["--health", item]
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL)
        procs.append(proc)
        await wait_port(port)
        return proc, port

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def readyz(client: aiohttp.ClientSession, admin: str) -> tuple[int, dict[str, Any]]:
    async with client.get(admin + "/readyz") as resp:
        return resp.status, await resp.json()


async def until_readyz(client: aiohttp.ClientSession, admin: str, status: int,
                       timeout: float = 15.0) -> dict[str, Any]:
    """Poll /readyz (every 50 ms, at most ``timeout`` s) until it answers ``status`` after a
    probe has run (not "not checked yet")."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        code, body = await readyz(client, admin)
        if code == status and "not checked yet" not in body.get("reason", ""):
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"/readyz still {code} {body} after {timeout}s")
        await asyncio.sleep(0.05)


def test_the_health_messages_are_the_protobuf_wire_form() -> None:
    """The hand-written encoding of the two one-field messages is byte for byte protobuf's."""
    for service in ("", "shop.CartService", "x" * 300):
        message = health_pb2.HealthCheckRequest(service=service).SerializeToString()
        assert encode_request(service) == b"\x00" + len(message).to_bytes(4, "big") + message
    for status in (0, 1, 2, 3):
        message = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert decode_response(b"\x00" + len(message).to_bytes(4, "big") + message) == status


@pytest.mark.parametrize("service", ["", "test.Echo"], ids=["whole-server", "named-service"])
async def test_grpc_app_serving_makes_the_sidecar_ready(
        start_sidecar: StartSidecar, grpc_app: StartGrpcApp, client: aiohttp.ClientSession,
        service: str) -> None:
    """Health/Check answering SERVING (for the server or the named service) = ready, up = 1."""
    _, port = await grpc_app()
    sidecar = await start_sidecar({"upstream": {**QUICK, "health_grpc": service}},
                                  upstream=f"http://127.0.0.1:{port}")
    body = await until_readyz(client, sidecar.admin, 200)
    assert body == {"ready": True, "state": "serving"}
    assert await metric(client, sidecar.admin, "sidecar_upstream_up") == 1


async def test_grpc_app_not_serving_keeps_the_sidecar_unready_and_says_why(
        start_sidecar: StartSidecar, grpc_app: StartGrpcApp, client: aiohttp.ClientSession) -> None:
    """NOT_SERVING from the start: /readyz 503 naming the status; starting, up = 0."""
    _, port = await grpc_app("=NOT_SERVING")
    sidecar = await start_sidecar({"upstream": {**QUICK, "health_grpc": ""}},
                                  upstream=f"http://127.0.0.1:{port}")
    body = await until_readyz(client, sidecar.admin, 503)
    assert body["state"] == "starting"
    assert body["reason"] == ("waiting for the upstream to become healthy: "
                              "/grpc.health.v1.Health/Check says the server is NOT_SERVING")
    assert await metric(client, sidecar.admin, "sidecar_upstream_up") == 0


async def test_grpc_app_turning_not_serving_takes_readiness_away(
        start_sidecar: StartSidecar, grpc_app: StartGrpcApp, client: aiohttp.ClientSession) -> None:
    """SERVING, then the app sets NOT_SERVING: /readyz goes 503 with the status in words."""
    app, port = await grpc_app()
    sidecar = await start_sidecar({"upstream": {**QUICK, "health_grpc": "test.Echo"}},
                                  upstream=f"http://127.0.0.1:{port}")
    await until_readyz(client, sidecar.admin, 200)
    app.send_signal(signal.SIGUSR1)  # the app marks every service NOT_SERVING
    body = await until_readyz(client, sidecar.admin, 503)
    assert body["reason"] == ("upstream health check failing: /grpc.health.v1.Health/Check "
                              "says service 'test.Echo' is NOT_SERVING")
    await sidecar.wait_log("upstream unhealthy")
    assert await metric(client, sidecar.admin, "sidecar_upstream_up") == 0


async def test_grpc_service_unknown_to_the_app_is_not_ready_and_named(
        start_sidecar: StartSidecar, grpc_app: StartGrpcApp, client: aiohttp.ClientSession) -> None:
    """A service the app's health server does not know (NOT_FOUND) is not ready, by name."""
    _, port = await grpc_app()
    sidecar = await start_sidecar({"upstream": {**QUICK, "health_grpc": "shop.NoSuchService"}},
                                  upstream=f"http://127.0.0.1:{port}")
    body = await until_readyz(client, sidecar.admin, 503)
    assert body["reason"] == ("waiting for the upstream to become healthy: the app's health "
                              "service does not know service 'shop.NoSuchService' (NOT_FOUND)")


async def test_app_not_speaking_http2_is_not_ready_and_named(
        start_sidecar: StartSidecar, start_upstream_process: StartUpstream,
        client: aiohttp.ClientSession) -> None:
    """health_grpc pointed at an HTTP/1.1-only app: not ready, and the reason says h2c."""
    _, port, _ = await start_upstream_process()
    sidecar = await start_sidecar({"upstream": {**QUICK, "health_grpc": ""}},
                                  upstream=f"http://127.0.0.1:{port}")
    body = await until_readyz(client, sidecar.admin, 503)
    assert body["reason"].startswith(
        "waiting for the upstream to become healthy: the app does not speak HTTP/2 cleartext (h2c)")


async def test_grpc_app_not_listening_is_not_ready_and_named(
        start_sidecar: StartSidecar, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Nothing on the app's port: the usual "connect refused" reason, the probe keeps trying."""
    port = free_port()
    sidecar = await start_sidecar({"upstream": {**QUICK, "health_grpc": ""}},
                                  upstream=f"http://127.0.0.1:{port}")
    body = await until_readyz(client, sidecar.admin, 503)
    assert body["reason"] == (f"waiting for the upstream to become healthy: "
                              f"connect to 127.0.0.1:{port} refused")
