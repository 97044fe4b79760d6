"""Ports of an injected pod: which app port the sidecar fronts, and the names and numbers the
sidecar takes, without iptables.

Only a port that carries HTTP is fronted (:mod:`sidecar.k8s.protocols` judges each one); an
explicit choice (the ``sidecar.drain/port`` annotation, else ``--port``) wins over the rules.
The sidecar takes over the name of the fronted port (so a Service whose ``targetPort`` is that
name now reaches the sidecar) and the app's port is renamed, its probes and hooks following it.
Port names obey Kubernetes' IANA_SVC_NAME rule (at most 15 characters of ``a-z0-9-``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .protocols import DEFAULT_REASON, ServicePort, Verdict, judge

__all__ = ("AppPort", "PortChoice", "choose_port", "free_port_number", "rename_port",
           "sidecar_port_names")

_MAX_NAME = 15
_PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
_ACTIONS = ("httpGet", "tcpSocket", "grpc")


@dataclass(frozen=True, slots=True)
class AppPort:
    container: int     # index in spec.containers
    number: int
    name: str | None   # the containerPort's name, if it has one
    grpc: bool = False  # the rules say gRPC: the sidecar's port is named grpc


@dataclass
class PortChoice:
    """The port to front (None: nothing to front, ``reason`` says why) and a line per port."""

    app: AppPort | None
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def _label(containers: list[dict[str, Any]], port: AppPort) -> str:
    named = f" ({port.name})" if port.name else ""
    return f"port {port.number}{named} of container {containers[port.container].get('name')!r}"


def _tcp_ports(containers: list[dict[str, Any]],
               service_ports: list[ServicePort]) -> list[tuple[AppPort, Verdict]]:
    found = []
    for i, c in enumerate(containers):
        for p in c.get("ports") or []:
            if p.get("protocol", "TCP") != "TCP" or "containerPort" not in p:
                continue
            verdict = judge(c, p, service_ports)
            found.append((AppPort(i, int(p["containerPort"]), p.get("name"), verdict.grpc),
                          verdict))
    return found


def _match(ports: list[tuple[AppPort, Verdict]], key: str) -> list[tuple[AppPort, Verdict]]:
    key = key.strip()
    return [(p, v) for p, v in ports
            if p.name == key or (key.isdigit() and p.number == int(key))]


def choose_port(containers: list[dict[str, Any]], *, annotation: str | None = None,
                flag: str | None = None,
                service_ports: list[ServicePort] | None = None) -> PortChoice:
    """The app port to front, with a report line for every TCP port of the pod.

    ``annotation`` (sidecar.drain/port) must name a declared port; ``flag`` (--port) counts only
    for a workload that has that port.  Without either, the one HTTP port; ValueError when the
    annotation names no port or several ports are HTTP.
    """
    ports = _tcp_ports(containers, service_ports or [])
    listing = ", ".join(f"{p.name or '-'} {p.number} in {containers[p.container].get('name')}"
                        for p, _ in ports) or "none"
    chosen, by = None, ""
    if annotation is not None:
        found = _match(ports, annotation)
        if len(found) != 1:
            raise ValueError(f"annotation sidecar.drain/port: {annotation!r} names no single TCP "
                             f"container port (ports: {listing}); the pod would never become "
                             "Ready")
        chosen, by = found[0], "annotation sidecar.drain/port"
    elif flag is not None and len(_match(ports, flag)) == 1:
        chosen, by = _match(ports, flag)[0], "--port"
    http = [(p, v) for p, v in ports if v.http]
    if chosen is None:
        if len(http) > 1:
            names = ", ".join(p.name or str(p.number) for p, _ in http)
            raise ValueError(f"{len(ports)} TCP container ports ({listing}), {len(http)} of them "
                             f"HTTP ({names}): choose the one clients use with annotation "
                             "sidecar.drain/port or --port")
        if not http:
            reason = "no HTTP port to front" if ports else "no TCP container port to front"
            return PortChoice(None, reason, [_not_fronted(containers, p, v) for p, v in ports])
        chosen = http[0]
    app = chosen[0]
    notes = []
    for port, v in ports:
        if port == app:
            notes.append(_fronted(containers, app, v, by))
        elif v.http:
            notes.append(f"{_label(containers, port)} is HTTP too ({v.reason}) but not fronted: "
                         "the sidecar fronts one port")
        else:
            notes.append(_not_fronted(containers, port, v))
    return PortChoice(app, notes=notes)


_UNSURE = ("; if it is not, name it tcp-... (or give its Service port an appProtocol) and "
           "inject again")


def _fronted(containers: list[dict[str, Any]], port: AppPort, verdict: Verdict, by: str) -> str:
    if not by:
        unsure = _UNSURE if verdict.reason == DEFAULT_REASON else ""
        return f"fronts {_label(containers, port)} (HTTP: {verdict.reason}){unsure}"
    if verdict.http:
        return f"fronts {_label(containers, port)}: chosen by {by} (HTTP: {verdict.reason})"
    return (f"fronts {_label(containers, port)}: chosen by {by}, though the rules say it is "
            f"not HTTP ({verdict.reason})")


def _not_fronted(containers: list[dict[str, Any]], port: AppPort, verdict: Verdict) -> str:
    return (f"{_label(containers, port)} is not HTTP ({verdict.reason}): not fronted, its "
            "traffic goes straight to the app")


def free_port_number(wanted: int, taken: set[int]) -> int:
    """``wanted``, or the next number up that no container of the pod declares."""
    port = wanted
    while port in taken:
        port += 1
    if port > 65535:
        raise ValueError(f"no free port from {wanted} up")
    return port


def _names(containers: list[dict[str, Any]]) -> set[str]:
    return {p["name"] for c in containers for p in c.get("ports") or [] if p.get("name")}


def _unique(base: str, suffix: str, taken: set[str]) -> str:
    stem = base[: _MAX_NAME - len(suffix) - 1].rstrip("-")
    name, n = f"{stem}-{suffix}", 2
    while name in taken:
        tail = f"{suffix}{n}"
        name, n = f"{base[: _MAX_NAME - len(tail) - 1].rstrip('-')}-{tail}", n + 1
    return name


def sidecar_port_names(containers: list[dict[str, Any]], app: AppPort) -> tuple[str, str]:
    """(listen, admin) port names: the fronted port's name (else grpc or http, for what it
    carries), and admin."""
    taken = _names(containers) - ({app.name} if app.name else set())
    kind = "grpc" if app.grpc else "http"
    listen = app.name or (kind if kind not in taken else _unique("drain", kind, taken))
    taken.add(listen)
    admin = "admin" if "admin" not in taken else _unique("drain", "admin", taken)
    return listen, admin


def _app_name(name: str, number: int, taken: set[str]) -> str:
    """``NAME-app`` when it fits in 15 characters, else ``app-NUMBER``: never a cut word."""
    candidates = [f"{name}-app", f"app-{number}"]
    candidates += [f"app-{number}-{n}" for n in range(2, 100)]
    return next(c for c in candidates if len(c) <= _MAX_NAME and c not in taken)


def rename_port(container: dict[str, Any], name: str, containers: list[dict[str, Any]]) -> str:
    """Rename the container's port ``name`` (e.g. http -> http-app); its own probes and hooks
    that use the name follow (the kubelet resolves a named port in the same container)."""
    number = next(int(p["containerPort"]) for p in container.get("ports") or []
                  if p.get("name") == name)
    new = _app_name(name, number, _names(containers))
    for port in container.get("ports") or []:
        if port.get("name") == name:
            port["name"] = new
    handlers = [container.get(p) or {} for p in _PROBES]
    handlers += list((container.get("lifecycle") or {}).values())
    for handler in handlers:
        for action in _ACTIONS:
            if (handler.get(action) or {}).get("port") == name:
                handler[action]["port"] = new
    return new
