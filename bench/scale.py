#!/usr/bin/env python3
"""Memory and scale of the sidecar (issue 7, target 5), with nginx alongside where it is cheap.

In ONE run, against bench/upstream.py:
  1. idle RSS: the sidecar (and nginx) just started, then after a short wrk warm-up;
  2. a 1 GiB download (GET /bytes) and a 1 GiB upload (POST /sink) streamed through the sidecar,
     one at a time, its RSS sampled every 20 ms: growth = peak - before;
  3. N (10,000) idle keep-alive client connections: each opens, sends GET /fast, reads the answer and
     stays open; RSS before and after gives KB per connection (the same for nginx);
  4. a drain with those N connections open: SIGTERM with a short drain.delay; the time of the
     sidecar's own "state closing" log line is compared with the EOF each client socket sees (epoll
     over all of them), while a thread keeps polling GET /status on the admin port (its latencies).
RLIMIT_NOFILE is raised (soft, up to the hard limit) in this process; the sidecar and nginx inherit it.
Writes bench/results/scale.md and results/raw/scale.json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import common as C
import observe as O
import peers
import runinfo as R
import scalereport

GiB = 1 << 30
SIDECAR_ENV = {"SIDECAR_LOGGING_LEVEL": "info", "SIDECAR_DRAIN_DELAY": "500ms", "SIDECAR_DRAIN_TIMEOUT": "5s",
               "SIDECAR_DRAIN_LINGER": "2s"}


class RssSampler(threading.Thread):
    """Samples the group's RSS every `every` s until stopped; keeps the peak."""

    def __init__(self, pgid: int, every: float = 0.02):
        super().__init__(daemon=True)
        self.pgid, self.every, self.peak = pgid, every, 0.0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.peak = max(self.peak, C.group_rss_mb(self.pgid))
            self._stop_evt.wait(self.every)

    def stop(self) -> float:
        self._stop_evt.set()
        self.join(5)
        return self.peak


async def _stream(port: int, kind: str, size: int) -> int:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        if kind == "download":
            got = 0
            async with s.get(f"http://127.0.0.1:{port}/bytes?n={size}") as r:
                r.raise_for_status()
                async for chunk in r.content.iter_any():
                    got += len(chunk)
            return got

        async def body():
            chunk = b"u" * (256 * 1024)
            for _ in range(size // len(chunk)):
                yield chunk

        async with s.post(f"http://127.0.0.1:{port}/sink", data=body()) as r:
            r.raise_for_status()
            return int((await r.text()).strip())


def stream(proc: C.Proc, port: int, kind: str, size: int) -> dict:
    """One streamed transfer of `size` bytes through the proxy; its RSS before, at peak, after."""
    before = C.group_rss_mb(proc.pid)
    sampler = RssSampler(proc.pid)
    sampler.start()
    t0 = time.monotonic()
    got = asyncio.run(_stream(port, kind, size))
    secs = time.monotonic() - t0
    peak = sampler.stop()
    if got != size:
        raise RuntimeError(f"{kind}: {got} bytes arrived, {size} expected")
    return {"kind": kind, "bytes": size, "seconds": secs, "mb_s": size / 2**20 / secs, "rss_before": before,
            "rss_peak": peak, "rss_after": C.group_rss_mb(proc.pid), "growth": peak - before}


def _one_idle(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/fast")
    r = conn.getresponse()
    r.read()
    if r.status != 200 or r.will_close:
        raise RuntimeError(f"GET /fast: {r.status}, will_close={r.will_close}: not a kept-alive connection")
    return conn


def open_idle(proc: C.Proc, port: int, n: int, threads: int) -> tuple[list[http.client.HTTPConnection], dict]:
    """N keep-alive connections, each after one complete request; the proxy's RSS before and after."""
    before = C.group_rss_mb(proc.pid)
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        conns = list(ex.map(lambda _i: _one_idle(port), range(n)))
    secs = time.monotonic() - t0
    # Settle: the last responses are written; read RSS until two reads 200 ms apart agree (bounded).
    after, prev = C.group_rss_mb(proc.pid), -1.0
    for _ in range(25):
        if abs(after - prev) < 0.1:
            break
        time.sleep(0.2)
        prev, after = after, C.group_rss_mb(proc.pid)
    return conns, {"n": n, "open_seconds": secs, "rss_before": before, "rss_after": after,
                   "kb_per_conn": 1024 * (after - before) / n}


class StatusPoller(threading.Thread):
    """GET /status on the admin port in a loop: (wall time sent, latency s, HTTP status or error)."""

    def __init__(self, admin: int):
        super().__init__(daemon=True)
        self.admin, self.samples = admin, []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            t0, m0 = time.time(), time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
                conn.request("GET", "/status")
                r = conn.getresponse()
                json.loads(r.read())
                conn.close()
                self.samples.append((t0, time.monotonic() - m0, r.status))
            except (OSError, ValueError, http.client.HTTPException) as e:
                self.samples.append((t0, time.monotonic() - m0, type(e).__name__))
                self._stop_evt.wait(0.05)  # refused once the admin listener is gone: no busy loop
            self._stop_evt.wait(0.01)

    def stop(self) -> list:
        self._stop_evt.set()
        self.join(10)
        return self.samples


def watch_eofs(conns: list[http.client.HTTPConnection], timeout: float) -> list[float | None]:
    """Wall time at which each connection saw EOF (or a reset); None if it was still open at timeout."""
    import selectors

    sel = selectors.DefaultSelector()
    eof: list[float | None] = [None] * len(conns)
    for i, c in enumerate(conns):
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ, i)
    deadline, left = time.monotonic() + timeout, len(conns)
    while left and time.monotonic() < deadline:
        for key, _ev in sel.select(0.05):
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # bytes would be a reply we did not ask for: keep watching for the EOF
                eof[key.data] = time.time()
                sel.unregister(key.fileobj)
                left -= 1
    sel.close()
    return eof


def drain(proc: C.Proc, admin: int, conns: list[http.client.HTTPConnection], timeout: float) -> dict:
    poller = StatusPoller(admin)
    poller.start()
    time.sleep(0.3)  # a few /status answers before the signal: the baseline latency
    t_sig = time.time()
    proc.send_signal(signal.SIGTERM)
    eofs = watch_eofs(conns, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):  # a sidecar still running: rc None below
        proc.p.wait(timeout)
    status = poller.stop()
    states = {state: at for at, state in O.sidecar_states(proc.log_path)}  # Unix times
    return {"t_signal": t_sig, "states": states, "eofs": eofs, "status": status, "rc": proc.poll()}


def nginx_idle(tmp: str, up_port: int, n: int, threads: int, warmup: int) -> dict:
    proc, port = C.start_nginx(tmp, "scale", up_port, worker_connections=n + 1024)
    try:
        idle = {"after_start": C.group_rss_mb(proc.pid)}
        scalereport.wrk_warmup(port, warmup)
        idle["after_warmup"] = C.group_rss_mb(proc.pid)
        conns, res = open_idle(proc, port, n, threads)
        for c in conns:
            c.close()
        return {"idle": idle, "conns": res}
    finally:
        proc.stop(signal.SIGTERM, 10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=10_000, help="idle keep-alive connections (default 10000)")
    ap.add_argument("--size", type=float, default=1.0, help="GiB per streamed transfer (default 1)")
    ap.add_argument("--threads", type=int, default=8, help="threads opening the idle connections")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of wrk /fast before the idle RSS")
    ap.add_argument("--no-nginx", action="store_true", help="skip the nginx comparison")
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "scale.md"))
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--note", default="", help="a line for the report (what was measured, and why)")
    C.add_sidecar_args(ap)
    args = ap.parse_args()
    C.select_sidecar(args.sidecar_root, args.sidecar_python)
    peers.ensure_tools(({"wrk"} if args.warmup else set()) | (set() if args.no_nginx else {"nginx"}))
    limit = C.raise_nofile(args.conns + 4096)
    if limit < args.conns + 256:
        raise SystemExit(f"RLIMIT_NOFILE is {limit} (hard limit): too low for --conns {args.conns}; "
                         "raise it (ulimit -Hn, or the container's nofile) or pass a smaller --conns")
    size = int(args.size * GiB) // (256 * 1024) * (256 * 1024)
    C.sigterm_unwinds()
    cmdline = "python bench/scale.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-scale-")
    t_start = time.time()
    raw: dict = {"args": vars(args), "nofile": limit, "args_env": SIDECAR_ENV}
    ok = False
    upstream = proc = None
    conns: list[http.client.HTTPConnection] = []
    try:
        upstream, up_port = C.start_upstream(tmp, "scale")
        proc, port, admin = C.start_sidecar(tmp, "sidecar", up_port, SIDECAR_ENV)
        raw["idle"] = {"after_start": C.group_rss_mb(proc.pid)}
        scalereport.wrk_warmup(port, args.warmup)
        raw["idle"]["after_warmup"] = C.group_rss_mb(proc.pid)
        C.log(f"sidecar idle RSS {raw['idle']}")
        raw["streams"] = [stream(proc, port, kind, size) for kind in ("download", "upload")]
        C.log(f"streams {[(s['kind'], round(s['growth'], 1)) for s in raw['streams']]} MB growth")
        conns, raw["conns"] = open_idle(proc, port, args.conns, args.threads)
        C.log(f"{args.conns} idle connections: {raw['conns']['kb_per_conn']:.1f} KB each")
        raw["drain"] = drain(proc, admin, conns, timeout=15.0)
        raw["drain_summary"] = scalereport.drain_summary(raw["drain"])
        C.log(f"drain: {raw['drain_summary']}")
        for c in conns:
            c.close()
        conns = []
        if not args.no_nginx:
            raw["nginx"] = nginx_idle(tmp, up_port, args.conns, args.threads, args.warmup)
            C.log(f"nginx: {raw['nginx']}")
        ok = True
    finally:
        for c in conns:
            c.close()
        for p in (proc, upstream):
            if p is not None:
                p.stop(signal.SIGTERM, 10)
        C.finish_tmp(tmp, keep=args.keep_tmp or not ok)
    versions = R.versions()
    raw["versions"] = versions
    text = scalereport.report(args, raw, versions, time.time() - t_start, cmdline)
    R.write_results("scale", args.out, raw, text, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
