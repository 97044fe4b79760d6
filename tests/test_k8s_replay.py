"""Replays a Kubernetes pod termination against the real sidecar, driven by the rendered
manifests, and proves that nothing admitted is lost.

What is real: ``sidecar run`` as a process, with the ConfigMap's sidecar.yaml (only the
listen/admin/upstream addresses moved to free loopback ports, via --listen/--admin/--upstream);
an example app as a process (the ``app`` command of this file); keep-alive client load.

What is replayed from the manifest, the way the kubelet does it: the app container's preStop
hook exactly as written (an httpGet's path, port - a named port resolved among the hook's own
container's ports, as the kubelet does - and headers; or a sleep), SIGTERM to each container
once its own preStop returned, the native-sidecar order (restartable init containers are
stopped only after every regular container has exited), SIGKILL at terminationGracePeriodSeconds
(but at least 2s after a preStop that used up the grace period, like the kubelet).

What is assumed: endpoint removal reaches every client within half of drain.delay (the premise
of choosing drain.delay); after that, a client opens no new connection to the pod, but keeps
using the one it has until the server closes it (Connection: close). Two "laggard" clients
ignore the endpoint removal altogether.

Time is scaled: every duration of the manifest (drain.*, exit.wait, upstream timeouts,
terminationGracePeriodSeconds, the kubelet's 2s minimum) is multiplied by the same factor,
K8S_REPLAY_SCALE (default 0.1), so the relationships between the numbers are preserved while a
replay takes about 3 seconds. K8S_REPLAY_SCALE=1 replays the real 30-second timeline.

The app is deliberately unforgiving: on SIGTERM it exits at once, dropping whatever it is
still serving (many real apps do). So a SIGTERM that comes before the drain has finished shows
up as requests the app received but the client never got a response to.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

if not __package__:  # run as a script (the example app): make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.kustomize import KUBECTL, render, seconds

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("K8S_REPLAY_SCALE", "0.1"))
KUBELET_MIN_GRACE = 2.0  # seconds the kubelet still grants after a preStop that used the grace up
STEADY_WORKERS = 30
LAGGARD_WORKERS = 2
LONG_REQUESTS = 3
DURATION_KEYS = {
    "upstream": ("connect_timeout", "timeout", "health_interval"),
    "drain": ("delay", "timeout", "linger", "grace_period"),
    "exit": ("wait",),
}


# ---- the example app (run as: python tests/test_k8s_replay.py app --port P --log FILE) --------

def serve_app(port: int, log_path: str) -> None:
    """An upstream that logs every request it receives and finishes, and its SIGTERM.

    GET /work?ms=N answers ``done <X-Request-Id>`` after N ms; any other path is a health check.
    Each log line is one unbuffered write, so it survives the process being killed, and the
    SIGTERM handler (which may interrupt any bytecode) never re-enters a buffered writer.
    """
    from aiohttp import web

    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(event: str, rid: str = "-") -> None:
        os.write(log, f"{event} {rid} {time.monotonic():.6f}\n".encode())

    async def work(request: web.Request) -> web.Response:
        rid = request.headers.get("X-Request-Id", "-")
        record("recv", rid)
        await asyncio.sleep(int(request.query.get("ms", "150")) / 1000)
        record("done", rid)
        return web.Response(text=f"done {rid}\n")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def on_sigterm(signum: int, frame: object) -> None:
        record("sigterm")
        os._exit(128 + signal.SIGTERM)  # drop everything in flight, as a careless app would

    signal.signal(signal.SIGTERM, on_sigterm)
    app = web.Application()
    app.router.add_get("/work", work)
    app.router.add_route("*", "/{tail:.*}", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, handle_signals=False,
                print=None)


pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the pod, as rendered -----------------------------------------------------------------------

@dataclass
class PodSpec:
    """What the replay needs from the rendered objects."""

    spec: dict[str, Any]
    app: dict[str, Any]
    sidecar: dict[str, Any]
    config: dict[str, Any]  # the ConfigMap's sidecar.yaml
    native: bool            # the sidecar is a restartable init container

    @classmethod
    def from_objects(cls, objs: list[dict[str, Any]]) -> PodSpec:
        (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
        spec = deployment["spec"]["template"]["spec"]
        maps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        sidecar: dict[str, Any] | None = None
        for container in spec["containers"] + spec.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                cm = volumes.get(mount["name"], {}).get("configMap", {}).get("name")
                if cm in maps and "sidecar.yaml" in maps[cm].get("data", {}):
                    sidecar, config = container, yaml.safe_load(maps[cm]["data"]["sidecar.yaml"])
        assert sidecar is not None, "no container mounts a ConfigMap holding sidecar.yaml"
        (app,) = [c for c in spec["containers"] if c is not sidecar]
        native = (sidecar in spec.get("initContainers", [])
                  and sidecar.get("restartPolicy") == "Always")
        return cls(spec, app, sidecar, config, native)

    @property
    def grace(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    def drain_seconds(self, key: str) -> float:
        defaults = {"delay": "5s", "timeout": "20s"}  # the contract's defaults
        return seconds(self.config.get("drain", {}).get(key, defaults[key]))


def app_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return PodSpec.from_objects(objs).app


def sidecar_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return PodSpec.from_objects(objs).sidecar


def scaled(config: dict[str, Any], factor: float) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for section, keys in DURATION_KEYS.items():
        for key in keys:
            if key in (out.get(section) or {}):
                out[section][key] = f"{seconds(out[section][key]) * factor:.4f}s"
    return out


# ---- the replay ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    rid: str
    kind: str  # ok | rejected (503 + Retry-After) | refused (connect failed) | status | transport
    started: float
    ended: float
    status: int | None = None
    detail: str = ""
    closed: bool = False  # the response carried Connection: close


@dataclass
class Replay:
    """Everything observed during one replayed termination (times are time.monotonic())."""

    t0: float = 0.0
    grace: float = 0.0
    delay: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight_at_trigger: int = 0
    app_log: list[tuple[str, str, float]] = field(default_factory=list)
    # /status samples: (sent at, state, in flight)
    samples: list[tuple[float, str, int]] = field(default_factory=list)
    hook: dict[str, Any] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)
    sigterm_sent: dict[str, float] = field(default_factory=dict)  # by the kubelet, per container
    app_name: str = "app"
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)
    sidecar_log: str = ""

    def event(self, text: str) -> None:
        self.events.append((time.monotonic(), text))

    def timeline(self) -> str:
        lines = [f"  +{t - self.t0:7.3f}s  {text}" for t, text in sorted(self.events)]
        kinds = collections.Counter(o.kind for o in self.outcomes)
        lines.append(f"  client outcomes: {dict(kinds)}; in flight at the trigger: "
                     f"{self.in_flight_at_trigger}")
        lines.append("  sidecar log (tail):")
        lines += ["    " + line[:200] for line in self.sidecar_log.splitlines()[-15:]]
        return "\n".join(lines)

    @property
    def app_sigterm(self) -> float | None:
        """When the app was first sent SIGTERM: by the kubelet, or as the app logged it."""
        times = [t for event, _, t in self.app_log if event == "sigterm"]
        if self.app_name in self.sigterm_sent:
            times.append(self.sigterm_sent[self.app_name])
        return min(times, default=None)


class Load:
    """Keep-alive clients: steady workers, laggards that ignore endpoint removal, and a few
    long requests started late in drain.delay that must complete during ``closing``."""

    def __init__(self, url: str, replay: Replay, *, timeout: float) -> None:
        self.url = url
        self.replay = replay
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.endpoints_removed = asyncio.Event()
        self.stop = asyncio.Event()
        self.in_flight = 0
        self.warm = asyncio.Event()
        self._ids = itertools.count()

    async def request(self, session: aiohttp.ClientSession, who: str, ms: int) -> Outcome:
        rid = f"{who}-{next(self._ids)}"
        started = time.monotonic()
        self.in_flight += 1
        try:
            async with session.get(f"{self.url}/work", params={"ms": str(ms)},
                                   headers={"X-Request-Id": rid}) as resp:
                body = await resp.text()
                closed = resp.headers.get("Connection", "").lower() == "close"
                if 200 <= resp.status < 300 and body == f"done {rid}\n":
                    kind = "ok"
                elif resp.status == 503 and "Retry-After" in resp.headers:
                    kind = "rejected"
                else:
                    kind = "status"
                outcome = Outcome(rid, kind, started, time.monotonic(), resp.status,
                                  body[:80], closed)
        except aiohttp.ClientConnectorError as exc:
            outcome = Outcome(rid, "refused", started, time.monotonic(), detail=repr(exc))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcome = Outcome(rid, "transport", started, time.monotonic(), detail=repr(exc))
        finally:
            self.in_flight -= 1
        self.replay.outcomes.append(outcome)
        if sum(o.kind == "ok" for o in self.replay.outcomes) >= 2 * STEADY_WORKERS:
            self.warm.set()
        return outcome

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     timeout=self.timeout)

    async def steady(self, n: int, *, laggard: bool = False) -> None:
        who = f"{'laggard' if laggard else 'steady'}{n}"
        async with self.session() as session:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                outcome = await self.request(session, who, 100 + (n * 7 + i * 13) % 100)
                if outcome.kind == "refused" and (laggard or self.endpoints_removed.is_set()):
                    return  # the pod is gone from this client's point of view
                gone = outcome.closed or outcome.kind != "ok"
                if not laggard and self.endpoints_removed.is_set() and gone:
                    return  # no new connection to a pod that left the endpoints
                if outcome.kind == "refused":
                    await asyncio.sleep(0.01)

    async def long(self, n: int, ms: int) -> None:
        async with self.session() as session:
            await self.request(session, f"long{n}", ms)


async def wait_until(check: Callable[[], Any], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def process(args: list[str], *, log: Path, env: dict[str, str]) -> AsyncIterator[
        asyncio.subprocess.Process]:
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(*args, stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    finally:
        os.close(out)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


class Kubelet:
    """The kubelet's part of a pod deletion, for this pod's two containers."""

    def __init__(self, pod: PodSpec, procs: dict[str, asyncio.subprocess.Process],
                 ports: dict[int, int], replay: Replay, scale: float) -> None:
        self.pod = pod
        self.procs = procs      # container name -> process
        self.ports = ports      # container port in the manifest -> the test's loopback port
        self.replay = replay
        self.scale = scale

    async def delete_pod(self) -> None:
        deadline = self.replay.t0 + self.pod.grace * self.scale
        regular = [c for c in self.pod.spec["containers"]]
        sidecars = [c for c in self.pod.spec.get("initContainers", [])
                    if c.get("restartPolicy") == "Always"]
        # Regular containers stop in parallel; native sidecars only after all of them exited,
        # in reverse order.
        await asyncio.gather(*(self.stop_container(c, deadline) for c in regular))
        for container in reversed(sidecars):
            await self.stop_container(container, deadline)

    async def stop_container(self, container: dict[str, Any], deadline: float) -> None:
        name, proc = container["name"], self.procs[container["name"]]
        hook = container.get("lifecycle", {}).get("preStop")
        if hook:
            self.replay.event(f"kubelet: {name} preStop {json.dumps(hook)}")
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.run_hook(container, hook)
            except TimeoutError:
                self.replay.event(f"kubelet: {name} preStop cut off at the grace period")
        grace_left = max(deadline - time.monotonic(), KUBELET_MIN_GRACE * self.scale)
        if proc.returncode is None:
            self.replay.event(f"kubelet: SIGTERM {name}")
            self.replay.sigterm_sent[name] = time.monotonic()
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_left)
        except TimeoutError:
            self.replay.event(f"kubelet: SIGKILL {name} (grace period over)")
            self.replay.killed.append(name)
            proc.kill()
            await proc.wait()
        self.replay.event(f"{name} exited with {proc.returncode}")
        self.replay.exit_codes[name] = proc.returncode

    async def run_hook(self, container: dict[str, Any], hook: dict[str, Any]) -> None:
        if "sleep" in hook:
            await asyncio.sleep(float(hook["sleep"]["seconds"]) * self.scale)
            return
        if "httpGet" not in hook:
            pytest.fail(f"the replay knows httpGet and sleep preStop hooks, not {sorted(hook)}")
        get = hook["httpGet"]
        port = get.get("port", 80)
        if isinstance(port, str) and not port.isdigit():
            # Like the kubelet: a named port is looked up among this container's own ports.
            names = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            if port not in names:
                self.replay.event(f"preStop failed: no port named {port!r} in {container['name']}")
                return
            port = names[port]
        if get.get("host") or int(port) not in self.ports:
            where = f"{get.get('host', 'pod IP')}:{port}"
            self.replay.event(f"preStop failed: nothing listens on {where}")
            return
        path = get.get("path", "/")
        url = f"http://127.0.0.1:{self.ports[int(port)]}/{path.lstrip('/')}"
        headers = {"User-Agent": "kube-lifecycle/1.32", "Accept": "*/*"}
        headers.update({h["name"]: h["value"] for h in get.get("httpHeaders", [])})
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(url, headers=headers) as resp:
                body = await resp.text()
                self.replay.hook = {"status": resp.status, "body": body, "at": time.monotonic()}
                self.replay.event(f"preStop answered {resp.status}: {body.strip()[:200]}")
        except (aiohttp.ClientError, OSError) as exc:
            self.replay.event(f"preStop failed: {exc!r}")


async def observe(admin: str, replay: Replay, done: asyncio.Event) -> None:
    """Poll /status, like a fast scraper, to know when the drain really finished."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not done.is_set():
            sent = time.monotonic()
            try:
                async with session.get(f"{admin}/status") as resp:
                    status = await resp.json()
                replay.samples.append((sent, status["state"], int(status["in_flight"])))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.02)


async def replay_termination(pod: PodSpec, tmp_path: Path, *, scale: float = SCALE,
                             tag: str = "") -> Replay:
    """Start the app and the sidecar as the pod would, load them, delete the pod."""
    replay = Replay(app_name=pod.app["name"])
    listen, admin, app_port = free_port(), free_port(), free_port()
    manifest_port = {key: int(str(pod.config.get(key, default)).rpartition(":")[2])
                     for key, default in (("listen", "0.0.0.0:8080"), ("admin", "0.0.0.0:9901"))}
    ports = {manifest_port["listen"]: listen, manifest_port["admin"]: admin}
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(scaled(pod.config, scale)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update({e["name"]: e["value"] for e in pod.sidecar.get("env", []) if "value" in e})
    app_log = tmp_path / "app-requests.log"
    app_log.touch()
    delay = pod.drain_seconds("delay") * scale
    timeout = pod.drain_seconds("timeout") * scale
    replay.grace, replay.delay = pod.grace * scale, delay

    async with contextlib.AsyncExitStack() as stack:
        app = await stack.enter_async_context(process(
            [sys.executable, __file__, "app", "--port", str(app_port), "--log", str(app_log),
             "--tag", tag], log=tmp_path / "app.out", env=env))
        sidecar = await stack.enter_async_context(process(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config_path),
             "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
             "--upstream", f"http://127.0.0.1:{app_port}"],
            log=tmp_path / "sidecar.log", env=env))
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)))

        async def ready() -> bool:
            if sidecar.returncode is not None:
                raise AssertionError("the sidecar exited at startup:\n"
                                     + (tmp_path / "sidecar.log").read_text())
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    return resp.status == 200
            return False

        await wait_until(ready, "the sidecar's /readyz (with the app healthy behind it)")

        load = Load(f"http://127.0.0.1:{listen}", replay, timeout=replay.grace + 10)
        done = asyncio.Event()
        observer: asyncio.Task[None] | None = None
        workers = [asyncio.create_task(load.steady(n)) for n in range(STEADY_WORKERS)]
        workers += [asyncio.create_task(load.steady(n, laggard=True))
                    for n in range(LAGGARD_WORKERS)]
        try:
            await asyncio.wait_for(load.warm.wait(), 15)

            # The pod is deleted: the kubelet starts, endpoints go away within delay/2, and
            # requests that take most of drain.timeout arrive late in drain.delay.
            replay.t0 = time.monotonic()
            replay.in_flight_at_trigger = load.in_flight
            replay.event("pod deleted")
            observer = asyncio.create_task(observe(f"http://127.0.0.1:{admin}", replay, done))
            kubelet = Kubelet(pod, {pod.app["name"]: app, pod.sidecar["name"]: sidecar},
                              ports, replay, scale)
            deletion = asyncio.create_task(kubelet.delete_pod())
            await asyncio.sleep(delay / 2)
            load.endpoints_removed.set()
            replay.event("endpoints removed: clients open no new connection")
            await asyncio.sleep(delay * 0.1)  # sent at 0.6 x drain.delay
            long_ms = int(timeout * 0.8 * 1000)
            workers += [asyncio.create_task(load.long(n, long_ms)) for n in range(LONG_REQUESTS)]
            replay.event(f"{LONG_REQUESTS} requests of {long_ms}ms sent")
            await asyncio.wait_for(deletion, replay.grace + KUBELET_MIN_GRACE * scale * 2 + 10)
            replay.event("all containers exited")
        finally:
            load.stop.set()
            await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 30)
            done.set()
            if observer is not None:
                await observer

    for line in app_log.read_text().splitlines():
        event, rid, at = line.split()
        replay.app_log.append((event, rid, float(at)))
        if event == "sigterm":
            replay.events.append((float(at), "app: got SIGTERM"))
    for at, state, in_flight in replay.samples:
        if not any(text.startswith(f"sidecar state {state}") for _, text in replay.events):
            replay.events.append((at, f"sidecar state {state} (in flight {in_flight})"))
    replay.sidecar_log = (tmp_path / "sidecar.log").read_text(errors="replace")
    return replay


def losses(replay: Replay) -> list[str]:
    """Every way this termination broke the promise; empty when it kept it."""
    problems = []
    received = collections.Counter(rid for event, rid, _ in replay.app_log if event == "recv")
    ok = {o.rid for o in replay.outcomes if o.kind == "ok"}
    by_rid = {o.rid: o for o in replay.outcomes}
    lost = sorted(rid for rid in received if rid not in ok)
    if lost:
        examples = "; ".join(f"{rid}: {by_rid[rid].kind} {by_rid[rid].status or ''} "
                             f"{by_rid[rid].detail[:60]}" if rid in by_rid else f"{rid}: no answer"
                             for rid in lost[:3])
        problems.append(f"lost: {len(lost)} requests reached the app but got no complete 2xx "
                        f"({examples})")
    twice = [rid for rid, n in received.items() if n > 1]
    if twice:
        problems.append(f"retried: {len(twice)} requests reached the app twice (a client retried "
                        f"after losing the first answer), e.g. {twice[:3]}")
    if sum(received.values()) != len(ok):
        problems.append(f"count: the app received {sum(received.values())} requests, clients got "
                        f"{len(ok)} complete 2xx responses")
    failed = [o for o in replay.outcomes if o.kind == "status"]
    if failed:
        codes = collections.Counter(o.status for o in failed)
        problems.append(f"failed: {len(failed)} requests were answered {dict(codes)} "
                        f"(admitted but not served), e.g. {failed[0].rid} {failed[0].detail!r}")
    if replay.app_sigterm is not None:
        busy = [(t, state, n) for t, state, n in replay.samples
                if state in ("starting", "serving", "draining") or (state == "closing" and n > 0)]
        if busy and replay.app_sigterm < busy[-1][0]:
            t, state, n = busy[-1]
            at = replay.app_sigterm - replay.t0
            problems.append(f"early SIGTERM: the app got SIGTERM at +{at:.3f}s, "
                            f"before the drain finished (sidecar still {state} with {n} in flight "
                            f"at +{t - replay.t0:.3f}s)")
    for name in replay.killed:
        problems.append(f"SIGKILL: {name} outlived terminationGracePeriodSeconds "
                        f"({replay.grace:.2f}s scaled)")
    summary = replay.hook.get("body", "")
    with contextlib.suppress(ValueError, TypeError):
        if json.loads(summary).get("aborted"):
            problems.append(f"aborted: the drain summary reports aborted requests: {summary}")
    return problems


def assert_lossless(replay: Replay) -> None:
    problems = losses(replay)
    assert not problems, "\n".join(problems) + "\n" + replay.timeline()
    # The replay exercised what it claims to: requests in flight at the trigger, requests that
    # ran across the start of `closing`, a drain that answered the preStop.
    assert replay.in_flight_at_trigger >= STEADY_WORKERS // 2, replay.timeline()
    closing = [t for t, state, _ in replay.samples if state in ("closing", "drained")]
    assert closing, "the sidecar was never seen closing\n" + replay.timeline()
    assert any(o.closed for o in replay.outcomes if o.started > replay.t0), \
        "no response carried Connection: close during the drain\n" + replay.timeline()
    long = [o for o in replay.outcomes if o.rid.startswith("long")]
    assert len(long) == LONG_REQUESTS and all(o.kind == "ok" for o in long), replay.timeline()
    assert all(o.started < closing[0] < o.ended for o in long), \
        "the long requests should run across the start of closing\n" + replay.timeline()


# ---- the promises -----------------------------------------------------------------------------

async def test_deleting_a_classic_pod_loses_no_admitted_request(tmp_path: Path) -> None:
    """deploy/base: on pod deletion the kubelet sends the sidecar SIGTERM and runs the app's
    preStop GET /drain at once; every request the app received is answered 2xx, and the app is
    signalled only after the sidecar drained; nothing is SIGKILLed."""
    replay = await replay_termination(PodSpec.from_objects(render("base")), tmp_path)
    assert_lossless(replay)
    assert replay.hook["status"] == 200 and json.loads(replay.hook["body"])["state"] == "drained"
    assert replay.app_sigterm is not None and replay.app_sigterm >= replay.hook["at"]
    assert replay.exit_codes["sidecar"] == 0, replay.timeline()


async def test_deleting_a_native_sidecar_pod_loses_no_admitted_request(tmp_path: Path) -> None:
    """overlays/native-sidecar: the sidecar gets SIGTERM only after the app exited, so the
    app's preStop is what drains it; still nothing admitted is lost."""
    pod = PodSpec.from_objects(render("overlays/native-sidecar"))
    assert pod.native
    replay = await replay_termination(pod, tmp_path)
    assert_lossless(replay)
    assert json.loads(replay.hook["body"])["state"] == "drained"
    assert replay.app_sigterm is not None and replay.app_sigterm >= replay.hook["at"]
    assert replay.exit_codes["sidecar"] == 0, replay.timeline()


async def test_deleting_a_shared_pid_pod_lets_the_sidecar_stop_the_app_after_the_drain(
        tmp_path: Path) -> None:
    """overlays/shared-pid: the sidecar itself signals the app (exit.process) once in-flight
    requests are done, before answering the preStop. The regex is pointed at this test's app
    (tests/test_k8s_manifests.py checks the manifest's regex against the manifest's command)."""
    pod = PodSpec.from_objects(render("overlays/shared-pid"))
    tag = uuid.uuid4().hex
    pod.config["exit"]["process"] = re.escape(f"--tag {tag}")
    replay = await replay_termination(pod, tmp_path, tag=tag)
    assert_lossless(replay)
    assert replay.app_sigterm is not None and replay.app_sigterm < replay.hook["at"], \
        "the sidecar, not the kubelet, should have signalled the app\n" + replay.timeline()
    assert json.loads(replay.hook["body"])["exit"]["outcome"] == "exited", replay.hook


async def test_admin_token_pattern_keeps_the_drain_lossless(tmp_path: Path) -> None:
    """The documented token pattern: SIDECAR_ADMIN_TOKEN in the sidecar's env and the same
    bearer token in the app's preStop httpHeaders still drains before the app's SIGTERM."""
    objs = render("base")
    sidecar_container(objs).setdefault("env", []).append(
        {"name": "SIDECAR_ADMIN_TOKEN", "value": "s3cr3t"})
    app_container(objs)["lifecycle"]["preStop"]["httpGet"]["httpHeaders"] = [
        {"name": "Authorization", "value": "Bearer s3cr3t"}]
    replay = await replay_termination(PodSpec.from_objects(objs), tmp_path)
    assert_lossless(replay)
    assert replay.hook["status"] == 200


def _no_prestop(objs: list[dict[str, Any]]) -> None:
    app_container(objs).pop("lifecycle", None)


def _short_grace(objs: list[dict[str, Any]]) -> None:
    pod = PodSpec.from_objects(objs)
    short = pod.drain_seconds("delay") + pod.drain_seconds("timeout") / 2
    pod.spec["terminationGracePeriodSeconds"] = int(short)


def _token_without_header(objs: list[dict[str, Any]]) -> None:
    sidecar_container(objs).setdefault("env", []).append(
        {"name": "SIDECAR_ADMIN_TOKEN", "value": "s3cr3t"})


LOSSY = {
    "base, app preStop removed": ("base", _no_prestop, ("lost", "early SIGTERM")),
    "native sidecar, app preStop removed": ("overlays/native-sidecar", _no_prestop,
                                            ("lost", "early SIGTERM")),
    "grace period shorter than drain.delay + drain.timeout": ("base", _short_grace,
                                                              ("SIGKILL", "lost")),
    "admin token set, preStop without the header": ("base", _token_without_header,
                                                    ("lost", "early SIGTERM")),
}


@pytest.mark.parametrize("case", list(LOSSY))
async def test_replay_catches_a_lossy_manifest(case: str, tmp_path: Path) -> None:
    """The replay is not a rubber stamp: the same load against a manifest edited into a lossy
    shape reports lost requests, an early SIGTERM or a SIGKILL."""
    path, mutate, expected = LOSSY[case]
    objs = render(path)
    mutate(objs)
    replay = await replay_termination(PodSpec.from_objects(objs), tmp_path)
    problems = losses(replay)
    found = {p.split(":")[0] for p in problems}
    assert found >= set(expected), (f"{case}: expected {expected}, found {sorted(found)}\n"
                                    + "\n".join(problems) + "\n" + replay.timeline())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["app"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--tag", default="")  # makes the command line unique (exit.process)
    args = parser.parse_args()
    serve_app(args.port, args.log)
    sys.exit(0)
