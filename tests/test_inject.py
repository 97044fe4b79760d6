"""`sidecar inject` / `sidecar uninject`: what a user gets when they run it over their manifests.

Every test runs the real command (``python -m sidecar inject ...``) over the realistic manifests
in tests/manifests/ (every workload kind, named and numeric target ports, a multi-container pod,
an app with its own probes and preStop, a List, a CronJob, a subdirectory) or a variant of them,
and checks the documents it writes and the report it prints. The injected output is validated
with kubernetes-validate --strict against Kubernetes 1.32, and a pod termination is replayed on an
injected Deployment (tests/test_k8s_replay.py's harness) to prove it loses nothing.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import __version__
from sidecar.config import load, to_yaml
from tests.test_k8s_replay import PodSpec, assert_lossless, losses, replay_termination

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = Path(__file__).resolve().parent / "manifests" / "examples"
KUBERNETES = "1.32.0"
KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


def sidecar(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], input=stdin, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def inject(*args: str, stdin: str | None = None) -> tuple[list[Any], str]:
    done = sidecar("inject", *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None], done.stderr


def flat(docs: list[Any]) -> list[dict[str, Any]]:
    out = []
    for doc in docs:
        out.append(doc)
        if doc.get("kind") == "List":
            out += flat(doc["items"])
    return out


def find(docs: list[Any], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in flat(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def template(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"])
    return dict(obj["spec"]["template"])


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
                if c["name"] == name]
    return found


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def load_docs(path: Path) -> list[Any]:
    """The documents as Kubernetes reads them (an unquoted date is a string, not a date)."""
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return list(json.loads(json.dumps(docs, default=str)))


def write(tmp_path: Path, docs: list[Any], name: str = "in.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


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


def test_an_app_on_the_admin_port_moves_the_sidecars_admin_port() -> None:
    """The Pod's app listens on 9901: the sidecar's admin port and the app's preStop use 9902."""
    docs, report = inject(str(MANIFESTS / "more" / "pod.yaml"))
    spec = find(docs, "Pod", "debug")["spec"]
    side = container(spec, "drain-sidecar")
    assert {p["name"]: p["containerPort"] for p in side["ports"]} == {"http": 8080, "admin": 9902}
    assert container(spec, "debug")["lifecycle"]["preStop"]["httpGet"]["port"] == 9902
    assert env(side)["SIDECAR_UPSTREAM_URL"] == "http://127.0.0.1:9901"
    assert "port 9901 is taken in the pod: the sidecar uses 9902" in report


def test_the_port_annotation_chooses_among_several_ports() -> None:
    """A two-container StatefulSet with three ports: sidecar.drain/port picks `query`; the other
    container and ports are untouched; tuning annotations reach the env."""
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


def test_jobs_and_cronjobs_get_a_native_sidecar_but_not_a_classic_one() -> None:
    """A native sidecar lets a Job complete; a regular container would keep it running, so
    --classic skips batch workloads and says why."""
    docs, _ = inject(str(MANIFESTS / "batch.yaml"))
    assert container(template(find(docs, "CronJob", "report"))["spec"], "drain-sidecar")
    assert container(template(find(docs, "Job", "export"))["spec"], "drain-sidecar")
    docs, report = inject(str(MANIFESTS / "batch.yaml"), "--classic")
    assert "job/export skipped (a regular sidecar container would keep the Job" in report
    assert "cronjob/report skipped" in report
    assert len(template(find(docs, "Job", "export"))["spec"]["containers"]) == 1


def test_every_kind_in_a_directory_tree_and_a_list_is_injected() -> None:
    """A directory is walked recursively (a List inside a subdirectory included); every
    workload kind is injected, and the report has a line for each workload."""
    docs, report = inject(str(MANIFESTS))
    injected = {d["kind"] for d in flat(docs) if d["kind"] in KINDS
                and "sidecar.drain/status" in (template(d).get("metadata") or {}).get(
                    "annotations", {})}
    assert injected == KINDS
    assert "deployment/listed injected" in report  # inside a kind: List
    assert find(docs, "Service", "listed")["spec"]["ports"][0]["targetPort"] == 8080
    assert "deployment/opted-out skipped (annotation sidecar.drain/inject: disabled)" in report
    assert "deployment/worker skipped (no TCP container port to front)" in report
    assert "warning: no container port to front" in report


def test_other_documents_pass_through_unchanged_in_meaning() -> None:
    """A ConfigMap (with a date-like value, which must stay a string), Services that need no
    edit and skipped workloads come out equal to what went in."""
    docs, _ = inject(str(MANIFESTS))
    before = {(d["kind"], d["metadata"]["name"]): d for d in flat(load_docs(MANIFESTS / "web.yaml"))}
    assert find(docs, "ConfigMap", "web-settings") == {
        **before[("ConfigMap", "web-settings")], "data": {"LOG_LEVEL": "info",
                                                          "RELEASED": "2024-01-01"}}
    assert find(docs, "Service", "web") == before[("Service", "web")]
    skipped = load_docs(MANIFESTS / "more" / "skipped.yaml")
    assert [find(docs, "Deployment", n) for n in ("opted-out", "worker")] == skipped
    # JSON indented with tabs (which YAML forbids) is read as JSON.
    assert [find(docs, "PodDisruptionBudget", "web")] == load_docs(MANIFESTS / "more" / "pdb.json")


def test_stdin_in_and_json_out() -> None:
    """`-` reads stdin (the helm template | sidecar inject - | kubectl apply -f - pipeline);
    -o json writes one object, or a List of several."""
    text = (MANIFESTS / "api-numeric.yaml").read_text()
    done = sidecar("inject", "-", "-o", "json", stdin=text)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["kind"] == "List" and [i["kind"] for i in out["items"]] == ["Deployment", "Service"]
    one = sidecar("inject", "-", "-o", "json", stdin=yaml.safe_dump(load_docs(
        MANIFESTS / "replicaset.yaml")[0]))
    assert json.loads(one.stdout)["kind"] == "ReplicaSet"


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


# ---- bad input: exit 2, nothing written ---------------------------------------------------------

def _web_with(annotations: dict[str, str]) -> list[Any]:
    docs = load_docs(MANIFESTS / "web.yaml")
    template(docs[1])["metadata"]["annotations"].update(annotations)
    return docs


BAD = {
    "bad duration": ({"sidecar.drain/delay": "soon"}, ("drain.delay (annotation sidecar.drain/"
                                                      "delay): expected a duration")),
    "unknown annotation": ({"sidecar.drain/dealy": "3s"}, ("annotation sidecar.drain/dealy: "
                           "unknown annotation (did you mean sidecar.drain/delay?)")),
    "over budget": ({"sidecar.drain/timeout": "40s"}, ("drain.grace_period: drain.delay + "
                    "drain.timeout + exit.wait = 48s exceeds")),
    "bad choice": ({"sidecar.drain/websockets": "maybe"}, ("drain.websockets (annotation "
                   "sidecar.drain/websockets): expected one of close, wait")),
    "no such port": ({"sidecar.drain/port": "grpc"}, ("annotation sidecar.drain/port: 'grpc' "
                     "names no single TCP container port")),
    "bad inject value": ({"sidecar.drain/inject": "sometimes"}, ("annotation sidecar.drain/"
                         "inject: expected one of enabled, disabled")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_annotation_exits_2_naming_workload_and_annotation_and_writes_nothing(
        case: str, tmp_path: Path) -> None:
    """Annotations are validated like config keys; one bad value anywhere stops everything."""
    annotations, message = BAD[case]
    good = load_docs(MANIFESTS / "api-numeric.yaml")
    done = sidecar("inject", str(write(tmp_path, good, "a.yaml")),
                   str(write(tmp_path, _web_with(annotations), "b.yaml")))
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"sidecar inject: deployment/web -n shop: {message}" in done.stderr, done.stderr
    assert "nothing written" in done.stderr


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


def test_several_ports_without_the_annotation_is_an_error(tmp_path: Path) -> None:
    """Which port do clients use? Not guessed: exit 2 listing the ports and the annotation."""
    docs = load_docs(MANIFESTS / "statefulset-multi.yaml")
    del template(docs[0])["metadata"]["annotations"]["sidecar.drain/port"]
    done = sidecar("inject", str(write(tmp_path, docs)))
    assert done.returncode == 2 and done.stdout == ""
    assert ("statefulset/search: 3 TCP container ports (query 9200 in engine, transport 9300 in "
            "engine, metrics 9114 in exporter)") in done.stderr
    assert "sidecar.drain/port" in done.stderr


@pytest.mark.parametrize("problem,text,message", [
    ("missing file", None, "No such file or directory"),
    ("not yaml", "kind: [unclosed\n", "not valid YAML"),
])
def test_unreadable_input_exits_2(problem: str, text: str | None, message: str,
                                  tmp_path: Path) -> None:
    path = tmp_path / "in.yaml"
    if text is not None:
        path.write_text(text)
    done = sidecar("inject", str(path))
    assert done.returncode == 2 and done.stdout == "" and message in done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_output_that_cannot_be_written_exits_1() -> None:
    """A runtime failure, not bad input: exit 1 with the reason."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "sidecar", "inject",
                               str(MANIFESTS / "web.yaml")], cwd=ROOT, stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "sidecar inject: cannot write the output: [Errno 28]" in done.stderr


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


# ---- the injected manifests are valid Kubernetes objects -----------------------------------------

@pytest.mark.parametrize("mode", [[], ["--classic"]], ids=["native", "classic"])
def test_injected_output_validates_strictly_for_kubernetes_1_32(mode: list[str],
                                                                tmp_path: Path) -> None:
    """kubernetes-validate --strict (schemas of Kubernetes 1.32, as .ci/validate-deploy.sh uses)
    accepts every injected object, List items included."""
    docs, _ = inject(str(MANIFESTS), *mode)
    objects = [d for d in flat(docs) if d["kind"] != "List"]
    path = write(tmp_path, objects, "injected.yaml")
    validate = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run([str(validate), "--strict", "-k", KUBERNETES, str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "INFO" in done.stdout and "ERROR" not in done.stdout


# ---- a pod termination replayed on an injected Deployment ----------------------------------------

def injected_pod(docs: list[Any]) -> PodSpec:
    """The replay's view of an injected Deployment: the sidecar's config is what `sidecar`
    loads from the container's SIDECAR_* env (the replay writes it to a file, scaled, so the
    variables themselves are not passed on)."""
    spec = template(find(docs, "Deployment", "web"))["spec"]
    side = container(spec, "drain-sidecar")
    config = yaml.safe_load(to_yaml(load(None, env=env(side))))
    as_run = {**side, "env": [e for e in side["env"] if not e["name"].startswith("SIDECAR_")]}
    (app,) = spec["containers"][:1]
    native = side in spec.get("initContainers", []) and side.get("restartPolicy") == "Always"
    return PodSpec(spec, app, as_run, config, native)


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
    pod = injected_pod(docs)
    assert pod.native == (not mode)
    replay = await replay_termination(pod, tmp_path)
    assert_lossless(replay)
    assert json.loads(replay.hook["body"])["state"] == "drained"
    assert replay.app_sigterm is not None and replay.app_sigterm >= replay.hook["at"]
    assert replay.exit_codes["drain-sidecar"] == 0, replay.timeline()


async def test_the_replay_catches_an_injected_pod_without_its_prestop(tmp_path: Path) -> None:
    """Not a rubber stamp: the same injected pod with the app's preStop removed loses requests."""
    docs, _ = inject("-", stdin=_replayable())
    pod = injected_pod(docs)
    pod.app.pop("lifecycle")
    replay = await replay_termination(pod, tmp_path)
    found = {p.split(":")[0] for p in losses(replay)}
    assert found & {"lost", "early SIGTERM"}, replay.timeline()
