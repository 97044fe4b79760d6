"""`sidecar inject` / `sidecar uninject`: what inject adds to a pod, that it is idempotent and
exactly undone, that the output validates, and that a pod termination replayed on an injected
Deployment (tests/test_k8s_replay.py's harness) loses nothing.

Every test runs the real command (``python -m sidecar inject ...``) over the hand-written
manifests in tests/manifests/examples/ (every workload kind, named and numeric target ports, a
multi-container pod, an app with its own probes and preStop, a List, a CronJob, a subdirectory)
or a variant of them.  Ports, Services, budgets, inputs and the public corpus have their own
files: tests/test_inject_{ports,services,budgets,inputs,corpus}.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from sidecar import __version__
from sidecar.config import load
from tests.injecting import (
    MANIFESTS,
    ROOT,
    container,
    env,
    find,
    flat,
    inject,
    injected_pod,
    load_docs,
    sidecar,
    template,
    validate,
    write,
)
from tests.k8s_replay import assert_lossless, losses, replay_termination

# ---- what inject adds -----------------------------------------------------------------------

def test_inject_adds_a_native_sidecar_that_takes_over_the_named_port() -> None:
    """A Deployment behind a Service that targets the port by name: the sidecar becomes a native
    sidecar owning the name `http`, the app's port becomes `http-app` (its probes follow), its
    preStop calls /drain, the grace period covers the drain, the PodMonitor's label and a status
    annotation are set, and the Service is left alone because the name now reaches the sidecar."""
    docs, report = inject(str(MANIFESTS / "web.yaml"))
    pod = template(find(docs, "Deployment", "web"))
    spec, meta = pod["spec"], pod["metadata"]
    side = container(spec, "drain-sidecar")
    assert side in spec["initContainers"] and side["restartPolicy"] == "Always"
    assert side["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert side["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert side["image"] == f"sidecar:{__version__}"
    assert {(p["name"], p["containerPort"]) for p in side["ports"]} == {("http", 8080),
                                                                         ("admin", 9901)}
    config = env(side)
    assert config["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:8000"
    assert config["SIDECAR_LISTEN"] == "0.0.0.0:8080" and config["SIDECAR_ADMIN"] == "0.0.0.0:9901"
    assert config["SIDECAR_DRAIN_DELAY"] == "3s" and config["SIDECAR_DRAIN_TIMEOUT"] == "15s"
    assert config["SIDECAR_CONFIG"] == ""  # the image's baked-in file adds nothing unseen
    security = side["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert not security["allowPrivilegeEscalation"] and security["capabilities"]["drop"] == ["ALL"]
    assert side["resources"]["requests"] and side["resources"]["limits"]

    app = container(spec, "web")
    assert app["ports"] == [{"name": "http-app", "containerPort": 8000}]
    assert app["readinessProbe"]["httpGet"]["port"] == "http-app"
    assert app["livenessProbe"]["tcpSocket"]["port"] == "http-app"
    assert app["lifecycle"]["preStop"] == {"httpGet": {"path": "/drain", "port": 9901}}
    assert spec["terminationGracePeriodSeconds"] == 30
    assert "terminationGracePeriodSeconds raised from 20 to 30" in report
    assert meta["labels"]["drain-sidecar"] == "enabled"
    status = json.loads(meta["annotations"]["sidecar.drain/status"])
    assert status["version"] == __version__ and status["mode"] == "native"
    assert status["config"].startswith("sha256:")
    assert "sleep 5s is replaced by /drain" in report
    assert "deployment/web -n shop injected" in report
    assert find(docs, "Service", "web")["spec"]["ports"][0]["targetPort"] == "http"


def test_the_injected_env_is_the_config_the_sidecar_runs_with(tmp_path: Path) -> None:
    """--config values (and the annotations over them) reach the pod as SIDECAR_* variables that
    `sidecar` itself loads into the same effective config; --image sets the image."""
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("drain:\n  timeout: 10s\n  linger: 2s\nlogging:\n  level: warning\n"
                   "exit:\n  http: http://127.0.0.1:8000/quit\n")
    docs, _ = inject(str(MANIFESTS / "web.yaml"), "--config", str(cfg),
                     "--image", "registry.example.com/sidecar:0.1.0")
    side = container(template(find(docs, "Deployment", "web"))["spec"], "drain-sidecar")
    assert side["image"] == "registry.example.com/sidecar:0.1.0"
    effective = load(None, env=env(side))
    assert (effective.drain.delay, effective.drain.timeout) == (3, 15)  # the annotations win
    assert effective.drain.linger == 2 and effective.logging.level == "warning"
    assert effective.exit.http is not None and effective.exit.http.url.endswith("/quit")
    assert str(effective.listen) == "0.0.0.0:8080"


def test_classic_adds_a_regular_container() -> None:
    """--classic: the sidecar is a regular container next to the app, with no startupProbe
    or restartPolicy (Kubernetes before 1.29)."""
    docs, _ = inject(str(MANIFESTS / "web.yaml"), "--classic")
    spec = template(find(docs, "Deployment", "web"))["spec"]
    assert [c["name"] for c in spec["containers"]] == ["web", "drain-sidecar"]
    assert "initContainers" not in spec
    assert "restartPolicy" not in spec["containers"][1]
    status = json.loads(template(find(docs, "Deployment", "web"))["metadata"]["annotations"][
        "sidecar.drain/status"])
    assert status["mode"] == "classic"


def test_an_app_on_the_admin_port_moves_the_sidecars_admin_port() -> None:
    """The Pod's app listens on 9901: the sidecar's admin port and the app's preStop use 9902."""
    docs, report = inject(str(MANIFESTS / "more" / "pod.yaml"))
    spec = find(docs, "Pod", "debug")["spec"]
    side = container(spec, "drain-sidecar")
    assert {p["name"]: p["containerPort"] for p in side["ports"]} == {"http": 8080, "admin": 9902}
    assert container(spec, "debug")["lifecycle"]["preStop"]["httpGet"]["port"] == 9902
    assert env(side)["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:9901"
    assert "port 9901 is taken in the pod: the sidecar uses 9902" in report


def test_a_config_with_an_admin_token_is_refused(tmp_path: Path) -> None:
    """inject never writes a secret into a manifest: a token in --config is an error saying
    how to pass it from a Secret instead."""
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("admin_token: s3cr3t\n")
    done = sidecar("inject", str(MANIFESTS / "web.yaml"), "--config", str(cfg))
    assert done.returncode == 2 and done.stdout == ""
    assert "admin_token: inject writes no secrets into manifests" in done.stderr


def test_warns_about_what_the_user_must_look_at(tmp_path: Path) -> None:
    """Injected, with a warning each: hostNetwork (ports shared with the node), a hostPort on the
    app's port (a way past the sidecar), a port named admin (the PodMonitor's), another proxy
    container or mesh injection, a Service whose name service links would turn into SIDECAR_*
    variables, and a NetworkPolicy that admits only the app's port number."""
    docs = load_docs(MANIFESTS / "api-numeric.yaml")
    pod = template(docs[0])
    pod["spec"]["hostNetwork"] = True
    pod["spec"]["containers"][0]["ports"][0]["hostPort"] = 8000
    pod["spec"]["containers"].append({"name": "debug", "image": "busybox:1.36",
                                      "ports": [{"name": "admin", "containerPort": 7000}]})
    pod["metadata"]["annotations"] = {"sidecar.drain/port": "8000"}
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "istio/proxyv2:1.22.0"})
    pod["metadata"]["annotations"]["linkerd.io/inject"] = "enabled"
    link = copy.deepcopy(docs[1])
    link["metadata"]["name"] = "sidecar-drain"
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "api"},
              "spec": {"podSelector": {"matchLabels": {"app": "api"}},
                       "ingress": [{"ports": [{"port": 8000}]}]}}
    done = sidecar("inject", str(write(tmp_path, [*docs, link, policy])))
    assert done.returncode == 0, done.stderr
    assert "warning: hostNetwork: true" in done.stderr
    assert "the sidecar's is 'drain-admin', which deploy/monitoring's PodMonitor" in done.stderr
    assert "warning: port 8000 has hostPort 8000: traffic to the node's port reaches the app" \
        in done.stderr
    assert "warning: container 'istio-proxy' is another proxy" in done.stderr
    assert "warning: linkerd.io/inject: enabled: a mesh proxy will be added too" in done.stderr
    assert "warning: Service 'sidecar-drain' becomes SIDECAR_* variables" in done.stderr
    assert ("warning: networkpolicy/api admits port 8000 (the app) to deployment/api: add port "
            "8080 (the sidecar)") in done.stderr


# ---- idempotence and uninject ------------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["--classic"]], ids=["native", "classic"])
def test_injecting_twice_changes_nothing(mode: list[str], tmp_path: Path) -> None:
    """Injecting an injected manifest writes the same bytes and reports `already injected`."""
    once = sidecar("inject", str(MANIFESTS), *mode)
    assert once.returncode == 0, once.stderr
    (tmp_path / "once.yaml").write_text(once.stdout)
    twice = sidecar("inject", str(tmp_path / "once.yaml"), *mode)
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout == once.stdout
    assert "deployment/web -n shop already injected" in twice.stderr
    assert "targetPort" not in twice.stderr  # Services are not rewritten twice


@pytest.mark.parametrize("mode", [[], ["--classic"]], ids=["native", "classic"])
def test_uninject_restores_every_kind_exactly(mode: list[str], tmp_path: Path) -> None:
    """uninject(inject(x)) == x for every workload kind, the List, and the rewritten Services."""
    once = sidecar("inject", str(MANIFESTS), *mode)
    (tmp_path / "injected.yaml").write_text(once.stdout)
    back = sidecar("uninject", str(tmp_path / "injected.yaml"))
    assert back.returncode == 0, back.stderr
    original = [d for p in sorted(MANIFESTS.rglob("*")) if p.suffix in (".yaml", ".json")
                for d in load_docs(p)]
    assert [d for d in yaml.safe_load_all(back.stdout) if d] == original
    assert "service/api targetPort restored" in back.stderr
    assert "statefulset/search uninjected" in back.stderr


def test_uninject_warns_when_the_injected_template_was_edited(tmp_path: Path) -> None:
    """Edits made after inject cannot be kept apart from what inject added: uninject restores
    the template as it was before inject, and says that the later edits are lost."""
    docs, _ = inject(str(MANIFESTS / "replicaset.yaml"))
    container(template(docs[0])["spec"], "legacy")["image"] = "ghcr.io/example/legacy:2"
    done = sidecar("uninject", str(write(tmp_path, docs)))
    assert done.returncode == 0 and "edited after injection" in done.stderr
    assert yaml.safe_load(done.stdout) == load_docs(MANIFESTS / "replicaset.yaml")[0]


def test_a_manifest_with_the_deploy_layout_is_left_alone() -> None:
    """deploy/base's Deployment already carries the sidecar: skipped, with the reason."""
    done = sidecar("inject", str(ROOT / "deploy" / "base" / "deployment.yaml"))
    assert done.returncode == 0
    assert ("deployment/demo skipped (label drain-sidecar: enabled: it already has a drain "
            "sidecar") in done.stderr
    assert yaml.safe_load(done.stdout) == load_docs(ROOT / "deploy/base/deployment.yaml")[0]


# ---- the injected manifests are valid Kubernetes objects -----------------------------------------

@pytest.mark.parametrize("mode", [[], ["--classic"]], ids=["native", "classic"])
def test_injected_output_validates_strictly_for_kubernetes_1_32(mode: list[str],
                                                                tmp_path: Path) -> None:
    """kubernetes-validate --strict (schemas of Kubernetes 1.32, as .ci/validate-deploy.sh uses)
    accepts every injected object, List items included."""
    docs, _ = inject(str(MANIFESTS), *mode)
    objects = [d for d in flat(docs) if d["kind"] != "List"]
    validate(objects, tmp_path)


# ---- a pod termination replayed on an injected Deployment ----------------------------------------

def _replayable() -> str:
    """web.yaml, with readiness also waiting for the app and a final scrape after the drain
    (drain.linger), as deploy/base has them."""
    docs = load_docs(MANIFESTS / "web.yaml")
    template(docs[1])["metadata"]["annotations"].update({
        "sidecar.drain/upstream.health_path": "/", "sidecar.drain/linger": "5s"})
    return yaml.safe_dump_all(docs)


@pytest.mark.parametrize("mode", [[], ["--classic"]], ids=["native", "classic"])
async def test_deleting_an_injected_pod_loses_no_admitted_request(mode: list[str],
                                                                  tmp_path: Path) -> None:
    """The user's Deployment, injected, then deleted the way the kubelet does it (the app's
    injected preStop, SIGTERMs, native-sidecar order, grace period): every request the app
    received is answered 2xx, the app is signalled only after the drain, nothing is killed."""
    docs, _ = inject("-", *mode, stdin=_replayable())
    pod = injected_pod(docs, "web")
    assert pod.native == (not mode)
    replay = await replay_termination(pod, tmp_path)
    assert_lossless(replay)
    assert json.loads(replay.hook["body"])["state"] == "drained"
    assert replay.app_sigterm is not None and replay.app_sigterm >= replay.hook["at"]
    assert replay.exit_codes["drain-sidecar"] == 0, replay.timeline()


async def test_the_replay_catches_an_injected_pod_without_its_prestop(tmp_path: Path) -> None:
    """Not a rubber stamp: the same injected pod with the app's preStop removed loses requests."""
    docs, _ = inject("-", stdin=_replayable())
    pod = injected_pod(docs, "web")
    pod.app.pop("lifecycle")
    replay = await replay_termination(pod, tmp_path)
    found = {p.split(":")[0] for p in losses(replay)}
    assert found & {"lost", "early SIGTERM"}, replay.timeline()
