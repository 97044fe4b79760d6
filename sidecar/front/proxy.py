"""The proxy port: its listener, its client connections and their end at admission stop.

The listener is bound with ``loop.create_server`` so the server socket is ours to close
when admission stops; its protocol factory (``ClientServer``) gives each connection to
aiohttp (HTTP/1.1, websockets; the requests go to ``Forwarder.handle``) or, when it opens
with the HTTP/2 preface, to the ``H2Hub``.  The drain drives it through ``draining``,
``close_idle_gradually``, ``stop_admission`` and ``close``.
"""

from __future__ import annotations

import asyncio
import gc

import aiohttp
from aiohttp import web

from ..config import Config
from ..drain import Drain
from ..metrics import Metrics
from .connections import Connections
from .forward import Forwarder, RequestFlight
from .h2 import H2Connection
from .h2hub import H2Hub
from .listener import ClientServer

__all__ = ("Proxy",)


class Proxy:
    """The proxy listener and its connections, wired to the drain."""

    def __init__(self, config: Config, *, drain: Drain, metrics: Metrics) -> None:
        self._config = config
        self._drain = drain
        self._loop = asyncio.get_running_loop()
        self._websockets_close = config.drain.websockets == "close"
        self._listener: asyncio.AbstractServer | None = None
        self._closing: set[asyncio.Future[bool]] = set()
        self._forwarder = Forwarder(config, drain=drain, metrics=metrics)
        self._h2 = H2Hub(config, drain=drain, metrics=metrics, factory=H2Connection)
        self.web_server = ClientServer(
            self._forwarder.handle, header_timeout=config.client.header_timeout,
            h2=self._h2.accept, keepalive_timeout=config.client.idle_timeout,
        )
        self._connections = Connections(self.web_server, in_flight=self._in_flight)

    @property
    def websockets(self) -> set[web.WebSocketResponse]:
        return self._forwarder.websockets

    async def start(self) -> None:
        self._forwarder.open()
        # What exists now (modules, config, metrics) lives as long as the process: keep it
        # out of the collector's way, so a full collection under load does not scan it
        # (measured under wrk: worst pause 34 ms -> 5 ms).
        gc.freeze()
        # A request's objects hold no reference cycles and die with it, so the cyclic
        # collector finds next to nothing; at the default threshold (700 allocations) it
        # still ran every few dozen requests and rescanned every request in flight: under
        # a light load (100 req/s of 10 ms requests) 5 % of the proxy's instructions
        # (callgrind: 296k -> 281k per request).  Ten times fewer young collections, each
        # over at most a few thousand more short-lived objects.
        gc.set_threshold(7000, 10, 10)

    async def listen(self) -> int:
        """Bind the proxy listener; return the port (useful with port 0)."""
        addr = self._config.listen
        self._listener = await self._loop.create_server(
            self.web_server, addr.host, addr.port, reuse_address=True, backlog=1024
        )
        return int(self._listener.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self.web_server.connections) + len(self._h2)

    def draining(self) -> None:
        """At the trigger: HTTP/2 connections learn of the drain (GOAWAY(2^31-1), PING);
        HTTP/1.1 ones through the Connection: close of their next answer."""
        self._h2.draining()

    async def close_idle_gradually(self, until: float) -> None:
        """While ``draining``: close idle keep-alive connections one by one until ``until``
        (the close spread's window, set by the drain; see ``Connections``)."""
        await self._connections.close_idle_gradually(until=until)

    async def stop_admission(self) -> None:
        """Stop accepting (without resetting what the accept queue holds), close connections
        with no request in progress, end websockets."""
        if self._listener is not None:
            await self._connections.close_listener(self._listener)
        self._h2.closing()  # final GOAWAYs; streams opened from now on are refused
        self.close_idle()
        if self._websockets_close:
            for ws in list(self.websockets):
                # Not awaited: each relay ends (and leaves the in-flight set) on its own.
                task = asyncio.ensure_future(
                    ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"going away"))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def close_idle(self) -> None:
        """Close connections with no request in progress (silent fresh ones after a grace)."""
        self._connections.close_idle()

    def _in_flight(self) -> set[web.RequestHandler]:
        return {f.request.protocol for f in self._drain.flights() if isinstance(f, RequestFlight)}

    async def close(self) -> None:
        self._h2.close()
        for conn in self.web_server.connections:
            conn.force_close()
        await self._forwarder.close()
