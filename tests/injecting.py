"""Running `sidecar inject` / `uninject` in the tests, and reading what they write.

Shared by tests/test_inject*.py: the real command as a subprocess, the manifests of
tests/manifests/ (examples/: hand-written to cover every kind; public/: real public projects'
manifests, each with its source and licence in a header), and kubernetes-validate --strict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import load, to_yaml
from tests.k8s_replay import PodSpec

__all__ = ("KINDS", "KUBERNETES", "KUBERNETES_RECENT", "MANIFESTS", "PUBLIC", "ROOT", "container",
           "env", "find", "flat", "inject", "injected_pod", "load_docs", "notes", "sidecar",
           "template", "validate", "write")

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = Path(__file__).resolve().parent / "manifests" / "examples"
PUBLIC = Path(__file__).resolve().parent / "manifests" / "public"
KUBERNETES = "1.32.0"
KUBERNETES_RECENT = "1.37.0"  # the newest schemas kubernetes-validate 1.37.0 ships
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


def injected_pod(docs: list[Any], name: str, kind: str = "Deployment") -> PodSpec:
    """The pod-termination replay's view of an injected workload (tests/k8s_replay.py): the
    sidecar's config is what `sidecar` loads from the container's SIDECAR_* env (the replay
    writes it to a file, scaled, so the variables themselves are not passed on); the app is the
    first regular container."""
    spec = template(find(docs, kind, name))["spec"]
    side = container(spec, "drain-sidecar")
    config = yaml.safe_load(to_yaml(load(None, env=env(side))))
    as_run = {**side, "env": [e for e in side["env"] if not e["name"].startswith("SIDECAR_")]}
    (app,) = spec["containers"][:1]
    native = side in spec.get("initContainers", []) and side.get("restartPolicy") == "Always"
    return PodSpec(spec, app, as_run, config, native)


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




def validate(objects: list[dict[str, Any]], tmp_path: Path, version: str = KUBERNETES) -> None:
    """kubernetes-validate --strict accepts every object (custom resources such as an Argo
    Rollout have no schema there and are left out by the caller)."""
    path = write(tmp_path, objects, "to-validate.yaml")
    validator = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run([str(validator), "--strict", "-k", version, str(path)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "INFO" in done.stdout and "ERROR" not in done.stdout


def notes(report: str, workload: str) -> list[str]:
    """The report's lines about one workload: its own line and the indented ones under it."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(workload + " "))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block
