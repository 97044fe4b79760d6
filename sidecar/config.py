"""Configuration: YAML file, ``SIDECAR_*`` environment and flags into frozen dataclasses.

Precedence is defaults < file < env < flags.  Every problem is reported with the
dotted key it belongs to, and all problems are collected before giving up, so a
user fixes a broken file in one go.  Nothing here binds a port or starts a loop.
"""

from __future__ import annotations

import difflib
import re
import signal
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml  # type: ignore[import-untyped]

__all__ = (
    "Address",
    "Config",
    "ConfigError",
    "DrainConfig",
    "ExitConfig",
    "ExitHttp",
    "LoggingConfig",
    "UpstreamConfig",
    "format_duration",
    "load",
    "to_yaml",
)

REDACTED = "<redacted>"


class ConfigError(Exception):
    """Raised with every problem found; ``problems`` holds one line per key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str
    connect_timeout: float
    timeout: float
    max_connections: int
    health_path: str | None
    health_interval: float

    @property
    def unix_path(self) -> str | None:
        return self.url[len("unix:"):] if self.url.startswith("unix:") else None


@dataclass(frozen=True, slots=True)
class DrainConfig:
    delay: float
    timeout: float
    retry_after: int
    websockets: str
    linger: float
    grace_period: float


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
    drain: DrainConfig
    exit: ExitConfig
    logging: LoggingConfig


# --- leaf parsers: each takes a YAML value or an env string, returns the typed value or raises
# ValueError with a message that says what is expected.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _duration(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration like 250ms, 5s, 2m or a number of seconds, got {value!r}")


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than zero, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    return f"{round(seconds, 3):g}s"


def _address(value: Any) -> Address:
    if (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and value.isdigit()):
        value = f"0.0.0.0:{value}"  # a bare port listens on every interface
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT such as 0.0.0.0:8080, got {value!r}")  # noqa: TRY004 - every config problem is a ValueError
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT such as 0.0.0.0:8080, got {value!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    host = host.strip("[]") or "0.0.0.0"
    return Address(host, port)


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")  # noqa: TRY004
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")

    return parse


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(value: Any) -> Any:
        if value is None or value == "" or value == "null":
            return None
        return parse(value)

    return wrapped


def _text(value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected a string, got {value!r}")


def _path(value: Any) -> str:
    text = _text(value)
    if not text.startswith("/"):
        raise ValueError(f"expected a path starting with /, got {text!r}")
    return text


def _http_url(value: Any) -> str:
    text = _text(value)
    parts = urllib.parse.urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"the port in {text!r} is not a number from 0 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http://HOST:PORT, got {text!r}")
    return text


def _upstream_url(value: Any) -> str:
    text = _text(value)
    if text.startswith("unix:"):
        if not text[len("unix:"):].startswith("/"):
            raise ValueError(f"expected unix:/absolute/path.sock, got {text!r}")
        return text
    _http_url(text)
    parts = urllib.parse.urlsplit(text)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must be http://HOST:PORT or unix:/path.sock without a path, got {text!r}")
    return text.rstrip("/")


def _regex(value: Any) -> str:
    text = _text(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None
    return text


def _signal(value: Any) -> signal.Signals:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value)
        except ValueError:
            raise ValueError(f"{value} is not a signal number") from None
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name in signal.Signals.__members__:
            return signal.Signals[name]
    raise ValueError(f"expected a signal name such as SIGTERM or SIGQUIT, got {value!r}")


def _method(value: Any) -> str:
    text = _text(value).upper()
    if not re.fullmatch(r"[A-Z]+", text):
        raise ValueError(f"expected an HTTP method such as POST, got {value!r}")
    return text


# The schema: section -> key -> (parser, default).  Top-level scalars live in section "".
_Parser = Callable[[Any], Any]
SCHEMA: dict[str, dict[str, tuple[_Parser, Any]]] = {
    "": {
        "listen": (_address, "0.0.0.0:8080"),
        "admin": (_address, "0.0.0.0:9901"),
        "admin_token": (_optional(_text), None),
    },
    "upstream": {
        "url": (_upstream_url, "http://127.0.0.1:8000"),
        "connect_timeout": (_positive_duration, "2s"),
        "timeout": (_duration, "60s"),
        "max_connections": (_integer(0, 1_000_000), 512),
        "health_path": (_optional(_path), None),
        "health_interval": (_positive_duration, "2s"),
    },
    "drain": {
        "delay": (_duration, "5s"),
        "timeout": (_duration, "20s"),
        "retry_after": (_integer(0, 86400), 5),
        "websockets": (_choice("close", "wait"), "close"),
        "linger": (_duration, "0s"),
        "grace_period": (_positive_duration, "30s"),
    },
    "exit": {
        "signal": (_signal, "SIGTERM"),
        "pid_file": (_optional(_text), None),
        "process": (_optional(_regex), None),
        "http": (lambda v: v, None),  # checked by _exit_http: a mapping or a URL
        "wait": (_duration, "5s"),
    },
    "logging": {
        "level": (_choice("debug", "info", "warning", "error"), "info"),
        "format": (_choice("json", "text"), "json"),
        "access_log": (_boolean, False),
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
        url = _http_url(value.get("url"))
    except ValueError as exc:
        problems.append(f"{key}.url: {exc}")
        return None
    try:
        method = _method(value.get("method", "POST"))
    except ValueError as exc:
        problems.append(f"{key}.method: {exc}")
        return None
    return None if unknown else ExitHttp(url, method)


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _env_name(section: str, key: str) -> str:
    return f"SIDECAR_{section}_{key}".upper() if section else f"SIDECAR_{key}".upper()


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _merge_file(raw: dict[str, dict[str, Any]], data: Any, origin: str, problems: list[str]) -> None:
    if data is None:
        return
    if not isinstance(data, Mapping):
        problems.append(f"{origin}: expected a mapping of settings at the top level")
        return
    top_level = list(SCHEMA[""]) + [s for s in SCHEMA if s]
    for name, value in data.items():
        name = str(name)
        if name in SCHEMA[""]:
            raw[""][name] = value
        elif name in SCHEMA and name:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                problems.append(f"{name}: expected a mapping of {name} settings, got {value!r}")
                continue
            for key, leaf in value.items():
                key = str(key)
                if key in SCHEMA[name]:
                    raw[name][key] = leaf
                else:
                    hint = _suggest(key, list(SCHEMA[name]))
                    problems.append(f"{name}.{key}: unknown key{hint}")
        else:
            problems.append(f"{name}: unknown key{_suggest(name, top_level)}")


def _merge_env(
    raw: dict[str, dict[str, Any]], origins: dict[str, str], env: Mapping[str, str], problems: list[str]
) -> None:
    known = {_env_name(s, k): (s, k) for s, keys in SCHEMA.items() for k in keys}
    known["SIDECAR_EXIT_HTTP_URL"] = ("exit", "http.url")
    known["SIDECAR_EXIT_HTTP_METHOD"] = ("exit", "http.method")
    sections = tuple(f"SIDECAR_{s.upper()}_" for s in SCHEMA if s)
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
            origins[_dotted(section, key.split(".")[0])] = name
        elif name.startswith(sections):
            # Only names inside a known section are typos; others, such as the
            # SIDECAR_SERVICE_HOST that Kubernetes service links inject, are not ours.
            problems.append(f"{name}: unknown setting{_suggest(name, list(known))}")


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
        _merge_file(raw, data, f"config file {path}", problems)
    _merge_env(raw, origins, env or {}, problems)
    flag_keys = {"listen": ("", "listen"), "admin": ("", "admin"), "upstream": ("upstream", "url")}
    for flag, value in (flags or {}).items():
        if value is not None:
            section, key = flag_keys[flag]
            raw[section][key] = value
            origins[_dotted(section, key)] = f"--{flag}"

    values: dict[str, dict[str, Any]] = {s: {} for s in SCHEMA}
    for section, keys in SCHEMA.items():
        for key, (parse, _) in keys.items():
            dotted = _dotted(section, key)
            label = f"{dotted} (from {origins[dotted]})" if dotted in origins else dotted
            if dotted == "exit.http":
                values[section][key] = _exit_http(raw[section][key], label, problems)
                continue
            try:
                values[section][key] = parse(raw[section][key])
            except ValueError as exc:
                problems.append(f"{label}: {exc}")
    if problems:
        raise ConfigError(problems)

    config = Config(
        listen=values[""]["listen"],
        admin=values[""]["admin"],
        admin_token=values[""]["admin_token"],
        upstream=UpstreamConfig(**values["upstream"]),
        drain=DrainConfig(**values["drain"]),
        exit=ExitConfig(**values["exit"]),
        logging=LoggingConfig(**values["logging"]),
    )
    _check_together(config, problems)
    if problems:
        raise ConfigError(problems)
    return config


def _check_together(config: Config, problems: list[str]) -> None:
    d, e = config.drain, config.exit
    budget = d.delay + d.timeout + e.wait
    if budget > d.grace_period:
        problems.append(
            f"drain.grace_period: drain.delay + drain.timeout + exit.wait = {format_duration(budget)} "
            f"exceeds drain.grace_period {format_duration(d.grace_period)}; the kubelet would "
            f"SIGKILL the pod mid-drain: shorten those or raise the grace period "
            f"(and terminationGracePeriodSeconds with it)"
        )
    if config.listen.port != 0 and config.listen == config.admin:
        problems.append(f"admin: {config.admin} is the same address as listen")


def to_yaml(config: Config) -> str:
    """The effective config as YAML that is itself a valid config file (token redacted)."""
    u, d, e, lg = config.upstream, config.drain, config.exit, config.logging
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
        },
        "drain": {
            "delay": format_duration(d.delay),
            "timeout": format_duration(d.timeout),
            "retry_after": d.retry_after,
            "websockets": d.websockets,
            "linger": format_duration(d.linger),
            "grace_period": format_duration(d.grace_period),
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
