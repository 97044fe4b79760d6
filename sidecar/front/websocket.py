"""WebSocket relay: the upstream handshake first, then frames both ways.

Text, binary, ping and pong frames are passed through as they arrive.  The
upstream is dialled before the client's upgrade is accepted, so a refused
upstream still gets a proper 502 and an upstream that declines the upgrade gets
its own status.

The close handshake is relayed end to end: the side that closes first (the
initiator) has its close frame, code and reason, forwarded to the other side,
and the initiator is answered with the code and reason that side replied with.
Only the sidecar's own decisions use its own codes: 1001 "going away" when the
drain ends the websocket, 1001 to the app when the client vanished without a
close frame, 1011 to the client when the app did.
"""

from __future__ import annotations

import asyncio
import enum
import struct

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

__all__ = ("is_handshake", "relay_websocket")

_CLOSE_WAIT = 5.0  # how long a side may take to answer a close frame
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_CLOSE_WAIT)

_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def is_handshake(request: web.BaseRequest) -> bool:
    """A websocket opening handshake (RFC 6455 4.1): a GET without a body, ``Upgrade:
    websocket``, ``Connection`` naming ``upgrade``, and a key.  Anything else is forwarded
    as plain HTTP (``Upgrade`` is hop-by-hop), so the app gets the request the client
    framed: the websocket client would send a bodiless GET of its own, and the client
    would get a made-up answer instead of the app's."""
    headers = request.headers
    if "Upgrade" not in headers:  # the common case, decided by one lookup
        return False
    if (request.method != "GET" or request.body_exists
            or headers.get("Upgrade", "").lower() != "websocket" or "Sec-WebSocket-Key" not in headers):
        return False
    return "upgrade" in {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}


async def relay_websocket(
    request: web.BaseRequest,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    track: set[web.WebSocketResponse],
) -> tuple[web.StreamResponse, int]:
    protocols = tuple(
        p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",")
        if p.strip()
    )
    upstream = await session.ws_connect(
        url, headers=headers, protocols=protocols, autoclose=False, autoping=False,
        max_msg_size=0, timeout=_WS_TIMEOUT, compress=0,
    )
    try:
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False, autoping=False, max_msg_size=0, compress=False, timeout=_CLOSE_WAIT,
        )
        await client.prepare(request)
        track.add(client)
        try:
            await _Relay(client, upstream).run()
        finally:
            track.discard(client)
        if not client.closed and request.transport is not None:
            # The client answered a close the app started: the handshake is complete, and
            # the server side ends the TCP connection (RFC 6455 7.1.1), with no second frame.
            request.transport.close()
        return client, 101
    except asyncio.CancelledError:  # the client's connection was lost (handler cancellation)
        await upstream.close(code=WSCloseCode.GOING_AWAY, message=b"client went away")
        raise
    finally:
        await upstream.close()  # a no-op once the close handshake is done


class _End(enum.Enum):
    CLOSE_FORWARDED = "the source closed; its close frame went to the other side"
    CLOSE_ANSWERED = "the source replied to a forwarded close; the initiator got that reply"
    CLOSED_BY_US = "the source was closed from our side (the drain, or the relay)"
    VANISHED = "the source's connection ended without a close frame"
    SINK_VANISHED = "the sink's connection ended without a close frame"


class _Relay:
    def __init__(self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
        self._client = client
        self._upstream = upstream
        self._close_sent_to: _Socket | None = None  # where a forwarded close awaits its reply

    async def run(self) -> None:
        client, upstream = self._client, self._upstream
        to_app = asyncio.ensure_future(self._pump(client, upstream))
        to_client = asyncio.ensure_future(self._pump(upstream, client))
        pumps = (to_app, to_client)
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if self._close_sent_to is not None:
                # 1. A close handshake is under way: the reply arrives in the other pump,
                #    which answers the initiator with it.
                await asyncio.wait(pumps, timeout=_CLOSE_WAIT)
                initiator = client if self._close_sent_to is upstream else upstream
                if not initiator.closed:  # no reply in time: echo the initiator's own code
                    await initiator.close(code=initiator.close_code or WSCloseCode.OK)
            elif to_app in done and to_app.result() is _End.CLOSED_BY_US:
                # 2. The drain closed the client (1001): the app hears the same.
                await upstream.close(code=WSCloseCode.GOING_AWAY, message=b"draining")
            elif self._client_vanished(done, to_app):
                # 3. The client vanished without a close frame.
                await upstream.close(code=WSCloseCode.GOING_AWAY, message=b"client went away")
            else:
                # 4. The app vanished without a close frame.
                await client.close(code=WSCloseCode.INTERNAL_ERROR,
                                   message=b"upstream connection lost")
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    @staticmethod
    def _client_vanished(done: set[asyncio.Task[_End]], to_app: asyncio.Task[_End]) -> bool:
        """Is the client the side that is gone (else the app is)?"""
        for task in done:
            source_gone = task.result() is _End.VANISHED  # else its sink is gone
            if source_gone == (task is to_app):  # the client is to_app's source, to_client's sink
                return True
        return False

    async def _pump(self, source: _Socket, sink: _Socket) -> _End:
        while True:
            msg = await source.receive()
            kind = msg.type
            try:
                if kind is WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif kind is WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                elif kind is WSMsgType.PING:
                    await sink.ping(msg.data)
                elif kind is WSMsgType.PONG:
                    await sink.pong(msg.data)
                elif kind is WSMsgType.CLOSE:
                    return await self._close(source, sink, msg.data, msg.extra or "")
                elif kind is WSMsgType.CLOSING:
                    return _End.CLOSED_BY_US
                else:  # CLOSED, ERROR
                    return _End.VANISHED
            except ConnectionError:
                return _End.SINK_VANISHED

    async def _close(self, source: _Socket, sink: _Socket, code: int, reason: str) -> _End:
        if self._close_sent_to is source:
            # The reply to the close we forwarded: answer the initiator with it.
            await sink.close(code=code or WSCloseCode.OK, message=reason.encode())
            return _End.CLOSE_ANSWERED
        # The source starts the close: forward its frame as is (code and reason) and
        # let the other side's reply come back through the other pump.
        self._close_sent_to = sink
        payload = struct.pack("!H", code) + reason.encode() if code else b""
        try:
            await sink.send_frame(payload, WSMsgType.CLOSE)
        except ConnectionError:
            pass  # the other side is gone: run() answers the initiator itself
        return _End.CLOSE_FORWARDED
