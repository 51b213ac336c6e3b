"""Live reads of a namespace's keys, coalesced and rate-limited.

Before a refusal caused by the namespace's keys, and before judging a new key's
number, keymount reads the namespace live (docs/contract.md, "Refusals"). Anything that
reaches the port can send reviews, so those reads must not become a flood of API calls:

- concurrent reads of one namespace share one call;
- a read is reused for `reuse_seconds` (a burst of refusals costs one call);
- at most `rate` calls a second (a token bucket of `burst`); past that, the caller
  decides from its cache: the webhook then fails closed (a refusal stands).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from .keys import Keyring

REMEMBERED = 4096  # namespaces whose last read is kept for reuse


class LiveReads:
    def __init__(self, read: Callable[[str], Awaitable[Keyring]], *, rate: float = 10.0,
                 burst: int = 20, reuse_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 version: Callable[[str], int] = lambda namespace: 0,
                 on_call: Callable[[str], None] = lambda result: None) -> None:
        self.read, self.rate, self.burst = read, rate, burst
        self.reuse_seconds, self.clock, self.on_call = reuse_seconds, clock, on_call
        self.version = version
        self._tokens = float(burst)
        self._filled = clock()
        self._inflight: dict[str, asyncio.Future[Keyring]] = {}
        # namespace -> (when, the cache's version of it then, what the read found)
        self._recent: OrderedDict[str, tuple[float, int, Keyring]] = OrderedDict()

    async def confirm(self, namespace: str) -> Keyring | None:
        """The namespace's keys read live, or None when the rate limit says no."""
        shared = self._inflight.get(namespace)
        if shared is not None:
            self.on_call("coalesced")
            return await asyncio.shield(shared)
        recent = self._recent.get(namespace)
        # Reused only while the cache has seen no change of the namespace since: a key
        # the watch delivered after the read must never be missed.
        if (recent is not None and self.clock() - recent[0] < self.reuse_seconds
                and recent[1] == self.version(namespace)):
            self.on_call("reused")
            return recent[2]
        if not self._take():
            self.on_call("limited")
            return None
        self.on_call("read")
        future = asyncio.ensure_future(self.read(namespace))
        self._inflight[namespace] = future
        try:
            keyring = await asyncio.shield(future)
        finally:
            self._inflight.pop(namespace, None)
        self._recent[namespace] = (self.clock(), self.version(namespace), keyring)
        self._recent.move_to_end(namespace)
        while len(self._recent) > REMEMBERED:
            self._recent.popitem(last=False)
        return keyring

    def forget(self, namespace: str) -> None:
        """A write keymount allowed changes the namespace: the next read is fresh."""
        self._recent.pop(namespace, None)

    def _take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._filled) * self.rate)
        self._filled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
