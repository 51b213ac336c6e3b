"""manifests/ renders with kustomize and the real API server accepts it."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import shutil
import subprocess
import uuid

import pytest
import yaml
from kubernetes.client.rest import ApiException

from apihelpers import BACKEND, create_key, create_pod, pod_body
from conftest import ROOT, free_port, kubectl
from polling import poll

# The test bed is Kubernetes 1.20, which serves PodDisruptionBudget only as
# policy/v1beta1; the manifests use policy/v1 (1.21+, the only one since 1.25).
NOT_SERVED_BY_1_20 = {("policy/v1", "PodDisruptionBudget")}


def render(path: str) -> list[dict]:
    assert shutil.which("kubectl"), "kubectl is needed to render manifests/"
    result = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("variant", ["manifests", "manifests/namespaced",
                                     "manifests/cert-manager"])
def test_every_variant_renders_with_kustomize(variant):
    kinds = {d["kind"] for d in render(variant)}
    assert {"Deployment", "Service", "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration"} <= kinds


def test_every_webhook_fails_closed_with_side_effects_only_off_dry_run():
    hooks = [h for doc in render("manifests") for h in doc.get("webhooks", [])]
    assert len(hooks) == 5
    for hook in hooks:
        assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "NoneOnDryRun"


KEY_LABEL = "keymount.io/encryption-key"
VARIANTS = ["manifests/base", "manifests", "manifests/namespaced", "manifests/cert-manager"]


def matches_secrets(hook: dict) -> bool:
    """Whether one of the webhook's rules lets the API server call it for a Secret."""
    return any(({"", "*"} & set(rule["apiGroups"]))
               and ({"secrets", "secrets/*", "*", "*/*"} & set(rule["resources"]))
               for rule in hook.get("rules", []))


def requires_key_label(selector: dict | None) -> bool:
    """Whether an objectSelector lets through only objects labelled as keys."""
    selector = selector or {}
    if selector.get("matchLabels", {}).get(KEY_LABEL) == "true":
        return True
    return any(e["key"] == KEY_LABEL and e["operator"] == "In" and e["values"] == ["true"]
               for e in selector.get("matchExpressions", []))


@pytest.mark.parametrize("variant", VARIANTS, ids=["base", "default", "namespaced",
                                                   "cert-manager"])
def test_only_key_secrets_are_sent_to_keymount(variant):
    # A webhook that sees Secrets without the key label makes every Secret write in the
    # cluster (Helm, cert-manager, ...) wait on keymount, and fail while it is down.
    hooks = [h for doc in render(variant) for h in doc.get("webhooks", [])]
    secret_hooks = {h["name"] for h in hooks if matches_secrets(h)}
    unguarded = sorted(h["name"] for h in hooks
                       if matches_secrets(h) and not requires_key_label(h.get("objectSelector")))
    assert unguarded == [], f"{variant}: webhooks that see Secrets without the key label"
    assert {"secrets.keymount.io", "numbers.keymount.io"} <= secret_hooks


def test_least_privilege_rbac_grants_exactly_the_verbs_serve_uses():
    role = next(d for d in render("manifests") if d["kind"] == "ClusterRole")
    # Events are created, then patched as they repeat; a refused Pod's owner is read
    # once before an Event names it (it must exist, with the uid the Pod claims).
    assert {(tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]} == {
        (("secrets",), ("list", "watch")), (("pods",), ("list", "watch")),
        (("events",), ("create", "patch")),
        (("replicasets", "statefulsets", "daemonsets"), ("get",)), (("jobs",), ("get",)),
        (("replicationcontrollers",), ("get",)),
        # A KeyPolicy is judged on its namespace's labels and the ClusterKeyPolicies;
        # policies are read, never written, here.
        (("namespaces",), ("get",)),
        (("keypolicies", "clusterkeypolicies"), ("list", "watch"))}


def test_the_shipped_deployment_sets_key_writers():
    deployment = next(d for d in render("manifests") if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KEYMOUNT_KEY_WRITERS"] == "group:system:masters,group:keymount:key-writers"


def test_the_base_is_accepted_by_the_api_server(admin_kubeconfig, api):
    docs = render("manifests")
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(namespace))
    rest = [d for d in docs if d["kind"] != "Namespace"
            and (d["apiVersion"], d["kind"]) not in NOT_SERVED_BY_1_20]
    result = kubectl(admin_kubeconfig, "apply", "--dry-run=server", "-f", "-",
                     stdin=yaml.safe_dump_all(rest))
    for doc in rest:
        assert f"{doc['metadata']['name']}" in result.stdout


def test_the_ca_bundle_patch_names_every_webhook_the_base_registers():
    from webhook.certs import WEBHOOKS
    registered = {d["kind"]: [h["name"] for h in d["webhooks"]]
                  for d in render("manifests") if "webhooks" in d}
    assert registered == WEBHOOKS


@pytest.mark.parametrize("variant", ["manifests", "manifests/namespaced"])
def test_the_ca_bundle_patch_keymount_certs_writes_fills_every_webhook(tmp_path, variant):
    # `keymount certs --kustomize-patch <variant>/ca-bundle.yaml`, then `kubectl apply
    # -k <variant>`: re-applying never blanks a caBundle.
    from webhook.certs import build_ca_bundle_patch
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    (tmp_path / variant / "ca-bundle.yaml").write_text(build_ca_bundle_patch("Q0E="))
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path / variant)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    bundles = [h["clientConfig"].get("caBundle") for d in yaml.safe_load_all(result.stdout)
               if d for h in d.get("webhooks", [])]
    assert bundles == ["Q0E="] * 5


def render_with_component(tmp_path, component: str) -> list[dict]:
    """The default install with one of manifests/components, as a user adds it."""
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [manifests]\ncomponents: [manifests/components/{component}]\n")
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_the_auto_generate_component_adds_create_and_turns_the_flag_on(tmp_path):
    docs = render_with_component(tmp_path, "auto-generate")
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert ["create"] in [r["verbs"] for r in role["rules"]]
    base_role = next(d for d in render("manifests") if d["kind"] == "ClusterRole")
    assert all("create" not in r["verbs"] for r in base_role["rules"]
               if "secrets" in r["resources"])
    env = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert {"name": "KEYMOUNT_AUTO_GENERATE", "value": "true"} in env


def test_the_controller_component_grants_exactly_its_calls_and_turns_it_on(tmp_path):
    from webhook.names import CONTROLLER_LEASE
    docs = render_with_component(tmp_path, "controller")
    role = next(d for d in docs if d["kind"] == "Role"
                and d["metadata"]["name"] == "keymount-controller")
    assert role["metadata"]["namespace"] == "keymount"
    # get/update only on the one Lease; create cannot be narrowed by name.
    assert sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"]),
                   tuple(r.get("resourceNames", ()))) for r in role["rules"]) == [
        (("coordination.k8s.io",), ("leases",), ("create",), ()),
        (("coordination.k8s.io",), ("leases",), ("get", "update"), (CONTROLLER_LEASE,))]
    # The work: key Secrets (never delete), namespace labels, KeyPolicy status, and the
    # rolling restart; bound cluster-wide to keymount's ServiceAccount.
    work = next(d for d in docs if d["kind"] == "ClusterRole"
                and d["metadata"]["name"] == "keymount-controller")
    assert sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"]))
                  for r in work["rules"]) == [
        (("",), ("namespaces",), ("list", "watch")),
        (("",), ("secrets",), ("get", "create", "patch")),
        (("apps",), ("deployments", "statefulsets", "daemonsets"), ("get", "patch")),
        (("keymount.io",), ("keypolicies/status", "clusterkeypolicies/status"), ("patch",))]
    cluster_binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding"
                           and d["metadata"]["name"] == "keymount-controller")
    assert cluster_binding["subjects"] == [{"kind": "ServiceAccount", "name": "keymount",
                                            "namespace": "keymount"}]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == "keymount-controller"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "keymount",
                                    "namespace": "keymount"}]
    env = {e["name"]: e for e in next(d for d in docs if d["kind"] == "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KEYMOUNT_CONTROLLER"]["value"] == "true"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}}
    # Without the component: no Lease access and no controller.
    base = render("manifests")
    assert not any("leases" in r["resources"] for d in base
                   if d["kind"] in ("Role", "ClusterRole") for r in d["rules"])


def test_the_restrict_webhook_port_component_opens_8443_only_to_the_range_it_sets(tmp_path):
    policy = next(d for d in render_with_component(tmp_path, "restrict-webhook-port")
                  if d["kind"] == "NetworkPolicy")
    rules = sorted(((p["port"], r.get("from")) for r in policy["spec"]["ingress"]
                    for p in r["ports"]), key=str)
    # The webhook port only from the one range set in the component (no rule left that
    # opens it to everyone); probes stay open.
    assert rules == [(8080, None), (8443, [{"ipBlock": {"cidr": "CONTROL-PLANE-CIDR"}}])]
    base = next(d for d in render("manifests") if d["kind"] == "NetworkPolicy")
    assert base["spec"]["egress"] == policy["spec"]["egress"]
    assert all("from" not in r for r in base["spec"]["ingress"])


def test_keymounts_namespace_carries_the_name_label_the_webhooks_exclude_it_by():
    docs = render("manifests")
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    label = namespace["metadata"]["labels"]["kubernetes.io/metadata.name"]
    excluded = {value for doc in docs for hook in doc.get("webhooks", [])
                for expr in hook["namespaceSelector"]["matchExpressions"]
                if expr["operator"] == "NotIn" for value in expr["values"]}
    assert label == namespace["metadata"]["name"] and label in excluded


# --- keymount down, with the webhooks exactly as manifests/base declares them ----------

CONFIGURATIONS = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")


def base_registrations(port: int, ca_bundle: str) -> list[dict]:
    """manifests/base's webhook configurations, only clientConfig changed: dialled by URL
    on loopback, at a port where nothing listens (keymount never started)."""
    docs = [d for d in render("manifests/base") if d["kind"] in CONFIGURATIONS]
    for doc in docs:
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}",
                                    "caBundle": ca_bundle}
    return docs


@contextlib.contextmanager
def registered(kubeconfig, docs: list[dict]):
    """Apply `docs` as the only keymount configurations; put back whatever configurations
    of that name were there before (the session's live keymount), so that they cannot
    answer in their place."""
    saved = []
    for kind in CONFIGURATIONS:
        found = kubectl(kubeconfig, "get", kind, "keymount", "-o", "json",
                        "--ignore-not-found").stdout
        if found.strip():
            obj = json.loads(found)
            obj["metadata"] = {"name": obj["metadata"]["name"]}
            saved.append(obj)
            kubectl(kubeconfig, "delete", kind, "keymount")
    try:
        kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
        yield
    finally:
        for kind in CONFIGURATIONS:
            kubectl(kubeconfig, "delete", kind, "keymount", "--ignore-not-found")
        if saved:
            kubectl(kubeconfig, "create", "-f", "-", stdin=yaml.safe_dump_all(saved))


def call_failure(call) -> str:
    """The API server's message when it could not reach a webhook (fail closed)."""
    with pytest.raises(ApiException) as info:
        call()
    message = json.loads(info.value.body)["message"]
    assert "failed calling webhook" in message, message
    return message


def refused_for_want_of(api, namespace: str, probe_pod: str) -> tuple[str, str]:
    """Both configurations are in force (the API server loads them asynchronously): a
    backend Pod CREATE reaches the mutating one, a Pod gaining the backend label only the
    validating one. Dry runs: nothing is created."""
    def attempt(call):
        try:
            call()
        except ApiException as exc:
            message = json.loads(exc.body)["message"]
            return message if "failed calling webhook" in message else None
        return None
    mutating = poll(lambda: attempt(lambda: api.create_namespaced_pod(
        namespace, pod_body("backend"), dry_run="All")), what="mutating webhooks in force")
    validating = poll(lambda: attempt(lambda: api.patch_namespaced_pod(
        probe_pod, namespace, {"metadata": {"labels": BACKEND}}, dry_run="All")),
        what="validating webhooks in force")
    return mutating, validating


@pytest.fixture
def keymount_down(admin_kubeconfig, api):
    """A tenant namespace, with manifests/base's webhooks registered and keymount down."""
    from webhook.certs import build_certificates
    ca = build_certificates(service="keymount", namespace="keymount")["ca.crt"]
    name = f"keymount-down-{uuid.uuid4().hex[:8]}"
    api.create_namespace({"metadata": {"name": name}})
    # Made before the webhooks exist: the Pod that gains the backend label later.
    api.create_namespaced_pod(name, pod_body("plain", labels={}))
    with registered(admin_kubeconfig, base_registrations(free_port(),
                                                         base64.b64encode(ca).decode())):
        refused_for_want_of(api, name, "plain")
        yield name


def test_with_keymount_down_a_secret_without_the_key_label_is_written(api, keymount_down):
    secret = {"metadata": {"name": "helm-release"},
              "data": {"release": base64.b64encode(b"v1").decode()}}
    api.create_namespaced_secret(keymount_down, secret)
    api.patch_namespaced_secret("helm-release", keymount_down,
                                {"data": {"release": base64.b64encode(b"v2").decode()}})
    stored = api.read_namespaced_secret("helm-release", keymount_down)
    assert base64.b64decode(stored.data["release"]) == b"v2"


def test_with_keymount_down_key_secrets_and_backend_pods_are_refused(api, keymount_down):
    key = call_failure(lambda: create_key(api, keymount_down, "keymount-key-1"))
    assert '"numbers.keymount.io"' in key or '"secrets.keymount.io"' in key, key
    pod = call_failure(lambda: create_pod(api, keymount_down, "api"))
    assert '"inject.keymount.io"' in pod, pod
    assert [s.metadata.name for s in api.list_namespaced_secret(
        keymount_down, label_selector="keymount.io/encryption-key=true").items] == []


# keymount 0.2's third validating webhook, as manifests/base declared it.
SLOTS_0_2 = {
    "name": "slots.keymount.io", "admissionReviewVersions": ["v1"],
    "sideEffects": "NoneOnDryRun", "failurePolicy": "Fail", "timeoutSeconds": 5,
    "matchPolicy": "Equivalent",
    "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
               "resources": ["secrets"], "scope": "Namespaced"}],
    "objectSelector": {"matchExpressions": [{"key": "keymount.io/encryption-key",
                                             "operator": "NotIn", "values": ["true"]}]},
    "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                                                "operator": "NotIn",
                                                "values": ["keymount", "kube-system"]}]}}


def test_applying_the_manifests_over_0_2_removes_the_slots_webhook(admin_kubeconfig):
    # `kubectl apply` merges webhooks by name and deletes the entries it applied last time
    # that are gone now: upgrading needs no manual step.
    now = base_registrations(free_port(), "")
    before = copy.deepcopy(now)
    validating = next(d for d in before if d["kind"] == "ValidatingWebhookConfiguration")
    validating["webhooks"].append({**SLOTS_0_2, "clientConfig": dict(
        validating["webhooks"][0]["clientConfig"])})
    with registered(admin_kubeconfig, before):
        names = kubectl(admin_kubeconfig, "get", "validatingwebhookconfiguration", "keymount",
                        "-o", "jsonpath={.webhooks[*].name}").stdout.split()
        assert "slots.keymount.io" in names
        kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(now))
        names = kubectl(admin_kubeconfig, "get", "validatingwebhookconfiguration", "keymount",
                        "-o", "jsonpath={.webhooks[*].name}").stdout.split()
    assert names == ["pods.keymount.io", "secrets.keymount.io", "policies.keymount.io"]


# --- keymount's policies (docs/contract.md, "Policies") ----------------------------------

CRDS = {"keypolicies.keymount.io", "clusterkeypolicies.keymount.io"}


@pytest.mark.parametrize("variant", VARIANTS, ids=["base", "default", "namespaced",
                                                   "cert-manager"])
def test_every_variant_installs_both_policy_kinds_and_their_webhook(variant):
    docs = render(variant)
    assert {d["metadata"]["name"] for d in docs
            if d["kind"] == "CustomResourceDefinition"} == CRDS
    hook = next(h for d in docs for h in d.get("webhooks", [])
                if h["name"] == "policies.keymount.io")
    # keymount's own kinds and nothing else: the webhook adds no blast radius.
    assert [(r["apiGroups"], sorted(r["resources"]), r["operations"]) for r in hook["rules"]] \
        == [(["keymount.io"], ["clusterkeypolicies", "keypolicies"], ["CREATE", "UPDATE"])]
    assert hook["failurePolicy"] == "Fail" and hook["clientConfig"]["service"]["path"] == \
        "/validate"


def test_the_namespaced_variant_reads_only_its_tenants_namespaces_for_policies():
    docs = render("manifests/namespaced")
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert role["metadata"]["name"] == "keymount-policies"
    assert {(tuple(r["resources"]), tuple(r.get("resourceNames", ())), tuple(r["verbs"]))
            for r in role["rules"]} == {(("namespaces",), ("tenant-a",), ("get",)),
                                        (("clusterkeypolicies",), (), ("list", "watch"))}
    hook = next(h for d in docs for h in d.get("webhooks", [])
                if h["name"] == "policies.keymount.io")
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["tenant-a"]


def crd(docs, plural):
    return next(d for d in docs if d["kind"] == "CustomResourceDefinition"
                and d["spec"]["names"]["plural"] == plural)


def test_the_keypolicy_columns_are_active_staged_keys_next_rotation_ready_age():
    version = crd(render("manifests"), "keypolicies")["spec"]["versions"][0]
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["ACTIVE", "STAGED", "KEYS", "NEXT-ROTATION", "READY", "AGE"]
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("plural", ["keypolicies", "clusterkeypolicies"])
def test_every_duration_in_the_schemas_has_the_pattern_keymount_parses(plural):
    from webhook.policy import DURATION_PATTERN, MAX_DURATION_TEXT
    spec = crd(render("manifests"), plural)["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]["properties"]["spec"]["properties"]
    durations = {name: field for name, field in spec.items() if name.endswith("Period")}
    assert sorted(durations) == (["rotationPeriod", "stagingPeriod"] if plural == "keypolicies"
                                 else ["maxRotationPeriod", "minRotationPeriod",
                                       "minStagingPeriod", "rotationPeriod",
                                       "stagingPeriod"])
    for field in durations.values():
        assert (field["pattern"], field["maxLength"]) == (DURATION_PATTERN, MAX_DURATION_TEXT)
    assert spec["restart"]["enum"] == ["none", "rolling"]
