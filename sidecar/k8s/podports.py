"""Ports of an injected pod: which app port the sidecar fronts, and the names and numbers the
sidecar takes, without iptables.

The sidecar takes over the name of the fronted port (so a Service whose ``targetPort`` is that
name now reaches the sidecar) and the app's port is renamed, its probes and hooks following it.
Port names obey Kubernetes' IANA_SVC_NAME rule (at most 15 characters of ``a-z0-9-``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ("AppPort", "choose_port", "free_port_number", "rename_port", "sidecar_port_names")

_MAX_NAME = 15
_PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
_ACTIONS = ("httpGet", "tcpSocket", "grpc")


@dataclass(frozen=True, slots=True)
class AppPort:
    container: int     # index in spec.containers
    number: int
    name: str | None   # the containerPort's name, if it has one


def _tcp_ports(containers: list[dict[str, Any]]) -> list[AppPort]:
    return [AppPort(i, int(p["containerPort"]), p.get("name"))
            for i, c in enumerate(containers) for p in c.get("ports") or []
            if p.get("protocol", "TCP") == "TCP" and "containerPort" in p]


def choose_port(containers: list[dict[str, Any]], wanted: str | None) -> AppPort | None:
    """The app port to front: the ``sidecar.drain/port`` annotation's, else the only TCP port.

    None when the pod has no TCP port; ValueError when the choice is ambiguous or names no port.
    """
    ports = _tcp_ports(containers)
    listing = ", ".join(f"{p.name or '-'} {p.number} in {containers[p.container].get('name')}"
                        for p in ports) or "none"
    if wanted is not None:
        key = wanted.strip()
        found = [p for p in ports if (p.name == key) or (key.isdigit() and p.number == int(key))]
        if len(found) == 1:
            return found[0]
        if not found and key.isdigit() and len(containers) == 1 and 0 < int(key) < 65536:
            return AppPort(0, int(key), None)  # an undeclared port of the only container
        raise ValueError(f"annotation sidecar.drain/port: {wanted!r} names no single TCP "
                         f"container port (ports: {listing})")
    if len(ports) > 1:
        raise ValueError(f"{len(ports)} TCP container ports ({listing}): choose the one clients "
                         "use with annotation sidecar.drain/port")
    return ports[0] if ports else None


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
    """(listen, admin) port names: the fronted port's name (or http), and admin."""
    taken = _names(containers) - ({app.name} if app.name else set())
    listen = app.name or ("http" if "http" not in taken else _unique("drain", "http", taken))
    taken.add(listen)
    admin = "admin" if "admin" not in taken else _unique("drain", "admin", taken)
    return listen, admin


def rename_port(container: dict[str, Any], name: str, containers: list[dict[str, Any]]) -> str:
    """Rename the container's port ``name`` (e.g. http -> http-app); its own probes and hooks
    that use the name follow (the kubelet resolves a named port in the same container)."""
    new = _unique(name, "app", _names(containers))
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
