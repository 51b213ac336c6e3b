"""manifests/ renders with kustomize and the real API server accepts it."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT, kubectl

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
    assert len(hooks) == 4
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
    assert {(tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]} == {
        (("secrets",), ("list", "watch")), (("pods",), ("list", "watch")),
        (("events",), ("create",))}


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


def test_the_auto_generate_component_adds_create_and_turns_the_flag_on(tmp_path):
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [manifests]\ncomponents: [manifests/components/auto-generate]\n")
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert ["create"] in [r["verbs"] for r in role["rules"]]
    base_role = next(d for d in render("manifests") if d["kind"] == "ClusterRole")
    assert all("create" not in r["verbs"] for r in base_role["rules"]
               if "secrets" in r["resources"])
    env = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert {"name": "KEYMOUNT_AUTO_GENERATE", "value": "true"} in env


def test_the_restrict_webhook_port_component_opens_8443_only_to_the_range_it_sets(tmp_path):
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [manifests]\ncomponents: [manifests/components/restrict-webhook-port]\n")
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    policy = next(d for d in yaml.safe_load_all(result.stdout)
                  if d and d["kind"] == "NetworkPolicy")
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
