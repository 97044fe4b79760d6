"""A rolling restart behind a real HAProxy loses nothing and shows clients no error.

Two "pods" (the test app as a process, and ``sidecar run`` in front of it) sit behind
HAProxy, which health-checks each sidecar's ``/readyz`` on the admin port and keeps
connections to the sidecars alive.  Under steady keep-alive load, pod A is drained with
SIGTERM while its replacement starts on a slot HAProxy already knows (a server on a
pre-chosen port, DOWN until its health check passes); then pod B the same way.  The
HAProxy config is the one docs/kubernetes.md ("Behind a load balancer") tells users to
write: no retry-on, no redispatch.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import io
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import ROOT, UPSTREAM_APP, Sidecar, free_port, read_events, wait_port

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")

CLIENTS = 30
REQUEST_MS = 20
# The pods' drain: delay well above HAProxy's "inter 200ms fall 2" (DOWN within ~0.6 s).
POD_CONFIG = {"drain": {"delay": "2s", "timeout": "10s", "grace_period": "20s"},
              "logging": {"format": "json", "level": "info"}}

# The configuration docs/kubernetes.md recommends, with the test's ports filled in.
HAPROXY_CFG = """\
global
    stats socket ipv4@127.0.0.1:{stats} level admin

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s

frontend web
    bind 127.0.0.1:{port}
    default_backend pods

backend pods
    balance roundrobin
    option httpchk GET /readyz
    default-server check inter 200ms fall 2 rise 1
{servers}
"""


@dataclass
class Pod:
    name: str
    port: int
    admin_port: int
    events: Path
    app: asyncio.subprocess.Process | None = None
    sidecar: Sidecar | None = None


class Cluster:
    """The processes of the test; everything started is stopped by its pid at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.procs: list[asyncio.subprocess.Process] = []
        self.sidecars: list[Sidecar] = []

    def pod(self, name: str) -> Pod:
        return Pod(name, free_port(), free_port(), self.tmp / f"events-{name}.jsonl")

    async def start_pod(self, pod: Pod) -> None:
        app_port = free_port()
        pod.app = await asyncio.create_subprocess_exec(
            sys.executable, UPSTREAM_APP, "--port", str(app_port), "--events", str(pod.events),
            stdin=asyncio.subprocess.DEVNULL)
        self.procs.append(pod.app)
        await wait_port(app_port)
        config = self.tmp / f"sidecar-{pod.name}.yaml"
        config.write_text(yaml.safe_dump(POD_CONFIG))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", "--config", str(config),
            "--listen", f"127.0.0.1:{pod.port}", "--admin", f"127.0.0.1:{pod.admin_port}",
            "--upstream", f"http://127.0.0.1:{app_port}",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=str(ROOT))
        pod.sidecar = Sidecar(proc, pod.port, pod.admin_port)
        self.sidecars.append(pod.sidecar)
        await pod.sidecar.wait_log("sidecar started", timeout=20)

    async def stop_app(self, pod: Pod) -> None:
        """What the kubelet does once the pod's preStop (the drain) is over."""
        assert pod.app is not None
        if pod.app.returncode is None:
            pod.app.send_signal(signal.SIGTERM)
        await asyncio.wait_for(pod.app.wait(), 15)

    async def start_haproxy(self, port: int, stats: int, pods: list[Pod]) -> asyncio.subprocess.Process:
        servers = "\n".join(f"    server {p.name} 127.0.0.1:{p.port} port {p.admin_port}" for p in pods)
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(stats=stats, port=port, servers=servers))
        assert HAPROXY is not None
        log = (self.tmp / "haproxy.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            HAPROXY, "-db", "-f", str(cfg), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        self.procs.append(proc)
        return proc

    async def close(self) -> None:
        for sidecar in self.sidecars:
            await sidecar.kill()
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def show_stat(stats_port: int) -> dict[str, dict[str, str]]:
    """HAProxy's runtime API ``show stat``, one row per server of the backend, by name."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", stats_port), 5)
    writer.write(b"show stat\n")
    await writer.drain()
    text = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {r["svname"]: r for r in rows if r["pxname"] == "pods" and r["svname"] not in ("BACKEND",)}


async def until(what: str, check: Any, timeout: float = 30.0) -> None:
    """Poll an async condition (HAProxy's view, counters) every 50 ms, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.05)


async def test_rolling_restart_behind_haproxy_loses_nothing_and_shows_no_client_error(tmp_path: Path) -> None:
    """Drain pod A, bring up its replacement, then pod B, under keep-alive load through HAProxy:
    zero client-visible errors, and the ids the apps received are exactly the ids answered 200
    (none lost, none twice)."""
    cluster = Cluster(tmp_path)
    a, b, a2, b2 = (cluster.pod(n) for n in ("a", "b", "a2", "b2"))
    port, stats = free_port(), free_port()
    ok: list[str] = []
    errors: list[tuple[str, str]] = []
    stop = asyncio.Event()
    figures: dict[str, Any] = {}
    try:
        await asyncio.gather(cluster.start_pod(a), cluster.start_pod(b))
        haproxy = await cluster.start_haproxy(port, stats, [a, b, a2, b2])

        async def topology(up: set[str]) -> bool:
            try:
                servers = await show_stat(stats)
            except (OSError, TimeoutError):
                return False  # HAProxy still starting
            # Exactly "UP" or "DOWN": "UP 1/2" is a server going down that still takes traffic.
            return {n: r["status"] for n, r in servers.items()} == {
                n: "UP" if n in up else "DOWN" for n in servers}

        await until("HAProxy: a, b UP; the spare slots a2, b2 DOWN", lambda: topology({"a", "b"}))

        async def client(n: int) -> None:
            """One client with one keep-alive connection, no retry of its own."""
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=15)) as session:
                session._retry_connection = False  # see every failure, no silent retry
                i = 0
                while not stop.is_set():
                    rid = f"c{n}-{i}"
                    i += 1
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/hold?ms={REQUEST_MS}&id={rid}") as r:
                            await r.read()
                            if r.status == 200:
                                ok.append(rid)
                            else:
                                errors.append((rid, f"HTTP {r.status}"))
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        errors.append((rid, type(exc).__name__))

        clients = [asyncio.ensure_future(client(n)) for n in range(CLIENTS)]

        async def served_by(pod: Pod, at_least: int) -> bool:
            return int((await show_stat(stats))[pod.name]["stot"]) >= at_least

        await until("load flowing to both pods", lambda: served_by(a, 50))
        await until("load flowing to both pods", lambda: served_by(b, 50))

        for old, new, up in ((a, a2, {"a2", "b"}), (b, b2, {"a2", "b2"})):
            assert old.sidecar is not None
            begun = time.monotonic()
            old.sidecar.send(signal.SIGTERM)  # the kubelet deletes the pod ...
            await cluster.start_pod(new)  # ... and the Deployment starts its replacement
            await until(f"HAProxy takes {old.name} out and {new.name} in",
                        lambda up=up: topology(up))
            figures[f"{new.name} in rotation after"] = round(time.monotonic() - begun, 2)
            assert await old.sidecar.wait_exit(timeout=30) == 0
            summary = await old.sidecar.wait_log("drain finished")
            figures[f"{old.name} drain"] = summary
            await cluster.stop_app(old)
            await until(f"{new.name} serving", lambda new=new: served_by(new, 50))

        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
        final = await show_stat(stats)
        haproxy.send_signal(signal.SIGTERM)
        await asyncio.wait_for(haproxy.wait(), 10)
    finally:
        stop.set()
        await cluster.close()

    received: collections.Counter[str] = collections.Counter()
    per_pod: dict[str, int] = {}
    for pod in (a, b, a2, b2):
        ids = [e["id"] for e in read_events(pod.events) if e["event"] == "received" and e["id"]]
        per_pod[pod.name] = len(ids)
        received.update(ids)
    kinds = collections.Counter(kind for _, kind in errors)
    print(f"\nrolling restart behind HAProxy: {len(ok) + len(errors)} requests, {len(ok)} answered 200, "
          f"errors {dict(kinds) or 0}")
    print(f"  received per pod: {per_pod}")
    print("  HAProxy per server (requests, retries, redispatches, connection errors, response errors): "
          + ", ".join(f"{n} {r['stot']}/{r['wretr']}/{r['wredis']}/{r['econ']}/{r['eresp']}"
                      for n, r in final.items()))
    for name in ("a", "b"):
        s = figures[f"{name} drain"]
        print(f"  pod {name}: drain {s['duration_seconds']} s, completed {s['completed']}, "
              f"rejected {s['rejected']}, aborted {s['aborted']}, in flight at SIGTERM "
              f"{s['in_flight_at_trigger']}; replacement in rotation after "
              f"{figures[f'{name}2 in rotation after']} s")

    assert errors == [], f"client-visible errors: {dict(kinds)}; first: {errors[:10]}"
    twice = [rid for rid, n in received.items() if n > 1]
    assert twice == [], f"requests the apps received more than once: {twice[:10]}"
    assert set(received) == set(ok), (
        f"received but not answered 200: {sorted(set(received) - set(ok))[:10]}; "
        f"answered but never received: {sorted(set(ok) - set(received))[:10]}")
    assert all(per_pod[p] > 0 for p in per_pod), per_pod
    for name in ("a", "b"):
        assert figures[f"{name} drain"]["aborted"] == 0
