"""`sidecar inject`: everything a user pipes in (every workload kind, directories, Lists, stdin,
JSON, what is not a Kubernetes object) and every bad input (exit 2, nothing written)."""

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
from tests.injecting import (
    KINDS,
    MANIFESTS,
    PUBLIC,
    ROOT,
    container,
    find,
    flat,
    inject,
    load_docs,
    sidecar,
    template,
    write,
)


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


# ---- everything a user pipes in -----------------------------------------------------------------

def test_what_is_not_a_kubernetes_object_is_skipped_with_a_report_line(tmp_path: Path) -> None:
    """A kustomization.yaml and kind-less YAML (a Helm values file) next to the manifests are
    not Kubernetes objects: skipped, named in the report, and not written (the output would fail
    validation); the objects around them are handled as usual."""
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - app.yaml\n")
    (tmp_path / "values.yaml").write_text("replicaCount: 2\nimage:\n  tag: v1\n")
    (tmp_path / "app.yaml").write_text((MANIFESTS / "api-numeric.yaml").read_text())
    out, report = inject(str(tmp_path), "--image", "example/sidecar:1")
    assert [d["kind"] for d in out] == ["Deployment", "Service"]
    assert (f"{tmp_path / 'kustomization.yaml'}: skipped (a kustomize Kustomization, not a "
            "Kubernetes object: render it with 'kubectl kustomize DIR' and pipe that in)") \
        in report
    assert (f"{tmp_path / 'values.yaml'}: skipped (not a Kubernetes object: no apiVersion and "
            "kind)") in report
    back = sidecar("uninject", str(tmp_path))
    assert back.returncode == 0 and "values.yaml: skipped" in back.stderr


def test_rollouts_and_replication_controllers_are_workloads(tmp_path: Path) -> None:
    """The contract lists Argo Rollout and ReplicationController: both get the sidecar.  A
    Rollout that takes its pods from a Deployment (workloadRef) and any other kind with a pod
    template get a report line each, and pass through unchanged."""
    rollout = load_docs(PUBLIC / "argo-rollouts-bluegreen.yaml")[0]
    controller = load_docs(PUBLIC / "guestbook-go.yaml")[2]
    by_ref = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
              "metadata": {"name": "by-ref"},
              "spec": {"workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                       "name": "web"}}}
    other = {"apiVersion": "apps.kruise.io/v1alpha1", "kind": "CloneSet",
             "metadata": {"name": "clones"},
             "spec": {"template": copy.deepcopy(rollout["spec"]["template"])}}
    docs = [rollout, controller, by_ref, other]
    out, report = inject(str(write(tmp_path, docs)))
    assert container(template(out[0])["spec"], "drain-sidecar")
    assert container(template(out[1])["spec"], "drain-sidecar")
    assert out[2:] == docs[2:]
    assert "rollout/rollout-bluegreen injected" in report
    assert "replicationcontroller/guestbook injected" in report
    assert ("rollout/by-ref left unchanged (its pods come from spec.workloadRef: inject the "
            "workload it references)") in report
    assert ("cloneset/clones left unchanged (a CloneSet has a pod template, but it is not a kind "
            "inject edits: add the sidecar by hand, see the README)") in report


def test_without_image_the_report_warns_loudly_naming_the_flag() -> None:
    """sidecar:VERSION is a local name only a local build creates; a native sidecar that cannot
    be pulled keeps the app from starting: the report's last line says so and names --image."""
    _, report = inject(str(MANIFESTS / "web.yaml"))
    assert report.splitlines()[-1].startswith(
        f"WARNING: no --image: the sidecar image is sidecar:{__version__}, a local name")
    assert "Give --image REGISTRY/sidecar:TAG" in report
    _, report = inject(str(MANIFESTS / "web.yaml"), "--image", "ghcr.io/example/sidecar:1")
    assert "WARNING" not in report


def test_multi_line_strings_stay_block_scalars() -> None:
    """Output is reviewed by people: microservices-demo's multi-line shell script (and any
    multi-line ConfigMap value) is written as a | block, not a quoted string of \\n."""
    done = sidecar("inject", str(PUBLIC / "microservices-demo.yaml"))
    assert done.returncode == 0, done.stderr
    assert "        - |\n          MAX_RETRIES=12\n          RETRY_INTERVAL=10\n" in done.stdout
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nginx"},
                  "data": {"nginx.conf": "events {}\nhttp {\n  server { listen 80; }\n}\n"}}
    done = sidecar("inject", "-", stdin=yaml.safe_dump(config_map))
    assert "  nginx.conf: |\n    events {}\n    http {\n" in done.stdout
    assert yaml.safe_load(done.stdout) == config_map


def test_exclude_leaves_a_workload_as_it_is() -> None:
    """--exclude KIND/NAME (or NAME) keeps a workload out without editing its annotations; one
    that matches nothing is reported."""
    out, report = inject(str(PUBLIC / "bookinfo.yaml"), "--exclude", "deployment/reviews-v3",
                         "--exclude", "productpage-v1", "--exclude", "deployment/nope")
    before = load_docs(PUBLIC / "bookinfo.yaml")
    for name in ("reviews-v3", "productpage-v1"):
        assert find(out, "Deployment", name) == find(before, "Deployment", name)
        assert f"deployment/{name} skipped (--exclude)" in report
    assert "warning: --exclude deployment/nope matched no workload in the input" in report
