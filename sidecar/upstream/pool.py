"""Keep-alive connections to the app (TCP or unix socket), bounded in number and in idle time.

``acquire()`` hands out the most recently used idle connection, or dials a new
one within ``connect_timeout``; ``release()`` takes it back or closes it.  A
connection idle for ``idle_timeout`` seconds is never handed out again, and a sweep
(every eighth of that, only while connections are idle) closes it: one timer for
the pool rather than one per request.  At most ``limit`` connections exist at
once (0: no limit); callers beyond that wait for one to be released.

Reuse rule, so that no request is ever sent twice: a pooled connection is only
handed out if it has not been seen closed (EOF, reset or stray bytes from the app
close it and take it out of the pool at once).  A request is sent on exactly one
connection and never retried: if the app closes the connection after the first
request byte was written, the app may have read it, so the exchange fails
(502, counted ``reset``) instead of being repeated.  Idle connections are dropped
before common app servers drop theirs (``idle_timeout`` < their keep-alive
timeout), which keeps that race rare.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque

from .connection import Connection, UpstreamError

__all__ = ("Pool",)


class Pool:
    def __init__(
        self,
        *,
        host: str = "",
        port: int = 0,
        unix_path: str | None = None,
        connect_timeout: float,
        limit: int,
        idle_timeout: float,
        max_head: int = 64 * 1024,
    ) -> None:
        self.loop = asyncio.get_running_loop()  # also the exchanges' (one lookup: a getpid())
        self._host, self._port, self._unix_path = host, port, unix_path
        self._address = unix_path if unix_path else f"{host}:{port}"
        self._connect_timeout = connect_timeout or None
        self._limit = limit
        self._idle_timeout = idle_timeout
        self._max_head = max_head
        self._idle: deque[Connection] = deque()
        self._open = 0  # connections that exist (idle, in use, or being dialled)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None

    def acquire_idle(self) -> Connection | None:
        """The most recently used idle connection that is still fit, without waiting."""
        while self._idle and not self._closed:
            conn = self._idle.pop()
            if not conn.closed and self.loop.time() - conn.idle_since < self._idle_timeout:
                conn.idle = False
                return conn
            self._drop(conn)
        return None

    async def acquire(self) -> Connection:
        """An idle connection, else a new one (waiting for a free slot at the limit)."""
        while True:
            if self._closed:
                raise UpstreamError("connect", "the proxy is shutting down")
            if self._idle:
                conn = self.acquire_idle()
                if conn is not None:
                    return conn
                continue
            if not self._limit or self._open < self._limit:
                break
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the freed slot on
                raise
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._forget()
            raise

    def release(self, conn: Connection, *, reuse: bool) -> None:
        """Take a connection back: pooled if ``reuse`` and it is fit for it, else closed."""
        if reuse and not self._closed and conn.reusable:
            conn.idle = True
            conn.idle_since = self.loop.time()
            self._idle.append(conn)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(self._idle_timeout / 8, self._sweep)
            self._wake_one()
            return
        conn.close()
        self._forget()

    def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._drop(self._idle.pop())
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- internals -----------------------------------------------------------------------------

    async def _connect(self) -> Connection:
        loop = self.loop
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._unix_path:
                    _, conn = await loop.create_unix_connection(
                        lambda: Connection(self._lost_idle, max_head=self._max_head), self._unix_path)
                else:
                    _, conn = await loop.create_connection(
                        lambda: Connection(self._lost_idle, max_head=self._max_head), self._host, self._port)
        except TimeoutError:
            raise UpstreamError(
                "connect", f"no connection to {self._address} within {self._connect_timeout}s"
            ) from None
        except OSError as exc:
            raise UpstreamError("connect", _connect_message(exc, self._address)) from None
        return conn

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_timeout`` (the oldest are on the left)."""
        self._sweeper = None
        idle = self._idle
        expired = self.loop.time() - self._idle_timeout
        while idle and idle[0].idle_since <= expired:
            self._drop(idle.popleft())
        if idle:
            self._sweeper = self.loop.call_later(self._idle_timeout / 8, self._sweep)

    def _drop(self, conn: Connection) -> None:
        conn.close()
        self._forget()

    def _lost_idle(self, conn: Connection) -> None:
        """The app closed (or wrote on) an idle pooled connection."""
        if conn in self._idle:
            self._idle.remove(conn)
            self._forget()

    def _forget(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _connect_message(exc: OSError, address: str) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return f"connection refused by {address}"
    if exc.errno == errno.ENOENT:
        return f"no socket at {address}"
    reason = os.strerror(exc.errno).lower() if exc.errno else (str(exc) or type(exc).__name__)
    return f"cannot connect to {address}: {reason}"
