"""The key cache: what every key source fills and every admission reads.

Admission must cost the same whatever the cluster holds (docs/architecture.md,
"Performance"), so each
namespace's `Keyring` (order, conflicts, invalid keys) is rebuilt when that namespace's
Secrets change, not per request: a lookup is one dict access. All mutation happens on
the event loop thread; sources that run in threads hand their results over to it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

from .keys import KeyRecord, Keyring, build_keyring
from .lifecycle import PodKeys, build_pod_key_state


class KeyStore:
    def __init__(self) -> None:
        self._records: dict[str, dict[str, KeyRecord]] = {}
        self._rings: dict[str, Keyring] = {}
        self._versions: Counter[str] = Counter()  # bumped whenever a namespace changes
        self.ready = False

    def version(self, namespace: str) -> int:
        return self._versions[namespace]

    def keyring(self, namespace: str) -> Keyring:
        ring = self._rings.get(namespace)
        return ring if ring is not None else Keyring(namespace)

    def namespaces(self) -> list[str]:
        return sorted(self._rings)

    def replace_all(self, records: Iterable[KeyRecord]) -> None:
        """A full list: afterwards the store holds exactly these records."""
        grouped: dict[str, dict[str, KeyRecord]] = {}
        for record in records:
            grouped.setdefault(record.namespace, {})[record.name] = record
        changed = set(self._records) | set(grouped)
        self._records = grouped
        self._rebuild(changed)
        self.ready = True

    def replace_namespace(self, namespace: str, records: Iterable[KeyRecord]) -> Keyring:
        """A live read of one namespace replaces what the cache had for it."""
        self._records[namespace] = {r.name: r for r in records if r.namespace == namespace}
        self._rebuild({namespace})
        return self.keyring(namespace)

    def put(self, record: KeyRecord) -> None:
        self._records.setdefault(record.namespace, {})[record.name] = record
        self._rebuild({record.namespace})

    def remove(self, namespace: str, name: str) -> None:
        if self._records.get(namespace, {}).pop(name, None) is not None:
            self._rebuild({namespace})

    def count_by_state(self) -> Counter[str]:
        return Counter(r.state for by_name in self._records.values()
                       for r in by_name.values())

    def _rebuild(self, namespaces: Iterable[str]) -> None:
        for ns in namespaces:
            self._versions[ns] += 1
            records = self._records.get(ns)
            if records:
                self._rings[ns] = build_keyring(ns, records.values())
            else:
                self._records.pop(ns, None)
                self._rings.pop(ns, None)


class Reservations:
    """Numbers this process has just handed to key Secrets not yet in the cache.

    Two keys created at the same moment both see the same "next number" until the
    first one is stored; a number stamped here is skipped by the next stamp, and the
    validating check refuses a second key asking for it. Entries expire after `ttl`
    seconds (by then the watch has delivered the Secret), and at most `per_namespace`
    are kept, so forged reviews cannot grow this without bound.
    """

    def __init__(self, *, ttl: float = 30.0, per_namespace: int = 32,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.per_namespace, self.clock = ttl, per_namespace, clock
        self._held: dict[str, dict[int, tuple[str, float]]] = {}

    def held(self, namespace: str) -> dict[int, str]:
        entries = self._held.get(namespace)
        if not entries:
            return {}
        now = self.clock()
        for number in [n for n, (_, expires) in entries.items() if expires <= now]:
            del entries[number]
        if not entries:
            del self._held[namespace]
        return {n: name for n, (name, _) in entries.items()}

    def settle(self, namespace: str, present: Iterable[str]) -> None:
        """Forget the numbers of keys that are now in view: they are no longer in
        flight, and a stale entry must not outlive its key (a namespace deleted and
        restored within the TTL would otherwise see its own old numbers as taken)."""
        entries = self._held.get(namespace)
        if entries:
            names = set(present)
            for number in [n for n, (name, _) in entries.items() if name in names]:
                del entries[number]

    def reserve(self, namespace: str, number: int, name: str) -> None:
        self.held(namespace)  # drop expired entries first
        entries = self._held.setdefault(namespace, {})
        entries[number] = (name, self.clock() + self.ttl)
        while len(entries) > self.per_namespace:
            del entries[min(entries, key=lambda n: entries[n][1])]


class PodStore:
    """Backend Pods as `PodKeys`, for the stale-Pod metric; filled by a Pod watch."""

    def __init__(self) -> None:
        self._pods: dict[tuple[str, str], PodKeys] = {}

    def replace_all(self, records: Iterable[PodKeys]) -> None:
        self._pods = {(r.namespace, r.name): r for r in records}

    def replace_namespace(self, namespace: str, records: Iterable[PodKeys]) -> None:
        self._pods = {k: v for k, v in self._pods.items() if k[0] != namespace}
        self._pods.update(((r.namespace, r.name), r) for r in records)

    def put(self, record: PodKeys) -> None:
        self._pods[(record.namespace, record.name)] = record

    def remove(self, namespace: str, name: str) -> None:
        self._pods.pop((namespace, name), None)

    def behind(self, keys: KeyStore) -> Counter[tuple[str, str]]:
        """(namespace, state) -> how many Pods are not on the current key set:
        `updating` (the kubelet adds the missing keys) or `stale` (needs a restart)."""
        counts: Counter[tuple[str, str]] = Counter()
        for pod in self._pods.values():
            if pod.finished:
                continue
            state = build_pod_key_state(pod, keys.keyring(pod.namespace))
            if state is not None and state.state != "current":
                counts[(pod.namespace, state.state)] += 1
        return counts
