"""keymount.reader on a real node: pointed at a running backend Pod's volume through the
node's filesystem (the kubelet's own directory for that volume, `..data` and all), one
KeyDirectory follows `keys rotate` without a restart of the Pod or of the reader.

Only digests of key bytes are compared and printed, never the bytes.
"""

from __future__ import annotations

import os

import pytest

from keymount.reader import KeyDirectory, MissingKey

from apihelpers import BACKEND, digest, key_volume, keymount_cli
from polling import poll
from test_node_e2e import expected_files, pod_spec
from test_rotation_node_e2e import keys_cached


def test_the_reader_follows_a_running_pods_volume_through_a_rotation(
        api, namespace, keymount, node, admin_kubeconfig):
    arrived, slots = keys_cached(keymount, 1), keys_cached(keymount, 2, state="slot")
    keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
    poll(lambda: arrived() and slots(), what="key 1 and its slots cached")
    api.create_namespaced_pod(namespace, {"metadata": {"name": "app", "labels": BACKEND},
                                          "spec": pod_spec()})
    pod = poll(lambda: (p := api.read_namespaced_pod("app", namespace)).status.phase ==
               "Running" and p, timeout=90, what="the backend Pod running")
    volume = key_volume(node, pod.metadata.uid)
    assert os.readlink(volume / "encryption-key-1") == "..data/encryption-key-1"
    first_version = os.readlink(volume / "..data")  # the kubelet's timestamped directory

    keys = KeyDirectory(volume)
    files = expected_files(api, namespace)
    number, key = keys.active()
    assert (number, digest(key)) == (1, files["encryption-key-1"])
    assert keys.numbers() == [1]

    rotated = keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace)
    assert "number 2 (file encryption-key-2)" in rotated.stdout
    files = expected_files(api, namespace)
    poll(lambda: keys.numbers() == [1, 2], timeout=120,
         what="the kubelet swapping the running Pod's volume")
    number, key = keys.active()
    assert (number, digest(key)) == (2, files["encryption-key-2"])
    assert digest(keys.get(1)) == files["encryption-key-1"]  # old records still decrypt
    assert os.readlink(volume / "..data") != first_version
    assert not (volume / first_version).exists()  # the old version is gone, as it was read
    with pytest.raises(MissingKey, match=r"its numbers: 1, 2$"):
        keys.get(3)  # an empty slot is no key
    restarts = [s.restart_count for s in
                api.read_namespaced_pod("app", namespace).status.container_statuses]
    assert restarts == [0]
