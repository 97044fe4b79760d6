"""One HTTP/2 client connection, passed through to its own app connection frame by frame.

Frames pass both ways unchanged, read by their 9-byte headers only (SETTINGS, WINDOW_UPDATE,
PING and flow control stay end to end).  What the sidecar adds, and why:

- Every header block is decoded by a mirror of the receiver's HPACK decoder
  (``HeaderMirror``): ``:method``/``:path`` and ``:status`` for metrics and the access
  log, and the client's table as the app sees it.  A block the sidecar drops (a refused
  stream) would leave the app's table behind if it changed the table: from then on the
  client's blocks are re-encoded towards the app with our own ``hpack.Encoder``.
- The drain (RFC 9113 §6.8; the sequence on the wire is in docs/http2.md): GOAWAY(2^31-1)
  and a PING at the trigger (a connection made while draining: after its first stream), a
  final GOAWAY at ``closing``, REFUSED_STREAM after it, CANCEL both ways at the deadline.
  Our PING's ACK is not forwarded; the app's PINGs and GOAWAYs pass through.
- Frames of its own (RST_STREAM, GOAWAY, PING, local 502/503/504) go only between whole
  frames: a block split over CONTINUATION frames is held until its last (RFC 9113 §6.10).
- Hostile input ends the connection with a GOAWAY naming the error (``limits``).

Invariants: bytes reach each side in the order they were read; a frame is forwarded whole or
not at all; what one turn writes goes out in one ``write`` per side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import hpack

from . import h2wire as w
from .h2app import AppSide
from .h2base import OPAQUE, Block, Stop
from .h2hub import CLIENT_CLOSED, H2Stream

__all__ = ("H2Connection",)

MAX_STREAMS = 1000  # open streams per connection; more are refused (REFUSED_STREAM)


class H2Connection(AppSide):
    """The client side of one h2c connection and its app link (see the module docstring)."""

    # --- asyncio.Protocol: the client ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._timer = self._loop.call_later(self._hub.config.client.header_timeout,
                                            self._preface_timeout)
        self._dial = asyncio.ensure_future(self._open_app())
        drain = self._hub.drain
        if not drain.admitting:
            self.stop_admission()
        elif drain.triggered:
            # Made while draining (a client whose endpoints still list this pod): served, and
            # told once its first stream is forwarded, as HTTP/1.1 answers it Connection:
            # close. Told at once, it would never be used: gRPC clients send their first call
            # only after the server's SETTINGS, and a GOAWAY read with them sends every call
            # to yet another connection to this pod, told the same, until closing.
            self._drain_at_first_stream = True

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._cbuf:
            data, self._cbuf = self._cbuf + data, b""
        try:
            self._client_frames(data)
        except Stop:
            pass
        if self._local:
            self._end_local()
        self._flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._cancel_timers()
        if self._dial is not None:
            self._dial.cancel()
        for stream in list(self._streams.values()):
            self._end(stream, stream.status or CLIENT_CLOSED)
        if self._app is not None:
            self._app.close()  # the app sees the connection end and cancels its streams
        self._hub.forget(self)

    def pause_writing(self) -> None:  # the client reads slowly: stop reading the app
        if self._app is not None:
            self._app.pause_reading()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_reading()

    # --- frames from the client ----------------------------------------------------------------

    def _client_frames(self, data: bytes) -> None:
        pos, end, start = 0, len(data), 0  # data[start:pos] passes through unchanged
        aq, streams = self._aq, self._streams
        while end - pos >= 9:
            length, ftype, flags, sid = w.unpack_header(data, pos)
            if length > self._app_max_frame:  # checked before the body is buffered
                self._fail(w.FRAME_SIZE_ERROR, f"a {length}-byte frame, over the "
                           f"SETTINGS_MAX_FRAME_SIZE of {self._app_max_frame}")
            stop = pos + 9 + length
            if stop > end:
                break
            if ftype == w.DATA and self._cblock is None and self._greeted:
                if self._dropped and sid in self._dropped:  # its stream never reached the app
                    aq.append(data[start:pos])
                    self._drop_data(sid, flags, length)
                    start = stop
                elif flags & w.END_STREAM and (stream := streams.get(sid)) is not None:
                    self._client_ended(stream)
            elif not self._client_frame(data, pos, stop, ftype, flags, sid):
                aq.append(data[start:pos])  # the run before it, then what replaced it
                aq.extend(self._replaced)
                self._replaced.clear()
                start = stop
            pos = stop
        if start == 0 and pos == end:
            aq.append(data)
        elif start < pos:
            aq.append(data[start:pos])
        if pos < end:
            self._cbuf = data[pos:]

    def _client_frame(self, data: bytes, pos: int, stop: int, ftype: int, flags: int,
                      sid: int) -> bool:
        """Any frame but DATA; False if it does not pass unchanged (``_replaced`` holds
        what goes instead, if anything)."""
        frame = data[pos:stop]
        if not self._greeted:
            if ftype != w.SETTINGS or flags & w.ACK:
                self._fail(w.PROTOCOL_ERROR, "the client preface must end with SETTINGS")
            self._greeted = True
            self._cancel_timers()  # the preface's deadline
            self._timer = self._loop.call_later(self._hub.config.client.idle_timeout,
                                                self._idle_check)
        if self._cblock is not None:
            self._continuation(frame, ftype, flags, sid)
            return False
        if ftype == w.HEADERS:
            fragment = w.fragment(frame, flags)
            if flags & w.END_HEADERS:
                self._client_block(sid, flags, [frame], fragment)
            else:
                self._cblock = Block(sid, flags, frame, fragment)
                self._limits.check_block(self._cblock.size, 1, self._fail)
            return False
        if ftype == w.CONTINUATION:
            self._fail(w.PROTOCOL_ERROR, "CONTINUATION without a header block")
        if self._dropped and sid in self._dropped:  # WINDOW_UPDATE, RST_STREAM of a refused stream
            if ftype == w.RST_STREAM:
                del self._dropped[sid]
            return ftype == w.PRIORITY
        if ftype == w.RST_STREAM:
            self._limits.check_reset(self._fail)
            if (stream := self._streams.get(sid)) is not None:
                self._resets.append(sid)
                self._end(stream, stream.status or CLIENT_CLOSED)
        elif ftype == w.WINDOW_UPDATE and sid == 0:
            self._window += w.parse_window(frame)
            if self._window > w.MAX_STREAM_ID:  # RFC 9113 §6.9.1 (streams' are the app's to check)
                self._fail(w.FLOW_CONTROL_ERROR, "WINDOW_UPDATE overflows the connection window")
        elif ftype == w.SETTINGS and not flags & w.ACK:
            self._limits.check_control(self._fail)
            table = w.parse_settings(frame).get(w.HEADER_TABLE_SIZE)
            if table is not None:
                self._resp.allow_table_size(table)
            if self._local:  # the sidecar is the server: it acknowledges
                self._to_client(w.settings(ack=True))
        elif ftype == w.PING:
            if not flags & w.ACK:
                self._limits.check_control(self._fail)
                if self._local:
                    self._to_client(w.ping(frame[9:], ack=True))
            elif frame[9:] == OPAQUE:  # the ACK of the drain's PING: ours, not the app's
                self._ping_acked = True
                if self._admission_stopped:
                    self._send_final()
                return False
        return True

    def _continuation(self, frame: bytes, ftype: int, flags: int, sid: int) -> None:
        block = self._cblock
        assert block is not None
        if ftype != w.CONTINUATION or sid != block.sid:  # RFC 9113 §6.10
            self._fail(w.PROTOCOL_ERROR, "a frame inside a header block")
        block.frames.append(frame)
        block.fragments.append(frame[9:])
        block.size += len(frame) - 9
        self._limits.check_block(block.size, len(block.frames), self._fail)
        if flags & w.END_HEADERS:
            self._cblock = None
            self._client_block(sid, block.flags, block.frames, b"".join(block.fragments))

    def _client_block(self, sid: int, flags: int, frames: list[bytes], block: bytes) -> None:
        """A complete header block from the client: a new stream, trailers, or neither."""
        try:
            fields, changed = self._req.decode(block)
        except hpack.OversizedHeaderListError:
            self._fail(w.ENHANCE_YOUR_CALM, f"a header list over {w.MAX_LIST} bytes")
        except hpack.HPACKError as exc:
            self._fail(w.COMPRESSION_ERROR, f"an undecodable header block ({exc})")
        stream = self._streams.get(sid)
        if stream is not None:  # trailers
            self._to_app(frames, fields, flags)
            if flags & w.END_STREAM:
                self._client_ended(stream)
        elif sid > self._highest and sid & 1:
            self._highest = sid
            self._new_stream(sid, flags, frames, fields, changed)
        elif sid in self._dropped:
            self._drop_stream(sid, flags, changed)
        elif sid in self._resets:  # trailers crossing a reset: the app ignores them
            self._to_app(frames, fields, flags)
        else:
            self._fail(w.PROTOCOL_ERROR, f"HEADERS on stream {sid}, which is not a new stream")

    def _new_stream(self, sid: int, flags: int, frames: list[bytes],
                    fields: Sequence[tuple[bytes, bytes]], changed: bool) -> None:
        hub, drain = self._hub, self._hub.drain
        method, path = _request_line(fields)
        if self._app_goaway is not None and sid > self._app_goaway:
            self._to_app(frames, fields, flags)  # the app ignores it; the client retries it
            return
        if not drain.forwarding or self._final:
            if drain.triggered:
                self._to_client(w.rst(sid, w.REFUSED_STREAM))
            else:
                self._answer(sid, 503, bool(flags & w.END_STREAM), (("retry-after", hub.retry_after),))
            hub.refused(method, path, self.peer, draining=drain.triggered)
            self._drop_stream(sid, flags, changed)
            return
        if self._local:  # the app is not there
            self._answer(sid, 502, bool(flags & w.END_STREAM))
            hub.answered(method, path, self.peer, 502)
            self._drop_stream(sid, flags | w.END_STREAM, changed)
            self._local_answered = True
            return
        if len(self._streams) >= MAX_STREAMS:
            self._to_client(w.rst(sid, w.REFUSED_STREAM))
            self._drop_stream(sid, flags, changed)
            return
        stream = hub.start(self, sid, method, path)
        self._streams[sid] = stream
        self._processed = sid
        if flags & w.END_STREAM:
            self._client_ended(stream)
        self._to_app(frames, fields, flags)
        if self._drain_at_first_stream:
            self._tell_drain()  # its GOAWAY follows this turn's frames (data_received flushes)

    def _client_ended(self, stream: H2Stream) -> None:
        """The client's side of the stream is complete: from now on the app has
        ``upstream.timeout`` to send its response headers (a long upload or a client
        stream is never cut by it)."""
        stream.client_ended = True
        if stream.app_ended:
            self._end(stream, stream.status)
        elif not stream.status and (timeout := self._hub.response_timeout):
            stream.timer = self._loop.call_later(timeout, self._timed_out, stream)

    def _drop_stream(self, sid: int, flags: int, changed: bool) -> None:
        """The app will never see this stream (nor its later frames)."""
        if not flags & w.END_STREAM:
            self._dropped[sid] = None
            if len(self._dropped) > MAX_STREAMS:
                del self._dropped[next(iter(self._dropped))]
        if changed and self._reencoder is None:
            # The app's HPACK table now lags the client's: re-encode from here on, from
            # the table size the app's decoder has.
            self._reencoder = hpack.Encoder()
            self._reencoder.header_table_size = self._req.size_before

    def _drop_data(self, sid: int, flags: int, length: int) -> None:
        if flags & w.END_STREAM:
            self._dropped.pop(sid, None)
        if length:  # the client spent its connection window on bytes the app never got
            self._to_client(w.window_update(0, length))

    def _to_app(self, frames: list[bytes], fields: Sequence[tuple[bytes, bytes]], flags: int) -> None:
        if self._reencoder is None:
            self._replaced.extend(frames)
        else:
            block = self._reencoder.encode(fields)
            self._replaced.extend(w.header_frames(frames[0], block, flags, self._app_max_frame))


def _request_line(fields: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """``:method`` and ``:path`` (pseudo-header fields come first, RFC 9113 §8.3)."""
    method = path = b""
    for name, value in fields:
        if name == b":method":
            method = value
        elif name == b":path":
            path = value
        elif not name.startswith(b":"):
            break
    return method, path
