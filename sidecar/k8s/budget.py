"""The drain budget of one injected pod, keeping what the user already stated.

Four choices, each one only where neither an annotation nor ``--config`` sets the key:

- ``drain.delay`` is the preStop ``sleep`` that inject replaces: the user measured that wait.
- The budget: a pod that sets ``terminationGracePeriodSeconds`` keeps it (at least
  ``drain.grace_period``), and going over it stays an error naming the annotations; the one
  exception is a delay taken from the replaced sleep, which shortens ``drain.timeout`` to what
  is left (that pod was already shaped around its sleep).  A pod that does not set it gets a
  grace period that holds ``drain.delay + drain.timeout + exit.wait``.
- ``upstream.timeout`` is at most ``drain.timeout`` (the README's sizing: a request the sidecar
  lets run longer than a drain would be aborted by the drain anyway).
- A ``grpc:`` readiness probe on the app gives ``upstream.health_grpc`` its service.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, load
from .podconfig import sets, workload_config

__all__ = ("Fitted", "fit")

_UNBOUNDED = "86400s"  # a first pass that measures delay + timeout + exit.wait


@dataclass
class Fitted:
    config: Config
    notes: list[str] = field(default_factory=list)


def _builtin(config: Config, defaults: Config, dotted: str) -> bool:
    section, key = dotted.split(".")
    return bool(getattr(getattr(config, section), key)
                == getattr(getattr(defaults, section), key))


def fit(config_path: str | None, base: Config, annotations: Mapping[str, Any], *,
        listen: str, admin: str, upstream: str, pod_grace: int | None,
        slept: float | None, grpc_service: str | None) -> Fitted:
    """The workload's config with the four choices above; ConfigError names annotations."""
    builtin = load(None)

    def free(dotted: str) -> bool:
        return not sets(annotations, dotted) and _builtin(base, builtin, dotted)

    def config(defaults: dict[str, tuple[str, str]]) -> Config:
        return workload_config(config_path, annotations, listen=listen, admin=admin,
                               upstream=upstream, defaults=defaults)

    notes: list[str] = []
    defaults: dict[str, tuple[str, str]] = {}
    if slept is not None and free("drain.delay"):
        defaults["drain.delay"] = (f"{slept:g}s", "the app's preStop sleep")
        notes.append(f"drain.delay is {slept:g}s, the wait its preStop sleep gave")
    if grpc_service is not None and free("upstream.health_grpc"):
        defaults["upstream.health_grpc"] = (grpc_service, "")
        notes.append(f"upstream.health_grpc is {grpc_service!r}, what the app's grpc "
                     "readinessProbe checks: readiness also needs the app SERVING")
    stated = pod_grace is not None or not free("drain.grace_period")
    if pod_grace is not None and pod_grace > base.drain.grace_period:
        defaults["drain.grace_period"] = (f"{pod_grace}s", "the pod's terminationGracePeriodSeconds")
    measured = config({**defaults, "drain.grace_period": (_UNBOUNDED, "")}
                      if free("drain.grace_period") else defaults)
    delay, wait = measured.drain.delay, measured.exit.wait
    timeout = measured.drain.timeout
    budget = measured.drain.grace_period if not free("drain.grace_period") else max(
        pod_grace or 0, base.drain.grace_period)
    if (stated and delay + timeout + wait > budget and "drain.delay" in defaults
            and free("drain.timeout") and budget - delay - wait >= 1):
        timeout = budget - delay - wait
        defaults["drain.timeout"] = (f"{timeout:g}s", "")
        notes.append(f"drain.timeout is {timeout:g}s, what the pod's grace period of {budget:g}s "
                     f"leaves after drain.delay {delay:g}s and exit.wait {wait:g}s")
    if free("upstream.timeout") and (measured.upstream.timeout == 0
                                     or measured.upstream.timeout > timeout):
        defaults["upstream.timeout"] = (f"{timeout:g}s", "")
        notes.append(f"upstream.timeout is {timeout:g}s (drain.timeout): no request is allowed "
                     "longer than a drain can wait for it")
    need = math.ceil(delay + timeout + wait)
    if not stated and need > base.drain.grace_period:
        defaults["drain.grace_period"] = (f"{need}s", "")
        notes.append(f"the pod sets no terminationGracePeriodSeconds: it gets {need}s, which "
                     f"holds drain.delay {delay:g}s + drain.timeout {timeout:g}s + exit.wait "
                     f"{wait:g}s")
    return Fitted(config(defaults), notes)
