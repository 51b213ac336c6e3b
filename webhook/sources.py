"""What the server needs of a key source: the local directory (`localdir`) and the
Kubernetes API (`cluster`) both provide it; only the latter can also write."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .events import EventSink
from .keys import Keyring


@runtime_checkable
class KeySource(Protocol):
    async def load(self) -> None:
        """The first full load; the store (and /readyz) is ready only after it."""

    async def run(self) -> None:
        """Follow changes until cancelled."""

    async def confirm(self, namespace: str) -> Keyring:
        """One live read of a namespace (before a key-state refusal)."""

    async def pods_listing(self, namespace: str, secret: str) -> tuple[str, ...] | None:
        """The Pods of `namespace`, not finished, whose volumes name Secret `secret`,
        read live; None where Pods cannot be read (a key directory)."""


@runtime_checkable
class ClusterKeySource(KeySource, Protocol):
    async def create_generated_key(self, namespace: str) -> Keyring:
        """--auto-generate: the namespace's one generated key, made or reused."""

    def event_sink(self) -> EventSink:
        """Where Kubernetes Events are recorded."""
