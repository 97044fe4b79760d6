"""The app side of an HTTP/2 client connection: one connection to the app per client
connection (1:1), carrying the client's frames there and the app's frames back.

Nothing is parsed here: bytes from the app go to the client side (``AppPeer.from_app``),
which reads their frame headers.  Flow control stays end to end (SETTINGS and
WINDOW_UPDATE pass through), and memory is bounded by back-pressure both ways: while
the app's socket is over its write high-water mark, reading from the client pauses
(``AppPeer.app_writable``), and the client side does the same for the app.

Invariant: ``write`` is only called with whole frames, in the order the client side
decided; nothing is written after ``close``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from ..config import UpstreamConfig
from .reach import dial

__all__ = ("AppLink", "AppPeer")


class AppPeer(Protocol):
    """What the app side tells the client side."""

    def from_app(self, data: bytes) -> None: ...

    def app_lost(self, exc: BaseException | None) -> None: ...

    def app_writable(self, writable: bool) -> None: ...


class AppLink(asyncio.Protocol):
    """One HTTP/2 connection to the app (opened by ``open``), paired with ``peer``."""

    def __init__(self, peer: AppPeer) -> None:
        self._peer = peer
        self._transport: asyncio.Transport | None = None
        self._closed = False

    @classmethod
    async def open(cls, up: UpstreamConfig, peer: AppPeer) -> AppLink:
        """Dial the app within ``upstream.connect_timeout``; raises OSError or TimeoutError."""
        link = cls(peer)
        await dial(up, lambda: link)
        return link

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._peer.from_app(data)

    def eof_received(self) -> bool:
        return False  # the app ended its side: close ours too (connection_lost follows)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        if not self._closed:
            self._closed = True
            self._peer.app_lost(exc)

    def pause_writing(self) -> None:
        self._peer.app_writable(False)

    def resume_writing(self) -> None:
        self._peer.app_writable(True)

    # --- used by the client side ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def pause_reading(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def close(self) -> None:
        """Close after what is buffered has been sent; the peer is not called back."""
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
