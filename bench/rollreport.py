"""The markdown report of bench/rolling.py: the method, the headline table of client-visible
errors per rolling restart, and the details per scenario."""
from __future__ import annotations

import argparse
import time

import runinfo as R

__all__ = ["errors", "fmt_s", "method", "report"]


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def method(args: argparse.Namespace) -> list[str]:
    d, g = f"{args.delay:g} s", f"{args.grace:g} s"
    return [
        "## Method\n",
        (f"HAProxy (1 thread, keep-alive to the fronts, `option httpchk` on each front's readiness "
         f"endpoint every 200 ms, `fall 2 rise 2`, default retries, no redispatch: an ordinary config) "
         f"balances two pods; a pod = a front + `bench/upstream.py`. {args.workers} keep-alive clients "
         f"(one aiohttp session, client retries **off**) loop `GET /sleep?ms=…&id=…` with unique ids: "
         f"{100 * (1 - args.slow_share):.0f} % take {args.fast_ms:g} ms, {100 * args.slow_share:.0f} % "
         f"take {args.slow_ms[0] / 1000:g}–{args.slow_ms[1] / 1000:g} s, i.e. longer than the {d} "
         f"delay / preStop sleep. After {args.warmup:g} s, pod A is stopped while its replacement "
         f"starts and is put into a spare HAProxy slot (admin socket) once its readiness answers "
         f"200; then pod B; {args.tail:g} s later the load stops. Every front has drain delay D = {d} and grace {g}; "
         f"a pod still running {args.grace_period:g} s into its stop is SIGKILLed (the kubelet).\n"),
        ("**Fronts**: **sidecar** = `python -m sidecar run`, SIGTERM, `drain.delay` D, `drain.timeout` "
         "grace, HAProxy checks its `/readyz`; **traefik** = SIGTERM, `requestAcceptGraceTimeout` D + "
         "`graceTimeOut` grace on both entry points, checks `/ping` (`terminatingStatusCode: 503`); "
         "**caddy** = SIGTERM, `shutdown_delay` D + `grace_period` grace, checks a site answering 503 "
         "while `{http.shutting_down}`; **nginx** = SIGQUIT (graceful) at once, and **nginx-sleep** = "
         "SIGQUIT after a `sleep D`. nginx has no readiness endpoint: HAProxy checks a `location` "
         "returning 200, which fails only once SIGQUIT has closed the listener, so the check cannot "
         "announce a stop (a TCP check would be the same); until then the pod gets full traffic. "
         "**none** = HAProxy straight to the app, checking its `GET /fast`.\n"),
        ("**Apps**: **graceful** = on SIGTERM the app closes its listener, finishes what is in "
         f"progress (up to {args.app_shutdown_timeout:g} s) and exits, as aiohttp's `run_app` does; "
         "**exit** = the app dies of SIGTERM at once (no signal handling), in-flight requests and all.\n"),
        ("**Modes**: **front-first** = the front is signalled (nginx-sleep after its sleep) and the app "
         "gets SIGTERM once the front has exited (none: SIGTERM to the app at once): the best case for "
         "every front. **kubelet-parallel** = both containers are stopped in parallel, each after its "
         "own preStop hook, as the kubelet does: sidecar: SIGTERM to the sidecar at t=0 and the app's "
         "preStop `GET /drain` (blocks until drained), then SIGTERM to the app (the wiring of docs/kubernetes.md); "
         "traefik, caddy: SIGTERM to the front at t=0 (their own delay keeps them accepting for D, so "
         "no sleep is added in their container) and the app's preStop `sleep D`; nginx-sleep: "
         "`sleep D` in both containers; nginx: no hooks; none: the app's `sleep D`.\n"),
        ("Columns: client-visible errors by kind (**reset** = connection closed or reset under the "
         "request, **refused**, **502**, **503**, **timeout**, **other**); **LOST** = of those, the ones "
         "that had reached an app (the id is in the app's log): work done or started, answer lost; "
         "**dup** = ids an app received twice; **pod exit s** = from the start of a pod's stop to both "
         "of its processes gone, pod A / pod B.\n"),
    ]


def errors(r: dict) -> int:
    return r["requests"] - r["counts"]["ok"]


def report(args: argparse.Namespace, results: list[dict], versions: dict[str, str], elapsed: float,
           cmdline: str) -> str:
    L = ["# Rolling restart behind HAProxy: the sidecar against the peers\n",
         f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmdline}` in {elapsed:.0f} s.\n",
         (R.machine_note(versions) + " The error counts are counts, not timings; exit times move "
          "with the noise."),
         "",
         R.versions_line(versions) + "\n",
         *method(args),
         ("## Headline: client-visible errors (of them LOST) per rolling restart of both pods, "
          "one figure per round\n")]
    modes = list(dict.fromkeys((r["mode"], r["app"]) for r in results))
    L += ["| front | " + " | ".join(f"{m}, app {a}" for m, a in modes) + " |",
          "|---|" + "---:|" * len(modes)]
    for front in dict.fromkeys(r["front"] for r in results):
        cells = []
        for m, a in modes:
            rows = [r for r in results if (r["front"], r["mode"], r["app"]) == (front, m, a)]
            cells.append(" / ".join(f"{errors(r)} ({r['lost']})" for r in rows) or "—")
        L.append(f"| {front} | " + " | ".join(cells) + " |")
    L += ["\n## Every run\n",
          ("| front | mode | app | requests | ok | reset | refused | 502 | 503 | timeout | other "
           "| **LOST** | dup | pod exit s (A / B) |"),
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        c = r["counts"]
        ex = " / ".join(fmt_s(r["rolls"].get(p, {}).get("pod_exit_s"))
                        + (" killed" if r["rolls"].get(p, {}).get("killed") else "") for p in ("a1", "b1"))
        L.append(f"| {r['front']} | {r['mode']} | {r['app']} | {r['requests']} | {c['ok']} | {c['reset']} | "
                 f"{c['refused']} | {c['502']} | {c['503']} | {c['timeout']} | {c['other']} | "
                 f"**{r['lost']}** | {r['duplicates']} | {ex} |")
    L.append("\nDetails (every non-ok answer by kind; \"reached the app\" = LOST) and each pod's exits "
             "(s after its stop began):\n")
    for r in results:
        det = ", ".join(f"{k} ×{n}" for k, n in sorted(r["details"].items(), key=lambda kv: -kv[1]))
        pods = "; ".join(f"{p}: front {fmt_s(v.get('front_exit_s'))}, app {fmt_s(v.get('app_exit_s'))}"
                         + (f", {v['prestop']}" if "prestop" in v else "")
                         for p, v in r["rolls"].items())
        L.append(f"- {r['front']} / {r['mode']} / app {r['app']} (round {r['round']}): "
                 f"{det or 'no errors'}; {pods}")
    L.append(f"\nRerun: `{cmdline}` (see bench/README.md).\n")
    return "\n".join(L)
