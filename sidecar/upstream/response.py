"""What one exchange with the app learns (``Response``) and how it fails (``UpstreamError``)."""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ("NotHTTP", "Response", "UpstreamError", "closed_early", "peer_of")


class UpstreamError(Exception):
    """A failed exchange with the app; ``kind`` is ``connect``, ``timeout`` or ``reset``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class NotHTTP(UpstreamError):
    """The app's first bytes were not an HTTP response: the port speaks something else
    (Redis, Postgres, TLS...).  Counted as ``reset``; the 502 and the log say it in words."""

    def __init__(self, address: str) -> None:
        self.what = f"the app on {address} did not answer HTTP"
        super().__init__("reset", f"invalid response from the upstream: {self.what}")


def peer_of(transport: asyncio.Transport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer or "the upstream address")


def closed_early() -> UpstreamError:
    return UpstreamError("reset", "the upstream closed the connection before the response was complete")


class Response:
    """What one exchange learns from the app, filled in by the parser's callbacks."""

    __slots__ = ("ascii_head", "buffered", "chunks", "complete", "error", "head_bytes", "head_done",
                 "head_only", "headers", "interim", "keep_alive", "reason", "status",
                 "status_seen")

    def __init__(self, *, head_only: bool, complete: bool = False) -> None:
        self.head_only = head_only  # HEAD: the response ends with its head
        self.status = 0
        self.reason = ""
        self.status_seen = False  # a status line was read: the app speaks HTTP
        self.ascii_head = True  # false once the reason or a header value has a byte over 0x7f
        self.headers: list[tuple[str, str]] = []
        self.head_done = False
        self.head_bytes = 0  # bytes received before the final head was complete
        self.interim = False  # inside a 1xx response (between its head and its end)
        self.keep_alive = False
        self.complete = complete
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.error: UpstreamError | None = None

    def until_close(self) -> bool:
        """The body has no length of its own: it ends when the app closes the connection."""
        if self.status in (204, 304):
            return False
        length = coding = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == "content-length":
                length = True
            elif lname == "transfer-encoding":  # RFC 9112 6.3: only a final chunked frames it
                coding = value.rsplit(",", 1)[-1].strip().lower() == "chunked"
        return not length and not coding
