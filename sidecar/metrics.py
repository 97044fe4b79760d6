"""The contract's metrics, on an injected registry (a fresh one per test).

Per-request work is a dict lookup and three additions: the two per-request series
(``sidecar_requests_total``, ``sidecar_request_duration_seconds``) are plain numbers in
``RequestSeries``, a custom collector (prometheus_client's public ``Metric``) that turns
them into samples at scrape time, in the same shape as a ``Counter`` and a ``Histogram``.
prometheus_client's own types take a lock and several calls per update, and the
histogram finds its bucket in a Python loop: together about 6 % of the proxy's CPU per
request.  The event loop is the only writer and the only reader (the scrape runs on it),
so no lock is needed.  The gauges that mirror live state (in flight, connections,
websockets) are read from callbacks at scrape time.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Metric

__all__ = ("BUDGET_KEYS", "DRAIN_STATES", "Metrics", "RequestSeries")

DRAIN_STATES = ("starting", "serving", "draining", "closing", "drained")
# The config keys exported as sidecar_<key with _ for .>_seconds gauges (set once at start).
BUDGET_KEYS = ("drain.delay", "drain.timeout", "exit.wait", "drain.grace_period")
# Web latency from 5 ms to 60 s.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_in_flight = Gauge(
            "sidecar_requests_in_flight", "Proxied requests in progress (streams and websockets included)",
            registry=r)
        self.requests = RequestSeries()
        r.register(self.requests)
        # Count one answered request: request_done(method, code, seconds), the hot path.
        self.request_done: Callable[[str, int, float], None] = self.requests.done
        self.requests_rejected = Counter(
            "sidecar_requests_rejected_total", "Requests answered 503 without being forwarded",
            ["reason"], registry=r)
        self.requests_aborted = Counter(
            "sidecar_requests_aborted_total", "Requests cut off before they completed",
            ["reason"], registry=r)
        self.upstream_errors = Counter(
            "sidecar_upstream_errors_total", "Failed exchanges with the upstream, by kind",
            ["kind"], registry=r)
        self.connections_open = Gauge(
            "sidecar_connections_open", "Open client connections on the proxy listener", registry=r)
        self.websockets_open = Gauge(
            "sidecar_websockets_open", "Proxied websockets open", registry=r)
        self.drain_state = Gauge(
            "sidecar_drain_state", "1 for the current lifecycle state", ["state"], registry=r)
        self.drain_started = Gauge(
            "sidecar_drain_started_timestamp_seconds", "Unix time the drain was triggered (0 before)",
            registry=r)
        self.drain_duration = Gauge(
            "sidecar_drain_duration_seconds", "Seconds from the drain trigger to drained (0 before)",
            registry=r)
        self.upstream_up = Gauge(
            "sidecar_upstream_up", "1 when the last upstream health probe succeeded", registry=r)
        # The configured drain budget, so alerts and dashboards compare a drain with the
        # budget of its own pod instead of one hard-coded grace period for every workload.
        self.budget = {
            key: Gauge(f"sidecar_{key.replace('.', '_')}_seconds",
                       f"Configured {key} in seconds (set at start)", registry=r)
            for key in BUDGET_KEYS
        }

        # Every labelled series exists from startup, at zero.
        for reason in ("draining", "starting"):
            self.requests_rejected.labels(reason)
        self.requests_aborted.labels("drain_timeout")
        for kind in ("connect", "timeout", "reset"):
            self.upstream_errors.labels(kind)
        for method in ("GET", "POST"):
            self.requests.durations(method)
        self.set_state("starting")

        self.rejected_draining = self.requests_rejected.labels("draining")
        self.rejected_starting = self.requests_rejected.labels("starting")
        self.aborted_drain_timeout = self.requests_aborted.labels("drain_timeout")

    def watch(
        self,
        *,
        in_flight: Callable[[], float],
        connections: Callable[[], float],
        websockets: Callable[[], float],
    ) -> None:
        """Read the live gauges from these callbacks at scrape time."""
        self.requests_in_flight.set_function(in_flight)
        self.connections_open.set_function(connections)
        self.websockets_open.set_function(websockets)

    def set_budget(self, budget: dict[str, float]) -> None:
        """Export the configured drain budget (seconds), keyed by config key (BUDGET_KEYS)."""
        for key, gauge in self.budget.items():
            gauge.set(budget[key])

    def set_state(self, state: str) -> None:
        for name in DRAIN_STATES:
            self.drain_state.labels(name).set(1 if name == state else 0)


def _created_series() -> bool:
    """prometheus_client's own switch for the ``_created`` samples (its environment variable)."""
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


class _Durations:
    """One ``method`` label's histogram: per-bucket (not cumulative) counts, +Inf last."""

    __slots__ = ("buckets", "created", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0
        self.created = time.time()


class _Series:
    """One (``method``, ``code``) count, and its method's histogram."""

    __slots__ = ("count", "created", "durations")

    def __init__(self, durations: _Durations) -> None:
        self.count = 0
        self.created = time.time()
        self.durations = durations


class RequestSeries:
    """``sidecar_requests_total{method,code}`` and ``sidecar_request_duration_seconds{method}``,
    collected as prometheus_client's ``Counter`` and ``Histogram`` would show them (samples,
    label order, series order, ``_created``)."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Series] = {}  # by label values, in creation order
        self._durations: dict[str, _Durations] = {}
        self._cache: dict[tuple[str, int], _Series] = {}  # by what the request said
        self._created = _created_series()

    def done(self, method: str, code: int, seconds: float) -> None:
        series = self._cache.get((method, code))
        if series is None:
            series = self._series_for(method, code)
        series.count += 1
        durations = series.durations
        durations.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1  # le: bound included
        durations.sum += seconds

    def durations(self, method: str) -> _Durations:
        durations = self._durations.get(method)
        if durations is None:
            durations = self._durations[method] = _Durations()
        return durations

    def _series_for(self, method: str, code: int) -> _Series:
        # Unknown methods share one label so a client cannot blow up the series count.
        label = method if method in METHODS else "other"
        key = (label, str(code))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self.durations(label))
        if len(self._cache) < 1000:
            self._cache[(method, code)] = series
        return series

    # --- prometheus_client's collector interface ----------------------------------------------

    def describe(self) -> list[Metric]:
        return [self._counter_family(), self._histogram_family()]

    def collect(self) -> Iterator[Metric]:
        counter = self._counter_family()
        for (method, code), series in list(self._series.items()):
            labels = {"method": method, "code": code}
            counter.add_sample("sidecar_requests_total", labels, float(series.count))
            if self._created:
                counter.add_sample("sidecar_requests_created", labels, series.created)
        yield counter
        histogram = self._histogram_family()
        name = "sidecar_request_duration_seconds"
        for method, durations in list(self._durations.items()):
            acc = 0.0
            for bound, count in zip(_BOUNDS, durations.buckets):
                acc += count
                histogram.add_sample(f"{name}_bucket", {"method": method, "le": bound}, acc)
            histogram.add_sample(f"{name}_count", {"method": method}, acc)
            histogram.add_sample(f"{name}_sum", {"method": method}, durations.sum)
            if self._created:
                histogram.add_sample(f"{name}_created", {"method": method}, durations.created)
        yield histogram

    @staticmethod
    def _counter_family() -> Metric:
        return Metric("sidecar_requests", "Proxied requests answered, by method and status code",
                      "counter")

    @staticmethod
    def _histogram_family() -> Metric:
        return Metric("sidecar_request_duration_seconds",
                      "Time from request received to last response byte sent", "histogram")


_BOUNDS = [*(repr(b) for b in DURATION_BUCKETS), "+Inf"]  # as prometheus_client writes them
