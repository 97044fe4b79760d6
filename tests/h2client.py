"""A raw HTTP/2 client for tests: it writes the frames a test asks for and keeps every
frame it receives, so a test sees the wire (GOAWAY, PING, RST_STREAM, ...) in order.

Frames are built and parsed by hyperframe and header blocks by hpack.  Not on h2's
state machine: h2 takes the first GOAWAY it receives as the end of the connection,
and these tests must see what comes after it (the PING, the final GOAWAY, the streams
that still complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable, Iterable
from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def grpc_message(payload: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


class RawH2:
    """One HTTP/2 connection.  ``frames`` holds every frame received (HEADERS and
    CONTINUATION frames get a ``fields`` attribute once their block is complete)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 ack_pings: bool) -> None:
        self.reader, self.writer = reader, writer
        self.ack_pings = ack_pings
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.frames: list[Frame] = []
        self.eof = False
        self._changed = asyncio.Condition()
        self._block = b""
        self._task = asyncio.ensure_future(self._read())
        self.next_stream = 1

    @classmethod
    async def open(cls, port: int, *, ack_pings: bool = True, preface: bool = True,
                   settings: dict[int, int] | None = None) -> RawH2:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        client = cls(reader, writer, ack_pings=ack_pings)
        if preface:
            client.send_raw(PREFACE)
            client.send(SettingsFrame(0, settings=settings or {}))
        return client

    # --- sending -----------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, *frames: Frame) -> None:
        self.writer.write(b"".join(bytes(f.serialize()) for f in frames))

    def request(self, path: str, body: bytes | None = None, *, method: str = "POST",
                extra: Iterable[tuple[str, str]] = (), grpc: bool = True,
                end: bool = True, stream_id: int | None = None) -> int:
        """Open a stream: HEADERS (+ DATA with ``body``); returns its id."""
        sid = stream_id if stream_id is not None else self.next_stream
        self.next_stream = max(self.next_stream, sid + 2)
        fields = [(":method", method), (":scheme", "http"), (":path", path),
                  (":authority", "test")]
        if grpc:
            fields += [("content-type", "application/grpc"), ("te", "trailers")]
        fields += list(extra)
        headers = HeadersFrame(sid, data=self.encoder.encode(fields), flags=["END_HEADERS"])
        if body is None and end:
            headers.flags.add("END_STREAM")
        self.send(headers)
        if body is not None:
            data = DataFrame(sid, data=grpc_message(body) if grpc else body)
            if end:
                data.flags.add("END_STREAM")
            self.send(data)
        return sid

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        self._task.cancel()

    # --- receiving ---------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(9)
                frame, length = Frame.parse_frame_header(memoryview(head))
                body = await self.reader.readexactly(length)
                frame.parse_body(memoryview(body))
                self._received(frame)
                async with self._changed:
                    self._changed.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.eof = True
        async with self._changed:
            self._changed.notify_all()

    def _received(self, frame: Frame) -> None:
        if isinstance(frame, (HeadersFrame, ContinuationFrame)):
            self._block += bytes(frame.data)
            if "END_HEADERS" in frame.flags:
                frame.fields = [(bytes(n).decode(), bytes(v).decode())  # type: ignore[attr-defined]
                                for n, v in self.decoder.decode(self._block, raw=True)]
                self._block = b""
        elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.send(SettingsFrame(0, flags=["ACK"]))
        elif isinstance(frame, PingFrame) and "ACK" not in frame.flags and self.ack_pings:
            self.send(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]))
        elif isinstance(frame, DataFrame) and frame.flow_controlled_length:
            n = frame.flow_controlled_length
            self.send(WindowUpdateFrame(0, window_increment=n))
            self.send(WindowUpdateFrame(frame.stream_id, window_increment=n))
        self.frames.append(frame)

    async def wait(self, predicate: Callable[[Frame], bool], timeout: float = 10.0,
                   after: int = 0) -> Frame:
        """The first frame (from index ``after``) that matches; fails on timeout or EOF."""
        async def find() -> Frame:
            async with self._changed:
                while True:
                    for frame in self.frames[after:]:
                        if predicate(frame):
                            return frame
                    if self.eof:
                        raise AssertionError(f"connection closed; frames: {self.summary()}")
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(f"no such frame in {timeout}s: {self.summary()}") from None

    async def wait_eof(self, timeout: float = 10.0) -> None:
        async def eof() -> None:
            async with self._changed:
                while not self.eof:
                    await self._changed.wait()
        await asyncio.wait_for(eof(), timeout)

    async def response(self, sid: int, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the stream to end (END_STREAM or RST_STREAM): its headers, data, trailers."""
        await self.wait(lambda f: f.stream_id == sid and (
            "END_STREAM" in f.flags or isinstance(f, RstStreamFrame)), timeout)
        blocks = [f.fields for f in self.frames  # type: ignore[attr-defined]
                  if f.stream_id == sid and hasattr(f, "fields")]
        resets = [f.error_code for f in self.frames
                  if f.stream_id == sid and isinstance(f, RstStreamFrame)]
        data = b"".join(bytes(f.data) for f in self.frames
                        if f.stream_id == sid and isinstance(f, DataFrame))
        return {"headers": dict(blocks[0]) if blocks else {},
                "trailers": dict(blocks[1]) if len(blocks) > 1 else {},
                "data": data, "reset": resets[0] if resets else None}

    def of(self, kind: type[Frame]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]

    def summary(self) -> list[str]:
        return [f"{type(f).__name__}({f.stream_id}{','.join([''] + sorted(f.flags))})"
                + (f"[last={f.last_stream_id},code={f.error_code}]"
                   if isinstance(f, GoAwayFrame) else "")
                + (f"[code={f.error_code}]" if isinstance(f, RstStreamFrame) else "")
                for f in self.frames][-40:]
