"""Replays a Kubernetes pod termination against the real sidecar, driven by the rendered
manifests, and proves that nothing admitted is lost.

What is real: ``sidecar run`` as a process, with the ConfigMap's sidecar.yaml (only the
listen/admin/upstream addresses moved to free loopback ports, via --listen/--admin/--upstream);
an example app as a process (tests/apps/replay_app.py); keep-alive client load. Both are
pluggable (``replay_termination(app=..., load=...)``): tests/grpc_load.py replays a gRPC pod
with a grpcio app (tests/apps/grpc_pod.py) and grpc.aio clients over h2c.

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

import asyncio
import collections
import contextlib
import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import yaml

from tests.conftest import free_port
from tests.kustomize import seconds

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


APP = Path(__file__).resolve().parent / "apps" / "replay_app.py"


def replay_app(port: int, log: Path, tag: str) -> list[str]:
    """The default app's command line. An app of the replay listens on 127.0.0.1:``port``,
    writes ``recv ID T`` / ``done ID T`` / ``sigterm - T`` lines to ``log`` (T =
    time.monotonic(), ID = the load's request id) and dies on SIGTERM at once."""
    return [sys.executable, str(APP), "--port", str(port), "--log", str(log), "--tag", tag]


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
    # ok | rejected (503 + Retry-After) | refused (connect failed) | status (any other answer) |
    # transport | unavailable (gRPC UNAVAILABLE: not served, the client may retry elsewhere)
    kind: str
    started: float
    ended: float
    status: int | None = None  # the HTTP status, or the gRPC status code
    detail: str = ""
    # The connection was told to go: the response carried Connection: close (HTTP/1.1), or the
    # channel was no longer READY after the call (HTTP/2: it got a GOAWAY).
    closed: bool = False


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
    ready_status: dict[str, Any] = field(default_factory=dict)  # /status once /readyz said 200

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


class ReplayLoad(Protocol):
    """What the replay drives: ``steady(n)`` workers run until ``stop`` (and leave once
    ``endpoints_removed`` is set and their connection was told to go, unless ``laggard``);
    ``long(n, ms)`` is one request of ``ms`` started late in drain.delay. Every request is an
    Outcome appended to the replay; ``warm`` is set after 2 x STEADY_WORKERS ``ok``."""

    endpoints_removed: asyncio.Event
    stop: asyncio.Event
    warm: asyncio.Event
    in_flight: int

    async def steady(self, n: int, *, laggard: bool = False) -> None: ...

    async def long(self, n: int, ms: int) -> None: ...


LoadFactory = Callable[..., ReplayLoad]  # (url, replay, *, timeout) -> ReplayLoad
AppCommand = Callable[[int, Path, str], list[str]]  # (port, log, tag) -> argv


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
                             tag: str = "", app: AppCommand = replay_app,
                             load: LoadFactory = Load) -> Replay:
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
        app_proc = await stack.enter_async_context(process(
            app(app_port, app_log, tag), log=tmp_path / "app.out", env=env))
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
        async with session.get(f"http://127.0.0.1:{admin}/status") as resp:
            replay.ready_status = await resp.json()

        clients = load(f"http://127.0.0.1:{listen}", replay, timeout=replay.grace + 10)
        done = asyncio.Event()
        observer: asyncio.Task[None] | None = None
        workers = [asyncio.create_task(clients.steady(n)) for n in range(STEADY_WORKERS)]
        workers += [asyncio.create_task(clients.steady(n, laggard=True))
                    for n in range(LAGGARD_WORKERS)]
        try:
            await asyncio.wait_for(clients.warm.wait(), 15)

            # The pod is deleted: the kubelet starts, endpoints go away within delay/2, and
            # requests that take most of drain.timeout arrive late in drain.delay.
            replay.t0 = time.monotonic()
            replay.in_flight_at_trigger = clients.in_flight
            replay.event("pod deleted")
            observer = asyncio.create_task(observe(f"http://127.0.0.1:{admin}", replay, done))
            kubelet = Kubelet(pod, {pod.app["name"]: app_proc, pod.sidecar["name"]: sidecar},
                              ports, replay, scale)
            deletion = asyncio.create_task(kubelet.delete_pod())
            await asyncio.sleep(delay / 2)
            clients.endpoints_removed.set()
            replay.event("endpoints removed: clients open no new connection")
            await asyncio.sleep(delay * 0.1)  # sent at 0.6 x drain.delay
            long_ms = int(timeout * 0.8 * 1000)
            workers += [asyncio.create_task(clients.long(n, long_ms))
                        for n in range(LONG_REQUESTS)]
            replay.event(f"{LONG_REQUESTS} requests of {long_ms}ms sent")
            await asyncio.wait_for(deletion, replay.grace + KUBELET_MIN_GRACE * scale * 2 + 10)
            replay.event("all containers exited")
        finally:
            clients.stop.set()
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
        "no connection was told to go during the drain (HTTP/1.1 Connection: close, HTTP/2 " \
        "GOAWAY)\n" + replay.timeline()
    long = [o for o in replay.outcomes if o.rid.startswith("long")]
    assert len(long) == LONG_REQUESTS and all(o.kind == "ok" for o in long), replay.timeline()
    assert all(o.started < closing[0] < o.ended for o in long), \
        "the long requests should run across the start of closing\n" + replay.timeline()


