"""`sidecar inject` over real public manifests, as a new user would pipe them in.

tests/manifests/public/ holds manifests of nine public projects (each file names its source,
commit and licence): Google's microservices-demo, Istio's bookinfo, kubernetes/examples'
guestbook-go (a ReplicationController, Redis) and storm ZooKeeper, kube-prometheus' node-exporter
(kube-rbac-proxy's TLS port, a headless Service), an Argo Rollout, the OpenTelemetry demo's
rendered chart (Postgres, Valkey, Kafka, flagd), podinfo's and emojivoto's kustomize
directories, and ingress-nginx (whose controller has a preStop of its own: refused unless
excluded).  For each: the report says what was fronted and why, what was not and why; the
output validates strictly against a recent Kubernetes; uninject gives back exactly what went
in; injecting twice changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.injecting import (
    KUBERNETES_RECENT,
    PUBLIC,
    flat,
    load_docs,
    sidecar,
    validate,
)

# source: (inputs, flags, report lines that must be there, workloads injected)
CORPUS: dict[str, tuple[list[str], list[str], list[str], set[str]]] = {
    "microservices-demo": (["microservices-demo.yaml"], [], [
        "deployment/frontend injected",
        "  - fronts port 8080 of container 'server' (HTTP: service/frontend port name 'http')",
        "deployment/redis-cart skipped (no HTTP port to front)",
        ("  - port 6379 of container 'redis' is not HTTP (service/redis-cart port name "
        "'tcp-redis'): not fronted, its traffic goes straight to the app"),
        ("  - fronts port 5050 of container 'server' (HTTP: service/checkoutservice port name "
        "'grpc')"),
        ("  - upstream.health_grpc is '', what the app's grpc readinessProbe checks: readiness "
        "also needs the app SERVING"),
        "deployment/loadgenerator skipped (no TCP container port to front)",
        "service/frontend targetPort 8080 -> 8081 (the sidecar of deployment/frontend)",
    ], {"frontend", "cartservice", "checkoutservice"}),
    "bookinfo": (["bookinfo.yaml"], ["--exclude", "deployment/reviews-v3"], [
        "deployment/reviews-v3 skipped (--exclude)",
        ("  warning: service/reviews is not rewritten: it also selects deployment/reviews-v3, "
        "which has no sidecar on the same port; its traffic keeps going straight to the app of "
        "deployment/reviews-v1, deployment/reviews-v2 too. Give the app's containerPort a name "
        "and target that name, so each pod resolves it to its own port"),
        "service/details targetPort 9080 -> 8080 (the sidecar of deployment/details-v1)",
    ], {"details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "productpage-v1"}),
    "guestbook-go": (["guestbook-go.yaml"], [], [
        "deployment/redis-master skipped (no HTTP port to front)",
        ("  - port 6379 (redis-server) of container 'redis-master' is not HTTP (port name "
        "'redis-server'): not fronted, its traffic goes straight to the app"),
        "replicationcontroller/guestbook injected",
        ("  - port 'http-server' of container 'guestbook' is now 'http-server-app'; the sidecar "
        "took over 'http-server'"),
    ], {"guestbook"}),
    "storm-zookeeper": (["storm-zookeeper.yaml"], [], [
        "pod/zookeeper skipped (no HTTP port to front)",
        ("  - port 2181 of container 'zookeeper' is not HTTP (2181 is a well-known non-HTTP "
        "port): not fronted, its traffic goes straight to the app"),
    ], set()),
    "kube-prometheus": (["kube-prometheus-node-exporter.yaml"], [], [
        "daemonset/node-exporter -n monitoring skipped (no HTTP port to front)",
        ("  - port 9100 (https) of container 'kube-rbac-proxy' is not HTTP (service/node-exporter "
        "-n monitoring port name 'https'): not fronted, its traffic goes straight to the app"),
    ], set()),
    "argo-rollouts": (["argo-rollouts-bluegreen.yaml"], [], [
        "rollout/rollout-bluegreen injected",
        ("service/rollout-bluegreen-active targetPort 8080 -> 8081 (the sidecar of "
        "rollout/rollout-bluegreen)"),
        ("service/rollout-bluegreen-preview targetPort 8080 -> 8081 (the sidecar of "
        "rollout/rollout-bluegreen)"),
    ], {"rollout-bluegreen"}),
    "opentelemetry-demo": (["opentelemetry-demo.yaml"], ["--port", "rpc"], [
        "deployment/postgresql skipped (no HTTP port to front)",
        ("  - port 5432 (service) of container 'postgresql' is not HTTP (service/postgresql port "
        "name 'tcp-service'): not fronted, its traffic goes straight to the app"),
        "deployment/valkey-cart skipped (no HTTP port to front)",
        ("  - port 6379 (valkey-cart) of container 'valkey-cart' is not HTTP (6379 is a "
        "well-known non-HTTP port): not fronted, its traffic goes straight to the app"),
        "deployment/cart skipped (no HTTP port to front)",
        ("  - fronts port 8013 (rpc) of container 'flagd': chosen by --port (HTTP: nothing says "
        "it is not)"),
        ("  - port 4000 (service) of container 'flagd-ui' is not HTTP (service/flagd port name "
        "'tcp-service-0'): not fronted, its traffic goes straight to the app"),
        ("  - port 9092 (plaintext) of container 'kafka' is not HTTP (9092 is a well-known "
        "non-HTTP port): not fronted, its traffic goes straight to the app"),
        # Rule 5 speaks for Kafka's controller port (nothing names it): the report says so.
        ("  - fronts port 9093 (controller) of container 'kafka' (HTTP: nothing says it is not); "
         "if it is not, name it tcp-... (or give its Service port an appProtocol) and inject "
         "again"),
    ], {"flagd", "kafka"}),
    "podinfo": (["podinfo"], ["--port", "http"], [
        ("kustomization.yaml: skipped (a kustomize Kustomization, not a Kubernetes object: "
        "render it with 'kubectl kustomize DIR' and pipe that in)"),
        "deployment/podinfo injected",
        ("  - fronts port 9898 (http) of container 'podinfod': chosen by --port (HTTP: "
        "service/podinfo port name 'http')"),
        ("  - port 9999 (grpc) of container 'podinfod' is HTTP too (service/podinfo port name "
        "'grpc') but not fronted: the sidecar fronts one port"),
    ], {"podinfo"}),
    "emojivoto": (["emojivoto"], ["--port", "grpc"], [
        "kustomization.yml: skipped (a kustomize Kustomization",
        "deployment/emoji -n emojivoto injected",
        ("  - fronts port 8080 (grpc) of container 'emoji-svc': chosen by --port (HTTP: "
        "service/emoji-svc -n emojivoto port name 'grpc')"),
        "deployment/web -n emojivoto injected",
        "deployment/vote-bot -n emojivoto skipped (no TCP container port to front)",
    ], {"emoji", "voting", "web"}),
    "ingress-nginx": (["ingress-nginx.yaml"], ["--exclude", "ingress-nginx-controller"], [
        "deployment/ingress-nginx-controller -n ingress-nginx skipped (--exclude)",
        ("job/ingress-nginx-admission-create -n ingress-nginx skipped (no TCP container port to "
         "front)"),
    ], set()),
}
_WORKLOADS = {"Deployment", "DaemonSet", "Job", "Pod", "ReplicationController", "Rollout"}
IMAGE = ["--image", "ghcr.io/example/sidecar:0.1.0"]


def _inputs(source: str) -> list[str]:
    return [str(PUBLIC / name) for name in CORPUS[source][0]]


def _objects_in(source: str) -> list[Any]:
    """What inject reads from the source and writes back: the Kubernetes objects."""
    paths: list[Path] = []
    for name in CORPUS[source][0]:
        path = PUBLIC / name
        paths += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) \
            if path.is_dir() else [path]
    return [d for p in paths for d in load_docs(p)
            if isinstance(d, dict) and d.get("apiVersion") and d.get("kind") != "Kustomization"]


def _injected(source: str) -> tuple[str, str]:
    done = sidecar("inject", *_inputs(source), *CORPUS[source][1], *IMAGE)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def _has_sidecar(obj: dict[str, Any]) -> bool:
    node = obj if obj["kind"] == "Pod" else obj["spec"]["template"]
    return "sidecar.drain/status" in ((node.get("metadata") or {}).get("annotations") or {})


@pytest.mark.parametrize("source", list(CORPUS))
def test_the_report_says_what_is_fronted_and_what_is_not_and_why(source: str) -> None:
    """Only HTTP ports are fronted; every port not fronted has a line with the rule that spoke;
    a workload with no HTTP port is left unchanged (exit 0)."""
    out, report = _injected(source)
    lines = report.splitlines()
    for expected in CORPUS[source][2]:
        assert any(line == expected or (expected.startswith("kustomization") and expected in line)
                   for line in lines), f"{expected!r}\n{report}"
    docs = [d for d in yaml.safe_load_all(out) if d]
    injected = {d["metadata"]["name"] for d in flat(docs) if d["kind"] in _WORKLOADS
                and _has_sidecar(d)}
    assert injected == CORPUS[source][3], report


@pytest.mark.parametrize("source", list(CORPUS))
def test_the_injected_corpus_validates_strictly(source: str, tmp_path: Path) -> None:
    """kubernetes-validate --strict with a recent Kubernetes accepts every injected object (an
    Argo Rollout is a custom resource: its pod template is checked as a Deployment's)."""
    out, _ = _injected(source)
    objects = []
    for obj in (d for d in yaml.safe_load_all(out) if d):
        if obj["kind"] == "Rollout":  # the same pod template, in a kind the validator knows
            obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": obj["metadata"],
                   "spec": {k: v for k, v in obj["spec"].items() if k != "strategy"}}
        objects.append(obj)
    validate(objects, tmp_path, KUBERNETES_RECENT)


@pytest.mark.parametrize("source", list(CORPUS))
def test_uninject_gives_back_exactly_the_corpus(source: str, tmp_path: Path) -> None:
    """uninject(inject(x)) == x, Services included (non-objects such as kustomization.yaml are
    skipped by both, with a report line)."""
    out, _ = _injected(source)
    (tmp_path / "injected.yaml").write_text(out)
    back = sidecar("uninject", str(tmp_path / "injected.yaml"))
    assert back.returncode == 0, back.stderr
    assert [d for d in yaml.safe_load_all(back.stdout) if d] == _objects_in(source)


@pytest.mark.parametrize("source", list(CORPUS))
def test_injecting_the_corpus_twice_changes_nothing(source: str, tmp_path: Path) -> None:
    """Idempotent on real manifests: the second run writes the same bytes."""
    out, _ = _injected(source)
    (tmp_path / "once.yaml").write_text(out)
    twice = sidecar("inject", str(tmp_path / "once.yaml"), *CORPUS[source][1], *IMAGE)
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout == out


def test_a_real_app_with_its_own_prestop_is_refused_with_the_ways_out() -> None:
    """ingress-nginx's controller waits for nginx in its own preStop (/wait-shutdown): inject
    does not drop it silently; exit 2, nothing written, and the message names the ways out,
    --exclude among them (which the corpus run above uses)."""
    done = sidecar("inject", str(PUBLIC / "ingress-nginx.yaml"), *IMAGE)
    assert done.returncode == 2 and done.stdout == ""
    assert ("sidecar inject: deployment/ingress-nginx-controller -n ingress-nginx: container "
            "'controller' has its own preStop hook (exec)") in done.stderr
    assert "or leave the workload out (annotation sidecar.drain/inject: disabled, or --exclude)" \
        in done.stderr
