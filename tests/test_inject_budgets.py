"""`sidecar inject` and the drain budget: the grace period, the user's preStop sleep, the hooks
of every container that serves traffic, upstream.timeout, the sidecar's resources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.injecting import (
    MANIFESTS,
    container,
    env,
    inject,
    load_docs,
    sidecar,
    template,
    write,
)


def test_a_longer_pod_grace_period_is_the_sidecars_budget(tmp_path: Path) -> None:
    """terminationGracePeriodSeconds: 60 lets the workload ask for drain.timeout 45s: the pod's
    grace period becomes drain.grace_period (and stays 60); without it, the same annotation is
    over budget and the error says where each number came from."""
    docs = load_docs(MANIFESTS / "replicaset.yaml")
    pod = template(docs[0])
    pod["metadata"]["annotations"] = {"sidecar.drain/timeout": "45s"}
    pod["spec"]["terminationGracePeriodSeconds"] = 60
    out, _ = inject(str(write(tmp_path, docs)))
    spec = template(out[0])["spec"]
    assert spec["terminationGracePeriodSeconds"] == 60
    side = env(container(spec, "drain-sidecar"))
    assert side["SIDECAR_DRAIN_GRACE_PERIOD"] == "60s" and side["SIDECAR_DRAIN_TIMEOUT"] == "45s"
    pod["spec"]["terminationGracePeriodSeconds"] = 40
    done = sidecar("inject", str(write(tmp_path, docs)))
    assert done.returncode == 2 and done.stdout == ""
    assert ("exceeds drain.grace_period 40s" in done.stderr
            and "annotation sidecar.drain/timeout, the pod's terminationGracePeriodSeconds"
            in done.stderr), done.stderr


def test_resource_annotations_size_the_sidecar(tmp_path: Path) -> None:
    """sidecar.drain/cpu, memory, cpu-limit, memory-limit set the container's requests and
    limits (the others keep deploy/base's values); a value that is no quantity is exit 2."""
    docs = load_docs(MANIFESTS / "replicaset.yaml")
    template(docs[0])["metadata"]["annotations"] = {"sidecar.drain/cpu": "250m",
                                                    "sidecar.drain/memory-limit": "512Mi"}
    out, _ = inject(str(write(tmp_path, docs)))
    side = container(template(out[0])["spec"], "drain-sidecar")
    assert side["resources"] == {"requests": {"cpu": "250m", "memory": "64Mi"},
                                 "limits": {"cpu": "1", "memory": "512Mi"}}
    template(docs[0])["metadata"]["annotations"]["sidecar.drain/memory"] = "lots"
    done = sidecar("inject", str(write(tmp_path, docs)))
    assert done.returncode == 2 and done.stdout == ""
    assert ("replicaset/legacy: annotation sidecar.drain/memory: expected a Kubernetes quantity"
            in done.stderr)


def test_an_app_with_its_own_prestop_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """Kubernetes allows one preStop handler per container and the drain needs it: an exec hook
    that does more than sleep is refused (exit 2) with the ways out, not silently dropped."""
    docs = load_docs(MANIFESTS / "web.yaml")
    app = template(docs[1])["spec"]["containers"][0]
    app["lifecycle"]["preStop"] = {"exec": {"command": ["/app/bin/flush-cache"]}}
    done = sidecar("inject", str(write(tmp_path, docs)))
    assert done.returncode == 2 and done.stdout == ""
    assert "container 'web' has its own preStop hook (exec)" in done.stderr
    assert "sidecar.drain/inject: disabled" in done.stderr


def _api(pod: dict[str, Any] | None = None, **app: Any) -> list[Any]:
    """api-numeric.yaml's Deployment and Service, with pod spec fields and app fields set."""
    docs = load_docs(MANIFESTS / "api-numeric.yaml")
    spec = template(docs[0])["spec"]
    spec.update(pod or {})
    spec["containers"][0].update(app)
    return docs


SLEEP_15 = {"lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "sleep 15"]}}}}


def test_a_replaced_prestop_sleep_becomes_the_drain_delay(tmp_path: Path) -> None:
    """The user's preStop sleep 15 measured how long their endpoints take to update: it becomes
    drain.delay (not the default 5s), and the pod, which set no grace period, gets one that
    holds delay + timeout + exit.wait, with a report line for each."""
    out, report = inject(str(write(tmp_path, _api(**SLEEP_15))))
    spec = template(out[0])["spec"]
    config = env(container(spec, "drain-sidecar"))
    assert config["SIDECAR_DRAIN_DELAY"] == "15s"
    assert spec["terminationGracePeriodSeconds"] == 40
    assert "its preStop sleep 15s is replaced by /drain" in report
    assert "drain.delay is 15s, the wait its preStop sleep gave" in report
    assert ("the pod sets no terminationGracePeriodSeconds: it gets 40s, which holds drain.delay "
            "15s + drain.timeout 20s + exit.wait 5s") in report


def test_a_sleep_in_a_pod_with_its_own_grace_period_shortens_the_drain_timeout(
        tmp_path: Path) -> None:
    """The pod states terminationGracePeriodSeconds: 30 and sleeps 15 in preStop: the budget is
    kept, the delay is the sleep, and drain.timeout is what is left (10s), said in the report."""
    out, report = inject(str(write(tmp_path, _api({"terminationGracePeriodSeconds": 30},
                                                  **SLEEP_15))))
    spec = template(out[0])["spec"]
    config = env(container(spec, "drain-sidecar"))
    assert (config["SIDECAR_DRAIN_DELAY"], config["SIDECAR_DRAIN_TIMEOUT"]) == ("15s", "10s")
    assert spec["terminationGracePeriodSeconds"] == 30
    assert ("drain.timeout is 10s, what the pod's grace period of 30s leaves after drain.delay "
            "15s and exit.wait 5s") in report


def test_a_delay_annotation_alone_raises_the_grace_period(tmp_path: Path) -> None:
    """sidecar.drain/delay: 7s on a pod without terminationGracePeriodSeconds: 7 + 20 + 5 = 32s
    does not fit the default 30s, so inject raises it (as it does elsewhere) and says so,
    instead of exiting 2."""
    docs = _api()
    template(docs[0])["metadata"]["annotations"] = {"sidecar.drain/delay": "7s"}
    out, report = inject(str(write(tmp_path, docs)))
    spec = template(out[0])["spec"]
    assert spec["terminationGracePeriodSeconds"] == 32
    assert env(container(spec, "drain-sidecar"))["SIDECAR_DRAIN_GRACE_PERIOD"] == "32s"
    assert "terminationGracePeriodSeconds raised from 30 to 32 (drain.grace_period 32s)" in report


def test_injected_upstream_timeout_is_at_most_the_drain_timeout(tmp_path: Path) -> None:
    """The README's sizing: upstream.timeout at or below drain.timeout.  Injected pods get it
    by default (20s, not 60s); an annotation that sets it is kept."""
    out, report = inject(str(write(tmp_path, _api())))
    config = env(container(template(out[0])["spec"], "drain-sidecar"))
    assert config["SIDECAR_UPSTREAM_TIMEOUT"] == "20s"
    assert "upstream.timeout is 20s (drain.timeout)" in report
    docs = _api()
    template(docs[0])["metadata"]["annotations"] = {"sidecar.drain/upstream.timeout": "90s"}
    out, _ = inject(str(write(tmp_path, docs)))
    assert env(container(template(out[0])["spec"], "drain-sidecar"))[
        "SIDECAR_UPSTREAM_TIMEOUT"] == "90s"


def test_every_container_that_serves_traffic_waits_for_the_drain(tmp_path: Path) -> None:
    """An app behind kube-rbac-proxy, a metrics exporter: every container that declares a port
    gets the same preStop GET /drain, so none is SIGTERMed while the drain still runs; a
    container that serves nothing is left alone; one with its own preStop keeps it, with a
    warning naming it."""
    docs = _api()
    containers = template(docs[0])["spec"]["containers"]
    containers += [
        {"name": "kube-rbac-proxy", "image": "quay.io/brancz/kube-rbac-proxy:v0.22.1",
         "ports": [{"name": "https", "containerPort": 8443}]},
        {"name": "log-shipper", "image": "fluent/fluent-bit:3"},
        {"name": "cache", "image": "redis:7", "ports": [{"containerPort": 6379}],
         "lifecycle": {"preStop": {"exec": {"command": ["redis-cli", "shutdown", "save"]}}}},
    ]
    out, report = inject(str(write(tmp_path, docs)))
    spec = template(out[0])["spec"]
    drain = {"preStop": {"httpGet": {"path": "/drain", "port": 9901}}}
    assert container(spec, "api")["lifecycle"] == drain
    assert container(spec, "kube-rbac-proxy")["lifecycle"] == drain
    assert "lifecycle" not in container(spec, "log-shipper")
    assert container(spec, "cache")["lifecycle"] == containers[3]["lifecycle"]
    assert ("container 'kube-rbac-proxy' serves ports too: its preStop waits for the drain") \
        in report
    assert ("warning: container 'cache' serves ports and keeps its own preStop hook (exec): it "
            "gets SIGTERM when that hook ends, maybe while the drain still needs it") in report
