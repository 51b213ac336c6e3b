"""`keymount audit`: what a security team asks before it trusts a key service (pure).

Findings: one key (by fingerprint) in more than one namespace; subjects that can reach
a namespace's keys through RBAC (read or patch its key Secrets, impersonate or take a
service account's token, rewrite RBAC with bind or escalate, write admission webhooks,
exec or attach into its Pods, change a running Pod, create Pods or what makes Pods,
change a pod template; cluster admins, the named Kubernetes controllers, keymount
itself and the key writers are expected, not findings); key writers unset; a namespace
whose newest key is older than --max-key-age; backend Pods on a stale key set; keys
made before keymount numbered them; a Secret without the key label under a key slot's
name. Any finding makes the command exit 1, so CI can gate on it. The CLI confirms each
RBAC path with a SubjectAccessReview (`confirm`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from .keyguard import KeyWriters, Requester
from .keys import Keyring, describe_conflict
from .lifecycle import PodKeys, build_pod_key_state, newest_key_too_old
from .names import slot_number
from .selectors import Selector

# --- who can reach a namespace's keys through RBAC --------------------------------------
#
# Reading a key Secret is one way to its bytes; these are the others RBAC grants
# (docs/operations.md, "Audit"), strongest first: the first one a binding grants is the
# path a finding names.
READ_VERBS = ("get", "list", "watch")
# A dryRun=All patch or update answers with the whole Secret, key field included.
WRITE_VERBS = ("patch", "update")
# A Pod can mount any Secret of its namespace; these create Pods from a template.
POD_MAKERS: tuple[tuple[str, str], ...] = (
    ("", "pods"), ("apps", "deployments"), ("apps", "statefulsets"),
    ("apps", "daemonsets"), ("apps", "replicasets"), ("batch", "jobs"),
    ("batch", "cronjobs"), ("", "replicationcontrollers"))
# Impersonating a subject that may read is reading; users and groups are cluster-scoped,
# so only a ClusterRoleBinding grants impersonating them.
IMPERSONATED = ("users", "groups", "serviceaccounts")
# A shell in a running backend Pod reads /encryption-keys: exec and attach are POSTs
# (create), and GETs (get) when the client speaks WebSocket.
INTO_PODS: tuple[tuple[str, str], ...] = tuple(
    (verb, resource) for resource in ("pods/exec", "pods/attach") for verb in ("create", "get"))
# The kubelet's own API, reached through the API server's node proxy, execs into any
# Pod of the node; nodes are cluster-scoped, so only a ClusterRoleBinding grants it.
NODE_PROXY: tuple[tuple[str, str], ...] = (("get", "nodes/proxy"), ("create", "nodes/proxy"))
# A running Pod's container image may be changed (the new image runs with the keys
# mounted), and an ephemeral container may mount the Pod's volumes.
CHANGE_PODS: tuple[tuple[str, str], ...] = tuple(
    (verb, resource) for resource in ("pods", "pods/ephemeralcontainers")
    for verb in ("patch", "update"))
# A changed pod template makes Pods from it. A Job's template cannot change after it is
# created (the API server refuses it), so jobs are not here.
TEMPLATE_CHANGERS: tuple[tuple[str, str], ...] = tuple(
    (group, resource) for group, resource in POD_MAKERS if resource not in ("pods", "jobs"))

# A token for a service account of the namespace (TokenRequest, as the kubelet asks
# for its Pods') acts as that service account: impersonating it.
TOKEN_REQUEST = ("create", "serviceaccounts/token")
# RBAC refuses a binding to a role, or a role, that grants more than its writer holds,
# unless the writer may `bind` that role or `escalate` (RBAC's privilege-escalation
# prevention): with either and a write of bindings or roles, a subject may grant itself
# any path here. Roles and bindings of a namespace through either binding kind; cluster
# ones through a ClusterRoleBinding only (they are cluster-scoped).
RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_WRITES = ("create", "update", "patch")
ROLE_KINDS = ("clusterroles", "roles")  # a ClusterRole (cluster-admin) first
# An admission webhook of one's own is sent each key Secret as it is written, and a
# changed keymount configuration stops its checks; cluster-scoped.
HOOKS_GROUP = "admissionregistration.k8s.io"
WEBHOOK_CONFIGS = ("mutatingwebhookconfigurations", "validatingwebhookconfigurations")

# Expected readers, each named precisely (never a prefix: `system:eve` is anyone's name).
CLUSTER_ADMIN_ROLE = "cluster-admin"  # bound cluster-wide: a cluster admin
CLUSTER_ADMIN_GROUP = "group:system:masters"
# Kubernetes' own controllers whose bootstrap roles reach Secrets or make Pods (the
# default policy of kube-apiserver; kube-controller-manager runs each controller as
# kube-system's service account of that name with --use-service-account-credentials).
KUBERNETES_CONTROLLERS = frozenset({
    "user:system:kube-controller-manager",
    *(f"serviceaccount:kube-system:{name}" for name in (
        "namespace-controller", "generic-garbage-collector", "resourcequota-controller",
        "expand-controller", "persistent-volume-binder", "replicaset-controller",
        "replication-controller", "job-controller", "cronjob-controller",
        "daemon-set-controller", "statefulset-controller", "deployment-controller",
        "bootstrap-signer", "token-cleaner",
        # escalate and update on clusterroles: it writes aggregated roles' rules
        "clusterrole-aggregation-controller",
        "legacy-service-account-token-cleaner")),
})
SERVICE_ACCOUNT_USER = "system:serviceaccount:"


@dataclass(frozen=True, slots=True)
class Access:
    """One request that reaches a namespace's keys: the SubjectAccessReview to confirm it."""

    verb: str
    group: str
    resource: str
    namespace: str  # "" for a cluster-scoped resource (users, groups)
    name: str = ""  # a resourceName the rule is limited to, else any

    @property
    def resource_text(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource


@dataclass(frozen=True, slots=True)
class Grant:
    """A subject's path to a namespace's keys: the access, and the binding and role."""

    subject: str  # user:NAME | group:NAME | serviceaccount:NS:NAME
    access: Access
    binding: str  # "ClusterRoleBinding NAME" or "RoleBinding NS/NAME"
    role: str  # "ClusterRole NAME" or "Role NAME"

    def describe(self) -> str:
        named = f" {self.access.name}" if self.access.name else ""
        return (f"{self.access.verb} {self.access.resource_text}{named} through "
                f"{self.binding} -> {self.role}")


@dataclass(frozen=True, slots=True)
class Finding:
    # reused-key | secret-reader | key-writers-unset | key-too-old | stale-pod | legacy-key
    # | duplicate-number | unlabelled-slot
    kind: str
    namespace: str
    subject: str
    detail: str
    grant: Grant | None = None  # secret-reader: the path
    # secret-reader: what the API server's SubjectAccessReview answered (None: not asked)
    confirmed: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stable `-o json` form (docs/operations.md, "Audit")."""
        path = None if self.grant is None else {
            "verb": self.grant.access.verb, "group": self.grant.access.group,
            "resource": self.grant.access.resource, "name": self.grant.access.name,
            "binding": self.grant.binding, "role": self.grant.role}
        return {"kind": self.kind, "namespace": self.namespace or "*",
                "subject": self.subject, "detail": self.detail, "path": path,
                "confirmed": self.confirmed}


@dataclass(frozen=True, slots=True)
class Rbac:
    """The RBAC objects of the cluster, as the API returns them (dicts)."""

    cluster_roles: Sequence[Mapping[str, Any]]
    cluster_role_bindings: Sequence[Mapping[str, Any]]
    roles: Sequence[Mapping[str, Any]]
    role_bindings: Sequence[Mapping[str, Any]]


def _has(values: Any, wanted: str) -> bool:
    listed = set(values or [])
    return wanted in listed or "*" in listed


def _has_resource(values: Any, wanted: str) -> bool:
    """As RBAC matches a rule's resources: `*` is every resource and subresource,
    `*/exec` the exec subresource of any resource; `pods` is not `pods/exec`."""
    listed = set(values or [])
    _, slash, subresource = wanted.partition("/")
    return wanted in listed or "*" in listed or bool(slash and f"*/{subresource}" in listed)


def rule_accesses(rule: Mapping[str, Any], names: Sequence[str], *, namespace: str,
                  cluster_wide: bool) -> list[Access]:
    """Each way one RBAC rule reaches the key Secrets `names` of `namespace`."""
    found: list[Access] = []
    only = list(rule.get("resourceNames") or [])
    groups, resources, verbs = rule.get("apiGroups"), rule.get("resources"), rule.get("verbs")
    key_names = [n for n in names if n in only] if only else [""]
    if _has(groups, "") and _has(resources, "secrets") and key_names:
        for verb in (*READ_VERBS, *WRITE_VERBS):
            if _has(verbs, verb):
                found.append(Access(verb, "", "secrets", namespace, key_names[0]))
    for resource in IMPERSONATED:
        if _has(groups, "") and _has(resources, resource) and _has(verbs, "impersonate") \
                and (cluster_wide or resource == "serviceaccounts"):
            found.append(Access("impersonate", "", resource,
                                namespace if resource == "serviceaccounts" else "",
                                only[0] if only else ""))
    # resourceNames narrow a token to the service accounts named, and which of them
    # reach keys is not read here: reported all the same, as impersonation is.
    verb, resource = TOKEN_REQUEST
    if _has(groups, "") and _has_resource(resources, resource) and _has(verbs, verb):
        found.append(Access(verb, "", resource, namespace, only[0] if only else ""))
    for resource in WEBHOOK_CONFIGS:
        for verb in RBAC_WRITES:
            if cluster_wide and _has(groups, HOOKS_GROUP) and _has(resources, resource) \
                    and _has(verbs, verb) and not (verb == "create" and only):
                found.append(Access(verb, HOOKS_GROUP, resource, "", only[0] if only else ""))
    # Into a running Pod, or a change that runs other code with its keys: a Pod's or a
    # workload's name in resourceNames narrows the path to those, and which of them are
    # (or will be) backend Pods is not known here, so the path is reported all the same.
    name = only[0] if only else ""
    core = _has(groups, "")
    for verb, resource in (*INTO_PODS, *CHANGE_PODS):
        if core and _has_resource(resources, resource) and _has(verbs, verb):
            found.append(Access(verb, "", resource, namespace, name))
    for verb, resource in NODE_PROXY:
        if cluster_wide and core and _has_resource(resources, resource) and _has(verbs, verb):
            found.append(Access(verb, "", resource, "", name))
    if not only:  # create is authorized before the name is known: resourceNames never match
        for group, resource in POD_MAKERS:
            if _has(groups, group) and _has(resources, resource) and _has(verbs, "create"):
                found.append(Access("create", group, resource, namespace))
    for group, resource in TEMPLATE_CHANGERS:
        for verb in WRITE_VERBS:
            if _has(groups, group) and _has(resources, resource) and _has(verbs, verb):
                found.append(Access(verb, group, resource, namespace, name))
    return found


def _granting(rules: Sequence[Mapping[str, Any]], group: str, resource: str,
              verbs: Sequence[str]) -> Mapping[str, Any] | None:
    """The first rule that allows one of `verbs` on `resource`; a rule limited by
    resourceNames never allows a create (the name is not known when it is authorized)."""
    for rule in rules:
        if _has(rule.get("apiGroups"), group) and _has(rule.get("resources"), resource) \
                and any(_has(rule.get("verbs"), verb) and not (
                    verb == "create" and rule.get("resourceNames")) for verb in verbs):
            return rule
    return None


def _named(rule: Mapping[str, Any]) -> str:
    return str((rule.get("resourceNames") or [""])[0])


def rbac_rewrites(rules: Sequence[Mapping[str, Any]], *, namespace: str,
                  cluster_wide: bool) -> list[Access]:
    """The ways one role's rules, together, let a subject grant itself more: bind a
    role and write a binding to it, or escalate a role and write it (RBAC's
    privilege-escalation prevention and its two exceptions). resourceNames on bind or
    escalate narrow them to the roles named, whose rules are not read here: reported
    all the same."""
    found: list[Access] = []
    binding_kinds = ("rolebindings", "clusterrolebindings") if cluster_wide else ("rolebindings",)
    writes_bindings = any(_granting(rules, RBAC_GROUP, kind, RBAC_WRITES)
                          for kind in binding_kinds)
    for resource in ROLE_KINDS:
        rule = _granting(rules, RBAC_GROUP, resource, ("bind",))
        if writes_bindings and rule is not None:
            # A RoleBinding to a ClusterRole is authorized in the binding's namespace.
            found.append(Access("bind", RBAC_GROUP, resource, namespace, _named(rule)))
    for resource in ROLE_KINDS if cluster_wide else ("roles",):
        rule = _granting(rules, RBAC_GROUP, resource, ("escalate",))
        if rule is not None and _granting(rules, RBAC_GROUP, resource, RBAC_WRITES):
            found.append(Access("escalate", RBAC_GROUP, resource,
                                namespace if resource == "roles" else "", _named(rule)))
    return found


def _matches_selector(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels and matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(_expression_holds(e, labels) for e in selector.get("matchExpressions") or [])


def _expression_holds(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, values = expression.get("key"), set(expression.get("values") or [])
    present = key in labels
    match expression.get("operator"):
        case "In":
            return present and labels[str(key)] in values
        case "NotIn":
            return not present or labels[str(key)] not in values
        case "Exists":
            return present
        case "DoesNotExist":
            return not present
    return False  # an operator the API server would have refused selects nothing


def effective_rules(cluster_roles: Sequence[Mapping[str, Any]]
                    ) -> dict[str, list[Mapping[str, Any]]]:
    """ClusterRole name -> its rules, an aggregated role's with the rules of every
    ClusterRole its aggregationRule selects. kube-controller-manager writes the same
    union into the role, but only while it runs and some time after a change: audit
    does not wait for it."""
    rules = {str(r["metadata"]["name"]): list(r.get("rules") or []) for r in cluster_roles}
    for role in cluster_roles:
        selectors = (role.get("aggregationRule") or {}).get("clusterRoleSelectors")
        if not selectors:
            continue
        name = str(role["metadata"]["name"])
        for other in cluster_roles:
            labels = other["metadata"].get("labels") or {}
            if other is not role and any(_matches_selector(s, labels) for s in selectors):
                rules[name] += list(other.get("rules") or [])
    return rules


def subject_name(subject: Mapping[str, Any]) -> str:
    kind, name = subject.get("kind"), str(subject.get("name") or "")
    if kind == "ServiceAccount":
        return f"serviceaccount:{subject.get('namespace')}:{name}"
    if kind == "User" and name.startswith(SERVICE_ACCOUNT_USER):
        # The username of a service account's token: the same subject.
        return f"serviceaccount:{name.removeprefix(SERVICE_ACCOUNT_USER)}"
    return f"{'group' if kind == 'Group' else 'user'}:{name}"


def expected_reader(subject: str, *, writers: KeyWriters, cluster_admin: bool) -> bool:
    """Cluster admins, the named Kubernetes controllers, keymount, the key writers."""
    if cluster_admin or subject == CLUSTER_ADMIN_GROUP or subject in KUBERNETES_CONTROLLERS:
        return True
    kind, _, name = subject.partition(":")
    if kind == "serviceaccount":
        requester = Requester(SERVICE_ACCOUNT_USER + name)
    elif kind == "group":
        requester = Requester("", (name,))
    else:
        requester = Requester(name)
    if writers.own_user and requester.username == writers.own_user:
        return True
    return any(s.matches(requester) for s in writers.subjects or ())


def secret_readers(rbac: Rbac, namespace: str, names: Sequence[str], *,
                   writers: KeyWriters) -> list[Grant]:
    """Each unexpected subject's path to `namespace`'s key Secrets: one per binding, the
    strongest access its role grants."""
    cluster_rules = effective_rules(rbac.cluster_roles)
    roles = {(r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in rbac.roles}
    bindings = [(b, True) for b in rbac.cluster_role_bindings]
    bindings += [(b, False) for b in rbac.role_bindings
                 if b["metadata"].get("namespace") == namespace]
    grants: list[Grant] = []
    for binding, cluster_wide in bindings:
        ref = binding.get("roleRef") or {}
        role_name = str(ref.get("name"))
        if ref.get("kind") == "ClusterRole":
            rules = cluster_rules.get(role_name)
        else:
            role = roles.get((namespace, role_name))
            rules = None if role is None else list(role.get("rules") or [])
        if not rules:
            continue
        accesses = [a for rule in rules for a in rule_accesses(
            rule, names, namespace=namespace, cluster_wide=cluster_wide)]
        accesses += rbac_rewrites(rules, namespace=namespace, cluster_wide=cluster_wide)
        if not accesses:
            continue
        access = min(accesses, key=_strength)
        meta = binding["metadata"]
        where = f"ClusterRoleBinding {meta['name']}" if cluster_wide else \
            f"RoleBinding {meta.get('namespace')}/{meta['name']}"
        admin = cluster_wide and ref.get("kind") == "ClusterRole" and \
            role_name == CLUSTER_ADMIN_ROLE
        for subject in binding.get("subjects") or []:
            name = subject_name(subject)
            if not expected_reader(name, writers=writers, cluster_admin=admin):
                grants.append(Grant(name, access, where, f"{ref.get('kind')} {role_name}"))
    return grants


# Strongest first: the keys' bytes themselves, then someone else's access, then a way
# into a running backend Pod, then a Pod or workload of one's own making.
_ORDER = [*(("", "secrets", v) for v in (*READ_VERBS, *WRITE_VERBS)),
          *(("", r, "impersonate") for r in IMPERSONATED),
          ("", TOKEN_REQUEST[1], TOKEN_REQUEST[0]),
          *((RBAC_GROUP, r, v) for v in ("bind", "escalate") for r in ROLE_KINDS),
          *((HOOKS_GROUP, r, v) for r in WEBHOOK_CONFIGS for v in RBAC_WRITES),
          *(("", r, v) for v, r in (*INTO_PODS, *NODE_PROXY, *CHANGE_PODS)),
          *((g, r, "create") for g, r in POD_MAKERS),
          *((g, r, v) for g, r in TEMPLATE_CHANGERS for v in WRITE_VERBS)]


def _strength(access: Access) -> int:
    return _ORDER.index((access.group, access.resource, access.verb))


def unlabelled_slots(secrets: Iterable[Mapping[str, Any]], *, key_selector: Selector
                     ) -> list[tuple[str, str]]:
    """(namespace, name) of each Secret (metadata) under a key slot's name that is not a
    key Secret: it predates keymount's webhooks, and backend Pods list that name as an
    optional source, so its `encryption-key` field would become a key file."""
    return sorted((str(meta.get("namespace")), str(meta.get("name")))
                  for meta in (s.get("metadata") or {} for s in secrets)
                  if slot_number(str(meta.get("name") or "")) is not None
                  and not key_selector.matches(meta.get("labels") or {}))


def confirm(findings: Sequence[Finding], answers: Mapping[Grant, bool]) -> list[Finding]:
    """The findings with what the API server answered for each path it was asked."""
    return [replace(f, confirmed=answers.get(f.grant)) if f.grant is not None else f
            for f in findings]


def audit(keyrings: Mapping[str, Keyring], *, rbac: Rbac | None, pods: Iterable[PodKeys],
          writers: KeyWriters, max_age: timedelta | None, now: datetime,
          unlabelled: Iterable[tuple[str, str]] = (),
          key_ids: Mapping[tuple[str, str], bytes] | None = None) -> list[Finding]:
    """`key_ids`: a digest of each key's bytes by (namespace, name). A fingerprint is 3
    bytes, shared by different keys in any large cluster: with it, a reused key is the
    same bytes in two namespaces; without it, the same fingerprint."""
    findings: list[Finding] = []
    if not writers.configured:
        findings.append(Finding(
            "key-writers-unset", "", "-", "--key-writers is not set: anyone RBAC lets write "
            "Secrets can choose the key that encrypts new data; set it on keymount serve and "
            "pass the same to audit (KEYMOUNT_KEY_WRITERS)"))
    by_key: dict[tuple[str, bytes], set[str]] = defaultdict(set)
    for ns, keyring in keyrings.items():
        for record in keyring.keys:
            by_key[(record.fingerprint, b"" if key_ids is None
                    else key_ids.get((ns, record.name), b""))].add(ns)
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
            names = sorted({r.name for r in (*keyring.keys, *keyring.invalid,
                                              *keyring.retired, *keyring.slots,
                                              *keyring.staged_keys)})
            for grant in sorted(secret_readers(rbac, ns, names, writers=writers),
                                key=lambda g: (g.subject, g.binding)):
                findings.append(Finding("secret-reader", ns, grant.subject,
                                        f"can reach its keys: {grant.describe()}", grant))
    for (fingerprint, _), namespaces in sorted(by_key.items()):
        if len(namespaces) > 1:
            findings.append(Finding(
                "reused-key", ",".join(sorted(namespaces)), f"fingerprint {fingerprint}",
                "the same key in more than one namespace: one namespace's data is readable "
                "with another's key; rotate all but one"))
    for ns, name in unlabelled:
        findings.append(Finding(
            "unlabelled-slot", ns, name,
            "a Secret without the key label under a key slot's name: backend Pods list it "
            "as an optional key source, so a key written into it bypasses keymount; "
            f"delete it (kubectl delete secret {name} -n {ns}) or rename it"))
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


