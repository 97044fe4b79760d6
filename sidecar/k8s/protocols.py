"""Whether a container port carries HTTP: the contract's "Which ports inject fronts", rule by rule.

The sidecar speaks HTTP/1.1, h2c and gRPC; anything else (Redis, Postgres, TLS, ZooKeeper...)
put behind it would be answered ``400`` while the pod reports Ready.  Each rule below either
speaks (HTTP or not, with the reason a user reads in the report) or passes to the next one; the
first that speaks decides.  Pure functions over the manifest's dicts: nothing here edits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ("DEFAULT_REASON", "NOT_HTTP_NUMBERS", "ServicePort", "Verdict", "judge", "targets")

# Rule 1: a Service port's appProtocol.  Values are "is it gRPC" for the HTTP ones.
_HTTP_APP_PROTOCOLS = {"http": False, "kubernetes.io/h2c": False, "h2c": False, "grpc": True}
# Rule 2: Istio's protocol prefixes (the name up to the first "-").
_HTTP_PREFIXES = {"http": False, "http2": False, "h2c": False, "grpc": True}
_NOT_PREFIXES = frozenset({"https", "tls", "tcp", "udp", "mongo", "mysql", "redis", "postgres",
                           "postgresql", "kafka", "amqp", "zookeeper", "memcached", "cql", "nats"})
# Rule 4: Linkerd's default opaque ports, and a few more well-known non-HTTP ones.
NOT_HTTP_NUMBERS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211,
                              2181, 5672, 9042, 9092, 27017})
_PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
DEFAULT_REASON = "nothing says it is not"  # rule 5: the report suggests how to say it


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a Service in the input that selects the workload."""

    service: str          # e.g. service/redis-cart
    port: dict[str, Any]  # the Service's ports[] entry
    headless: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    http: bool
    grpc: bool    # gRPC: the sidecar's port is named grpc and its health check follows
    reason: str   # the rule that spoke, in words


def targets(service_port: dict[str, Any], number: int, name: str | None) -> bool:
    """Whether a Service port's targetPort (default: its port) is this container port."""
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target) == number
    return name is not None and target == name


def _prefix(name: str) -> tuple[bool | None, bool]:
    """(HTTP?, gRPC?) from a port name's protocol prefix; (None, False) when it says nothing."""
    if name == "grpc-web" or name.startswith("grpc-web-"):
        return True, False  # gRPC-Web is HTTP/1.1 or 2 from browsers, not gRPC's health service
    prefix = name.split("-", 1)[0].lower()
    if prefix in _HTTP_PREFIXES:
        return True, _HTTP_PREFIXES[prefix]
    if prefix in _NOT_PREFIXES:
        return False, False
    return None, False


def _probe_kind(container: dict[str, Any], number: int, name: str | None) -> str | None:
    for key in _PROBES:
        probe = container.get(key) or {}
        for action in ("grpc", "httpGet"):
            port = (probe.get(action) or {}).get("port")
            if port is not None and (str(port) == str(number) or (name and port == name)):
                return action
    return None


def judge(container: dict[str, Any], port: dict[str, Any],
          service_ports: list[ServicePort]) -> Verdict:
    """The verdict on one container port (``port`` is its ``ports[]`` entry)."""
    number, name = int(port["containerPort"]), port.get("name")
    mine = [s for s in service_ports if targets(s.port, number, name)]
    for s in mine:  # 1. appProtocol
        proto = s.port.get("appProtocol")
        if proto is not None:
            where = f"{s.service} port {s.port.get('name') or s.port.get('port')}"
            if str(proto).lower() in _HTTP_APP_PROTOCOLS:
                return Verdict(True, _HTTP_APP_PROTOCOLS[str(proto).lower()],
                               f"appProtocol {proto} of {where}")
            return Verdict(False, False, f"appProtocol {proto} of {where}")
    names = [(s.port.get("name"), f"{s.service} port") for s in mine] + [(name, "port")]
    for port_name, what in names:  # 2. the protocol prefix of the Service's, then our name
        if not port_name:
            continue
        http, grpc = _prefix(str(port_name))
        if http is not None:
            return Verdict(http, grpc, f"{what} name {port_name!r}")
    kind = _probe_kind(container, number, name)  # 3. a probe on that port
    if kind == "grpc":
        return Verdict(True, True, "a grpc probe on it")
    if kind == "httpGet":
        return Verdict(True, False, "an httpGet probe on it")
    if number in NOT_HTTP_NUMBERS:  # 4. well-known numbers
        return Verdict(False, False, f"{number} is a well-known non-HTTP port")
    return Verdict(True, False, DEFAULT_REASON)  # 5.
