"""Log lines: JSON (one object per line, for log pipelines) or text (for people).

Fields come from `extra=`; callers pass names, fingerprints and reasons only. Request
bodies, patches and key bytes are never handed to a logger (docs/contract.md, "Trust").
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def describe_exception(exc: BaseException | None) -> str:
    """The exception's type, and an HTTP status if it has one; never its message or
    traceback. Messages quote their input: aiohttp's parser errors carry the raw bytes
    of a malformed request (a key Secret review, key included), a JSON decoder quotes
    the body. Errors keymount means to show are passed as fields, not as exc_info."""
    if exc is None:
        return "unknown error"
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    return type(exc).__name__ + (f" (HTTP {status})" if isinstance(status, int) else "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            line["error"] = describe_exception(record.exc_info[1])
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extra(record).items())
        text = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            fields += f" error={describe_exception(record.exc_info[1])}"
        return f"{text} {fields}".rstrip()


def configure_logging(*, fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per request beside our decision line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
