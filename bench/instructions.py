#!/usr/bin/env python3
"""Instructions the sidecar executes per request, counted by valgrind: a figure that does not move.

CPU time per request on a shared VM moves by 10-25 % between identical runs, which hides a
change of a few per cent.  valgrind's callgrind counts the instructions the sidecar's process
executes in user space (Ir), which is the same from run to run within about 0.5 %.  It does
not count the kernel's work (system calls, loopback TCP), so it is the figure for the
Python side of the proxy; bench/throughput.py gives the whole CPU time next to the peers.

For each checkout (--sidecar-root, and --baseline-root when given, each from its own
.venv when it has one), the sidecar runs under `valgrind --tool=callgrind` in front of
bench/upstream.py.  For each kind of request: a warm-up, then the counters are zeroed
(callgrind_control -z), N requests are sent by h2load (HTTP/1.1, 10 connections, all
answered 2xx or the run fails), and the counters are dumped (callgrind_control -d):
  fast   GET  /fast            100 B answer
  post   POST /sink            1 KiB body (Content-Length), short answer
  bytes  GET  /bytes?n=65536   64 KiB answer
  sleep  GET  /sleep?ms=10     over 100 connections: an app that takes its time, so each
                               request is a wait (timers, wake-ups) rather than a tight loop
  paced  GET  /sleep?ms=10     a light load: 50 connections at a fixed 100 req/s in all, so
                               the sidecar is never saturated (each request on its own, as
                               at a quiet hour; under valgrind the others keep it busy)
Needs valgrind (Debian valgrind) and h2load (nghttp2-client).  Results:
bench/results/instructions.md.  About 2 minutes with a baseline.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

import common as C
import runinfo as R

KINDS = {  # name: (what, path, body size, connections, requests/s per connection or None)
    "fast": ("GET /fast", "/fast", None, 10, None),
    "post": ("POST /sink, 1 KiB body", "/sink", 1024, 10, None),
    "bytes": ("GET /bytes?n=65536", "/bytes?n=65536", None, 10, None),
    "sleep": ("GET /sleep?ms=10, 100 connections", "/sleep?ms=10", None, 100, None),
    "paced": ("GET /sleep?ms=10 at 100 req/s", "/sleep?ms=10", None, 50, 2),
}
SIDECAR_ENV = {"SIDECAR_LOGGING_LEVEL": "warning", "SIDECAR_DRAIN_DELAY": "0s",
               "SIDECAR_DRAIN_TIMEOUT": "2s"}


def h2load(port: int, path: str, n: int, body: str | None, conns: int, rps: int | None,
           timeout: float) -> None:
    argv = ["h2load", "--h1", "-t1", f"-c{conns}", "-n", str(n), *(["--rps", str(rps)] if rps else []),
            *(["-d", body] if body else []), f"http://127.0.0.1:{port}{path}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    m = re.search(r"status codes: (\d+) 2xx", r.stdout)
    if r.returncode != 0 or m is None or int(m.group(1)) != n:
        raise RuntimeError(f"{' '.join(argv)}: not {n} answers 2xx\n{r.stdout[-800:]}{r.stderr[-400:]}")


def callgrind_total(out_prefix: str, before: set[str]) -> int:
    """Ir of the newest dump written since ``before`` (the set of dump files seen earlier)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = sorted(set(glob.glob(out_prefix + ".*")) - before, key=os.path.getmtime)
        for path in reversed(new):
            with open(path) as f:
                text = f.read()
            m = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
            if m:
                return int(m.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump at {out_prefix}.*")


def measure(tmp: str, tag: str, root: str, python: str, upstream_port: int, kinds: list[str],
            n: int, warmup: int, body: str) -> dict[str, float]:
    port, admin = C.free_port(), C.free_port()
    out_prefix = os.path.join(tmp, f"cg-{tag}")
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_prefix}", "--dump-instr=no",
            python, "-m", "sidecar", "run", "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{upstream_port}"]
    p = C.Proc(tag, argv, os.path.join(tmp, f"{tag}.log"), env={"PYTHONPATH": root, **SIDECAR_ENV})
    per_request: dict[str, float] = {}
    try:
        p.wait_ready(f"http://127.0.0.1:{admin}/readyz", f"http://127.0.0.1:{port}/fast", timeout=180)
        for kind in kinds:
            _, path, size, conns, rps = KINDS[kind]
            data = body if size else None
            h2load(port, path, max(warmup, conns), data, conns, rps, timeout=600)
            subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True,
                           timeout=60)
            seen = set(glob.glob(out_prefix + ".*"))
            h2load(port, path, n, data, conns, rps, timeout=1200)
            subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True, check=True,
                           timeout=60)
            per_request[kind] = callgrind_total(out_prefix, seen) / n
            C.log(f"{tag} {kind}: {per_request[kind]:,.0f} instructions per request")
    finally:
        p.stop()
    return per_request


def report(args: argparse.Namespace, results: dict[str, dict[str, float]], checkouts: dict[str, str],
           versions: dict[str, str]) -> str:
    lines = ["# Instructions per request (valgrind callgrind)", ""]
    if args.note:
        lines += [f"**Note:** {args.note}", ""]
    generated = (f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
                 f"`python bench/instructions.py {' '.join(sys.argv[1:])}`.")
    what = ("User-space instructions (callgrind's Ir) the sidecar's process executed per request, "
            f"{args.requests:,} requests after {args.warmup:,} of warm-up, HTTP/1.1 from h2load over "
            "10 keep-alive connections (sleep: 100; paced: 50 at 100 req/s in all), bench/upstream.py behind it. Deterministic to about 0.5 % "
            "between runs; the kernel's share (system calls, loopback TCP) is not in it.")
    lines += [generated, "", what, "", R.versions_line(versions, R.CORE_KEYS), ""]
    for tag, where in checkouts.items():
        lines.append(f"- **{tag}**: {where}")
    lines.append("")
    tags = list(results)
    head = "| request | " + " | ".join(tags) + (" | sidecar ÷ baseline |" if "baseline" in results else " |")
    lines += [head, "|---|" + "---:|" * (len(tags) + ("baseline" in results))]
    for kind in results[tags[0]]:
        row = [KINDS[kind][0], *(f"{results[t][kind]:,.0f}" for t in tags)]
        if "baseline" in results:
            row.append(f"**{results['sidecar'][kind] / results['baseline'][kind]:.3f}**")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_sidecar_args(ap)
    ap.add_argument("--baseline-root", default=None, metavar="PATH",
                    help="another checkout to count the same way (its .venv when it has one)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    ap.add_argument("--requests", type=int, default=2000, help="requests counted per kind")
    ap.add_argument("--warmup", type=int, default=300, help="requests before the counters are zeroed")
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "instructions.md"))
    ap.add_argument("--note", default="", help="a line for the report (what was measured, and why)")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kind(s): {', '.join(unknown)} (known: {', '.join(KINDS)})")
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode != 0:
            ap.error(f"{tool} is not installed (apt-get install valgrind nghttp2-client)")
    C.select_sidecar(args.sidecar_root, args.sidecar_python)
    C.sigterm_unwinds()
    started = time.time()
    checkouts = {"sidecar": (C.SIDECAR["root"], C.SIDECAR["python"])}
    if args.baseline_root:
        root = os.path.abspath(args.baseline_root)
        venv_py = os.path.join(root, ".venv", "bin", "python")
        checkouts["baseline"] = (root, venv_py if os.access(venv_py, os.X_OK) else C.PY)
    versions = R.versions()
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as tmp:
        body = os.path.join(tmp, "body-1k")
        with open(body, "wb") as f:
            f.write(b"x" * 1024)
        upstream, up_port = C.start_upstream(tmp, "instr")
        results: dict[str, dict[str, float]] = {}
        try:
            for tag, (root, python) in checkouts.items():
                results[tag] = measure(tmp, tag, root, python, up_port, kinds, args.requests,
                                       args.warmup, body)
        finally:
            upstream.stop()
    where = {tag: f"`{root}` ({_describe(root)}), python `{python}`"
             for tag, (root, python) in checkouts.items()}
    text = report(args, results, where, versions)
    R.write_results("instructions", args.out, {"results": results, "checkouts": checkouts}, text, started)
    return 0


def _describe(root: str) -> str:
    r = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True,
                       text=True, check=False, timeout=10)
    return r.stdout.strip() or "not a git checkout"


if __name__ == "__main__":
    sys.exit(main())
