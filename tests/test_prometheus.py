"""A real Prometheus scrapes two sidecars through a drain, with the project's own rules loaded.

Prometheus (the Debian package's /usr/bin/prometheus) runs on loopback with a 250 ms scrape
and rule-evaluation interval and ``deploy/monitoring/rules/sidecar.rules.yaml`` as shipped.
Two sidecars front one upstream under keep-alive load:

- ``clean``: requests still in flight at the trigger finish during ``closing``; nothing is lost;
- ``aborting``: one request outlives ``drain.timeout`` and is aborted; its budget is tight
  (``drain.grace_period`` 2 s), so the drain also uses over 80 % of its own grace period.

Both linger after ``drained``; the test ends the linger (a second SIGTERM) only once
Prometheus holds the final numbers, then asks Prometheus's HTTP API what it saw and which
alerts its own rule evaluation fired. Every wait is for an event or a query result, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import ROOT, Sidecar, StartSidecar, free_port, upstream_url

RULES = ROOT / "deploy" / "monitoring" / "rules" / "sidecar.rules.yaml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
INTERVAL = "250ms"
NAMESPACE = "promtest"

needs_prometheus = pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK),
    reason="needs the prometheus binary (Debian package 'prometheus'); CI installs it")


class Prometheus:
    """The HTTP API of a Prometheus we started."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, session: aiohttp.ClientSession):
        self.proc, self.port, self.session = proc, port, session
        self.url = f"http://127.0.0.1:{port}"

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str, at: float | None = None) -> dict[tuple[str, ...], float]:
        """Instant query: {label values of the result's labels (sorted by name): value}."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = await self.api("query", **params)
        assert data["resultType"] == "vector", data
        return {tuple(v for _, v in sorted(r["metric"].items())): float(r["value"][1])
                for r in data["result"]}

    async def scalar(self, expr: str, at: float | None = None) -> float | None:
        result = await self.query(expr, at)
        assert len(result) <= 1, (expr, result)
        return next(iter(result.values()), None)

    async def wait_for(self, expr: str, ok: Callable[[float | None], bool],
                       what: str, timeout: float = 20.0) -> float | None:
        """Poll an instant query until ``ok(value)``; fail with the last value seen."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.scalar(expr)
            if ok(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {expr} = {value} after {timeout}s")
            await asyncio.sleep(0.1)


StartPrometheus = Callable[[dict[str, int]], Awaitable[Prometheus]]


@pytest.fixture
async def start_prometheus(tmp_path: Path) -> AsyncIterator[StartPrometheus]:
    """Prometheus scraping {pod name: admin port}, the shipped rules loaded; stopped at teardown."""
    procs: list[asyncio.subprocess.Process] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def start(targets: dict[str, int]) -> Prometheus:
        port = free_port()
        config = {
            "global": {"scrape_interval": INTERVAL, "scrape_timeout": "200ms",
                       "evaluation_interval": INTERVAL},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "drain-sidecar",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{admin}"],
                     "labels": {"namespace": NAMESPACE, "pod": pod, "container": "sidecar"}}
                    for pod, admin in targets.items()],
            }],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        procs.append(proc)
        prom = Prometheus(proc, port, session)
        deadline = time.monotonic() + 30
        while True:  # ready, and every target scraped successfully at least once
            with contextlib.suppress(aiohttp.ClientError, AssertionError):
                up = await prom.query('up{job="drain-sidecar"} == 1')
                if len(up) == len(targets):
                    return prom
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError("prometheus did not come up:\n"
                                     + (tmp_path / "prometheus.log").read_text())
            await asyncio.sleep(0.1)

    yield start
    await session.close()
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class Load:
    """Keep-alive clients looping GET /hold?ms=50 through one sidecar; counts what they got."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.done_at: list[float] = []  # wall-clock times of the answered requests
        self.stop = asyncio.Event()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=15))
        self.tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def _worker(self, n: int) -> None:
        while not self.stop.is_set():
            try:
                async with self.session.get(f"{self.url}/hold?ms=50&key=load{n}") as resp:
                    await resp.read()
                    self.statuses[resp.status] += 1
                    self.done_at.append(time.time())
            except aiohttp.ClientConnectorError:
                self.errors["refused"] += 1  # the listener is closed: what a load balancer retries
                await asyncio.sleep(0.05)
            except aiohttp.ClientError as exc:
                self.errors[type(exc).__name__] += 1

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 20)
        await self.session.close()


def prometheus_connections(prom_pid: int, port: int) -> int:
    """Established TCP connections that the Prometheus process holds to 127.0.0.1:port."""
    inodes = set()
    for fd in os.listdir(f"/proc/{prom_pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{prom_pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    with open(f"/proc/{prom_pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if fields[3] == "01" and remote_port == port and fields[9] in inodes:
                count += 1
    return count


async def hold(session: aiohttp.ClientSession, sidecar: Sidecar, key: str) -> int:
    async with session.get(f"{sidecar.url}/hold?key={key}") as resp:
        await resp.read()
        return resp.status


@needs_prometheus
async def test_prometheus_sees_a_drain_to_its_end_and_fires_only_the_right_alerts(
        start_sidecar: StartSidecar, start_prometheus: StartPrometheus, upstream) -> None:
    """Promises: the drained state and the final request/abort counts reach Prometheus before
    the process exits (drain.linger); rate() and histogram_quantile() over the sidecar's series
    agree with what the clients saw; the shipped rules, evaluated by Prometheus itself, fire
    SidecarDrainAbortedRequests for the drain that aborted and nothing for the clean one, and
    SidecarDrainNearGracePeriod against each pod's own exported grace period; the exported
    budget gauges equal the config; Prometheus's keep-alive scrape connection to the admin port
    does not hold up the drain."""
    up = upstream_url(upstream)
    clean = await start_sidecar({"drain": {"delay": "1s", "timeout": "20s", "linger": "30s"}},
                                upstream=up)
    aborting = await start_sidecar(
        {"drain": {"delay": "500ms", "timeout": "1500ms", "linger": "30s", "grace_period": "2s"},
         "exit": {"wait": "0s"}}, upstream=up)
    sidecars = {"clean": clean, "aborting": aborting}
    prom = await start_prometheus({pod: s.admin_port for pod, s in sidecars.items()})
    sel = {pod: f'namespace="{NAMESPACE}", pod="{pod}"' for pod in sidecars}

    # The budget gauges carry the config (grace period default 30 s; exit.wait default 5 s).
    for pod, expected in {"clean": (1, 20, 30, 5), "aborting": (0.5, 1.5, 2, 0)}.items():
        got = [await prom.scalar(f"sidecar_{name}_seconds{{{sel[pod]}}}") for name in
               ("drain_delay", "drain_timeout", "drain_grace_period", "exit_wait")]
        assert got == list(expected), (pod, got)

    loads = {pod: Load(s.url) for pod, s in sidecars.items()}
    held = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        # Load until Prometheus has a few seconds of it.
        rate_expr = f'sum(rate(sidecar_requests_total{{{sel["clean"]}, code="200"}}[2s]))'
        await prom.wait_for(f'sum(sidecar_requests_total{{{sel["clean"]}}})',
                            lambda v: v is not None and v >= 20, "load reached the metrics")
        await prom.wait_for(f"count_over_time(sidecar_requests_in_flight{{{sel['clean']}}}[3s])",
                            lambda v: v is not None and v >= 8, "3 s of scrapes under load")
        at = time.time() - 0.5  # a moment Prometheus has scraped around already
        prom_rate = await prom.scalar(rate_expr, at)
        client_rate = sum(at - 2 <= t <= at for t in loads["clean"].done_at) / 2
        p50 = await prom.scalar(
            f"histogram_quantile(0.5, sum by (le) (rate(sidecar_request_duration_seconds_bucket"
            f"{{{sel['clean']}}}[2s])))", at)
        p99 = await prom.scalar(
            f"histogram_quantile(0.99, sum by (le) (rate(sidecar_request_duration_seconds_bucket"
            f"{{{sel['clean']}}}[2s])))", at)

        # Requests in flight at the trigger: two on `clean` (released during closing), one on
        # `aborting` that is never released.
        slow = [asyncio.create_task(hold(held, clean, "clean-held")) for _ in range(2)]
        stuck = asyncio.create_task(hold(held, aborting, "stuck"))
        async with held.get(f"{up}/__started?key=clean-held") as resp:
            assert resp.status == 200
        async with held.get(f"{up}/__started?key=stuck") as resp:
            assert resp.status == 200

        scrape_conns = {pod: prometheus_connections(prom.proc.pid, s.admin_port)
                        for pod, s in sidecars.items()}
        assert all(scrape_conns.values()), f"Prometheus holds no keep-alive connection: {scrape_conns}"

        for s in sidecars.values():
            s.send(signal.SIGTERM)
        await clean.wait_log("state closing")
        async with held.get(f"{up}/__go?key=clean-held") as resp:
            assert resp.status == 200
        finished = {pod: await s.wait_log("drain finished", timeout=20) for pod, s in sidecars.items()}
        assert [await t for t in slow] == [200, 200]
        with pytest.raises(aiohttp.ClientError):
            await stuck
        still_open = {pod: prometheus_connections(prom.proc.pid, s.admin_port)
                      for pod, s in sidecars.items()}
    finally:
        for load in loads.values():
            await load.close()
        await held.close()

    # The admin-port connection Prometheus kept open through the drain did not hold it up:
    # `clean` finished as soon as its in-flight requests did, far before drain.timeout (20 s).
    assert all(still_open.values()), f"the scrape connection was not kept open: {still_open}"
    assert finished["clean"]["aborted"] == 0
    assert finished["clean"]["duration_seconds"] < 1 + 20 / 2, finished["clean"]
    assert (await clean.wait_log("in-flight requests done"))["left_to_abort"] == 0
    assert finished["aborting"]["aborted"] == 1

    # Prometheus gets the final numbers while the sidecars linger; only then end the linger.
    answered = {pod: load.answered for pod, load in loads.items()}
    for pod in sidecars:
        await prom.wait_for(f'sidecar_drain_state{{{sel[pod]}, state="drained"}}',
                            lambda v: v == 1, f"{pod}: drained state scraped")
        await prom.wait_for(f'sum(sidecar_requests_total{{{sel[pod]}, code!="499"}})',
                            lambda v, n=answered[pod] + (2 if pod == "clean" else 0): v == n,
                            f"{pod}: final answered count scraped")
    await prom.wait_for(f'sidecar_requests_aborted_total{{{sel["aborting"]}}}',
                        lambda v: v == 1, "aborted count scraped")
    await prom.wait_for(
        f'ALERTS{{alertname="SidecarDrainAbortedRequests", alertstate="firing", {sel["aborting"]}}}',
        lambda v: v == 1, "SidecarDrainAbortedRequests fires for the aborting drain")
    await prom.wait_for(
        f'ALERTS{{alertname="SidecarDrainNearGracePeriod", alertstate="firing", {sel["aborting"]}}}',
        lambda v: v == 1, "SidecarDrainNearGracePeriod fires: 2 s of a 2 s grace period")
    t_linger_end = time.monotonic()
    for s in sidecars.values():
        s.send(signal.SIGTERM)  # ends drain.linger at once
    for s in sidecars.values():
        assert await s.wait_exit(timeout=15) == 0
    exit_seconds = time.monotonic() - t_linger_end

    # After the processes are gone, Prometheus still has their last values.
    for pod in sidecars:
        assert await prom.scalar(
            f'last_over_time(sidecar_drain_state{{{sel[pod]}, state="drained"}}[1m])') == 1
        assert await prom.scalar(f'max_over_time(sidecar_drain_duration_seconds{{{sel[pod]}}}[1m])') \
            == pytest.approx(finished[pod]["duration_seconds"])
    totals = await prom.query(
        f'sum by (pod) (last_over_time(sidecar_requests_total{{namespace="{NAMESPACE}", '
        f'code!="499"}}[1m]))')
    assert totals == {("clean",): answered["clean"] + 2, ("aborting",): answered["aborting"]}
    aborted = await prom.query(
        f'last_over_time(sidecar_requests_aborted_total{{namespace="{NAMESPACE}"}}[1m])')
    assert {k[-2]: v for k, v in aborted.items()} == {"aborting": 1, "clean": 0}

    # rate() and the duration histogram agree with the clients (50 ms requests).
    assert prom_rate is not None and client_rate > 0
    assert 0.5 <= prom_rate / client_rate <= 2, (prom_rate, client_rate)
    assert p50 is not None and p99 is not None
    assert 0.05 <= p50 <= 0.5, p50  # 50 ms requests: (0.05, 0.1] unless the machine is busy
    assert p50 <= p99 <= 2.5, p99

    # Prometheus's own rule evaluation: alerts for the aborting drain only, none for clean.
    fired = await prom.query('count by (alertname, pod) (count_over_time(ALERTS{alertstate="firing"}[5m]))')
    assert set(fired) == {("SidecarDrainAbortedRequests", "aborting"),
                          ("SidecarDrainNearGracePeriod", "aborting")}, fired
    alerts = (await prom.api("alerts"))["alerts"]
    assert {(a["labels"]["alertname"], a["labels"]["pod"]) for a in alerts} == set(fired)
    assert all(a["state"] == "firing" for a in alerts)
    print(f"prometheus saw: rate {prom_rate:.1f}/s (clients {client_rate:.1f}/s), p50 {p50:.3f} s, "
          f"p99 {p99:.3f} s; answered {answered}; drain durations "
          f"{ {pod: f['duration_seconds'] for pod, f in finished.items()} } s; scrape connections "
          f"open at the trigger {scrape_conns}, at drained {still_open}; exit after the 2nd "
          f"SIGTERM {exit_seconds:.2f} s; alerts {sorted(fired)}")
