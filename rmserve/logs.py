"""Log formats: readable text, or one JSON object per line for log pipelines.

Access records (logger ``rmserve.access``, one per HTTP request, written by the request middleware)
carry ``request_id``, ``method``, ``path``, ``status``, ``model`` and ``duration_ms`` in
``record.access``; the JSON format puts them at the top level of the line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Literal

LogFormat = Literal["text", "json"]
ACCESS_LOGGER = "rmserve.access"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...access fields}``, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "access", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class TextFormatter(logging.Formatter):
    """``time level logger: message``; access records as ``METHOD path status ms id=... model=...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if access:
            record.msg = (
                f"{access['method']} {access['path']} {access['status']} {access['duration_ms']:.1f}ms "
                f"id={access['request_id']}" + (f" model={access['model']}" if access.get("model") else "")
            )
            record.args = ()
        return super().format(record)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send every log record to stderr in ``log_format`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
