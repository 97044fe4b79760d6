"""The drain timeline in plain asyncio: no sockets, an injected clock-free trigger."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.drain import Drain, Flight, State
from sidecar.metrics import Metrics


class FakeFlight(Flight):
    """A request stand-in that records whether it was aborted."""

    def __init__(self, path: str) -> None:
        super().__init__("GET", path, 0.0)
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


async def _run(drain: Drain, log: list[str]) -> Any:
    async def stop_admission() -> None:
        log.append("stop_admission")

    async def exit_upstream() -> dict[str, Any]:
        log.append("exit_upstream")
        return {"action": "none", "outcome": "nothing configured"}

    return await drain.run(stop_admission=stop_admission, exit_upstream=exit_upstream)


async def test_drain_finishes_as_soon_as_nothing_is_in_flight() -> None:
    drain = Drain(delay=0.0, timeout=60.0, metrics=Metrics())
    drain.mark_serving()
    flight = FakeFlight("/slow")
    drain.add(flight)
    log: list[str] = []
    task = asyncio.ensure_future(_run(drain, log))
    assert drain.trigger("test")
    assert not drain.trigger("again")  # joins, never restarts
    while drain.state is not State.CLOSING:
        await asyncio.sleep(0)
    assert not drain.admitting
    drain.done(flight)  # the event, not a timer, ends the wait
    summary = await asyncio.wait_for(task, 1)
    assert summary.aborted == 0 and summary.completed == 1 and summary.in_flight_at_trigger == 1
    assert log == ["stop_admission", "exit_upstream"] and drain.state is State.DRAINED


async def test_drain_aborts_what_is_left_at_the_deadline_and_counts_it() -> None:
    metrics = Metrics()
    drain = Drain(delay=0.0, timeout=0.01, metrics=metrics)
    flight = FakeFlight("/stuck")
    drain.add(flight)
    drain.trigger("test")
    summary = await asyncio.wait_for(_run(drain, []), 1)
    assert flight.aborted and summary.aborted == 1 and len(drain) == 0
    drain.done(flight)  # the aborted request's handler unwinds later
    assert drain.summary().completed == 0
    assert metrics.aborted_drain_timeout._value.get() == 1


async def test_deadline_now_skips_the_delay_and_the_wait() -> None:
    drain = Drain(delay=3600.0, timeout=3600.0, metrics=Metrics())
    flight = FakeFlight("/stuck")
    drain.add(flight)
    task = asyncio.ensure_future(_run(drain, []))
    drain.trigger("SIGINT")
    drain.deadline_now()
    summary = await asyncio.wait_for(task, 1)
    assert summary.aborted == 1 and flight.aborted
