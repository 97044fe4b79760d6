"""Wires the listeners, signals, health probe and child, and runs the sidecar to its end.

``run()`` reads like the life of the process: start, serve until a trigger,
drain (the timeline itself is ``Drain.run``), linger, exit with a code.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from .admin import Admin
from .child import Child
from .config import Config
from .drain import Drain
from .front.proxy import Proxy
from .health import Health, something_answers
from .log import logger
from .metrics import Metrics
from .upstream_exit import exit_upstream

__all__ = ("EXIT_UPSTREAM_TAKEN", "StartupError", "run")

# Wrap mode found something already answering on the upstream address before starting
# the child (sysexits.h EX_CONFIG: the machine's state does not fit the configuration).
EXIT_UPSTREAM_TAKEN = 78


class StartupError(Exception):
    """The sidecar could not start (a port in use, a command not found)."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def run(config: Config, *, command: list[str] | None = None, metrics: Metrics | None = None) -> int:
    """Run until drained; return the process exit code (the child's in wrap mode)."""
    metrics = metrics or Metrics()
    drain = Drain(delay=config.drain.delay, timeout=config.drain.timeout,
                  close_spread=config.drain.close_spread, metrics=metrics)
    proxy = Proxy(config, drain=drain, metrics=metrics)
    gating = (bool(command) or config.upstream.health_path is not None
              or config.upstream.health_grpc is not None)
    health = Health(config.upstream, metrics=metrics, gating=gating, on_first_healthy=drain.mark_serving)
    admin = Admin(config, drain=drain, metrics=metrics, health=health,
                  connections=lambda: proxy.connections, websockets=lambda: len(proxy.websockets))
    metrics.set_budget({"drain.delay": config.drain.delay, "drain.timeout": config.drain.timeout,
                        "exit.wait": config.exit.wait, "drain.grace_period": config.drain.grace_period})
    metrics.watch(in_flight=lambda: len(drain), connections=lambda: proxy.connections,
                  websockets=lambda: len(proxy.websockets))

    # 1. Take the stop signals first; in wrap mode make sure nobody else answers on the
    #    upstream address; bind both listeners (a clear error if a port is taken); start
    #    the child.
    finished = asyncio.Event()  # a signal after drained ends the linger at once
    _install_signals(drain, finished)
    if command and await something_answers(config.upstream):
        # Whatever answers there is not our child: serving it would hide the real app's
        # failure to bind ("Address already in use") behind a healthy-looking sidecar.
        raise StartupError(
            f"something already answers on the upstream address {config.upstream.url} before "
            f"{command[0]!r} was started: stop it, or point upstream.url at the port the "
            "wrapped app listens on", exit_code=EXIT_UPSTREAM_TAKEN)
    await proxy.start()
    try:
        admin_port = await admin.start()
        port = await proxy.listen()
    except OSError as exc:
        await proxy.close()
        raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
    child = Child(command) if command else None
    if child is not None and command:
        try:
            child.start()
        except OSError as exc:
            await admin.stop()
            await proxy.close()
            raise StartupError(f"cannot start {command[0]!r}: {exc.strerror or exc}",
                               exit_code=127 if isinstance(exc, FileNotFoundError) else 126,
                               ) from None  # the codes a shell uses
    if not gating:  # readiness follows the TCP probe: right from the first answer of /readyz
        await health.check()
    logger.info("sidecar started", extra={"fields": {
        "listen": f"{config.listen.host}:{port}", "admin": f"{config.admin.host}:{admin_port}",
        "upstream": config.upstream.url, "wrap": command or None,
        "drain_delay": config.drain.delay, "drain_timeout": config.drain.timeout,
    }})
    if not gating:
        drain.mark_serving()

    # 2. Triggers: signals (above), /drain (in admin), and the child dying on its own.
    tasks = [asyncio.create_task(health.run())]
    if child is not None:
        tasks.append(asyncio.create_task(_watch_child(child, drain)))

    # 3. The drain timeline, then the upstream exit.
    async def tell_upstream() -> dict[str, Any]:
        tasks[0].cancel()  # the app is about to go away: no more health probes or warnings
        try:
            if child is not None:
                outcome = await child.stop(config.exit.signal, config.exit.wait)
            else:
                outcome = await exit_upstream(config.exit, config.upstream)
        except Exception as exc:  # noqa: BLE001 - whatever happens, the sidecar still exits
            outcome = {"action": "child" if child else "exit", "outcome": f"failed: {exc!r}"}
        fine = outcome["outcome"] in ("exited", "nothing configured", "already exited")
        (logger.info if fine else logger.warning)(
            "upstream exit: %s", outcome["outcome"], extra={"fields": outcome})
        return outcome

    try:
        await drain.run(stop_admission=proxy.stop_admission, exit_upstream=tell_upstream,
                        spread_closes=proxy.close_idle_gradually, at_trigger=proxy.draining)

        # 4. Linger so a last scrape sees the final numbers; answer /drain callers; close.
        if config.drain.linger > 0:
            try:
                await asyncio.wait_for(finished.wait(), config.drain.linger)
            except TimeoutError:
                pass
        await admin.stop()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.close()
    exit_code = (child.returncode if child is not None else None) or 0
    logger.info("sidecar exiting", extra={"fields": {"exit_code": exit_code}})
    return exit_code


def _install_signals(drain: Drain, finished: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_term(sig: signal.Signals) -> None:
        if drain.drained:
            finished.set()
        elif drain.triggered and sig is signal.SIGINT:
            logger.warning("second SIGINT: skipping to the drain deadline")
            drain.deadline_now()
        else:
            drain.trigger(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term, sig)


async def _watch_child(child: Child, drain: Drain) -> None:
    code = await child.wait()
    if drain.admitting:  # not yet closing: there is nothing left to forward to
        logger.warning("the child exited on its own; draining at once",
                       extra={"fields": {"exit_code": code}})
        drain.trigger("child exited", skip_delay=True)
