#!/usr/bin/env python3
"""A pod stopped under gRPC load, with each front as the pod's proxy: sidecar vs the peers.

Two "pods" on loopback, each a front (the proxy under test, h2c both ways) plus a grpcio app
(tests/apps/grpc_pod.py); ONE grpcio channel balances round-robin over the two fronts
(`ipv4:127.0.0.1:P1,127.0.0.1:P2`, as a gRPC client does over a headless Service), with gRPC's
default retry behaviour: no retry policy, so a call that reached a server and failed is a failure;
only a call that never left the client (a stream not yet started when a GOAWAY arrived) is
retried once, transparently (--no-transparent-retry turns that off too).  --workers threads make unary calls with unique ids, a share
--slow-share of them slow (--slow-ms); the apps log each id as they start it.  After --warmup s,
pod A is stopped the way the kubelet stops a pod: every container's preStop hook, then SIGTERM
(the front's stop signal) to that container, the containers in parallel; SIGKILL at
--grace-period.  Load goes on to pod B for --tail s.

Fronts (--fronts), all with the same drain delay D (--delay) and grace G (--grace):
  sidecar  python -m sidecar run, drain.delay D, drain.timeout G, upstream.health_grpc "";
           sidecar container: SIGTERM at t=0; app container: preStop GET /drain (blocks until
           drained), then SIGTERM (the documented wiring)
  traefik  Traefik 3, h2c:// service, lifeCycle requestAcceptGraceTimeout D, graceTimeOut G;
           SIGTERM at t=0 (its own delay keeps it accepting for D); the app: preStop `sleep D`,
           then SIGTERM (as bench/rolling.py's kubelet-parallel mode)
  caddy    Caddy 2, protocols h1 h2c, reverse_proxy h2c://, shutdown_delay D, grace_period G;
           stopped like Traefik
  nginx    nginx 1 worker, listen http2, grpc_pass, worker_shutdown_timeout G; preStop `sleep D`
           in both containers, then SIGQUIT (graceful; the official image's STOPSIGNAL)
  haproxy  HAProxy, bind/server proto h2, hard-stop-after G; preStop `sleep D` in both, then
           SIGUSR1 (soft-stop, as its docs advise)
  none     the channel straight to the apps; preStop `sleep D`, then SIGTERM
Apps (--apps): graceful (`server.stop(G)` on SIGTERM) or die (no shutdown code: SIGTERM kills).

Every call ends OK or with a gRPC status code; LOST = started by an app but not answered OK;
duplicates = ids an app started twice.  Results: bench/results/grpc_rolling.md.
Run: bench/run.sh grpc_rolling   (about 4 min with the defaults; --rounds, --fronts, --apps)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import common as C
import grpc
import peers
import runinfo as R

FRONTS = ("sidecar", "traefik", "caddy", "nginx", "haproxy", "none")
APPS = ("graceful", "die")
STOP_SIGNAL = {"nginx": signal.SIGQUIT, "haproxy": signal.SIGUSR1}
GRPC_APP = os.path.join(os.path.dirname(C.BENCH), "tests", "apps", "grpc_pod.py")


@dataclass
class Pod:
    name: str
    app: C.Proc
    port: int
    calls: str
    front: C.Proc | None = None
    admin: str | None = None


def start_pod(front: str, app_kind: str, tmp: str, name: str, args: argparse.Namespace) -> Pod:
    app_port, calls = C.free_port(), os.path.join(tmp, f"{name}.calls")
    app = C.Proc(f"{name}-app", [C.PY, GRPC_APP, "--port", str(app_port), "--calls", calls,
                                 "--on-sigterm", app_kind, "--grace", f"{args.grace:g}"],
                 os.path.join(tmp, f"{name}-app.log"))
    peers.wait_port(app, app_port)
    d, g = f"{args.delay:g}s", f"{args.grace:g}s"
    if front == "sidecar":
        port, admin = C.free_port(), C.free_port()
        env = {"PYTHONPATH": C.SIDECAR["root"], "SIDECAR_DRAIN_DELAY": d, "SIDECAR_DRAIN_TIMEOUT": g,
               "SIDECAR_UPSTREAM_HEALTH_GRPC": "", "SIDECAR_LOGGING_LEVEL": "warning"}
        proc = C.Proc(f"{name}-sidecar", [
            C.SIDECAR["python"], "-m", "sidecar", "run", "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{app_port}"],
            os.path.join(tmp, f"{name}-sidecar.log"), env=env)
        proc.wait_ready(f"http://127.0.0.1:{admin}/readyz", timeout=20)
        return Pod(name, app, port, calls, proc, f"http://127.0.0.1:{admin}")
    if front == "traefik":
        proc, port, _ = peers.start_traefik(tmp, app_port, f"{name}-traefik", accept_grace=d, grace=g, h2c=True)
    elif front == "caddy":
        proc, port, _ = peers.start_caddy(tmp, app_port, f"{name}-caddy", shutdown_delay=d, grace=g, h2c=True)
    elif front == "nginx":
        proc, port = peers.start_nginx_h2c(tmp, app_port, f"{name}-nginx", grace=g)
    elif front == "haproxy":
        proc, port = peers.start_haproxy_h2c(tmp, app_port, f"{name}-haproxy", grace=g)
    else:
        return Pod(name, app, app_port, calls)
    return Pod(name, app, port, calls, proc)


def stop_pod(pod: Pod, front: str, args: argparse.Namespace) -> dict:
    """The kubelet: each container's preStop, then its stop signal, containers in parallel."""
    t0 = time.monotonic()
    out: dict = {}

    def front_container() -> None:
        if pod.front is None:
            return
        if front in ("nginx", "haproxy"):
            time.sleep(args.delay)  # preStop: sleep D (Traefik and Caddy have a delay of their own)
        pod.front.send_signal(STOP_SIGNAL.get(front, signal.SIGTERM))

    def app_container() -> None:
        if front == "sidecar":  # preStop: GET /drain, blocks until drained
            try:
                with urllib.request.urlopen(f"{pod.admin}/drain", timeout=args.grace_period) as r:
                    out["prestop"] = f"/drain {r.status}"
            except OSError as e:
                out["prestop"] = f"/drain failed: {e}"
        else:
            time.sleep(args.delay)
        pod.app.send_signal(signal.SIGTERM)

    threads = [threading.Thread(target=f) for f in (front_container, app_container)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = t0 + args.grace_period
    for proc in (pod.front, pod.app):
        while proc is not None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    out["killed"] = [p.name for p in (pod.front, pod.app) if p is not None and p.poll() is None]
    for p in (pod.front, pod.app):
        if p is not None:
            p.stop(signal.SIGKILL, 2)
    out["pod_exit_s"] = round(time.monotonic() - t0, 2)
    return out


@dataclass
class Load:
    """--workers threads of unary calls on one round-robin channel; every outcome recorded."""
    target: str
    args: argparse.Namespace
    tag: str
    outcomes: dict[str, str] = field(default_factory=dict)  # call id -> "OK" or a status code name
    examples: dict[str, str] = field(default_factory=dict)  # status code name -> one details text
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> list[threading.Thread]:
        options = [("grpc.lb_policy_name", "round_robin")]
        if self.args.no_transparent_retry:
            options.append(("grpc.enable_retries", 0))
        channel = grpc.insecure_channel(self.target, options=options)
        hold = channel.unary_unary("/test.Echo/Hold")
        grpc.channel_ready_future(channel).result(timeout=10)

        def worker(n: int) -> None:
            rng = random.Random(self.args.seed * 1000 + n)
            i = 0
            while not self.stop.is_set():
                cid, i = f"{self.tag}-w{n}-{i}", i + 1
                ms = self.args.slow_ms if rng.random() < self.args.slow_share else self.args.fast_ms
                try:
                    answer = hold(json.dumps({"id": cid, "ms": ms}).encode(),
                                  timeout=self.args.call_timeout)
                    self.outcomes[cid] = "OK" if answer == cid.encode() else "WRONG_ANSWER"
                except grpc.RpcError as e:
                    self.outcomes[cid] = e.code().name
                    self.examples.setdefault(e.code().name, str(e.details())[:120])
                    time.sleep(0.05)  # do not spin on a broken channel

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(self.args.workers)]
        for t in threads:
            t.start()
        threads.append(threading.Thread(target=lambda: (self.stop.wait(), [
            t.join() for t in threads[:-1]], channel.close())))
        threads[-1].start()
        return threads


def scenario(front: str, app_kind: str, rnd: int, tmp: str, args: argparse.Namespace) -> dict:
    tag = f"{front}-{app_kind}-{rnd}"
    pods = [start_pod(front, app_kind, tmp, f"{tag}-{s}", args) for s in ("a", "b")]
    load = Load(f"ipv4:127.0.0.1:{pods[0].port},127.0.0.1:{pods[1].port}", args, tag)
    try:
        threads = load.run()
        time.sleep(args.warmup)
        C.log(f"  {tag}: stopping pod a")
        roll = stop_pod(pods[0], front, args)
        time.sleep(args.tail)
        load.stop.set()
        for t in threads:
            t.join(args.call_timeout + 5)
    finally:
        load.stop.set()
        for pod in pods:
            for p in (pod.front, pod.app):
                if p is not None:
                    p.stop(signal.SIGTERM, 10)
    started = collections.Counter()
    for pod in pods:
        if os.path.exists(pod.calls):
            with open(pod.calls) as f:
                started.update(f.read().split())
    outcomes = dict(load.outcomes)
    codes = collections.Counter(v for v in outcomes.values() if v != "OK")
    out = {"front": front, "app": app_kind, "round": rnd, "calls": len(outcomes),
           "ok": sum(v == "OK" for v in outcomes.values()), "failed": dict(codes),
           "lost": sum(v != "OK" for k, v in outcomes.items() if k in started),
           "duplicates": sum(n > 1 for n in started.values()), "roll": roll,
           "examples": load.examples}
    C.log(f"  {tag}: {out['calls']} calls, {out['ok']} OK, failed {dict(codes) or 0}; "
          f"LOST {out['lost']}, duplicates {out['duplicates']}; {roll}; {load.examples}")
    return out


def report(args: argparse.Namespace, results: list[dict], versions: dict, elapsed: float, cmd: str) -> str:
    lines = [
        "# gRPC: a pod stopped under load, with each front as the pod's proxy", "",
        (f"`{cmd}`, {elapsed / 60:.1f} min. One grpcio channel, round-robin over two pods, "
         + ("no retries at all (`grpc.enable_retries` 0)" if args.no_transparent_retry else
            "gRPC's default retries (no retry policy; only a call that never left the client is "
            "retried, transparently)")
         + f"; {args.workers} threads of unary calls, {args.slow_share:.0%} of them "
        f"{args.slow_ms:g} ms, the rest {args.fast_ms:g} ms; pod A stopped as the kubelet does "
        f"after {args.warmup:g} s (preStop, then the stop signal; D = {args.delay:g} s, "
        f"grace G = {args.grace:g} s, SIGKILL at {args.grace_period:g} s), load on for "
        f"{args.tail:g} s more. See the header of `bench/grpc_rolling.py` for each front's setup."), "",
        ("**failed** = calls that ended with a gRPC status other than OK (by code); **LOST** = "
         "calls an app started that the client did not get OK; per round, separated by `/`."), "",
        "| front | app | calls | failed | LOST | duplicates |", "|---|---|---|---|---|---|"]
    for front in dict.fromkeys(r["front"] for r in results):
        for app in dict.fromkeys(r["app"] for r in results):
            rs = [r for r in results if r["front"] == front and r["app"] == app]
            if not rs:
                continue
            failed = " / ".join(", ".join(f"{n} {c}" for c, n in sorted(r["failed"].items())) or "0"
                                for r in rs)
            lines.append(f"| {front} | {app} | {' / '.join(str(r['calls']) for r in rs)} | {failed} | "
                         f"{' / '.join(str(r['lost']) for r in rs)} | "
                         f"{' / '.join(str(r['duplicates']) for r in rs)} |")
    examples = {f"{r['front']}: {code}": text for r in results for code, text in r["examples"].items()}
    if examples:
        lines += ["", "What the client was told (one example per front and code):", ""]
        lines += [f"- {k}: `{v}`" for k, v in sorted(examples.items())]
    lines += ["", R.versions_line(versions, ("sidecar", "python", "nginx", "haproxy", "traefik", "caddy",
                                             "kernel")) + f", grpcio {grpc.__version__}", "",
              R.machine_note(versions), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fronts", default=",".join(FRONTS), help="comma list of: " + ", ".join(FRONTS))
    ap.add_argument("--apps", default=",".join(APPS), help="comma list of: " + ", ".join(APPS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--delay", type=float, default=1.0, help="drain delay / preStop sleep D, seconds")
    ap.add_argument("--grace", type=float, default=6.0, help="grace G for calls in flight, seconds")
    ap.add_argument("--grace-period", type=float, default=12.0, help="SIGKILL a pod this long into its stop")
    ap.add_argument("--fast-ms", type=float, default=5.0)
    ap.add_argument("--slow-ms", type=float, default=300.0)
    ap.add_argument("--slow-share", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--tail", type=float, default=1.0)
    ap.add_argument("--call-timeout", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-transparent-retry", action="store_true",
                    help="grpc.enable_retries=0: also no transparent retry of a call that never "
                         "left the client (gRPC's default retries it once on another connection)")
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "grpc_rolling.md"))
    ap.add_argument("--keep-tmp", action="store_true")
    C.add_sidecar_args(ap)
    args = ap.parse_args()
    C.select_sidecar(args.sidecar_root, args.sidecar_python)
    fronts = [f for f in args.fronts.split(",") if f]
    apps = [a for a in args.apps.split(",") if a]
    if bad := (set(fronts) - set(FRONTS)) | (set(apps) - set(APPS)):
        raise SystemExit(f"unknown front(s)/app(s) {sorted(bad)}")
    peers.ensure_tools({f for f in fronts if f in ("nginx", "haproxy", "traefik", "caddy")})
    C.sigterm_unwinds()
    cmd = "python bench/grpc_rolling.py" + "".join(f" {a}" for a in sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-grpc-")
    t_start, results, ok = time.time(), [], False
    try:
        for rnd in range(1, args.rounds + 1):
            for app_kind in apps:
                for front in fronts:
                    C.log(f"{front} / app {app_kind}, round {rnd}")
                    results.append(scenario(front, app_kind, rnd, tmp, args))
        ok = True
    finally:
        C.finish_tmp(tmp, keep=args.keep_tmp or not ok)
    versions = R.versions()
    elapsed = time.time() - t_start
    text = report(args, results, versions, elapsed, cmd)
    R.write_results("grpc_rolling", args.out, {"args": vars(args), "versions": versions,
                                               "results": results, "elapsed": elapsed}, text, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
