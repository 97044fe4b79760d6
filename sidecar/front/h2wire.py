"""HTTP/2 on the wire, for the pass-through: frame headers, the frames the sidecar
writes itself, header-block mirrors, and the rate limits of hostile-input protection.

Frames are read by their 9-byte header only (``struct``: one ``unpack_from`` is ~0.15 µs,
hyperframe's ``Frame.parse_frame_header`` ~3.6 µs, and every frame of every stream goes
through it); a frame whose body the proxy needs (SETTINGS, GOAWAY, PING, padded or
prioritised HEADERS) is parsed by hyperframe, and every frame the sidecar writes is
serialised by hyperframe.  Header blocks are decoded by ``hpack``; nothing else is
parsed here.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence

import hpack
from hpack.struct import HeaderTuple
from hpack.table import HeaderTable
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

__all__ = (
    "CANCEL", "COMPRESSION_ERROR", "ENHANCE_YOUR_CALM", "FLOW_CONTROL_ERROR", "FRAME_SIZE_ERROR",
    "INTERNAL_ERROR",
    "MAX_LIST", "MAX_STREAM_ID", "NO_ERROR", "PREFACE", "PROTOCOL_ERROR", "REFUSED_STREAM",
    "Bucket", "HeaderMirror", "Limits", "fragment", "goaway", "header_frames", "local_headers",
    "parse", "parse_settings", "parse_window", "ping", "push_fragment", "rst", "settings", "unpack_header",
    "window_update",
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAM_ID = 2**31 - 1

# Frame types (RFC 9113 §6) and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (RFC 9113 §7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB

# SETTINGS parameters the proxy reads (RFC 9113 §6.5.2).
HEADER_TABLE_SIZE, MAX_FRAME_SIZE = 0x1, 0x5

MAX_LIST = 64 * 1024  # decoded bytes of one client header list (hpack's default bound)

_HEADER = struct.Struct(">BHBBL")


def unpack_header(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the frame at ``pos`` (9 bytes must be there)."""
    hi, lo, ftype, flags, sid = _HEADER.unpack_from(data, pos)
    return (hi << 16) | lo, ftype, flags, sid & MAX_STREAM_ID


def parse(frame: bytes) -> Frame:
    """A whole frame (header and body) as a hyperframe object."""
    view = memoryview(frame)
    parsed, length = Frame.parse_frame_header(view[:9])
    parsed.parse_body(view[9:9 + length])
    return parsed


def fragment(frame: bytes, flags: int) -> bytes:
    """The header-block fragment of a HEADERS frame (padding and priority taken off)."""
    if not flags & (PADDED | PRIORITY_FLAG):
        return frame[9:]
    parsed = parse(frame)
    assert isinstance(parsed, HeadersFrame)
    return bytes(parsed.data)


def push_fragment(frame: bytes) -> bytes:
    """The header-block fragment of a PUSH_PROMISE frame."""
    parsed = parse(frame)
    assert isinstance(parsed, PushPromiseFrame)
    return bytes(parsed.data)


def parse_settings(frame: bytes) -> dict[int, int]:
    parsed = parse(frame)
    assert isinstance(parsed, SettingsFrame)
    return dict(parsed.settings)


def parse_window(frame: bytes) -> int:
    """The increment of a WINDOW_UPDATE frame."""
    parsed = parse(frame)
    assert isinstance(parsed, WindowUpdateFrame)
    return int(parsed.window_increment)


def header_frames(first: bytes, block: bytes, flags: int, max_frame: int) -> list[bytes]:
    """A re-encoded header block as HEADERS (+ CONTINUATION) frames for the stream of
    the frame ``first``, keeping its END_STREAM; priority and padding are left out."""
    sid = unpack_header(first, 0)[3]
    chunks = [block[i:i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    frames: list[Frame] = [HeadersFrame(sid, data=chunks[0])]
    frames += [ContinuationFrame(sid, data=chunk) for chunk in chunks[1:]]
    if flags & END_STREAM:
        frames[0].flags.add("END_STREAM")
    frames[-1].flags.add("END_HEADERS")
    return [bytes(f.serialize()) for f in frames]


def goaway(last_stream_id: int, error_code: int = NO_ERROR, debug: bytes = b"") -> bytes:
    return bytes(GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code,
                             additional_data=debug).serialize())


def ping(opaque: bytes, *, ack: bool = False) -> bytes:
    return bytes(PingFrame(0, opaque_data=opaque, flags=("ACK",) if ack else ()).serialize())


def rst(stream_id: int, error_code: int) -> bytes:
    return bytes(RstStreamFrame(stream_id, error_code=error_code).serialize())


def window_update(stream_id: int, increment: int) -> bytes:
    return bytes(WindowUpdateFrame(stream_id, window_increment=increment).serialize())


def settings(*, ack: bool = False) -> bytes:
    """An empty SETTINGS frame: the sidecar's own server preface when the app is not
    there (every default applies), or the ACK of a client's SETTINGS."""
    return bytes(SettingsFrame(0, flags=("ACK",) if ack else ()).serialize())


def local_headers(stream_id: int, status: int, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete, body-less response the sidecar answers itself (502, 503, 504).

    Every field is a literal that is never indexed, and no table size update is sent:
    the client's HPACK decoder, shared with the app's encoder, is left exactly as it was.
    No DATA either: bytes of ours would spend the client's connection window, which the
    client then credits to the app, and the app could overrun it.
    """
    fields = [(":status", str(status)), *extra, ("content-length", "0")]
    block = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in fields])
    frame = HeadersFrame(stream_id, data=block, flags=("END_HEADERS", "END_STREAM"))
    return bytes(frame.serialize())


class HeaderMirror:
    """Decodes one direction's header blocks with its own ``hpack.Decoder``, which stays in
    step with the receiver's decoder because it sees every block, in order.

    ``decode`` also says whether the block changed the dynamic table: a block the proxy
    then drops would leave the receiver's table behind.  Decoding is the costly part of
    the pass-through (~20 µs per block), so a block that changed nothing is remembered by
    its bytes: the same bytes against the same table decode to the same fields.
    """

    __slots__ = ("_cache", "_decoder", "_generation", "size_before")

    def __init__(self, *, max_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_list_size)
        self._cache: dict[bytes, tuple[int, list[HeaderTuple]]] = {}
        self._generation = 0
        self.size_before = self.table_size  # the table's size before the last block

    @property
    def table_size(self) -> int:
        return int(self._decoder.header_table_size)

    def allow_table_size(self, size: int) -> None:
        """The receiver announced SETTINGS_HEADER_TABLE_SIZE: the sender may use up to it."""
        self._decoder.max_allowed_table_size = max(size, self._decoder.max_allowed_table_size)

    def decode(self, block: bytes) -> tuple[list[HeaderTuple], bool]:
        """(fields, changed the table); raises ``hpack.HPACKError`` (a connection error)."""
        hit = self._cache.get(block)
        if hit is not None and hit[0] == self._generation:
            self.size_before = self._decoder.header_table_size
            return hit[1], False
        table = self._decoder.header_table
        before = _state(table)
        self.size_before = before[0]
        fields = list(self._decoder.decode(block, raw=True))
        if _state(table) != before:
            self._generation += 1
            return fields, True
        if len(self._cache) >= 256:
            self._cache.clear()
        self._cache[block] = (self._generation, fields)
        return fields, False


def _state(table: HeaderTable) -> tuple[int, int, object]:
    entries = table.dynamic_entries
    return table.maxsize, len(entries), entries[0] if entries else None


class Bucket:
    """A token bucket: ``burst`` events at once, ``rate`` more per second after that."""

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(self, burst: float, rate: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._burst, self._rate, self._clock = burst, rate, clock
        self._tokens = burst
        self._last = clock()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty (the peer is too fast)."""
        if self._tokens < 1:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1:
                return False
        self._tokens -= 1
        return True


# Hostile-input limits, per connection.
MAX_BLOCK = 64 * 1024  # bytes of one header block (HEADERS + CONTINUATION): CVE-2024-27316
MAX_BLOCK_FRAMES = 64  # frames of one header block (empty CONTINUATION floods)
RESET_BURST, RESET_RATE = 1000, 200.0  # client RST_STREAMs: CVE-2023-44487 (rapid reset)
CONTROL_BURST, CONTROL_RATE = 1000, 200.0  # client SETTINGS and PINGs (floods)


class Limits:
    """The per-connection bounds on hostile input; each check calls ``fail`` (which
    ends the connection with a GOAWAY and does not return) when a bound is crossed."""

    __slots__ = ("_control", "_resets")

    def __init__(self) -> None:
        self._resets = Bucket(RESET_BURST, RESET_RATE)
        self._control = Bucket(CONTROL_BURST, CONTROL_RATE)

    def check_block(self, size: int, frames: int, fail: Callable[[int, str], object]) -> None:
        if size > MAX_BLOCK or frames > MAX_BLOCK_FRAMES:
            fail(ENHANCE_YOUR_CALM, f"a header block over {MAX_BLOCK} bytes or "
                 f"{MAX_BLOCK_FRAMES} frames")

    def check_reset(self, fail: Callable[[int, str], object]) -> None:
        if not self._resets.take():
            fail(ENHANCE_YOUR_CALM, "too many stream resets")

    def check_control(self, fail: Callable[[int, str], object]) -> None:
        if not self._control.take():
            fail(ENHANCE_YOUR_CALM, "too many SETTINGS or PING frames")
