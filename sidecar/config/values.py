"""Leaf values of the configuration.

Each ``parse_*`` takes a YAML value or an environment string and returns the typed
value, or raises ValueError with a message that says what is expected.
"""

from __future__ import annotations

import math
import re
import signal
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = (
    "Address",
    "format_duration",
    "format_size",
    "parse_address",
    "parse_boolean",
    "parse_choice",
    "parse_duration",
    "parse_http_url",
    "parse_integer",
    "parse_method",
    "parse_optional",
    "parse_path",
    "parse_positive_duration",
    "parse_regex",
    "parse_seconds",
    "parse_secret",
    "parse_signal",
    "parse_size",
    "parse_text",
    "parse_upstream_url",
)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is not None:
        if not math.isfinite(seconds):  # .inf, .nan, or more digits than a float holds
            raise ValueError(f"must be a finite duration, got {value!r}")
        return seconds
    if isinstance(value, str) and _DURATION.match(value.strip().removeprefix("-")):
        raise ValueError(f"must not be negative, got {value!r}")
    raise ValueError(f"expected a duration like 250ms, 5s, 2m or a number of seconds, got {value!r}")


def parse_positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than zero, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest text that parses back: ``250ms``, ``5s``, ``1000000s`` (never ``1e+06s``)."""
    if seconds == 0:
        return "0s"
    value, unit = (seconds * 1000, "ms") if seconds < 1 else (seconds, "s")
    shown = round(value, 3) or value  # a tiny non-zero value must not print as 0
    text = format(Decimal(repr(shown)), "f")
    return (text.rstrip("0").rstrip(".") if "." in text else text) + unit


def parse_address(value: Any) -> Address:
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


def parse_integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")  # noqa: TRY004
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB)?\s*$")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 * 1024, None: 1}


def parse_size(low: int, high: int) -> Callable[[Any], int]:
    """A size in bytes: a whole number, or with a unit (``64KiB``, ``1MiB``, ``512B``)."""
    def parse(value: Any) -> int:
        size: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str) and (m := _SIZE.match(value)):
            size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
        if size is None:
            raise ValueError(f"expected a size like 64KiB, 1MiB or a number of bytes, got {value!r}")
        if not low <= size <= high:
            raise ValueError(f"must be between {format_size(low)} and {format_size(high)}, "
                             f"got {format_size(size)}")
        return size

    return parse


def format_size(size: int) -> str:
    """The shortest exact spelling: ``65536`` -> ``64KiB``."""
    for unit in ("MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def parse_seconds(value: Any) -> int:
    """Whole seconds, from a number or a duration (``5s``; ``1500ms`` rounds up to 2)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    return math.ceil(parse_duration(value))


def parse_boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")

    return parse


def parse_optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(value: Any) -> Any:
        if value is None or value == "" or value == "null":
            return None
        return parse(value)

    return wrapped


def parse_text(value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected a string, got {value!r}")


def parse_secret(value: Any) -> str:
    """Like parse_text, but a rejected value is never echoed: it may be a secret."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected a string, got a {type(value).__name__} (value not shown)")


def parse_path(value: Any) -> str:
    text = parse_text(value)
    if not text.startswith("/"):
        raise ValueError(f"expected a path starting with /, got {text!r}")
    return text


_GRPC_SERVICE = re.compile(r"[A-Za-z0-9_.\-/]{0,200}")


def parse_grpc_service(value: Any) -> str | None:
    """A gRPC health service name; ``""`` names the whole server, so only null is "unset"."""
    if value is None or value == "null":
        return None
    text = parse_text(value)
    if not _GRPC_SERVICE.fullmatch(text):
        raise ValueError(
            f'expected a gRPC service name such as "shop.CartService", or "" for the whole '
            f"server, got {text[:60]!r}")
    return text


def parse_http_url(value: Any) -> str:
    text = parse_text(value)
    parts = urllib.parse.urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"the port in {text!r} is not a number from 0 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http://HOST:PORT, got {text!r}")
    return text


def parse_upstream_url(value: Any) -> str:
    text = parse_text(value)
    if text.startswith("unix:"):
        if not text[len("unix:"):].startswith("/"):
            raise ValueError(f"expected unix:/absolute/path.sock, got {text!r}")
        return text
    parse_http_url(text)
    parts = urllib.parse.urlsplit(text)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must be http://HOST:PORT or unix:/path.sock without a path, got {text!r}")
    return text.rstrip("/")


def parse_regex(value: Any) -> str:
    text = parse_text(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None
    except (RecursionError, OverflowError, MemoryError):
        raise ValueError("is a regular expression too large or nested too deeply") from None
    return text


def parse_signal(value: Any) -> signal.Signals:
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


def parse_method(value: Any) -> str:
    text = parse_text(value).upper()
    if not re.fullmatch(r"[A-Z]+", text):
        raise ValueError(f"expected an HTTP method such as POST, got {value!r}")
    return text
