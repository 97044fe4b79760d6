"""What one client connection is doing, as the drain needs to know it (``ConnectionState``).

aiohttp keeps this in private fields of its request handler, which are not an API; the
sidecar keeps its own, fed through public hooks only: ``ClientConnection.data_received``,
the request factory and the handler's ``finally`` (see ``listener``).
"""

from __future__ import annotations

import httptools

__all__ = ("ConnectionState",)


class ConnectionState:
    """What one client connection is doing, as the drain needs to know it.

    aiohttp keeps this in private fields; we keep our own.  Request heads are counted by
    llhttp (``httptools``: message boundaries only, no header or body callbacks, about a
    microsecond a request) as the bytes arrive, so a head that is parsed but not yet handed
    to the handler (the loop turn in between, or a pipelined request queued behind a busy
    one) is known.  ``requests`` counts requests whose handling began (the request factory
    ran), ``in_request`` is true until the handler's answer is written.  After a request that
    asked to switch protocols (a websocket), or bytes llhttp refuses (aiohttp answers 400 and
    closes), the boundaries are no longer followed and the connection counts as busy.
    """

    __slots__ = ("_parser", "heads", "in_request", "receiving_head", "requests", "tracked")

    def __init__(self) -> None:
        self.heads = 0  # complete request heads received (a malformed one counts: it is answered)
        self.requests = 0
        self.in_request = False
        self.receiving_head = False  # the first bytes of a head are in, not the whole head
        self.tracked = True
        self._parser = httptools.HttpRequestParser(self)

    @property
    def queued(self) -> bool:
        """A complete head has arrived that the handler has not started on yet."""
        return self.heads > self.requests or not self.tracked

    @property
    def busy(self) -> bool:
        """A request is being handled or waits to be: closing now would lose it."""
        return self.in_request or self.queued

    @property
    def fresh(self) -> bool:
        """No complete request head yet (a just-accepted or a slow client)."""
        return self.heads == 0 and self.tracked

    def feed(self, data: bytes) -> None:
        if not self.tracked:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.tracked = False  # what follows is another protocol, or aiohttp's to re-read
        except httptools.HttpParserError:
            if self.receiving_head or not self.heads:
                self.heads += 1  # aiohttp answers it 400 through the request factory
            self.tracked = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.receiving_head = True

    def on_headers_complete(self) -> None:
        self.receiving_head = False
        self.heads += 1
