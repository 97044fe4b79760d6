"""The machinery of the smuggling harness: the recorder app on its own thread, a client
that sends raw bytes, the sidecar as a process with its access log, and one case run
through them (``run_case``).  The invariant itself is in ``tests/smuggle.py``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.apps.recorder import Recorded, Recorder, Reply, echo
from tests.smuggle import Case, check

__all__ = ("AccessLog", "AppThread", "SidecarRig", "free_port", "run_case", "send")


class AppThread:
    """The recorder app on its own event loop in a thread (the harness is synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.recorder = Recorder()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self.recorder.start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def port(self) -> int:
        return self.recorder.port

    def script(self, case: Case) -> None:
        first = [True]

        def reply(req: Recorded) -> Reply:
            if first[0] and case.reply is not None and req.target != b"/end":
                first[0] = False
                return Reply(case.reply, case.then)
            return echo(req)

        def early(req: Recorded) -> bool:
            return case.early and first[0] and case.reply is not None and req.target != b"/end"

        self.loop.call_soon_threadsafe(self._set, reply, early)

    def _set(self, reply: Callable[[Recorded], Reply], early: Callable[[Recorded], bool]) -> None:
        self.recorder.clear()
        self.recorder.reply = reply
        self.recorder.early = early

    def snapshot(self) -> tuple[list[Recorded], list[Recorded]]:
        """(complete requests parsed, requests answered), copied on the app's loop."""
        async def copy() -> tuple[list[Recorded], list[Recorded]]:
            return list(self.recorder.requests), list(self.recorder.answered)
        return self._call(copy())  # type: ignore[no-any-return]

    def close(self) -> None:
        self._call(self.recorder.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def send(port: int, data: bytes, *, timeout: float) -> tuple[bytes, bool]:
    """Send the bytes, read until the proxy closes (or ``timeout``); (received, was cut)."""
    received = bytearray()
    cut = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        deadline = time.monotonic() + timeout
        try:
            sock.sendall(data)
        except OSError:
            cut = True
        try:
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            cut = True
        except TimeoutError:
            pass
    return bytes(received), cut


class AccessLog:
    """The proxy's access lines, read as they are appended to its JSON log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("logger") == "sidecar.access":
                out.append(entry)
        return out


def run_case(case: Case, *, port: int, app: AppThread, log: AccessLog | None,
             in_flight: Callable[[], float] | None, timeout: float = 5.0) -> list[str]:
    """One case through the proxy on ``port``; its violations."""
    app.script(case)
    app.snapshot()  # the script is in place
    received, _ = send(port, case.client, timeout=timeout)
    if in_flight is not None:
        deadline = time.monotonic() + 10
        while in_flight() > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
    parsed, answered = app.snapshot()
    logged = None
    if log is not None:
        logged = [(e["method"], str(e["path"]).encode("utf-8", "surrogateescape"), int(e["status"]))
                  for e in log.new_lines()]
    return check(case, parsed, answered, logged, received)


class SidecarRig:
    """The recorder app (a thread) and ``sidecar run`` in front of it (a process), with
    short timeouts so that a case whose bytes leave the connection waiting ends soon."""

    def __init__(self, tmp: Path, *, root: Path) -> None:
        self.app = AppThread()
        self.port, self.admin_port = free_port(), free_port()
        config = tmp / "sidecar.yaml"
        config.write_text(yaml.safe_dump({
            "logging": {"level": "info", "format": "json", "access_log": True},
            "client": {"header_timeout": "500ms", "idle_timeout": "500ms"},
            "upstream": {"timeout": "1s"},
        }))
        self.log_path = tmp / "sidecar.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "--config", str(config),
                 "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}",
                 "--upstream", f"http://127.0.0.1:{self.app.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=root)
        deadline = time.monotonic() + 30
        while b"sidecar started" not in self.log_path.read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("the sidecar did not start:\n" + self.log_path.read_text())
            time.sleep(0.02)
        self.log = AccessLog(self.log_path)

    def in_flight(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("sidecar_requests_in_flight "):
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError("sidecar_requests_in_flight not in /metrics")

    def run(self, case: Case) -> list[str]:
        return run_case(case, port=self.port, app=self.app, log=self.log, in_flight=self.in_flight)

    def errors_logged(self) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if "Traceback" in line or '"level": "error"' in line
                or "Fatal error" in line]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.app.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
