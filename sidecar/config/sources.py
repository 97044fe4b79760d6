"""Where settings come from: the YAML file and the ``SIDECAR_*`` environment.

Both are laid over a raw ``{section: {key: value}}`` mapping before any value is
parsed; a key that is not in the schema is a problem with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

__all__ = ("dotted", "env_name", "merge_env", "merge_file")

Raw = dict[str, dict[str, Any]]

# The variables Kubernetes injects for every Service in the namespace (enableServiceLinks):
# a Service named "sidecar-drain-x" gives SIDECAR_DRAIN_X_SERVICE_HOST, _SERVICE_PORT[_NAME],
# _PORT=tcp://..., _PORT_80_TCP[_ADDR|_PORT|_PROTO].  They are never settings of ours.
_SERVICE_LINK = re.compile(
    r".+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)$")


def dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def env_name(section: str, key: str) -> str:
    return f"SIDECAR_{section}_{key}".upper() if section else f"SIDECAR_{key}".upper()


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def merge_file(
    raw: Raw, data: Any, origin: str, problems: list[str], schema: Mapping[str, Mapping[str, Any]]
) -> None:
    """Lay the YAML file's settings over ``raw``; unknown keys become problems."""
    if data is None:
        return
    if not isinstance(data, Mapping):
        problems.append(f"{origin}: expected a mapping of settings at the top level")
        return
    top_level = list(schema[""]) + [s for s in schema if s]
    for name, value in data.items():
        name = str(name)
        if name in schema[""]:
            raw[""][name] = value
        elif name in schema and name:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                problems.append(f"{name}: expected a mapping of {name} settings, got {value!r}")
                continue
            for key, leaf in value.items():
                key = str(key)
                if key in schema[name]:
                    raw[name][key] = leaf
                else:
                    hint = _suggest(key, list(schema[name]))
                    problems.append(f"{_shown(f'{name}.{key}')}: unknown key{hint}")
        else:
            problems.append(f"{_shown(name)}: unknown key{_suggest(name, top_level)}")


_PLAIN = re.compile(r"[\w.\-]+")


def _shown(name: str) -> str:
    """A key as a problem line names it: quoted when it is not a plain word (``':'``,
    ``'a b'``, ``''``), so the line still reads ``KEY: what is wrong``."""
    return name if _PLAIN.fullmatch(name) else repr(name)


def merge_env(
    raw: Raw, origins: dict[str, str], env: Mapping[str, str], problems: list[str],
    schema: Mapping[str, Mapping[str, Any]],
) -> None:
    """Lay ``SIDECAR_*`` variables over ``raw``, recording which variable set each key."""
    known = {env_name(s, k): (s, k) for s, keys in schema.items() for k in keys}
    known["SIDECAR_EXIT_HTTP_URL"] = ("exit", "http.url")
    known["SIDECAR_EXIT_HTTP_METHOD"] = ("exit", "http.method")
    sections = tuple(f"SIDECAR_{s.upper()}_" for s in schema if s)
    for name, value in env.items():
        if name in known:
            section, key = known[name]
            if key.startswith("http."):
                current = raw["exit"].get("http")
                merged = dict(current) if isinstance(current, Mapping) else (
                    {"url": current} if isinstance(current, str) and current else {}
                )
                merged[key.split(".", 1)[1]] = value
                raw["exit"]["http"] = merged
            else:
                raw[section][key] = value
            origins[dotted(section, key.split(".")[0])] = name
        elif name.startswith(sections) and not _SERVICE_LINK.match(name):
            # Only names inside a known section are typos; others, such as the
            # SIDECAR_SERVICE_HOST that Kubernetes service links inject (also for a
            # Service named sidecar-client: SIDECAR_CLIENT_SERVICE_HOST), are not ours.
            problems.append(f"{name}: unknown setting{_suggest(name, list(known))}")
