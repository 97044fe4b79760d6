"""HAProxy as the load balancer in front of the "pods" of bench/rolling.py, driven at run time
through its admin socket: a replacement pod is put into a disabled slot and enabled once ready.

Started like every server of the bench (common.Proc: own session, stopped by its PID, config in
a private dir of the run's temp dir, 127.0.0.1 only), from bench/haproxy-lb.cfg.tmpl.  HAProxy as
a proxy measured against the sidecar (one upstream, no admin socket) is peers.start_haproxy.
"""
from __future__ import annotations

import csv
import io
import os
import socket
import time

import common as C

__all__ = ("Haproxy", "start_haproxy_lb")


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


def start_haproxy_lb(tmp: str, tag: str, check_path: str,
                     servers: dict[str, tuple[int, int] | None]) -> Haproxy:
    """HAProxy with one slot per entry of `servers`: name -> (port, check port), or None for a
    slot that starts disabled (filled later by Haproxy.put)."""
    port = C.free_port()
    prefix = os.path.join(tmp, f"{tag}-haproxy")
    os.makedirs(prefix, exist_ok=True)
    lines = []
    for name, ports in servers.items():
        p, chk = ports or (1, 1)
        lines.append(f"    server {name} 127.0.0.1:{p} check port {chk}" + ("" if ports else " disabled"))
    conf = C.render("haproxy-lb.cfg.tmpl", os.path.join(prefix, "haproxy.cfg"),
                    {"PREFIX": prefix, "LISTEN_PORT": port, "CHECK_PATH": check_path,
                     "SERVERS": "\n".join(lines)})
    proc = C.Proc(f"{tag}-haproxy", ["haproxy", "-W", "-db", "-f", conf],
                  os.path.join(tmp, f"{tag}-haproxy.log"))
    lb = Haproxy(proc, port, os.path.join(prefix, "admin.sock"))
    deadline = time.monotonic() + 10
    while not os.path.exists(lb.sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"haproxy did not start; see {proc.log_path}")
        time.sleep(0.05)
    return lb
