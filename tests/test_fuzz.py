"""Property-based fuzz of the proxy port: random and mutated request bytes, sent to ONE
sidecar process for the whole test.

Promises: the sidecar never answers 5xx itself for a request that did not reach the app,
never logs an error or a traceback, its in-flight gauge returns to 0, and it still serves.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, UPSTREAM_APP, free_port, statuses

SOCKET_TIMEOUT = 30.0  # per example; the sidecar's own timeouts end every exchange long before


@dataclass
class Target:
    port: int
    admin_port: int
    events: Path
    log: Path

    def app_requests(self) -> int:
        if not self.events.exists():
            return 0
        return self.events.read_text().count('"event": "received"')

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in metrics")


def _wait_until(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The upstream app and one sidecar, both real processes, stopped by pid at the end."""
    tmp = tmp_path_factory.mktemp("fuzz")
    up_port, port, admin_port = free_port(), free_port(), free_port()
    target = Target(port, admin_port, tmp / "events.jsonl", tmp / "sidecar.log")
    config = tmp / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "logging": {"level": "debug", "format": "json", "access_log": True},
        "client": {"header_timeout": "1s", "idle_timeout": "1s"},
        "upstream": {"timeout": "1s"},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, UPSTREAM_APP, "--port", str(up_port), "--events", str(target.events)],
            stdin=subprocess.DEVNULL, cwd=ROOT))
        _wait_until(lambda: _listening(up_port), "the upstream app")
        with target.log.open("wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "--config", str(config),
                 "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin_port}",
                 "--upstream", f"http://127.0.0.1:{up_port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=ROOT))
        _wait_until(lambda: b"sidecar started" in target.log.read_bytes(), "the sidecar")
        yield target
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait(10)


# --- what is sent -------------------------------------------------------------------------

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
                min_size=1, max_size=12)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT"]
PATHS = ["/headers", "/headers/x?a=1&b=%2F", "/status/200", "/status/500", "/bytes?n=10", "/hop",
         "/cookies", "/nope", "*", "http://h.example/headers", "h.example:443", "/a b", "//x"]
VERSIONS = ["HTTP/1.1"] * 6 + ["HTTP/1.0"] * 2 + ["HTTP/1.2", "HTTP/2.0", "http/1.1", ""]
HEADERS = [("X-A", "1"), ("Content-Length", "5"), ("Content-Length", "0"), ("Content-Length", "-1"),
           ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "gzip, chunked"),
           ("Connection", "keep-alive"), ("Connection", "Upgrade, X-A"), ("Upgrade", "websocket"),
           ("Expect", "100-continue"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
           ("Host", "y"), ("X-Forwarded-For", "203.0.113.1"), ("Accept", "*/*")]
BODIES = [b"", b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n"]


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy[str], rare: st.SearchStrategy[str]) -> str:
    """The usual value nine times in ten, so that many requests are valid and reach the app
    (hypothesis favours small integers: the rare branch is the largest one)."""
    return draw(rare if draw(st.integers(0, 9)) == 9 else usual)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    method = _mostly(draw, st.sampled_from(METHODS), TOKEN)
    path = _mostly(draw, st.sampled_from(PATHS), st.text(max_size=20))
    version = draw(st.sampled_from(VERSIONS))
    line = f"{method} {path} {version}".rstrip()
    headers = draw(st.lists(st.sampled_from(HEADERS), max_size=2))
    if draw(st.integers(0, 4)) == 4:
        headers.append((draw(TOKEN), draw(st.text(max_size=20))))
    if draw(st.integers(0, 4)) < 4:  # mostly with a Host
        headers.insert(0, ("Host", "x"))
    if draw(st.integers(0, 3)) < 3:  # most exchanges end without waiting for a timeout
        headers.append(("Connection", "close"))
    body = draw(st.binary(max_size=64) if draw(st.integers(0, 3)) == 3 else st.sampled_from(BODIES))
    framed = any(k in ("Content-Length", "Transfer-Encoding") for k, _ in headers)
    if body and not framed and draw(st.integers(0, 3)) < 3:  # mostly a body with its length
        headers.append(("Content-Length", str(len(body))))
    head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(request()))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "repeat"]))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from([b"\r", b"\n", b"\x00", b" ", b":", b"\r\n", b"\t"])
                               | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
        elif op == "repeat":
            data[at:at] = data[max(0, at - 40):at]
    return bytes(data)


PAYLOADS = st.one_of(
    st.binary(min_size=1, max_size=512),
    request(),
    request(),
    mutated(),
    st.lists(request(), min_size=2, max_size=3).map(b"".join),  # pipelined
)


def exchange(port: int, data: bytes) -> bytes:
    """Send the bytes, half-open; return what comes back until the sidecar closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return b""  # answered and closed before all of it was read
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return bytes(received)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=PAYLOADS)
def test_fuzzed_requests_never_get_a_sidecar_5xx_or_an_error(target: Target, data: bytes) -> None:
    before = target.app_requests()
    codes = statuses(exchange(target.port, data))
    reached_app = target.app_requests() > before
    if not reached_app:
        assert all(code < 500 for code in codes), (codes, data)


def test_after_the_fuzz_the_sidecar_is_clean_and_serving(target: Target) -> None:
    """Runs after the fuzz (same module, same process): gauge at 0, no error logged, serving."""
    _wait_until(lambda: target.metric("sidecar_requests_in_flight") == 0, "in-flight back to 0")
    with urllib.request.urlopen(f"http://127.0.0.1:{target.port}/headers", timeout=10) as resp:
        assert resp.status == 200
    lines = target.log.read_text(errors="replace").splitlines()
    bad = [line for line in lines if "Traceback" in line or '"level": "error"' in line
           or '"level": "critical"' in line]
    assert not bad, "\n".join(bad[:5])
    assert sum('"msg": "bad request"' in line for line in lines) > 0  # the fuzz did reach it
    assert json.loads(lines[0])["msg"]  # the log is still one JSON object per line
