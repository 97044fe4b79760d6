"""The contract's metrics, on an injected registry (a fresh one per test).

Per-request work is kept to a dict lookup and one counter/histogram update:
label children are cached, and the gauges that mirror live state (in flight,
connections, websockets) are read from callbacks at scrape time instead of
being incremented on every request.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ("BUDGET_KEYS", "DRAIN_STATES", "Metrics")

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
        self.requests_total = Counter(
            "sidecar_requests_total", "Proxied requests answered, by method and status code",
            ["method", "code"], registry=r)
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds", "Time from request received to last response byte sent",
            ["method"], buckets=DURATION_BUCKETS, registry=r)
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
            self.request_duration.labels(method)
        self.set_state("starting")

        self._done: dict[tuple[str, int], Callable[[float], None]] = {}
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

    def request_done(self, method: str, code: int, seconds: float) -> None:
        """Count one answered request: the hot path, one dict lookup when warm."""
        record = self._done.get((method, code))
        if record is None:
            record = self._make_record(method, code)
        record(seconds)

    def _make_record(self, method: str, code: int) -> Callable[[float], None]:
        # Unknown methods share one label so a client cannot blow up the series count.
        label = method if method in METHODS else "other"
        counter = self.requests_total.labels(label, str(code))
        histogram = self.request_duration.labels(label)

        def record(seconds: float) -> None:
            counter.inc()
            histogram.observe(seconds)

        if len(self._done) < 1000:
            self._done[(method, code)] = record
        return record

    def set_state(self, state: str) -> None:
        for name in DRAIN_STATES:
            self.drain_state.labels(name).set(1 if name == state else 0)
