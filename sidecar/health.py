"""Upstream health: GET ``upstream.health_path`` (2xx = healthy), else "its port accepts".

The probe runs every ``upstream.health_interval`` and feeds ``sidecar_upstream_up``.
When it gates readiness (a health path is set, or wrap mode), the first success
moves the sidecar from ``starting`` to ``serving``; until then it probes every
50 ms so a freshly started app is picked up quickly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from .config import UpstreamConfig
from .log import logger
from .metrics import Metrics
from .upstream import base_url, connect_once, connector

__all__ = ("Health",)

_STARTUP_INTERVAL = 0.05


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

    async def check(self) -> bool:
        """Probe once; update the gauge and the state."""
        up = self._upstream
        try:
            if up.health_path:
                await self._get(up.health_path)
            else:
                await connect_once(up, up.connect_timeout)
        except (OSError, aiohttp.ClientError, TimeoutError, _Unhealthy) as exc:
            self._set(False, str(exc) or type(exc).__name__)
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
        """Probe forever (cancel to stop)."""
        try:
            while True:
                await self.check()
                interval = self._upstream.health_interval
                if self.gating and not self._seen_healthy:
                    interval = _STARTUP_INTERVAL
                await asyncio.sleep(interval)
        finally:
            if self._session is not None:
                await self._session.close()


class _Unhealthy(Exception):
    pass
