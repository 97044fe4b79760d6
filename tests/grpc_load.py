"""The gRPC side of the pod-termination replay (tests/k8s_replay.py): a grpcio app and
grpc.aio clients, plugged into ``replay_termination(app=grpc_replay_app, load=GrpcLoad)``.

The app is tests/apps/grpc_pod.py with ``--on-sigterm die``: a gRPC server with the standard
health service and no shutdown code, so a SIGTERM that comes before the drain has finished
drops the calls it is serving. It logs every call it received and answered (``--log``, the
replay's format), and each call's id is its answer, so a call is ``ok`` only if the client got
back its own id with status OK.

The clients are grpc.aio channels straight to the sidecar's port (h2c with prior knowledge),
one per worker, as many clients with a connection each; with gRPC's defaults (no retry policy:
only a call that never reached a server is retried, transparently). They learn of the drain
through HTTP/2 only: a channel told GOAWAY is no longer READY, which is what
``Outcome.closed`` records, and what makes a steady client leave once the pod is out of the
endpoints (it would connect to another pod; a laggard reconnects here until it is refused).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import grpc
import grpc.aio

from tests.k8s_replay import STEADY_WORKERS, Outcome, Replay

__all__ = ("GRPC_POD", "GrpcLoad", "grpc_replay_app")

GRPC_POD = Path(__file__).resolve().parent / "apps" / "grpc_pod.py"
HOLD = "/test.Echo/Hold"


def grpc_replay_app(port: int, log: Path, tag: str) -> list[str]:
    """The replay's gRPC app: grpc_pod.py, health "" SERVING, dying at once on SIGTERM."""
    return [sys.executable, str(GRPC_POD), "--port", str(port), "--log", str(log),
            "--on-sigterm", "die"]


class GrpcLoad:
    """The replay's load (tests/k8s_replay.py's ReplayLoad) as unary gRPC calls: steady
    workers and laggards on a channel each, and long calls on channels of their own."""

    def __init__(self, url: str, replay: Replay, *, timeout: float) -> None:
        self.target = url.removeprefix("http://")
        self.replay = replay
        self.timeout = timeout
        self.endpoints_removed = asyncio.Event()
        self.stop = asyncio.Event()
        self.warm = asyncio.Event()
        self.in_flight = 0
        self._ids = itertools.count()

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target)

    async def call(self, channel: grpc.aio.Channel, who: str, ms: int) -> Outcome:
        rid = f"{who}-{next(self._ids)}"
        request = json.dumps({"id": rid, "ms": ms}).encode()
        started = time.monotonic()
        self.in_flight += 1
        try:
            reply = await channel.unary_unary(HOLD)(request, timeout=self.timeout)
            kind = "ok" if reply == rid.encode() else "status"
            outcome = Outcome(rid, kind, started, time.monotonic(), grpc.StatusCode.OK.value[0],
                              reply[:80].decode(errors="replace"))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            kind = "unavailable" if code == grpc.StatusCode.UNAVAILABLE else "status"
            outcome = Outcome(rid, kind, started, time.monotonic(), code.value[0],
                              f"{code.name}: {exc.details()}")
        finally:
            self.in_flight -= 1
        outcome.closed = not self.ready(channel)
        self.replay.outcomes.append(outcome)
        if sum(o.kind == "ok" for o in self.replay.outcomes) >= 2 * STEADY_WORKERS:
            self.warm.set()
        return outcome

    @staticmethod
    def ready(channel: grpc.aio.Channel) -> bool:
        """The channel's connection is up and was not told GOAWAY."""
        return channel.get_state() == grpc.ChannelConnectivity.READY

    async def steady(self, n: int, *, laggard: bool = False) -> None:
        who = f"{'laggard' if laggard else 'steady'}{n}"
        async with self.channel() as channel:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                if not laggard and self.endpoints_removed.is_set() and not self.ready(channel):
                    return  # no new connection to a pod that left the endpoints
                outcome = await self.call(channel, who, 100 + (n * 7 + i * 13) % 100)
                if outcome.kind == "unavailable":
                    if laggard or self.endpoints_removed.is_set():
                        return  # the pod is gone from this client's point of view
                    await asyncio.sleep(0.01)

    async def long(self, n: int, ms: int) -> None:
        async with self.channel() as channel:
            await self.call(channel, f"long{n}", ms)
