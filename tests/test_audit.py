"""`keymount audit` (pure): each kind of finding, and what is expected, not a finding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from webhook.audit import Rbac, audit, reads_secrets
from webhook.keyguard import parse_key_writers
from webhook.lifecycle import PodKeys

from builders import key_secret, keyring_of, random_key

NOW = datetime(2026, 11, 29, tzinfo=UTC)
WRITERS = parse_key_writers("group:keymount:key-writers",
                            own_user="system:serviceaccount:keymount:keymount")


def binding(kind, name, role_kind, role, subjects, namespace=None):
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"kind": kind, "metadata": meta, "roleRef": {"kind": role_kind, "name": role},
            "subjects": subjects}


def role(name, rules, namespace=None):
    return {"metadata": {"name": name, **({"namespace": namespace} if namespace else {})},
            "rules": rules}


READ = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
EMPTY_RBAC = Rbac([], [], [], [])


def run(keyrings, rbac=EMPTY_RBAC, pods=(), writers=WRITERS, max_age=None):
    return [(f.kind, f.namespace, f.subject) for f in
            audit(keyrings, rbac=rbac, pods=pods, writers=writers, max_age=max_age, now=NOW)]


def test_a_clean_cluster_has_no_findings():
    assert run({"shop": keyring_of(key_secret("k1", random_key(), index=1))}) == []


def test_the_same_key_in_two_namespaces_is_a_finding():
    key = random_key()
    rings = {"shop": keyring_of(key_secret("a", key, index=1)),
             "bank": keyring_of(key_secret("b", key, index=1, namespace="bank"),
                                namespace="bank")}
    [(kind, namespaces, _)] = run(rings)
    assert kind == "reused-key" and namespaces == "bank,shop"


@pytest.mark.parametrize(("rules", "reads"), [
    (READ, True), ([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], True),
    ([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}], False),
    ([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}], False),
    ([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
       "resourceNames": ["other"]}], False),
    ([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"],
       "resourceNames": ["k1"]}], True),
], ids=["get-secrets", "wildcards", "create-only", "configmaps", "other-name", "this-name"])
def test_which_rules_read_key_secrets(rules, reads):
    assert reads_secrets(rules, {"k1"}) is reads


def test_a_rolebinding_granting_a_group_get_secrets_is_a_finding_and_expected_ones_are_not():
    rbac = Rbac(
        cluster_roles=[role("cluster-admin", READ), role("reader", READ)],
        cluster_role_bindings=[
            binding("ClusterRoleBinding", "admins", "ClusterRole", "cluster-admin",
                    [{"kind": "Group", "name": "platform-admins"}]),
            binding("ClusterRoleBinding", "controllers", "ClusterRole", "reader",
                    [{"kind": "User", "name": "system:kube-controller-manager"},
                     {"kind": "ServiceAccount", "namespace": "kube-system", "name": "x"},
                     {"kind": "ServiceAccount", "namespace": "keymount", "name": "keymount"},
                     {"kind": "Group", "name": "keymount:key-writers"}])],
        roles=[role("secret-reader", READ, "shop")],
        role_bindings=[binding("RoleBinding", "devs-read", "Role", "secret-reader",
                               [{"kind": "Group", "name": "developers"}], "shop"),
                       binding("RoleBinding", "elsewhere", "ClusterRole", "reader",
                               [{"kind": "User", "name": "eve"}], "bank")])
    findings = run({"shop": keyring_of(key_secret("k1", random_key(), index=1))}, rbac=rbac)
    assert findings == [("secret-reader", "shop", "group:developers")]


def test_unset_key_writers_an_overdue_key_a_stale_pod_and_a_legacy_key_are_findings():
    k1 = key_secret("k1", random_key(), index=1, created="2026-01-01T00:00:00Z")
    old = key_secret("old", random_key(), legacy=True, created="2025-01-01T00:00:00Z")
    ring = keyring_of(k1, old)
    stale = PodKeys("shop", "api-0", frozenset({("gone", "abcdef")}))
    current = PodKeys("shop", "api-1", frozenset((f.secret, f.fingerprint)
                                                 for f in ring.files))
    findings = run({"shop": ring}, pods=[stale, current], writers=parse_key_writers(None),
                   max_age=timedelta(days=90))
    assert sorted(kind for kind, _, _ in findings) == [
        "key-too-old", "key-writers-unset", "legacy-key", "stale-pod"]
    assert ("stale-pod", "shop", "api-0") in findings


def test_two_keys_sharing_a_number_are_a_finding_and_listed_as_duplicates():
    from webhook.lifecycle import build_key_rows
    ring = keyring_of(key_secret("a-key", random_key(), index=1, legacy=True),
                      key_secret("b-key", random_key(), index=1, legacy=True))
    assert ("duplicate-number", "shop", "a-key,b-key") in run({"shop": ring})
    states = {row.secret: row.state for row in build_key_rows(ring, now=NOW)}
    assert states == {"a-key": "duplicate", "b-key": "duplicate"}
