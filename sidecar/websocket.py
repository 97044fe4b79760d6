"""WebSocket relay: the upstream handshake first, then frames both ways.

Text, binary, ping, pong and close (with its code and reason) are passed
through as they arrive.  The upstream is dialled before the client's upgrade is
accepted, so a refused upstream still gets a proper 502 and an upstream that
declines the upgrade gets its own status.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

__all__ = ("relay_websocket",)

_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0)


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
            autoclose=False, autoping=False, max_msg_size=0, compress=False,
        )
        await client.prepare(request)
        track.add(client)
        try:
            pumps = (asyncio.ensure_future(_pump(client, upstream)),
                     asyncio.ensure_future(_pump(upstream, client)))
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                # One side is gone (or the drain closed the client with 1001): end the other.
                if not upstream.closed:
                    code = client.close_code or aiohttp.WSCloseCode.GOING_AWAY
                    await upstream.close(code=code)
                if not client.closed:
                    await client.close(code=upstream.close_code or aiohttp.WSCloseCode.GOING_AWAY)
                await asyncio.wait(pumps, timeout=5.0)
            finally:
                for pump in pumps:
                    pump.cancel()
        finally:
            track.discard(client)
        return client, 101
    finally:
        await upstream.close()


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    while True:
        msg = await source.receive()
        kind = msg.type
        if kind is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif kind is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif kind is WSMsgType.PING:
            await sink.ping(msg.data)
        elif kind is WSMsgType.PONG:
            await sink.pong(msg.data)
        elif kind is WSMsgType.CLOSE:
            code = msg.data if isinstance(msg.data, int) else aiohttp.WSCloseCode.OK
            reason = (msg.extra or "").encode()
            # Pass the close on, then answer the side that started it.
            await sink.close(code=code, message=reason)
            await source.close(code=code, message=reason)
            return
        elif kind is WSMsgType.CLOSING:
            return  # closed from our side; whoever closed it ends the other side
        else:  # CLOSED, ERROR: the source is gone
            if not sink.closed:
                code = aiohttp.WSCloseCode.INTERNAL_ERROR if kind is WSMsgType.ERROR \
                    else aiohttp.WSCloseCode.GOING_AWAY
                await sink.close(code=code)
            return
