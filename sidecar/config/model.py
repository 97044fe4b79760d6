"""Configuration: YAML file, ``SIDECAR_*`` environment and flags into frozen dataclasses.

Precedence is defaults < file < env < flags.  Every problem is reported with the
dotted key it belongs to, and all problems are collected before giving up, so a
user fixes a broken file in one go.  Nothing here binds a port or starts a loop.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml  # type: ignore[import-untyped]

from . import sources
from . import values as v
from .values import Address, format_duration

__all__ = (
    "Address", "ClientConfig", "Config", "ConfigError", "DrainConfig", "ExitConfig",
    "ExitHttp", "LoggingConfig", "UpstreamConfig", "format_duration", "load", "to_yaml",
)

REDACTED = "<redacted>"


class ConfigError(Exception):
    """Raised with every problem found; ``problems`` holds one line per problem, naming the
    key, the annotation, the field or the file it is about (config and inject alike)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str
    connect_timeout: float
    timeout: float
    max_connections: int
    health_path: str | None
    health_interval: float
    health_grpc: str | None
    max_response_head: int

    @property
    def unix_path(self) -> str | None:
        return self.url[len("unix:"):] if self.url.startswith("unix:") else None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    header_timeout: float
    idle_timeout: float


@dataclass(frozen=True, slots=True)
class DrainConfig:
    delay: float
    timeout: float
    retry_after: int
    websockets: str
    linger: float
    grace_period: float
    close_spread: float


@dataclass(frozen=True, slots=True)
class ExitHttp:
    url: str
    method: str


@dataclass(frozen=True, slots=True)
class ExitConfig:
    signal: signal.Signals
    pid_file: str | None
    process: str | None
    http: ExitHttp | None
    wait: float


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str
    format: str
    access_log: bool


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address
    admin: Address
    admin_token: str | None
    upstream: UpstreamConfig
    client: ClientConfig
    drain: DrainConfig
    exit: ExitConfig
    logging: LoggingConfig


# The schema: section -> key -> (parser, default).  Top-level scalars live in section "".
_Parser = Callable[[Any], Any]
SCHEMA: dict[str, dict[str, tuple[_Parser, Any]]] = {
    "": {
        "listen": (v.parse_address, "0.0.0.0:8080"),
        "admin": (v.parse_address, "0.0.0.0:9901"),
        "admin_token": (v.parse_optional(v.parse_secret), None),
    },
    "upstream": {
        "url": (v.parse_upstream_url, "http://127.0.0.1:8000"),
        "connect_timeout": (v.parse_positive_duration, "2s"),
        "timeout": (v.parse_duration, "60s"),
        "max_connections": (v.parse_integer(0, 1_000_000), 512),
        "health_path": (v.parse_optional(v.parse_path), None),
        "health_interval": (v.parse_positive_duration, "2s"),
        "health_grpc": (v.parse_grpc_service, None),
        "max_response_head": (v.parse_size(1024, 16 * 1024 * 1024), "64KiB"),
    },
    "client": {
        "header_timeout": (v.parse_positive_duration, "10s"),
        "idle_timeout": (v.parse_positive_duration, "75s"),
    },
    "drain": {
        "delay": (v.parse_duration, "5s"),
        "timeout": (v.parse_duration, "20s"),
        "retry_after": (v.parse_seconds, 5),
        "websockets": (v.parse_choice("close", "wait"), "close"),
        "linger": (v.parse_duration, "0s"),
        "grace_period": (v.parse_positive_duration, "30s"),
        "close_spread": (v.parse_duration, "2s"),
    },
    "exit": {
        "signal": (v.parse_signal, "SIGTERM"),
        "pid_file": (v.parse_optional(v.parse_text), None),
        "process": (v.parse_optional(v.parse_regex), None),
        "http": (lambda v: v, None),  # checked by _exit_http: a mapping or a URL
        "wait": (v.parse_duration, "5s"),
    },
    "logging": {
        "level": (v.parse_choice("debug", "info", "warning", "error"), "info"),
        "format": (v.parse_choice("auto", "json", "text"), "auto"),
        "access_log": (v.parse_boolean, False),
    },
}


def _exit_http(value: Any, key: str, problems: list[str]) -> ExitHttp | None:
    if value is None or value == "" or value == "null":
        return None
    if isinstance(value, str):
        value = {"url": value}
    if not isinstance(value, Mapping):
        problems.append(f"{key}: expected {{url: http://..., method: POST}} or a URL, got {value!r}")
        return None
    unknown = set(value) - {"url", "method"}
    for name in sorted(unknown):
        problems.append(f"{key}.{name}: unknown key (expected url, method)")
    try:
        url = v.parse_http_url(value.get("url"))
    except ValueError as exc:
        problems.append(f"{key}.url: {exc}")
        return None
    try:
        method = v.parse_method(value.get("method", "POST"))
    except ValueError as exc:
        problems.append(f"{key}.method: {exc}")
        return None
    return None if unknown else ExitHttp(url, method)


def load(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> Config:
    """Build the effective config; raise ConfigError naming every bad key."""
    problems: list[str] = []
    raw: dict[str, dict[str, Any]] = {s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items()}
    origins: dict[str, str] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError([f"config file {path}: {exc.strerror}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"config file {path}: not valid YAML: {exc}"]) from None
        except UnicodeDecodeError as exc:
            problem = f"config file {path}: not UTF-8 text: {exc.reason} at byte {exc.start}"
            raise ConfigError([problem]) from None
        except RecursionError:
            raise ConfigError([f"config file {path}: nested too deeply"]) from None
        sources.merge_file(raw, data, f"config file {path}", problems, SCHEMA)
    sources.merge_env(raw, origins, env or {}, problems, SCHEMA)
    flag_keys = {"listen": ("", "listen"), "admin": ("", "admin"), "upstream": ("upstream", "url")}
    for flag, value in (flags or {}).items():
        if value is not None:
            section, key = flag_keys[flag]
            raw[section][key] = value
            origins[sources.dotted(section, key)] = f"--{flag}"

    values: dict[str, dict[str, Any]] = {s: {} for s in SCHEMA}
    for section, keys in SCHEMA.items():
        for key, (parse, _) in keys.items():
            dotted = sources.dotted(section, key)
            label = f"{dotted} (from {origins[dotted]})" if dotted in origins else dotted
            if dotted == "exit.http":
                values[section][key] = _exit_http(raw[section][key], label, problems)
                continue
            try:
                values[section][key] = parse(raw[section][key])
            except ValueError as exc:
                problems.append(f"{label}: {exc}")
    # Checks across keys run on whatever parsed, so one pass reports every problem.
    _check_together(values, problems)
    if problems:
        raise ConfigError(problems)

    return Config(
        listen=values[""]["listen"],
        admin=values[""]["admin"],
        admin_token=values[""]["admin_token"],
        upstream=UpstreamConfig(**values["upstream"]),
        client=ClientConfig(**values["client"]),
        drain=DrainConfig(**values["drain"]),
        exit=ExitConfig(**values["exit"]),
        logging=LoggingConfig(**values["logging"]),
    )


def _check_together(values: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """Rules that involve several keys; a key that failed to parse is left out of them."""
    d, e, top = values["drain"], values["exit"], values[""]
    if all(k in d for k in ("delay", "timeout", "grace_period")) and "wait" in e:
        budget = d["delay"] + d["timeout"] + e["wait"]
        if budget > d["grace_period"]:
            problems.append(
                f"drain.grace_period: drain.delay + drain.timeout + exit.wait = "
                f"{format_duration(budget)} exceeds drain.grace_period "
                f"{format_duration(d['grace_period'])}; the kubelet would SIGKILL the pod mid-drain: "
                f"shorten those or raise the grace period (and terminationGracePeriodSeconds with it)"
            )
    listen, admin = top.get("listen"), top.get("admin")
    if listen is not None and listen.port != 0 and listen == admin:
        problems.append(f"admin: {admin} is the same address as listen")


def to_yaml(config: Config) -> str:
    """The effective config as YAML that is itself a valid config file (token redacted)."""
    u, c, d, e, lg = config.upstream, config.client, config.drain, config.exit, config.logging
    data: dict[str, Any] = {
        "listen": str(config.listen),
        "admin": str(config.admin),
        "admin_token": REDACTED if config.admin_token is not None else None,
        "upstream": {
            "url": u.url,
            "connect_timeout": format_duration(u.connect_timeout),
            "timeout": format_duration(u.timeout),
            "max_connections": u.max_connections,
            "health_path": u.health_path,
            "health_interval": format_duration(u.health_interval),
            "health_grpc": u.health_grpc,
            "max_response_head": v.format_size(u.max_response_head),
        },
        "client": {
            "header_timeout": format_duration(c.header_timeout),
            "idle_timeout": format_duration(c.idle_timeout),
        },
        "drain": {
            "delay": format_duration(d.delay),
            "timeout": format_duration(d.timeout),
            "retry_after": d.retry_after,
            "websockets": d.websockets,
            "linger": format_duration(d.linger),
            "grace_period": format_duration(d.grace_period),
            "close_spread": format_duration(d.close_spread),
        },
        "exit": {
            "signal": e.signal.name,
            "pid_file": e.pid_file,
            "process": e.process,
            "http": {"url": e.http.url, "method": e.http.method} if e.http else None,
            "wait": format_duration(e.wait),
        },
        "logging": {"level": lg.level, "format": lg.format, "access_log": lg.access_log},
    }
    text: str = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return text
