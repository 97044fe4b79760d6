"""What every report says about its run: versions of everything measured, the machine, and
where the report and its raw numbers are written.  Used by every benchmark script."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import common as C
import peers

__all__ = ["CORE_KEYS", "VERSION_KEYS", "machine_note", "versions", "versions_line", "write_results"]


def versions() -> dict[str, str]:
    """Versions of everything measured, as the measured sidecar's python sees its libraries."""
    probe = ("import sys, aiohttp, sidecar\n"
             "try:\n import uvloop; uv = uvloop.__version__\nexcept ImportError:\n uv = 'not installed'\n"
             "print(sys.version.split()[0], aiohttp.__version__, uv, sidecar.__file__)")
    env = {**os.environ, "PYTHONPATH": C.SIDECAR["root"]}
    try:
        out = subprocess.run([C.SIDECAR["python"], "-c", probe], check=False, capture_output=True, text=True,
                             timeout=30, env=env, cwd=C.BENCH).stdout.split()
        py, aio, uv, where = out if len(out) == 4 else ("?", "?", "?", "?")
    except OSError:
        py = aio = uv = where = "?"
    if not where.startswith(C.SIDECAR["root"] + os.sep):  # the run measured some other copy
        where = f"; WARNING: it imports sidecar from {where}"
    else:
        where = ""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem_gb = int(f.readline().split()[1]) / 2**20
    return {
        "sidecar": f"{C.sidecar_revision()} ({C.SIDECAR['root']}{where})",
        "python": py,
        "aiohttp": aio,
        "uvloop": uv,
        "nginx": C.first_line(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "haproxy": C.first_line(["haproxy", "-v"]).split(" - ")[0].replace("HAProxy version ", ""),
        "traefik": C.first_line([peers.binary("traefik") or "traefik", "version"]).split()[-1],
        "caddy": C.first_line([peers.binary("caddy") or "caddy", "version"]).split()[0],
        "wrk": re.sub(r"\s*Copyright.*", "", C.first_line(["wrk", "-v"])).replace("wrk ", ""),
        "h2load": C.first_line(["h2load", "--version"]).replace("h2load ", ""),
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_gb:.0f} GiB",
    }


VERSION_KEYS = ("sidecar", "python", "aiohttp", "uvloop", "nginx", "haproxy", "traefik", "caddy", "wrk",
                "h2load", "kernel")
CORE_KEYS = ("sidecar", "python", "aiohttp", "uvloop", "kernel")  # a run with no peer and no load tool


def versions_line(v: dict[str, str], keys: tuple[str, ...] = VERSION_KEYS) -> str:
    return "Versions: " + ", ".join(f"{k} {v.get(k, '?')}" for k in keys)


def machine_note(v: dict[str, str]) -> str:
    return (f"> **Shared and noisy machine: read the ratios.** {v.get('cpus', '?')} shared cores ({v.get('cpu', '?')}, "
            f"{v.get('memory', '?')} RAM, Linux {v.get('kernel', '?')}), a VM shared with other work, which may run at the same "
            "time (see others % where reported); the load generator, the proxy and the upstream all compete for those cores on one "
            "loopback box. Absolute numbers mean little and move ±10–25 % between identical runs (and "
            "by up to 3x from day to day); only the **ratios between targets measured in the same run** "
            "are meaningful.")


def write_results(name: str, out: str, raw: dict[str, object], text: str, started: float) -> None:
    """Keep the raw numbers in results/raw/NAME.json and the report at OUT; print the report."""
    # Next to the report: results/raw/NAME.json for the kept results, OUT.json for any other OUT.
    in_results = os.path.dirname(os.path.abspath(out)) == C.RESULTS
    raw_path = os.path.join(C.RESULTS, "raw", f"{name}.json") if in_results else os.path.splitext(out)[0] + ".json"
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    with open(raw_path, "w") as f:
        json.dump(raw, f, indent=1)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    C.log(f"wrote {out} in {time.time() - started:.0f}s")
