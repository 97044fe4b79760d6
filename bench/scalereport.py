"""The markdown report of bench/scale.py (and its wrk warm-up): memory, streams, idle connections,
the drain of those connections, and what a user must raise for them."""
from __future__ import annotations

import subprocess
import time

import runinfo as R

__all__ = ["drain_summary", "report", "wrk_warmup"]


def wrk_warmup(port: int, seconds: int) -> None:
    if seconds > 0:
        subprocess.run(["wrk", "-t1", "-c10", f"-d{seconds}s", f"http://127.0.0.1:{port}/fast"],
                       check=True, capture_output=True, timeout=seconds + 30)


def drain_summary(d: dict) -> dict:
    """Times in ms, relative to the sidecar's own `state closing` line (and to the signal)."""
    closing = d["states"].get("closing")
    eofs = [e for e in d["eofs"] if e is not None]
    out = {"n": len(d["eofs"]), "closed": len(eofs), "open_at_end": len(d["eofs"]) - len(eofs),
           "states_ms": {k: round(1000 * (v - d["t_signal"])) for k, v in d["states"].items()
                         if v >= d["t_signal"] - 0.01}, "rc": d["rc"]}
    if closing is not None and eofs:
        rel = sorted(1000 * (e - closing) for e in eofs)
        out.update(first_ms=rel[0], last_ms=rel[-1], p50_ms=rel[len(rel) // 2],
                   within_1s=sum(1 for r in rel if r <= 1000), before_closing=sum(1 for r in rel if r < 0))
    st = d["status"]
    ok = [(t, lat) for t, lat, s in st if s == 200]
    end = max(eofs) if eofs else d["t_signal"]
    # Polls whose [sent, answered] interval overlaps [closing, last EOF]: they waited on the close.
    window = [lat for t, lat in ok if closing is not None and t <= end and t + lat >= closing]
    before = [lat for t, lat in ok if t < d["t_signal"]]
    out["status"] = {
        "polls": len(st), "ok": len(ok),
        "errors_before_exit": sum(1 for t, _lat, s in st if s != 200 and t <= end),
        "max_ms_before_signal": 1000 * max(before) if before else None,
        "max_ms_during_close": 1000 * max(window) if window else None,
        "polls_during_close": len(window),
        "max_ms_signal_to_exit": 1000 * max((lat for t, lat in ok if t >= d["t_signal"]), default=0.0),
    }
    return out


def _f(x: float | None, nd: int = 1) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def report(args, raw: dict, versions: dict[str, str], elapsed: float, cmdline: str) -> str:
    sc_idle, ng = raw["idle"], raw.get("nginx")
    L = ["# Scale: memory, 1 GiB streams, 10,000 idle connections and their drain\n",
         f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmdline}` in {elapsed:.0f} s.\n",
         *([f"**Note:** {args.note}\n"] if args.note else []),
         R.machine_note(versions) + " Memory figures depend far less on the noise than timings.\n",
         R.versions_line(versions) + "\n",
         "The sidecar measured: `python -m sidecar run` (uvloop) from the checkout named in Versions, env "
         + " ".join(f"`{k}={v}`" for k, v in raw["args_env"].items()) + ". RSS = VmRSS of the proxy's "
         "processes (nginx: master + worker summed), MiB.\n",
         "\n## Idle memory (issue 7 target: sidecar ≤ 50 MB)\n",
         "| proxy | RSS just started MB | RSS after a wrk warm-up MB |", "|---|---:|---:|",
         f"| sidecar | {_f(sc_idle['after_start'])} | {_f(sc_idle['after_warmup'])} |"]
    if ng:
        L.append(f"| nginx (1 worker) | {_f(ng['idle']['after_start'])} | {_f(ng['idle']['after_warmup'])} |")
    L += ["\n## Streams through the sidecar, one at a time (target: RSS growth < 20 MB)\n",
          "| transfer | size | MB/s | RSS before MB | RSS peak MB (sampled every 20 ms) | growth MB | RSS after MB |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for s in raw["streams"]:
        what = "download `GET /bytes`" if s["kind"] == "download" else "upload `POST /sink`"
        L.append(f"| {what} | {s['bytes'] / 2**30:g} GiB | {_f(s['mb_s'], 0)} | {_f(s['rss_before'])} | "
                 f"{_f(s['rss_peak'])} | **{_f(s['growth'])}** | {_f(s['rss_after'])} |")
    c = raw["conns"]
    L += [f"\n## {c['n']:,} idle keep-alive client connections\n",
          "Each connection sends `GET /fast`, reads the whole answer and stays open (idle, keep-alive).\n",
          "| proxy | connections | opened in s | RSS before MB | RSS after MB | **KB per connection** |",
          "|---|---:|---:|---:|---:|---:|",
          (f"| sidecar | {c['n']:,} | {_f(c['open_seconds'])} | {_f(c['rss_before'])} | {_f(c['rss_after'])} | "
          f"**{_f(c['kb_per_conn'])}** |")]
    if ng:
        n = ng["conns"]
        L.append(f"| nginx (1 worker) | {n['n']:,} | {_f(n['open_seconds'])} | {_f(n['rss_before'])} | "
                 f"{_f(n['rss_after'])} | **{_f(n['kb_per_conn'])}** |")
    d = raw["drain_summary"]
    s = d["status"]
    L += [(f"\n## Drain with {d['n']:,} idle connections open (target: all closed within 1 s of `closing`, "
          "/status answering)\n"),
          ("SIGTERM to the sidecar; times from its own JSON log (`state …` lines) and from the EOF each client "
          "socket sees (epoll over all of them), in ms. A thread polls `GET /status` on the admin port "
          "throughout.\n"),
          "| measure | value |", "|---|---:|",
          "| state changes after the signal (ms) | " + ", ".join(f"{k} {v}" for k, v in d["states_ms"].items())
          + " |",
          (f"| connections closed by the sidecar | {d['closed']:,} of {d['n']:,} (still open at the end: "
          f"{d['open_at_end']}) |"),
          f"| closed before `closing` | {d.get('before_closing', '—')} |",
          (f"| first / median / **last** EOF after `closing` (ms) | {_f(d.get('first_ms'), 0)} / "
          f"{_f(d.get('p50_ms'), 0)} / **{_f(d.get('last_ms'), 0)}** |"),
          f"| **closed within 1 s of `closing`** | **{d.get('within_1s', '—'):,}** of {d['n']:,} |"
          if isinstance(d.get("within_1s"), int) else "| closed within 1 s of `closing` | — |",
          (f"| /status polls (ok) | {s['polls']} ({s['ok']}); errors before the last EOF: "
          f"{s['errors_before_exit']} |"),
          f"| /status max latency before the signal (ms) | {_f(s['max_ms_before_signal'])} |",
          (f"| **/status max latency while the connections were closed** (ms; {s['polls_during_close']} polls) | "
          f"**{_f(s['max_ms_during_close'])}** |"),
          f"| /status max latency, signal to exit (ms) | {_f(s['max_ms_signal_to_exit'])} |",
          f"| sidecar exit code | {d['rc']} |"]
    L += ["\n## Scaling: file descriptors\n",
          (f"Every client connection is one file descriptor in the sidecar, plus one per pooled upstream "
          f"connection (`upstream.max_connections`, default 512) and a few dozen of its own. This run raised "
          f"the soft `RLIMIT_NOFILE` of the benchmark and the sidecar to {raw['nofile']:,} (the hard limit "
          "here is the ceiling). A user who expects N concurrent client connections must let the sidecar "
          "open N + max_connections + ~100 files: `ulimit -n` in a shell or an entrypoint script (up to the "
          "hard limit), `LimitNOFILE=` for a systemd unit, `--ulimit nofile=SOFT:HARD` for `docker run`. A "
          "Kubernetes pod spec cannot set it: containers get the container runtime's limits, which differ "
          "between runtimes and versions (a soft limit of 1,024 is common); check with `cat /proc/1/limits` "
          "inside the container. Beyond the descriptors, each idle connection costs the memory measured "
          "above.\n")]
    L.append(f"Rerun: `{cmdline}` (see bench/README.md).\n")
    return "\n".join(L)
