"""Upstream health: GET ``upstream.health_path`` (2xx = healthy) and/or the gRPC health call
(``upstream.health_grpc``: ``grpc.health.v1.Health/Check`` answers SERVING), else "its port
accepts, and it does not answer like something other than HTTP".

Without a health path the first probe that connects writes one HTTP request *line*
(``OPTIONS * HTTP/1.1``, no headers yet) and listens for ``_LISTEN`` seconds.  An HTTP server
waits for the rest of the head, so none of its handlers runs and nothing reaches its logs; a
server of another protocol answers that line or speaks first (Redis' ``-ERR``, Memcached's
``ERROR``, a MySQL or SMTP greeting, an AMQP header, a TLS alert): bytes that are not an HTTP
status line keep readiness red with "the app on HOST:PORT did not answer HTTP", asked again at
every probe.  Silence, a close, or an HTTP answer count as "accepts", and later probes only
connect; so does an HTTP/2 server's preface (a SETTINGS frame on stream 0, RFC 9113 §3.4), which
an h2c-only server such as grpc-go or nghttpd sends before it reads, or in answer to the line.  (A full request would be surer, but it would reach every app's handlers and logs.)

The probe runs at once at start-up, then every ``upstream.health_interval``, and
feeds ``sidecar_upstream_up`` and readiness: an upstream that cannot be reached
(or answers its health path with a non-2xx) makes ``/readyz`` fail, so a load
balancer sends traffic elsewhere until it is back.

When it gates the start (a health path or gRPC service is set, or wrap mode), the first success
moves the sidecar from ``starting`` to ``serving``; until then it probes every
50 ms so a freshly started app is picked up quickly, and logs what it got every
few seconds, so a wrong port or path is visible in the log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import httptools
from yarl import URL

from .config import UpstreamConfig
from .log import logger
from .metrics import Metrics
from .upstream.grpc_health import GrpcHealthCall, GrpcUnhealthy
from .upstream.reach import base_url, connect_once, connector, dial, host_header

__all__ = ("Health", "not_other_protocol", "something_answers")

_STARTUP_INTERVAL = 0.05
_WAITING_LOG_EVERY = 5.0  # seconds between "waiting for the upstream" lines
_LISTEN = 0.25  # how long the first probe listens for an answer to half an HTTP request


class Health:
    def __init__(
        self,
        upstream: UpstreamConfig,
        *,
        metrics: Metrics,
        gating: bool,
        on_first_healthy: Callable[[], None],
    ) -> None:
        self._upstream = upstream
        self._metrics = metrics
        self.gating = gating
        self._on_first_healthy = on_first_healthy
        self.healthy = False
        self.last_error: str | None = "not checked yet"
        self._seen_healthy = False
        self._session: aiohttp.ClientSession | None = None
        self._probed = False
        url = URL(upstream.url)
        self._target = upstream.unix_path or f"{url.host}:{url.port}"

    async def check(self) -> bool:
        """Probe once; update the gauge and the state."""
        up = self._upstream
        try:
            if up.health_path:
                await self._get(up.health_path)
            if up.health_grpc is not None:
                await self._grpc(up.health_grpc)
            if up.health_path or up.health_grpc is not None:
                pass
            elif self._probed:  # no check of the app's own: its port accepts
                await connect_once(up, up.connect_timeout)
            else:  # until it has once not answered like another protocol
                await not_other_protocol(up)
                self._probed = True
        except (OSError, aiohttp.ClientError, TimeoutError, _Unhealthy, GrpcUnhealthy) as exc:
            self._set(False, self._describe(exc))
        else:
            self._set(True, None)
        return self.healthy

    async def _get(self, path: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=connector(self._upstream, limit=1, force_close=True))
        base = base_url(self._upstream)
        timeout = aiohttp.ClientTimeout(total=max(self._upstream.health_interval, 1.0),
                                        sock_connect=self._upstream.connect_timeout)
        async with self._session.get(base + path, timeout=timeout, allow_redirects=False) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                raise _Unhealthy(f"GET {path} answered {resp.status}")

    async def _grpc(self, service: str) -> None:
        """The gRPC health call on a fresh h2c connection, bounded like the GET."""
        up = self._upstream
        call = GrpcHealthCall(service=service, authority=host_header(up))
        try:
            transport = await dial(up, lambda: call)
        except TimeoutError:  # named here: with a health_path too, _describe would blame the GET
            raise GrpcUnhealthy(f"connect to {self._target} timed out") from None
        timeout = max(up.health_interval, 1.0)
        try:
            await asyncio.wait_for(call.result(), timeout)
        except TimeoutError:
            raise GrpcUnhealthy(f"grpc.health.v1.Health/Check: no answer within {timeout:g} s"
                                ) from None
        finally:
            transport.close()

    def _describe(self, exc: BaseException) -> str:
        """A short human account of a failed probe (not a Python repr)."""
        if isinstance(exc, (_Unhealthy, GrpcUnhealthy)):
            return str(exc)
        if isinstance(exc, aiohttp.ClientConnectorError):
            exc = exc.os_error
        where = f"connect to {self._target}"
        if isinstance(exc, ConnectionRefusedError):
            return f"{where} refused"
        if isinstance(exc, FileNotFoundError):
            return f"{where}: no such socket"
        path = self._upstream.health_path
        if isinstance(exc, aiohttp.ConnectionTimeoutError) or (isinstance(exc, TimeoutError)
                                                               and not path):
            return f"{where} timed out"
        if isinstance(exc, TimeoutError):
            return f"GET {path} timed out"
        if isinstance(exc, OSError) and exc.strerror:
            return f"{where}: {exc.strerror}"
        return f"GET {path}: {exc or type(exc).__name__}" if path else f"{where}: {exc!r}"

    def _set(self, healthy: bool, error: str | None) -> None:
        if healthy != self.healthy or error != self.last_error:
            if healthy:
                logger.info("upstream healthy", extra={"fields": {"upstream": self._upstream.url}})
            elif self._seen_healthy:
                logger.warning("upstream unhealthy",
                               extra={"fields": {"upstream": self._upstream.url, "error": error}})
        self.healthy = healthy
        self.last_error = error
        self._metrics.upstream_up.set(1 if healthy else 0)
        if healthy and not self._seen_healthy:
            self._seen_healthy = True
            self._on_first_healthy()

    async def run(self) -> None:
        """Probe forever (cancel to stop); the first probe has usually been made already."""
        started = time.monotonic()
        next_report = started + _WAITING_LOG_EVERY
        try:
            while True:
                await self.check()
                interval = self._upstream.health_interval
                if not self._seen_healthy:
                    now = time.monotonic()
                    if now >= next_report:
                        logger.warning("waiting for the upstream: %s (%d s)", self.last_error,
                                       round(now - started), extra={"fields": {
                                           "upstream": self._upstream.url,
                                           "error": self.last_error,
                                           "waited_seconds": round(now - started)}})
                        next_report = now + _WAITING_LOG_EVERY
                    if self.gating:
                        interval = _STARTUP_INTERVAL
                    else:  # serving already: readiness waits on this probe, keep it brisk
                        interval = min(interval, 1.0)
                await asyncio.sleep(interval)
        finally:
            if self._session is not None:
                await self._session.close()


class _StatusLine:
    """httptools callbacks: only whether a status line was read."""

    seen = False

    def on_status(self, reason: bytes) -> None:
        self.seen = True


async def not_other_protocol(up: UpstreamConfig, listen: float = _LISTEN) -> None:
    """Write an HTTP request line and listen: raise ``_Unhealthy`` if the app answers bytes
    that are not HTTP; OSError/TimeoutError if nothing accepts (see the module doc)."""
    if up.unix_path:
        opening = asyncio.open_unix_connection(up.unix_path)
    else:
        url = URL(up.url)
        opening = asyncio.open_connection(url.host, url.port)
    reader, writer = await asyncio.wait_for(opening, up.connect_timeout)
    status = _StatusLine()
    parser = httptools.HttpResponseParser(status)
    frame = b""  # the first bytes, when they may be an HTTP/2 frame header (9 bytes)
    try:
        writer.write(b"OPTIONS * HTTP/1.1\r\n")
        async with asyncio.timeout(listen):
            while not status.seen and (data := await reader.read(4096)):
                if frame or data[:1] == b"\0":  # no status line starts so: a frame's length
                    frame += data
                    if len(frame) < 9:
                        continue
                    if _h2_server_preface(frame):
                        return  # an h2c-only server: HTTP
                    data = frame
                parser.feed_data(data)
    except httptools.HttpParserError:
        where = up.unix_path or f"{URL(up.url).host}:{URL(up.url).port}"
        raise _Unhealthy(f"the app on {where} did not answer HTTP") from None
    except (TimeoutError, ConnectionError):
        pass  # silent, or closed: what an HTTP server does with half a request
    finally:
        writer.close()


def _h2_server_preface(head: bytes) -> bool:
    """An HTTP/2 server's first frame: SETTINGS (type 4), not an ACK, on stream 0, its length
    a multiple of 6 (RFC 9113 §3.4, §6.5)."""
    length = int.from_bytes(head[:3], "big")
    return head[3] == 0x4 and not head[4] & 0x1 and head[5:9] == bytes(4) and length % 6 == 0


async def something_answers(upstream: UpstreamConfig) -> bool:
    """Does anything accept connections on the upstream address right now?"""
    try:
        await connect_once(upstream, upstream.connect_timeout)
    except (OSError, TimeoutError):
        return False
    return True


class _Unhealthy(Exception):
    pass
