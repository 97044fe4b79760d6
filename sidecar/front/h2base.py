"""The state of one HTTP/2 client connection, its writes, its end, its timers, and the
drain as that connection lives it (``front/h2.py`` tells the whole story).

Writes: frames for the client collect in ``_cq`` and frames for the app in ``_aq``;
``_flush`` writes each list at once, at the end of every turn that produced frames.
Frames of the sidecar's own for the client wait in ``_early`` until the server
preface (the app's SETTINGS) has gone out: a server's first frame must be SETTINGS.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import NoReturn

import hpack

from ..upstream.h2 import AppLink
from . import h2wire as w
from .h2hub import CLIENT_CLOSED, H2Hub, H2Stream

__all__ = ("H2Base", "Stop")

logger = logging.getLogger("sidecar")

PING_ACK_WAIT = 1.0  # seconds the final GOAWAY waits for the ACK of the drain's PING
OPAQUE = b"sidecar\x00"  # the drain PING's payload, told apart from the app's PINGs
LINGER = 1.0  # seconds a connection the sidecar ends keeps reading, so its last frames arrive


class Stop(Exception):
    """The connection failed while reading a frame: stop reading this batch."""


class Block:
    """A header block being received over HEADERS + CONTINUATION frames."""

    __slots__ = ("flags", "fragments", "frames", "sid", "size")

    def __init__(self, sid: int, flags: int, frame: bytes, fragment: bytes) -> None:
        self.sid, self.flags = sid, flags
        self.frames, self.fragments = [frame], [fragment]
        self.size = len(fragment)


class H2Base(asyncio.Protocol):
    def __init__(self, hub: H2Hub, peer: str | None) -> None:
        self._hub = hub
        self.peer = peer
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._app: AppLink | None = None
        self._local = False  # the app could not be reached: the sidecar answers every stream
        self._closed = False
        self._ending = False  # close once what is written has gone out
        self._cq: list[bytes] = []  # for the client, this turn
        self._aq: list[bytes] = [w.PREFACE]  # for the app (held until it is connected)
        self._replaced: list[bytes] = []  # what replaces a frame that does not pass unchanged
        self._early: list[bytes] = []  # our frames for the client before the server preface
        self._cbuf = self._abuf = b""  # a partial frame from each side
        self._greeted = False  # the client's SETTINGS (end of its preface) came
        self._served = False  # the server preface (the app's SETTINGS) went out
        self._streams: dict[int, H2Stream] = {}
        self._highest = 0  # highest stream id the client opened
        self._processed = 0  # highest stream id forwarded to the app
        self._dropped: dict[int, None] = {}  # open streams the app never saw
        self._resets: deque[int] = deque(maxlen=256)  # recently reset (late frames are fine)
        self._cblock: Block | None = None
        self._ablock: Block | None = None
        self._req = w.HeaderMirror(max_list_size=w.MAX_LIST)
        self._resp = w.HeaderMirror(max_list_size=1 << 24)  # the app is trusted
        self._reencoder: hpack.Encoder | None = None
        self._app_max_frame = 16384  # the app's SETTINGS_MAX_FRAME_SIZE
        self._window = 65535  # the app's connection send window (credit from the client)
        self._goaway_last = w.MAX_STREAM_ID  # lowest last-stream-id the client was told
        self._app_goaway: int | None = None
        self._draining = self._admission_stopped = self._final = self._ping_acked = False
        self._drain_at_first_stream = False  # made while draining: told once a stream is in
        self._limits = w.Limits()
        self._timer: asyncio.TimerHandle | None = None  # preface, idle, or final GOAWAY
        self._idle_since = self._loop.time()
        self._dial: asyncio.Future[None] | None = None
        self._local_answered = False  # some stream got the 502 of an unreachable app

    # --- writing -----------------------------------------------------------------------------

    def _to_client(self, frame: bytes) -> None:
        """A frame of the sidecar's own for the client (whole frames only: never inside
        a header block, since blocks are sent whole)."""
        (self._cq if self._served else self._early).append(frame)

    def _flush(self) -> None:
        if self._closed:  # ended (its last frames went out before) or aborted
            self._cq.clear()
            self._aq.clear()
            return
        if self._cq and self._transport is not None:
            self._transport.write(b"".join(self._cq) if len(self._cq) > 1 else self._cq[0])
        self._cq.clear()
        if self._aq and self._app is not None:
            self._app.write(b"".join(self._aq) if len(self._aq) > 1 else self._aq[0])
            self._aq.clear()
        elif self._local:
            self._aq.clear()
        if self._ending and self._transport is not None and not self._closed:
            self._ending = False
            self._closed = True
            transport = self._transport
            if transport.can_write_eof():
                transport.write_eof()  # the client reads what was sent, then EOF
            self._loop.call_later(LINGER, transport.abort)  # if the client does not close
            if self._app is not None:
                self._app.close()

    def _served_now(self) -> None:
        """The server preface went out: our frames held until now follow it."""
        self._served = True
        self._cq.extend(self._early)
        self._early.clear()

    # --- a stream ends ---------------------------------------------------------------------

    def _end(self, stream: H2Stream, status: int) -> None:
        if self._streams.pop(stream.sid, None) is None:
            return
        if stream.timer is not None:
            stream.timer.cancel()
        self._hub.finish(stream, status)
        if not self._streams:
            self._idle_since = self._loop.time()
            self._end_if_done()

    def _end_if_done(self) -> None:
        """After a final GOAWAY (ours or the app's), the last stream ends the connection."""
        final = self._final or (self._app_goaway is not None
                                and self._app_goaway < w.MAX_STREAM_ID)
        if final and not self._streams:
            self._ending = True

    def _goaway(self, last: int, code: int = w.NO_ERROR, debug: bytes = b"") -> None:
        self._goaway_last = min(last, self._goaway_last)
        self._to_client(w.goaway(self._goaway_last, code, debug))

    def _fail(self, code: int, reason: str) -> NoReturn:
        """A connection error caused by the client: GOAWAY with its code, then the end."""
        logger.info("bad request", extra={"fields": {
            "client": self.peer, "protocol": "h2", "error_code": code, "reason": reason}})
        self._goaway(self._processed, code, reason.encode()[:200])
        if not self._served:  # no server preface yet: ours first
            self._cq.append(w.settings())
            self._served_now()
        self._ending = True
        if self._app is not None:
            self._app.abort()  # the app cancels every stream of this connection
        for stream in list(self._streams.values()):
            self._end(stream, stream.status or CLIENT_CLOSED)
        self._flush()
        raise Stop(reason)

    def abort(self) -> None:
        """The sidecar is exiting: cut both sides now."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        if self._app is not None:
            self._app.abort()

    # --- timers ------------------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _preface_timeout(self) -> None:
        """``client.header_timeout``: the preface must end (the client's SETTINGS) by then."""
        self._timer = None
        if not self._greeted and not self._closed:
            logger.info("request head timeout", extra={"fields": {
                "client": self.peer, "protocol": "h2",
                "header_timeout": self._hub.config.client.header_timeout}})
            self.abort()

    def _idle_check(self) -> None:
        """``client.idle_timeout``: a connection with no stream that long is closed with a
        GOAWAY naming its last stream (a gRPC client reconnects when it needs to)."""
        idle = self._hub.config.client.idle_timeout
        left = self._idle_since + idle - self._loop.time()
        if self._streams or left > 0:
            self._timer = self._loop.call_later(left if left > 0 else idle, self._idle_check)
            return
        self._timer = None
        self._goaway(self._processed)
        self._ending = True
        self._flush()

    # --- the drain ---------------------------------------------------------------------------

    def start_drain(self) -> None:
        """The trigger: GOAWAY(2^31-1) then a PING (RFC 9113 §6.8), so the client opens
        new streams elsewhere and, by the ACK, shows it has seen the GOAWAY."""
        self._tell_drain()
        self._flush()

    def _tell_drain(self) -> None:
        """``start_drain`` without the write (inside a turn that flushes at its end)."""
        self._drain_at_first_stream = False
        if self._draining or self._closed:
            return
        self._draining = True
        self._goaway(w.MAX_STREAM_ID)
        self._to_client(w.ping(OPAQUE))

    def stop_admission(self) -> None:
        """``closing``: new streams are refused from now on; the final GOAWAY goes out
        once the PING's ACK came (at once, usually: the PING went out ``drain.delay`` ago)."""
        if self._admission_stopped or self._closed:
            return
        self._admission_stopped = True
        self.start_drain()
        if self._ping_acked or self._local:
            self._send_final()
        else:
            self._cancel_timers()
            self._timer = self._loop.call_later(PING_ACK_WAIT, self._send_final)

    def _send_final(self) -> None:
        if self._final or self._closed:
            return
        self._final = True
        self._cancel_timers()
        self._goaway(self._processed)
        self._end_if_done()
        self._flush()

    def abort_stream(self, stream: H2Stream) -> None:
        """The drain deadline: RST_STREAM CANCEL to the client and the app."""
        self._to_client(w.rst(stream.sid, w.CANCEL))
        self._aq.append(w.rst(stream.sid, w.CANCEL))
        self._resets.append(stream.sid)
        self._end(stream, CLIENT_CLOSED)
        self._flush()

    def _timed_out(self, stream: H2Stream) -> None:
        """``upstream.timeout``: no response headers that long: 504, and the app's side
        of the stream is cancelled."""
        stream.timer = None
        if stream.status or self._closed:
            return
        self._hub.metrics.upstream_errors.labels("timeout").inc()
        logger.warning("upstream error", extra={"fields": {
            "kind": "timeout", "protocol": "h2", "path": stream.path,
            "error": f"no response headers within {self._hub.response_timeout}s"}})
        self._aq.append(w.rst(stream.sid, w.CANCEL))
        self._to_client(w.local_headers(stream.sid, 504))
        if not stream.client_ended:
            self._to_client(w.rst(stream.sid, w.NO_ERROR))
        self._resets.append(stream.sid)
        self._end(stream, 504)
        self._flush()
