"""`sidecar inject` and the Services around a workload: rewritten only when that is right
(every selected workload injected, not headless, not --keep-service), reported either way."""

from __future__ import annotations

from tests.injecting import (
    MANIFESTS,
    container,
    env,
    find,
    inject,
    template,
)


def test_a_service_targeting_the_app_by_number_is_rewritten_and_reported() -> None:
    """No name to take over: the Service in the same input now targets the sidecar's port, the
    report says so, and the sidecar's upstream is the app's port on loopback."""
    docs, report = inject(str(MANIFESTS / "api-numeric.yaml"))
    service = find(docs, "Service", "api")
    assert service["spec"]["ports"][0]["targetPort"] == 8080
    assert "service/api targetPort 8000 -> 8080" in report
    side = container(template(find(docs, "Deployment", "api"))["spec"], "drain-sidecar")
    assert env(side)["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:8000"


def test_a_numeric_port_without_a_service_warns_with_the_exact_edit() -> None:
    """The DaemonSet's app uses 8080 and no Service is in the input: the sidecar takes 8081 and
    the report tells the user which targetPort their Service must use instead of which."""
    docs, report = inject(str(MANIFESTS / "daemonset.yaml"))
    side = container(template(find(docs, "DaemonSet", "node-api"))["spec"], "drain-sidecar")
    assert side["ports"][0]["containerPort"] == 8081
    assert env(side)["SIDECAR_LISTEN"] == "0.0.0.0:8081"
    assert "warning: no Service in the input selects daemonset/node-api" in report
    assert "targetPort: 8081 (the sidecar) instead of 8080 (the app)" in report
