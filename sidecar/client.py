"""``sidecar drain``: ask a running sidecar to drain and wait for the answer.

For an ``exec`` preStop hook in images without curl; standard library only, so
it starts fast and needs no event loop.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ("DrainFailed", "request_drain")


class DrainFailed(Exception):
    """The sidecar could not be reached, refused, or drained with aborted requests."""


def request_drain(admin: str, *, token: str | None, wait: bool, timeout: float) -> dict[str, Any]:
    """POST /drain; return the JSON summary, or raise DrainFailed saying why."""
    url = admin.rstrip("/") + "/drain" + ("" if wait else "?wait=false")
    req = urllib.request.Request(url, method="POST", data=b"")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            summary: dict[str, Any] = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        raise DrainFailed(f"{url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DrainFailed(f"cannot reach the sidecar at {url}: {reason}") from None
    if wait and summary.get("aborted"):
        raise DrainFailed(f"drained with {summary['aborted']} aborted request(s): {json.dumps(summary)}")
    return summary
