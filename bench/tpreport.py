"""The markdown report of bench/throughput.py: per-run tables, ratios within the run, targets.

Every ratio compares targets measured in the same run (and, in brackets, in the same round,
minutes apart): on a shared machine those are the numbers that hold.
"""
from __future__ import annotations

import statistics
import time

import runinfo as R

__all__ = ["STAGES", "fmt", "report"]

STAGES = {"fast": "GET /fast (100 B)", "sleep": "GET /sleep", "rate": "GET /fast at a fixed rate"}
PROXIES = ["nginx", "haproxy", "traefik", "caddy", "sidecar", "sidecar-accesslog", "sidecar-base"]
WARN_OTHERS = 25.0  # % of one core used by processes outside the benchmark that flags a run (⚠)


def fmt(x: float | None, nd: int = 0) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def _rows(results: list[dict], target: str, stage: str) -> list[dict]:
    return [r for r in results if r["target"] == target and r["stage"] == stage]


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def pooled_us(rows: list[dict]) -> float | None:
    """Proxy CPU µs per request over all rounds: total CPU / total requests."""
    cpu = [r["proxy_cpu"] for r in rows if r["proxy_cpu"] is not None]
    return 1e6 * sum(cpu) / max(1, sum(r["requests"] for r in rows)) if cpu else None


def ratio_cell(num: list[dict], den: list[dict], key: str, scale: float = 1.0, nd: int = 2) -> str:
    """Ratio of the means in bold, then the per-round ratios in brackets."""
    a, b = _mean(num, key), _mean(den, key)
    if not a or not b:
        return "—"
    per = [f"{scale * r[key] / d[key]:.{nd}f}" for r in num for d in den
           if d["round"] == r["round"] and r.get(key) and d.get(key)]
    return f"**{scale * a / b:.{nd}f}**" + (f" ({', '.join(per)})" if len(per) > 1 else "")


def added_p99(results: list[dict], target: str) -> list[float]:
    """p99 through `target` minus p99 direct in the same round, at the fixed rate (ms)."""
    direct = {r["round"]: r["p99"] for r in _rows(results, "direct", "rate")}
    return [r["p99"] - direct[r["round"]] for r in _rows(results, target, "rate") if r["round"] in direct]


def _stage_table(args, stage: dict, targets: list[str], results: list[dict]) -> list[str]:
    gen = (f"wrk -t1 -c{stage['conns']} -d{args.duration}s" if stage["kind"] == "wrk" else
           f"h2load --h1 -c{stage['conns']}, offered {args.rate} req/s for {args.duration} s (open loop)")
    rate = stage["name"] == "rate"
    head = ("| target | round | req/s | p50 ms | p99 ms | " + ("p99.9 ms | max ms | p99 − direct ms | "
            if rate else "") + "errors | proxy CPU µs/req | upstream CPU µs/req | RSS MB | "
            "CPU % load gen / proxy / upstream | others % |")
    L = [f"\n## {STAGES[stage['name']]} `{stage['path']}`: {gen}\n", head,
         "|---|---:|" + "---:|" * (head.count("|") - 4) + "---:|"]
    for t in targets:
        direct = {r["round"]: r["p99"] for r in _rows(results, "direct", stage["name"])}
        for r in _rows(results, t, stage["name"]):
            w = r["wall"]
            extra = (f"{r['p999']:.2f} | {r['max']:.2f} | "
                     f"{fmt(r['p99'] - direct[r['round']] if r['round'] in direct else None, 2)} | "
                     if rate else "")
            L.append(f"| {t} | {r['round']}{' ⚠' if r['others'] >= WARN_OTHERS else ''} | {fmt(r['rps'])} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} | {extra}{r['errors']} | {fmt(r['proxy_us'])} | "
                     f"{fmt(r['upstream_us'])} | {fmt(r['rss_mb'], 1)} | {100 * r['gen_cpu'] / w:.0f} / "
                     f"{fmt(None if r['proxy_cpu'] is None else 100 * r['proxy_cpu'] / w)} / "
                     f"{100 * r['upstream_cpu'] / w:.0f} | {r['others']:.0f} |")
    return L


def _matrix(title: str, targets: list[str], cell) -> list[str]:
    cols = [t for t in targets if t in PROXIES]
    L = [f"\n{title}\n", "| row ÷ column | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row in cols:
        L.append(f"| {row} | " + " | ".join("1" if row == c else cell(row, c) for c in cols) + " |")
    return L


def _targets_table(targets: list[str], results: list[dict], sc: str) -> list[str]:
    """The sidecar against the targets of issue 7 (one run; ratios)."""
    cpu = {t: pooled_us(_rows(results, t, "fast")) for t in targets}
    rps = {t: _mean(_rows(results, t, "fast"), "rps") for t in targets}
    srps = {t: _mean(_rows(results, t, "sleep"), "rps") for t in targets}
    sp99 = {t: _mean(_rows(results, t, "sleep"), "p99") for t in targets}
    add = added_p99(results, sc)

    def ratio(a: float | None, b: float | None, nd: int = 2) -> str:
        return f"{a / b:.{nd}f}" if a and b else "—"

    def met(ok: bool | None) -> str:
        return "—" if ok is None else ("yes" if ok else "**no**")

    def cmp(a: float | None, b: float | None, op) -> bool | None:
        return None if a is None or b is None else op(a, b)

    rows = [
        ("1. proxy CPU/req on /fast ≤ Caddy's", ratio(cpu[sc], cpu.get("caddy")) + "× Caddy", "≤ 1.00×",
         met(cmp(cpu[sc], cpu.get("caddy"), float.__le__))),
        ("1. moonshot: ≤ Traefik's", ratio(cpu[sc], cpu.get("traefik")) + "× Traefik", "≤ 1.00×",
         met(cmp(cpu[sc], cpu.get("traefik"), float.__le__))),
        ("1. (report) ratio to nginx", ratio(cpu[sc], cpu.get("nginx"), 1) + "× nginx", "—", "—"),
        ("2. /fast req/s ≥ 50 % of nginx", ratio(rps[sc], rps.get("nginx")), "≥ 0.50",
         met(cmp(rps[sc], None if rps.get("nginx") is None else 0.5 * rps["nginx"], float.__ge__))),
        ("3. /sleep req/s ≥ 95 % of nginx", ratio(srps[sc], srps.get("nginx")), "≥ 0.95",
         met(cmp(srps[sc], None if srps.get("nginx") is None else 0.95 * srps["nginx"], float.__ge__))),
        ("3. /sleep p99 ≤ 1.5× nginx's", ratio(sp99[sc], sp99.get("nginx")) + "×", "≤ 1.5×",
         met(cmp(sp99[sc], None if sp99.get("nginx") is None else 1.5 * sp99["nginx"], float.__le__))),
        ("4. added p99 at the fixed rate ≤ 1 ms", (f"{statistics.mean(add):.2f} ms ("
         + ", ".join(f"{a:.2f}" for a in add) + ")") if add else "—", "≤ 1 ms",
         met(statistics.mean(add) <= 1.0 if add else None)),
    ]
    return ["\n## Issue 7 targets, this run\n", f"Target measured: **{sc}**.\n",
            "| target | measured | goal | met |", "|---|---:|---:|---|"] + [
        f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]


def report(args, targets: list[str], stages: list[dict], results: list[dict], idle_rss: dict[str, float],
           versions: dict[str, str], elapsed: float, cmdline: str) -> str:
    names = [s["name"] for s in stages]
    L = ["# Throughput: the sidecar next to nginx, HAProxy, Traefik, Caddy and a direct connection\n",
         (f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `{cmdline}` in {elapsed:.0f} s: "
         f"{args.rounds} round(s); in each round every stage runs against every target in turn (order "
         f"rotated per round), {args.duration} s per measurement after a {args.warmup} s warm-up per target.\n"),
         *([f"**Note:** {args.note}\n"] if args.note else []),
         R.machine_note(versions) + "\n", R.versions_line(versions) + "\n",
         ("Targets: **direct** = straight at `bench/upstream.py` (aiohttp on uvloop, one process); **nginx** = "
         "1 worker, upstream keep-alive; **haproxy** = nbthread 1, upstream keep-alive; **traefik** / **caddy** "
         "= default settings (Go: GOMAXPROCS = all cores), logs at ERROR; **sidecar** = `python -m sidecar "
         "run` (uvloop, `logging.level: warning`) from the checkout named in Versions.\n"),
         ("Columns: **req/s**, **p50/p99**, **errors** (non-2xx + socket errors) from the load generator (the "
         "fixed-rate stage: from h2load's per-request log); **proxy CPU µs/req** = user+sys CPU of all the "
         "proxy's processes during the run ÷ requests served, the least noise-sensitive column; **RSS MB** = "
         "resident memory of the proxy's processes after the run (nginx, HAProxy: master + worker summed); "
         "**CPU %** in % of one core; **others %** = CPU used meanwhile by processes outside the benchmark "
         f"(⚠ when ≥ {WARN_OTHERS:.0f} %).\n")]
    for stage in stages:
        L += _stage_table(args, stage, targets, results)

    L += ["\n## Summary: ratios within this run\n",
          "Bold = ratio of the means over the rounds; in brackets per round. CPU µs/req pooled over rounds.\n",
          ("| stage | target | req/s | % of direct | % of nginx | p99 ms | proxy CPU µs/req | ÷ nginx | RSS MB "
          "(after warm-up → max) |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        for t in targets:
            rs, ng = _rows(results, t, name), pooled_us(_rows(results, "nginx", name))
            us = pooled_us(rs)
            rss = [r["rss_mb"] for r in rs if r["rss_mb"] is not None]
            L.append(f"| {name} | {t} | {fmt(_mean(rs, 'rps'))} | "
                     f"{ratio_cell(rs, _rows(results, 'direct', name), 'rps', 100, 0)} | "
                     f"{ratio_cell(rs, _rows(results, 'nginx', name), 'rps', 100, 0)} | "
                     f"{fmt(_mean(rs, 'p99'), 2)} | {fmt(us)} | {f'{us / ng:.2f}×' if us and ng else '—'} | "
                     f"{fmt(idle_rss.get(t), 1)} → {fmt(max(rss) if rss else None, 1)} |")
    if "fast" in names:
        L += _matrix("**Proxy CPU per request on /fast, row ÷ column** (bold: ratio of the means over the rounds; "
                     "per round in brackets):", targets,
                     lambda a, b: ratio_cell(_rows(results, a, "fast"), _rows(results, b, "fast"),
                                             "proxy_us"))
        L += _matrix("**req/s on /fast, row ÷ column:**", targets,
                     lambda a, b: ratio_cell(_rows(results, a, "fast"), _rows(results, b, "fast"), "rps"))
    if "sleep" in names:
        L += _matrix(f"**req/s on /sleep?ms={args.sleep_ms}, row ÷ column:**", targets,
                     lambda a, b: ratio_cell(_rows(results, a, "sleep"), _rows(results, b, "sleep"), "rps"))
        L += _matrix(f"**p99 on /sleep?ms={args.sleep_ms}, row ÷ column:**", targets,
                     lambda a, b: ratio_cell(_rows(results, a, "sleep"), _rows(results, b, "sleep"), "p99"))
    if "rate" in names and "direct" in targets:
        L += [(f"\n**Latency added at a fixed {args.rate} req/s** (p99 through the proxy − p99 direct, same "
              "round; per round in brackets):\n"), "| target | added p99 ms | added p50 ms |", "|---|---:|---:|"]
        for t in (t for t in targets if t in PROXIES):
            add = added_p99(results, t)
            d50 = {r["round"]: r["p50"] for r in _rows(results, "direct", "rate")}
            a50 = [r["p50"] - d50[r["round"]] for r in _rows(results, t, "rate") if r["round"] in d50]
            L.append(f"| {t} | {fmt(statistics.mean(add), 2) if add else '—'} ("
                     f"{', '.join(f'{a:.2f}' for a in add)}) | {fmt(statistics.mean(a50), 2) if a50 else '—'} |")
    sc = next((t for t in ("sidecar", "sidecar-accesslog") if t in targets), None)
    if sc and {"fast", "sleep", "rate"} <= set(names):
        L += _targets_table(targets, results, sc)
    L.append("\nThe sidecar is one Python process, so on a saturating endpoint (/fast) its req/s is capped by one "
             "core and its CPU per request sets the ceiling; on /sleep the upstream's 10 ms dominates and a proxy "
             "that keeps up sits near direct. `direct` is not a strict upper bound: behind a proxy the upstream "
             "receives requests over a few pooled connections and can spend less CPU per request. The Go peers "
             "may use both cores; nginx, HAProxy and the sidecar are configured for one.\n")
    L.append(f"Rerun: `{cmdline}` (see bench/README.md).\n")
    return "\n".join(L)
