"""Adding the drain sidecar to one pod template, and taking it out again.

:func:`inject_pod` edits a pod template's metadata and spec in place: the sidecar container
(a native sidecar, or a regular container with ``classic``), the app's ``preStop`` -> ``/drain``,
the Service-facing port taken over by name, the grace period, the PodMonitor's label and a status
annotation.  Everything it replaced is saved in the ``sidecar.drain/original`` annotation, which
:func:`uninject_pod` restores exactly.  Bad input raises :class:`InjectError` naming the
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
from .podconfig import (
    PREFIX,
    RESOURCES,
    config_digest,
    container_env,
    read_annotations,
    workload_config,
)
from .podports import AppPort, choose_port, free_port_number, rename_port, sidecar_port_names

__all__ = (
    "CONTAINER",
    "DEFAULT_IMAGE",
    "LABEL",
    "ORIGINAL",
    "STATUS",
    "InjectError",
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
_SLEEP_SHELLS = (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"], ["/bin/bash", "-c"])


class InjectError(Exception):
    """Bad input in one workload; ``problems`` holds one line each (annotation or field named)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line chose; ``config`` is ``config_path`` loaded and validated."""

    config: Config
    config_path: str | None = None
    image: str = DEFAULT_IMAGE
    classic: bool = False


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


def _sleep_seconds(hook: dict[str, Any]) -> float | None:
    """The seconds of a preStop that only sleeps (``sleep:``, ``sleep N``, ``sh -c "sleep N"``)."""
    if set(hook) == {"sleep"}:
        return float(hook["sleep"].get("seconds", 0))
    command = (hook.get("exec") or {}).get("command") or []
    if set(hook) != {"exec"}:
        return None
    if command[:2] in _SLEEP_SHELLS and len(command) == 3:
        command = command[2].split()
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep") and command[1].isdigit():
        return float(command[1])
    return None


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


def inject_pod(meta: dict[str, Any], spec: dict[str, Any], options: Options,
               *, batch: bool = False) -> Outcome:
    """Add the sidecar to one pod template (edited in place); raise InjectError on bad input."""
    annotations = meta.get("annotations") or {}
    if STATUS in annotations:
        return Outcome("already injected")
    try:
        control, _ = read_annotations(annotations)
    except ValueError as exc:
        raise InjectError([str(exc)]) from None
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

    warnings: list[str] = []
    if spec.get("hostNetwork"):
        warnings.append("hostNetwork: true: the sidecar's ports are the node's ports, so two "
                        "such pods on one node clash")
    for c in containers + inits:
        if c.get("name") in _THIRD_PARTY:
            warnings.append(f"container {c['name']!r} is another proxy: its traffic capture "
                            "and shutdown order are not coordinated with the drain")
    marks = {**(meta.get("labels") or {}), **annotations}
    for key, value in _MESH_INJECT.items():
        if str(marks.get(key, "")).lower() == value:
            warnings.append(f"{key}: {value}: a mesh proxy will be added too; its traffic "
                            "capture and shutdown order are not coordinated with the drain")
    try:
        app = choose_port(containers, control.get("port"))
    except ValueError as exc:
        raise InjectError([str(exc)]) from None
    if app is None:
        return Outcome("skipped", "no TCP container port to front",
                       warnings=[*warnings, ("no container port to front: give the app's "
                                 "containerPort, or annotate it sidecar.drain/inject: disabled")])
    app_container = containers[app.container]
    for port in app_container.get("ports") or []:
        if port.get("containerPort") == app.number and port.get("hostPort"):
            warnings.append(f"port {app.number} has hostPort {port['hostPort']}: traffic to "
                            "the node's port reaches the app past the sidecar")
    hook = (app_container.get("lifecycle") or {}).get("preStop")
    notes: list[str] = []
    if hook is not None:
        slept = _sleep_seconds(hook)
        if slept is None:
            raise InjectError([
                (f"container {app_container['name']!r} has its own preStop hook "
                f"({', '.join(sorted(hook))}); the sidecar needs the app's preStop to call "
                "/drain, and a container has only one. Move that work into the app's SIGTERM "
                "handler (or the sidecar's exit.http), remove the hook, or annotate "
                f"{PREFIX}inject: disabled")])
        notes.append(f"its preStop sleep {slept:g}s is replaced by /drain "
                     "(drain.delay keeps the pod serving while endpoints update)")

    base = options.config
    taken = {int(p["containerPort"]) for c in containers + inits for p in c.get("ports") or []}
    listen_port = free_port_number(base.listen.port, taken)
    admin_port = free_port_number(base.admin.port, taken | {listen_port})
    for wanted, got in ((base.listen.port, listen_port), (base.admin.port, admin_port)):
        if wanted != got:
            notes.append(f"port {wanted} is taken in the pod: the sidecar uses {got}")
    current = spec.get("terminationGracePeriodSeconds", 30)
    longer = current if isinstance(current, int) and current > base.drain.grace_period else None
    try:
        config = workload_config(
            options.config_path, annotations,
            listen=str(Address(base.listen.host, listen_port)),
            admin=str(Address(base.admin.host, admin_port)),
            upstream=f"http://127.0.0.1:{app.number}", grace_period=longer)
    except ConfigError as exc:
        raise InjectError(exc.problems) from None

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
    lifecycle = app_container.setdefault("lifecycle", {})
    lifecycle["preStop"] = {"httpGet": {"path": "/drain", "port": admin_port}}

    image = control.get("image") or options.image
    sidecar = _sidecar(options, image, container_env(config),
                       (listen_name, listen_port), (admin_name, admin_port), control)
    if options.classic:
        containers.append(sidecar)
    else:
        spec.setdefault("initContainers", []).append(sidecar)
    grace = math.ceil(config.drain.grace_period)
    if current < grace:
        spec["terminationGracePeriodSeconds"] = grace
        warnings.append(f"terminationGracePeriodSeconds raised from {current} to {grace} "
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


def uninject_pod(meta: dict[str, Any], spec: dict[str, Any]) -> Outcome:
    """Restore the pod template saved by :func:`inject_pod` (edited in place)."""
    annotations = meta.get("annotations") or {}
    if STATUS not in annotations or ORIGINAL not in annotations:
        return Outcome("not injected")
    try:
        status = json.loads(annotations[STATUS])
        original = json.loads(annotations[ORIGINAL])
    except ValueError:
        raise InjectError([f"annotation {ORIGINAL}: not the JSON inject wrote"]) from None
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
