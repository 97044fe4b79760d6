"""``sidecar drain``: ask a running sidecar to drain and wait for the answer.

For an ``exec`` preStop hook in images without curl; standard library only, so
it starts fast and needs no event loop.  Three outcomes are told apart, each
with its own exit code in the CLI: the sidecar could not be reached (or refused),
it was reached but had not drained within ``--timeout``, or it drained.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any

__all__ = ("DrainFailed", "DrainPending", "admin_url", "request_drain")


class DrainFailed(Exception):
    """The sidecar could not be reached, refused, or drained with aborted requests."""


class DrainPending(Exception):
    """The sidecar was reached and is draining, but had not finished within the timeout."""


def admin_url(text: str) -> str:
    """The admin base URL from ``http://HOST:PORT``, ``HOST:PORT``, ``:PORT`` or ``PORT``
    (the forms ``sidecar run --admin`` takes, where a missing host means this machine).
    Raises ValueError saying what is expected."""
    value = text.strip()
    if "://" not in value:
        if value.isdigit() or value.startswith(":"):
            value = "127.0.0.1:" + value.lstrip(":")
        host, _, port = value.rpartition(":")
        if host in ("0.0.0.0", "[::]", "::"):  # a listen address: connect to this machine
            value = f"127.0.0.1:{port}"
        value = "http://" + value
    parts = urllib.parse.urlsplit(value)
    try:
        port_ok = parts.port is not None
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(f"expected a URL like http://127.0.0.1:9901 or HOST:PORT, got {text!r}")
    return value.rstrip("/")


def request_drain(admin: str, *, token: str | None, wait: bool, timeout: float) -> dict[str, Any]:
    """POST /drain; return the JSON summary, or raise DrainFailed / DrainPending saying why."""
    base = urllib.parse.urlsplit(admin)
    target = "/drain" + ("" if wait else "?wait=false")
    url = admin + target
    conn_class = http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(base.hostname or "127.0.0.1", base.port, timeout=timeout)
    try:
        try:
            conn.connect()
        except (OSError, TimeoutError) as exc:
            raise DrainFailed(f"cannot reach the sidecar at {url}: {_reason(exc)}") from None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            conn.request("POST", target, body=b"", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except TimeoutError:
            raise DrainPending(
                f"the sidecar at {admin} was reached and is draining, but had not finished "
                f"after {timeout:g}s{_progress(admin)}") from None
        except OSError as exc:
            raise DrainFailed(f"the sidecar at {url} dropped the request: {_reason(exc)}") from None
    finally:
        conn.close()
    if resp.status >= 400:
        detail = body.decode(errors="replace").strip()
        raise DrainFailed(f"{url} answered {resp.status}: {detail}")
    summary: dict[str, Any] = json.loads(body or b"{}")
    if wait and summary.get("aborted"):
        raise DrainFailed(f"drained with {summary['aborted']} aborted request(s): {json.dumps(summary)}")
    return summary


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out connecting"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _progress(admin: str) -> str:
    """``(state closing, 2 in flight)`` from /status, best effort and quick."""
    base = urllib.parse.urlsplit(admin)
    try:
        conn = http.client.HTTPConnection(base.hostname or "127.0.0.1", base.port, timeout=1.0)
        conn.request("GET", "/status")
        status = json.loads(conn.getresponse().read())
        conn.close()
    except (OSError, ValueError):
        return ""
    return f" (state {status.get('state')}, {status.get('in_flight')} in flight)"
