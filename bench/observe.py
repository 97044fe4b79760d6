"""What a bench script reads about a running server without asking it: the connections to a
port and whether it listens (/proc/net/tcp), and the sidecar's own state changes from its JSON log.
Used by bench/timeline.py."""
from __future__ import annotations

import json
from datetime import datetime

__all__ = ["log_time", "sidecar_states", "tcp_state"]


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
    return datetime.fromisoformat(str(ts)).timestamp()  # "Z" is accepted from 3.11


def sidecar_states(log_path: str) -> list[tuple[float, str]]:
    """(Unix time, state) of every 'state ...' line in a sidecar's JSON log."""
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
