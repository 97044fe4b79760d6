"""`sidecar inject` and the Services around a workload: rewritten only when that is right
(every selected workload injected, not headless, not --keep-service), reported either way."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.injecting import (
    MANIFESTS,
    PUBLIC,
    container,
    env,
    find,
    inject,
    load_docs,
    sidecar,
    template,
    write,
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


def test_a_service_shared_with_an_opted_out_workload_is_never_rewritten(tmp_path: Path) -> None:
    """bookinfo's reviews Service selects v1, v2 and v3; v3 opted out (annotation): rewriting
    the numeric targetPort would send v3's traffic to a port it does not listen on, so the
    Service stays as it was and the report names it and the fix."""
    docs = load_docs(PUBLIC / "bookinfo.yaml")
    template(find(docs, "Deployment", "reviews-v3"))["metadata"]["annotations"] = {
        "sidecar.drain/inject": "disabled"}
    out, report = inject(str(write(tmp_path, docs)))
    assert find(out, "Service", "reviews") == find(docs, "Service", "reviews")
    assert ("warning: service/reviews is not rewritten: it also selects deployment/reviews-v3, "
            "which has no sidecar on the same port") in report
    assert "Give the app's containerPort a name and target that name" in report
    assert find(out, "Service", "details")["spec"]["ports"][0]["targetPort"] == 8080


def test_a_headless_service_is_not_rewritten_and_the_report_says_what_to_do(
        tmp_path: Path) -> None:
    """clusterIP: None: clients connect to the pods directly, so a targetPort rewrite would not
    route them through the sidecar; the Service is left alone with a 'headless' warning."""
    docs = load_docs(PUBLIC / "bookinfo.yaml")
    find(docs, "Service", "details")["spec"]["clusterIP"] = "None"
    out, report = inject(str(write(tmp_path, docs)))
    assert find(out, "Service", "details") == find(docs, "Service", "details")
    assert ("warning: service/details is headless (clusterIP: None): its clients connect to the "
            "pods directly on the port they know, not through it; point them at the sidecar's "
            "port 8080") in report


def test_a_numeric_rewrite_warns_about_the_rollout_and_names_the_safe_path() -> None:
    """The new targetPort applies at once, also to pods of the old ReplicaSet that have no
    sidecar yet: the report says so and names --keep-service."""
    _, report = inject(str(MANIFESTS / "api-numeric.yaml"))
    assert ("warning: service/api's new targetPort applies at once, also to pods that do not "
            "have the sidecar yet (nothing listens on 8080 there) until the rollout is done: for "
            "a running workload, apply with --keep-service first, then again without it") \
        in report


def test_keep_service_then_a_second_run_is_a_safe_two_phase_apply(tmp_path: Path) -> None:
    """Phase one (--keep-service): the workload is injected, the Service is untouched (traffic
    keeps going to the app's port on old and new pods alike) and the report says what comes
    next.  Phase two (inject the injected output again, without the flag, once every pod has
    the sidecar): only the Service changes, with no rollout warning; uninject undoes both."""
    first = sidecar("inject", str(MANIFESTS / "api-numeric.yaml"), "--keep-service")
    assert first.returncode == 0, first.stderr
    docs = [d for d in yaml.safe_load_all(first.stdout) if d]
    original = load_docs(MANIFESTS / "api-numeric.yaml")
    assert find(docs, "Service", "api") == find(original, "Service", "api")
    assert container(template(find(docs, "Deployment", "api"))["spec"], "drain-sidecar")
    assert ("service/api left as it is (--keep-service): its traffic keeps going straight to "
            "port 8000; once every pod of deployment/api has the sidecar, run inject again "
            "without --keep-service (or set targetPort: 8080)") in first.stderr
    (tmp_path / "phase1.yaml").write_text(first.stdout)
    second = sidecar("inject", str(tmp_path / "phase1.yaml"))
    assert second.returncode == 0, second.stderr
    again = [d for d in yaml.safe_load_all(second.stdout) if d]
    assert find(again, "Deployment", "api") == find(docs, "Deployment", "api")
    assert find(again, "Service", "api")["spec"]["ports"][0]["targetPort"] == 8080
    assert "service/api targetPort 8000 -> 8080 (the sidecar of deployment/api)" in second.stderr
    assert "applies at once" not in second.stderr
    (tmp_path / "phase2.yaml").write_text(second.stdout)
    back = sidecar("uninject", str(tmp_path / "phase2.yaml"))
    assert [d for d in yaml.safe_load_all(back.stdout) if d] == original


def test_a_service_targeting_a_port_that_is_not_fronted_is_left_alone() -> None:
    """redis-cart's Service targets 6379 by number: Redis is not fronted, so the Service is
    not touched (before, it was pointed at a sidecar that answered Redis with HTTP 400)."""
    out, report = inject(str(PUBLIC / "microservices-demo.yaml"))
    before = load_docs(PUBLIC / "microservices-demo.yaml")
    assert find(out, "Service", "redis-cart") == find(before, "Service", "redis-cart")
    assert find(out, "Deployment", "redis-cart") == find(before, "Deployment", "redis-cart")
    assert not any(line.startswith("service/redis-cart") for line in report.splitlines())


def test_a_headless_service_warns_only_when_it_carries_the_fronted_port(tmp_path: Path) -> None:
    """A StatefulSet's governing headless Service that lists the fronted port (by name) gets
    the warning; one that lists only the peers' transport port is none of the sidecar's
    business and gets none."""
    _, report = inject(str(MANIFESTS / "statefulset-multi.yaml"))
    assert "warning: service/search is headless (clusterIP: None)" in report
    docs = load_docs(MANIFESTS / "statefulset-multi.yaml")
    find(docs, "Service", "search")["spec"]["ports"] = [
        {"name": "transport", "port": 9300, "targetPort": "transport"}]
    out, report = inject(str(write(tmp_path, docs)))
    assert "headless" not in report
    assert find(out, "Service", "search") == find(docs, "Service", "search")
