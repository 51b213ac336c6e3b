"""The reads behind a KeyPolicy decision: its namespace's labels, the KeyPolicies it
already holds, and every ClusterKeyPolicy, from the API server, for each review that
needs them.

A KeyPolicy is judged on a fresh read, never on a cache: a bound tightened a moment ago
holds for the next KeyPolicy. Anything that reaches the port can send reviews, so the
reads are bounded like the key reads (webhook/livereads.py): concurrent reviews share
one call in flight, and a token bucket caps the calls a second; past it, and whenever
a read fails, the review is refused with the reason (failing closed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from .decisions import PolicyView
from .livereads import _Bucket
from .names import CLUSTERKEYPOLICY_PLURAL
from .watch import describe_error

T = TypeVar("T")

# More ClusterKeyPolicies than this is no policy anyone reviews: refuse rather than read
# without end (a list is asked for this many and refused when more remain).
MAX_CLUSTER_POLICIES = 500
# A namespace has one KeyPolicy: a create is refused when another exists, so a list of
# two tells every answer apart (none, this one, another).
KEYPOLICIES_LISTED = 2


class PolicyApi(Protocol):
    """The two reads, each bounded in time (webhook/cluster.py implements them)."""

    async def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        """The namespace's labels; raises PolicyReadError when it does not exist."""

    async def cluster_policies(self, limit: int) -> Sequence[Mapping[str, Any]]:
        """Every ClusterKeyPolicy; raises PolicyReadError when more than `limit`."""

    async def keypolicy_names(self, namespace: str, limit: int) -> Sequence[str]:
        """The names of at most `limit` of the namespace's KeyPolicies."""


class PolicyReadError(Exception):
    """A read that cannot answer, in words for the refusal."""


class PolicyReads:
    def __init__(self, api: PolicyApi, *, rate: float = 10.0, burst: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api, self.clock = api, clock
        self._bucket = _Bucket(rate, burst, clock())
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    async def view(self, namespace: str) -> PolicyView:
        """The namespace's labels, its KeyPolicies' names and every ClusterKeyPolicy,
        or the reason not."""
        if not self._bucket.take(self.clock()):
            return PolicyView(failure="keymount is limiting its reads of the API server "
                                      "right now", throttled=True)
        try:
            labels, clusters, names = await asyncio.gather(
                self._shared(f"namespace/{namespace}",
                             lambda: self.api.namespace_labels(namespace)),
                self._shared(CLUSTERKEYPOLICY_PLURAL,
                             lambda: self.api.cluster_policies(MAX_CLUSTER_POLICIES)),
                self._shared(f"keypolicies/{namespace}",
                             lambda: self.api.keypolicy_names(namespace, KEYPOLICIES_LISTED)))
        except PolicyReadError as exc:
            return PolicyView(failure=str(exc))
        except Exception as exc:  # timeouts, refused connections, RBAC: fail closed
            return PolicyView(failure=describe_error(exc))
        return PolicyView(dict(labels), tuple(clusters), keypolicies=tuple(names))

    async def _shared(self, key: str, read: Callable[[], Awaitable[T]]) -> T:
        """One call for the reviews that ask while it is in flight; a review that comes
        after it answered reads again (fresh)."""
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(read())
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._forget(key, done))
        result: T = await asyncio.shield(future)
        return result

    def _forget(self, key: str, future: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved: a failure shared by nobody is not logged
