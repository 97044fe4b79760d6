"""Wrap mode: run the app as our child, reap it (and any orphan, as PID 1), stop it.

The child runs in its own process group, so a terminal's Ctrl-C reaches only
the sidecar, which drains first and then signals the child.  Exit status is
collected by a SIGCHLD handler that reaps every exited child, which is what a
container's PID 1 must do for orphans re-parented to it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

from .log import logger

__all__ = ("FORWARDED_SIGNALS", "Child")

# Passed straight to the child; SIGTERM and SIGINT start the drain instead.
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT, signal.SIGWINCH)


class Child:
    def __init__(self, argv: list[str]) -> None:
        self._argv = argv
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    def start(self) -> None:
        """Spawn the child; raises OSError (with the reason) if it cannot be started."""
        _become_subreaper()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        for sig in FORWARDED_SIGNALS:
            self._loop.add_signal_handler(sig, self.send, sig)
        # The app inherits our environment, but not the admin token: /drain is ours alone.
        env = {k: v for k, v in os.environ.items() if k != "SIDECAR_ADMIN_TOKEN"}
        self._proc = subprocess.Popen(self._argv, process_group=0, env=env)
        logger.info("started child", extra={"fields": {"pid": self._proc.pid, "argv": self._argv}})
        self.reap()  # it may already have exited before the handler could fire

    def reap(self) -> None:
        """Collect every exited child; remember our app's exit code."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._proc is not None and pid == self._proc.pid:
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code  # killed by signal N -> 128+N
                self._proc.returncode = code
                logger.info("child exited", extra={"fields": {"pid": pid, "exit_code": code}})
                if not self._exited.done():
                    self._exited.set_result(code)

    def send(self, sig: signal.Signals) -> bool:
        if self._proc is None or self._exited.done():
            return False
        try:
            os.kill(self._proc.pid, sig)
        except ProcessLookupError:
            return False
        logger.info("signalled child", extra={"fields": {"pid": self._proc.pid, "signal": sig.name}})
        return True

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def stop(self, sig: signal.Signals, wait: float) -> dict[str, object]:
        """Signal the child, SIGKILL it after ``wait`` seconds; report what happened."""
        result: dict[str, object] = {"action": "child", "pid": self.pid, "signal": sig.name}
        if self._exited.done():
            return {**result, "outcome": "already exited", "exit_code": self._exited.result()}
        self.send(sig)
        try:
            code = await asyncio.wait_for(self.wait(), wait)
            return {**result, "outcome": "exited", "exit_code": code}
        except TimeoutError:
            self.send(signal.SIGKILL)
            code = await asyncio.wait_for(self.wait(), 5.0)
            return {**result, "outcome": f"killed after {wait}s", "exit_code": code}


def _become_subreaper() -> None:
    """Adopt the app's orphaned descendants (as PID 1 does) so they are reaped too."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass
