"""`sidecar inject` and the drain budget: the grace period, the user's preStop sleep, the hooks
of every container that serves traffic, upstream.timeout, the sidecar's resources."""

from __future__ import annotations

from pathlib import Path

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
