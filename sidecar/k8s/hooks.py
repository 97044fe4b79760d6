"""The preStop hooks of an injected pod: every container that serves traffic waits for the drain.

The kubelet runs each container's preStop hook at once and sends that container SIGTERM when its
own hook returns.  The app's hook becomes ``GET /drain`` on the sidecar's admin port, which
answers once drained; so does the hook of every other container that declares a port (an app
behind kube-rbac-proxy, a metrics exporter...): a request the sidecar still carries may need it.
A hook that only sleeps is replaced (its seconds become ``drain.delay``); any other hook of the
app is refused (a container has one preStop, and the drain needs it), and of another container
is kept with a warning naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ("Hooks", "add_drain_hooks", "check_hooks", "sleep_seconds")

_SLEEP_SHELLS = (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"], ["/bin/bash", "-c"])


def sleep_seconds(hook: dict[str, Any]) -> float | None:
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


@dataclass
class Hooks:
    """What the pod's hooks say: the longest replaced sleep, and which containers wait."""

    slept: float | None = None
    waiting: list[int] = field(default_factory=list)   # containers that get GET /drain
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_hooks(containers: list[dict[str, Any]], app: int, admin_port: int) -> Hooks:
    """Plan the hooks; ValueError (what to do) when the app has a hook that does more than sleep."""
    hooks = Hooks()
    for i, c in enumerate(containers):
        if i != app and not c.get("ports"):
            continue  # serves nothing: SIGTERM at once changes nothing for the drain
        name = c.get("name")
        hook = (c.get("lifecycle") or {}).get("preStop")
        slept = None if hook is None else sleep_seconds(hook)
        if hook is not None and slept is None:
            if i == app:
                raise ValueError(
                    f"container {name!r} has its own preStop hook ({', '.join(sorted(hook))}); "
                    "the sidecar needs the app's preStop to call /drain, and a container has "
                    "only one. Move that work into the app's SIGTERM handler (or the sidecar's "
                    "exit.http), remove the hook, or leave the workload out (annotation "
                    "sidecar.drain/inject: disabled, or --exclude)")
            hooks.warnings.append(
                f"container {name!r} serves ports and keeps its own preStop hook "
                f"({', '.join(sorted(hook))}): it gets SIGTERM when that hook ends, maybe while "
                f"the drain still needs it; end the hook by waiting for the drain (GET "
                f"http://127.0.0.1:{admin_port}/drain answers once drained)")
            continue
        hooks.waiting.append(i)
        if slept is not None:
            hooks.slept = max(hooks.slept or 0.0, slept)
            whose = "its" if i == app else f"container {name!r}: its"
            hooks.notes.append(f"{whose} preStop sleep {slept:g}s is replaced by /drain "
                               "(drain.delay keeps the pod serving while endpoints update)")
        elif i != app:
            hooks.notes.append(f"container {name!r} serves ports too: its preStop waits for "
                               "the drain (GET /drain), so it keeps serving until drained")
    return hooks


def add_drain_hooks(containers: list[dict[str, Any]], hooks: Hooks, admin_port: int) -> None:
    """Give every waiting container ``preStop: GET /drain`` on the admin port."""
    for i in hooks.waiting:
        lifecycle = containers[i].setdefault("lifecycle", {})
        lifecycle["preStop"] = {"httpGet": {"path": "/drain", "port": admin_port}}
