"""Limits on the HTTPS connections, for clients that may be hostile.

Anything that can reach the webhook port may be hostile (docs/contract.md, "HTTP").
aiohttp has no deadline for reading a request's headers or body, so a client that
sends one byte every few seconds keeps a connection, and its buffers, forever. Each
connection's protocol is wrapped here:

- **request deadline**: from the first byte of a request until keymount starts writing
  its answer, at most `request_timeout` seconds (checked by one sweep of all
  connections every quarter of it, at most every second: a timer per request would
  cost every admission); then the connection is dropped. The API server gives a
  webhook at most 30 s (`timeoutSeconds`), so nothing legitimate is lost.
- **connection cap**: at `max_connections` open connections, a new one takes the slot
  of the connection whose request has been under way the longest (a slow client), or
  else of one that never got an answer, or else of the longest idle one (a keep-alive
  connection reconnects at no cost); a review being decided (its body all in, however
  long keymount takes, within the deadline) or under way a moment on a working
  connection goes last. So file descriptors and buffers stay bounded and slow clients
  cannot lock the API server out. A write that is no answer (an interim `100
  Continue`) does not end a request's deadline, and a pipelined request's runs from
  the answer before it.
- **buffered bytes**: request bytes received but not yet answered, over all
  connections, are capped; a connection that would go over stops being read (TCP
  backpressure) until answers free room, so concurrent 7 MiB bodies cannot add up.

The TLS handshake itself is bounded by the server's `ssl_handshake_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("keymount.server")


# A request still under way after this long is a slow client's: the API server sends a
# review at once, and keymount answers within milliseconds (a live read, a second).
SLOW_REQUEST = 1.0


@dataclass
class ConnectionLimits:
    request_timeout: float = 10.0
    max_connections: int = 256
    max_buffered: int = 64 * 1024 * 1024
    handshake_timeout: float = 10.0


@dataclass
class ConnectionGuard:
    """Shared state of every guarded connection of one listening socket."""

    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    on_event: Callable[[str], None] = lambda what: None  # metric hook: evicted/expired
    active: int = 0
    buffered: int = 0
    paused: deque[GuardedProtocol] = field(default_factory=deque)
    open: dict[GuardedProtocol, None] = field(default_factory=dict)  # insertion-ordered
    closing: bool = False  # drained: a connection that completes its handshake now is closed

    def make_room(self) -> None:
        """Close the connection that holds a slot with the least reason to: the one
        whose request has been under way the longest, past SLOW_REQUEST; else the
        oldest that never got an answer (idle first); else the oldest idle one. A
        request under way a moment on a connection that keeps getting answers (the API
        server's keep-alive connections, a review being decided) goes last."""
        # A request under way for under SLOW_REQUEST may be one keymount is deciding
        # (its body in, waiting for a live read or the worker): on a working connection
        # it goes last, after every connection that never sent a byte or sits idle.
        now = time.monotonic()

        def rank(p: GuardedProtocol) -> tuple[int, float]:
            started = p.request_started
            if p.deciding:
                # Its request is all in (request_received): keymount's own work, a live
                # read perhaps, for as long as the request deadline allows; not a slow
                # client's. Dropping it would refuse the API server's review.
                return 6, started or 0.0
            if started is not None and now - started >= SLOW_REQUEST:
                return 0, started
            return (2 if p.answered_any else 1) * 2 + (started is not None), started or 0.0

        victim = min(self.open, key=rank, default=None)  # ties: the oldest connection
        if victim is not None:
            self.on_event("evicted")
            victim.drop()

    # Accepted, TLS handshake still under way (connection_made comes after it).
    handshaking: weakref.WeakSet[GuardedProtocol] = field(default_factory=weakref.WeakSet)

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def build() -> asyncio.Protocol:
            protocol = GuardedProtocol(factory(), self)
            self.handshaking.add(protocol)
            return protocol
        return build

    async def sweep(self) -> None:
        """Drop every connection whose request has outlived the deadline; runs for as
        long as the listener does."""
        timeout = self.limits.request_timeout
        period = min(1.0, timeout / 4)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - timeout
            for protocol in [p for p in self.open
                             if p.request_started is not None and p.request_started <= cutoff]:
                protocol.expire()

    async def drain(self, *, timeout: float, fresh_timeout: float,
                    then: Callable[[], None]) -> None:
        """Once the listener is closed: wait until no connection has a request under way
        (arriving, or decided but not yet answered) and, for at most `fresh_timeout`,
        until none accepted a moment ago is still to send its request; then call `then`,
        which closes the idle connections, in the same turn of the event loop as the
        last check, so that no request can begin in between. Connections made after
        that are closed at once.

        aiohttp's own shutdown closes every connection first: from then on it discards
        whatever a connection receives, so a request whose body was still arriving
        waited for bytes that never came, unanswered until the request deadline, past
        the API server's webhook timeout. A request still under way at `timeout` is
        dropped here instead: closed at once, not left waiting."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            elapsed = loop.time() - started
            if elapsed >= timeout or not self.waiting_for(fresh=elapsed < fresh_timeout):
                break
            await asyncio.sleep(0.02)  # once per shutdown, over <= max_connections
        for protocol in [p for p in self.open if p.request_started is not None]:
            protocol.drop()
        self.closing = True
        then()

    def waiting_for(self, *, fresh: bool) -> bool:
        """A request is under way, or (`fresh`) a connection is accepted that has not
        sent its first request yet: closing it now would reset a request already on
        its way."""
        if any(p.request_started is not None for p in self.open):
            return True
        return fresh and (len(self.handshaking) > 0 or any(
            not p.answered_any and p.request_started is None for p in self.open))

    def release(self, amount: int) -> None:
        self.buffered -= amount
        while self.paused and self.buffered < self.limits.max_buffered:
            self.paused.popleft().resume()


class _Transport:
    """The real transport, with writes reported: the first byte of an answer ends the
    request's deadline. What aiohttp calls on every request is bound once, here: a
    `__getattr__` lookup per call showed up in the profile."""

    def __init__(self, inner: asyncio.Transport, owner: GuardedProtocol) -> None:
        self._inner, self._owner = inner, owner
        self.is_closing = inner.is_closing
        self.resume_reading = inner.resume_reading
        self.pause_reading = inner.pause_reading
        self.get_extra_info = inner.get_extra_info

    def write(self, data: Any) -> None:
        self._owner.answered(data)
        self._inner.write(data)

    def writelines(self, lines: Any) -> None:
        lines = list(lines)
        self._owner.answered(lines[0] if lines else b"")
        self._inner.writelines(lines)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def request_received(transport: Any) -> None:
    """The request on `transport` (a handler's `request.transport`) has arrived whole:
    from now until its answer it is being decided, and at the connection cap it goes
    last (make_room). A transport the guard does not wrap is left as it is."""
    if isinstance(transport, _Transport):
        transport._owner.deciding = True


class GuardedProtocol(asyncio.Protocol):
    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self.inner, self.guard = inner, guard
        self.transport: asyncio.Transport | None = None
        self.counted = False
        self.pending = 0  # bytes of the current request not yet answered
        self.request_started: float | None = None  # time.monotonic() of the current request
        self.answered_any = False
        self.reading = True
        self.deciding = False  # the current request is all in: request_received

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.guard.handshaking.discard(self)
        self.transport = transport
        if self.guard.closing:
            # Its handshake outlasted the drain: nothing would read its request.
            transport.abort()
            return
        if self.guard.active >= self.guard.limits.max_connections:
            self.guard.make_room()
        self.guard.active += 1
        self.guard.open[self] = None
        self.counted = True
        self.inner.connection_made(_Transport(transport, self))

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        if self.request_started is None:
            self.request_started = time.monotonic()
        self.pending += len(data)
        self.guard.buffered += len(data)
        if self.guard.buffered > self.guard.limits.max_buffered and self.reading:
            self.reading = False
            self.guard.paused.append(self)
            assert self.transport is not None
            self.transport.pause_reading()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.counted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._release(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # --- the guard ------------------------------------------------------------------

    def answered(self, data: Any = b"") -> None:
        if data[:10] == b"HTTP/1.1 1":  # bytes, bytearray or memoryview alike
            # An interim response ("100 Continue"), not the answer: the body is still
            # to come, within the same deadline.
            return
        self.answered_any = True
        if self.request_started is not None or self.pending:
            # _end_request, inlined: this runs on every answer.
            self.request_started = None
            self.deciding = False
            guard, pending, self.pending = self.guard, self.pending, 0
            guard.buffered -= pending
            if guard.paused:
                guard.release(0)
        if getattr(self.inner, "_messages", None):
            # A pipelined request has arrived behind the one answered: its deadline
            # runs from now, or a body that never comes would hold it for ever.
            self.request_started = time.monotonic()

    def resume(self) -> None:
        if not self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    def expire(self) -> None:
        """No answer begun within the deadline: a slow (or stuck) request; drop it."""
        self.guard.on_event("expired")
        log.warning("request not received and answered within the deadline; connection "
                    "closed", extra={"seconds": self.guard.limits.request_timeout})
        self.drop()

    def drop(self) -> None:
        self._release(None)  # free the slot now, not when the transport reports it
        if self.transport is not None:
            self.transport.abort()

    def _release(self, exc: Exception | None) -> None:
        """Give the slot and the buffered bytes back, once, and tell aiohttp."""
        if not self.counted:
            return
        self.counted = False
        self.guard.active -= 1
        self.guard.open.pop(self, None)
        self._end_request()
        if self in self.guard.paused:
            self.guard.paused.remove(self)
        self.inner.connection_lost(exc)

    def _end_request(self) -> None:
        self.request_started = None
        self.deciding = False
        pending, self.pending = self.pending, 0
        self.guard.release(pending)
