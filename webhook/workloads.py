"""Offline injection (`keymount inject`): Pods and the pod templates of workloads.

Each template goes through `injection.inject_keys`, the function behind the webhook,
so a manifest injected here is what the webhook would make of the Pods it creates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .injection import Injected, Refused, inject_keys, needs_keys
from .keys import Keyring

# Where each kind keeps the Pod it creates (apps/v1, batch/v1, core/v1).
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "PodTemplate": ("template",),
}


class InjectionRefused(Exception):
    """A document the webhook would refuse; the message is the webhook's."""


@dataclass(frozen=True, slots=True)
class InjectedDocument:
    document: Any
    warnings: tuple[str, ...] = ()


def find_pod_template(document: Mapping[str, Any]) -> Mapping[str, Any] | None:
    path = TEMPLATE_PATHS.get(str(document.get("kind")))
    if path is None:
        return None
    node: Any = document
    for step in path:
        node = node.get(step) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def inject_document(document: Any, *, keyring_for: Callable[[str], Keyring],
                    settings: Settings, default_namespace: str = "default") -> InjectedDocument:
    """The document with keys injected into its Pod (template), or unchanged."""
    if not isinstance(document, Mapping):
        return InjectedDocument(document)
    template = find_pod_template(document)
    if template is None or not needs_keys(template, settings=settings):
        return InjectedDocument(document)
    namespace = (document.get("metadata") or {}).get("namespace") or default_namespace
    outcome = inject_keys(template, keyring=keyring_for(namespace), settings=settings)
    kind, name = document.get("kind"), (document.get("metadata") or {}).get("name")
    if isinstance(outcome, Refused):
        raise InjectionRefused(f"{kind} {namespace}/{name}: {outcome.message}")
    assert isinstance(outcome, Injected)
    result = copy.deepcopy(dict(document))
    path = TEMPLATE_PATHS[str(kind)]
    if not path:
        result = outcome.apply(result)
    else:
        parent = result
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = outcome.apply(parent[path[-1]])
    warnings = tuple(f"{kind} {namespace}/{name}: {w}" for w in outcome.warnings)
    return InjectedDocument(result, warnings)
