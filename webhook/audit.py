"""`keymount audit`: what a security team asks before it trusts a key service (pure).

Findings: one key (by fingerprint) in more than one namespace; subjects that can read
a namespace's key Secrets through RBAC (cluster admins, Kubernetes' own `system:`
identities, kube-system's service accounts, keymount itself and the key writers are
expected, not findings); key writers unset; a namespace whose newest key is older than
--max-key-age; backend Pods on a stale key set; keys made before keymount numbered
them. Any finding makes the command exit 1, so CI can gate on it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .keyguard import SERVICE_ACCOUNT_PREFIX, KeyWriters, Requester
from .keys import Keyring, describe_conflict
from .lifecycle import PodKeys, build_pod_key_state, newest_key_too_old

READ_VERBS = {"get", "list", "watch", "*"}


@dataclass(frozen=True, slots=True)
class Finding:
    # reused-key | secret-reader | key-writers-unset | key-too-old | stale-pod | legacy-key
    # | duplicate-number
    kind: str
    namespace: str
    subject: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "namespace": self.namespace or "*",
                "subject": self.subject, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Rbac:
    """The RBAC objects of the cluster, as the API returns them (dicts)."""

    cluster_roles: Sequence[Mapping[str, Any]]
    cluster_role_bindings: Sequence[Mapping[str, Any]]
    roles: Sequence[Mapping[str, Any]]
    role_bindings: Sequence[Mapping[str, Any]]


def reads_secrets(rules: Iterable[Mapping[str, Any]], names: set[str]) -> bool:
    """Whether RBAC rules allow reading any of the Secrets `names`."""
    for rule in rules or []:
        groups, resources = set(rule.get("apiGroups") or []), set(rule.get("resources") or [])
        if not groups & {"", "*"} or not resources & {"secrets", "*"}:
            continue
        if not set(rule.get("verbs") or []) & READ_VERBS:
            continue
        only = set(rule.get("resourceNames") or [])
        if not only or only & names:
            return True
    return False


def subject_name(subject: Mapping[str, Any]) -> str:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        return f"serviceaccount:{subject.get('namespace')}:{subject.get('name')}"
    return f"{'group' if kind == 'Group' else 'user'}:{subject.get('name')}"


def expected_reader(subject: Mapping[str, Any], *, writers: KeyWriters,
                    role: str) -> bool:
    """Cluster admins, Kubernetes' own identities, keymount, the key writers."""
    name, kind = str(subject.get("name") or ""), subject.get("kind")
    if role == "cluster-admin" or name.startswith("system:"):
        return True
    if kind == "ServiceAccount":
        if subject.get("namespace") == "kube-system":
            return True
        requester = Requester(f"{SERVICE_ACCOUNT_PREFIX}{subject.get('namespace')}:{name}")
    elif kind == "Group":
        requester = Requester("", (name,))
    else:
        requester = Requester(name)
    if writers.own_user and requester.username == writers.own_user:
        return True
    return any(s.matches(requester) for s in writers.subjects or ())


def secret_readers(rbac: Rbac, namespace: str, names: set[str], *,
                   writers: KeyWriters) -> dict[str, str]:
    """subject -> the binding that lets it read key Secrets of `namespace`."""
    cluster_roles = {r["metadata"]["name"]: r for r in rbac.cluster_roles}
    roles = {(r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in rbac.roles}
    readers: dict[str, str] = {}
    bindings = [(b, "ClusterRoleBinding") for b in rbac.cluster_role_bindings]
    bindings += [(b, "RoleBinding") for b in rbac.role_bindings
                 if b["metadata"].get("namespace") == namespace]
    for binding, kind in bindings:
        ref = binding.get("roleRef") or {}
        role = cluster_roles.get(ref.get("name")) if ref.get("kind") == "ClusterRole" else \
            roles.get((namespace, ref.get("name")))
        if role is None or not reads_secrets(role.get("rules") or [], names):
            continue
        for subject in binding.get("subjects") or []:
            if expected_reader(subject, writers=writers, role=str(ref.get("name"))):
                continue
            readers.setdefault(subject_name(subject),
                               f"{kind} {binding['metadata']['name']} -> "
                               f"{ref.get('kind')} {ref.get('name')}")
    return readers


def audit(keyrings: Mapping[str, Keyring], *, rbac: Rbac | None, pods: Iterable[PodKeys],
          writers: KeyWriters, max_age: timedelta | None, now: datetime) -> list[Finding]:
    findings: list[Finding] = []
    if not writers.configured:
        findings.append(Finding(
            "key-writers-unset", "", "-", "--key-writers is not set: anyone RBAC lets write "
            "Secrets can choose the key that encrypts new data; set it on keymount serve and "
            "pass the same to audit (KEYMOUNT_KEY_WRITERS)"))
    by_fingerprint: dict[str, set[str]] = defaultdict(set)
    for ns, keyring in keyrings.items():
        for record in keyring.keys:
            by_fingerprint[record.fingerprint].add(ns)
        if keyring.conflict:
            findings.append(Finding("duplicate-number", ns,
                                    ",".join(r.name for r in keyring.conflict),
                                    describe_conflict(keyring)))
        for record in keyring.legacy:
            findings.append(Finding(
                "legacy-key", ns, record.name, "made before keymount numbered keys; pin it: "
                f"keymount keys pin -n {ns}"))
        if newest_key_too_old(keyring, max_age=max_age, now=now):
            newest = keyring.newest
            findings.append(Finding(
                "key-too-old", ns, newest.name if newest else "-",
                f"the newest key is older than --max-key-age; rotate: keymount keys rotate "
                f"-n {ns}"))
        if rbac is not None:
            names = {r.name for r in (*keyring.keys, *keyring.invalid, *keyring.retired)}
            for subject, via in sorted(secret_readers(rbac, ns, names,
                                                      writers=writers).items()):
                findings.append(Finding("secret-reader", ns, subject,
                                        f"can read its key Secrets ({via})"))
    for fingerprint, namespaces in sorted(by_fingerprint.items()):
        if len(namespaces) > 1:
            findings.append(Finding(
                "reused-key", ",".join(sorted(namespaces)), f"fingerprint {fingerprint}",
                "the same key in more than one namespace: one namespace's data is readable "
                "with another's key; rotate all but one"))
    for pod in pods:
        if pod.finished or pod.namespace not in keyrings:
            continue
        state = build_pod_key_state(pod, keyrings[pod.namespace])
        if state is not None and state.state == "stale":
            findings.append(Finding(
                "stale-pod", pod.namespace, pod.name,
                f"runs on a stale key set (missing {', '.join(state.missing) or '-'}; "
                f"retired {', '.join(state.removed) or '-'}); restart it"))
    return findings


