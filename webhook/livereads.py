"""Live reads of a namespace's keys, coalesced and rate-limited.

Before a refusal caused by the namespace's keys, and before judging a new key's
number, keymount reads the namespace live (docs/contract.md, "Refusals"). Anything that
reaches the port can send reviews, so those reads must not become a flood of API calls:

- concurrent reads of one namespace share one call;
- a read is reused for `reuse_seconds` (a burst of refusals costs one call);
- a namespace the cache knows (it holds key Secrets there) has a token bucket of its
  own (`namespace_rate`, `namespace_burst`), so reviews about other namespaces, forged
  or not, can never use up its reads; reuse makes a flood of Pod reviews about it cost
  one call per `reuse_seconds`, which its bucket refills faster than that. A new key
  made under a name of its own is judged on a read of its own (`fresh`), so forged
  reviews of such keys can use up that namespace's reads (only `--client-ca` stops
  them); keys made by filling a slot, as `keys rotate` does, need no read at all;
- namespaces the cache does not know share one bucket (`rate`, `burst`), which keeps
  reviews about endless made-up names from turning into a flood of API calls. Draining
  it can only delay the first Pod of a namespace whose first key the watch has not
  delivered yet: the refusal stands (fail closed) and the Pod's controller retries;
- the reads that judge new keys (`fresh`) have buckets of their own, the same again,
  apart from the reads that confirm a Pod's refusal: a key writer's restore of
  thousands of keys (one read each) never delays a Pod's admission, and forged key
  reviews can drain only the key writers' budget, whose refusals (429) they retry.
Past a limit the caller decides from its cache: the webhook then fails closed.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from .keys import Keyring

REMEMBERED = 4096  # namespaces whose last read (and own bucket) is kept


class LiveReads:
    def __init__(self, read: Callable[[str], Awaitable[Keyring]], *, rate: float = 10.0,
                 burst: int = 20, reuse_seconds: float = 1.0,
                 namespace_rate: float | None = None, namespace_burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 version: Callable[[str], int] = lambda namespace: 0,
                 known: Callable[[str], bool] = lambda namespace: False,
                 on_call: Callable[[str], None] = lambda result: None) -> None:
        self.read, self.reuse_seconds, self.clock = read, reuse_seconds, clock
        self.version, self.known, self.on_call = version, known, on_call
        # Index 0: reads for Pods; 1: reads judging a new key (`fresh`).
        self._shared = (_Bucket(rate, burst, clock()), _Bucket(rate, burst, clock()))
        # By default each namespace keymount knows has as many reads as all the others
        # together: `--live-reads-per-second` (a key made under a name of its own costs
        # two, one at /mutate and one at /validate).
        self._namespace_rate = rate if namespace_rate is None else namespace_rate
        self._namespace_burst = burst if namespace_burst is None else namespace_burst
        self._own: OrderedDict[tuple[str, bool], _Bucket] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Keyring]] = {}
        # namespace -> (when, the cache's version of it then, what the read found)
        self._recent: OrderedDict[str, tuple[float, int, Keyring]] = OrderedDict()

    async def confirm(self, namespace: str, *, fresh: bool = False) -> Keyring | None:
        """The namespace's keys read live, or None when the rate limit says no.

        `fresh`: a read that starts now, shared with no earlier one (a new key's number
        is judged against everything stored before it, including a key allowed a
        moment ago that no earlier read or the watch has shown yet)."""
        shared = None if fresh else self._inflight.get(namespace)
        if shared is not None:
            self.on_call("coalesced")
            return await asyncio.shield(shared)
        recent = None if fresh else self._recent.get(namespace)
        # Reused only while the cache has seen no change of the namespace since: a key
        # the watch delivered after the read must never be missed.
        if (recent is not None and self.clock() - recent[0] < self.reuse_seconds
                and recent[1] == self.version(namespace)):
            self.on_call("reused")
            return recent[2]
        if not self._bucket(namespace, fresh).take(self.clock()):
            self.on_call("limited")
            return None
        self.on_call("read")
        future = asyncio.ensure_future(self.read(namespace))
        if not fresh:
            self._inflight[namespace] = future
        try:
            keyring = await asyncio.shield(future)
        finally:
            if self._inflight.get(namespace) is future:
                del self._inflight[namespace]
        self._recent[namespace] = (self.clock(), self.version(namespace), keyring)
        self._recent.move_to_end(namespace)
        while len(self._recent) > REMEMBERED:
            self._recent.popitem(last=False)
        return keyring

    def forget(self, namespace: str) -> None:
        """keymount itself changed the namespace (--auto-generate): the next read is
        fresh. Never called because of what a review says: a forged review could then
        make every later one read again."""
        self._recent.pop(namespace, None)

    def _bucket(self, namespace: str, fresh: bool) -> _Bucket:
        if not self.known(namespace):
            return self._shared[fresh]
        bucket = self._own.get((namespace, fresh))
        if bucket is None:
            bucket = self._own[(namespace, fresh)] = _Bucket(
                self._namespace_rate, self._namespace_burst, self.clock())
            while len(self._own) > 2 * REMEMBERED:
                self._own.popitem(last=False)
        self._own.move_to_end((namespace, fresh))
        return bucket


class PodListings:
    """Live lists of a namespace's Pods, for the one refusal that depends on which Pods
    list a Secret by name (deleting a tombstone, docs/contract.md): rare for real
    requests, and anything that reaches the port can send such a review, so they are
    rate-limited (`rate` a second, bursts of `burst`). Past the limit: None, and the
    refusal stands."""

    def __init__(self, read: Callable[[str, str], Awaitable[tuple[str, ...] | None]], *,
                 rate: float = 1.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read, self.clock = read, clock
        self._bucket = _Bucket(rate, burst, clock())

    async def listing(self, namespace: str, secret: str) -> tuple[str, ...] | None:
        """The Pods of `namespace`, not finished, whose volumes name Secret `secret`;
        None when that cannot be known now."""
        if not self._bucket.take(self.clock()):
            return None
        try:
            return await self.read(namespace, secret)
        except Exception:  # unknown: the refusal stands, and says why
            return None


class _Bucket:
    """A token bucket: `rate` tokens a second, at most `burst`."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.filled = rate, burst, float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.filled) * self.rate)
        self.filled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
