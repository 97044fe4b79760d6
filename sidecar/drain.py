"""The drain: lifecycle states, in-flight tracking and the timeline, in plain asyncio.

Nothing here knows aiohttp.  The proxy registers each request as a ``Flight``
(with a callable that aborts it); the server injects what "stop admission" and
"tell the upstream to exit" mean.  So the whole timeline can be driven in a test
with plain coroutines.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .log import logger
from .metrics import Metrics

__all__ = ("Drain", "Flight", "State", "Summary")


class State(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    CLOSING = "closing"
    DRAINED = "drained"


class Flight:
    """One request in progress; ``abort()`` cuts it off (client and upstream)."""

    __slots__ = ("method", "path", "started")

    def __init__(self, method: str, path: str, started: float) -> None:
        self.method = method
        self.path = path
        self.started = started

    def abort(self) -> None:
        raise NotImplementedError


@dataclass
class Summary:
    state: str
    in_flight: int
    in_flight_at_trigger: int
    completed: int
    rejected: int
    aborted: int
    duration_seconds: float | None
    trigger: str | None
    exit: dict[str, Any] = field(default_factory=dict)


class Drain:
    """States, the set of requests in flight, and the drain timeline.

    ``trigger()`` starts the drain (later calls join it), ``deadline_now()``
    jumps to the deadline, ``run()`` is the timeline itself.
    """

    def __init__(
        self,
        *,
        delay: float,
        timeout: float,
        metrics: Metrics,
        close_spread: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._delay = delay
        self._timeout = timeout
        self._close_spread = min(close_spread, delay)  # the last part of the delay
        self._metrics = metrics
        self._clock = clock
        self._state = State.STARTING
        self._flights: set[Flight] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._triggered = asyncio.Event()
        self._skip_delay = asyncio.Event()
        self._deadline = asyncio.Event()
        self._drained = asyncio.Event()
        self._trigger_reason: str | None = None
        self._started_at: float | None = None
        self._phase_at: dict[str, float] = {}
        self._in_flight_at_trigger = 0
        self._completed = 0
        self._rejected = 0
        self._aborted = 0
        self._duration: float | None = None
        self._exit: dict[str, Any] = {}
        # Read on every request: plain attributes, not properties of the state.
        self.forwarding = False  # serving or draining
        self.admitting = True  # until closing

    # --- state -----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def triggered(self) -> bool:
        return self._triggered.is_set()

    def _enter(self, state: State, **fields: Any) -> None:
        self._state = state
        self.forwarding = state in (State.SERVING, State.DRAINING)
        self._metrics.set_state(state.value)
        if self._started_at is not None:
            self._phase_at[state.value] = round(self._clock() - self._started_at, 3)
        logger.info("state %s", state.value, extra={"fields": {"state": state.value, **fields}})

    def mark_serving(self) -> None:
        """The upstream answered its first health check: leave ``starting``."""
        if self._state is State.STARTING and not self.triggered:
            self._enter(State.SERVING)

    # --- in-flight tracking (the hot path) -------------------------------------------------

    def add(self, flight: Flight) -> None:
        self._flights.add(flight)
        if self._idle.is_set():
            self._idle.clear()

    def done(self, flight: Flight) -> None:
        try:
            self._flights.remove(flight)
        except KeyError:
            return  # aborted at the deadline: counted there, not as completed
        if self._started_at is not None:
            self._completed += 1
        if not self._flights:
            self._idle.set()

    def rejected(self) -> None:
        if self._started_at is not None:
            self._rejected += 1

    def __len__(self) -> int:
        return len(self._flights)

    def flights(self) -> list[Flight]:
        """The requests in flight now (a copy: off the hot path, for closing connections)."""
        return list(self._flights)

    # --- triggers ----------------------------------------------------------------------------

    def trigger(self, reason: str, *, skip_delay: bool = False) -> bool:
        """Start the drain, or join the one under way.  True if this call started it."""
        if skip_delay:
            self._skip_delay.set()
        if self._triggered.is_set():
            logger.info("drain already under way; joining it", extra={"fields": {"trigger": reason}})
            return False
        was_starting = self._state is State.STARTING
        if was_starting:  # never ready, so in no load balancer: no delay to wait out
            self._skip_delay.set()
        self._trigger_reason = reason
        self._triggered.set()
        # Readiness fails and Connection: close starts now, not on the next loop turn.
        self._started_at = self._clock()
        self._metrics.drain_started.set(time.time())
        self._in_flight_at_trigger = len(self._flights)
        self._enter(State.DRAINING, trigger=reason, in_flight=len(self._flights))
        if was_starting:
            self.forwarding = False  # the app never became healthy: still forward nothing to it
        return True

    def deadline_now(self) -> None:
        """Skip the delay and the wait for in-flight requests (a second Ctrl-C)."""
        self._skip_delay.set()
        self._deadline.set()

    async def wait_drained(self) -> None:
        await self._drained.wait()

    @property
    def drained(self) -> bool:
        return self._drained.is_set()

    # --- the timeline ------------------------------------------------------------------------

    async def run(
        self,
        *,
        stop_admission: Callable[[], Awaitable[None]],
        exit_upstream: Callable[[], Awaitable[dict[str, Any]]],
        spread_closes: Callable[[float], Awaitable[None]] | None = None,
        at_trigger: Callable[[], None] | None = None,
    ) -> Summary:
        """Wait for a trigger, then drain:

        1. ``draining``: readiness fails and every response carries Connection: close
           (``at_trigger`` tells HTTP/2 connections: GOAWAY and PING), while requests are
           still forwarded, for ``drain.delay``; over its last
           ``drain.close_spread``, ``spread_closes(end)`` closes idle connections one by
           one until ``end`` (the event loop's clock), cancelled if the delay is cut short;
        2. ``closing``: stop admission (listener closed, idle connections closed,
           late requests answered 503, websockets told 1001);
        3. wait until nothing is in flight, at most ``drain.timeout``;
        4. abort what is left, counting and logging each request;
        5. tell the upstream to exit and wait for it (``exit``);
        6. ``drained``: callers of /drain get their answer.
        """
        await self._triggered.wait()
        assert self._started_at is not None
        if at_trigger is not None:
            at_trigger()

        spreading = asyncio.ensure_future(self._spread(spread_closes)) if spread_closes else None
        await _first_of(self._skip_delay.wait(), timeout=self._delay)
        if spreading is not None:
            spreading.cancel()

        self.admitting = False
        await stop_admission()
        self._enter(State.CLOSING, in_flight=len(self._flights))

        await _first_of(self._idle.wait(), self._deadline.wait(), timeout=self._timeout)
        logger.info("in-flight requests done", extra={"fields": {
            "left_to_abort": len(self._flights), "completed": self._completed}})
        self._abort_all()

        self._exit = await exit_upstream()

        self._duration = round(self._clock() - self._started_at, 3)
        self._metrics.drain_duration.set(self._duration)
        self._enter(State.DRAINED)
        summary = self.summary()
        logger.info("drain finished", extra={"fields": _summary_fields(summary)})
        self._drained.set()
        return summary

    async def _spread(self, spread_closes: Callable[[float], Awaitable[None]]) -> None:
        """The close spread's window: the last ``close_spread`` seconds of the delay."""
        if self._close_spread <= 0:
            return
        await asyncio.sleep(self._delay - self._close_spread)
        await spread_closes(asyncio.get_running_loop().time() + self._close_spread)

    def _abort_all(self) -> None:
        now = self._clock()
        for flight in list(self._flights):
            self._aborted += 1
            self._metrics.aborted_drain_timeout.inc()
            logger.warning(
                "aborting request at the drain deadline",
                extra={"fields": {"method": flight.method, "path": flight.path,
                                  "age_seconds": round(now - flight.started, 3)}},
            )
            self._flights.discard(flight)
            flight.abort()
        self._idle.set()

    def summary(self) -> Summary:
        return Summary(
            state=self._state.value,
            in_flight=len(self._flights),
            in_flight_at_trigger=self._in_flight_at_trigger,
            completed=self._completed,
            rejected=self._rejected,
            aborted=self._aborted,
            duration_seconds=self._duration,
            trigger=self._trigger_reason,
            exit=self._exit,
        )

    def timings(self) -> dict[str, Any]:
        """Seconds from the trigger to each phase, for /status."""
        return {
            "delay_seconds": self._delay,
            "timeout_seconds": self._timeout,
            "elapsed_seconds": None if self._started_at is None
            else round((self._duration if self._duration is not None
                        else self._clock() - self._started_at), 3),
            "phases": dict(self._phase_at),
        }


def _summary_fields(summary: Summary) -> dict[str, Any]:
    fields = dict(summary.__dict__)
    fields.pop("state")
    return fields


async def _first_of(*waits: Awaitable[Any], timeout: float) -> None:
    """Return when any of ``waits`` completes or ``timeout`` seconds pass."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
