"""Kubernetes manifests in and out for ``sidecar inject`` / ``uninject``.

Reads files, directories (recursively: ``*.yaml``, ``*.yml``, ``*.json``) and ``-`` (stdin) as
multi-document YAML; walks ``kind: List`` items; hands each workload's pod template to
:mod:`sidecar.inject`; rewrites a Service in the same input that targets the app's port by number;
writes the documents back as YAML or JSON, and the per-workload report as lines for stderr.
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

from .inject import InjectError, Options, Outcome, inject_pod, uninject_pod
from .podconfig import PREFIX

__all__ = ("InputError", "dump", "inject_all", "read", "uninject_all")

_TEMPLATE = ("spec", "template")
WORKLOADS: dict[str, tuple[str, ...]] = {
    "Pod": (), "Deployment": _TEMPLATE, "StatefulSet": _TEMPLATE, "DaemonSet": _TEMPLATE,
    "ReplicaSet": _TEMPLATE, "Job": _TEMPLATE, "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
_BATCH = ("Job", "CronJob")
_SERVICE_PORTS = PREFIX + "original-target-ports"
_OUR_SECTIONS = ("SIDECAR_UPSTREAM_", "SIDECAR_DRAIN_", "SIDECAR_EXIT_", "SIDECAR_LOGGING_")


class InputError(Exception):
    """A file that cannot be read or is not YAML."""


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """YAML as Kubernetes reads it: an unquoted date stays a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


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
        raise InputError(f"{name}: not valid YAML: {exc}") from None


def read(paths: list[str], stdin: TextIO = sys.stdin) -> list[Document]:
    """Every non-empty document of every input, in order."""
    docs = []
    for arg in paths or ["-"]:
        sources = [("-", None)] if arg == "-" else [(str(p), p) for p in _files(Path(arg))]
        for name, path in sources:
            try:
                text = stdin.read() if path is None else path.read_text(encoding="utf-8")
            except OSError as exc:
                raise InputError(f"{name}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise InputError(f"{name}: not UTF-8 text") from None
            docs += [Document(name, d) for d in _parse(name, text) if d is not None]
    return docs


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


def _selects(other: dict[str, Any], selector: dict[str, Any], obj: dict[str, Any],
             labels: dict[str, str]) -> bool:
    """Whether ``other`` (a Service, a NetworkPolicy) in the same namespace as workload ``obj``
    selects its pods (labelled ``labels``) with ``selector`` (an empty one selects all)."""
    same_ns = ((other.get("metadata") or {}).get("namespace")
               == (obj.get("metadata") or {}).get("namespace"))
    return same_ns and all(labels.get(k) == v for k, v in selector.items())


def _retarget(name: str, outcome: Outcome, services: list[dict[str, Any]],
              obj: dict[str, Any]) -> list[str]:
    """Point Services in the input that target the app's port by number at the sidecar."""
    app = outcome.app_port
    assert app is not None
    lines, selected = [], False
    for service in services:
        selector = (service.get("spec") or {}).get("selector") or {}
        if not selector or not _selects(service, selector, obj, outcome.labels):
            continue  # a Service without a selector has its endpoints managed by hand
        selected = True
        annotations = (service.get("metadata") or {}).get("annotations") or {}
        if _SERVICE_PORTS in annotations:
            continue
        changed: dict[str, Any] = {}
        for i, port in enumerate((service.get("spec") or {}).get("ports") or []):
            target = port.get("targetPort", port.get("port"))
            if str(target) == str(app.number):
                changed[str(i)] = port.get("targetPort")
                port["targetPort"] = outcome.sidecar_port
                lines.append(f"{_name(service)} targetPort {target} -> {outcome.sidecar_port} "
                             f"(the sidecar of {name})")
        if changed:
            meta = service.setdefault("metadata", {})
            record = {"targetPorts": changed, "annotations": "annotations" in meta}
            meta.setdefault("annotations", {})[_SERVICE_PORTS] = json.dumps(
                record, separators=(",", ":"))
    if not selected and app.name is None:
        lines.append(f"  warning: no Service in the input selects {name}: the Service that "
                     f"reaches it must use targetPort: {outcome.sidecar_port} (the sidecar) "
                     f"instead of {app.number} (the app)")
    return lines


def _policy_warnings(name: str, outcome: Outcome, policies: list[dict[str, Any]],
                     obj: dict[str, Any]) -> list[str]:
    """A NetworkPolicy in the input that admits the app's port by number no longer admits the
    clients, who now arrive on the sidecar's port."""
    app = outcome.app_port
    assert app is not None
    lines = []
    for policy in policies:
        spec = policy.get("spec") or {}
        selector = (spec.get("podSelector") or {}).get("matchLabels") or {}
        if not _selects(policy, selector, obj, outcome.labels):
            continue
        for rule in spec.get("ingress") or []:
            if any(str(p.get("port")) == str(app.number) for p in rule.get("ports") or []):
                lines.append(f"  warning: {_name(policy)} admits port {app.number} (the app) to "
                             f"{name}: add port {outcome.sidecar_port} (the sidecar) to that rule")
                break
    return lines


def _service_link_warning(spec: dict[str, Any], services: list[dict[str, Any]]) -> list[str]:
    if spec.get("enableServiceLinks") is False:
        return []
    names = [str((s.get("metadata") or {}).get("name", "")) for s in services]
    bad = [n for n in names if (n.upper().replace("-", "_") + "_SERVICE_HOST").startswith(
        _OUR_SECTIONS)]
    return [f"  warning: Service {n!r} becomes SIDECAR_* variables through service links, "
            "which the sidecar reads as config: set enableServiceLinks: false" for n in bad]


def inject_all(docs: list[Document], options: Options) -> list[str]:
    """Inject every workload in place; the report lines. InjectError lists every problem."""
    objects = [o for d in docs for o in _objects(d.obj)]
    services = [o for o in objects if o.get("kind") == "Service"]
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    report: list[str] = []
    problems: list[str] = []
    for obj in objects:
        pod = _pod(obj)
        if pod is None:
            continue
        name, (node, meta, spec) = _name(obj), pod
        try:
            outcome = inject_pod(meta, spec, options, batch=obj["kind"] in _BATCH)
        except InjectError as exc:
            problems += [f"{name}: {p}" for p in exc.problems]
            continue
        report += _report(name, outcome)
        if outcome.result == "injected":
            node["metadata"] = meta
            report += _retarget(name, outcome, services, obj)
            report += _policy_warnings(name, outcome, policies, obj)
            report += _service_link_warning(spec, services)
    if problems:
        raise InjectError(problems)
    return report


def uninject_all(docs: list[Document]) -> list[str]:
    """Restore every injected workload and retargeted Service in place; the report lines."""
    report: list[str] = []
    problems: list[str] = []
    for obj in (o for d in docs for o in _objects(d.obj)):
        meta = obj.get("metadata") or {}
        if obj.get("kind") == "Service" and _SERVICE_PORTS in (meta.get("annotations") or {}):
            record = json.loads(meta["annotations"].pop(_SERVICE_PORTS))
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
        except InjectError as exc:
            problems += [f"{_name(obj)}: {p}" for p in exc.problems]
            continue
        if node is not obj and not meta:
            node.pop("metadata", None)  # a template without metadata before inject
        report += _report(_name(obj), outcome)
    if problems:
        raise InjectError(problems)
    return report


def dump(docs: list[Document], fmt: str) -> str:
    """The documents as multi-document YAML, or JSON (several as a ``kind: List``)."""
    objs = [d.obj for d in docs]
    if fmt == "json":
        out = objs[0] if len(objs) == 1 else {"apiVersion": "v1", "kind": "List", "items": objs}
        return json.dumps(out, indent=2) + "\n"
    if not objs:
        return ""
    text: str = yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False,
                                   allow_unicode=True, width=1_000_000, explicit_start=True)
    return text
