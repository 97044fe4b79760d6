"""Kubernetes manifests in and out for ``sidecar inject`` / ``uninject``.

Reads files, directories (recursively: ``*.yaml``, ``*.yml``, ``*.json``) and ``-`` (stdin) as
multi-document YAML; skips what is not a Kubernetes object (a kustomization.yaml); walks
``kind: List`` items; hands each workload's pod template to :mod:`sidecar.k8s.inject` and the
Services around it to :mod:`sidecar.k8s.services`; writes the documents back as YAML or JSON,
and the per-workload report as lines for stderr.
Every problem in every workload is collected first; on any problem nothing is written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml  # type: ignore[import-untyped]

from ..config import ConfigError
from .inject import DEFAULT_IMAGE, Options, Outcome, inject_pod, uninject_pod
from .services import (
    SERVICE_PORTS,
    Workload,
    policy_warnings,
    retarget,
    service_link_warnings,
    service_ports,
    unselected_warning,
)

__all__ = ("dump", "inject_all", "kubernetes_only", "read", "uninject_all")

_TEMPLATE = ("spec", "template")
WORKLOADS: dict[str, tuple[str, ...]] = {
    "Pod": (), "Deployment": _TEMPLATE, "StatefulSet": _TEMPLATE, "DaemonSet": _TEMPLATE,
    "ReplicaSet": _TEMPLATE, "ReplicationController": _TEMPLATE, "Rollout": _TEMPLATE,
    "Job": _TEMPLATE, "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
_BATCH = ("Job", "CronJob")


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """YAML as Kubernetes reads it: an unquoted date stays a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
    """YAML for people to review: a multi-line string stays a block scalar (``|``)."""


def _str(dumper: yaml.SafeDumper, data: str) -> Any:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


@dataclass
class Document:
    source: str
    obj: Any


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()
                      and p.suffix in (".yaml", ".yml", ".json")
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return [path]


def _parse(name: str, text: str) -> list[Any]:
    if text.lstrip().startswith("{"):  # JSON may be indented with tabs, which YAML forbids
        try:
            return [json.loads(text)]
        except ValueError:
            pass
    try:
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{name}: not valid YAML: {exc}"]) from None


def read(paths: list[str], stdin: TextIO = sys.stdin) -> list[Document]:
    """Every non-empty document of every input, in order."""
    docs = []
    for arg in paths or ["-"]:
        sources = [("-", None)] if arg == "-" else [(str(p), p) for p in _files(Path(arg))]
        for name, path in sources:
            try:
                text = stdin.read() if path is None else path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError([f"{name}: {exc.strerror}"]) from None
            except UnicodeDecodeError:
                raise ConfigError([f"{name}: not UTF-8 text"]) from None
            docs += [Document(name, d) for d in _parse(name, text) if d is not None]
    return docs


def kubernetes_only(docs: list[Document]) -> tuple[list[Document], list[str]]:
    """The documents that are Kubernetes objects, and a report line for each one that is not
    (no apiVersion/kind, or a kustomize Kustomization): those are not written out."""
    kept, report = [], []
    for doc in docs:
        obj = doc.obj
        if (isinstance(obj, dict) and obj.get("kind") == "Kustomization") or Path(
                doc.source).name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
            line = (f"{doc.source}: skipped (a kustomize Kustomization, not a Kubernetes object: "
                    "render it with 'kubectl kustomize DIR' and pipe that in)")
        elif not (isinstance(obj, dict) and obj.get("apiVersion") and obj.get("kind")):
            line = f"{doc.source}: skipped (not a Kubernetes object: no apiVersion and kind)"
        else:
            kept.append(doc)
            continue
        if line not in report:
            report.append(line)
    return kept, report


def _objects(obj: Any) -> Iterator[dict[str, Any]]:
    """The object, and the items of a ``List`` (any ``*List`` kind), recursively."""
    if not isinstance(obj, dict):
        return
    yield obj
    kind = str(obj.get("kind", ""))
    if kind.endswith("List") and isinstance(obj.get("items"), list):
        for item in obj["items"]:
            if isinstance(item, dict) and "kind" not in item and kind != "List":
                item = {"kind": kind[: -len("List")], **item}
            yield from _objects(item)


def _pod(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """(template, its metadata, its spec); the metadata is a new, unattached dict if absent."""
    if obj.get("kind") not in WORKLOADS:
        return None
    if obj["kind"] == "Rollout" and not str(obj.get("apiVersion", "")).startswith("argoproj.io/"):
        return None
    node: Any = obj
    for key in WORKLOADS[obj["kind"]]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get("spec"), dict):
        return None
    meta = node.get("metadata", {})
    return (node, meta, node["spec"]) if isinstance(meta, dict) else None


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    where = f" -n {meta['namespace']}" if meta.get("namespace") else ""
    return f"{str(obj.get('kind')).lower()}/{meta.get('name', '?')}{where}"


def _report(name: str, outcome: Outcome) -> list[str]:
    line = f"{name} {outcome.result}" + (f" ({outcome.reason})" if outcome.reason else "")
    return ([line] + [f"  - {note}" for note in outcome.notes]
            + [f"  warning: {w}" for w in outcome.warnings])


def _not_workload(obj: dict[str, Any], name: str) -> list[str]:
    """A report line for an object with a pod template that inject does not edit."""
    spec = obj.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    if obj.get("kind") == "Rollout" and "workloadRef" in spec:
        return [(f"{name} left unchanged (its pods come from spec.workloadRef: inject the "
                "workload it references)")]
    template = spec.get("template")
    pod = template.get("spec") if isinstance(template, dict) else None
    if isinstance(pod, dict) and isinstance(pod.get("containers"), list):
        return [(f"{name} left unchanged (a {obj.get('kind')} has a pod template, but it is not "
                "a kind inject edits: add the sidecar by hand, see the README)")]
    return []


def _excluded(name: str, exclude: frozenset[str]) -> bool:
    bare = name.split(" -n ")[0]
    return bool({name, bare, bare.split("/", 1)[1]} & exclude)


def inject_all(docs: list[Document], options: Options) -> list[str]:
    """Inject every workload in place; the report lines. ConfigError lists every problem."""
    objects = [o for d in docs for o in _objects(d.obj)]
    services = [o for o in objects if o.get("kind") == "Service"]
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    report: list[str] = []
    problems: list[str] = []
    workloads: list[Workload] = []
    excluded: set[str] = set()
    for obj in objects:
        pod, name = _pod(obj), _name(obj)
        if pod is None:
            report += _not_workload(obj, name)
            continue
        node, meta, spec = pod
        labels = dict(meta.get("labels") or {})
        if _excluded(name, options.exclude):
            excluded.add(name)
            outcome = Outcome("skipped", "--exclude")
        else:
            try:
                outcome = inject_pod(meta, spec, options, batch=obj["kind"] in _BATCH,
                                     service_ports=service_ports(services, obj, labels))
            except ConfigError as exc:
                problems += [f"{name}: {p}" for p in exc.problems]
                continue
        report += _report(name, outcome)
        workloads.append(Workload(obj, name, labels, outcome))
        if outcome.result == "injected":
            node["metadata"] = meta
            report += unselected_warning(name, outcome, services, obj)
            report += policy_warnings(name, outcome, policies, obj)
            report += service_link_warnings(spec, services)
    if problems:
        raise ConfigError(problems)
    report += retarget(services, workloads, keep=options.keep_service)
    for wanted in sorted(options.exclude):
        if not any(_excluded(n, frozenset({wanted})) for n in excluded):
            report.append(f"warning: --exclude {wanted} matched no workload in the input")
    if options.image == DEFAULT_IMAGE and any(w.outcome.result == "injected" for w in workloads):
        report.append(f"WARNING: no --image: the sidecar image is {DEFAULT_IMAGE}, a local name "
                      "that only 'docker build -t' creates; where it cannot be pulled, the "
                      "injected pods never start (a native sidecar starts before the app). Give "
                      "--image REGISTRY/sidecar:TAG")
    return report


def uninject_all(docs: list[Document]) -> list[str]:
    """Restore every injected workload and retargeted Service in place; the report lines."""
    report: list[str] = []
    problems: list[str] = []
    for obj in (o for d in docs for o in _objects(d.obj)):
        meta = obj.get("metadata") or {}
        if obj.get("kind") == "Service" and SERVICE_PORTS in (meta.get("annotations") or {}):
            record = json.loads(meta["annotations"].pop(SERVICE_PORTS))
            ports = obj["spec"]["ports"]
            for index, target in record["targetPorts"].items():
                if target is None:
                    ports[int(index)].pop("targetPort", None)
                else:
                    ports[int(index)]["targetPort"] = target
            if not record["annotations"] and not meta["annotations"]:
                del meta["annotations"]
            report.append(f"{_name(obj)} targetPort restored")
            continue
        pod = _pod(obj)
        if pod is None:
            continue
        node, meta, spec = pod
        try:
            outcome = uninject_pod(meta, spec)
        except ConfigError as exc:
            problems += [f"{_name(obj)}: {p}" for p in exc.problems]
            continue
        if node is not obj and not meta:
            node.pop("metadata", None)  # a template without metadata before inject
        report += _report(_name(obj), outcome)
    if problems:
        raise ConfigError(problems)
    return report


def dump(docs: list[Document], fmt: str) -> str:
    """The documents as multi-document YAML, or JSON (several as a ``kind: List``)."""
    objs = [d.obj for d in docs]
    if fmt == "json":
        out = objs[0] if len(objs) == 1 else {"apiVersion": "v1", "kind": "List", "items": objs}
        return json.dumps(out, indent=2) + "\n"
    if not objs:
        return ""
    text: str = yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                              allow_unicode=True, width=1_000_000, explicit_start=True)
    return text
