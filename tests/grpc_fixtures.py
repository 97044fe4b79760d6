"""Fixtures for the HTTP/2 tests: the gRPC test app as a real process, and the sidecar in
front of it; what the app saw is read back from its call log."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Sidecar, StartSidecar, free_port

GRPC_APP = str(ROOT / "tests" / "apps" / "grpc_app.py")


class GrpcApp:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, event: str | None = "start") -> list[dict[str, Any]]:
        """The app's call log (the ``start`` lines by default)."""
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [c for c in lines if event is None or c["event"] == event]

    async def wait_call(self, method: str, event: str, timeout: float = 10.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for call in self.calls(event):
                if call["method"] == method:
                    return call
            if loop.time() > deadline:
                raise AssertionError(f"the app logged no {method} {event}: {self.calls(None)}")
            await asyncio.sleep(0.02)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


StartGrpcApp = Callable[..., Awaitable[GrpcApp]]


@pytest.fixture
async def start_grpc_app(tmp_path: Path) -> AsyncIterator[StartGrpcApp]:
    apps: list[GrpcApp] = []

    async def start(*extra: str) -> GrpcApp:
        port = free_port()
        log = tmp_path / f"grpc-calls-{port}.jsonl"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, GRPC_APP, "--port", str(port), "--log", str(log), *extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"ready", line
        app = GrpcApp(proc, port, log)
        apps.append(app)
        return app

    yield start
    for app in apps:
        if app.proc.returncode is None:
            app.proc.kill()
            await app.proc.wait()


@pytest.fixture
async def grpc_app(start_grpc_app: StartGrpcApp) -> GrpcApp:
    return await start_grpc_app()


async def sidecar_for(start_sidecar: StartSidecar, app: GrpcApp,
                      config: dict[str, Any] | None = None) -> Sidecar:
    cfg: dict[str, Any] = {"logging": {"access_log": True}}
    cfg.update(config or {})
    return await start_sidecar(cfg, upstream=app.url)
