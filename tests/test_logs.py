"""Log lines: the sink that keeps stderr off the event loop, and decision lines that
skip the logging machinery but read exactly like every other line."""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import select
import time
from collections import deque
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.cli import build_parser, log_chunk
from webhook.logs import (
    SHARED_CHUNK,
    SOLE_WRITER_CHUNK,
    DecisionLog,
    JsonFormatter,
    LineSink,
    TextFormatter,
    _timestamp,
    configure_logging,
    json_line,
    whole_lines,
)

from polling import poll


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_lines_arrive_in_order_and_close_writes_what_is_queued(pipe):
    read_end, write_end = pipe
    sink = LineSink(write_end, interval=60.0)  # only close() can wake it in time
    for i in range(1000):
        sink.write(f"line {i}\n".encode())
    sink.close()
    assert read_available(read_end).decode().splitlines() == [f"line {i}" for i in range(1000)]


def test_lines_are_written_within_the_interval_without_close(pipe):
    read_end, write_end = pipe
    sink = LineSink(write_end, interval=0.02)
    sink.write(b"first\n")
    received = bytearray()
    poll(lambda: received.extend(read_available(read_end)) or received == b"first\n",
         timeout=5, what="the line written by the sink's thread")
    sink.close()


@given(lengths=st.lists(st.integers(min_value=0, max_value=300), max_size=60),
       limit=st.integers(min_value=1, max_value=1000))
def test_chunks_hold_whole_lines_in_order_and_stay_within_the_limit(lengths, limit):
    lines = [str(i).encode() + b"x" * n + b"\n" for i, n in enumerate(lengths)]
    queue = deque(lines)
    chunks = list(whole_lines(queue, limit=limit))
    assert not queue  # everything queued is taken
    assert b"".join(chunks) == b"".join(lines)
    for chunk in chunks:
        assert chunk.endswith(b"\n")  # no line torn across two writes
        assert len(chunk) <= limit or chunk.count(b"\n") == 1  # over only if one line
    # As few writes as the limit allows: no two neighbours would fit in one.
    for first, second in itertools.pairwise(chunks):
        assert len(first) + len(second.split(b"\n", 1)[0]) + 1 > limit


@pytest.mark.parametrize(("argv", "chunk"), [
    (["serve"], SOLE_WRITER_CHUNK),
    (["serve", "--workers", "2"], SHARED_CHUNK),
    (["serve", "--workers", "1", "--worker-supervisor", "4242"], SHARED_CHUNK),
], ids=["alone", "supervisor", "worker"])
def test_only_a_sole_writer_of_stderr_writes_more_than_a_pipe_buffer_at_once(argv, chunk):
    assert SHARED_CHUNK == select.PIPE_BUF < SOLE_WRITER_CHUNK
    assert log_chunk(build_parser().parse_args(argv)) == chunk


def test_a_blocked_stderr_never_blocks_the_writer_and_drops_are_counted(pipe):
    read_end, write_end = pipe
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # nobody reads: it fills at once
    drops = []
    sink = LineSink(write_end, interval=0.01, capacity=100, on_drop=lambda: drops.append(1))
    started = time.monotonic()
    for _ in range(5000):
        sink.write(b"x" * 200 + b"\n")
    assert time.monotonic() - started < 1.0  # returned at once, whatever stderr did
    assert sink.dropped == len(drops) > 0
    # Once read, the queued lines flow again and close() finishes.
    got = bytearray()
    poll(lambda: got.extend(read_available(read_end)) or (sink.close(0.01) or
                                                          not sink._thread.is_alive()),
         timeout=10, what="the writer thread to drain and stop")
    got.extend(read_available(read_end))
    lines = bytes(got).splitlines()
    assert set(lines) == {b"x" * 200}
    assert len(lines) + sink.dropped == 5000  # every line written or counted as dropped


def test_decision_lines_read_exactly_like_logging_lines(pipe):
    read_end, write_end = pipe
    sink = LineSink(write_end)
    fields = {"webhook": "mutate", "uid": "u-1", "namespace": "shop", "result": "injected",
              "files": [{"file": "encryption-key-1", "secret": "k", "fingerprint": "ab"}]}
    created = time.time()
    DecisionLog(sink, fmt="json").write(logging.INFO, fields, created=created)
    record = logging.makeLogRecord({"name": "keymount.admission", "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": "admission decision",
                                    "created": created, **fields})
    sink.close()
    line = read_available(read_end).decode()
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == json.loads(JsonFormatter().format(record))


class Lines:
    """Stands in for a LineSink: keeps what is written."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        self.lines.append(line)


DECISION_FIELDS = {"webhook": "mutate", "uid": "u-1", "result": "injected",
                   "duration_ms": 0.25, "dry_run": True}


@pytest.mark.parametrize(("level", "fields"), [
    (logging.INFO, DECISION_FIELDS),
    (logging.DEBUG, DECISION_FIELDS),
    (logging.INFO, {}),
    (logging.INFO, {"msg": "a field named as the head's own", "uid": "u-2"}),
], ids=["info", "debug", "no-fields", "a-head-name"])
def test_decision_lines_are_the_bytes_json_line_writes_whatever_the_time(level, fields):
    # DecisionLog keeps each millisecond's head encoded: a line must not carry a
    # stale time or level, or differ in a byte from the one json_line makes.
    sink = Lines()
    decisions = DecisionLog(sink, fmt="json", level=logging.DEBUG)  # type: ignore[arg-type]
    times = [1764394512.2501, 1764394512.2509, 1764394512.251, 1764394512.999,
             1764394513.0, 1764394512.2501, 1764394513.2501]
    # the same ms, the next ms, the next second, back, and the same ms a second later
    writes = [(created, level) for created in times] + [
        (1764394513.0, level), (1764394513.0, logging.WARNING)]  # another level, same ms
    for created, each in writes:
        decisions.write(each, fields, created=created)
    assert sink.lines == [
        json_line(created=created, level=logging.getLevelName(each).lower(),
                  logger="keymount.admission", msg="admission decision", fields=fields)
        for created, each in writes]


def test_text_decision_lines_match_the_text_formatter(pipe):
    read_end, write_end = pipe
    sink = LineSink(write_end)
    fields = {"webhook": "validate", "uid": "u-2", "result": "denied", "reason": "no key"}
    DecisionLog(sink, fmt="text").write(logging.INFO, fields, created=time.time())
    record = logging.makeLogRecord({"name": "keymount.admission", "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": "admission decision",
                                    **fields})
    sink.close()
    assert read_available(read_end).decode() == TextFormatter().format(record) + "\n"


@pytest.mark.parametrize(("level", "debug_enabled"), [("info", False), ("debug", True)],
                         ids=["info-hides-debug", "debug-shows-debug"])
def test_the_decision_log_honours_the_log_level(level, debug_enabled):
    decisions = DecisionLog(LineSink(os.open(os.devnull, os.O_WRONLY)), level=level)
    assert decisions.enabled(logging.INFO)
    assert decisions.enabled(logging.DEBUG) is debug_enabled
    decisions.sink.close()


def test_logging_records_go_through_the_same_sink(pipe):
    read_end, write_end = pipe
    sink = LineSink(write_end)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(fmt="json", level="info", sink=sink)
        logging.getLogger("keymount.server").info("serving", extra={"port": 8443})
        DecisionLog(sink).write(logging.INFO, {"uid": "u-3"}, created=time.time())
        sink.close()
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    lines = [json.loads(line) for line in read_available(read_end).splitlines()]
    assert [(line["logger"], line["msg"]) for line in lines] == [
        ("keymount.server", "serving"), ("keymount.admission", "admission decision")]


@pytest.mark.parametrize("created", [0.0, 1764394512.25, 1764394512.999, 1764394513.5,
                                     1764394512.0], ids=["epoch", "quarter", "last-ms",
                                                         "next-second", "whole"])
def test_timestamps_cached_per_second_match_isoformat(created):
    _timestamp(created - 1.0)  # a different second in the cache first
    assert _timestamp(created) == datetime.fromtimestamp(created, UTC).isoformat(
        timespec="milliseconds")


def test_sinks_of_several_processes_sharing_a_pipe_never_tear_a_line(pipe):
    # serve --workers: every worker writes to the same stderr pipe.
    import threading
    read_end, write_end = pipe
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)
    reader = threading.Thread(target=drain)
    reader.start()
    sinks = [LineSink(os.dup(write_end), interval=0.001, batch=10_000) for _ in range(3)]
    os.close(write_end)
    writers = [threading.Thread(target=lambda n=n, sink=sink: [
        sink.write(json.dumps({"sink": n, "i": i, "pad": "x" * 300}).encode() + b"\n")
        for i in range(3000)]) for n, sink in enumerate(sinks)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    for sink in sinks:
        sink.close()
        os.close(sink.fd)
    reader.join(10)
    lines = [json.loads(line) for line in received.decode().splitlines()]
    assert len(lines) == 9000
    for n in range(3):
        assert [line["i"] for line in lines if line["sink"] == n] == list(range(3000))
