"""The injected sidecar's configuration for one workload.

``--config`` (or the built-in defaults), overlaid with the pod template's ``sidecar.drain/*``
annotations, validated by :func:`sidecar.config.load` exactly like the config file, and turned
into the ``SIDECAR_*`` environment of the injected container.  A problem names the annotation it
came from, never a variable the user did not write.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from ..config import SCHEMA, Config, ConfigError, load, sources, to_yaml
from ..config.values import parse_choice

__all__ = (
    "CONTROL",
    "PREFIX",
    "RESOURCES",
    "TUNABLE",
    "config_digest",
    "container_env",
    "read_annotations",
    "sets",
    "workload_config",
)

PREFIX = "sidecar.drain/"

# Annotations that steer the injection itself (not sidecar config keys).  ``status`` and
# ``original`` are written by inject; the others are the user's.
CONTROL = ("inject", "port", "image", "cpu", "memory", "cpu-limit", "memory-limit", "status",
           "original")
RESOURCES = {"cpu": ("requests", "cpu"), "memory": ("requests", "memory"),
             "cpu-limit": ("limits", "cpu"), "memory-limit": ("limits", "memory")}
_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|[numkMGTPE]|[KMGTPE]i)?$")

# What inject sets per workload: never taken from an annotation.
_MANAGED = {"listen", "admin", "admin_token", "upstream.url"}

# Every other config key, as sidecar.drain/<section>.<key>, plus short names for the drain keys
# users tune most (sidecar.drain/delay = drain.delay, ...).
TUNABLE: dict[str, str] = {}
for _section, _keys in SCHEMA.items():
    for _key in _keys:
        _dotted = sources.dotted(_section, _key)
        if _dotted not in _MANAGED:
            TUNABLE[_dotted] = _dotted
for _key in SCHEMA["drain"]:
    TUNABLE[_key.replace("_", "-")] = f"drain.{_key}"


def _env_name(dotted: str) -> str:
    section, _, key = dotted.rpartition(".")
    return sources.env_name(section, key)


def read_annotations(annotations: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``sidecar.drain/*`` annotations into (control, config overrides by env name).

    Raises ValueError naming an unknown ``sidecar.drain/`` annotation (with a "did you mean").
    """
    control: dict[str, str] = {}
    overrides: dict[str, str] = {}
    for name, value in annotations.items():
        if not name.startswith(PREFIX):
            continue
        short = name[len(PREFIX):]
        if short in CONTROL:
            control[short] = str(value)
        elif short in TUNABLE:
            overrides[_env_name(TUNABLE[short])] = str(value)
        else:
            known = [PREFIX + k for k in (*CONTROL[:-2], *TUNABLE)]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"annotation {name}: unknown annotation{hint}")
    for key in RESOURCES:
        if key in control and not _QUANTITY.match(control[key].strip()):
            raise ValueError(f"annotation {PREFIX}{key}: expected a Kubernetes quantity such as "
                             f"100m, 0.5, 64Mi or 1Gi, got {control[key]!r}")
    if "inject" in control:
        try:
            control["inject"] = parse_choice("enabled", "disabled")(control["inject"])
        except ValueError as exc:
            raise ValueError(f"annotation {PREFIX}inject: {exc}") from None
    return control, overrides


def sets(annotations: Mapping[str, Any], dotted: str) -> bool:
    """Whether a ``sidecar.drain/*`` annotation sets the config key ``dotted``."""
    return any(name.startswith(PREFIX) and TUNABLE.get(name[len(PREFIX):]) == dotted
               for name in annotations)


def workload_config(
    config_path: str | None,
    annotations: Mapping[str, Any],
    *,
    listen: str,
    admin: str,
    upstream: str,
    defaults: Mapping[str, tuple[str, str]] | None = None,
) -> Config:
    """The effective config of one workload's sidecar; ConfigError problems name annotations.

    ``defaults`` maps a dotted key to (value, where it came from, e.g. "the pod's
    terminationGracePeriodSeconds"): inject's choices for this pod, which an annotation on the
    same key overrides.  A choice with an empty origin is inject's own and is not named in a
    problem (the user did not write it).
    """
    _, overrides = read_annotations(annotations)
    origin = {_env_name(TUNABLE[name[len(PREFIX):]]): f"annotation {name}" for name in annotations
              if name.startswith(PREFIX) and name[len(PREFIX):] in TUNABLE}
    for dotted, (value, where) in (defaults or {}).items():
        env = _env_name(dotted)
        if env not in overrides:
            overrides[env] = value
            if where:
                origin[env] = where
    try:
        config = load(config_path, env=overrides,
                      flags={"listen": listen, "admin": admin, "upstream": upstream})
    except ConfigError as exc:
        problems = []
        for problem in exc.problems:
            for env, where in origin.items():
                problem = problem.replace(f"(from {env})", f"({where})")
            if not any(where in problem for where in origin.values()) and origin:
                problem += f" ({', '.join(sorted(origin.values()))})"  # e.g. the budget check
            problems.append(problem)
        raise ConfigError(problems) from None
    if config.admin_token is not None:
        raise ConfigError([
            ("admin_token: inject writes no secrets into manifests; leave it unset in --config "
            "and give the injected container SIDECAR_ADMIN_TOKEN from a Secret (docs/kubernetes.md, "
            "'Admin token'), with the same token in the app's preStop httpHeaders")])
    return config


def _flat(config: Config) -> dict[str, Any]:
    import yaml  # type: ignore[import-untyped]

    data = yaml.safe_load(to_yaml(config))
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "":
            for leaf, leaf_value in value.items():
                flat[f"{key}.{leaf}"] = leaf_value
        else:
            flat[key] = value
    return flat


def container_env(config: Config) -> list[dict[str, str]]:
    """``SIDECAR_*`` variables for every key that differs from the built-in defaults.

    ``SIDECAR_CONFIG`` is set empty, so a config file baked into the image cannot add
    settings the manifest does not show: what ``kubectl get -o yaml`` shows is the config.
    """
    defaults = _flat(load(None))
    env = [{"name": "SIDECAR_CONFIG", "value": ""}]
    for key, value in _flat(config).items():
        if value == defaults.get(key) and key not in ("listen", "admin", "upstream.url"):
            continue
        if key == "exit.http":
            env.append({"name": "SIDECAR_EXIT_HTTP_URL", "value": str(value["url"])})
            env.append({"name": "SIDECAR_EXIT_HTTP_METHOD", "value": str(value["method"])})
            continue
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        env.append({"name": _env_name(key), "value": text})
    return env


def config_digest(config: Config) -> str:
    """A short, stable digest of the effective config (recorded in the status annotation)."""
    return "sha256:" + hashlib.sha256(to_yaml(config).encode()).hexdigest()[:16]
