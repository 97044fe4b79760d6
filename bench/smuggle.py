#!/usr/bin/env python3
"""The long smuggling fuzz: the invariant of tests/test_smuggling.py over many more cases.

Runs the seeds (issue 12's shapes, the classic desyncs, every defparam/smuggler
mutation with its CL.TE and TE.CL probes), then hypothesis cases (random seed, no
shrinking) for --minutes, through ``sidecar run`` to the llhttp recorder app
(tests/apps/recorder.py), and checks the invariant of tests/smuggle.py on each.
With --nginx the seeds and the first --nginx-cases hypothesis cases also go through
nginx (proxy_http_version 1.1, keep-alive upstream) to the same recorder; cases where
the two differ (what the client got, what the app parsed) are listed.

Writes bench/results/smuggle.md: cases tried, invariant violations (each with its
bytes), and the nginx differences.  Exit status 1 if any violation.

  .venv/bin/python bench/smuggle.py --minutes 10 --nginx
  .venv/bin/python bench/smuggle.py --minutes 1 --out /tmp/smuggle.md
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, settings

from tests.smuggle import Case, parse_stream
from tests.smuggle_cases import CASES, case_strategy
from tests.smuggle_rig import AppThread, SidecarRig, free_port, run_case, send

NGINX_CONF = """daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_header_timeout 1s;
    client_body_timeout 1s;
    keepalive_timeout 1s;
    upstream app {{ server 127.0.0.1:{app}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_read_timeout 1s;
        }}
    }}
}}
"""


class _TimeUp(Exception):
    pass


class NginxRig:
    """nginx in front of its own recorder app."""

    def __init__(self, tmp: Path, free_port: int) -> None:
        self.app = AppThread()
        self.port = free_port
        prefix = tmp / "nginx"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, app=self.app.port, port=self.port))
        self.proc = subprocess.Popen(["nginx", "-p", f"{prefix}/", "-c", str(conf), "-e",
                                      str(prefix / "error.log")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                send(self.port, b"GET /ready HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def run(self, case: Case) -> list[str]:
        return run_case(case, port=self.port, app=self.app, log=None, in_flight=None, timeout=5)

    def outcome(self, case: Case) -> tuple[list[int], int]:
        return _outcome(self.port, self.app, case)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.app.close()


def _outcome(port: int, app: AppThread, case: Case) -> tuple[list[int], int]:
    """What the client got (statuses) and how many requests the app parsed."""
    app.script(case)
    app.snapshot()
    received, _ = send(port, case.client, timeout=5)
    statuses = [m.status for m in parse_stream(received, request=False)[0] if m.status >= 200]
    return statuses, len(app.snapshot()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--nginx", action="store_true", help="also run the seeds through nginx and compare")
    ap.add_argument("--nginx-cases", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "smuggle.md"))
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the processes
    tmp = Path(tempfile.mkdtemp(prefix="smuggle-"))
    rig = SidecarRig(tmp, root=ROOT)
    violations: list[tuple[Case, list[str]]] = []
    kinds: Counter[str] = Counter()
    app_requests = 0
    started = time.monotonic()
    tried = 0

    def one(case: Case) -> None:
        nonlocal tried, app_requests
        tried += 1
        kinds[case.name.split("-")[0] + ("-" + case.name.split("-")[1] if case.name.startswith("fuzz") else "")] += 1
        problems = rig.run(case)
        app_requests += len(rig.app.snapshot()[0])
        if problems:
            violations.append((case, problems))
            print(f"VIOLATION {case!r}: {problems}", flush=True)

    nginx_diffs: list[str] = []
    extra: list[Case] = []
    nginx_violations: list[tuple[Case, list[str]]] = []
    ngx = None
    try:
        for case in CASES:
            one(case)
        seeds_done = tried
        deadline = started + args.minutes * 60

        @settings(max_examples=10**9, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=case_strategy())
        def fuzz(case: Case) -> None:
            if time.monotonic() > deadline:
                raise _TimeUp
            one(case)
            if len(extra) < args.nginx_cases:
                extra.append(case)
            if tried % 500 == 0:
                print(f"{tried} cases, {len(violations)} violations, "
                      f"{time.monotonic() - started:.0f}s", flush=True)

        try:
            fuzz()
        except _TimeUp:
            pass
        elapsed = time.monotonic() - started
        errors = rig.errors_logged()

        if args.nginx:
            ngx = NginxRig(tmp, free_port())
            for case in CASES + extra:
                mine = _outcome(rig.port, rig.app, case)
                theirs = ngx.outcome(case)
                if mine != theirs:
                    nginx_diffs.append(f"| {case.name} | `{case.client[:90]!r}`{' reply `' + repr(case.reply[:60]) + '`' if case.reply else ''} "
                                       f"| {mine[0]} / app {mine[1]} | {theirs[0]} / app {theirs[1]} |")
                if problems := ngx.run(case):
                    nginx_violations.append((case, problems))
    finally:
        rig.close()
        if ngx is not None:
            ngx.close()

    lines = [
        "# Smuggling fuzz (bench/smuggle.py)",
        "",
        (f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed / 60:.1f} min wall time, "
         f"python {sys.version.split()[0]}, {os.cpu_count()} shared cores."),
        "",
        "| figure | value |",
        "|---|---|",
        f"| cases tried | {tried} |",
        f"| of which seeds (issue 12 shapes, classic desyncs, defparam/smuggler probes) | {seeds_done} |",
        f"| of which hypothesis cases (request side / answer side) | {kinds['fuzz-request']} / {kinds['fuzz-answer']} |",
        f"| requests the app parsed (all checked against the client's framing and the access log) | {app_requests} |",
        f"| **invariant violations** | **{len(violations)}** |",
        f"| error or traceback lines in the sidecar's log | {len(errors)} |",
        "",
        "The invariant (tests/smuggle.py): the requests the app parsed (llhttp, strict) are, in order,",
        "requests a strict llhttp reads in the client's bytes, byte for byte, and each is in the sidecar's",
        "access log; every answer the client reads is the app's answer to that request (end-to-end headers,",
        "status, body), the sidecar's own 4xx/5xx, or a cut with a prefix of the body; nothing after it.",
    ]
    for case, problems in violations[:20]:
        lines += ["", f"- `{case!r}`", *[f"  - {p}" for p in problems]]
    if args.nginx:
        lines += ["", "## nginx on the same inputs", "",
                  (f"{len(CASES)} seeds and {len(extra)} hypothesis cases through nginx (proxy_http_version "
                   f"1.1, keep-alive upstream) to the same recorder: {len(nginx_diffs)} differ from the sidecar "
                   "in what the client got or how many requests the app parsed; nginx breaks the invariant "
                   f"(without its access-log part) in {len(nginx_violations)}. Which is right, and why: "
                   "tests/test_smuggling.py's docstring."), "",
                  "| case | client bytes | sidecar: statuses / app parsed | nginx: statuses / app parsed |",
                  "|---|---|---|---|", *nginx_diffs[:40]]
        if len(nginx_diffs) > 40:
            lines.append(f"| ... {len(nginx_diffs) - 40} more | | | |")
        lines += ["", ("nginx's invariant violations (what the app or the client got that the strict reading "
                       "of the bytes does not give):")]
        for case, problems in nginx_violations[:25]:
            reply = f" reply `{case.reply[:70]!r}`" if case.reply else ""
            lines += [f"- {case.name}: `{case.client[:100]!r}`{reply}", *[f"  - {p[:300]}" for p in problems]]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:16]))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
