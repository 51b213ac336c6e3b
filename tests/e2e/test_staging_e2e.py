"""Staged keys against the real API server, with the webhooks registered as manifests/
declares them: `keys rotate --stage` delivers a key under staged/ before `keys
activate` makes it the one applications encrypt with; only key writers stage or
activate; one key is staged at a time; a Pod created meanwhile lists the staged file."""

from __future__ import annotations

import base64
import json

from kubernetes import client, config

from apihelpers import (
    OUTPUTS,
    create_pod,
    denial,
    key_material,
    keymount_cli,
    pod_body,
    random_key,
    wait_for_slots,
)
from polling import poll

STAGED_FIELD = "staged-encryption-key"


def slot_items(pod) -> dict[str, list[str]]:
    """{Secret: [files]} of a Pod's optional (slot) sources."""
    volume = next(v for v in pod.spec.volumes if v.name == "keymount-encryption-keys")
    return {s.secret.name: [i.path for i in s.secret.items] for s in volume.projected.sources
            if s.secret.optional}


def active_sources(pod) -> list[tuple[str, str]]:
    volume = next(v for v in pod.spec.volumes if v.name == "keymount-encryption-keys")
    return [(s.secret.name, s.secret.items[0].path) for s in volume.projected.sources
            if not s.secret.optional]


def listed_as_staged(api, namespace: str, name: str) -> None:
    """Until keymount's cache has the staged key: a new Pod lists it first among its
    slots."""
    poll(lambda: next(iter(slot_items(api.create_namespaced_pod(
        namespace, pod_body("probe"), dry_run="All"))), None) == name,
        what=f"{name} listed as the staged key by a new Pod")


def keys_listed(namespace: str, admin_kubeconfig) -> dict[str, str]:
    rows = json.loads(keymount_cli(admin_kubeconfig, "keys", "list", "-n", namespace,
                                   "-o", "json").stdout)
    return {row["secret"]: row["state"] for row in rows}


def test_rotate_stage_then_activate_makes_the_staged_bytes_the_active_key(
        api, namespace, keymount, admin_kubeconfig):
    keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
    wait_for_slots(api, namespace, 2)

    staged = keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--stage")
    assert "secret/keymount-key-2 staged" in staged.stdout
    assert "(file staged/encryption-key-2)" in staged.stdout
    assert f"keymount keys activate -n {namespace}" in staged.stdout
    secret = api.read_namespaced_secret("keymount-key-2", namespace)
    assert set(secret.data) == {STAGED_FIELD}
    assert secret.metadata.annotations["keymount.io/staged-at"].endswith("Z")
    assert keys_listed(namespace, admin_kubeconfig)["keymount-key-2"] == "staged"

    # A Pod created during staging: key 1 active, key 2 under staged/, then the slots.
    listed_as_staged(api, namespace, "keymount-key-2")
    during = create_pod(api, namespace, "during")
    assert active_sources(during) == [("keymount-key-1", "encryption-key-1")]
    assert slot_items(during)["keymount-key-2"] == ["encryption-key-2",
                                                    "staged/encryption-key-2"]
    assert [s["file"] for s in json.loads(
        during.metadata.annotations["keymount.io/status"])] == ["encryption-key-1"]

    activated = keymount_cli(admin_kubeconfig, "keys", "activate", "-n", namespace)
    assert "secret/keymount-key-2 activated" in activated.stdout
    assert "warning: keymount-key-2 was staged" in activated.stderr  # moments ago
    secret = api.read_namespaced_secret("keymount-key-2", namespace)
    assert secret.data["encryption-key"] == secret.data[STAGED_FIELD]
    assert "keymount.io/activated-at" in secret.metadata.annotations
    assert keys_listed(namespace, admin_kubeconfig)["keymount-key-2"] == "active"

    nothing = keymount_cli(admin_kubeconfig, "keys", "activate", "-n", namespace,
                           check=False)
    assert nothing.returncode == 1 and "has no staged key to activate" in nothing.stderr
    poll(lambda: active_sources(api.create_namespaced_pod(
        namespace, pod_body("probe"), dry_run="All"))[-1] ==
        ("keymount-key-2", "encryption-key-2"), what="key 2 active for new Pods")
    assert not [s for s in key_material(api, namespace) if any(s in o for o in OUTPUTS)]


def test_a_non_writer_can_neither_stage_nor_activate_nor_cancel(
        api, namespace, keymount, admin_kubeconfig, user_kubeconfig):
    mallory = client.CoreV1Api(config.new_client_from_config(
        config_file=str(user_kubeconfig("mallory"))))
    keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
    stage = {"data": {STAGED_FIELD: base64.b64encode(random_key()).decode()}}
    assert "may not fill, stage" in denial(lambda: mallory.patch_namespaced_secret(
        "keymount-key-2", namespace, stage))

    keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--stage")
    staged = api.read_namespaced_secret("keymount-key-2", namespace)
    activate = {"data": {"encryption-key": staged.data[STAGED_FIELD]}}
    assert "may not activate" in denial(lambda: mallory.patch_namespaced_secret(
        "keymount-key-2", namespace, activate))
    cancel = {"data": {STAGED_FIELD: None},
              "metadata": {"annotations": {"keymount.io/retired": "2026-12-02T00:00:00Z"}}}
    assert "may not activate" in denial(lambda: mallory.patch_namespaced_secret(
        "keymount-key-2", namespace, cancel))
    # Nor a key writer: the staged bytes never change, and activation copies them.
    other = {"data": {"encryption-key": base64.b64encode(random_key()).decode()}}
    assert "keymount keys activate" in denial(lambda: api.patch_namespaced_secret(
        "keymount-key-2", namespace, other))
    later = api.read_namespaced_secret("keymount-key-2", namespace)
    assert set(later.data) == {STAGED_FIELD}
    assert later.data[STAGED_FIELD] == staged.data[STAGED_FIELD]


def test_a_second_staging_is_refused_until_the_first_is_activated_or_cancelled(
        api, namespace, keymount, admin_kubeconfig):
    keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
    keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--stage")

    again = keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--stage",
                         check=False)
    assert again.returncode == 1
    assert "has a staged key, keymount-key-2" in again.stderr
    # Written around the CLI, the guard refuses it too, naming both ways out.
    message = denial(lambda: api.patch_namespaced_secret("keymount-key-3", namespace, {
        "data": {STAGED_FIELD: base64.b64encode(random_key()).decode()}}))
    assert "already has a staged key, 'keymount-key-2'" in message
    assert f"keymount keys retire keymount-key-2 -n {namespace}" in message

    # Cancelling is retiring it: then the next staging takes the next slot.
    keymount_cli(admin_kubeconfig, "keys", "retire", "keymount-key-2", "-n", namespace,
                 "--yes")
    assert set(api.read_namespaced_secret("keymount-key-2", namespace).data or {}) == set()
    staged = keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--stage")
    assert "secret/keymount-key-3 staged" in staged.stdout


def test_with_a_keypolicy_rotate_stages_and_activate_now_overrides_it_with_a_warning(
        api, namespace, keymount, admin_kubeconfig, policy_crds):
    keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
    custom = client.CustomObjectsApi(api.api_client)
    custom.create_namespaced_custom_object("keymount.io", "v1alpha1", namespace,
                                           "keypolicies", {
        "apiVersion": "keymount.io/v1alpha1", "kind": "KeyPolicy",
        "metadata": {"name": "rotation"}, "spec": {"stagingPeriod": "10s"}})
    staged = keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace)
    assert "secret/keymount-key-2 staged" in staged.stdout
    keymount_cli(admin_kubeconfig, "keys", "activate", "-n", namespace)

    now = keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--activate-now")
    assert "warning: --activate-now skips staging" in now.stderr
    assert "number 3 (file encryption-key-3)" in now.stdout
    assert set(api.read_namespaced_secret("keymount-key-3", namespace).data) == \
        {"encryption-key"}


def test_activate_now_adds_an_active_key_with_a_warning_and_no_policy_means_active(
        api, namespace, keymount, admin_kubeconfig):
    keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
    now = keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--activate-now")
    assert "warning: --activate-now skips staging" in now.stderr
    assert "number 2 (file encryption-key-2)" in now.stdout
    # No KeyPolicy in the namespace (or not even its CRD): rotate makes the key active.
    plain = keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace)
    assert "number 3 (file encryption-key-3)" in plain.stdout and "warning" not in plain.stderr
