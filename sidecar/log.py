"""Logging set-up: one line per event, JSON (for machines) or text (for people).

Structured fields travel in ``extra={"fields": {...}}`` so both formats carry them.
``auto`` picks text when stderr is a terminal and JSON otherwise, as kubectl-era
tools do: a person running ``sidecar run`` reads lines, a log pipeline parses them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ("access_logger", "log_access", "logger", "resolve_format", "setup")

logger = logging.getLogger("sidecar")
access_logger = logging.getLogger("sidecar.access")


def log_access(method: str, path: str, status: int, seconds: float, client: str | None) -> None:
    """One access-log line per answered request (``logging.access_log``)."""
    access_logger.info("%s %s %d", method, path, status, extra={"fields": {
        "method": method, "path": path, "status": status,
        "duration_ms": round(seconds * 1000, 3), "client": client}})


def _rfc3339(created: float, digits: int) -> str:
    """``2026-11-28T03:57:54.852133Z``: UTC, so lines from several pods sort together."""
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="microseconds")
    return stamp[: len("YYYY-MM-DDTHH:MM:SS.") + digits] + "Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _rfc3339(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL message key=value ...``: a field already said by the message is left
    out (but an access line keeps all its columns, for grep), nested values are flattened
    to ``outer.inner=value``, and only values with spaces or quotes are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        said = set() if record.name == access_logger.name else {str(a) for a in _args(record)}
        pairs = _flatten(getattr(record, "fields", {}))
        tail = "".join(f" {k}={_quote(v)}" for k, v in pairs if v not in said)
        level = record.levelname.lower()
        line = f"{_rfc3339(record.created, 3)} {level:<7} {record.getMessage()}{tail}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _args(record: logging.LogRecord) -> tuple[Any, ...]:
    args = record.args
    if isinstance(args, tuple):
        return args
    return () if args is None else (args,)


def _flatten(fields: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, dict):
            pairs.extend(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            pairs.append((name, " ".join(str(v) for v in value)))
        else:
            pairs.append((name, str(value)))
    return pairs


def _quote(text: str) -> str:
    if text and not any(c in text for c in ' "=\\\t\n'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """``auto`` becomes ``text`` on a terminal and ``json`` otherwise."""
    if fmt != "auto":
        return fmt
    stream = stream if stream is not None else sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def setup(*, level: str = "info", fmt: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    json_lines = resolve_format(fmt, sys.stderr) == "json"
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logger.setLevel(level.upper())
    # aiohttp logs a traceback for every client that disconnects mid-response; keep errors only.
    logging.getLogger("aiohttp").setLevel(logging.ERROR)
