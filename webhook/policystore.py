"""The controller's view of the policies: KeyPolicies, ClusterKeyPolicies and the
namespaces' labels, as their watches last delivered them (webhook/watch.py).

Only the leader holds it. It says which namespaces have a policy and what that policy
is (`policy.effective_policy`, pure), and tells its listeners which namespaces a change
may concern: a KeyPolicy its namespace, a namespace's labels that namespace, a
ClusterKeyPolicy every namespace. What it holds only schedules work: before any write
the controller reads the namespace's keys live.

A stored object that does not parse (written before keymount's webhook was
registered, or while it was down) is kept as a problem: it counts as no policy, and
the controller reports it instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .names import as_dict
from .policy import (
    ClusterKeyPolicy,
    EffectivePolicy,
    KeyPolicy,
    PolicyError,
    effective_policy,
    parse_cluster_key_policy,
    parse_key_policy,
)

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Stored(Generic[P]):
    """One watched object: parsed, or why it could not be."""

    namespace: str  # "" for cluster-scoped objects
    name: str
    value: P | None
    problem: str | None = None
    generation: int = 0
    # The status keymount last wrote, as stored: not part of what the object says, so a
    # status write (the controller's own) is no change that wakes the controller.
    status: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # The resourceVersion as watched: the controller's status write is conditional on it.
    version: str = field(default="", compare=False)


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, int]:
    meta = as_dict(obj.get("metadata"))
    generation = meta.get("generation")
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""),
            generation if isinstance(generation, int) else 0)


def _version(obj: Mapping[str, Any]) -> str:
    return str(as_dict(obj.get("metadata")).get("resourceVersion") or "")


def parse_stored_keypolicy(obj: Mapping[str, Any]) -> Stored[KeyPolicy]:
    namespace, name, generation = _meta(obj)
    status = as_dict(obj.get("status"))
    try:
        return Stored(namespace, name, parse_key_policy(obj), generation=generation,
                      status=status, version=_version(obj))
    except PolicyError as exc:
        return Stored(namespace, name, None, str(exc), generation, status, _version(obj))


def parse_stored_clusterkeypolicy(obj: Mapping[str, Any]) -> Stored[ClusterKeyPolicy]:
    _, name, generation = _meta(obj)
    # Kept as the KeyPolicy's is: without it every pass would write every
    # ClusterKeyPolicy's status again, each write from the shared write budget.
    status = as_dict(obj.get("status"))
    try:
        return Stored("", name, parse_cluster_key_policy(obj), generation=generation,
                      status=status, version=_version(obj))
    except PolicyError as exc:
        return Stored("", name, None, str(exc), generation, status, _version(obj))


def parse_stored_namespace(obj: Mapping[str, Any]) -> Stored[dict[str, str]]:
    _, name, _ = _meta(obj)
    labels = as_dict(as_dict(obj.get("metadata")).get("labels"))
    return Stored("", name, {str(k): str(v) for k, v in labels.items()})


class _Kind(Generic[P]):
    """A ListWatch sink for one kind: records by namespace, then name."""

    def __init__(self, changed: Callable[[Iterable[Stored[P]]], None]) -> None:
        self.by_namespace: dict[str, dict[str, Stored[P]]] = {}
        self.changed = changed

    def get(self, namespace: str, name: str) -> Stored[P] | None:
        return self.by_namespace.get(namespace, {}).get(name)

    def all(self) -> Iterable[Stored[P]]:
        for records in self.by_namespace.values():
            yield from records.values()

    def replace_all(self, records: Iterable[Stored[P]], *, version: str = "") -> None:
        before = {(r.namespace, r.name): r for r in self.all()}
        after = {(r.namespace, r.name): r for r in records}
        self.by_namespace = {}
        for record in after.values():
            self.by_namespace.setdefault(record.namespace, {})[record.name] = record
        self.changed([r for key, r in (before | after).items()
                      if before.get(key) != after.get(key)])

    def replace_namespace(self, namespace: str, records: Iterable[Stored[P]], *,
                          version: str = "") -> None:
        # Every watch here is cluster-wide (one scope), so a re-list is a replace_all.
        self.replace_all(records, version=version)

    def put(self, record: Stored[P]) -> None:
        before = self.get(record.namespace, record.name)
        self.by_namespace.setdefault(record.namespace, {})[record.name] = record
        if before != record:
            self.changed([record])

    def remove(self, record: Stored[P]) -> None:
        records = self.by_namespace.get(record.namespace, {})
        if records.pop(record.name, None) is not None:
            if not records:
                del self.by_namespace[record.namespace]
            self.changed([record])


class PolicyStore:
    def __init__(self) -> None:
        self.listeners: list[Callable[[str | None], None]] = []  # None: every namespace
        self.keypolicies: _Kind[KeyPolicy] = _Kind(
            lambda changed: self._notify({r.namespace for r in changed}))
        self.clusterkeypolicies: _Kind[ClusterKeyPolicy] = _Kind(
            lambda changed: self._notify({None} if changed else set()))
        self.namespaces: _Kind[dict[str, str]] = _Kind(
            lambda changed: self._notify({r.name for r in changed}))

    def _notify(self, namespaces: set[str | None]) -> None:
        for namespace in namespaces:
            for listener in self.listeners:
                listener(namespace)

    def labels(self, namespace: str) -> dict[str, str] | None:
        """The namespace's labels; None when it does not exist (or is not seen yet)."""
        stored = self.namespaces.get("", namespace)
        return stored.value if stored is not None else None

    def policy_objects(self, namespace: str) -> list[Stored[KeyPolicy]]:
        return list(self.keypolicies.by_namespace.get(namespace, {}).values())

    def effective(self, namespace: str) -> EffectivePolicy | None:
        """What `namespace` rotates by; None: no policy (or it no longer exists)."""
        labels = self.labels(namespace)
        if labels is None:
            return None
        keypolicies = [r.value for r in self.policy_objects(namespace) if r.value is not None]
        cluster = [r.value for r in self.clusterkeypolicies.all() if r.value is not None]
        return effective_policy(labels, keypolicies, cluster)

    def managed(self) -> list[str]:
        """Every namespace with a policy."""
        return [r.name for r in self.namespaces.all() if self.effective(r.name) is not None]

    def problems(self, namespace: str) -> list[str]:
        """Stored policies that concern `namespace` and do not parse."""
        found = [f"KeyPolicy {r.name!r}: {r.problem}" for r in self.policy_objects(namespace)
                 if r.problem]
        found += [f"ClusterKeyPolicy {r.name!r}: {r.problem}"
                  for r in self.clusterkeypolicies.all() if r.problem]
        return found
