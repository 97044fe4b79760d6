#!/usr/bin/env python3
"""The drain as a picture: keep-alive clients through a stop signal, one PNG per target.

For each target (the sidecar stopped with SIGTERM, nginx with SIGQUIT, its graceful quit): a
fresh bench/upstream.py and the target in front of it; --workers keep-alive clients loop
GET /sleep?ms=200 (bench/drain.py's load and its exact per-request classification, reused);
the stop signal at --signal-at s. Meanwhile /proc/net/tcp is sampled every 20 ms: the clients'
established connections to the target and whether it still listens. Then one PNG per target:

  1. requests per 100 ms by how they ended: ok, 503 refused (never forwarded, Retry-After),
     connection refused (listener closed), error before the app (a reset on a reused keep-alive
     connection: retry-safe), error the app had seen (LOST: work done, answer lost);
  2. requests in flight (client side);
  3. open client connections and the listening socket;

with the lifecycle as coloured bands (the sidecar's own state changes from its log; nginx: from
the signal to its exit) and the trigger, `closing` and `drained` marked. Both PNGs share their
axes, so they can be compared side by side.

    .venv/bin/python bench/timeline.py        # ~20 s; writes bench/results/timeline-*.png

Needs the `bench` extra (matplotlib): pip install -e '.[bench,uvloop]'; and nginx on PATH.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request

import common as C
import drain as D
import observe as O
import runinfo as R

BIN = 0.1       # seconds per bar
SAMPLE = 0.02   # seconds between /proc/net/tcp samples
OUTCOMES = [    # drain.py's outcome -> (legend, colour); drawn bottom-up
    ("ok", "ok (2xx)", "#2ca02c"),
    ("rejected", "503 refused (not forwarded, Retry-After)", "#ff7f0e"),
    ("refused", "connection refused (listener closed)", "#7f7f7f"),
    ("pre_upstream", "error before the app (retry-safe)", "#8c564b"),
    ("lost", "error the app had seen (LOST)", "#d62728"),
    ("other", "other error", "#000000"),
]
BANDS = {"serving": "#2ca02c", "draining": "#ffd92f", "closing": "#ff7f0e", "drained": "#9467bd",
         "quitting": "#ff7f0e", "exited": "#bbbbbb"}


async def sampled_drive(url: str, port: int, tag: str, proc: C.Proc, sig: int, args) -> dict:
    """drain.py's load and signal, with the connection count sampled beside it."""
    samples: list[tuple[float, int, bool]] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            samples.append((time.time(), *O.tcp_state(port)))
            await asyncio.sleep(SAMPLE)

    task = asyncio.create_task(sampler())
    try:
        res = await D.drive(url, tag, proc, sig, args)
    finally:
        stop.set()
        await task
    return {**res, "samples": samples}


def run_target(target: str, tmp: str, args) -> dict:
    sig = D.TARGETS[target]
    upstream = proc = None
    try:
        upstream, up_port = C.start_upstream(tmp, target)
        if target == "sidecar":
            env = {**D.SIDECAR_ENV, **dict(kv.split("=", 1) for kv in args.sidecar_env)}
            proc, port, _admin = C.start_sidecar(tmp, f"timeline-{target}", up_port, env)
        else:
            proc, port = C.start_nginx(tmp, f"timeline-{target}", up_port)
        C.log(f"{target}: pid {proc.pid} on 127.0.0.1:{port}; {args.workers} workers, "
              f"{signal.Signals(sig).name} at {args.signal_at}s")
        res = asyncio.run(sampled_drive(f"http://127.0.0.1:{port}", port, target, proc, sig, args))
        if proc.poll() is None:
            C.log(f"  {target} still running {args.exit_timeout}s after the signal: SIGKILL")
            proc.kill_group()
        with urllib.request.urlopen(f"http://127.0.0.1:{up_port}/__stats", timeout=5) as r:
            seen = set(json.load(r)["ids_started"])
    finally:
        if proc is not None:
            proc.stop(signal.SIGKILL, 2)
        if upstream is not None:
            upstream.stop(signal.SIGTERM, 10)
    D.classify(res["recs"], seen)
    # Everything on one clock: seconds after the signal.
    ts, wall = res["t_signal"], res["wall_signal"]
    out = {
        "target": target, "signal": signal.Signals(sig).name,
        "requests": [(r.t_start - ts, r.t_end - ts, r.outcome) for r in res["recs"]],
        "samples": [(w - wall, n, listening) for w, n, listening in res["samples"]],
        "exit": None if res["t_exit"] is None else res["t_exit"] - ts,
        "t_load_start": -ts, "t_load_end": args.duration - ts,
    }
    if target == "sidecar":
        out["states"] = [(w - wall, s) for w, s in O.sidecar_states(proc.log_path) if w >= wall - 0.01]
    counts = {o: sum(r[2] == o for r in out["requests"]) for o, _, _ in OUTCOMES}
    exit_ = "no exit" if out["exit"] is None else f"exit {out['exit']:.2f}s after the signal"
    C.log(f"  {target}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {exit_}")
    return out


def phases(run: dict) -> list[tuple[float, float, str]]:
    """(start, end, name) of the lifecycle bands, on the seconds-after-signal clock."""
    end = run["t_load_end"]
    exit_ = run["exit"] if run["exit"] is not None else end
    if run["target"] == "sidecar":
        marks = [(run["t_load_start"], "serving")] + [
            (t, s) for t, s in run["states"] if s in ("draining", "closing", "drained")]
    else:
        marks = [(run["t_load_start"], "serving"), (0.0, "quitting")]
    marks.append((exit_, "exited"))
    return [(t, nxt, name) for (t, name), (nxt, _) in zip(marks, marks[1:] + [(end, "")])
            if nxt > t]


def markers(run: dict) -> list[tuple[float, str]]:
    """The trigger, `closing` and `drained` (nginx: listener gone, exited) as (time, label)."""
    out = [(0.0, f"{run['signal']}")]
    if run["target"] == "sidecar":
        out += [(t, s) for t, s in run["states"] if s in ("closing", "drained")]
    else:
        gone = next((t for t, _, listening in run["samples"] if t >= 0 and not listening), None)
        if gone is not None:
            out.append((gone, "listener closed"))
    if run["exit"] is not None:
        out.append((run["exit"], "exit"))
    return out


def draw(run: dict, limits: dict, path: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    x0, x1 = limits["x"]
    nbins = round((x1 - x0) / BIN)
    edges = [x0 + i * BIN for i in range(nbins + 1)]
    fig, (ax_req, ax_fly, ax_conn) = plt.subplots(
        3, 1, figsize=(13, 8.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1, 1]})
    bottom = [0] * nbins
    totals = {}
    for outcome, label, colour in OUTCOMES:
        heights = [0] * nbins
        for _, t_end, o in run["requests"]:
            i = int((t_end - x0) // BIN)
            if o == outcome and 0 <= i < nbins:
                heights[i] += 1
        totals[outcome] = sum(o == outcome for *_, o in run["requests"])
        if any(heights) or outcome in ("ok", "rejected", "refused", "lost"):
            ax_req.bar(edges[:-1], heights, width=BIN, bottom=bottom, align="edge", color=colour,
                       edgecolor="white", linewidth=0.3, label=f"{label}: {totals[outcome]}")
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax_req.set_ylabel(f"requests ended\nper {int(BIN * 1000)} ms")
    ax_req.set_ylim(0, limits["req"])
    outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 9,
               "title_fontsize": 9, "alignment": "left"}
    ax_req.legend(title="how requests ended (total)", **outside)

    ts = [x0 + i * SAMPLE for i in range(int((x1 - x0) / SAMPLE) + 1)]
    started = sorted((s, e) for s, e, o in run["requests"] if o not in ("refused",))
    fly = [sum(s <= t < e for s, e in started) for t in ts]
    ax_fly.step(ts, fly, where="post", color="#1f77b4", lw=1.4)
    ax_fly.set_ylabel("requests\nin flight")
    ax_fly.set_ylim(0, limits["fly"])

    st = [t for t, _, _ in run["samples"]]
    ax_conn.step(st, [n for _, n, _ in run["samples"]], where="post", color="#17becf", lw=1.4,
                 label="open client connections")
    ax_conn.set_ylabel("open\nconnections")
    ax_conn.set_ylim(0, limits["conn"])
    ax_conn.set_xlabel(f"seconds after {run['signal']} (sampled every {int(SAMPLE * 1000)} ms)")
    ax_conn.set_xlim(x0, x1)

    seen_bands = []
    for ax in (ax_req, ax_fly, ax_conn):
        for start, end, name in phases(run):
            ax.axvspan(start, end, color=BANDS[name], alpha=0.13, lw=0)
        for t, label in markers(run):
            ax.axvline(t, color="#d62728" if t == 0 else "#444444", lw=1.1,
                       ls="-" if t == 0 else "--")
        ax.grid(axis="y", alpha=0.3)
    last, y = None, 1.0
    for t, label in markers(run):  # labels of marks close together are staggered downwards
        y = y - 0.3 if last is not None and t - last < 0.04 * (x1 - x0) else 1.0
        last = t
        ax_req.annotate(label, (t, y), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", va="top", fontsize=9, rotation=90,
                        color="#d62728" if t == 0 else "#222222",
                        bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                              "alpha": 0.8})
    for _, _, name in phases(run):
        if name not in seen_bands:
            seen_bands.append(name)
    ax_conn.legend(handles=[Patch(color=BANDS[n], alpha=0.35, label=n) for n in seen_bands],
                   title="state (bands)", **outside)

    if run["target"] == "sidecar":
        env = {**D.SIDECAR_ENV, **dict(kv.split("=", 1) for kv in args.sidecar_env)}
        how = (f"sidecar, SIGTERM: drain.delay {env['SIDECAR_DRAIN_DELAY']}, "
               f"drain.timeout {env['SIDECAR_DRAIN_TIMEOUT']}")
    else:
        how = "nginx 1 worker, SIGQUIT (graceful quit)"
    fig.suptitle(f"{how}\n{args.workers} keep-alive clients looping GET /sleep?ms={args.sleep_ms}; "
                 f"LOST = {totals['lost']}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    C.log(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    D.add_load_args(ap, duration=4.0, signal_at=1.5)
    ap.add_argument("--out-dir", default=C.RESULTS)
    args = ap.parse_args()
    targets = D.load_targets(args)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("matplotlib not found: pip install -e '.[bench]'") from None
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    C.sigterm_unwinds()
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-timeline-")
    t_start = time.time()
    try:
        runs = [run_target(t, tmp, args) for t in targets]
    except BaseException:
        C.log(f"logs kept in {tmp}")
        raise
    shutil.rmtree(tmp, ignore_errors=True)

    # Shared axes: the pictures are meant to be read side by side.
    def peak(values: list[float], floor: float) -> float:
        return max([floor, *values]) * 1.15

    # Until shortly after the last exit: later, every attempt is refused and says nothing new.
    last_exit = max((run["exit"] for run in runs if run["exit"] is not None), default=None)
    x1 = args.duration - args.signal_at if last_exit is None else min(
        args.duration - args.signal_at, last_exit + 0.6)
    per_bin = []
    for run in runs:
        bins: dict[int, int] = {}
        for _, t_end, _ in run["requests"]:
            if t_end < x1:
                bins[int(t_end // BIN)] = bins.get(int(t_end // BIN), 0) + 1
        per_bin += bins.values()
    limits = {
        "x": (-args.signal_at, x1),
        "req": peak(per_bin, 10),
        "fly": peak([args.workers], 1),
        "conn": peak([n for run in runs for _, n, _ in run["samples"]], 1),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    for run in runs:
        draw(run, limits, os.path.join(args.out_dir, f"timeline-{run['target']}.png"), args)
    os.makedirs(os.path.join(args.out_dir, "raw"), exist_ok=True)
    with open(os.path.join(args.out_dir, "raw", "timeline.json"), "w") as f:
        json.dump({"args": vars(args), "versions": R.versions(), "runs": runs}, f)
    C.log(f"done in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
