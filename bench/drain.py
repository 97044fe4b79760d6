#!/usr/bin/env python3
"""Requests lost across a stop signal: the sidecar (SIGTERM) vs nginx (SIGQUIT, graceful), in one run.

For every round, for each target: start a fresh bench/upstream.py and the target in front of it;
drive keep-alive load (--workers asyncio workers sharing one aiohttp.ClientSession, each looping
GET /sleep?ms=200&id=N, phases staggered over one request period) for --duration s; at --signal-at s
send the stop signal to the target; watch it exit.  Then ask the upstream which ids it received
(GET /__stats) and classify every request, exactly:

  ok            2xx with the whole body
  LOST          failed (reset, truncated, 5xx, timeout) although the upstream HAD received it: the work
                was done or started and the client never got the answer.  Drain exists to make this 0.
  pre-upstream  transport error for a request the upstream never saw (a keep-alive connection closed
                just as the client reused it): a client retry is safe, but a naive client sees an error
  rejected      503 for a request the upstream never saw (the sidecar's "closing" answer, with
                Retry-After and Connection: close): an explicit "try elsewhere"
  refused       new connection refused: the listener is closed; behind a load balancer these go to
                another pod.  Its count depends on --refused-backoff-ms, so it is attempts, not work.
  other         anything else (see the details list)

aiohttp's silent one-shot retry of idempotent requests on a reused connection is switched OFF, so
the raw behaviour of the target is visible.

Sidecar settings (env): SIDECAR_DRAIN_DELAY=1s SIDECAR_DRAIN_TIMEOUT=5s (short drain; override with
--sidecar-env KEY=VALUE), logging.level info so its final "drain finished" summary can be read.

Run with the venv that has the project installed:  /tmp/benchvenv/bin/python bench/drain.py
Bounded: load stops after --duration, every request has --request-timeout, a target that has not
exited --exit-timeout s after the signal is SIGKILLed (its own process group only).
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import aiohttp
import common as C
import observe as O
import runinfo as R

SIDECAR_ENV = {"SIDECAR_DRAIN_DELAY": "1s", "SIDECAR_DRAIN_TIMEOUT": "5s", "SIDECAR_LOGGING_LEVEL": "info"}
TARGETS = {  # name: stop signal
    "sidecar": signal.SIGTERM,
    "nginx": signal.SIGQUIT,  # = nginx -s quit: graceful
}
OUTCOMES = ["ok", "lost", "pre_upstream", "rejected", "refused", "other"]


@dataclass
class Rec:
    rid: str
    t_start: float
    t_end: float = 0.0
    reused: bool | None = None
    stage: str = "connect"  # connect -> sent -> headers -> body
    status: int | None = None
    kind: str = ""          # ok | transport | http | refused | connect | timeout | error
    detail: str = ""
    outcome: str = ""


async def drive(url: str, tag: str, proc: C.Proc, sig: int, args) -> dict:
    """Load the target, signal it at --signal-at, return the records and timings."""
    t0 = time.monotonic()
    recs: list[Rec] = []
    timing: dict = {"t_signal": None, "t_exit": None, "wall_signal": None}

    tc = aiohttp.TraceConfig()

    async def on_reuse(session, ctx, params):
        ctx.trace_request_ctx["rec"].reused = True

    async def on_create(session, ctx, params):
        ctx.trace_request_ctx["rec"].reused = False

    async def on_sent(session, ctx, params):
        ctx.trace_request_ctx["rec"].stage = "sent"

    tc.on_connection_reuseconn.append(on_reuse)
    tc.on_connection_create_end.append(on_create)
    tc.on_request_headers_sent.append(on_sent)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                                    trace_configs=[tc],
                                    timeout=aiohttp.ClientTimeout(total=args.request_timeout))
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False  # raw view: no silent retry on a dead keep-alive connection

    counter = 0

    async def one() -> Rec:
        nonlocal counter
        counter += 1
        rec = Rec(rid=f"{tag}-{counter}", t_start=time.monotonic() - t0)
        try:
            async with session.get(f"{url}/sleep?ms={args.sleep_ms}&id={rec.rid}",
                                   trace_request_ctx={"rec": rec}) as resp:
                rec.stage, rec.status = "headers", resp.status
                await resp.read()
                rec.stage = "body"
                rec.kind = "ok" if 200 <= resp.status < 300 else "http"
                rec.detail = "" if rec.kind == "ok" else f"HTTP {resp.status}"
        except aiohttp.ClientConnectorError as e:
            en = getattr(e.os_error, "errno", None)
            rec.kind = "refused" if en == errno.ECONNREFUSED else "connect"
            rec.detail = errno.errorcode.get(en, type(e).__name__) if en else type(e).__name__
        except TimeoutError:
            rec.kind, rec.detail = "timeout", f"timeout@{rec.stage}"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError,
                ConnectionResetError, BrokenPipeError) as e:
            how = "reused" if rec.reused else "new" if rec.reused is False else "?"
            rec.kind, rec.detail = "transport", f"{type(e).__name__}@{rec.stage}/{how} connection"
        except Exception as e:  # noqa: BLE001
            rec.kind, rec.detail = "error", f"{type(e).__name__}: {e}"[:100]
        rec.t_end = time.monotonic() - t0
        return rec

    rng = random.Random(args.seed)

    async def worker() -> None:
        # Spread the workers' phases over one request period, so at the signal some connections
        # are idle between requests (the keep-alive race) and some are mid-request.
        await asyncio.sleep(rng.uniform(0, args.sleep_ms / 1000))
        while time.monotonic() - t0 < args.duration:
            rec = await one()
            recs.append(rec)
            if rec.kind in ("refused", "connect"):
                await asyncio.sleep(args.refused_backoff_ms / 1000)
            elif args.think_ms:  # a pause between requests: pooled connections sit idle
                await asyncio.sleep(rng.uniform(0, args.think_ms / 1000))

    async def stopper() -> None:
        await asyncio.sleep(args.signal_at)
        timing["t_signal"], timing["wall_signal"] = time.monotonic() - t0, time.time()
        proc.send_signal(sig)
        C.log(f"  sent {signal.Signals(sig).name} to {proc.name} (pid {proc.pid}) at t={timing['t_signal']:.2f}s")
        deadline = time.monotonic() + args.exit_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            await asyncio.sleep(0.005)
        if proc.poll() is not None:
            timing["t_exit"] = time.monotonic() - t0

    try:
        await asyncio.gather(stopper(), *(worker() for _ in range(args.workers)))
    finally:
        await session.close()
    return {"recs": recs, **timing}


def classify(recs: list[Rec], seen: set[str]) -> None:
    for r in recs:
        if r.kind == "ok":
            r.outcome = "ok"
        elif r.rid in seen:                 # the app got it, the client got no (good) answer
            r.outcome = "lost"
        elif r.kind == "transport":
            r.outcome = "pre_upstream"
        elif r.kind == "http" and r.status == 503:
            r.outcome = "rejected"
        elif r.kind == "refused":
            r.outcome = "refused"
        else:
            r.outcome = "other"


def sidecar_summary(log_path: str, wall_signal: float | None) -> dict:
    """The sidecar's own account: its 'drain finished' log line and when it changed state."""
    out: dict = {"states": {}}
    try:
        with open(log_path) as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("msg") == "drain finished":
            out.update({k: v for k, v in e.items() if k not in ("ts", "level", "logger", "msg")})
        elif str(e.get("msg", "")).startswith("state ") and wall_signal and "ts" in e:
            at = O.log_time(e["ts"])
            if at >= wall_signal - 0.01:
                out["states"][e.get("state")] = round(1000 * (at - wall_signal))
    return out


def run_one(target: str, rnd: int, tmp: str, args) -> dict:
    sig = TARGETS[target]
    tag = f"drain-{target}-{rnd}"
    upstream = proc = None
    try:
        upstream, up_port = C.start_upstream(tmp, tag)
        if target == "sidecar":
            env = {**SIDECAR_ENV, **dict(kv.split("=", 1) for kv in args.sidecar_env)}
            proc, port, _admin = C.start_sidecar(tmp, tag, up_port, env)
        else:
            proc, port = C.start_nginx(tmp, tag, up_port)
        C.log(f"{target} round {rnd}: pid {proc.pid} on 127.0.0.1:{port}; {args.workers} workers for "
              f"{args.duration}s, {signal.Signals(sig).name} at {args.signal_at}s")
        res = asyncio.run(drive(f"http://127.0.0.1:{port}", tag, proc, sig, args))
        killed = proc.poll() is None
        if killed:
            C.log(f"  {target} still running {args.exit_timeout}s after the signal: SIGKILL")
            proc.kill_group()
        with urllib.request.urlopen(f"http://127.0.0.1:{up_port}/__stats", timeout=5) as r:
            stats = json.load(r)
    finally:
        if proc is not None:
            proc.stop(signal.SIGKILL, 2)
        if upstream is not None:
            upstream.stop(signal.SIGTERM, 10)
    recs: list[Rec] = res["recs"]
    classify(recs, set(stats["ids_started"]))
    ts = res["t_signal"]
    counts = {o: sum(r.outcome == o for r in recs) for o in OUTCOMES}
    details: dict[str, int] = {}
    for r in recs:
        if r.outcome not in ("ok", "refused"):
            key = f"{r.outcome}: {r.detail}"
            details[key] = details.get(key, 0) + 1
    inflight = [r for r in recs if r.t_start < ts < r.t_end and r.kind not in ("refused", "connect")]
    out = {
        "target": target, "signal": signal.Signals(sig).name, "round": rnd, "requests": len(recs),
        "counts": counts, "details": details,
        "inflight_at_signal": len(inflight), "inflight_ok": sum(r.outcome == "ok" for r in inflight),
        "ok_started_after_signal": sum(r.outcome == "ok" and r.t_start >= ts for r in recs),
        "last_ok_ms": max((1000 * (r.t_end - ts) for r in recs if r.outcome == "ok"), default=None),
        "exit_ms": None if res["t_exit"] is None else 1000 * (res["t_exit"] - ts),
        "exit_code": proc.poll(), "killed": killed,
        "upstream": {k: stats[k] for k in ("sleep_started", "sleep_finished", "sleep_cancelled")},
        "sidecar": sidecar_summary(proc.log_path, res["wall_signal"]) if target == "sidecar" else None,
    }
    C.log(f"  {target} round {rnd}: {len(recs)} requests: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f"; exit {fmt(out['exit_ms'])} ms")
    return out


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def report(args, results: list[dict], versions: dict[str, str], elapsed: float, cmdline: str) -> str:
    L = ["# Drain: requests lost across a stop signal, sidecar vs nginx\n",
         f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmdline}` in {elapsed:.0f} s.\n",
         R.machine_note(versions) + " Drain outcomes are counts, not timings, so they are far less "
         "sensitive to the noise than throughput; exit times do move with it.\n",
         R.versions_line(versions) + "\n",
         (f"Load: {args.workers} asyncio workers on one shared `aiohttp.ClientSession` (keep-alive), each "
          f"looping `GET /sleep?ms={args.sleep_ms}&id=N` (pausing 0-{args.think_ms:g} ms in between) for "
          f"{args.duration:g} s, phases staggered over one "
         f"request period; stop signal at t = {args.signal_at:g} s; client retry of idempotent requests "
         f"**off** (raw view); after a refused connect a worker waits {args.refused_backoff_ms:g} ms; "
         f"per-request timeout {args.request_timeout:g} s. A fresh upstream and target per row.\n"),
         "Targets: **sidecar** = `python -m sidecar run` stopped with **SIGTERM**, env "
         + " ".join(f"`{k}={v}`" for k, v in {**SIDECAR_ENV, **dict(kv.split('=', 1) for kv in args.sidecar_env)}
                    .items())
         + "; **nginx** = 1 worker, keep-alive to the upstream, stopped with **SIGQUIT** (`nginx -s quit`, "
         "its graceful shutdown).\n",
         ("Columns: **LOST** = failed although the upstream had received the request (its id is in the "
         "upstream's list): work done, answer lost — the number drain must keep at 0; **pre-upstream** = "
         "transport error for a request the upstream never saw (keep-alive close race; safe to retry, but "
         "an error to a naive client); **rejected** = 503 never forwarded (sidecar's closing-phase answer, "
         "with Retry-After); **refused** = connect refused after the listener closed (connection attempts; "
         "a load balancer sends them to another pod); **in flight at signal (ok)** = requests in progress "
         "when the signal was sent and how many of them completed; **ok after signal** = requests *started* "
         "after the signal that still succeeded (the sidecar keeps serving through `drain.delay`, so "
         "endpoints can be updated before it refuses anything); **exit ms** = signal → process exit.\n"),
         ("| target | signal | round | requests | ok | **LOST** | pre-upstream | rejected 503 | refused | other "
         "| in flight at signal (ok) | ok after signal | exit ms |"),
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        c = r["counts"]
        ex = f"killed > {args.exit_timeout * 1000:.0f}" if r["killed"] else fmt(r["exit_ms"])
        L.append(f"| {r['target']} | {r['signal']} | {r['round']} | {r['requests']} | {c['ok']} | "
                 f"**{c['lost']}** | {c['pre_upstream']} | {c['rejected']} | {c['refused']} | {c['other']} | "
                 f"{r['inflight_at_signal']} ({r['inflight_ok']}) | {r['ok_started_after_signal']} | {ex} |")
    L += ["\n## Summary (all rounds)\n",
          "| target | rounds | LOST | pre-upstream | rejected 503 | refused | other | exit ms (per round) |",
          "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in TARGETS:
        rows = [r for r in results if r["target"] == t]
        if not rows:
            continue
        tot = {o: sum(r["counts"][o] for r in rows) for o in OUTCOMES}
        L.append(f"| {t} | {len(rows)} | **{tot['lost']}** | {tot['pre_upstream']} | {tot['rejected']} | "
                 f"{tot['refused']} | {tot['other']} | {', '.join(fmt(r['exit_ms']) for r in rows)} |")
    sc = [r for r in results if r["sidecar"]]
    if sc:
        L += [("\nThe sidecar's own account (its `drain finished` log line; state changes in ms after the "
              "signal):\n")]
        for r in sc:
            s = r["sidecar"]
            states = ", ".join(f"{k} +{v}" for k, v in s.get("states", {}).items()) or "—"
            L.append(f"- round {r['round']}: completed {s.get('completed', '?')}, rejected {s.get('rejected', '?')}, "
                     f"aborted {s.get('aborted', '?')}, in flight at trigger {s.get('in_flight_at_trigger', '?')}, "
                     f"drain {s.get('duration_seconds', '?')} s; states: {states}; exit code {r['exit_code']}")
    L.append("\nDetails (everything except ok and refused), and what the upstream saw:\n")
    for r in results:
        det = ", ".join(f"{k} ×{n}" for k, n in sorted(r["details"].items(), key=lambda kv: -kv[1])) or "none"
        u = r["upstream"]
        L.append(f"- {r['target']} round {r['round']}: {det}; upstream /sleep started {u['sleep_started']}, "
                 f"finished {u['sleep_finished']}, cancelled {u['sleep_cancelled']}; last ok response "
                 f"{fmt(r['last_ok_ms'])} ms after the signal; exit code {r['exit_code']}")
    L.append(f"\nRerun: `{cmdline}` (see bench/README.md).\n")
    return "\n".join(L)


def add_load_args(ap: argparse.ArgumentParser, *, duration: float, signal_at: float) -> None:
    """The load and the stop signal: the flags drain.py and timeline.py share."""
    ap.add_argument("--targets", default="sidecar,nginx", help="comma list of: " + ", ".join(TARGETS))
    ap.add_argument("--workers", type=int, default=50)
    ap.add_argument("--duration", type=float, default=duration, help="seconds of load in all")
    ap.add_argument("--signal-at", type=float, default=signal_at, help="seconds of load before the signal")
    ap.add_argument("--sleep-ms", type=int, default=200)
    ap.add_argument("--think-ms", type=float, default=0.0,
                    help="each worker pauses a random 0..N ms between requests (idle keep-alive connections)")
    ap.add_argument("--request-timeout", type=float, default=10.0)
    ap.add_argument("--exit-timeout", type=float, default=15.0, help="SIGKILL a target this long after the signal")
    ap.add_argument("--refused-backoff-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sidecar-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra/overriding env for the sidecar, e.g. SIDECAR_DRAIN_DELAY=3s")
    C.add_sidecar_args(ap)


def load_targets(args: argparse.Namespace) -> list[str]:
    """Select the sidecar checkout and check the targets and the timing flags."""
    C.select_sidecar(args.sidecar_root, args.sidecar_python)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        raise SystemExit(f"unknown target(s) {sorted(unknown)}; known: {', '.join(TARGETS)}")
    if not 0 < args.signal_at < args.duration:
        raise SystemExit("--signal-at must be within (0, --duration)")
    if "nginx" in targets and not shutil.which("nginx"):
        raise SystemExit("nginx not found: apt-get install -y nginx (see bench/README.md)")
    return targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds; targets alternate within each (default 2)")
    add_load_args(ap, duration=6.0, signal_at=2.0)
    ap.add_argument("--out", default=os.path.join(C.RESULTS, "drain.md"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    targets = load_targets(args)

    try:
        import uvloop  # the load client's loop: keeps the client's own CPU low
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    C.sigterm_unwinds()
    cmdline = "python bench/drain.py" + "".join(f" {a}" for a in sys.argv[1:])
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-drain-")
    t_start = time.time()
    results = []
    ok = False
    try:
        for rnd in range(1, args.rounds + 1):
            order = targets if rnd % 2 else targets[::-1]  # alternate who goes first
            for t in order:
                results.append(run_one(t, rnd, tmp, args))
        ok = True
    finally:
        C.finish_tmp(tmp, keep=args.keep_tmp or not ok)
    results.sort(key=lambda r: (targets.index(r["target"]), r["round"]))
    elapsed = time.time() - t_start
    versions = R.versions()
    text = report(args, results, versions, elapsed, cmdline)
    R.write_results("drain", args.out, {"args": vars(args), "versions": versions, "results": results},
                    text, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
