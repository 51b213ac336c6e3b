"""Key slots against the real API server, with the webhooks registered as manifests/
declares them: the API server, not keymount's memory, decides which writer gets a
number; only key writers touch a slot; a Pod lists only slots that exist."""

from __future__ import annotations

import base64
import subprocess
import sys

from kubernetes import client, config

from apihelpers import (
    create_pod,
    denial,
    key_sources,
    keymount_cli,
    random_key,
    wait_for_slots,
)
from conftest import ROOT, kubectl, launch_keymount, webhook_configurations
from polling import poll

KEY_LABEL = "keymount.io/encryption-key"


def key_numbers(api, namespace: str) -> tuple[list[int], list[int]]:
    """(numbers of the keys that hold material, numbers of the empty slots)."""
    keys, slots = [], []
    for secret in api.list_namespaced_secret(namespace).items:
        if (secret.metadata.labels or {}).get(KEY_LABEL) != "true":
            continue
        number = int(secret.metadata.annotations["keymount.io/key-index"])
        (keys if (secret.data or {}).get("encryption-key") else slots).append(number)
    return sorted(keys), sorted(slots)


def test_ten_concurrent_rotations_through_two_keymount_processes_get_ten_numbers(
        api, namespace, keymount, control_plane, admin_kubeconfig, tmp_path):
    # Two processes share the webhook port (--workers 2): each holds its own memory, as
    # two replicas do. keymount 0.2 kept numbers in that memory.
    replicas = launch_keymount(control_plane, tmp_path / "replicas", "--workers", "2")
    ca_bundle = base64.b64encode(replicas.ca_file.read_bytes()).decode()
    kubectl(admin_kubeconfig, "apply", "-f", "-",
            stdin=webhook_configurations(replicas.port, ca_bundle))
    try:
        # The API server dials the new registration once its informer has it.
        def replicas_called() -> bool:
            api.create_namespaced_secret(namespace, {
                "metadata": {"name": "probe", "labels": {KEY_LABEL: "true"}},
                "data": {"encryption-key": base64.b64encode(random_key()).decode()}},
                dry_run="All")
            return replicas.metric("keymount_admission_requests_total",
                                   'webhook="validate",result="allowed"') > 0
        poll(replicas_called, what="the API server calling the replicas")
        keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
        rotations = [subprocess.Popen(
            [sys.executable, "-m", "webhook", "keys", "rotate", "-n", namespace,
             "--kubeconfig", str(admin_kubeconfig)], cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(10)]
        outcomes = [(p.wait(180), *p.communicate()) for p in rotations]
        failed = [(code, out, err) for code, out, err in outcomes if code != 0]
        assert not failed, "\n\n".join(
            f"exit {code}\nstdout: {out}\nstderr: {err}" for code, out, err in failed)
        keys, slots = key_numbers(api, namespace)
        assert keys == list(range(1, 12))  # distinct and consecutive: 1 + 10 rotations
        assert len(slots) >= 2 and min(slots) == 12
        pod = create_pod(api, namespace, "after")
        assert [file for _, file in key_sources(pod)] == [
            f"encryption-key-{n}" for n in range(1, 12)]
    finally:
        kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=webhook_configurations(
            keymount.port, base64.b64encode(keymount.ca_file.read_bytes()).decode()))
        assert replicas.stop() == 0


def test_only_a_key_writer_touches_a_slot_and_pods_list_only_slots_that_exist(
        api, namespace, keymount, admin_kubeconfig, user_kubeconfig):
    mallory = client.CoreV1Api(config.new_client_from_config(
        config_file=str(user_kubeconfig("mallory"))))
    keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate",
                 "--rotation-slots", "1")
    assert key_numbers(api, namespace) == ([1], [2])
    wait_for_slots(api, namespace, 1)
    pod = create_pod(api, namespace, "api")
    # Only the slot that exists: none for number 3, which no Secret holds.
    assert key_sources(pod, optional=True) == [("keymount-key-2", "encryption-key-2")]

    fill = {"data": {"encryption-key": base64.b64encode(random_key()).decode()}}
    assert "may not" in denial(lambda: mallory.patch_namespaced_secret(
        "keymount-key-2", namespace, fill))
    assert "slot of key number 2" in denial(lambda: mallory.patch_namespaced_secret(
        "keymount-key-2", namespace, {"metadata": {"labels": {KEY_LABEL: None}}}))
    assert "may not delete" in denial(lambda: mallory.delete_namespaced_secret(
        "keymount-key-2", namespace))
    assert "slot of key number 2" in denial(lambda: api.delete_namespaced_secret(
        "keymount-key-2", namespace))  # nor may a key writer: retired, never removed
    # A name no slot holds is anyone's, and no Pod lists it.
    mallory.create_namespaced_secret(namespace, {"metadata": {"name": "keymount-key-3"},
                                                 "data": fill["data"]})
    assert key_numbers(api, namespace) == ([1], [2])

    # A key writer fills the slot: the key, at the slot's number.
    api.patch_namespaced_secret("keymount-key-2", namespace, fill)
    assert key_numbers(api, namespace) == ([1, 2], [])
