#!/usr/bin/env python3
"""Throughput, latency and CPU per request of the sidecar next to nginx and a direct connection.

In ONE run: start bench/upstream.py, then each target in front of it,
  direct             wrk straight at the upstream (no proxy)
  nginx              nginx, 1 worker, keep-alive to the upstream (bench/nginx.conf.tmpl)
  sidecar            python -m sidecar run ... (uvloop, logging.level warning)
  sidecar-accesslog  the same with SIDECAR_LOGGING_ACCESS_LOG=true (only with --access-log)
warm each one up, then for every round and endpoint run wrk against each target in turn
(target order rotates between rounds, so no target always goes first):
  wrk -t1 -c50  -dDs --latency http://127.0.0.1:PORT/fast
  wrk -t1 -c100 -dDs --latency http://127.0.0.1:PORT/sleep?ms=10
Measured per wrk run: req/s, p50/p99 latency, errors, CPU time (user+sys, /proc/PID/stat) of the
proxy's processes and of the upstream divided by the requests served, and how busy the rest of
the machine was.  Writes bench/results/throughput.md (and results/raw/throughput.json).

Run with the venv that has the project installed:  /tmp/benchvenv/bin/python bench/throughput.py
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import common as C

SIDECAR_ENV = {
    "SIDECAR_LOGGING_LEVEL": "warning",
    # Only how fast the bench can stop it at the end; nothing on the request path depends on these.
    "SIDECAR_DRAIN_DELAY": "0s",
    "SIDECAR_DRAIN_TIMEOUT": "2s",
}
ACCESS_LOG_ENV = {**SIDECAR_ENV, "SIDECAR_LOGGING_LEVEL": "info", "SIDECAR_LOGGING_ACCESS_LOG": "true"}
WARN_OTHERS = 25.0  # % of one core used by processes outside the benchmark that flags a run (⚠)


def start_target(name: str, tmp: str, upstream_port: int) -> tuple[C.Proc | None, int]:
    if name == "direct":
        return None, upstream_port
    if name == "nginx":
        return C.start_nginx(tmp, "tp", upstream_port)
    env = ACCESS_LOG_ENV if name == "sidecar-accesslog" else SIDECAR_ENV
    proc, port, _admin = C.start_sidecar(tmp, name, upstream_port, env)
    return proc, port


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


def wrk(port: int, path: str, conns: int, seconds: int) -> str:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            f"http://127.0.0.1:{port}{path}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed rc={r.returncode}: {r.stderr.strip()}")
    return r.stdout


def measure(target: str, proc: C.Proc | None, port: int, upstream: C.Proc, path: str, conns: int,
            seconds: int) -> dict:
    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has been reaped
        return ru.ru_utime + ru.ru_stime

    px0 = C.group_cpu_seconds(proc.pid) if proc else 0.0
    up0, wrk0, busy0, t0 = C.group_cpu_seconds(upstream.pid), children_cpu(), C.machine_busy_seconds(), \
        time.monotonic()
    out = wrk(port, path, conns, seconds)
    wall = time.monotonic() - t0
    px = C.group_cpu_seconds(proc.pid) - px0 if proc else None
    up = C.group_cpu_seconds(upstream.pid) - up0
    wrk_cpu = children_cpu() - wrk0
    busy = C.machine_busy_seconds() - busy0
    r = parse_wrk(out)
    n = r["requests"] or 1
    r.update(
        target=target, path=path, conns=conns, wall=wall, wrk_out=out,
        proxy_cpu=px, upstream_cpu=up, wrk_cpu=wrk_cpu,
        proxy_us=None if px is None else 1e6 * px / n,
        upstream_us=1e6 * up / n,
        # CPU used meanwhile by everything that is not ours (% of one core; tick-sampled, ±5).
        others=max(0.0, 100 * (busy - wrk_cpu - up - (px or 0.0)) / wall),
    )
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"{target} died during the run (rc={proc.poll()}); see {proc.log_path}")
    return r


# --- report ----------------------------------------------------------------------------------

def fmt(x: float | None, nd: int = 0) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def pooled_us(rows: list[dict], key: str) -> float | None:
    """CPU µs per request over all rounds: total CPU / total requests."""
    cpu = [r[key] for r in rows if r[key] is not None]
    if not cpu:
        return None
    return 1e6 * sum(cpu) / max(1, sum(r["requests"] for r in rows))


def ratio_cell(num: list[dict], den: list[dict], key: str, scale: float, nd: int) -> str:
    """Ratio of the means, then the per-round ratios (same round = measured minutes apart)."""
    def mean(rows: list[dict]) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.mean(vals) if vals else None

    if num is den:
        return "100"
    a, b = mean(num), mean(den)
    if not a or not b:
        return "—"
    per_round = []
    for r in num:
        d = next((x for x in den if x["round"] == r["round"]), None)
        if d and r[key] and d[key]:
            per_round.append(f"{scale * r[key] / d[key]:.{nd}f}")
    return f"**{scale * a / b:.{nd}f}**" + (f" ({', '.join(per_round)})" if len(per_round) > 1 else "")


def report(args, targets: list[str], endpoints: list[tuple[str, int, str]], results: list[dict],
           versions: dict[str, str], elapsed: float, cmdline: str) -> str:
    L = ["# Throughput: sidecar vs nginx vs direct\n",
         f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmdline}` in {elapsed:.0f} s: "
         f"{args.rounds} round(s), each endpoint × target in turn (order rotated per round), "
         f"`wrk -t1 -d{args.duration}s --latency`, {args.warmup} s warm-up per target.\n",
         C.machine_note(versions) + "\n",
         C.versions_line(versions) + "\n",
         "Targets: **direct** = wrk straight at `bench/upstream.py` (aiohttp on uvloop, one process); "
         "**nginx** = 1 worker, keep-alive to the upstream; **sidecar** = `python -m sidecar run` "
         "(uvloop, `logging.level: warning`)"
         + ("; **sidecar-accesslog** = the same with `SIDECAR_LOGGING_ACCESS_LOG=true` "
            "(and level info, which access lines need), lines going to a file" if "sidecar-accesslog" in targets
            else "") + ".\n",
         "Columns: **req/s**, **p50/p99** and **errors** (non-2xx + socket errors) as wrk reports them; "
         "**proxy CPU µs/req** = user+sys CPU of the proxy's processes (nginx: master + worker) during the "
         "run ÷ requests served, the least noise-sensitive column; **upstream CPU µs/req** likewise for "
         "upstream.py; **CPU % wrk / proxy / upstream** in % of one core; **others %** = CPU used meanwhile "
         f"by processes outside the benchmark (⚠ when ≥ {WARN_OTHERS:.0f} %: that run competed for the cores).\n"]
    for path, conns, label in endpoints:
        L += [f"\n## {label}: wrk -t1 -c{conns} -d{args.duration}s\n",
              "| target | round | req/s | p50 ms | p99 ms | errors | proxy CPU µs/req | upstream CPU µs/req "
              "| CPU % wrk / proxy / upstream | others % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for t in targets:
            for r in (r for r in results if r["target"] == t and r["path"] == path):
                w = r["wall"]
                L.append(f"| {t} | {r['round']}{' ⚠' if r['others'] >= WARN_OTHERS else ''} | {fmt(r['rps'])} | "
                         f"{r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} | {fmt(r['proxy_us'])} | "
                         f"{fmt(r['upstream_us'])} | {100 * r['wrk_cpu'] / w:.0f} / "
                         f"{fmt(None if r['proxy_cpu'] is None else 100 * r['proxy_cpu'] / w)} / "
                         f"{100 * r['upstream_cpu'] / w:.0f} | {r['others']:.0f} |")

    L += ["\n## Summary: ratios within this run\n",
          "Bold = ratio of the means over all rounds; in brackets the same ratio per round (the targets "
          "of one round ran back to back, so per-round ratios share the machine's conditions). "
          "CPU µs/req are pooled over rounds (total CPU ÷ total requests).\n",
          "| endpoint | target | req/s (mean) | % of direct req/s | % of nginx req/s | p99 ms (mean) "
          "| proxy CPU µs/req | proxy CPU/req ÷ nginx | upstream CPU µs/req |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    headline = []
    for path, _conns, label in endpoints:
        rows = {t: [r for r in results if r["target"] == t and r["path"] == path] for t in targets}
        for t in targets:
            rs = rows[t]
            us = pooled_us(rs, "proxy_cpu")
            ng = pooled_us(rows.get("nginx", []), "proxy_cpu")
            L.append(f"| {label} | {t} | {fmt(statistics.mean(r['rps'] for r in rs))} | "
                     f"{ratio_cell(rs, rows.get('direct', []), 'rps', 100, 0)} | "
                     f"{ratio_cell(rs, rows.get('nginx', []), 'rps', 100, 0)} | "
                     f"{statistics.mean(r['p99'] for r in rs):.2f} | {fmt(us)} | "
                     f"{'—' if us is None or not ng else f'**{us / ng:.1f}×**'} | "
                     f"{fmt(pooled_us(rs, 'upstream_cpu'))} |")
        if rows.get("sidecar"):
            sc = rows["sidecar"]
            us, ng = pooled_us(sc, "proxy_cpu"), pooled_us(rows.get("nginx", []), "proxy_cpu")
            headline.append(
                f"- **{label}**: sidecar {fmt(statistics.mean(r['rps'] for r in sc))} req/s = "
                f"{ratio_cell(sc, rows.get('direct', []), 'rps', 100, 0)} % of direct and "
                f"{ratio_cell(sc, rows.get('nginx', []), 'rps', 100, 0)} % of nginx; proxy CPU "
                f"{fmt(us)} µs/req vs nginx {fmt(ng)} µs/req = "
                f"**{(us / ng) if us and ng else float('nan'):.1f}×** nginx's CPU per request.")
    L += ["\nHeadline (this run):\n", *headline]
    L.append("\nThe sidecar is one Python process, so on a saturating endpoint (/fast) its req/s is capped by "
             "one core and its CPU per request sets the ceiling; on /sleep the upstream's 10 ms dominates and "
             "the proxies should all sit near direct. `direct` is not a strict upper bound: behind a proxy "
             "the upstream receives requests over a few pooled connections and can spend less CPU per "
             "request than with wrk's 50–100 connections.\n")
    L.append(f"Rerun: `{cmdline}` (see bench/README.md).\n")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of /fast per target before round 1")
    ap.add_argument("--access-log", action="store_true", help="also measure sidecar with access_log: true")
    ap.add_argument("--fast-conns", type=int, default=50)
    ap.add_argument("--sleep-conns", type=int, default=100)
    ap.add_argument("--sleep-ms", type=int, default=10)
    ap.add_argument("--max-minutes", type=float, default=10.0, help="refuse plans longer than this")
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "throughput.md"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()

    targets = ["direct", "nginx", "sidecar"] + (["sidecar-accesslog"] if args.access_log else [])
    endpoints = [("/fast", args.fast_conns, "GET /fast (100 B)"),
                 (f"/sleep?ms={args.sleep_ms}", args.sleep_conns, f"GET /sleep?ms={args.sleep_ms}")]
    planned = len(targets) * (args.warmup + args.rounds * len(endpoints) * args.duration)
    C.log(f"plan: {len(targets)} targets x {len(endpoints)} endpoints x {args.rounds} rounds x "
          f"{args.duration}s + warm-up = {planned}s of wrk (~{(planned + 5 * len(targets)) / 60:.1f} min)")
    if planned > args.max_minutes * 60:
        raise SystemExit(f"refusing: {planned}s of wrk > --max-minutes {args.max_minutes}")
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install -y wrk nginx (see bench/README.md)")

    C.sigterm_unwinds()
    cmdline = "python bench/throughput.py" + "".join(f" {a}" for a in sys.argv[1:])
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
        if args.warmup:
            for t in targets:
                wrk(ports[t], "/fast", args.fast_conns, args.warmup)
            C.log("warm-up done")
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(targets)
            order = targets[k:] + targets[:k]
            for path, conns, _label in endpoints:
                for t in order:
                    r = measure(t, procs[t], ports[t], upstream, path, conns, args.duration)
                    r["round"] = rnd
                    results.append(r)
                    C.log(f"round {rnd} {t:18s} {path:12s} {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} "
                          f"p99 {r['p99']:6.2f} ms  err {r['errors']}  proxy {fmt(r['proxy_us'])} µs/req  "
                          f"upstream {r['upstream_us']:.0f} µs/req  others {r['others']:.0f}%")
        ok = True
    finally:
        for t in reversed(targets):
            if procs.get(t) is not None:
                procs[t].stop(signal.SIGTERM, 10)
        if upstream is not None:
            upstream.stop(signal.SIGTERM, 10)
        if ok and not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            C.log(f"configs and logs kept in {tmp}")

    elapsed = time.time() - t_start
    versions = C.versions()
    text = report(args, targets, endpoints, results, versions, elapsed, cmdline)
    C.write_results("throughput", args.out, {"args": vars(args), "versions": versions, "results": results},
                    text, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
