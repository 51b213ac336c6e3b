"""The connection guard's drain at shutdown, on fake transports: which connections it
waits for, and what it closes."""

from __future__ import annotations

import asyncio
from typing import Any

from webhook.connections import ConnectionGuard, ConnectionLimits


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False
        self.written: list[bytes] = []

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class App(asyncio.Protocol):
    """Stands for aiohttp's protocol: answers when told to."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.made = False

    def connection_made(self, transport: Any) -> None:
        self.made, self.transport = True, transport

    def answer(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\n")


def connect(guard: ConnectionGuard) -> tuple[Any, App, FakeTransport]:
    app = App()
    protocol = guard.wrap(lambda: app)()
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, app, transport


async def drain(guard: ConnectionGuard, *, timeout: float = 5.0,
                fresh_timeout: float = 1.0) -> list[str]:
    """Drain; what the idle connections saw when `then` closed them."""
    seen: list[str] = []
    await guard.drain(timeout=timeout, fresh_timeout=fresh_timeout,
                      then=lambda: seen.append(
                          "busy" if guard.waiting_for(fresh=False) else "idle"))
    return seen


async def test_drain_answers_a_request_whose_body_is_still_arriving_before_closing():
    guard = ConnectionGuard(ConnectionLimits())
    protocol, app, transport = connect(guard)
    protocol.data_received(b"POST /mutate HTTP/1.1\r\nContent-Length: 40000\r\n\r\n{")
    loop = asyncio.get_running_loop()
    # The rest of the body comes 50 ms into the drain; the answer right after it.
    loop.call_later(0.05, lambda: (protocol.data_received(b"...}"), app.answer()))
    assert await drain(guard) == ["idle"]
    assert transport.written and not transport.aborted


async def test_drain_waits_for_the_request_of_a_connection_accepted_a_moment_ago():
    guard = ConnectionGuard(ConnectionLimits())
    protocol, app, transport = connect(guard)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, protocol.data_received, b"POST /mutate HTTP/1.1\r\n")
    loop.call_later(0.1, app.answer)
    assert await drain(guard) == ["idle"]
    assert transport.written and not transport.aborted


async def test_drain_closes_a_request_still_under_way_at_the_timeout_at_once():
    guard = ConnectionGuard(ConnectionLimits())
    protocol, _, transport = connect(guard)
    protocol.data_received(b"POST /mutate HTTP/1.1\r\n")  # and nothing more
    assert await drain(guard, timeout=0.1) == ["idle"]
    assert transport.aborted and not guard.open


async def test_a_handshake_that_completes_after_the_drain_is_closed_at_once():
    guard = ConnectionGuard(ConnectionLimits())
    app = App()
    protocol = guard.wrap(lambda: app)()  # accepted, handshake under way
    assert await drain(guard, fresh_timeout=0.05) == ["idle"]
    transport = FakeTransport()
    protocol.connection_made(transport)
    assert transport.aborted and not app.made and guard.active == 0


async def test_at_the_cap_a_review_being_decided_on_a_working_connection_keeps_its_slot():
    # The API server's keep-alive connection has a review under way (its body in, keymount
    # waiting for a live read or the worker): not a slow client. A new connection at
    # --max-connections takes the slot of one that never sent a byte, not that review's.
    guard = ConnectionGuard(ConnectionLimits(max_connections=3))
    api, api_app, api_transport = connect(guard)
    api.data_received(b"POST /mutate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    api_app.answer()  # a working connection
    api.data_received(b"POST /mutate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")  # the next
    silent = [connect(guard)[2] for _ in range(2)]  # handshaken, never a byte since
    connect(guard)
    assert not api_transport.aborted
    assert [t.aborted for t in silent] == [True, False]


async def test_at_the_cap_a_review_decided_for_over_a_second_is_no_slow_client():
    # Its body is all in; keymount waits on a live read the API server is slow to
    # answer (seconds, within its own deadline). A flood of new connections at
    # --max-connections used to take that review's slot first (under way past
    # SLOW_REQUEST ranks as a slow client), resetting the API server's request: the Pod
    # was refused (failurePolicy Fail) by whoever could open connections.
    from webhook.connections import SLOW_REQUEST, request_received

    guard = ConnectionGuard(ConnectionLimits(max_connections=3))
    api, api_app, api_transport = connect(guard)
    api.data_received(b"POST /mutate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    request_received(api_app.transport)  # the handler has the whole body
    slow, _, slow_transport = connect(guard)
    slow.data_received(b"POST /mutate HTTP/1.1\r\nContent-Length: 40000\r\n\r\n{")
    api.request_started -= 2 * SLOW_REQUEST  # both under way for two seconds
    slow.request_started -= 2 * SLOW_REQUEST
    connect(guard)
    connect(guard)  # the cap twice over
    assert slow_transport.aborted  # the slow sender goes first ...
    assert not api_transport.aborted, "... then idle ones; the review being decided last"
