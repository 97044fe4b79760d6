"""The proxy's client connections at the end of admission: closed without cutting a request.

Which connections are busy, closing the idle ones one by one during ``draining`` (the
close spread), closing the listener without resetting what its accept queue holds, and
giving requests already on the wire time to reach the handler.  aiohttp parses HTTP and
owns each connection (a ``ClientConnection``); this module reads its ``ConnectionState``
and decides when to call its ``force_close()``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
from collections.abc import Callable

from aiohttp.web import RequestHandler

from .listener import ClientConnection, ClientServer
from .state import ConnectionState

__all__ = ("Connections",)

FRESH_GRACE = 0.5  # seconds a just-accepted, still silent connection gets once closing
ARRIVAL_GRACE = 0.05  # seconds, as admission stops, for requests already on the wire to be read
SPREAD_STEP = 0.01  # seconds: the shortest pause between two batches of the close spread
SPREAD_RECHECK = 0.25  # seconds: with nothing idle, look again (a stream begun before the trigger)

logger = logging.getLogger("sidecar")


class Connections:
    """The connections of one ``web.Server``; ``in_flight()`` names those with a request
    being forwarded (the drain's flights)."""

    def __init__(self, server: ClientServer, *,
                 in_flight: Callable[[], set[RequestHandler]]) -> None:
        self._server = server
        self._in_flight = in_flight
        self._loop = asyncio.get_running_loop()

    async def close_listener(self, listener: asyncio.AbstractServer) -> None:
        """Close the listener without resetting the connections its accept queue holds.

        Connections the kernel has completed in the backlog would be reset, although their
        clients have usually sent a request already.  A duplicate of the listening socket
        keeps them alive while the listener closes; they are taken in, then the socket is
        gone (new connections are refused).  Requests that were on the wire then, on those
        and on other just-accepted connections, get ``ARRIVAL_GRACE`` to be read and reach
        the handler, which (still ``draining``) forwards them.
        """
        listening = getattr(listener, "sockets", None) or ()  # asyncio.Server's
        held: list[socket.socket] = []
        try:
            held.extend(socket.socket(fileno=os.dup(s.fileno())) for s in listening)
        except OSError as exc:  # out of descriptors: close as before, the backlog is reset
            logger.warning("cannot hold the listening socket to take in its accept queue",
                           extra={"fields": {"error": exc.strerror or str(exc)}})
        listener.close()
        await asyncio.sleep(0)  # uvloop closes its socket on the next loop turn
        pending = [conn for sock in held for conn in _accept_pending(sock)]
        for sock in held:
            sock.close()
        for conn in pending:
            await self._loop.connect_accepted_socket(self._server, conn)
        await self._let_arrive(from_backlog=len(pending))

    async def _let_arrive(self, *, from_backlog: int) -> None:
        """Wait (at most ``ARRIVAL_GRACE``) until every connection has its request in
        flight or waits for its next one: none holds a request not yet handed to the
        handler (not read yet on a fresh connection, or read and not yet started)."""
        def arriving() -> list[RequestHandler]:
            flying = self._in_flight()
            return [c for c in self._server.connections if c not in flying and not _waiting(c)]

        fresh = len(arriving())
        deadline = self._loop.time() + ARRIVAL_GRACE
        while (left := arriving()) and self._loop.time() < deadline:
            await asyncio.sleep(0.005)
        if fresh or from_backlog:
            logger.info("connections still opening as the listener closes", extra={"fields": {
                "from_backlog": from_backlog, "fresh": fresh, "still_silent": len(left)}})

    def close_idle(self) -> None:
        """Close connections with no request in progress.

        A connection that has carried requests and sits idle, or holds a partly
        received request, is closed at once.  One accepted but still silent gets
        ``FRESH_GRACE`` seconds: its request is most likely on the wire, and a clear
        503 beats a reset that leaves the client unsure whether it was processed.
        """
        busy = self.busy()
        for conn in self._server.connections:
            if conn not in busy:
                if _state(conn).fresh:
                    self._loop.call_later(FRESH_GRACE, self._close_if_idle, conn)
                else:
                    conn.force_close()

    async def close_idle_gradually(self, *, until: float) -> None:
        """While ``draining``: close idle keep-alive connections a few at a time until
        ``until`` (the loop's clock), the end of the close spread's window, which the drain
        places at the end of ``drain.delay``, just before admission stops.

        So few are left when the listener closes, and their clients do not all reconnect
        (to the other pods) at one instant.  The spread ends the phase rather than starting
        it: by then a load balancer has taken the pod out of rotation and stopped reusing
        its connections to it, and a client that sent a request in between has had its
        connection closed by the ``Connection: close`` of the answer, without any race.
        Only connections that have carried a request and wait for the next one are closed:
        a client's pool sees the close before it reuses the socket.  A silent fresh
        connection is left to ``close_idle``.  With n idle and t seconds left, the next one
        closes after t / (n + 1): the last close comes before admission stops.
        """
        def idle() -> list[RequestHandler]:
            busy = self.busy()
            return [c for c in self._server.connections
                    if c not in busy and not _state(c).fresh]

        while (left := until - self._loop.time()) > 0:
            waiting = len(idle())
            pause = max(left / (waiting + 1), SPREAD_STEP) if waiting else min(left, SPREAD_RECHECK)
            await asyncio.sleep(pause)
            if not waiting or self._loop.time() >= until:
                continue
            conns = idle()
            batch = conns[:math.ceil(len(conns) * pause / left)]
            for conn in batch:
                conn.force_close()
            if batch:
                logger.debug("closed idle connections", extra={"fields": {
                    "closed": len(batch), "idle_left": len(conns) - len(batch)}})

    def busy(self) -> set[RequestHandler]:
        """Connections with a request in flight, queued, or whose answer is being written.

        A head parsed but not yet handed to the handler (a loop turn, or a pipelined
        request behind a busy one) counts: closing then would lose a request that is
        about to be forwarded (``ConnectionState.queued``).
        """
        busy = self._in_flight()
        busy.update(c for c in self._server.connections if _state(c).busy)
        return busy

    def _close_if_idle(self, conn: RequestHandler) -> None:
        if conn not in self.busy():
            conn.force_close()


_GONE = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM))


def _accept_pending(listening: socket.socket) -> list[socket.socket]:
    """Accept every connection waiting in a listening socket's backlog, without blocking."""
    listening.setblocking(False)
    conns: list[socket.socket] = []
    while True:
        try:
            conn, _ = listening.accept()
        except (BlockingIOError, InterruptedError):
            return conns
        except OSError as exc:
            if exc.errno in _GONE:  # that one connection is gone: take the next
                continue
            return conns  # out of descriptors or memory: what is left is reset, as before
        conn.setblocking(False)
        conns.append(conn)


_UNKNOWN = ConnectionState()
_UNKNOWN.tracked = False  # a connection that is not ours counts as busy


def _state(conn: RequestHandler) -> ConnectionState:
    return conn.state if isinstance(conn, ClientConnection) else _UNKNOWN


def _waiting(conn: RequestHandler) -> bool:
    """Has carried a request and waits for the next one (the first bytes of which may be in)."""
    state = _state(conn)
    return not state.fresh and not state.busy
