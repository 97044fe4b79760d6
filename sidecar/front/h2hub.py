"""The proxy's HTTP/2 client connections as a whole: where they are accepted, counted,
told about the drain, and where each stream is counted as a request.

A stream is a request (``H2Stream``, a ``Flight``): it enters the drain's in-flight set
when the client opens it and leaves it when both sides have ended it or either reset
it; then it is counted (``sidecar_requests_total`` with the response's ``:status``,
the duration histogram) and logged (the access line carries ``:path``, the gRPC method).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING

from ..config import Config
from ..drain import Drain, Flight
from ..log import log_access
from ..metrics import Metrics
from .h2wire import PREFACE

if TYPE_CHECKING:
    from .h2 import H2Connection

__all__ = ("CLIENT_CLOSED", "H2Hub", "H2Stream")

CLIENT_CLOSED = 499  # as on the HTTP/1.1 path: the client ended the stream before its answer

logger = logging.getLogger("sidecar")


class H2Stream(Flight):
    """One stream in flight.  ``status`` is the app's ``:status`` once its headers came."""

    __slots__ = ("app_ended", "client_ended", "conn", "sid", "status", "timer")

    def __init__(self, conn: H2Connection, sid: int, method: str, path: str,
                 started: float) -> None:
        super().__init__(method, path, started)
        self.conn = conn
        self.sid = sid
        self.status = 0
        self.client_ended = False
        self.app_ended = False
        self.timer: asyncio.TimerHandle | None = None

    def abort(self) -> None:
        """The drain deadline: RST_STREAM CANCEL to both sides (counted by the drain)."""
        self.conn.abort_stream(self)


class H2Hub:
    """Every open HTTP/2 client connection, and what they share: config, drain, metrics."""

    def __init__(self, config: Config, *, drain: Drain, metrics: Metrics,
                 factory: Callable[[H2Hub, str | None], H2Connection]) -> None:
        self.config = config
        self.drain = drain
        self.metrics = metrics
        self.access_log = config.logging.access_log
        self.response_timeout = config.upstream.timeout  # to the response headers; 0 = none
        self.retry_after = str(config.drain.retry_after)
        self._factory = factory
        self._conns: set[H2Connection] = set()

    def __len__(self) -> int:
        return len(self._conns)

    def accept(self, transport: asyncio.Transport, data: bytes, peer: str | None) -> None:
        """Take over a client connection that opened with the HTTP/2 preface; ``data`` is
        what was read so far (the preface first)."""
        conn = self._factory(self, peer)
        self._conns.add(conn)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.data_received(data[len(PREFACE):])  # the app gets the preface from the conn

    def forget(self, conn: H2Connection) -> None:
        self._conns.discard(conn)

    # --- the drain ----------------------------------------------------------------------------

    def draining(self) -> None:
        """The trigger: every connection gets GOAWAY(2^31-1) and a PING."""
        for conn in list(self._conns):
            conn.start_drain()

    def closing(self) -> None:
        """Admission stops: every connection gets its final GOAWAY (after its PING's ACK,
        or a short wait for it); new streams are refused from now on."""
        for conn in list(self._conns):
            conn.stop_admission()

    def close(self) -> None:
        for conn in list(self._conns):
            conn.abort()

    # --- counting a stream --------------------------------------------------------------------

    def start(self, conn: H2Connection, sid: int, method: bytes, path: bytes) -> H2Stream:
        stream = H2Stream(conn, sid, method.decode("latin-1"), path.decode("latin-1"), monotonic())
        self.drain.add(stream)
        return stream

    def finish(self, stream: H2Stream, status: int) -> None:
        """The stream ended (or was aborted at the deadline: the drain counted that)."""
        self.drain.done(stream)
        elapsed = monotonic() - stream.started
        self.metrics.request_done(stream.method, status, elapsed)
        if self.access_log:
            log_access(stream.method, stream.path, status, elapsed, stream.conn.peer)

    def refused(self, method: bytes, path: bytes, peer: str | None, *, draining: bool) -> None:
        """A stream answered without the app: REFUSED_STREAM while draining, 503 while
        starting; counted as on HTTP/1.1 (rejected, and answered 503)."""
        if draining:
            self.metrics.rejected_draining.inc()
            self.drain.rejected()
        else:
            self.metrics.rejected_starting.inc()
        self.metrics.request_done(method.decode("latin-1"), 503, 0.0)
        if self.access_log:
            log_access(method.decode("latin-1"), path.decode("latin-1"), 503, 0.0, peer)

    def answered(self, method: bytes, path: bytes, peer: str | None, status: int) -> None:
        """A stream the sidecar answered itself (502: the app is not there)."""
        self.metrics.request_done(method.decode("latin-1"), status, 0.0)
        if self.access_log:
            log_access(method.decode("latin-1"), path.decode("latin-1"), status, 0.0, peer)
