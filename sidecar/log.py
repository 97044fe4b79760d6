"""Logging set-up: one line per event, JSON or ``key=value`` text.

Structured fields travel in ``extra={"fields": {...}}`` so both formats carry them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ("access_logger", "logger", "setup")

logger = logging.getLogger("sidecar")
access_logger = logging.getLogger("sidecar.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", {})
        tail = "".join(f" {k}={_text(v)}" for k, v in fields.items())
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():7} {record.getMessage()}{tail}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


def setup(*, level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logger.setLevel(level.upper())
    # aiohttp logs a traceback for every client that disconnects mid-response; keep errors only.
    logging.getLogger("aiohttp").setLevel(logging.ERROR)
