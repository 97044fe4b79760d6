"""Helpers shared by the scripts in bench/: starting the upstream, nginx and the sidecar, process
hygiene, measuring CPU and memory, and reading connection and sidecar state.

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
import shutil
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


def finish_tmp(tmp: str, *, keep: bool, what: str = "configs and logs") -> None:
    """Remove a run's temp dir, or keep it (asked for, or the run failed) and say where."""
    if keep:
        log(f"{what} kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


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


def start_nginx(tmp: str, tag: str, upstream_port: int, worker_connections: int = 8192) -> tuple[Proc, int]:
    """nginx, 1 worker, keep-alive to the upstream; config, pid and logs in a private dir of `tmp`."""
    port = free_port()
    prefix = os.path.join(tmp, f"{tag}-nginx")
    os.makedirs(prefix, exist_ok=True)
    # As root, nginx would drop its worker to `nobody`; keep it as the current user instead.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    conf = render("nginx.conf.tmpl", os.path.join(prefix, "nginx.conf"),
                  {"USER": user, "PREFIX": prefix, "LISTEN_PORT": port, "UPSTREAM_PORT": upstream_port,
                   "WORKER_CONNECTIONS": worker_connections,
                   "RLIMIT_NOFILE": nofile_for(max(16384, worker_connections + 4096))})
    argv = ["nginx", "-p", prefix + "/", "-c", conf, "-e", os.path.join(prefix, "error.log")]
    p = Proc("nginx", argv, os.path.join(tmp, f"{tag}-nginx.log"))
    p.wait_ready(f"http://127.0.0.1:{port}/fast")
    return p, port


# Which checkout of the sidecar is measured: select_sidecar() (from --sidecar-root/--sidecar-python).
SIDECAR = {"root": os.path.dirname(BENCH), "python": PY}


def add_sidecar_args(ap) -> None:
    ap.add_argument("--sidecar-root", default=None, metavar="PATH",
                    help="checkout of the sidecar to measure (default: this repository); its "
                         "PATH/.venv/bin/python is used when it exists, else this python")
    ap.add_argument("--sidecar-python", default=None, metavar="PYTHON",
                    help="python that runs the sidecar (needs its dependencies installed)")


def select_sidecar(root: str | None, python: str | None) -> None:
    """Run `python -m sidecar` from ROOT (PYTHONPATH=ROOT wins over any installed copy)."""
    if root is not None:
        root = os.path.abspath(root)
        if not os.path.isfile(os.path.join(root, "sidecar", "__main__.py")):
            raise SystemExit(f"--sidecar-root {root}: no sidecar/__main__.py there")
        SIDECAR["root"] = root
        venv_py = os.path.join(root, ".venv", "bin", "python")
        SIDECAR["python"] = venv_py if python is None and os.access(venv_py, os.X_OK) else PY
    if python is not None:
        SIDECAR["python"] = python


def sidecar_revision() -> str:
    """`git describe` of the measured checkout (+ "dirty" when it has uncommitted changes)."""
    try:
        r = subprocess.run(["git", "-C", SIDECAR["root"], "describe", "--always", "--dirty"],
                           check=False, capture_output=True, text=True, timeout=10)
        rev = r.stdout.strip() or "?"
        br = subprocess.run(["git", "-C", SIDECAR["root"], "rev-parse", "--abbrev-ref", "HEAD"],
                            check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return "?"
    return f"{br} {rev}" if br else rev


def start_sidecar(tmp: str, tag: str, upstream_port: int, env: dict[str, str],
                  root: str | None = None) -> tuple[Proc, int, int]:
    """`python -m sidecar run` (not wrap mode, so it runs on uvloop) in front of the upstream.

    The code comes from ``root``, else SIDECAR["root"] (see select_sidecar)."""
    port, admin = free_port(), free_port()
    python = SIDECAR["python"]
    if root is not None:  # another checkout: its own venv, or an editable install elsewhere wins
        venv_py = os.path.join(root, ".venv", "bin", "python")
        python = venv_py if os.access(venv_py, os.X_OK) else python
    argv = [python, "-m", "sidecar", "run", "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{upstream_port}"]
    p = Proc(tag, argv, os.path.join(tmp, f"{tag}.log"),
             env={"PYTHONPATH": root or SIDECAR["root"], **env})
    p.wait_ready(f"http://127.0.0.1:{admin}/readyz", f"http://127.0.0.1:{port}/fast")
    return p, port, admin


# --- measuring -------------------------------------------------------------------------------

def _group_stats(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, /proc/PID/stat fields from field 3 on) of every live process in group `pgid`."""
    out = []
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
            out.append((int(d), fields))
    return out


def group_cpu_seconds(pgid: int) -> float:
    """user+sys CPU seconds of every live process in process group `pgid` (/proc/PID/stat): all
    of a server's processes (nginx/HAProxy master + worker; a Go server's threads are in its one
    process)."""
    return sum(int(f[11]) + int(f[12]) for _pid, f in _group_stats(pgid)) / CLK_TCK  # utime, stime


def group_rss_mb(pgid: int) -> float:
    """Resident memory (VmRSS) of every process in the group, summed, in MiB.  For nginx and
    HAProxy (master + worker) the sum counts their shared pages twice: an upper bound."""
    kb = 0
    for pid, _fields in _group_stats(pgid):
        try:
            with open(f"/proc/{pid}/status") as f:
                kb += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            continue
    return kb / 1024


def nofile_for(want: int) -> int:
    """`want` file descriptors, capped at this process's hard limit (a child cannot exceed it)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return want if hard == resource.RLIM_INFINITY else min(want, hard)


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (children inherit it); returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = nofile_for(want)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine_busy_seconds() -> float:
    """user+nice+system CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system = map(int, f.readline().split()[1:4])
    return (user + nice + system) / CLK_TCK


def first_line(argv: list[str]) -> str:
    """The first line a program prints (its version, say), or why there is none."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__})"
