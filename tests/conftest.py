"""Shared fixtures: a real upstream app, and the sidecar as a real process.

Nothing is mocked: the sidecar runs as ``python -m sidecar run`` with real
sockets, and every wait is for an event (a log line, a socket, an exit) with a
bounded timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from tests.apps.upstream import EVENTS, make_app

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_APP = str(ROOT / "tests" / "apps" / "upstream.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sidecar:
    """``sidecar run`` as a child process, with its JSON log lines collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, admin_port: int) -> None:
        self.proc = proc
        self.port = port
        self.admin_port = admin_port
        self.logs: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.ensure_future(self._read())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                self.logs.append(json.loads(text))
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_log(self, msg: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Wait for a log line whose message starts with ``msg`` (and has these fields)."""
        def found() -> dict[str, Any] | None:
            for entry in self.logs:
                if str(entry.get("msg", "")).startswith(msg) and all(
                        entry.get(k) == v for k, v in fields.items()):
                    return entry
            return None

        async def wait() -> dict[str, Any]:
            async with self._changed:
                while (entry := found()) is None:
                    if self._reader.done():
                        raise AssertionError(f"sidecar exited before logging {msg!r}:\n"
                                             + "\n".join(self.raw))
                    await self._changed.wait()
                return entry

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no log {msg!r} within {timeout}s:\n" + "\n".join(self.raw)) from None

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar(tmp_path: Path) -> AsyncIterator[StartSidecar]:
    """Start ``sidecar run`` with a config dict; wait until it has bound its ports."""
    started: list[Sidecar] = []

    async def start(
        config: dict[str, Any] | None = None,
        *,
        upstream: str | None = None,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        wait: str | None = "sidecar started",
        prefix: list[str] | None = None,
    ) -> Sidecar:
        port, admin_port = free_port(), free_port()
        cfg: dict[str, Any] = {"logging": {"format": "json", "level": "debug"}}
        for key, value in (config or {}).items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        path = tmp_path / f"sidecar-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = [*(prefix or []), sys.executable, "-m", "sidecar", "run", "--config", str(path),
                "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin_port}"]
        if upstream is not None:
            args += ["--upstream", upstream]
        if command is not None:
            args += ["--", *command]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        full_env.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=full_env, cwd=str(ROOT),
        )
        sidecar = Sidecar(proc, port, admin_port)
        started.append(sidecar)
        if wait:
            await sidecar.wait_log(wait)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.kill()


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    """The test upstream app, in-process on a free port."""
    return await aiohttp_server(make_app())


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def metric(client: aiohttp.ClientSession, admin: str, line_start: str) -> float:
    """The value of the first /metrics line that starts with ``line_start``."""
    async with client.get(admin + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in metrics:\n{text}")


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m sidecar ARGS`` without the caller's SIDECAR_* variables: (code, out, err)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args, env=full_env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


def statuses(data: bytes | None) -> list[int]:
    """The status codes of the HTTP/1.x answers in raw bytes, in order."""
    return [int(code) for code in re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ", data or b"")]


def upstream_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def upstream_events(server: TestServer) -> list[dict[str, Any]]:
    return list(server.app[EVENTS])


StartUpstream = Callable[..., Awaitable[tuple[asyncio.subprocess.Process, int, Path]]]


@pytest.fixture
async def start_upstream_process(tmp_path: Path) -> AsyncIterator[StartUpstream]:
    """The upstream app as its own process (for exit modes); returns (proc, port, events file).

    Whatever is still running at the end of the test is killed.
    """
    procs: list[asyncio.subprocess.Process] = []

    async def start(*extra: str) -> tuple[asyncio.subprocess.Process, int, Path]:
        port = free_port()
        events = tmp_path / f"events-{port}.jsonl"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, UPSTREAM_APP, "--port", str(port), "--events", str(events), *extra,
            stdin=asyncio.subprocess.DEVNULL,
        )
        procs.append(proc)
        await wait_port(port)
        return proc, port, events

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts on the port (the app has started)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if loop.time() > deadline:
                raise AssertionError(f"nothing listening on {port} after {timeout}s") from None
            await asyncio.sleep(0.02)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def raw_request(
    port: int, data: bytes, *, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def read_response(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[str, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with Content-Length from a raw socket."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode().split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    return lines[0], headers, body


# The HTTP/2 tests' fixtures (the gRPC app), shared by their modules.
from tests.grpc_fixtures import grpc_app, start_grpc_app  # noqa: F401
