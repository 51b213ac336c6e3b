"""Log lines: JSON (one object per line, for log pipelines) or text (for people).

Fields come from `extra=`; callers pass names, fingerprints and reasons only. Request
bodies, patches and key bytes are never handed to a logger (docs/contract.md, "Trust").

`keymount serve` writes every line through one `LineSink`: the event loop only
queues a finished line, and a thread writes the queue to stderr in batches, so a
slow log reader (a full pipe to the container runtime) never stalls admissions
(docs/operations.md, "Logs"). Decision lines, one per admission, skip the `logging`
machinery altogether (`DecisionLog`): a LogRecord, a caller lookup and a formatter per
request cost more than the decision itself.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
DECISION_LOGGER = "keymount.admission"
DECISION_MESSAGE = "admission decision"
_HEAD_FIELDS = frozenset({"time", "level", "logger", "msg"})  # json_line's own, first


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


_second: tuple[int, str] = (-1, "")  # the last whole second, formatted


def _timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds; the date and time of day are formatted once
    per second, not once per line (one tuple, read once: safe across threads)."""
    global _second
    whole = int(created)
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{int((created - whole) * 1000):03d}+00:00"


def json_line(*, created: float, level: str, logger: str, msg: str,
              fields: dict[str, Any]) -> bytes:
    return orjson.dumps({"time": _timestamp(created), "level": level, "logger": logger,
                         "msg": msg, **fields}, default=str,
                        option=orjson.OPT_APPEND_NEWLINE)


def text_line(*, level: str, logger: str, msg: str, fields: dict[str, Any]) -> bytes:
    text = f"{level:7} {logger}: {msg} " + " ".join(f"{k}={v}" for k, v in fields.items())
    return text.rstrip().encode() + b"\n"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _extra(record)
        if record.exc_info:
            fields["error"] = describe_exception(record.exc_info[1])
        return json_line(created=record.created, level=record.levelname.lower(),
                         logger=record.name, msg=record.getMessage(),
                         fields=fields).decode().rstrip("\n")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _extra(record)
        if record.exc_info:
            fields["error"] = describe_exception(record.exc_info[1])
        return text_line(level=record.levelname.lower(), logger=record.name,
                         msg=record.getMessage(), fields=fields).decode().rstrip("\n")


def whole_lines(lines: deque[bytes], *, limit: int) -> Iterator[bytes]:
    """The queued lines, taken from `lines` in order, joined into chunks of at most
    `limit` bytes (a longer line is a chunk of its own): each chunk is one write."""
    chunk: list[bytes] = []
    size = 0
    while lines:
        line = lines.popleft()
        if chunk and size + len(line) > limit:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


# The largest write of a process that shares stderr with others: a write of at most
# PIPE_BUF bytes reaches a pipe whole (POSIX), so no line is torn apart by another
# process's. One that is stderr's only writer has no such need and writes a default
# Linux pipe's capacity at once (pipe(7)): each write is a system call, and a hand-over
# of the GIL between the writer thread and the event loop.
SHARED_CHUNK = select.PIPE_BUF
SOLE_WRITER_CHUNK = 64 * 1024


class LineSink:
    """Finished log lines, written to a file descriptor by one thread.

    `write` only appends to a queue (safe from any thread); the writer wakes every
    `interval` seconds, or at once when `batch` lines wait, and writes them in chunks
    of whole lines of at most `chunk` bytes (`whole_lines`). A line that would make the
    queue longer than `capacity` is dropped and counted (`on_drop`): memory stays
    bounded if stderr blocks, and the event loop never waits for it. `close` writes
    what is queued and stops the thread.
    """

    def __init__(self, fd: int, *, interval: float = 0.05, batch: int = 512,
                 capacity: int = 100_000, chunk: int = SHARED_CHUNK,
                 on_drop: Callable[[], None] = lambda: None) -> None:
        self.fd, self.interval, self.batch, self.capacity = fd, interval, batch, capacity
        self.chunk = chunk
        self.on_drop = on_drop
        self.dropped = 0
        self._lines: deque[bytes] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="keymount-log-writer",
                                        daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        lines = self._lines
        if len(lines) >= self.capacity:
            self.dropped += 1
            self.on_drop()
            return
        lines.append(line)
        if len(lines) == self.batch:
            self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            closing = self._closing
            self._drain()
            if closing:
                return

    def _drain(self) -> None:
        for chunk in whole_lines(self._lines, limit=self.chunk):
            self._write_all(chunk)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone: nothing left to tell


class SinkHandler(logging.Handler):
    """A logging handler that hands formatted lines to a `LineSink`."""

    def __init__(self, sink: LineSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write(self.format(record).encode() + b"\n")
        except Exception:
            self.handleError(record)


class DecisionLog:
    """One line per admission decision, the audit trail of who was let through with
    which keys. Without a sink (tests, library use) lines go through `logging` under
    the `keymount.admission` logger, exactly as the sink would print them."""

    def __init__(self, sink: LineSink | None = None, *, fmt: str = "json",
                 level: str | int = logging.INFO) -> None:
        self.sink, self.json = sink, fmt == "json"
        self.level = level if isinstance(level, int) else logging.getLevelName(level.upper())
        self._logger = logging.getLogger(DECISION_LOGGER)
        # A JSON line's head (time, level, logger, msg), encoded once per millisecond
        # and level: at thousands of admissions a second most lines share it.
        self._head: tuple[int, int, int, bytes] = (-1, -1, -1, b"")

    @property
    def writes_json(self) -> bool:
        """Lines are JSON written by this log itself: a field may be pre-serialized
        (`orjson.Fragment`)."""
        return self.sink is not None and self.json

    def enabled(self, level: int) -> bool:
        if self.sink is None:
            return self._logger.isEnabledFor(level)
        return level >= self.level

    def write(self, level: int, fields: dict[str, Any], *, created: float) -> None:
        if self.sink is None:
            self._logger.log(level, DECISION_MESSAGE, extra=fields)
            return
        name = "info" if level == logging.INFO else logging.getLevelName(level).lower()
        if self.json:
            if not fields or not _HEAD_FIELDS.isdisjoint(fields):
                line = json_line(created=created, level=name, logger=DECISION_LOGGER,
                                 msg=DECISION_MESSAGE, fields=fields)
            else:  # the same bytes as json_line, without a merged dict per line
                line = self._json_head(created, level, name) + orjson.dumps(
                    fields, default=str, option=orjson.OPT_APPEND_NEWLINE)[1:]
        else:
            line = text_line(level=name, logger=DECISION_LOGGER, msg=DECISION_MESSAGE,
                             fields=fields)
        self.sink.write(line)

    def _json_head(self, created: float, level: int, name: str) -> bytes:
        """`{"time":...,"level":...,"logger":...,"msg":...,` as json_line begins."""
        whole = int(created)
        milli = int((created - whole) * 1000)  # as _timestamp computes it
        head = self._head
        if head[0] != whole or head[1] != milli or head[2] != level:
            encoded = json_line(created=created, level=name, logger=DECISION_LOGGER,
                                msg=DECISION_MESSAGE, fields={})
            head = self._head = (whole, milli, level, encoded[:-2] + b",")
        return head[3]


def configure_logging(*, fmt: str = "json", level: str = "info",
                      sink: LineSink | None = None) -> None:
    handler: logging.Handler = SinkHandler(sink) if sink else logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per request beside our decision line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
