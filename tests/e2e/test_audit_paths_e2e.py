"""`keymount audit` against the real API server: each RBAC path to a namespace's keys
is a finding naming the subject, the verb and resource, the binding and the role, and
the API server's own SubjectAccessReview confirms it; an unlabelled Secret under a key
slot's name is a finding; the bootstrap controllers are expected, by name.

One namespace holds every grant, each to its own subject through its own binding, and
one audit reads them all (the machine is shared): each case below checks its binding.
"""

from __future__ import annotations

import json

import pytest
import yaml

from apihelpers import create_key, keymount_cli
from conftest import KEY_WRITERS, kubectl

RBAC = "rbac.authorization.k8s.io"


def role(kind: str, name: str, rules: list, namespace: str | None = None,
         **extra) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": meta, "rules": rules,
            **extra}


def bind(kind: str, name: str, role_kind: str, role_name: str, subject: dict,
         namespace: str | None = None) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    if subject["kind"] != "ServiceAccount":
        subject = {"apiGroup": RBAC, **subject}
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": meta,
            "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role_name},
            "subjects": [subject]}


def rule(verbs, resources, group=""):
    return {"apiGroups": [group], "resources": resources, "verbs": verbs}


WORKLOADS = [("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets"),
             ("apps", "replicasets"), ("batch", "jobs"), ("batch", "cronjobs"),
             ("", "replicationcontrollers")]
READ_KEYS = [rule(["get"], ["secrets"])]

# binding name -> (subject, rules of its Role in the namespace, verb, resource): a
# RoleBinding of the audited namespace, so nothing leaks to other tests.
NAMESPACED = {
    "authenticated": ({"kind": "Group", "name": "system:authenticated"}, READ_KEYS,
                      "get", "secrets"),
    "unauthenticated": ({"kind": "Group", "name": "system:unauthenticated"}, READ_KEYS,
                        "get", "secrets"),
    "all-serviceaccounts": ({"kind": "Group", "name": "system:serviceaccounts"}, READ_KEYS,
                            "get", "secrets"),
    "ns-serviceaccounts": ({"kind": "Group", "name": "system:serviceaccounts:NS"},
                           READ_KEYS, "get", "secrets"),
    "system-eve": ({"kind": "User", "name": "system:eve"}, READ_KEYS, "get", "secrets"),
    "patcher": ({"kind": "User", "name": "patcher"}, [rule(["patch"], ["secrets"])],
                "patch", "secrets"),
    "updater": ({"kind": "User", "name": "updater"}, [rule(["update"], ["secrets"])],
                "update", "secrets"),
    "sa-impersonator": ({"kind": "User", "name": "sa-impersonator"},
                        [rule(["impersonate"], ["serviceaccounts"])],
                        "impersonate", "serviceaccounts"),
    "pod-maker": ({"kind": "User", "name": "pod-maker"}, [rule(["create"], ["pods"])],
                  "create", "pods"),
    **{f"{resource}-maker": ({"kind": "User", "name": f"{resource}-maker"},
                             [rule(["create"], [resource], group)], "create", resource)
       for group, resource in WORKLOADS},
    # Into a running backend Pod, or a change that runs other code with its keys.
    "execer": ({"kind": "User", "name": "execer"}, [rule(["create"], ["pods/exec"])],
               "create", "pods/exec"),
    "websocket-execer": ({"kind": "User", "name": "websocket-execer"},
                         [rule(["get"], ["pods/exec"])], "get", "pods/exec"),
    "attacher": ({"kind": "User", "name": "attacher"}, [rule(["create"], ["pods/attach"])],
                 "create", "pods/attach"),
    "image-changer": ({"kind": "User", "name": "image-changer"}, [rule(["patch"], ["pods"])],
                      "patch", "pods"),
    "debugger": ({"kind": "User", "name": "debugger"},
                 [rule(["update"], ["pods/ephemeralcontainers"])],
                 "update", "pods/ephemeralcontainers"),
    "template-changer": ({"kind": "User", "name": "template-changer"},
                         [rule(["patch"], ["deployments"], "apps")], "patch", "deployments"),
    # A token acts as its service account; bind or escalate with a write of bindings or
    # roles grants anything (RBAC refuses both writes without them).
    "token-requester": ({"kind": "User", "name": "token-requester"},
                        [rule(["create"], ["serviceaccounts/token"])],
                        "create", "serviceaccounts/token"),
    "binder": ({"kind": "User", "name": "binder"},
               [rule(["bind"], ["clusterroles"], RBAC), rule(["create"], ["rolebindings"], RBAC)],
               "bind", "clusterroles"),
    "escalator": ({"kind": "User", "name": "escalator"},
                  [rule(["escalate", "update"], ["roles"], RBAC)], "escalate", "roles"),
}
# Through ClusterRoleBindings (users and groups are cluster-scoped: only they grant
# impersonating them), named per run and deleted with the module.
CLUSTER_WIDE = {
    "user-impersonator": ({"kind": "User", "name": "user-impersonator"},
                          [rule(["impersonate"], ["users"])], "impersonate", "users"),
    "group-impersonator": ({"kind": "User", "name": "group-impersonator"},
                           [rule(["impersonate"], ["groups"])], "impersonate", "groups"),
    # The kubelet's API execs into any Pod of its node.
    "node-proxy": ({"kind": "User", "name": "node-proxy"}, [rule(["get"], ["nodes/proxy"])],
                   "get", "nodes/proxy"),
    # A webhook of one's own is sent every key Secret as it is written.
    "webhook-maker": ({"kind": "User", "name": "webhook-maker"},
                      [rule(["create"], ["mutatingwebhookconfigurations"],
                            "admissionregistration.k8s.io")],
                      "create", "mutatingwebhookconfigurations"),
    "cluster-escalator": ({"kind": "User", "name": "cluster-escalator"},
                          [rule(["escalate", "patch"], ["clusterroles"], RBAC)],
                          "escalate", "clusterroles"),
}


@pytest.fixture(scope="module")
def audited(api, keymount, admin_kubeconfig):
    """A namespace with a key and every grant above; its audit as JSON, and exit code."""
    cfg = admin_kubeconfig
    ns = "audit-paths"
    api.create_namespace({"metadata": {"name": ns}})
    create_key(api, ns, "k1")
    objects = []
    for name, (subject, rules, _, _) in NAMESPACED.items():
        subject = {**subject, "name": subject["name"].replace("NS", ns)}
        objects += [role("Role", name, rules, ns), bind("RoleBinding", name, "Role", name,
                                                        subject, ns)]
    cluster = []
    for name, (subject, rules, _, _) in CLUSTER_WIDE.items():
        cluster += [role("ClusterRole", f"{ns}-{name}", rules),
                    bind("ClusterRoleBinding", f"{ns}-{name}", "ClusterRole", f"{ns}-{name}",
                         subject)]
    # An aggregated ClusterRole: its own rules are empty, kube-controller-manager (not
    # running here) would fill them in from the role its selector picks.
    label = {"keymount-e2e/aggregate-to-auditors": "true"}
    cluster += [role("ClusterRole", f"{ns}-piece", READ_KEYS)
                | {"metadata": {"name": f"{ns}-piece", "labels": label}},
                role("ClusterRole", f"{ns}-auditors", [],
                     aggregationRule={"clusterRoleSelectors": [{"matchLabels": label}]})]
    objects.append(bind("RoleBinding", "aggregated", "ClusterRole", f"{ns}-auditors",
                        {"kind": "Group", "name": "auditors"}, ns))
    # A Secret under a key slot's name, without the key label (as if made while
    # keymount's webhooks were not there: they do not see unlabelled Secrets).
    api.create_namespaced_secret(ns, {"metadata": {"name": "keymount-key-7"},
                                      "data": {"encryption-key": "QUFBQQ=="}})
    kubectl(cfg, "apply", "-f", "-", stdin=yaml.safe_dump_all(cluster + objects))
    try:
        result = keymount_cli(cfg, "audit", "-n", ns, "-o", "json", "--own-user", "keymount",
                              "--key-writers", KEY_WRITERS, check=False)
        assert result.stdout, result.stderr
        yield ns, json.loads(result.stdout), result.returncode
    finally:
        kubectl(cfg, "delete", "-f", "-", "--ignore-not-found", stdin=yaml.safe_dump_all(cluster))
        api.delete_namespace(ns)


def finding_of(findings: list, binding: str) -> dict:
    [found] = [f for f in findings if f["path"] and f["path"]["binding"] == binding]
    return found


@pytest.mark.parametrize("name", list(NAMESPACED), ids=list(NAMESPACED))
def test_each_namespaced_grant_is_a_confirmed_finding_naming_its_path(audited, name):
    ns, findings, code = audited
    subject, _, verb, resource = NAMESPACED[name]
    found = finding_of(findings, f"RoleBinding {ns}/{name}")
    kind = {"Group": "group", "User": "user"}[subject["kind"]]
    assert found["subject"] == f"{kind}:{subject['name'].replace('NS', ns)}"
    assert (found["kind"], found["namespace"]) == ("secret-reader", ns)
    assert (found["path"]["verb"], found["path"]["resource"], found["path"]["role"]) == \
        (verb, resource, f"Role {name}")
    assert found["confirmed"] is True  # the API server's SubjectAccessReview agrees
    assert code == 1


@pytest.mark.parametrize("name", list(CLUSTER_WIDE), ids=list(CLUSTER_WIDE))
def test_each_cluster_wide_grant_is_a_confirmed_finding(audited, name):
    ns, findings, _ = audited
    subject, _, verb, resource = CLUSTER_WIDE[name]
    found = finding_of(findings, f"ClusterRoleBinding {ns}-{name}")
    assert found["subject"] == f"user:{subject['name']}"
    assert (found["path"]["verb"], found["path"]["resource"]) == (verb, resource)
    assert found["confirmed"] is True


def test_an_aggregated_cluster_role_is_read_with_the_rules_it_selects(audited):
    ns, findings, _ = audited
    found = finding_of(findings, f"RoleBinding {ns}/aggregated")
    assert found["subject"] == "group:auditors"
    assert (found["path"]["verb"], found["path"]["role"]) == ("get", f"ClusterRole {ns}-auditors")
    # Without kube-controller-manager the API server has not filled the role in yet:
    # audit reports what the role will grant, and says the server does not allow it yet.
    assert found["confirmed"] is False


def test_an_unlabelled_secret_under_a_slot_name_is_a_finding(audited, admin_kubeconfig):
    ns, findings, _ = audited
    assert [(f["namespace"], f["subject"]) for f in findings
            if f["kind"] == "unlabelled-slot"] == [(ns, "keymount-key-7")]
    listed = keymount_cli(admin_kubeconfig, "keys", "list", "-n", ns)
    assert f"Secret 'keymount-key-7' in namespace '{ns}' has a key slot's name" in \
        listed.stderr


def test_kubernetes_controllers_and_cluster_admins_are_expected_by_name(audited):
    """The bootstrap policy's controllers read Secrets and make Pods in every namespace;
    named, they are no finding, and neither are system:masters, keymount or the writers."""
    _, findings, _ = audited
    bootstrap = [f["subject"] for f in findings if f["path"] and
                 f["path"]["binding"].startswith(("ClusterRoleBinding system:",
                                                  "ClusterRoleBinding cluster-admin"))]
    assert bootstrap == []


def test_audit_reads_slot_named_secrets_without_their_data(audited, admin_kubeconfig):
    """Only metadata crosses the wire (PartialObjectMetadata): audit never holds the
    bytes of a Secret it merely checks the name and labels of."""
    from webhook.cluster import KeyClient
    from webhook.config import Settings
    ns, _, _ = audited
    client = KeyClient.from_kubeconfig(kubeconfig=str(admin_kubeconfig), context=None,
                                       settings=Settings())
    items = client.slot_named_secrets(ns)
    assert [i["metadata"]["name"] for i in items] == ["keymount-key-7"]
    assert [i.get("kind") for i in items] == ["PartialObjectMetadata"]
    assert "data" not in items[0]


def test_a_user_who_may_not_ask_the_api_server_gets_unconfirmed_findings_and_a_warning(
        audited, admin_kubeconfig, user_kubeconfig):
    """mallory may read RBAC, Secrets and Pods but not create SubjectAccessReviews."""
    ns, _, _ = audited
    cfg = admin_kubeconfig
    reader = [role("ClusterRole", f"{ns}-rbac-reader", [rule(
                  ["list"], ["roles", "rolebindings", "clusterroles", "clusterrolebindings"],
                  RBAC)]),
              bind("ClusterRoleBinding", f"{ns}-rbac-reader", "ClusterRole",
                   f"{ns}-rbac-reader", {"kind": "User", "name": "mallory"})]
    kubectl(cfg, "apply", "-f", "-", stdin=yaml.safe_dump_all(reader))
    try:
        result = keymount_cli(user_kubeconfig("mallory"), "audit", "-n", ns, "-o", "json",
                              "--own-user", "keymount", "--key-writers", KEY_WRITERS,
                              check=False)
    finally:
        kubectl(cfg, "delete", "-f", "-", stdin=yaml.safe_dump_all(reader))
    assert result.returncode == 1, result.stderr
    findings = json.loads(result.stdout)
    assert finding_of(findings, f"RoleBinding {ns}/pod-maker")["confirmed"] is None
    assert "not confirmed by a SubjectAccessReview" in result.stderr
