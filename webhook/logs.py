"""Log lines: JSON (one object per line, for log pipelines) or text (for people).

Fields come from `extra=`; callers pass names, fingerprints and reasons only. Request
bodies, patches and key bytes are never handed to a logger (SPEC §6).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            # The type and message only: a traceback's locals are not printed, but its
            # source lines and values could carry request data.
            exc = record.exc_info[1]
            line["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extra(record).items())
        text = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            exc = record.exc_info[1]
            fields += f" error={type(exc).__name__}: {exc}"
        return f"{text} {fields}".rstrip()


def configure_logging(*, fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per request beside our decision line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
