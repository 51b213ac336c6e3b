"""Waiting on a condition with a deadline: the tests' only synchronisation."""

from __future__ import annotations

import asyncio
import time


def poll(predicate, *, timeout: float = 30.0, what: str = "condition"):
    """Call `predicate` until it returns something true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.05)


async def wait_for(predicate, *, timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what} not met within {timeout}s"
        await asyncio.sleep(0.01)
