"""Tell the upstream to exit once drained, then wait for it to be gone.

The first of ``exit.pid_file``, ``exit.process`` and ``exit.http`` that is set
wins (in wrap mode the child is signalled instead, see ``child.py``).  Nothing
here raises: a missing pid file, a dead pid, no matching process or a failed
HTTP call is logged and reported in the outcome, and the sidecar exits anyway.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from typing import Any

import aiohttp

from .config import ExitConfig, UpstreamConfig
from .log import logger
from .upstream.reach import connect_once

__all__ = ("exit_upstream", "find_processes", "wait_pids_gone")

_POLL = 0.05


async def exit_upstream(cfg: ExitConfig, upstream: UpstreamConfig) -> dict[str, Any]:
    if cfg.pid_file:
        outcome = await _by_pid_file(cfg)
    elif cfg.process:
        outcome = await _by_process(cfg)
    elif cfg.http:
        outcome = await _by_http(cfg, upstream)
    else:
        outcome = {"action": "none", "outcome": "nothing configured"}
    return outcome


async def _by_pid_file(cfg: ExitConfig) -> dict[str, Any]:
    result: dict[str, Any] = {"action": "pid_file", "pid_file": cfg.pid_file,
                              "signal": cfg.signal.name}
    assert cfg.pid_file is not None
    try:
        with open(cfg.pid_file, encoding="ascii") as f:  # noqa: ASYNC230 - a few bytes, once
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        return {**result, "outcome": f"no pid: cannot read {cfg.pid_file}: {exc}"}
    result["pids"] = [pid]
    sent = _signal_all([pid], cfg.signal)
    if not sent:
        return {**result, "outcome": f"no such process {pid}"}
    gone = await wait_pids_gone(sent, cfg.wait)
    return {**result, "outcome": "exited" if gone else f"still running after {cfg.wait}s"}


async def _by_process(cfg: ExitConfig) -> dict[str, Any]:
    assert cfg.process is not None
    pids = find_processes(cfg.process)
    result: dict[str, Any] = {"action": "process", "process": cfg.process,
                              "signal": cfg.signal.name, "pids": pids}
    if not pids:
        return {**result, "outcome": "no process matched"}
    sent = _signal_all(pids, cfg.signal)
    gone = await wait_pids_gone(sent, cfg.wait)
    return {**result, "outcome": "exited" if gone else f"still running after {cfg.wait}s"}


async def _by_http(cfg: ExitConfig, upstream: UpstreamConfig) -> dict[str, Any]:
    assert cfg.http is not None
    result: dict[str, Any] = {"action": "http", "url": cfg.http.url, "method": cfg.http.method}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.wait
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.wait or None)) as s,
            s.request(cfg.http.method, cfg.http.url) as resp,
        ):
            await resp.read()
            result["status"] = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return {**result, "outcome": f"request failed: {exc!r}"}
    if not 200 <= result["status"] < 400:
        return {**result, "outcome": f"answered {result['status']}"}
    gone = await _wait_port_closed(upstream, deadline)
    return {**result, "outcome": "exited" if gone else f"still listening after {cfg.wait}s"}


def find_processes(pattern: str) -> list[int]:
    """PIDs whose command line matches ``pattern``: never ourselves, nor our ancestors."""
    regex = re.compile(pattern)
    skip = {os.getpid(), os.getppid()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        if cmdline and regex.search(cmdline):
            found.append(int(entry))
    return sorted(found)


def _signal_all(pids: list[int], sig: signal.Signals) -> list[int]:
    sent = []
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            logger.warning("no such upstream process", extra={"fields": {"pid": pid}})
        except PermissionError:
            logger.warning("not permitted to signal the upstream",
                           extra={"fields": {"pid": pid, "signal": sig.name}})
        else:
            logger.info("signalled upstream process", extra={"fields": {"pid": pid, "signal": sig.name}})
            sent.append(pid)
    return sent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent can reap it


async def wait_pids_gone(pids: list[int], timeout: float) -> bool:
    """Wait until every pid has exited (pidfd readiness where available)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for pid in pids:
        remaining = deadline - loop.time()
        if remaining <= 0 or not await _wait_pid(pid, remaining):
            return not any(_alive(p) for p in pids)
    return True


async def _wait_pid(pid: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        fd = None
    if fd is not None:
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(fd, on_exit)
        try:
            await asyncio.wait_for(exited, timeout)
            return True
        except TimeoutError:
            return not _alive(pid)
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    deadline = loop.time() + timeout
    while _alive(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL)
    return True


async def _wait_port_closed(upstream: UpstreamConfig, deadline: float) -> bool:
    loop = asyncio.get_running_loop()
    while True:
        try:
            await connect_once(upstream, 1.0)
        except (OSError, TimeoutError):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL)
