"""Helpers shared by the scripts in bench/ (throughput, drain, rolling, soak).

Adapted from our team's yardstick kit (shared/bench/benchlib.py), trimmed to what the
project's benchmarks need, so bench/ has no run-time dependency outside the project.

Process hygiene: every server is started with start_new_session=True, so its PID is also
the id of a process group holding only it and its own children (nginx workers).  Stopping
means a signal to that PID, then SIGKILL to that group if it does not exit in time; never
anything broader.  An atexit hook (and SIGTERM turned into KeyboardInterrupt) makes sure
nothing we started outlives the script.  Everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import atexit
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "results")
PY = sys.executable  # the venv's python: it has the project (and aiohttp, uvloop) installed
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    """A port the kernel considers free right now (other sessions may run tests on this box)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            r.read()
            return 200 <= r.status < 300
    except Exception:  # noqa: BLE001 - anything short of a 2xx means "not yet"
        return False


_STARTED: list[Proc] = []


class Proc:
    """A process we started, in its own session; stopped only through its own PID / group."""

    def __init__(self, name: str, argv: list[str], log_path: str, env: dict[str, str] | None = None):
        self.name, self.argv, self.log_path = name, argv, log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        # SIDECAR_* from the caller's shell would silently change what is measured: drop them.
        base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                  env={**base, **(env or {})}, start_new_session=True, cwd=BENCH)
        self.pid = self.p.pid
        _STARTED.append(self)

    def poll(self) -> int | None:
        return self.p.poll()

    def send_signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, sig)

    def wait_ready(self, *urls: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for url in urls:
            while not http_ok(url):
                if self.p.poll() is not None:
                    raise RuntimeError(f"{self.name} exited rc={self.p.returncode}; see {self.log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: {url} not ready after {timeout}s; see {self.log_path}")
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.p.poll() is None:
            try:
                os.kill(self.pid, sig)
                self.p.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) still running {timeout}s after {signal.Signals(sig).name}")
        self.kill_group()  # whatever is left of OUR group (nginx workers, ...)
        self._log.close()
        return self.p.returncode

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # pgid == pid: start_new_session=True
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _cleanup() -> None:
    for p in reversed(_STARTED):
        if p.poll() is None:
            log(f"cleanup: stopping {p.name} (pid {p.pid})")
            p.stop(signal.SIGTERM, 5)


atexit.register(_cleanup)


def sigterm_unwinds() -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so finally blocks and atexit run."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


# --- the servers -----------------------------------------------------------------------------

def render(template: str, out: str, values: dict[str, object]) -> str:
    """Copy bench/TEMPLATE to OUT with every {{KEY}} replaced; returns OUT."""
    with open(os.path.join(BENCH, template)) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    with open(out, "w") as f:
        f.write(text)
    return out


def start_upstream(tmp: str, tag: str, extra: list[str] | None = None) -> tuple[Proc, int]:
    """bench/upstream.py on a free port; `extra` are more of its flags (--ids-file, ...)."""
    port = free_port()
    p = Proc("upstream", [PY, os.path.join(BENCH, "upstream.py"), "--port", str(port), *(extra or [])],
             os.path.join(tmp, f"{tag}-upstream.log"))
    p.wait_ready(f"http://127.0.0.1:{port}/fast")
    return p, port


def start_nginx(tmp: str, tag: str, upstream_port: int) -> tuple[Proc, int]:
    """nginx, 1 worker, keep-alive to the upstream; config, pid and logs in a private dir of `tmp`."""
    port = free_port()
    prefix = os.path.join(tmp, f"{tag}-nginx")
    os.makedirs(prefix, exist_ok=True)
    # As root, nginx would drop its worker to `nobody`; keep it as the current user instead.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    conf = render("nginx.conf.tmpl", os.path.join(prefix, "nginx.conf"),
                  {"USER": user, "PREFIX": prefix, "LISTEN_PORT": port, "UPSTREAM_PORT": upstream_port})
    argv = ["nginx", "-p", prefix + "/", "-c", conf, "-e", os.path.join(prefix, "error.log")]
    p = Proc("nginx", argv, os.path.join(tmp, f"{tag}-nginx.log"))
    p.wait_ready(f"http://127.0.0.1:{port}/fast")
    return p, port


def start_sidecar(tmp: str, tag: str, upstream_port: int, env: dict[str, str]) -> tuple[Proc, int, int]:
    """`python -m sidecar run` (not wrap mode, so it runs on uvloop) in front of the upstream."""
    port, admin = free_port(), free_port()
    argv = [PY, "-m", "sidecar", "run", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
            "--upstream", f"http://127.0.0.1:{upstream_port}"]
    p = Proc(tag, argv, os.path.join(tmp, f"{tag}.log"), env=env)
    p.wait_ready(f"http://127.0.0.1:{admin}/readyz", f"http://127.0.0.1:{port}/fast")
    return p, port, admin


# --- measuring -------------------------------------------------------------------------------

def group_cpu_seconds(pgid: int) -> float:
    """user+sys CPU seconds of every live process in process group `pgid` (/proc/PID/stat)."""
    ticks = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
        if int(fields[2]) == pgid:                # field 5: pgrp
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """user+nice+system CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system = map(int, f.readline().split()[1:4])
    return (user + nice + system) / CLK_TCK


def tcp_state(port: int) -> tuple[int, bool]:
    """(established client connections to 127.0.0.1:port, whether port is listening), from
    /proc/net/tcp: the same view of any server, nginx or the sidecar, without asking it."""
    established, listening = 0, False
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                established += 1
            elif state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                listening = True
    return established, listening


def log_time(ts: object) -> float:
    """A JSON log line's `ts` as Unix time: epoch seconds, or an RFC 3339 string."""
    if isinstance(ts, (int, float)):
        return float(ts)
    from datetime import datetime

    return datetime.fromisoformat(str(ts)).timestamp()  # "Z" is accepted from 3.11


def sidecar_states(log_path: str) -> list[tuple[float, str]]:
    """(Unix time, state) of every 'state ...' line in a sidecar's JSON log."""
    import json

    out = []
    with open(log_path, errors="replace") as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and str(e.get("msg", "")).startswith("state ") and "state" in e:
                out.append((log_time(e["ts"]), str(e["state"])))
    return out


def first_line(argv: list[str]) -> str:
    """The first line a program prints (its version, say), or why there is none."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__})"


def versions() -> dict[str, str]:
    import aiohttp
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    try:
        from importlib.metadata import version
        sc = version("sidecar")
    except Exception:  # noqa: BLE001
        sc = "?"
    return {
        "sidecar": sc,
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "uvloop": uv,
        "nginx": first_line(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "wrk": re.sub(r"\s*Copyright.*", "", first_line(["wrk", "-v"])).replace("wrk ", ""),
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
    }


def versions_line(v: dict[str, str]) -> str:
    return "Versions: " + ", ".join(f"{k} {v[k]}" for k in
                                    ("sidecar", "python", "aiohttp", "uvloop", "nginx", "wrk", "kernel"))


def machine_note(v: dict[str, str]) -> str:
    return (f"> **Machine: {v['cpus']} shared cores** (a VM; other work was running on it at the same "
            "time), and the load generator, the proxy and the upstream all compete for them on one "
            "loopback box. Absolute numbers mean little and move ±10–25 % between identical runs; "
            "only the **ratios between targets measured in the same run** are meaningful.")


def write_results(name: str, out: str, raw: dict[str, object], text: str, started: float) -> None:
    """Keep the raw numbers in results/raw/NAME.json and the report at OUT; print the report."""
    import json

    os.makedirs(os.path.join(RESULTS, "raw"), exist_ok=True)
    with open(os.path.join(RESULTS, "raw", f"{name}.json"), "w") as f:
        json.dump(raw, f, indent=1)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    log(f"wrote {out} in {time.time() - started:.0f}s")
