"""The key cache: what every key source fills and every admission reads.

Admission must cost the same whatever the cluster holds (docs/architecture.md,
"Performance"), so each
namespace's `Keyring` (order, conflicts, invalid keys) is rebuilt when that namespace's
Secrets change, not per request: a lookup is one dict access. All mutation happens on
the event loop thread; sources that run in threads hand their results over to it.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

from .keys import KeyRecord, Keyring, build_keyring, revision
from .lifecycle import PodKeys, build_pod_key_state

# Deletions (and the revision of each namespace's newest list) remembered so that an
# older list or event cannot bring a deleted Secret back (see KeyStore). A live read is
# applied within seconds of being taken, while thousands of later deletions would have
# to happen in between to push its entry out; the oldest entries go first.
REMEMBERED_DELETIONS = 10_000


class KeyStore:
    """Key records per namespace, and each namespace's keyring built from them.

    Two writers feed it: the watch (events in the API server's order) and live reads
    (a list of one namespace, taken in a thread and applied later). A live read can be
    overtaken by the watch, and the watch can lag behind a live read, so per object the
    cache only moves forward: a record replaces the cached one only if its
    resourceVersion is not older; a list removes a cached record only if the list was
    taken after that record's version; a deletion is remembered, so an older list
    cannot bring the Secret back (docs/architecture.md, "The key cache").
    """

    def __init__(self) -> None:
        self._records: dict[str, dict[str, KeyRecord]] = {}
        self._rings: dict[str, Keyring] = {}
        # version(): bumped whenever a namespace changes. Kept only for namespaces that
        # hold key Secrets: reviews name any namespace, and each key-state refusal lists
        # it live, so an entry per name read would grow without bound. Numbers come from
        # one counter, and a namespace emptied takes the newest (`_emptied`), so no
        # namespace ever shows a version it showed before (LiveReads reuses a read only
        # while its version stands).
        self._versions: dict[str, int] = {}
        self._changes = itertools.count(1)
        self._emptied = 0
        self._deleted: OrderedDict[tuple[str, str], int] = OrderedDict()
        # The revision of the newest list of each namespace: a Secret it did not hold was
        # gone by then, so an older event for it (a lagging watch) cannot bring it back.
        # Bounded like the deletions: reviews name the namespaces live reads list.
        self._listed_at: OrderedDict[str, int] = OrderedDict()
        # The revision of the newest full list (every namespace, also those it found
        # empty, which _listed_at has no entry for).
        self._listed_all = 0
        self.ready = False
        # Called with a namespace whose records changed (the controller's wake-up; on
        # the event loop thread, like every change).
        self.listeners: list[Callable[[str], None]] = []

    def version(self, namespace: str) -> int:
        return self._versions.get(namespace, self._emptied)

    def keyring(self, namespace: str) -> Keyring:
        ring = self._rings.get(namespace)
        return ring if ring is not None else Keyring(namespace)

    def namespaces(self) -> list[str]:
        return sorted(self._rings)

    def knows(self, namespace: str) -> bool:
        """Whether the cache holds key Secrets of `namespace` (keys, slots, anything)."""
        return namespace in self._rings

    def replace_all(self, records: Iterable[KeyRecord], *, version: str = "") -> None:
        """A full list taken at resourceVersion `version`: afterwards the store holds
        these records, and anything cached that is newer than the list."""
        grouped: dict[str, list[KeyRecord]] = {}
        for record in records:
            grouped.setdefault(record.namespace, []).append(record)
        listed_at = revision(version)
        for namespace in set(self._records) | set(grouped):
            self._merge(namespace, grouped.get(namespace, ()), listed_at)
        self._listed_all = max(self._listed_all, listed_at)
        self._rebuild(set(self._records) | set(grouped) | set(self._rings))
        self.ready = True

    def replace_namespace(self, namespace: str, records: Iterable[KeyRecord], *,
                          version: str = "") -> Keyring:
        """A list of one namespace taken at resourceVersion `version` (a live read, or
        the watch's re-list)."""
        self._merge(namespace, (r for r in records if r.namespace == namespace),
                    revision(version))
        self._rebuild({namespace})
        return self.keyring(namespace)

    def put(self, record: KeyRecord) -> None:
        if self._admit(record):
            self._records.setdefault(record.namespace, {})[record.name] = record
            self._rebuild({record.namespace})

    def remove(self, record: KeyRecord) -> None:
        """The Secret was deleted; `record` is its last state (the DELETED event's
        object, whose resourceVersion is that of the deletion)."""
        cached = self._records.get(record.namespace, {}).get(record.name)
        if cached is not None and _older(record.revision, cached.revision):
            return  # a Secret created again under that name, already seen by a live read
        if record.revision:
            self._remember_deletion(record.namespace, record.name, record.revision)
        if cached is not None:
            del self._records[record.namespace][record.name]
            self._rebuild({record.namespace})

    def count_by_state(self) -> Counter[str]:
        return Counter(r.state for by_name in self._records.values()
                       for r in by_name.values())

    def _admit(self, record: KeyRecord) -> bool:
        """Whether `record` is news: not older than what is cached or was deleted."""
        cached = self._records.get(record.namespace, {}).get(record.name)
        if cached is not None and _older(record.revision, cached.revision):
            return False
        if cached is None and record.revision and record.revision <= max(
                self._listed_at.get(record.namespace, 0), self._listed_all):
            return False  # a list taken after this version did not hold it: deleted
        deleted_at = self._deleted.get((record.namespace, record.name))
        if deleted_at is not None:
            if record.revision and record.revision <= deleted_at:
                return False
            del self._deleted[(record.namespace, record.name)]
        return True

    def _merge(self, namespace: str, listed: Iterable[KeyRecord], listed_at: int) -> None:
        if not listed_at:
            # A list without a version (--keys-from, the first load of several scopes)
            # is the truth as it stands.
            self._records[namespace] = {r.name: r for r in listed}
            return
        cached = self._records.get(namespace, {})
        merged = {r.name: r for r in cached.values()
                  if _older(listed_at, r.revision)}  # changed after the list was taken
        for record in listed:
            if record.name not in merged and self._admit(record):
                merged[record.name] = record
        self._records[namespace] = merged
        self._listed_at[namespace] = max(listed_at, self._listed_at.get(namespace, 0))
        self._listed_at.move_to_end(namespace)
        while len(self._listed_at) > REMEMBERED_DELETIONS:
            self._listed_at.popitem(last=False)

    def _remember_deletion(self, namespace: str, name: str, at: int) -> None:
        self._deleted[(namespace, name)] = at
        self._deleted.move_to_end((namespace, name))
        while len(self._deleted) > REMEMBERED_DELETIONS:
            self._deleted.popitem(last=False)

    def _rebuild(self, namespaces: Iterable[str]) -> None:
        for ns in namespaces:
            before = self._rings.get(ns)
            records = self._records.get(ns)
            if records:
                self._rings[ns] = build_keyring(ns, records.values())
                self._versions[ns] = next(self._changes)
            else:
                self._records.pop(ns, None)
                self._rings.pop(ns, None)
                if self._versions.pop(ns, None) is not None:
                    self._emptied = next(self._changes)
            # Only a real change: a resync's re-list rebuilds every namespace.
            if self.listeners and self._rings.get(ns) != before:
                for listener in self.listeners:
                    listener(ns)


def _older(candidate: int, than: int) -> bool:
    """`candidate` is known to come before `than` (0 is unknown: not older)."""
    return bool(candidate and than and candidate < than)


class PodStore:
    """Backend Pods as `PodKeys`, for the stale-Pod metric; filled by a Pod watch."""

    def __init__(self) -> None:
        self._pods: dict[tuple[str, str], PodKeys] = {}

    def replace_all(self, records: Iterable[PodKeys], *, version: str = "") -> None:
        self._pods = {(r.namespace, r.name): r for r in records}

    def replace_namespace(self, namespace: str, records: Iterable[PodKeys], *,
                          version: str = "") -> None:
        self._pods = {k: v for k, v in self._pods.items() if k[0] != namespace}
        self._pods.update(((r.namespace, r.name), r) for r in records)

    def put(self, record: PodKeys) -> None:
        self._pods[(record.namespace, record.name)] = record

    def remove(self, record: PodKeys) -> None:
        self._pods.pop((record.namespace, record.name), None)

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
