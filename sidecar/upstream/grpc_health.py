"""The app's gRPC health (``grpc.health.v1.Health/Check``) over h2c, for readiness.

gRPC apps report their health through a standard service rather than an HTTP path; when
``upstream.health_grpc`` is set, readiness also needs that call to answer SERVING.  Each probe
is one fresh HTTP/2 cleartext connection (prior knowledge, the way every gRPC server accepts
h2c), one unary call, closed: nothing stays open to a dying app, and a probe proves that a new
client can connect and be served.  HTTP/2 framing and HPACK are the python-hyper ``h2``
library's; what is decided here is only what the answer means, in words for ``/readyz``.

The two messages have one field each, so their protobuf wire form is written here instead of
pulling protobuf in at run time (``tests/test_grpc_health.py`` checks it against the real
``grpc_health.v1.health_pb2``)::

    HealthCheckRequest  { string service = 1; }        0x0A <varint length> <utf-8 name>
                                                       (nothing at all for "" = the server)
    HealthCheckResponse { ServingStatus status = 1; }  0x08 <varint status>
                                                       (nothing at all = 0, UNKNOWN)

Each travels in gRPC's length-prefixed frame: one byte "compressed" (0: we offer no
compression), four bytes big-endian length, the message.
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

__all__ = ("GrpcHealthCall", "GrpcUnhealthy", "decode_response", "encode_request")

PATH = "/grpc.health.v1.Health/Check"
_MAX_ANSWER = 65536
SERVING = 1
_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_GRPC_CODES = {
    1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}


class GrpcUnhealthy(Exception):
    """The app was reached but its health call did not answer SERVING; the text says why."""


def encode_request(service: str) -> bytes:
    """``HealthCheckRequest{service}`` in a gRPC frame (proto3 omits the empty string)."""
    name = service.encode()
    message = b"\x0a" + _varint(len(name)) + name if name else b""
    return b"\x00" + struct.pack(">I", len(message)) + message


def decode_response(body: bytes) -> int:
    """The ``status`` of a framed ``HealthCheckResponse``; unknown fields are skipped."""
    if len(body) < 5:
        raise ValueError(f"a gRPC message needs a 5-byte prefix, got {len(body)} bytes")
    compressed, length = body[0], struct.unpack(">I", body[1:5])[0]
    if compressed:
        raise ValueError("the message is compressed although no compression was offered")
    message = body[5:5 + length]
    if len(message) != length:
        raise ValueError(f"the message is cut short ({len(message)} of {length} bytes)")
    status, pos = 0, 0
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(message, pos)
            if field == 1:
                status = value
        elif wire == 2:
            size, pos = _read_varint(message, pos)
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != len(message):
        raise ValueError("a field runs past the end of the message")
    return status


class GrpcHealthCall(asyncio.Protocol):
    """One connection making one Health/Check call; ``result()`` returns if SERVING, else
    raises ``GrpcUnhealthy``.  The caller dials it, bounds the time and closes the transport."""

    def __init__(self, *, service: str, authority: str) -> None:
        self._service = service
        self._authority = authority
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._transport: asyncio.Transport | None = None
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sid = 0
        self._head: dict[str, str] = {}
        self._trailers: dict[str, str] = {}
        self._body = bytearray()
        self._first = b""  # what the app sent first, to name an app that does not speak HTTP/2

    async def result(self) -> None:
        await self._done

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        conn = self._conn
        conn.initiate_connection()
        self._sid = conn.get_next_available_stream_id()
        conn.send_headers(self._sid, [
            (":method", "POST"), (":scheme", "http"), (":path", PATH),
            (":authority", self._authority), ("content-type", "application/grpc"),
            ("te", "trailers"), ("user-agent", "sidecar-health"),
        ])
        conn.send_data(self._sid, encode_request(self._service), end_stream=True)
        self._transport.write(conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        self._first = self._first or data
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return self._fail(_not_h2(self._first))
        for event in events:
            self._on_event(event)
        if self._transport is not None and not self._done.done():
            self._transport.write(self._conn.data_to_send())
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(_not_h2(self._first) if not self._head
                   else f"the app closed the connection during {PATH}")

    # --- h2 events ----------------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self._head = {str(k): str(v) for k, v in event.headers}
        elif isinstance(event, h2.events.TrailersReceived):
            self._trailers = {str(k): str(v) for k, v in event.headers}
        elif isinstance(event, h2.events.DataReceived):
            self._body += event.data
            if len(self._body) > _MAX_ANSWER:  # the answer is 7 bytes: never buffer a flood
                self._fail(f"{PATH} answered more than {_MAX_ANSWER} bytes")
                return
            self._conn.acknowledge_received_data(event.flow_controlled_length, self._sid)
        elif isinstance(event, h2.events.StreamEnded):
            try:
                _judge(self._head, self._trailers, bytes(self._body), self._service)
            except GrpcUnhealthy as exc:
                self._fail(str(exc))
            else:
                if not self._done.done():
                    self._done.set_result(None)
        elif isinstance(event, h2.events.StreamReset):
            self._fail(f"the app reset {PATH} ({_h2_error(event.error_code)})")
        elif isinstance(event, h2.events.ConnectionTerminated) and (
                event.last_stream_id is None or event.last_stream_id < self._sid):
            self._fail(f"the app refused {PATH} with GOAWAY ({_h2_error(event.error_code)})")

    def _fail(self, reason: str) -> None:
        if not self._done.done():
            self._done.set_exception(GrpcUnhealthy(reason))


def _judge(head: dict[str, str], trailers: dict[str, str], body: bytes, service: str) -> None:
    status = head.get(":status", "?")
    if status != "200":
        raise GrpcUnhealthy(f"{PATH} answered HTTP {status}, not a gRPC response")
    # A "trailers-only" answer (an error with no message) carries grpc-status in the headers.
    code_text = trailers.get("grpc-status", head.get("grpc-status"))
    if code_text is None:
        raise GrpcUnhealthy(f"{PATH} answered without a grpc-status")
    code = int(code_text) if code_text.isdigit() else -1
    name = _GRPC_CODES.get(code, f"code {code_text}")
    what = f"service {service!r}" if service else "the server"
    if code == 5:
        raise GrpcUnhealthy(f"the app's health service does not know {what} (NOT_FOUND)")
    if code == 12:
        raise GrpcUnhealthy(f"the app does not implement grpc.health.v1.Health ({name})")
    if code != 0:
        message = trailers.get("grpc-message", head.get("grpc-message", ""))
        raise GrpcUnhealthy(f"{PATH} failed: {name}{': ' + message if message else ''}")
    try:
        serving = decode_response(body)
    except ValueError as exc:
        raise GrpcUnhealthy(f"{PATH} answered an unreadable message: {exc}") from None
    if serving != SERVING:
        raise GrpcUnhealthy(f"{PATH} says {what} is "
                            f"{_STATUS_NAMES.get(serving, f'status {serving}')}")


def _not_h2(first: bytes) -> str:
    if not first:
        return f"the app closed the connection without answering {PATH}: does it speak h2c?"
    line = first.split(b"\r\n", 1)[0][:60].decode("ascii", "replace")
    return f"the app does not speak HTTP/2 cleartext (h2c): it answered {line!r}"


def _h2_error(code: int | None) -> str:
    if code is None:
        return "no error code"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("a varint runs past the end of the message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
