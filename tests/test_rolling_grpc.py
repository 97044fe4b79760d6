"""A pod drained under a real gRPC client's load loses no call and fails none.

Two "pods" (a grpcio app, tests/apps/grpc_pod.py, and ``sidecar run`` in front of it with
``upstream.health_grpc``) on loopback ports; ONE grpcio channel balances round-robin over both
sidecars (``ipv4:127.0.0.1:P1,127.0.0.1:P2``), the way a gRPC client does with a headless
Service, with gRPC's default retry behaviour: no retry policy, so a call that reached a server
and failed is a failure; only a call that never left the client is retried, transparently.  Steady unary load from several threads, every tenth call slow (300 ms).
Pod A is then stopped as the kubelet does with the documented wiring: SIGTERM to the sidecar
and, at the same time, the app's preStop ``GET /drain`` on the admin port (blocks until
drained); then SIGTERM to the app.  The client learns of the drain only through HTTP/2: the
GOAWAY(2^31-1)+PING at the trigger, the final GOAWAY at ``closing``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml

from tests.conftest import ROOT, Sidecar, free_port, wait_port

GRPC_APP = str(ROOT / "tests" / "apps" / "grpc_pod.py")
THREADS = 8
SLOW_EVERY, SLOW_MS, FAST_MS = 10, 300, 5
POD_CONFIG = {"drain": {"delay": "1s", "timeout": "10s", "grace_period": "20s"},
              "upstream": {"health_grpc": "", "health_interval": "200ms"},
              "logging": {"format": "json", "level": "info"}}


@dataclass
class Pod:
    name: str
    calls: Path
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    app: asyncio.subprocess.Process | None = None
    sidecar: Sidecar | None = None


async def start_pod(pod: Pod, tmp: Path) -> None:
    app_port = free_port()
    pod.app = await asyncio.create_subprocess_exec(
        sys.executable, GRPC_APP, "--port", str(app_port), "--calls", str(pod.calls),
        "--on-sigterm", "graceful", "--grace", "10", stdin=asyncio.subprocess.DEVNULL)
    await wait_port(app_port)
    config = tmp / f"sidecar-{pod.name}.yaml"
    config.write_text(yaml.safe_dump(POD_CONFIG))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "--config", str(config),
        "--listen", f"127.0.0.1:{pod.port}", "--admin", f"127.0.0.1:{pod.admin_port}",
        "--upstream", f"http://127.0.0.1:{app_port}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, cwd=str(ROOT),
        env={k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")})
    pod.sidecar = Sidecar(proc, pod.port, pod.admin_port)
    await pod.sidecar.wait_log("sidecar started", timeout=20)


class Load:
    """Unary calls from THREADS threads on one round-robin channel; every outcome recorded."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
        self.hold = self.channel.unary_unary("/test.Echo/Hold")
        self.ok: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(THREADS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            cid = f"t{n}-{i}"
            ms = SLOW_MS if i % SLOW_EVERY == n % SLOW_EVERY else FAST_MS
            i += 1
            request = f'{{"id": "{cid}", "ms": {ms}}}'.encode()
            try:
                answer = self.hold(request, timeout=15)
            except grpc.RpcError as exc:
                self.failed.append((cid, f"{exc.code().name}: {exc.details()}"))
            else:
                if answer == cid.encode():
                    self.ok.append(cid)
                else:
                    self.failed.append((cid, f"wrong answer {answer[:40]!r}"))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.to_thread(lambda: [t.join() for t in self._threads]), 30)
        self.channel.close()


def logged(pod: Pod) -> list[str]:
    return pod.calls.read_text().split() if pod.calls.exists() else []


async def until(what: str, check: Any, timeout: float = 30.0) -> None:
    """Poll a condition every 50 ms, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.05)


async def test_grpc_rolling_restart_fails_no_call_and_answers_each_logged_call_once(
        tmp_path: Path) -> None:
    """Drain pod A the kubelet's way under round-robin gRPC load: 0 failed RPCs, and every call
    an app logged was answered OK to the client exactly once (none lost, none run twice)."""
    a, b = Pod("a", tmp_path / "calls-a"), Pod("b", tmp_path / "calls-b")
    load: Load | None = None
    summary: dict[str, Any] = {}
    try:
        await asyncio.gather(start_pod(a, tmp_path), start_pod(b, tmp_path))
        assert a.sidecar is not None and b.sidecar is not None and a.app is not None
        for sidecar in (a.sidecar, b.sidecar):  # ready: the app's grpc.health.v1 says SERVING
            await sidecar.wait_log("upstream healthy", timeout=20)
        async with aiohttp.ClientSession() as http:
            load = Load(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}")
            load.start()
            await until("load on both pods", lambda: min(len(logged(a)), len(logged(b))) >= 100)

            # The kubelet: SIGTERM to the sidecar container, the app container's preStop at once.
            a.sidecar.send(signal.SIGTERM)
            async with http.get(f"http://127.0.0.1:{a.admin_port}/drain",
                                timeout=aiohttp.ClientTimeout(total=30)) as resp:
                assert resp.status == 200, await resp.text()
                summary = await resp.json()
            a.app.send_signal(signal.SIGTERM)  # preStop over: SIGTERM to the app
            assert await asyncio.wait_for(a.app.wait(), 20) == 0
            assert await a.sidecar.wait_exit(timeout=30) == 0
            after = len(logged(b))
            await until("load goes on on pod B", lambda: len(logged(b)) >= after + 100)
        await load.finish()
    finally:
        if load is not None:
            load.stop.set()
        for pod in (a, b):
            if pod.sidecar is not None:
                await pod.sidecar.kill()
            if pod.app is not None and pod.app.returncode is None:
                pod.app.kill()
                await pod.app.wait()

    received = collections.Counter(logged(a) + logged(b))
    kinds = collections.Counter(kind.split(":")[0] for _, kind in load.failed)
    print(f"\nrolling restart, gRPC round-robin over 2 sidecars: {len(load.ok) + len(load.failed)} "
          f"calls, {len(load.ok)} OK, failed {dict(kinds) or 0}; logged by a {len(logged(a))}, "
          f"by b {len(logged(b))}; drain of a: {summary}")
    assert load.failed == [], f"failed RPCs: {dict(kinds)}; first: {load.failed[:10]}"
    twice = [cid for cid, n in received.items() if n > 1]
    assert twice == [], f"calls an app ran more than once: {twice[:10]}"
    assert set(received) == set(load.ok), (
        f"logged but not answered OK: {sorted(set(received) - set(load.ok))[:10]}; "
        f"answered but never logged: {sorted(set(load.ok) - set(received))[:10]}")
    assert summary["aborted"] == 0, summary
