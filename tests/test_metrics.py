"""The per-request series are plain numbers collected at scrape time (sidecar.metrics.RequestSeries):
a scrape must show exactly what prometheus_client's own Counter and Histogram would show for the
same requests, in both exposition formats, so dashboards and alerts cannot tell the difference."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from sidecar.metrics import DURATION_BUCKETS, METHODS, RequestSeries

# Bucket edges included on purpose: a bucket's bound is inside it (le).
REQUESTS = [
    ("GET", 200, 0.003), ("GET", 200, 0.005), ("GET", 200, 0.0050001), ("GET", 200, 0.03),
    ("FOO", 404, 0.3), ("BAR", 404, 1.0), ("POST", 503, 0.0), ("DELETE", 204, 99.0),
    ("GET", 499, 60.0), ("PUT", 201, 2.5), ("get", 200, 0.01),
]


def _reference(requests: list[tuple[str, int, float]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    total = Counter("sidecar_requests_total", "Proxied requests answered, by method and status code",
                    ["method", "code"], registry=registry)
    duration = Histogram("sidecar_request_duration_seconds",
                         "Time from request received to last response byte sent",
                         ["method"], buckets=DURATION_BUCKETS, registry=registry)
    for method in ("GET", "POST"):
        duration.labels(method)
    for method, code, seconds in requests:
        label = method if method in METHODS else "other"
        total.labels(label, str(code)).inc()
        duration.labels(label).observe(seconds)
    return registry


def _ours(requests: list[tuple[str, int, float]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    series = RequestSeries()
    registry.register(series)
    for method in ("GET", "POST"):
        series.durations(method)
    for method, code, seconds in requests:
        series.done(method, code, seconds)
    return registry


def _without_timestamps(text: bytes) -> str:
    """``_created`` values are the wall clock at series creation: the only difference allowed."""
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", text.decode())


@pytest.mark.parametrize("generate", [generate_latest, generate_openmetrics],
                         ids=["text-0.0.4", "openmetrics"])
def test_request_series_scrape_exactly_as_prometheus_client_counter_and_histogram(generate) -> None:
    ours = _without_timestamps(generate(_ours(REQUESTS)))
    assert ours == _without_timestamps(generate(_reference(REQUESTS)))
    assert 'sidecar_requests_total{code="404",method="other"} 2.0' in ours
    assert 'sidecar_request_duration_seconds_bucket{le="0.005",method="GET"} 2.0' in ours


def test_request_series_exist_from_startup_at_zero() -> None:
    """Dashboards see GET and POST latency series before the first request."""
    assert _without_timestamps(generate_latest(_ours([]))) == \
        _without_timestamps(generate_latest(_reference([])))


def test_unknown_methods_share_one_label_however_many_there_are() -> None:
    """A client sending made-up methods cannot grow the series count."""
    registry = _ours([(f"M{i}", 200, 0.001) for i in range(2000)])
    text = generate_latest(registry).decode()
    assert text.count("sidecar_requests_total{") == 1
    assert 'sidecar_requests_total{code="200",method="other"} 2000.0' in text
