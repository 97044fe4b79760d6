"""How to reach the app, over TCP or a unix socket: one place for the four ways we do."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from yarl import URL

from ..config import UpstreamConfig
from .pool import Pool

__all__ = (
    "base_url", "connect_once", "connector", "dial", "host_header", "upstream_pool", "websocket_session",
)


def base_url(up: UpstreamConfig) -> str:
    """Where request targets are appended (a unix socket still needs an http:// URL)."""
    return "http://localhost" if up.unix_path else up.url


def host_header(up: UpstreamConfig) -> str:
    """The Host sent to the app for a request that came without one."""
    return "localhost" if up.unix_path else (URL(up.url).raw_authority or "localhost")


def upstream_pool(up: UpstreamConfig, *, idle_timeout: float) -> Pool:
    """The keep-alive pool of the forwarding path (websockets use ``connector``)."""
    url = URL(base_url(up))
    return Pool(host=url.raw_host or "", port=url.port or 80, unix_path=up.unix_path,
                connect_timeout=up.connect_timeout, limit=up.max_connections,
                idle_timeout=idle_timeout)


def websocket_session(up: UpstreamConfig, *, idle_timeout: float) -> aiohttp.ClientSession:
    """The client of the websocket leg (aiohttp's), adding nothing the client did not send."""
    return aiohttp.ClientSession(
        connector=connector(up, limit=up.max_connections, keepalive_timeout=idle_timeout),
        timeout=aiohttp.ClientTimeout(
            total=up.timeout or None, sock_connect=up.connect_timeout, connect=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
    )


def connector(up: UpstreamConfig, **options: Any) -> aiohttp.BaseConnector:
    if up.unix_path:
        return aiohttp.UnixConnector(path=up.unix_path, **options)
    return aiohttp.TCPConnector(**options)


async def connect_once(up: UpstreamConfig, timeout: float) -> None:
    """Open and close one connection; raises OSError or TimeoutError if the app is not there."""
    if up.unix_path:
        opening = asyncio.open_unix_connection(up.unix_path)
    else:
        url = URL(up.url)
        opening = asyncio.open_connection(url.host, url.port)
    _, writer = await asyncio.wait_for(opening, timeout)
    writer.close()


async def dial(up: UpstreamConfig, factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport:
    """Open one connection to the app with ``factory``'s protocol, within
    ``upstream.connect_timeout``; raises OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    if up.unix_path:
        opening = loop.create_unix_connection(factory, up.unix_path)
    else:
        url = URL(up.url)
        opening = loop.create_connection(factory, url.host or "", url.port or 80)
    transport, _ = await asyncio.wait_for(opening, up.connect_timeout or None)
    return transport
