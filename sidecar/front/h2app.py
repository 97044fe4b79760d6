"""What an HTTP/2 client connection does with its app connection: dial it, read the
app's frames (headers for ``:status``, SETTINGS, GOAWAY, RST_STREAM, ends of streams),
and answer streams itself when the app is not there or goes away.

The app is trusted to speak HTTP/2 (it is the pod's own server); what it sends passes
through unchanged, except a GOAWAY naming a higher stream than the client was already
told (lowered: RFC 9113 §6.8 forbids raising it).  An app that answers with something
that is not HTTP/2 (an HTTP/1.1 server) is an upstream error: 502 for every stream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NoReturn

import hpack
from hyperframe.frame import GoAwayFrame

from ..upstream.h2 import AppLink
from . import h2wire as w
from .h2base import Block, H2Base, Stop

__all__ = ("AppSide",)

logger = logging.getLogger("sidecar")

MAX_APP_BLOCK = 1 << 20  # bytes of one header block from the app
PUSH = 0x100  # marks a PUSH_PROMISE block (no stream of ours, no :status)
BAD_GATEWAY = 502


class AppSide(H2Base):
    async def _open_app(self) -> None:
        try:
            link = await AppLink.open(self._hub.config.upstream, self)
        except (OSError, TimeoutError) as exc:
            if not self._closed:
                self._unreachable(exc)
            return
        if self._closed:
            link.close()
            return
        self._app = link
        self._flush()

    # --- AppPeer -----------------------------------------------------------------------------

    def from_app(self, data: bytes) -> None:
        if self._closed:
            return
        if self._abuf:
            data, self._abuf = self._abuf + data, b""
        try:
            self._app_frames(data)
        except Stop:
            pass
        self._flush()

    def app_writable(self, writable: bool) -> None:
        """The app reads slowly: stop reading the client until it catches up."""
        if self._transport is not None and not self._closed:
            if writable:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def app_lost(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        if self._streams or self._app_goaway is None:
            self._upstream_error("reset", f"the app closed the connection ({exc or 'EOF'})")
        self._app_gone()
        self._flush()

    # --- the app's frames --------------------------------------------------------------------

    def _app_frames(self, data: bytes) -> None:
        pos, end, start = 0, len(data), 0  # data[start:pos] passes through unchanged
        cq, streams = self._cq, self._streams
        while end - pos >= 9:
            length, ftype, flags, sid = w.unpack_header(data, pos)
            if not self._served and (ftype != w.SETTINGS or length > 6 * 64):
                self._app_failed("the app does not speak HTTP/2 (h2c): no SETTINGS first")
            stop = pos + 9 + length
            if stop > end:
                break
            if ftype == w.DATA and self._ablock is None:
                self._window -= length
                if flags & w.END_STREAM and (stream := streams.get(sid)) is not None:
                    stream.app_ended = True
                    if stream.client_ended:
                        self._end(stream, stream.status)
            elif not self._app_frame(data[pos:stop], ftype, flags, sid):
                cq.append(data[start:pos])
                cq.extend(self._replaced)
                self._replaced.clear()
                start = stop
            pos = stop
        if start == 0 and pos == end:
            cq.append(data)
        elif start < pos:
            cq.append(data[start:pos])
        if pos < end:
            self._abuf = data[pos:]

    def _app_frame(self, frame: bytes, ftype: int, flags: int, sid: int) -> bool:
        """Any frame but DATA; False if it does not pass unchanged (see ``_replaced``)."""
        block = self._ablock
        if block is not None:
            if ftype != w.CONTINUATION or sid != block.sid:
                self._app_failed("a frame inside the app's header block")
            block.frames.append(frame)
            block.fragments.append(frame[9:])
            block.size += len(frame) - 9
            if block.size > MAX_APP_BLOCK:
                self._app_failed("a header block over 1 MiB from the app")
            if flags & w.END_HEADERS:
                self._ablock = None
                self._app_block(sid, block.flags, block.frames, b"".join(block.fragments))
            return False
        if ftype in (w.HEADERS, w.PUSH_PROMISE):
            push = PUSH if ftype == w.PUSH_PROMISE else 0
            fragment = w.fragment(frame, flags) if not push else w.push_fragment(frame)
            if flags & w.END_HEADERS:
                self._app_block(sid, flags | push, [frame], fragment)
            else:
                self._ablock = Block(sid, flags | push, frame, fragment)
            return False
        if ftype == w.RST_STREAM:
            if (stream := self._streams.get(sid)) is not None:
                self._resets.append(sid)
                self._end(stream, stream.status or BAD_GATEWAY)
        elif ftype == w.SETTINGS and not flags & w.ACK:
            values = w.parse_settings(frame)
            self._app_max_frame = values.get(w.MAX_FRAME_SIZE, self._app_max_frame)
            if (table := values.get(w.HEADER_TABLE_SIZE)) is not None:
                self._req.allow_table_size(table)
            if not self._served:  # the server preface: our held frames follow it
                self._replaced.append(frame)
                self._replaced.extend(self._early)
                self._early.clear()
                self._served = True
                return False
        elif ftype == w.GOAWAY:
            return self._app_goaway_frame(frame)
        elif ftype == w.CONTINUATION:
            self._app_failed("CONTINUATION without a header block from the app")
        return True

    def _app_block(self, sid: int, flags: int, frames: list[bytes], block: bytes) -> None:
        try:
            fields = self._resp.decode(block)[0]
        except hpack.HPACKError as exc:
            self._app_failed(f"an undecodable header block from the app ({exc})")
        self._replaced.extend(frames)
        if flags & PUSH or (stream := self._streams.get(sid)) is None:
            return
        if not stream.status:
            status = _status(fields)
            if status >= 200:  # not an interim 1xx
                stream.status = status
                if stream.timer is not None:
                    stream.timer.cancel()
                    stream.timer = None
        if flags & w.END_STREAM:
            stream.app_ended = True
            if stream.client_ended:
                self._end(stream, stream.status)

    def _app_goaway_frame(self, frame: bytes) -> bool:
        """The app's GOAWAY reaches the client (lowered if it names a higher stream than
        the client was told already); streams above it end (the client retries them)."""
        parsed = w.parse(frame)
        assert isinstance(parsed, GoAwayFrame)
        last = parsed.last_stream_id
        logger.info("the app sent GOAWAY", extra={"fields": {
            "client": self.peer, "last_stream_id": last, "error_code": parsed.error_code}})
        self._app_goaway = min(last, self._app_goaway if self._app_goaway is not None else last)
        raised = last > self._goaway_last
        self._goaway_last = min(last, self._goaway_last)
        for stream in [s for s in self._streams.values() if s.sid > last]:
            self._end(stream, stream.status or 503)
        self._end_if_done()
        if raised:
            self._replaced.append(w.goaway(self._goaway_last, parsed.error_code,
                                           bytes(parsed.additional_data)))
        return not raised

    # --- without the app ---------------------------------------------------------------------

    def _upstream_error(self, kind: str, error: str) -> None:
        self._hub.metrics.upstream_errors.labels(kind).inc()
        logger.warning("upstream error", extra={"fields": {
            "kind": kind, "protocol": "h2", "error": error[:300]}})

    def _app_failed(self, reason: str) -> NoReturn:
        self._upstream_error("reset", reason)
        if self._app is not None:
            self._app.abort()
        self._app_gone()
        raise Stop(reason)

    def _app_gone(self) -> None:
        """The app connection ended: streams without an answer get 502, the others are
        reset; a GOAWAY names the last stream, and the connection ends."""
        if not self._served:
            self._cq.append(w.settings())
            self._served_now()
        for stream in list(self._streams.values()):
            if stream.status:
                self._to_client(w.rst(stream.sid, w.INTERNAL_ERROR))
            else:
                self._answer(stream.sid, BAD_GATEWAY, stream.client_ended)
            self._end(stream, stream.status or BAD_GATEWAY)
        self._final = True
        self._goaway(self._processed)
        self._ending = True

    def _unreachable(self, exc: BaseException) -> None:
        """The app could not be dialled: the sidecar is the server of this connection,
        answers 502 to its streams, and ends it once it has answered some."""
        self._upstream_error("connect", f"{type(exc).__name__}: {exc}")
        self._local = True
        self._aq.clear()
        self._cq.append(w.settings())
        self._served_now()
        if self._greeted:
            self._to_client(w.settings(ack=True))
        for stream in list(self._streams.values()):
            self._answer(stream.sid, BAD_GATEWAY, stream.client_ended)
            self._end(stream, BAD_GATEWAY)
            self._local_answered = True
        self._end_local()
        self._flush()

    def _answer(self, sid: int, status: int, client_ended: bool,
                extra: tuple[tuple[str, str], ...] = ()) -> None:
        self._to_client(w.local_headers(sid, status, extra))
        if not client_ended:  # RFC 9113 §8.1: the rest of the request is not needed
            self._to_client(w.rst(sid, w.NO_ERROR))
            self._dropped[sid] = None

    def _end_local(self) -> None:
        if self._local_answered and not self._ending:
            self._final = True
            self._goaway(self._highest)
            self._ending = True


def _status(fields: Sequence[tuple[bytes, bytes]]) -> int:
    for name, value in fields:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
