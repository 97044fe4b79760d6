"""The admin listener: /healthz /readyz /status /drain /metrics.

It is a separate aiohttp application on its own port, so none of these paths is
ever answered on the proxy port (there they are forwarded like any other path),
and admin traffic never shows up in the request metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from .config import Config
from .drain import Drain, State
from .health import Health
from .metrics import Metrics

__all__ = ("Admin",)


class Admin:
    def __init__(
        self,
        config: Config,
        *,
        drain: Drain,
        metrics: Metrics,
        health: Health,
        connections: Callable[[], int],
        websockets: Callable[[], int],
    ) -> None:
        self._config = config
        self._drain = drain
        self._health = health
        self._connections = connections
        self._websockets = websockets
        self._token = _bytes(config.admin_token) if config.admin_token else None
        self._started = time.time()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/status", self.status)
        app.router.add_route("GET", "/drain", self.drain)
        app.router.add_route("POST", "/drain", self.drain)
        app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
        self.app = app

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        addr = self._config.admin
        site = web.TCPSite(self._runner, addr.host, addr.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the bound port (useful with port 0)
        return self.port

    async def stop(self) -> None:
        """Close the listener once every request in progress (each waiting /drain) is answered."""
        if self._runner is not None:  # aiohttp's graceful shutdown waits for running handlers
            await self._runner.cleanup()

    # --- handlers ------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True, "state": self._drain.state.value})

    def _not_ready_reason(self) -> str | None:
        state = self._drain.state
        if state is State.STARTING:
            return f"waiting for the upstream to become healthy: {self._health.last_error}"
        if state is not State.SERVING:
            return "draining: the pod is shutting down"
        if not self._health.healthy:  # the health path fails, or the port does not accept
            return f"upstream health check failing: {self._health.last_error}"
        return None

    async def readyz(self, request: web.Request) -> web.Response:
        reason = self._not_ready_reason()
        state = self._drain.state.value
        if reason is None:
            return web.json_response({"ready": True, "state": state})
        return web.json_response({"ready": False, "state": state, "reason": reason}, status=503)

    async def status(self, request: web.Request) -> web.Response:
        drain = self._drain
        body: dict[str, Any] = {
            "state": drain.state.value,
            "ready": self._not_ready_reason() is None,
            "in_flight": len(drain),
            "connections": self._connections(),
            "websockets": self._websockets(),
            "drain": {**drain.timings(), **_summary(drain)},
            "upstream": {
                "url": self._config.upstream.url,
                "healthy": self._health.healthy,
                "health_path": self._config.upstream.health_path,
                "health_grpc": self._config.upstream.health_grpc,
                "last_error": self._health.last_error,
            },
            "pid": os.getpid(),
            "tasks": len(asyncio.all_tasks()),
            "uptime_seconds": round(time.time() - self._started, 3),
        }
        return web.json_response(body)

    async def drain(self, request: web.Request) -> web.Response:
        if self._token is not None and not self._authorized(request):
            return web.json_response(
                {"error": "unauthorized: send Authorization: Bearer <admin_token>"},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="sidecar"'},
            )
        drain = self._drain
        drain.trigger(f"{request.method} /drain")
        if request.query.get("wait", "true").lower() in ("false", "0", "no"):
            return web.json_response(_summary(drain), status=202)
        await drain.wait_drained()
        return web.json_response(_summary(drain))

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        assert self._token is not None
        # Constant time, and on bytes: a header that is not valid UTF-8 is a wrong token, not a 500.
        return scheme.lower() == "bearer" and hmac.compare_digest(_bytes(given.strip()), self._token)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _summary(drain: Drain) -> dict[str, Any]:
    return dataclasses.asdict(drain.summary())
