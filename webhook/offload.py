"""Large reviews, decoded and judged in a second process, so that no body stalls the
event loop.

The event loop serves every admission in turn: while it decodes one review, every
other request waits. A review of a few KiB takes well under a millisecond; a body of
7 MiB (a Pod with ~95,000 environment variables, which anyone who can reach the port
may send) takes about 50 ms to decode, and neither msgspec nor orjson lets go of the
GIL or decodes in pieces, so a thread would not help. So a body over `INLINE_BODY`
goes to one worker process instead (docs/architecture.md, "Large reviews"):

1. the server reads the body as it arrives, then, holding the worker's lock, copies
   it into a shared-memory buffer a slice at a time (no single large copy on the
   loop; a client that sends its body slowly holds only its own request);
2. the worker decodes it (`admission.parse_review`, the same function as inline),
   keeps the request, and returns its `Head`: what the server's own steps read (uid,
   kind, namespace, user; the object's name, uid and controlling owner), a few hundred
   bytes however large the body;
3. the server takes each edge step as for any review (the key cache, a live read, a
   KeyPolicy's reads, a generated key) and asks the worker for the verdict on each
   `View` it builds: the worker runs the same routed handler on the whole request.

So the decision is the one the inline path makes, on the same input, by construction;
only what crosses the pipe is small. One review at a time (the buffer and the worker's
request are single): the server holds `lock` from the copy to the last verdict.
If the worker dies (a decode that exhausts its memory), that review is answered
`allowed: false` and the next one starts a new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, TypeVar

import msgspec

from .admission import (
    AdmissionRequest,
    MalformedReview,
    Verdict,
    Webhook,
    errored,
    parse_review,
)
from .decisions import View, needs_policy_view, route
from .parentdeath import end_with_parent

# Bodies up to this size are decoded and judged on the event loop. Measured
# (tests/test_offload.py holds the bound): the costliest shape per byte, a Pod of
# hundreds of one-mount containers, takes about 0.4 ms at 16 KiB, decoding, deciding
# and encoding the answer; the benchmark's review of a three-container Pod is 7.8 KB.
INLINE_BODY = 16 * 1024

# Strings of the head are what the server logs and puts in Events; no Kubernetes name,
# uid or namespace comes near this (names are at most 253 characters).
HEAD_STRING = 4096

# The most a verdict from the worker may carry (messages, patch, warnings): a Pod with
# hundreds of containers has a patch of tens of KiB.
ANSWER_LIMIT = 256 * 1024

# The most the loop copies into the buffer before it lets other requests run.
COPY_SLICE = 256 * 1024

# Large bodies read ahead of the worker, in all (by Content-Length): what the server
# holds for reviews that wait their turn. Well under the connection guard's
# --max-buffered-mib (64 MiB), beside every other connection's buffers, so that
# reviews waiting for the worker never make the guard stop reading the API server's
# connections.
READ_AHEAD = 24 * 1024 * 1024

# A body still arriving after this long may be dropped to make room for another: the
# API server sends a review's body at once (milliseconds, even for the largest Pod
# etcd stores, 1.5 MiB), and only a client that sends slowly takes a second.
SLOW_READER = 1.0

# Scheduling weight 110 against the server's 1024 (Linux CFS, nice 10 against 0).
WORKER_NICENESS = 10

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Head:
    """What the server reads of a request judged in the worker: the request with its
    object and oldObject cut to the metadata logs and Events use."""

    request: AdmissionRequest
    policy_view: bool  # decisions.needs_policy_view of the whole request


def head_of(request: AdmissionRequest) -> Head:
    """`request` as the server's own steps see it (server.log_decision, events.event_for,
    server.decide): the fields of the request itself but the user's groups and, of
    each object, its name, generateName, uid and first controlling owner reference.
    An object keeps its truthiness (an empty object stays empty), which those steps
    test."""
    # The user's groups matter to the key guard alone, which runs in the worker.
    return Head(msgspec.structs.replace(request, object=_cut(request.object),
                                    old_object=_cut(request.old_object), groups=()),
                needs_policy_view(request))


def _cut(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if obj is None:
        return None
    if not obj:
        return {}
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return {"metadata": None}
    kept: dict[str, Any] = {k: meta[k] for k in ("name", "generateName", "uid") if k in meta}
    owner = next((r for r in meta.get("ownerReferences") or []
                  if isinstance(r, Mapping) and r.get("controller")), None)
    if owner is not None:
        kept["ownerReferences"] = [{k: owner.get(k) for k in
                                    ("apiVersion", "kind", "name", "uid", "controller")}]
    return {"metadata": kept}


def check_head(head: Head) -> str:
    """Why the head is too large to hand to the server's logs and Events, or ""."""
    request = head.request
    strings: list[tuple[str, Any]] = [
        ("uid", request.uid), ("namespace", request.namespace), ("name", request.name),
        ("kind", request.kind), ("kind group", request.group),
        ("userInfo.username", request.username)]
    for field, obj in (("object", request.object), ("oldObject", request.old_object)):
        meta = (obj or {}).get("metadata") or {}
        strings += [(f"{field}.metadata.{k}", v) for k, v in meta.items()
                    if k != "ownerReferences"]
        for owner in meta.get("ownerReferences") or ():
            strings += [(f"{field}.metadata.ownerReferences[].{k}", v)
                        for k, v in owner.items()]
    for field, value in strings:
        if len(str(value)) > HEAD_STRING:
            return f"request {field} is over {HEAD_STRING} characters; not a Kubernetes object"
    return ""


# --- the worker process ----------------------------------------------------------------

_buffer: SharedMemory | None = None
_request: tuple[Webhook, AdmissionRequest] | None = None


def _start_worker(name: str, server: int) -> None:
    global _buffer
    # Ended by the kernel if the server is killed outright (parentdeath); SIGTERM's
    # default action suffices: the worker holds nothing to save.
    end_with_parent(server)
    # Ctrl-C reaches the whole process group: the server decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # When both want the CPU (one core, or a container's CPU limit, which both share),
    # the server's event loop goes first: a stream of large reviews slows large reviews.
    os.nice(WORKER_NICENESS)
    # Attaching registers the segment with the parent's resource tracker once more; it
    # keeps names in a set, and the server unlinks it (Python 3.11 has no track=False).
    _buffer = SharedMemory(name=name)


def _ready() -> bool:
    return True


def _parse(webhook: Webhook, length: int) -> Head | str:
    """Decode the body in the buffer and keep it; its head, or why it is malformed."""
    global _request
    assert _buffer is not None
    _request = None
    buf = _buffer.buf
    assert buf is not None
    body = bytes(buf[:length])  # copied first: the buffer is the server's again
    try:
        request = parse_review(body)
    except MalformedReview as exc:
        return str(exc)
    head = head_of(request)
    problem = check_head(head)
    if problem:
        return problem
    _request = (webhook, request)
    return head


def _release() -> None:
    global _request
    _request = None  # a decoded 7 MiB review is tens of MiB of objects


def _judge(view: View) -> Verdict:
    """The routed handler's verdict on the kept request, with `view`."""
    assert _request is not None, "no review parsed"
    webhook, request = _request
    return bound_answer(route(webhook, request)(request, view))


def bound_answer(verdict: Verdict) -> Verdict:
    """`verdict`, unless its answer is over ANSWER_LIMIT: a refusal quotes names from
    the request, which a hostile one makes megabytes long, and the server logs and
    encodes the answer on the event loop. Such a verdict becomes a refusal (fail
    closed): no Kubernetes object's answer comes near the limit."""
    response = verdict.response
    size = (len(verdict.message) + len(response.get("patch", "")) + len(verdict.status)
            + sum(len(w) for w in response.get("warnings", ())))
    if size <= ANSWER_LIMIT:
        return verdict
    return Verdict("error", errored(
        f"keymount's answer to this review would be {size} bytes, over its "
        f"{ANSWER_LIMIT}-byte limit: the review names something far longer than "
        f"Kubernetes allows (a container, volume or key Secret name?); fix the object"))


# --- the server's side --------------------------------------------------------------------

class ReadAhead:
    """Room for the bodies of large reviews read before their turn at the worker.

    A review reads its body first and only then waits for the worker, so that a client
    that sends its body slowly holds up no one else. The bodies are bounded in all by
    `budget`; in line for room (first come, first served), the first waiter drops the
    reader that has been reading longest once it has read for `slow` seconds: a slow
    sender yields its room, a fast one (the API server) never waits for it long.
    """

    def __init__(self, budget: int = READ_AHEAD, *, slow: float = SLOW_READER) -> None:
        self.budget, self.slow = budget, slow
        self.used = 0
        self._held: dict[object, int] = {}  # token -> room
        self._readers: dict[object, tuple[float, Callable[[], None]]] = {}  # oldest first
        self._line: list[object] = []
        self._changed = asyncio.Event()

    async def reserve(self, size: int, *, drop: Callable[[], None]) -> object:
        """Wait for room for `size` bytes; then the caller reads, and `drop` may be
        called to end its connection until `done_reading`. The token for both calls and
        for `release`."""
        loop = asyncio.get_running_loop()
        ticket = object()
        self._line.append(ticket)
        try:
            while self._line[0] is not ticket or self.used + size > self.budget:
                timeout = None
                if self._line[0] is ticket and self._readers:
                    token, (since, dropper) = next(iter(self._readers.items()))
                    age = loop.time() - since
                    if age >= self.slow:
                        del self._readers[token]
                        dropper()  # its handler releases its room as it unwinds
                        timeout = self.slow  # and should it not, the next one goes
                    else:
                        timeout = self.slow - age
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout)
        finally:
            self._line.remove(ticket)
            self._notify()
        self.used += size
        self._held[ticket] = size
        self._readers[ticket] = (loop.time(), drop)
        return ticket

    def done_reading(self, token: object) -> None:
        self._readers.pop(token, None)

    def release(self, token: object) -> None:
        """Give the room back (once; a second call does nothing)."""
        self._readers.pop(token, None)
        if token in self._held:
            self.used -= self._held.pop(token)
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class WorkerFailed(RuntimeError):
    """The worker process died or could not be started: the review is refused."""


class Offload:
    """The worker process and its buffer, for one server process."""

    def __init__(self, *, max_body: int, on_restart: Callable[[], None] | None = None,
                 read_ahead: ReadAhead | None = None) -> None:
        self.max_body = max_body
        self.lock = asyncio.Lock()
        self.read_ahead = read_ahead or ReadAhead()
        if self.read_ahead.budget < max_body:
            raise ValueError("the read-ahead budget must hold the largest body")
        # Made at start (or at the first large review), so a server that never starts
        # leaves no segment for the resource tracker to find at exit.
        self._buffer: SharedMemory | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._on_restart = on_restart
        # The loop's CPU time spent on other requests while this review waited for the
        # worker, since the last write: not this review's work (server.answer_offloaded).
        self.waited_cpu = 0.0

    @property
    def buffer(self) -> memoryview:
        buf = self._segment().buf
        assert buf is not None, "closed"
        return buf

    def _segment(self) -> SharedMemory:
        if self._buffer is None:
            self._buffer = SharedMemory(create=True, size=self.max_body)
        return self._buffer

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the server has threads (the log sink, the Kubernetes
            # client), and a forked child inherits their locks in whatever state.
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(self._segment().name, os.getpid()))
        return self._pool

    async def start(self) -> None:
        """Start the worker now rather than at the first large review (spawning a
        Python takes a few hundred milliseconds)."""
        await self._call(_ready)

    async def write(self, chunks: list[bytes]) -> int:
        """Copy a body's chunks into the buffer (hold `lock`): its length. The copying
        yields to the loop every COPY_SLICE bytes: 7 MiB at once would take it about a
        millisecond, ten on the segment's first use (its pages are mapped as touched)."""
        self.waited_cpu = 0.0
        buffer = self.buffer
        size = since = 0
        for chunk in chunks:
            end = size + len(chunk)
            buffer[size:end] = chunk
            size, since = end, since + len(chunk)
            if since >= COPY_SLICE:
                since = 0
                await asyncio.sleep(0)
        return size

    async def parse(self, webhook: Webhook, length: int) -> Head | str:
        """Decode the body `write` put in the buffer (hold `lock`)."""
        return await self._call(_parse, webhook, length)

    async def judge(self, view: View) -> Verdict:
        return await self._call(_judge, view)

    def release(self) -> None:
        """Let the worker free the review it keeps. Not waited for: the next review's
        parse is queued behind it, and the buffer is not touched."""
        with contextlib.suppress(RuntimeError):  # broken: the review is gone with it
            self._executor().submit(_release)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        waiting = time.thread_time()
        try:
            future = asyncio.wrap_future(self._executor().submit(fn, *args))
        except RuntimeError as exc:  # BrokenProcessPool, or shut down
            self._restart()
            raise WorkerFailed(f"keymount's review worker is not running ({exc})") from None
        try:
            # Shielded: cancelled, the caller still waits for the worker to finish with
            # the buffer before its lock lets the next review write there.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await future
            raise
        except BrokenExecutor:
            self._restart()
            raise WorkerFailed("keymount's review worker died on this review") from None
        finally:
            self.waited_cpu += time.thread_time() - waiting

    def _restart(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            if self._on_restart is not None:
                self._on_restart()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        segment, self._buffer = self._buffer, None
        if segment is not None:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
            segment.close()
