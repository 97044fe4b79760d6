#!/usr/bin/env python3
"""HTTP/2 cleartext (h2c) through each proxy: CPU per stream, streams/s, latency added.

The app: one nghttpd (Debian nghttp2-server, C, one thread, `--no-tls`) serving /100b (100 B).
The client: h2load (nghttp2-client) with an http:// URL = h2c with prior knowledge; every run
checks that h2load says `Application protocol: h2c`.  Targets (--targets), each one process on
one core where it has the knob, h2c from the client and HTTP/2 cleartext to the app:
  direct   h2load straight at nghttpd
  nginx    1 worker, `listen ... http2`, `grpc_pass grpc://` (bench/nginx-h2c.conf.tmpl)
  haproxy  nbthread 1, `bind/server ... proto h2`, http-reuse safe (bench/haproxy-h2c.cfg.tmpl)
  traefik  Traefik 3, service URL h2c:// (peers.start_traefik h2c=True)
  caddy    Caddy 2, `protocols h1 h2c`, `reverse_proxy h2c://` (peers.start_caddy h2c=True)
  sidecar  python -m sidecar run --upstream http://127.0.0.1:UP (h2c in, h2c to the app)
Stages, for every target, interleaved over --rounds (each target started afresh per round):
  max   h2load -c10 -m10 -D{duration} /100b              (10 connections x 10 streams, flat out)
  rate  h2load -c10 -m1 --rps 100 -D{duration} /100b     (a fixed 1,000 streams/s in total)
  grpc  h2load -c10 -m10 -D{duration}, unary gRPC calls (POST /test.Echo/Hold, a framed message,
        content-type application/grpc, te: trailers) to a grpcio app (tests/apps/grpc_pod.py)
        instead of nghttpd: CPU per gRPC call (the Python app is the ceiling, not the proxy)
Per run: streams/s, p50/p99 from h2load's per-stream log, the CPU of every process of the
target's process group (utime+stime from /proc, before/after) per stream, and the CPU used by
everything else on the machine meanwhile ("others", % of one core).  "p99 added" = the target's
p99 minus direct's p99 in the same round at the fixed rate.  Results: bench/results/h2c.md.
Run: bench/run.sh h2c   (about 6 min: 6 targets x 3 stages x 2 rounds x 10 s)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import common as C
import peers
import runinfo as R
import throughput as TP

TARGETS = ("direct", "nginx", "haproxy", "traefik", "caddy", "sidecar")
GRPC_APP = os.path.join(os.path.dirname(C.BENCH), "tests", "apps", "grpc_pod.py")
GRPC_PATH = "/test.Echo/Hold"
SIDECAR_ENV = {"SIDECAR_LOGGING_LEVEL": "warning", "SIDECAR_DRAIN_DELAY": "0s",
               "SIDECAR_DRAIN_TIMEOUT": "2s"}


def h2load(port: int, extra: list[str], log_file: str | None, timeout: float, path: str = "/100b") -> dict:
    """One h2load run; its summary plus percentiles from its per-stream log."""
    argv = ["h2load", "-t1", *extra, *([f"--log-file={log_file}"] if log_file else []),
            f"http://127.0.0.1:{port}{path}"]
    if log_file and os.path.exists(log_file):
        os.unlink(log_file)  # h2load appends
    out = TP.run(argv, timeout)
    proto = re.search(r"Application protocol: (\S+)", out)
    if not proto or proto.group(1) != "h2c":
        raise RuntimeError(f"h2load did not speak h2c: {out[-400:]}")
    m = re.search(r"(\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    r = {"streams": int(codes.group(1)) if codes else 0,
         "errors": (int(m.group(5)) + int(m.group(6)) + int(m.group(7))) if m else -1}
    if log_file:
        with open(log_file) as f:
            rows = [line.split("\t") for line in f if line.strip()]
        lat = sorted(int(row[2]) / 1000 for row in rows if row[1] != "-1")
        starts = sorted(int(row[0]) for row in rows)
        span = (starts[-1] - starts[0]) / 1e6 if len(starts) > 1 else 0.0
        r.update(p50=TP.quantile(lat, 0.50), p99=TP.quantile(lat, 0.99), rps=len(rows) / span if span else 0.0)
    else:
        rps = re.search(r"finished in \S+, ([\d.]+) req/s", out)
        r["rps"] = float(rps.group(1)) if rps else 0.0
    return r


def wait_h2c(port: int, proc: C.Proc | None, timeout: float = 15.0, grpc_call: list[str] | None = None) -> None:
    """Until one h2c GET (or gRPC call) through the target comes back 2xx."""
    deadline = time.monotonic() + timeout
    path = GRPC_PATH if grpc_call else "/100b"
    while True:
        try:
            if h2load(port, ["-n1", "-c1", *(grpc_call or [])], None, 10, path)["streams"] == 1:
                return
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"no h2c 2xx on :{port}" + (f"; see {proc.log_path}" if proc else ""))
        time.sleep(0.2)


def start_target(name: str, tmp: str, up: int, tag: str) -> tuple[C.Proc | None, int]:
    if name == "direct":
        return None, up
    if name == "nginx":
        return peers.start_nginx_h2c(tmp, up, tag)
    if name == "haproxy":
        return peers.start_haproxy_h2c(tmp, up, tag)
    if name in ("traefik", "caddy"):
        proc, port, _ = getattr(peers, f"start_{name}")(tmp, up, tag, h2c=True)
        return proc, port
    port, admin = C.free_port(), C.free_port()
    proc = C.Proc(tag, [C.SIDECAR["python"], "-m", "sidecar", "run", "--listen", f"127.0.0.1:{port}",
                        "--admin", f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{up}"],
                  os.path.join(tmp, f"{tag}.log"), env={"PYTHONPATH": C.SIDECAR["root"], **SIDECAR_ENV})
    proc.wait_ready(f"http://127.0.0.1:{admin}/readyz")
    return proc, port


def grpc_call(tmp: str) -> list[str]:
    """h2load flags for a unary gRPC call (POST, a framed JSON message, gRPC's headers)."""
    body = os.path.join(tmp, "grpc-call.bin")
    message = b'{"id": "h2load", "ms": 0}'
    with open(body, "wb") as f:
        f.write(b"\x00" + len(message).to_bytes(4, "big") + message)
    return ["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]


def measure(name: str, proc: C.Proc | None, port: int, app: C.Proc, stage: str, args, tmp: str) -> dict:
    def children() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    px0 = C.group_cpu_seconds(proc.pid) if proc else 0.0
    up0, gen0, busy0, t0 = C.group_cpu_seconds(app.pid), children(), C.machine_busy_seconds(), time.monotonic()
    d = f"-D{args.duration}"
    extra = {"max": ["-c10", "-m10", d], "rate": ["-c10", "-m1", f"--rps={args.rate / 10:g}", d],
             "grpc": ["-c10", "-m10", d, *grpc_call(tmp)]}[stage]
    r = h2load(port, extra, os.path.join(tmp, "h2load.log"), args.duration * 3 + 30,
               GRPC_PATH if stage == "grpc" else "/100b")
    wall = time.monotonic() - t0
    px = C.group_cpu_seconds(proc.pid) - px0 if proc else None
    upc, gen = C.group_cpu_seconds(app.pid) - up0, children() - gen0
    n = r["streams"] or 1
    r.update(target=name, stage=stage, proxy_us=None if px is None else 1e6 * px / n,
             upstream_us=1e6 * upc / n,
             others=max(0.0, 100 * (C.machine_busy_seconds() - busy0 - gen - upc - (px or 0.0)) / wall))
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"{name} died during the run; see {proc.log_path}")
    return r


def report(args, results: list[dict], versions: dict, elapsed: float, cmd: str) -> str:
    def med(name: str, stage: str, key: str) -> float | None:
        vals = [r[key] for r in results if r["target"] == name and r["stage"] == stage and r[key] is not None]
        return statistics.median(vals) if vals else None

    def fmt(v: float | None, digits: int = 0) -> str:
        return "n/a" if v is None else f"{v:,.{digits}f}"

    direct99 = {r["round"]: r["p99"] for r in results if r["target"] == "direct" and r["stage"] == "rate"}
    names = list(dict.fromkeys(r["target"] for r in results))
    lines = [
        "# h2c through each proxy: CPU per stream, streams/s, latency added", "",
        (f"`{cmd}`, {elapsed / 60:.1f} min, {args.rounds} rounds interleaved, {args.duration} s each. "
         "h2load (h2c, prior knowledge) → proxy → nghttpd (h2c, 100 B). **max**: 10 connections × "
         f"10 streams flat out; **rate**: a fixed {args.rate:,} streams/s over 10 connections; **gRPC**: "
         "unary calls (h2load POST /test.Echo/Hold, 10 × 10, flat out) to a grpcio app "
         "(tests/apps/grpc_pod.py, ~3k calls/s on its own), so there the app is the limit. Medians "
         "of the rounds; CPU µs/stream = utime+stime of the proxy's processes / streams answered 2xx; "
         "p99 added = p99 − direct's p99 of the same round (median of the rounds)."), "",
        ("| target | max: streams/s | max: CPU µs/stream | rate: CPU µs/stream | rate: p50 ms | "
         "rate: p99 ms | p99 added ms | gRPC: calls/s | gRPC: CPU µs/call | errors | others % |"),
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        added = [r["p99"] - direct99[r["round"]] for r in results
                 if r["target"] == n and r["stage"] == "rate" and r["round"] in direct99]
        errors = sum(r["errors"] for r in results if r["target"] == n)
        others = [r["others"] for r in results if r["target"] == n]
        lines.append(
            f"| {n} | {fmt(med(n, 'max', 'rps'))} | {fmt(med(n, 'max', 'proxy_us'))} | "
            f"{fmt(med(n, 'rate', 'proxy_us'))} | {fmt(med(n, 'rate', 'p50'), 2)} | "
            f"{fmt(med(n, 'rate', 'p99'), 2)} | {fmt(statistics.median(added), 2) if added else 'n/a'} | "
            f"{fmt(med(n, 'grpc', 'rps'))} | {fmt(med(n, 'grpc', 'proxy_us'))} | {errors} | {min(others):.0f}-{max(others):.0f} |")
    for stage in ("max", "rate", "grpc"):
        sc = med("sidecar", stage, "proxy_us")
        ratios = [f"{p} {sc / v:.2f}" for p in ("nginx", "haproxy", "traefik", "caddy")
                  if sc and (v := med(p, stage, "proxy_us"))]
        if ratios:
            lines += ["", f"Sidecar CPU per stream ({stage}) ÷ each peer's, same run: " + ", ".join(ratios) + "."]
    lines += ["", "Per run:", "", "| round | target | stage | streams/s | CPU µs/stream | p99 ms | others % |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['target']} | {r['stage']} | {fmt(r['rps'])} | {fmt(r['proxy_us'])} | "
              f"{fmt(r.get('p99'), 2)} | {r['others']:.0f} |" for r in results]
    lines += ["", R.versions_line(versions, ("sidecar", "python", "uvloop", "nginx", "haproxy", "traefik",
                                             "caddy", "h2load", "kernel")), "", R.machine_note(versions), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma list of: " + ", ".join(TARGETS))
    ap.add_argument("--stages", default="max,rate,grpc")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=1000, help="streams/s of the rate stage (10 connections)")
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "h2c.md"))
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--report-from", metavar="RAW_JSON", help="only render the report of an earlier "
                    "run (results/raw/h2c.json)")
    C.add_sidecar_args(ap)
    args = ap.parse_args()
    C.select_sidecar(args.sidecar_root, args.sidecar_python)
    if args.report_from:
        with open(args.report_from) as f:
            raw = json.load(f)
        text = report(argparse.Namespace(**raw["args"]), raw["results"], raw["versions"], raw["elapsed"],
                      raw.get("cmd", "python bench/h2c.py"))
        R.write_results("h2c", args.out, raw, text, time.time())
        return 0
    targets = [t for t in args.targets.split(",") if t]
    if bad := set(targets) - set(TARGETS):
        raise SystemExit(f"unknown target(s) {sorted(bad)}")
    peers.ensure_tools({"h2load"} | {t for t in targets if t in ("nginx", "haproxy", "traefik", "caddy")})
    if shutil.which("nghttpd") is None:
        raise SystemExit("nghttpd is missing: apt-get install -y nghttp2-server")
    C.sigterm_unwinds()
    C.raise_nofile(16384)
    cmd = "python bench/h2c.py" + "".join(f" {a}" for a in sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-h2c-")
    with open(os.path.join(tmp, "100b"), "wb") as f:
        f.write(b"x" * 100)
    up, gup = C.free_port(), C.free_port()
    app = C.Proc("nghttpd", ["nghttpd", "--no-tls", "-a", "127.0.0.1", "-n", "1", "-d", tmp, str(up)],
                 os.path.join(tmp, "nghttpd.log"))
    stages = [s for s in args.stages.split(",") if s]
    apps = {"h2": [s for s in stages if s != "grpc"], "grpc": [s for s in stages if s == "grpc"]}
    grpc_app = C.Proc("grpc-app", [C.PY, GRPC_APP, "--port", str(gup)], os.path.join(tmp, "grpc-app.log")) \
        if apps["grpc"] else None
    t_start, results, ok = time.time(), [], False
    try:
        wait_h2c(up, app)
        if grpc_app is not None:
            wait_h2c(gup, grpc_app, grpc_call=grpc_call(tmp))
        for rnd in range(1, args.rounds + 1):
            for name in targets:
                for kind, upstream, port_up in (("h2", app, up), ("grpc", grpc_app, gup)):
                    if not apps[kind] or upstream is None:
                        continue
                    proc, port = start_target(name, tmp, port_up, f"{name}-{kind}-{rnd}")
                    try:
                        wait_h2c(port, proc, grpc_call=grpc_call(tmp) if kind == "grpc" else None)
                        for stage in apps[kind]:
                            r = measure(name, proc, port, upstream, stage, args, tmp)
                            r["round"] = rnd
                            results.append(r)
                            C.log(f"round {rnd} {name:8} {stage:4}: {r['rps']:8.0f} streams/s, "
                                  f"{TP.tpreport.fmt(r['proxy_us'])} µs/stream, p99 {r.get('p99', 0):.2f} ms, "
                                  f"errors {r['errors']}, others {r['others']:.0f}%")
                    finally:
                        if proc is not None:
                            proc.stop(signal.SIGTERM, 10)
        ok = True
    finally:
        app.stop(signal.SIGTERM, 5)
        if grpc_app is not None:
            grpc_app.stop(signal.SIGTERM, 5)
        C.finish_tmp(tmp, keep=args.keep_tmp or not ok)
    versions = R.versions()
    elapsed = time.time() - t_start
    text = report(args, results, versions, elapsed, cmd)
    R.write_results("h2c", args.out, {"args": vars(args), "versions": versions, "results": results,
                                      "elapsed": elapsed, "cmd": cmd}, text, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
