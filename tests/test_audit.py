"""`keymount audit` (pure): each kind of finding, each RBAC path to a namespace's keys,
and what is expected, not a finding."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from webhook.audit import Access, Finding, Grant, Rbac, audit, confirm, unlabelled_slots
from webhook.keyguard import parse_key_writers
from webhook.lifecycle import PodKeys
from webhook.selectors import parse_selector

from builders import key_secret, keyring_of, keys_sharing_a_fingerprint, random_key

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


def strongest(rules, *, cluster_wide=True):
    """(verb, resource) of the strongest path a role's rules give to key Secret k1."""
    rbac = Rbac([role("r", rules)], [], [], [])
    binding_ = binding("ClusterRoleBinding", "b", "ClusterRole", "r",
                       [{"kind": "User", "name": "eve"}])
    if cluster_wide:
        rbac = Rbac(rbac.cluster_roles, [binding_], [], [])
    else:
        rbac = Rbac(rbac.cluster_roles, [], [],
                    [{**binding_, "kind": "RoleBinding",
                      "metadata": {"name": "b", "namespace": "shop"}}])
    grants = [f.grant for f in audit({"shop": keyring_of(key_secret("k1", random_key(),
                                                                     index=1))},
                                     rbac=rbac, pods=(), writers=WRITERS, max_age=None,
                                     now=NOW) if f.grant]
    assert len(grants) <= 1
    return (grants[0].access.verb, grants[0].access.resource_text) if grants else None


def rule(verbs, resources, group="", names=None):
    return {"apiGroups": [group], "resources": resources, "verbs": verbs,
            **({"resourceNames": names} if names else {})}


WORKLOADS = [("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets"),
             ("apps", "replicasets"), ("batch", "jobs"), ("batch", "cronjobs"),
             ("", "replicationcontrollers")]


@pytest.mark.parametrize(("rules", "path"), [
    (READ, ("get", "secrets")),
    ([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], ("get", "secrets")),
    ([rule(["create"], ["secrets"])], None),
    ([rule(["get"], ["configmaps"])], None),
    ([rule(["get"], ["secrets"], names=["other"])], None),
    ([rule(["list"], ["secrets"], names=["k1"])], ("list", "secrets")),
    ([rule(["watch"], ["secrets"])], ("watch", "secrets")),
    ([rule(["patch"], ["secrets"])], ("patch", "secrets")),
    ([rule(["update"], ["secrets"], names=["k1"])], ("update", "secrets")),
    ([rule(["patch"], ["secrets"], names=["other"])], None),
    ([rule(["impersonate"], ["users"])], ("impersonate", "users")),
    ([rule(["impersonate"], ["groups"])], ("impersonate", "groups")),
    ([rule(["impersonate"], ["serviceaccounts"])], ("impersonate", "serviceaccounts")),
    ([rule(["impersonate"], ["users"], names=["alice"])], ("impersonate", "users")),
    ([rule(["create"], ["pods"])], ("create", "pods")),
    ([rule(["create"], ["pods"], names=["x"])], None),
    ([rule(["get", "list", "delete"], ["pods"])], None),
    *(([rule(["create"], [r], g)], ("create", f"{r}.{g}" if g else r)) for g, r in WORKLOADS),
    ([rule(["create"], ["deployments"])], None),  # the core group has no deployments
    ([rule(["create"], ["pods"]), rule(["patch"], ["secrets"])], ("patch", "secrets")),
], ids=["get-secrets", "wildcards", "create-secrets-only", "configmaps", "other-name",
        "list-this-name", "watch-secrets", "patch-secrets", "update-this-name",
        "patch-other-name", "impersonate-users", "impersonate-groups",
        "impersonate-serviceaccounts", "impersonate-one-user", "create-pods",
        "create-pods-by-name-never-matches", "read-pods", *(f"create-{r}" for _, r in WORKLOADS),
        "deployments-of-the-wrong-group", "the-strongest-path-is-named"])
def test_which_rules_reach_key_secrets_and_by_which_path(rules, path):
    assert strongest(rules) == path


TEMPLATES = [(g, r) for g, r in WORKLOADS if r != "jobs"]


@pytest.mark.parametrize(("rules", "path"), [
    ([rule(["create"], ["pods/exec"])], ("create", "pods/exec")),
    ([rule(["get"], ["pods/exec"])], ("get", "pods/exec")),  # exec over WebSocket
    ([rule(["create"], ["pods/attach"])], ("create", "pods/attach")),
    ([rule(["get"], ["pods/attach"])], ("get", "pods/attach")),
    ([rule(["create"], ["*/exec"])], ("create", "pods/exec")),
    ([rule(["create"], ["pods/exec"], names=["api-0"])], ("create", "pods/exec")),
    ([rule(["create", "get"], ["pods/log", "pods/portforward", "pods/status"])], None),
    ([rule(["create"], ["pods"])], ("create", "pods")),
    ([rule(["create"], ["pods", "pods/exec"])], ("create", "pods/exec")),
    ([rule(["patch"], ["pods"])], ("patch", "pods")),
    ([rule(["update"], ["pods"], names=["api-0"])], ("update", "pods")),
    ([rule(["patch"], ["pods/ephemeralcontainers"])], ("patch", "pods/ephemeralcontainers")),
    ([rule(["patch", "update"], ["pods/status", "pods/finalizers"])], None),
    ([rule(["get"], ["nodes/proxy"])], ("get", "nodes/proxy")),
    ([rule(["create"], ["nodes/proxy"])], ("create", "nodes/proxy")),
    ([rule(["get"], ["nodes", "nodes/stats", "nodes/log"])], None),
    *(([rule(["patch"], [r], g)], ("patch", f"{r}.{g}" if g else r)) for g, r in TEMPLATES),
    ([rule(["update"], ["deployments"], "apps", names=["api"])], ("update", "deployments.apps")),
    ([rule(["patch", "update"], ["jobs"], "batch")], None),
    ([rule(["patch", "update"], ["deployments/scale", "deployments/status"], "apps")], None),
    ([rule(["patch"], ["deployments"], "apps"), rule(["create"], ["pods"])], ("create", "pods")),
], ids=["exec", "exec-over-websocket", "attach", "attach-over-websocket",
        "exec-into-any-resource", "exec-into-named-pods", "logs-port-forward-status",
        "create-pods", "exec-is-stronger-than-creating-a-pod", "patch-pods-image",
        "update-named-pods", "ephemeral-containers", "status-and-finalizers",
        "node-proxy-get", "node-proxy-create", "node-reads", *(f"patch-{r}" for _, r in TEMPLATES),
        "update-named-deployment", "job-templates-cannot-change", "scale-and-status",
        "a-new-pod-is-stronger-than-a-template-change"])
def test_a_way_into_a_backend_pod_or_its_template_is_a_path_to_its_keys(rules, path):
    # A shell in a backend Pod, a new image or container in one, or a template that
    # makes Pods reads /encryption-keys as surely as a read of the Secret.
    assert strongest(rules) == path


RBAC_GROUP = "rbac.authorization.k8s.io"
HOOKS_GROUP = "admissionregistration.k8s.io"


@pytest.mark.parametrize(("rules", "path"), [
    ([rule(["create"], ["serviceaccounts/token"])], ("create", "serviceaccounts/token")),
    ([rule(["create"], ["serviceaccounts/token"], names=["api"])],
     ("create", "serviceaccounts/token")),
    ([rule(["create", "get"], ["serviceaccounts"])], None),
    ([rule(["bind"], ["clusterroles"], RBAC_GROUP), rule(["create"], ["rolebindings"], RBAC_GROUP)],
     ("bind", f"clusterroles.{RBAC_GROUP}")),
    ([rule(["bind"], ["roles"], RBAC_GROUP), rule(["patch"], ["rolebindings"], RBAC_GROUP)],
     ("bind", f"roles.{RBAC_GROUP}")),
    ([rule(["bind"], ["clusterroles"], RBAC_GROUP, names=["view"]),
      rule(["update"], ["clusterrolebindings"], RBAC_GROUP)],
     ("bind", f"clusterroles.{RBAC_GROUP}")),
    ([rule(["bind"], ["clusterroles", "roles"], RBAC_GROUP)], None),
    ([rule(["create", "update"], ["rolebindings", "clusterrolebindings"], RBAC_GROUP)], None),
    ([rule(["bind"], ["clusterroles"], RBAC_GROUP),
      rule(["create"], ["rolebindings"], RBAC_GROUP, names=["b"])], None),
    ([rule(["escalate", "update"], ["roles"], RBAC_GROUP)], ("escalate", f"roles.{RBAC_GROUP}")),
    ([rule(["escalate"], ["clusterroles"], RBAC_GROUP),
      rule(["patch"], ["clusterroles"], RBAC_GROUP)], ("escalate", f"clusterroles.{RBAC_GROUP}")),
    ([rule(["escalate"], ["roles", "clusterroles"], RBAC_GROUP)], None),
    ([rule(["escalate"], ["roles"], RBAC_GROUP), rule(["update"], ["clusterroles"], RBAC_GROUP)],
     None),
    ([rule(["create"], ["mutatingwebhookconfigurations"], HOOKS_GROUP)],
     ("create", f"mutatingwebhookconfigurations.{HOOKS_GROUP}")),
    ([rule(["patch"], ["validatingwebhookconfigurations"], HOOKS_GROUP, names=["keymount"])],
     ("patch", f"validatingwebhookconfigurations.{HOOKS_GROUP}")),
    ([rule(["get", "list", "delete"], ["mutatingwebhookconfigurations"], HOOKS_GROUP)], None),
    ([rule(["*"], ["*"], RBAC_GROUP)], ("bind", f"clusterroles.{RBAC_GROUP}")),
    ([rule(["bind"], ["roles"], RBAC_GROUP), rule(["create"], ["rolebindings"], RBAC_GROUP),
      rule(["get"], ["secrets"])], ("get", "secrets")),
], ids=["token-request", "token-for-named-accounts", "service-accounts-themselves",
        "bind-cluster-roles-and-create-bindings", "bind-roles-and-patch-bindings",
        "bind-named-role-and-update-cluster-bindings", "bind-without-writing-bindings",
        "write-bindings-without-bind", "create-named-bindings-never-matches",
        "escalate-and-update-roles", "escalate-and-patch-cluster-roles",
        "escalate-without-writing-roles", "escalate-roles-but-write-cluster-roles",
        "create-mutating-webhook", "patch-named-validating-webhook", "read-or-delete-webhooks",
        "everything-in-rbac", "reading-the-keys-is-stronger"])
def test_rewriting_rbac_or_admission_or_taking_a_token_is_a_path_to_its_keys(rules, path):
    # RBAC refuses a binding to a role, or a role, with permissions the writer does not
    # hold, except with bind or escalate; a token acts as its service account; an
    # admission webhook of one's own is sent every key Secret as it is written.
    assert strongest(rules) == path


@pytest.mark.parametrize(("rules", "path"), [
    ([rule(["create"], ["serviceaccounts/token"])], ("create", "serviceaccounts/token")),
    ([rule(["bind"], ["clusterroles"], RBAC_GROUP), rule(["create"], ["rolebindings"], RBAC_GROUP)],
     ("bind", f"clusterroles.{RBAC_GROUP}")),
    ([rule(["bind"], ["clusterroles"], RBAC_GROUP),
      rule(["create"], ["clusterrolebindings"], RBAC_GROUP)], None),
    ([rule(["escalate", "update"], ["roles"], RBAC_GROUP)], ("escalate", f"roles.{RBAC_GROUP}")),
    ([rule(["escalate", "update"], ["clusterroles"], RBAC_GROUP)], None),
    ([rule(["create"], ["mutatingwebhookconfigurations"], HOOKS_GROUP)], None),
], ids=["token-request", "bind-and-create-rolebindings", "cluster-bindings-need-a-cluster-grant",
        "escalate-roles", "cluster-roles-need-a-cluster-grant", "webhooks-are-cluster-scoped"])
def test_a_rolebinding_grants_rewriting_only_its_namespaces_rbac(rules, path):
    assert strongest(rules, cluster_wide=False) == path


def test_only_a_clusterrolebinding_grants_the_node_proxy():
    assert strongest([rule(["get"], ["nodes/proxy"])], cluster_wide=False) is None


@pytest.mark.parametrize(("resource", "path"), [
    ("users", None), ("groups", None),
    ("serviceaccounts", ("impersonate", "serviceaccounts"))],
    ids=["users", "groups", "serviceaccounts"])
def test_a_rolebinding_grants_impersonating_only_its_namespaces_service_accounts(
        resource, path):
    assert strongest([rule(["impersonate"], [resource])], cluster_wide=False) == path


def bound_reader(subject, *, role_name="reader", cluster_wide=True):
    """The secret-reader findings of one subject bound to a role that reads Secrets."""
    roles = [role("reader", READ), role("cluster-admin", READ)]
    made = binding("ClusterRoleBinding" if cluster_wide else "RoleBinding", "b",
                   "ClusterRole", role_name, [subject],
                   None if cluster_wide else "shop")
    rbac = Rbac(roles, [made] if cluster_wide else [], [], [] if cluster_wide else [made])
    return run({"shop": keyring_of(key_secret("k1", random_key(), index=1))}, rbac=rbac)


@pytest.mark.parametrize("subject", [
    {"kind": "Group", "name": "system:authenticated"},
    {"kind": "Group", "name": "system:unauthenticated"},
    {"kind": "Group", "name": "system:serviceaccounts"},
    {"kind": "Group", "name": "system:serviceaccounts:shop"},
    {"kind": "Group", "name": "system:serviceaccounts:kube-system"},
    {"kind": "User", "name": "system:eve"},
    {"kind": "ServiceAccount", "namespace": "kube-system", "name": "anything"},
    {"kind": "User", "name": "system:serviceaccount:kube-system:anything"},
], ids=["authenticated", "unauthenticated", "every-service-account",
        "a-namespaces-service-accounts", "kube-systems-service-accounts", "system-eve",
        "a-kube-system-service-account", "a-service-account-as-user"])
def test_a_system_name_is_no_longer_expected_by_its_prefix(subject):
    assert [kind for kind, _, _ in bound_reader(subject)] == ["secret-reader"]


@pytest.mark.parametrize("subject", [
    {"kind": "Group", "name": "system:masters"},
    {"kind": "User", "name": "system:kube-controller-manager"},
    {"kind": "ServiceAccount", "namespace": "kube-system", "name": "namespace-controller"},
    {"kind": "User", "name": "system:serviceaccount:kube-system:namespace-controller"},
    {"kind": "ServiceAccount", "namespace": "kube-system", "name": "replicaset-controller"},
    {"kind": "ServiceAccount", "namespace": "keymount", "name": "keymount"},
    {"kind": "Group", "name": "keymount:key-writers"},
], ids=["masters", "controller-manager", "namespace-controller",
        "namespace-controller-as-user", "replicaset-controller", "keymount-itself",
        "key-writers"])
def test_precisely_named_readers_are_expected(subject):
    assert bound_reader(subject) == []


@pytest.mark.parametrize(("cluster_wide", "found"), [(True, []), (False, ["secret-reader"])],
                         ids=["clusterrolebinding-a-cluster-admin",
                              "rolebinding-a-namespace-admin"])
def test_cluster_admin_bound_cluster_wide_is_expected_and_in_a_namespace_is_not(
        cluster_wide, found):
    findings = bound_reader({"kind": "User", "name": "ann"}, role_name="cluster-admin",
                            cluster_wide=cluster_wide)
    assert [kind for kind, _, _ in findings] == found


def aggregated(selector):
    return {"metadata": {"name": "agg"}, "rules": [],
            "aggregationRule": {"clusterRoleSelectors": [selector]}}


@pytest.mark.parametrize(("selector", "found"), [
    ({"matchLabels": {"team/read": "true"}}, True),
    ({"matchLabels": {"team/read": "false"}}, False),
    ({"matchExpressions": [{"key": "team/read", "operator": "In", "values": ["true"]}]}, True),
    ({"matchExpressions": [{"key": "team/read", "operator": "NotIn", "values": ["true"]}]},
     False),
    ({"matchExpressions": [{"key": "team/read", "operator": "Exists"}]}, True),
    ({"matchExpressions": [{"key": "team/read", "operator": "DoesNotExist"}]}, False),
], ids=["match-labels", "other-value", "in", "not-in", "exists", "does-not-exist"])
def test_an_aggregated_cluster_role_reads_what_the_roles_it_selects_read(selector, found):
    piece = {**role("piece", READ), "metadata": {"name": "piece",
                                                  "labels": {"team/read": "true"}}}
    rbac = Rbac([aggregated(selector), piece],
                [binding("ClusterRoleBinding", "b", "ClusterRole", "agg",
                         [{"kind": "Group", "name": "auditors"}])], [], [])
    findings = audit({"shop": keyring_of(key_secret("k1", random_key(), index=1))},
                     rbac=rbac, pods=(), writers=WRITERS, max_age=None, now=NOW)
    assert [(f.subject, f.grant.role) for f in findings] == \
        ([("group:auditors", "ClusterRole agg")] if found else [])


def test_a_finding_names_subject_verb_binding_and_role_in_a_stable_json_shape():
    grant = Grant("group:system:authenticated", Access("create", "apps", "deployments", "shop"),
                  "ClusterRoleBinding open", "ClusterRole deployer")
    [finding] = confirm([Finding("secret-reader", "shop", grant.subject, "d", grant)],
                        {grant: True})
    assert finding.as_dict() == {
        "kind": "secret-reader", "namespace": "shop", "subject": "group:system:authenticated",
        "detail": "d", "confirmed": True,
        "path": {"verb": "create", "group": "apps", "resource": "deployments", "name": "",
                 "binding": "ClusterRoleBinding open", "role": "ClusterRole deployer"}}
    unasked = confirm([Finding("secret-reader", "shop", grant.subject, "d", grant)], {})
    assert unasked[0].as_dict()["confirmed"] is None
    other = Finding("legacy-key", "shop", "old", "d").as_dict()
    assert other["path"] is None and other["confirmed"] is None


@pytest.mark.parametrize(("name", "labels", "found"), [
    ("keymount-key-3", {}, True),
    ("keymount-key-3", {"app": "x"}, True),
    ("keymount-key-3", {"keymount.io/encryption-key": "true"}, False),
    ("keymount-key-0", {}, False),
    ("keymount-key-x", {}, False),
    ("my-secret", {}, False),
], ids=["unlabelled", "other-labels", "a-key-slot", "number-0", "not-a-number",
        "another-name"])
def test_an_unlabelled_secret_under_a_slot_name_is_a_finding(name, labels, found):
    meta = {"metadata": {"namespace": "shop", "name": name, "labels": labels}}
    unlabelled = unlabelled_slots([meta], key_selector=parse_selector(
        "keymount.io/encryption-key=true"))
    findings = audit({}, rbac=None, pods=(), writers=WRITERS, max_age=None, now=NOW,
                     unlabelled=unlabelled)
    assert [(f.kind, f.subject) for f in findings] == \
        ([("unlabelled-slot", name)] if found else [])


@pytest.mark.parametrize(("subject", "who"), [
    ("user:eve", {"user": "eve"}),
    ("group:system:authenticated", {"groups": ["system:authenticated"]}),
    ("serviceaccount:shop:api", {"user": "system:serviceaccount:shop:api"}),
], ids=["user", "group", "serviceaccount"])
def test_the_access_review_asks_for_the_subject_and_the_path(subject, who):
    from webhook.cluster import access_review
    grant = Grant(subject, Access("get", "", "secrets", "shop", "k1"), "b", "r")
    spec = access_review(grant)["spec"]
    assert spec == {**who, "resourceAttributes": {
        "verb": "get", "group": "", "resource": "secrets", "namespace": "shop",
        "name": "k1"}}


def test_the_access_review_names_a_subresource_apart():
    from webhook.cluster import access_review
    grant = Grant("user:eve", Access("create", "", "pods/exec", "shop"), "b", "r")
    assert access_review(grant)["spec"]["resourceAttributes"] == {
        "verb": "create", "group": "", "resource": "pods", "subresource": "exec",
        "namespace": "shop", "name": ""}


def test_a_rolebinding_granting_a_group_get_secrets_is_a_finding_and_expected_ones_are_not():
    rbac = Rbac(
        cluster_roles=[role("cluster-admin", READ), role("reader", READ)],
        cluster_role_bindings=[
            binding("ClusterRoleBinding", "admins", "ClusterRole", "cluster-admin",
                    [{"kind": "Group", "name": "platform-admins"}]),
            binding("ClusterRoleBinding", "controllers", "ClusterRole", "reader",
                    [{"kind": "User", "name": "system:kube-controller-manager"},
                     {"kind": "ServiceAccount", "namespace": "kube-system",
                      "name": "namespace-controller"},
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


class FakeAuditKeys:
    """The KeyApi calls `audit` makes: one key, one grant to system:authenticated, one
    unlabelled slot name; the API server's answers are given."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def key_records(self, namespace):
        return list(keyring_of(key_secret("k1", random_key(), index=1)).keys)

    def backend_pods(self, namespace):
        return []

    def slot_named_secrets(self, namespace):
        return [{"metadata": {"namespace": "shop", "name": "keymount-key-9"}}]

    def rbac(self, namespace):
        return Rbac([role("reader", READ)], [binding(
            "ClusterRoleBinding", "open", "ClusterRole", "reader",
            [{"kind": "Group", "name": "system:authenticated"}])], [], [])

    def confirm(self, grants):
        self.asked += grants
        return {g: self.answers for g in grants} if self.answers is not None else {}


@pytest.mark.parametrize(("answer", "shown"), [
    (True, "[API server: allowed]"), (False, "[API server: not allowed]"), (None, "")],
    ids=["allowed", "not-allowed", "not-asked"])
def test_audit_command_asks_the_api_server_and_exits_1(monkeypatch, capsys, answer, shown):
    from webhook import cli, cli_keys
    keys = FakeAuditKeys(answer)
    monkeypatch.setattr(cli_keys, "connect", lambda args, settings: (keys, "shop"))
    common = ["--own-user", "keymount", "--key-writers", "group:system:masters"]
    assert cli.main(["audit", "-n", "shop", "-o", "json", *common]) == 1
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert ("1 RBAC path(s) not confirmed" in err) is (answer is None)
    assert [(r["kind"], r["subject"], r["confirmed"]) for r in rows] == [
        ("secret-reader", "group:system:authenticated", answer),
        ("unlabelled-slot", "keymount-key-9", None)]
    assert [g.subject for g in keys.asked] == ["group:system:authenticated"]
    assert cli.main(["audit", "-n", "shop", *common]) == 1
    table = capsys.readouterr().out
    assert "get secrets through ClusterRoleBinding open -> ClusterRole reader" in table
    assert (shown in table) if shown else "API server" not in table


@pytest.mark.parametrize("command", [["keys", "list", "-n", "shop"], ["status", "-n", "shop"]],
                         ids=["keys-list", "status"])
def test_keys_list_and_status_warn_of_an_unlabelled_slot_name(monkeypatch, capsys, command):
    from webhook import cli, cli_keys
    monkeypatch.setattr(cli_keys, "connect", lambda args, settings: (FakeAuditKeys(None),
                                                                     "shop"))
    assert cli.main(command) == 0
    err = capsys.readouterr().err
    assert "Secret 'keymount-key-9' in namespace 'shop' has a key slot's name" in err
    assert "kubectl delete secret keymount-key-9 -n shop" in err


def test_two_different_keys_that_share_a_fingerprint_are_not_a_reused_key():
    """A fingerprint is 3 bytes: among 5,000 keys two share one more often than not, and
    at 50,000 (10,000 namespaces of 5 keys) some 75 pairs do. Only the same bytes in two
    namespaces are a reused key."""
    import hashlib

    key, other = keys_sharing_a_fingerprint()
    rings = {"shop": keyring_of(key_secret("a", key, index=1)),
             "bank": keyring_of(key_secret("b", other, index=1, namespace="bank"),
                                namespace="bank")}
    ids = {("shop", "a"): hashlib.sha256(key).digest(),
           ("bank", "b"): hashlib.sha256(other).digest()}
    assert [f.kind for f in audit(rings, rbac=EMPTY_RBAC, pods=(), writers=WRITERS,
                                  max_age=None, now=NOW, key_ids=ids)] == []
    same = {**ids, ("bank", "b"): ids[("shop", "a")]}
    assert [f.kind for f in audit(rings, rbac=EMPTY_RBAC, pods=(), writers=WRITERS,
                                  max_age=None, now=NOW, key_ids=same)] == ["reused-key"]
