"""`sidecar inject`: which port it fronts (the contract's "Which ports inject fronts"), how the
user chooses one (annotation, --port), and the names the ports get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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


def test_the_port_annotation_chooses_among_several_ports() -> None:
    """A two-container StatefulSet with three ports: sidecar.drain/port picks `query`; the other
    ports are untouched (the other container only gains the preStop that waits for the drain,
    as it serves traffic too); tuning annotations reach the env."""
    docs, _ = inject(str(MANIFESTS / "statefulset-multi.yaml"))
    spec = template(find(docs, "StatefulSet", "search"))["spec"]
    engine, exporter = container(spec, "engine"), container(spec, "exporter")
    assert [p["name"] for p in engine["ports"]] == ["query-app", "transport"]
    assert exporter["ports"] == [{"name": "metrics", "containerPort": 9114}]
    # It serves traffic too, so it waits for the drain before its SIGTERM (issue 14 §3).
    assert exporter["lifecycle"] == {"preStop": {"httpGet": {"path": "/drain", "port": 9901}}}
    side = container(spec, "drain-sidecar")
    assert side["ports"][0]["name"] == "query"
    assert env(side)["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:9200"
    assert env(side)["SIDECAR_DRAIN_LINGER"] == "5s"
    assert env(side)["SIDECAR_LOGGING_ACCESS_LOG"] == "true"


def test_several_ports_without_the_annotation_is_an_error(tmp_path: Path) -> None:
    """Which port do clients use? Not guessed: exit 2 listing the ports and the annotation."""
    docs = load_docs(MANIFESTS / "statefulset-multi.yaml")
    del template(docs[0])["metadata"]["annotations"]["sidecar.drain/port"]
    done = sidecar("inject", str(write(tmp_path, docs)))
    assert done.returncode == 2 and done.stdout == ""
    assert ("statefulset/search: 3 TCP container ports (query 9200 in engine, transport 9300 in "
            "engine, metrics 9114 in exporter)") in done.stderr
    assert "sidecar.drain/port" in done.stderr


# ---- the contract's rules, one by one -----------------------------------------------------------

def _app(port: dict[str, Any], service_port: dict[str, Any] | None = None,
         probe: dict[str, Any] | None = None) -> list[Any]:
    """A one-port Deployment (and a Service that targets that port, if given)."""
    app: dict[str, Any] = {"name": "app", "image": "ghcr.io/example/app:1", "ports": [port]}
    if probe:
        app["readinessProbe"] = probe
    docs: list[Any] = [{
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
        "spec": {"selector": {"matchLabels": {"app": "app"}}, "template": {
            "metadata": {"labels": {"app": "app"}}, "spec": {"containers": [app]}}}}]
    if service_port is not None:
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "app"},
                     "spec": {"selector": {"app": "app"}, "ports": [service_port]}})
    return docs


RULES = {  # case: (container port, Service port, probe, fronted?, why, the sidecar's port name)
    "appProtocol redis": ({"containerPort": 7000}, {"port": 80, "targetPort": 7000,
                          "appProtocol": "redis", "name": "http"}, None, False,
                          "appProtocol redis of service/app port http", None),
    "appProtocol h2c": ({"containerPort": 7000}, {"port": 80, "targetPort": 7000, "appProtocol":
                        "kubernetes.io/h2c"}, None, True,
                        "appProtocol kubernetes.io/h2c of service/app port 80", "http"),
    "appProtocol grpc": ({"containerPort": 7000}, {"port": 80, "targetPort": 7000,
                         "appProtocol": "grpc"}, None, True,
                         "appProtocol grpc of service/app port 80", "grpc"),
    "Service port name tcp-": ({"containerPort": 7000, "name": "http"}, {
        "port": 80, "targetPort": "http", "name": "tcp-main"}, None, False,
        "service/app port name 'tcp-main'", None),
    "Service port name http2": ({"containerPort": 7000}, {"port": 80, "targetPort": 7000,
                                "name": "http2-web"}, None, True,
                                "service/app port name 'http2-web'", "http"),
    "container port name mysql": ({"containerPort": 7000, "name": "mysql"}, None, None, False,
                                  "port name 'mysql'", None),
    "container port name https": ({"containerPort": 8443, "name": "https"}, None, None, False,
                                  "port name 'https'", None),
    "grpc probe on 6379": ({"containerPort": 6379}, None, {"grpc": {"port": 6379}}, True,
                           "a grpc probe on it", "grpc"),
    "httpGet probe": ({"containerPort": 5432, "name": "web"}, None, {
        "httpGet": {"path": "/", "port": "web"}}, True, "an httpGet probe on it", "web"),
    "tcpSocket probe says nothing": ({"containerPort": 3306}, None, {
        "tcpSocket": {"port": 3306}}, False, "3306 is a well-known non-HTTP port", None),
    "well-known ZooKeeper": ({"containerPort": 2181}, None, None, False,
                             "2181 is a well-known non-HTTP port", None),
    "anything else": ({"containerPort": 7000}, None, None, True, "nothing says it is not",
                      "http"),
}


@pytest.mark.parametrize("case", list(RULES))
def test_each_rule_decides_whether_a_port_is_fronted(case: str, tmp_path: Path) -> None:
    """The contract's "Which ports inject fronts": appProtocol, then the Service's and the
    container's port name prefix, then a probe, then well-known numbers, else HTTP.  A port
    that is not HTTP is never fronted, the workload stays as it was (exit 0) and the report
    names the rule; one that is gets a sidecar whose port is named for what it carries."""
    port, service_port, probe, fronted, why, name = RULES[case]
    docs = _app(port, service_port, probe)
    done = sidecar("inject", str(write(tmp_path, docs)), "--image", "example/sidecar:1")
    assert done.returncode == 0, done.stderr
    out = [d for d in yaml.safe_load_all(done.stdout) if d]
    if not fronted:
        assert out == docs
        assert "deployment/app skipped (no HTTP port to front)" in done.stderr
        assert f"is not HTTP ({why}): not fronted, its traffic goes straight to the app" \
            in done.stderr
        return
    assert f"(HTTP: {why})" in done.stderr, done.stderr
    side = container(template(out[0])["spec"], "drain-sidecar")
    assert side["ports"][0]["name"] == name
    assert env(side)["SIDECAR_UPSTREAM_URL"] == f"http://127.0.0.1:{port['containerPort']}"


def test_an_explicit_choice_wins_over_the_rules_and_says_so(tmp_path: Path) -> None:
    """--port (or the annotation) fronts a port the rules call not HTTP: the user decided, and
    the report repeats what the rules said."""
    docs = _app({"containerPort": 6379, "name": "cache"})
    done = sidecar("inject", str(write(tmp_path, docs)), "--port", "cache")
    assert done.returncode == 0, done.stderr
    assert ("fronts port 6379 (cache) of container 'app': chosen by --port, though the rules "
            "say it is not HTTP (6379 is a well-known non-HTTP port)") in done.stderr


def test_a_port_annotation_that_names_no_declared_port_exits_2(tmp_path: Path) -> None:
    """sidecar.drain/port: 9999 on a pod that declares no 9999 would point the sidecar at
    nothing and the pod would never become Ready: exit 2 naming the annotation."""
    docs = load_docs(MANIFESTS / "api-numeric.yaml")
    template(docs[0])["metadata"]["annotations"] = {"sidecar.drain/port": "9999"}
    done = sidecar("inject", str(write(tmp_path, docs)))
    assert done.returncode == 2 and done.stdout == ""
    assert ("deployment/api: annotation sidecar.drain/port: '9999' names no single TCP container "
            "port (ports: - 8000 in api); the pod would never become Ready") in done.stderr


def test_the_port_flag_counts_only_where_that_port_exists(tmp_path: Path) -> None:
    """--port grpc picks grpc in the workloads that have it; the others choose as without it."""
    docs = load_docs(PUBLIC / "emojivoto" / "emoji.yml") + load_docs(
        PUBLIC / "emojivoto" / "web.yml")
    out, report = inject(str(write(tmp_path, docs)), "--port", "grpc")
    assert "fronts port 8080 (grpc) of container 'emoji-svc': chosen by --port" in report
    assert "fronts port 8080 (http) of container 'web-svc' (HTTP: service/web-svc" in report
    assert container(template(find(out, "Deployment", "web"))["spec"], "drain-sidecar")


def test_a_grpc_workload_is_injected_for_grpc() -> None:
    """microservices-demo's checkoutservice (gRPC, a grpc: readiness probe): the sidecar's port
    is named grpc, upstream.health_grpc checks what the probe checks (the whole server), the
    app's own grpc probes still reach the app, its preStop waits for the drain, and the Service
    targets the sidecar."""
    out, _ = inject(str(PUBLIC / "microservices-demo.yaml"))
    spec = template(find(out, "Deployment", "checkoutservice"))["spec"]
    side = container(spec, "drain-sidecar")
    assert [(p["name"], p["containerPort"]) for p in side["ports"]] == [("grpc", 8080),
                                                                         ("admin", 9901)]
    assert env(side)["SIDECAR_UPSTREAM_HEALTH_GRPC"] == ""
    assert env(side)["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:5050"
    app = container(spec, "server")
    assert app["readinessProbe"]["grpc"] == {"port": 5050}
    assert app["lifecycle"]["preStop"] == {"httpGet": {"path": "/drain", "port": 9901}}
    service = find(out, "Service", "checkoutservice")
    assert service["spec"]["ports"][0]["targetPort"] == 8080


def test_a_grpc_probe_names_the_service_the_sidecar_checks(tmp_path: Path) -> None:
    """A grpc readinessProbe with service: the sidecar's upstream.health_grpc is that service;
    an annotation still wins."""
    docs = _app({"containerPort": 50051, "name": "grpc"}, None,
                {"grpc": {"port": 50051, "service": "shop.Cart"}})
    out, report = inject(str(write(tmp_path, docs)))
    side = container(template(out[0])["spec"], "drain-sidecar")
    assert env(side)["SIDECAR_UPSTREAM_HEALTH_GRPC"] == "shop.Cart"
    assert "upstream.health_grpc is 'shop.Cart'" in report
    template(docs[0])["metadata"]["annotations"] = {
        "sidecar.drain/upstream.health_grpc": "other"}
    out, _ = inject(str(write(tmp_path, docs)))
    side = container(template(out[0])["spec"], "drain-sidecar")
    assert env(side)["SIDECAR_UPSTREAM_HEALTH_GRPC"] == "other"


def test_renamed_ports_are_never_cut_mid_word() -> None:
    """A name with no room for -app becomes app-NUMBER (podinfo's http-metrics), not
    http-metrics-a; a short one becomes NAME-app; both stay valid port names."""
    out, report = inject(str(PUBLIC / "podinfo" / "deployment.yaml"), "--port", "http-metrics")
    ports = container(template(out[0])["spec"], "podinfod")["ports"]
    assert [p["name"] for p in ports] == ["http", "app-9797", "grpc"]
    assert "port 'http-metrics' of container 'podinfod' is now 'app-9797'" in report
