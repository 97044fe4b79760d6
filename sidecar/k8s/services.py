"""Services and NetworkPolicies in the same input as the injected workloads.

A Service that targets the app's port by *name* keeps working untouched: the sidecar took over
the name.  One that targets it by *number* must point at the sidecar's port instead, and that
rewrite is only right when every pod the Service selects has the sidecar, the Service routes
through its cluster IP, and the new port is live on every pod.  So a numeric ``targetPort`` is
rewritten (and recorded for ``uninject``) only when:

- every workload in the input that the Service selects is injected, with the same ports
  (a Service shared with an opted-out workload would send that one's traffic nowhere);
- the Service is not headless (``clusterIP: None``: its clients connect to pods directly);
- ``--keep-service`` is not given.  The rewrite applies at once while a rolling update still
  has pods without the sidecar (nothing listens on the new port there); ``--keep-service``
  is the first phase of the safe path, inject again without it once the rollout is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .inject import Outcome
from .podconfig import PREFIX
from .protocols import ServicePort

__all__ = ("SERVICE_PORTS", "Workload", "policy_warnings", "retarget", "service_link_warnings",
           "service_ports", "unselected_warning")

SERVICE_PORTS = PREFIX + "original-target-ports"
_OUR_SECTIONS = ("SIDECAR_UPSTREAM_", "SIDECAR_DRAIN_", "SIDECAR_EXIT_", "SIDECAR_LOGGING_")


@dataclass
class Workload:
    obj: dict[str, Any]
    name: str                # deployment/web -n shop
    labels: dict[str, str]   # its pods' labels
    outcome: Outcome


def _label(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    where = f" -n {meta['namespace']}" if meta.get("namespace") else ""
    return f"{str(obj.get('kind')).lower()}/{meta.get('name', '?')}{where}"


def _selects(other: dict[str, Any], selector: dict[str, Any], obj: dict[str, Any],
             labels: dict[str, str]) -> bool:
    """Whether ``other`` (a Service, a NetworkPolicy) in the same namespace as workload ``obj``
    selects its pods (labelled ``labels``) with ``selector`` (an empty one selects all)."""
    same_ns = ((other.get("metadata") or {}).get("namespace")
               == (obj.get("metadata") or {}).get("namespace"))
    return same_ns and all(labels.get(k) == v for k, v in selector.items())


def _selector(service: dict[str, Any]) -> dict[str, Any]:
    return dict((service.get("spec") or {}).get("selector") or {})


def _headless(service: dict[str, Any]) -> bool:
    return (service.get("spec") or {}).get("clusterIP") == "None"


def service_ports(services: list[dict[str, Any]], obj: dict[str, Any],
                  labels: dict[str, str]) -> list[ServicePort]:
    """The ports of every Service in the input that selects the workload's pods."""
    return [ServicePort(_label(s), p, _headless(s)) for s in services
            if _selector(s) and _selects(s, _selector(s), obj, labels)
            for p in (s.get("spec") or {}).get("ports") or []]


def unselected_warning(name: str, outcome: Outcome, services: list[dict[str, Any]],
                       obj: dict[str, Any]) -> list[str]:
    """An unnamed app port and no Service in the input: say which targetPort to use."""
    app = outcome.app_port
    if app is None or app.name is not None or any(
            _selector(s) and _selects(s, _selector(s), obj, outcome.labels) for s in services):
        return []
    return [(f"  warning: no Service in the input selects {name}: the Service that reaches it "
            f"must use targetPort: {outcome.sidecar_port} (the sidecar) instead of {app.number} "
            "(the app)")]


def retarget(services: list[dict[str, Any]], workloads: list[Workload], *,
             keep: bool) -> list[str]:
    """Point numeric targetPorts at the sidecars when that is safe (see the module doc)."""
    lines: list[str] = []
    for service in services:
        if not _selector(service) or SERVICE_PORTS in ((service.get("metadata") or {})
                                                       .get("annotations") or {}):
            continue  # no selector: endpoints by hand; or rewritten by an earlier run
        selected = [w for w in workloads if _selects(service, _selector(service), w.obj,
                                                     w.labels)]
        fronted = [w for w in selected if w.outcome.app_port is not None]
        if not fronted:
            continue
        lines += _retarget_one(service, selected, fronted, keep=keep)
    return lines


def _retarget_one(service: dict[str, Any], selected: list[Workload], fronted: list[Workload],
                  *, keep: bool) -> list[str]:
    name, lines = _label(service), []
    first = fronted[0].outcome
    assert first.app_port is not None
    numbers = {(w.outcome.app_port.number, w.outcome.sidecar_port) for w in fronted
               if w.outcome.app_port is not None}
    ports = (service.get("spec") or {}).get("ports") or []
    hits = [i for i, p in enumerate(ports) if any(
        str(p.get("targetPort", p.get("port"))) == str(n) for n, _ in numbers)]
    named = {w.outcome.app_port.name for w in fronted if w.outcome.app_port is not None} - {None}
    if _headless(service) and (hits or any(p.get("targetPort") in named for p in ports)):
        return [(f"  warning: {name} is headless (clusterIP: None): its clients connect to the "
                f"pods directly on the port they know, not through it; point them at the "
                f"sidecar's port {first.sidecar_port} (or give the Service a cluster IP), or they "
                "bypass the drain")]
    if not hits:
        return []
    names = ", ".join(w.name for w in fronted)
    if len(fronted) < len(selected) or len(numbers) > 1:
        others = ", ".join(w.name for w in selected if w not in fronted) or "pods with other ports"
        return [(f"  warning: {name} is not rewritten: it also selects {others}, which has no "
                f"sidecar on the same port; its traffic keeps going straight to the app of "
                f"{names} too. Give the app's containerPort a name and target that name, so each "
                "pod resolves it to its own port")]
    ((app_number, sidecar_port),) = numbers
    if keep:
        return [(f"{name} left as it is (--keep-service): its traffic keeps going straight to "
                f"port {app_number}; once every pod of {names} has the sidecar, run inject again "
                f"without --keep-service (or set targetPort: {sidecar_port})")]
    changed = {}
    for i in hits:
        changed[str(i)] = ports[i].get("targetPort")
        lines.append(f"{name} targetPort {ports[i].get('targetPort', ports[i].get('port'))} -> "
                     f"{sidecar_port} (the sidecar of {names})")
        ports[i]["targetPort"] = sidecar_port
    if any(w.outcome.result == "injected" for w in fronted):
        lines.append(f"  warning: {name}'s new targetPort applies at once, also to pods that do "
                     f"not have the sidecar yet (nothing listens on {sidecar_port} there) until "
                     "the rollout is done: for a running workload, apply with --keep-service "
                     "first, then again without it")
    meta = service.setdefault("metadata", {})
    record = {"targetPorts": changed, "annotations": "annotations" in meta}
    meta.setdefault("annotations", {})[SERVICE_PORTS] = json.dumps(record, separators=(",", ":"))
    return lines


def policy_warnings(name: str, outcome: Outcome, policies: list[dict[str, Any]],
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
                lines.append(f"  warning: {_label(policy)} admits port {app.number} (the app) to "
                             f"{name}: add port {outcome.sidecar_port} (the sidecar) to that rule")
                break
    return lines


def service_link_warnings(spec: dict[str, Any], services: list[dict[str, Any]]) -> list[str]:
    """Service links turn a Service named sidecar-drain-... into SIDECAR_* variables."""
    if spec.get("enableServiceLinks") is False:
        return []
    names = [str((s.get("metadata") or {}).get("name", "")) for s in services]
    bad = [n for n in names if (n.upper().replace("-", "_") + "_SERVICE_HOST").startswith(
        _OUR_SECTIONS)]
    return [f"  warning: Service {n!r} becomes SIDECAR_* variables through service links, "
            "which the sidecar reads as config: set enableServiceLinks: false" for n in bad]
