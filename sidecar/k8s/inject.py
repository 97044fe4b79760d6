"""Adding the drain sidecar to one pod template, and taking it out again.

:func:`inject_pod` edits a pod template's metadata and spec in place: the sidecar container
(a native sidecar, or a regular container with ``classic``) in front of the pod's HTTP port
(:mod:`.protocols` judges each port), ``preStop`` -> ``/drain`` for every container that serves
(:mod:`.hooks`), the fronted port's name taken over, the budget (:mod:`.budget`), the
PodMonitor's label and a status annotation.  Everything it replaced is saved in the ``sidecar.drain/original`` annotation, which
:func:`uninject_pod` restores exactly.  Bad input raises :class:`ConfigError` naming the
annotation or field; nothing here reads files or prints.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..config import Address, Config, ConfigError
from .budget import fit
from .hooks import add_drain_hooks, check_hooks
from .podconfig import PREFIX, RESOURCES, config_digest, container_env, read_annotations
from .podports import AppPort, choose_port, free_port_number, rename_port, sidecar_port_names
from .protocols import ServicePort

__all__ = (
    "CONTAINER",
    "DEFAULT_IMAGE",
    "LABEL",
    "ORIGINAL",
    "STATUS",
    "Options",
    "Outcome",
    "inject_pod",
    "uninject_pod",
)

CONTAINER = "drain-sidecar"
DEFAULT_IMAGE = f"sidecar:{__version__}"  # as the Dockerfile builds it: docker build -t sidecar:V
LABEL = ("drain-sidecar", "enabled")      # what deploy/monitoring's PodMonitor selects
STATUS = PREFIX + "status"
ORIGINAL = PREFIX + "original"
_THIRD_PARTY = ("istio-proxy", "linkerd-proxy", "envoy", "envoy-sidecar")
_MESH_INJECT = {"sidecar.istio.io/inject": "true", "linkerd.io/inject": "enabled"}


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line chose; ``config`` is ``config_path`` loaded and validated."""

    config: Config
    config_path: str | None = None
    image: str = DEFAULT_IMAGE
    classic: bool = False
    port: str | None = None          # --port NAME|NUMBER, for the workloads that have it
    keep_service: bool = False       # --keep-service: no Service targetPort is rewritten
    exclude: frozenset[str] = frozenset()  # --exclude KIND/NAME: left as they are


@dataclass
class Outcome:
    """What happened to one workload, for the report and for Service rewriting."""

    result: str  # injected | skipped | already injected | uninjected | not injected
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    app_port: AppPort | None = None
    sidecar_port: int = 0
    labels: dict[str, str] = field(default_factory=dict)


def _digest(meta: dict[str, Any], spec: dict[str, Any]) -> str:
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != STATUS}
    text = json.dumps([meta.get("labels"), annotations, spec], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sidecar(options: Options, image: str, env: list[dict[str, str]],
             listen: tuple[str, int], admin: tuple[str, int],
             control: dict[str, str]) -> dict[str, Any]:
    """The injected container, locked down like deploy/base's sidecar."""
    resources = {"requests": {"cpu": "100m", "memory": "64Mi"},
                 "limits": {"cpu": "1", "memory": "256Mi"}}
    for key, (kind, name) in RESOURCES.items():
        if key in control:
            resources[kind][name] = control[key].strip()
    probe = {"periodSeconds": 2, "timeoutSeconds": 1, "failureThreshold": 1}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "env": env,
        "ports": [{"name": listen[0], "containerPort": listen[1], "protocol": "TCP"},
                  {"name": admin[0], "containerPort": admin[1], "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": admin[0]}, **probe},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": admin[0]},
                          "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if not options.classic:
        # Native sidecar: the app starts once the sidecar listens; stopped after the app.
        container["restartPolicy"] = "Always"
        container["startupProbe"] = {"httpGet": {"path": "/healthz", "port": admin[0]},
                                     "periodSeconds": 1, "timeoutSeconds": 1,
                                     "failureThreshold": 30}
    return container


def _already(spec: dict[str, Any], meta: dict[str, Any]) -> Outcome:
    """An injected template: what its sidecar fronts, so a second run can still retarget a
    Service (the second phase of a two-phase apply, see --keep-service)."""
    outcome = Outcome("already injected")
    side = next((c for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
                 if c.get("name") == CONTAINER), None)
    url = next((e.get("value", "") for e in (side or {}).get("env") or []
                if e.get("name") == "SIDECAR_UPSTREAM_URL"), "")
    port = url.rpartition(":")[2]
    if side and side.get("ports") and port.isdigit():
        outcome.app_port = AppPort(0, int(port), None)
        outcome.sidecar_port = int(side["ports"][0]["containerPort"])
        outcome.labels = {k: v for k, v in (meta.get("labels") or {}).items() if k != LABEL[0]}
    return outcome


def _grpc_service(container: dict[str, Any]) -> str | None:
    """The service a ``grpc:`` readinessProbe checks ("" = the whole server), if it has one."""
    probe = (container.get("readinessProbe") or {}).get("grpc")
    return None if probe is None else str(probe.get("service") or "")


def inject_pod(meta: dict[str, Any], spec: dict[str, Any], options: Options,
               *, batch: bool = False, service_ports: list[ServicePort] | None = None) -> Outcome:
    """Add the sidecar to one pod template (edited in place); raise ConfigError on bad input."""
    annotations = meta.get("annotations") or {}
    if STATUS in annotations:
        return _already(spec, meta)
    try:
        control, _ = read_annotations(annotations)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    if control.get("inject") == "disabled":
        return Outcome("skipped", f"annotation {PREFIX}inject: disabled")
    containers: list[dict[str, Any]] = spec.get("containers") or []
    inits: list[dict[str, Any]] = spec.get("initContainers") or []
    if (meta.get("labels") or {}).get(LABEL[0]) == LABEL[1]:
        return Outcome("skipped", f"label {LABEL[0]}: {LABEL[1]}: it already has a drain "
                                  "sidecar (the deploy/ layout)")
    if any(c.get("name") == CONTAINER for c in containers + inits):
        return Outcome("skipped", f"a container is already named {CONTAINER}")
    if batch and options.classic:
        return Outcome("skipped", "a regular sidecar container would keep the Job from "
                                  "completing; inject it as a native sidecar (without --classic)")
    try:
        choice = choose_port(containers, annotation=control.get("port"), flag=options.port,
                             service_ports=service_ports)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    app = choice.app
    if app is None:
        warnings = ([] if choice.notes or batch else  # a batch task that serves nothing
                    [("no container port to front: give the app's containerPort, or annotate "
                     "it sidecar.drain/inject: disabled")])
        return Outcome("skipped", choice.reason, notes=choice.notes, warnings=warnings)
    warnings = _warnings(meta, spec, containers + inits, app)
    app_container = containers[app.container]

    base = options.config
    taken = {int(p["containerPort"]) for c in containers + inits for p in c.get("ports") or []}
    listen_port = free_port_number(base.listen.port, taken)
    admin_port = free_port_number(base.admin.port, taken | {listen_port})
    try:
        hooks = check_hooks(containers, app.container, admin_port)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    notes = [*choice.notes, *hooks.notes]
    warnings += hooks.warnings
    for wanted, got in ((base.listen.port, listen_port), (base.admin.port, admin_port)):
        if wanted != got:
            notes.append(f"port {wanted} is taken in the pod: the sidecar uses {got}")
    current = spec.get("terminationGracePeriodSeconds")
    fitted = fit(options.config_path, base, annotations,  # ConfigError names annotations
                 listen=str(Address(base.listen.host, listen_port)),
                 admin=str(Address(base.admin.host, admin_port)),
                 upstream=f"http://127.0.0.1:{app.number}",
                 pod_grace=current if isinstance(current, int) else None,
                 slept=hooks.slept, grpc_service=_grpc_service(app_container))
    config = fitted.config
    notes += fitted.notes

    original = copy.deepcopy({"labels": meta.get("labels"),
                              "annotations": meta.get("annotations"), "spec": spec})
    listen_name, admin_name = sidecar_port_names(containers + inits, app)
    if admin_name != "admin":
        warnings.append(f"the pod already has a port named 'admin': the sidecar's is "
                        f"{admin_name!r}, which deploy/monitoring's PodMonitor (port: admin) "
                        "does not scrape")
    if app.name is not None:
        new_name = rename_port(app_container, app.name, containers + inits)
        notes.append(f"port {app.name!r} of container {app_container['name']!r} is now "
                     f"{new_name!r}; the sidecar took over {app.name!r}")
    add_drain_hooks(containers, hooks, admin_port)

    image = control.get("image") or options.image
    sidecar = _sidecar(options, image, container_env(config),
                       (listen_name, listen_port), (admin_name, admin_port), control)
    if options.classic:
        containers.append(sidecar)
    else:
        spec.setdefault("initContainers", []).append(sidecar)
    grace = math.ceil(config.drain.grace_period)
    if (current if isinstance(current, int) else 30) < grace:
        spec["terminationGracePeriodSeconds"] = grace
        warnings.append(f"terminationGracePeriodSeconds raised from {current or 30} to {grace} "
                        f"(drain.grace_period {grace}s)")
    meta.setdefault("labels", {})[LABEL[0]] = LABEL[1]
    meta.setdefault("annotations", {})[ORIGINAL] = json.dumps(original, separators=(",", ":"))
    status = {"version": __version__, "image": image,
              "mode": "classic" if options.classic else "native",
              "config": config_digest(config), "port": listen_name,
              "template": _digest(meta, spec)}
    meta["annotations"][STATUS] = json.dumps(status, separators=(",", ":"))
    return Outcome("injected", notes=notes, warnings=warnings, app_port=app,
                   sidecar_port=listen_port, labels=dict(original["labels"] or {}))


def _warnings(meta: dict[str, Any], spec: dict[str, Any], containers: list[dict[str, Any]],
              app: AppPort) -> list[str]:
    """What the user must look at in a pod inject can handle: shared ports, other proxies."""
    warnings: list[str] = []
    if spec.get("hostNetwork"):
        warnings.append("hostNetwork: true: the sidecar's ports are the node's ports, so two "
                        "such pods on one node clash")
    for c in containers:
        if c.get("name") in _THIRD_PARTY:
            warnings.append(f"container {c['name']!r} is another proxy: its traffic capture "
                            "and shutdown order are not coordinated with the drain")
    marks = {**(meta.get("labels") or {}), **(meta.get("annotations") or {})}
    for key, value in _MESH_INJECT.items():
        if str(marks.get(key, "")).lower() == value:
            warnings.append(f"{key}: {value}: a mesh proxy will be added too; its traffic "
                            "capture and shutdown order are not coordinated with the drain")
    for port in containers[app.container].get("ports") or []:
        if port.get("containerPort") == app.number and port.get("hostPort"):
            warnings.append(f"port {app.number} has hostPort {port['hostPort']}: traffic to "
                            "the node's port reaches the app past the sidecar")
    return warnings


def uninject_pod(meta: dict[str, Any], spec: dict[str, Any]) -> Outcome:
    """Restore the pod template saved by :func:`inject_pod` (edited in place)."""
    annotations = meta.get("annotations") or {}
    if STATUS not in annotations or ORIGINAL not in annotations:
        return Outcome("not injected")
    try:
        status = json.loads(annotations[STATUS])
        original = json.loads(annotations[ORIGINAL])
    except ValueError:
        raise ConfigError([f"annotation {ORIGINAL}: not the JSON inject wrote"]) from None
    warnings = []
    if status.get("template") != _digest(meta, spec):
        warnings.append("the pod template was edited after injection; those edits are lost "
                        "(the template is restored as it was before inject)")
    for key in ("labels", "annotations"):
        if original.get(key) is None:
            meta.pop(key, None)
        else:
            meta[key] = original[key]
    spec.clear()
    spec.update(original["spec"])
    return Outcome("uninjected", warnings=warnings)
