#!/usr/bin/env python3
"""Soak: minutes of mixed traffic through one sidecar, watching for leaks; then a clean drain.

Starts bench/upstream.py and one `python -m sidecar run` in front of it, then runs these loops
concurrently for --duration s (each kind has its own workers and its own keep-alive session):

  fast        GET /fast
  slow        GET /sleep?ms=300
  download    GET /bytes?n=1 MiB, read as a stream
  upload      POST /sink with a 256 KiB body sent in chunks
  websocket   open /ws, 20 echo round trips, close (1000)
  failing     GET /reset: the app aborts the connection, the sidecar must answer 502
  disconnect  a client that goes away: GET /sleep?ms=2000 cancelled after 100 ms, and a download
              dropped after its first chunk

The sidecar process is sampled (RSS and open fds from /proc/PID, asyncio tasks, in-flight requests
and connections from its admin /status): idle before any traffic, every --interval s under load,
and idle again after a warm-up pause (the baseline) and at the end (the final sample), each idle
sample taken once every client connection is gone.  The verdict compares the final idle sample with
the baseline: RSS growth under --max-growth %, no more open fds and no more tasks than the baseline,
in flight back to 0.  Last, slow requests are started and the sidecar is drained (GET /drain): it
must finish them (aborted 0) and exit 0.  Results: bench/results/soak.md; exit status 1 if a check
fails.

  /tmp/benchvenv/bin/python bench/soak.py                    # 5 minutes
  /tmp/benchvenv/bin/python bench/soak.py --duration 40 --interval 10 --out /tmp/soak.md
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections import Counter

import aiohttp
import common as C
import runinfo as R

SIDECAR_ENV = {"SIDECAR_DRAIN_DELAY": "1s", "SIDECAR_DRAIN_TIMEOUT": "10s",
               "SIDECAR_LOGGING_LEVEL": "warning", "SIDECAR_UPSTREAM_TIMEOUT": "30s"}
WORKERS = {"fast": 6, "slow": 6, "download": 2, "upload": 2, "websocket": 2, "failing": 1,
           "disconnect": 1}
UPLOAD = b"u" * 16384


def fd_census(pid: int, upstream_port: int) -> tuple[int, int]:
    """(open fds, of them TCP connections to the upstream: its idle or busy pool), one listing."""
    inodes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            inodes.append(os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").rstrip("]"))
        except OSError:
            continue  # closed while we looked
    to_upstream = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()  # sl local_address rem_address st ... inode (column 9)
                if int(cols[2].rsplit(":", 1)[1], 16) == upstream_port:
                    to_upstream.add(cols[9])
    return len(inodes), sum(i in to_upstream for i in inodes)


def sample(pid: int, admin: str, upstream_port: int, label: str, t0: float) -> dict:
    import json
    import urllib.request

    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with urllib.request.urlopen(f"{admin}/status", timeout=5) as r:
        st = json.load(r)
    fds, pool = fd_census(pid, upstream_port)
    return {"label": label, "t": round(time.monotonic() - t0), "rss_mib": round(rss_kib / 1024, 1),
            "fds": fds, "pool": pool,
            "tasks": st["tasks"], "in_flight": st["in_flight"], "connections": st["connections"],
            "websockets": st["websockets"]}


async def traffic(url: str, stop: asyncio.Event, counts: Counter[str]) -> None:
    """Every kind of traffic until `stop`; outcomes counted as 'kind: outcome'."""

    async def body() -> object:
        for _ in range(16):
            yield UPLOAD

    async def one(kind: str, s: aiohttp.ClientSession) -> str:
        if kind == "fast":
            async with s.get(f"{url}/fast") as r:
                await r.read()
                return str(r.status)
        if kind == "slow":
            async with s.get(f"{url}/sleep?ms=300") as r:
                await r.read()
                return str(r.status)
        if kind == "download":
            async with s.get(f"{url}/bytes?n=1048576") as r:
                n = sum([len(c) async for c in r.content.iter_any()])
                return f"{r.status} {'whole' if n == 1048576 else 'SHORT'}"
        if kind == "upload":
            async with s.post(f"{url}/sink", data=body()) as r:
                text = await r.text()
                return f"{r.status} {'whole' if text.strip() == str(16 * len(UPLOAD)) else 'SHORT'}"
        if kind == "websocket":
            async with s.ws_connect(f"{url}/ws") as ws:
                for i in range(20):
                    await ws.send_str(str(i))
                    if (await ws.receive(timeout=10)).data != str(i):
                        return "bad echo"
                await ws.close()
                return f"closed {ws.close_code}"
        if kind == "failing":
            async with s.get(f"{url}/reset") as r:
                await r.read()
                return str(r.status)
        # disconnect: go away mid-request, then mid-download
        try:
            await asyncio.wait_for(s.get(f"{url}/sleep?ms=2000"), 0.1)
        except TimeoutError:
            pass
        async with s.get(f"{url}/bytes?n=8388608") as r:
            await r.content.readany()
            r.close()  # drop the connection with most of the body unread
        return "went away"

    async def worker(kind: str) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            while not stop.is_set():
                try:
                    outcome = await one(kind, s)
                except (aiohttp.ClientError, TimeoutError) as e:
                    outcome = f"error {type(e).__name__}"
                    await asyncio.sleep(0.05)
                counts[f"{kind}: {outcome}"] += 1

    await asyncio.gather(*(worker(k) for k, n in WORKERS.items() for _ in range(n)))


async def wait_idle(pid: int, admin: str, upstream_port: int, t0: float, label: str) -> dict:
    """Once no request is in flight, no client connection is left and the pool of upstream
    connections is empty (idle ones are dropped after 4 s, within at most 8 s), sample for 3 s
    (longer than the 2 s upstream probe, whose connection comes and goes) and keep the sample with
    the fewest open fds: a leaked fd stays, a passing one does not.  Bounded: after 30 s the best
    (or last) sample is taken as it is."""
    deadline = time.monotonic() + 30
    quiet_since = None
    best: dict | None = None
    while True:
        s = await asyncio.to_thread(sample, pid, admin, upstream_port, label, t0)
        if s["in_flight"] == 0 and s["connections"] == 0 and s["pool"] == 0:
            quiet_since = quiet_since or time.monotonic()
            best = s if best is None or s["fds"] < best["fds"] else best
            if time.monotonic() - quiet_since >= 3.0:
                return best
        else:
            quiet_since, best = None, None
        if time.monotonic() > deadline:
            return best or s
        await asyncio.sleep(0.25)


async def drain_with_work(url: str, admin: str, n: int) -> tuple[dict, list[int]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def slow() -> int:
            async with s.get(f"{url}/sleep?ms=1500") as r:
                await r.read()
                return r.status

        pending = [asyncio.create_task(slow()) for _ in range(n)]
        await asyncio.sleep(0.3)  # let them reach the app
        async with s.get(f"{admin}/drain") as r:
            summary = await r.json()
        return summary, await asyncio.gather(*pending)


async def soak(args: argparse.Namespace, tmp: str) -> dict:
    upstream, up_port = C.start_upstream(tmp, "soak")
    sidecar, port, admin_port = C.start_sidecar(tmp, "soak-sidecar", up_port, SIDECAR_ENV)
    url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    t0 = time.monotonic()
    samples = [await wait_idle(sidecar.pid, admin, up_port, t0, "start (idle)")]
    counts: Counter[str] = Counter()
    try:
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(url, stop, counts))
        await asyncio.sleep(args.warmup)
        stop.set()
        await load
        samples.append(await wait_idle(sidecar.pid, admin, up_port, t0, "baseline (idle after warm-up)"))
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(url, stop, counts))
        t_end = time.monotonic() + args.duration
        while (left := t_end - time.monotonic()) > 0:
            await asyncio.sleep(min(args.interval, left))
            samples.append(await asyncio.to_thread(sample, sidecar.pid, admin, up_port, "under load", t0))
            C.log(f"  {samples[-1]}")
        stop.set()
        await load
        samples.append(await wait_idle(sidecar.pid, admin, up_port, t0, "end (idle)"))
        summary, statuses = await drain_with_work(url, admin, args.drain_requests)
        rc = await asyncio.to_thread(sidecar.p.wait, 30)
    finally:
        sidecar.stop(signal.SIGKILL, 2)
        upstream.stop(signal.SIGTERM, 10)
    return {"samples": samples, "counts": dict(counts), "drain": summary, "drain_statuses": statuses,
            "exit_code": rc}


def verdict(res: dict, max_growth: float) -> list[tuple[str, bool, str]]:
    base = next(s for s in res["samples"] if s["label"].startswith("baseline"))
    end = res["samples"][-1]
    growth = 100 * (end["rss_mib"] - base["rss_mib"]) / base["rss_mib"]
    bad = {k: n for k, n in res["counts"].items()
           if "error" in k or "SHORT" in k or "bad" in k or (k.startswith("websocket") and "closed" not in k)
           or (k.split(":")[0] in ("fast", "slow", "download", "upload") and ": 200" not in k)
           or (k.startswith("failing") and not k.endswith(": 502"))}
    ws_codes = {k: n for k, n in res["counts"].items() if k.startswith("websocket: closed")}
    d = res["drain"]
    return [
        (f"RSS growth under {max_growth:g} %", growth < max_growth,
         f"{base['rss_mib']} → {end['rss_mib']} MiB ({growth:+.1f} %)"),
        ("no fd leak", end["fds"] <= base["fds"], f"{base['fds']} → {end['fds']} open fds"),
        ("no task leak", end["tasks"] <= base["tasks"], f"{base['tasks']} → {end['tasks']} asyncio tasks"),
        ("in flight back to 0", end["in_flight"] == 0 and end["connections"] == 0 and end["pool"] == 0,
         (f"in flight {end['in_flight']}, client connections {end['connections']}, "
          f"idle upstream connections {end['pool']}")),
        ("every answer as expected", not bad, ", ".join(f"{k} ×{n}" for k, n in bad.items()) or "yes"),
        ("websocket close code carried back (1000)", set(ws_codes) == {"websocket: closed 1000"},
         ", ".join(f"{k} ×{n}" for k, n in ws_codes.items()) or "no websocket closed"),
        ("the drain completes cleanly", d.get("aborted") == 0 and set(res["drain_statuses"]) == {200}
         and res["exit_code"] == 0,
         (f"state {d.get('state')}, completed {d.get('completed')}, aborted {d.get('aborted')}, "
          f"{len(res['drain_statuses'])} slow requests in flight answered "
          f"{sorted(set(res['drain_statuses']))}, exit code {res['exit_code']}")),
    ]


def report(args: argparse.Namespace, res: dict, checks: list, versions: dict[str, str], elapsed: float,
           cmdline: str) -> str:
    L = ["# Soak: mixed traffic through one sidecar, watching for leaks\n",
         f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmdline}` in {elapsed:.0f} s.\n",
         R.versions_line(versions, R.CORE_KEYS) + "\n",
         (f"{args.duration:g} s of mixed traffic (after a {args.warmup:g} s warm-up and a pause) through one "
          f"`python -m sidecar run` to `bench/upstream.py`, workers per kind: "
          + ", ".join(f"{k} {n}" for k, n in WORKERS.items())
          + " (see the docstring of bench/soak.py). Env: "
          + " ".join(f"`{k}={v}`" for k, v in SIDECAR_ENV.items())
          + ". Idle samples: once no request is in flight, no client connection is left and the "
          "sidecar has dropped its idle upstream connections (4-8 s after their last use), the "
          "sample with the fewest open fds over the next 3 s is kept (the 2 s upstream probe's "
          "connection comes and goes); "
          "the verdict compares the final idle sample with the baseline (idle after the warm-up, when "
          "the allocator, the upstream connection pool and the interpreter's caches have settled).\n"),
         "## Verdict\n", "| check | | figures |", "|---|---|---|"]
    L += [f"| {name} | {'pass' if ok else '**FAIL**'} | {fig} |" for name, ok, fig in checks]
    L += ["\n## Samples (the sidecar process)\n",
          ("| t s | when | RSS MiB | open fds | of them to the upstream | asyncio tasks | in flight "
           "| client connections | websockets |"),
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    L += [f"| {s['t']} | {s['label']} | {s['rss_mib']} | {s['fds']} | {s['pool']} | {s['tasks']} | "
          f"{s['in_flight']} | {s['connections']} | {s['websockets']} |" for s in res["samples"]]
    L += ["\n## Traffic (outcomes per kind, warm-up included)\n", "| kind: outcome | count |", "|---|---:|"]
    L += [f"| {k} | {n} |" for k, n in sorted(res["counts"].items())]
    L.append(f"\nRerun: `{cmdline}` (see bench/README.md).\n")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load after the baseline")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between samples under load")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the baseline")
    ap.add_argument("--max-growth", type=float, default=10.0, help="RSS growth allowed, %%")
    ap.add_argument("--drain-requests", type=int, default=10, help="slow requests in flight at the drain")
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "soak.md"))
    ap.add_argument("--keep-tmp", action="store_true")
    C.add_sidecar_args(ap)
    args = ap.parse_args()
    C.select_sidecar(args.sidecar_root, args.sidecar_python)
    C.sigterm_unwinds()
    cmdline = "python bench/soak.py" + "".join(f" {a}" for a in sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-soak-")
    t_start = time.time()
    ok = False
    try:
        res = asyncio.run(soak(args, tmp))
        ok = True
    finally:
        C.finish_tmp(tmp, keep=args.keep_tmp or not ok, what="logs")
    checks = verdict(res, args.max_growth)
    versions = R.versions()
    text = report(args, res, checks, versions, time.time() - t_start, cmdline)
    R.write_results("soak", args.out, {"args": vars(args), "versions": versions, **res}, text, t_start)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
