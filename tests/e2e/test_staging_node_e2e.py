"""Staged activation on a real node: what running backend Pods read after `keys rotate
--stage` and after `keys activate`, without a restart.

The kubelet of the test bed syncs Pods every 10 s (`syncFrequency`). Each container
prints what it reads every second, with the CRI log's own timestamps; the windows from
staging to the staged file, and from activation to the active file, in every running
container are measured from those timestamps, printed, and appended to
/tmp/keymount-node-timings.txt.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime

import pytest
from kubernetes import client, config

from apihelpers import first_seen, keymount_cli, timed_reports
from polling import poll
from test_node_e2e import TIMINGS_FILE, expected_files, reporting
from test_rotation_node_e2e import keys_cached, restarts, running_reporters

cli = keymount_cli


@pytest.fixture
def apps(admin_kubeconfig):
    return client.AppsV1Api(config.new_client_from_config(config_file=str(admin_kubeconfig)))


def digest(secret, field: str) -> str:
    return hashlib.sha256(base64.b64decode(secret.data[field])).hexdigest()


def test_running_pods_get_the_staged_file_first_and_the_active_file_only_after_activation(
        api, apps, namespace, keymount, node, admin_kubeconfig):
    arrived, slots = keys_cached(keymount, 1), keys_cached(keymount, 2, state="slot")
    cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
    poll(lambda: arrived() and slots(), what="key 1 and its slots cached")
    before = running_reporters(node, api, apps, namespace, "api",
                               expected_files(api, namespace))
    active_before = expected_files(api, namespace)

    staging = datetime.now(UTC)
    staged = cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--stage")
    assert "secret/keymount-key-2 staged" in staged.stdout
    assert "2 running Pod(s) get it live" in staged.stdout
    staged_digest = digest(api.read_namespaced_secret("keymount-key-2", namespace),
                           "staged-encryption-key")
    during = {**active_before, "staged/encryption-key-2": staged_digest}
    poll(lambda: (r := reporting(node, api, namespace, "app=api", 2)) and
         all(report == during for _, report in r.values()),
         timeout=120, what="staged/encryption-key-2 in both running containers")

    activation = datetime.now(UTC)
    cli(admin_kubeconfig, "keys", "activate", "-n", namespace)
    after = {**during, "encryption-key-2": staged_digest}
    now = poll(lambda: (r := reporting(node, api, namespace, "app=api", 2)) and
               all(report == after for _, report in r.values()) and r,
               timeout=120, what="encryption-key-2 in both running containers")
    assert {name: uid for name, (uid, _) in now.items()} == \
        {name: uid for name, (uid, _) in before.items()}  # the same Pods
    assert restarts(api, namespace, "api") == [0, 0]

    to_staged, to_active = [], []
    for name, (uid, _) in now.items():
        reports = timed_reports(namespace, name, uid)
        seen_staged = first_seen(reports, "staged/encryption-key-2", staging)
        seen_active = first_seen(reports, "encryption-key-2", staging)
        assert seen_staged is not None and seen_active is not None
        # No report ever showed the active file before the activation.
        assert seen_active >= activation, (name, seen_active, activation)
        assert seen_staged < activation
        to_staged.append((seen_staged - staging).total_seconds())
        to_active.append((seen_active - activation).total_seconds())
    # Every running Pod held the staged file before any Pod showed the active one.
    lines = [f"stage -> staged file in every running container: {max(to_staged):.1f}s "
             f"(each: {', '.join(f'{s:.1f}s' for s in sorted(to_staged))})",
             f"activate -> active file in every running container: {max(to_active):.1f}s "
             f"(each: {', '.join(f'{s:.1f}s' for s in sorted(to_active))})"]
    print("\n" + "\n".join(lines) + " (kubelet syncFrequency 10s)")
    with TIMINGS_FILE.open("a") as out:
        out.write("\n".join(lines) + "\n")
