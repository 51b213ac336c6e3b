"""Key custody through the real API server: an encrypted backup, a namespace lost and
restored, the age reference reader, damaged files, and `keymount audit`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

from kubernetes.client.rest import ApiException
from pyrage import x25519

from apihelpers import (
    OUTPUTS,
    create_key,
    create_pod,
    key_sources,
    keymount_cli,
    pod_body,
    random_key,
)
from conftest import KEY_WRITERS, kubectl
from polling import poll

cli = keymount_cli


def secrets_of(api, namespace: str) -> dict:
    """name -> (number, fingerprint annotation-free view: data, retired)."""
    found = {}
    for s in api.list_namespaced_secret(
            namespace, label_selector="keymount.io/encryption-key=true").items:
        annotations = s.metadata.annotations or {}
        found[s.metadata.name] = (annotations.get("keymount.io/key-index"),
                                  (s.data or {}).get("encryption-key"),
                                  "keymount.io/retired" in annotations)
    return found


def test_backup_delete_the_namespace_restore_every_pod_gets_the_same_files(
        api, namespace, keymount, node, admin_kubeconfig, age_identity, tmp_path):
    # `node` brings kube-controller-manager, whose namespace controller deletes the
    # namespace's objects (keymount allows it to delete live key Secrets).
    cfg = admin_kubeconfig
    for name in ("k1", "k2", "k3"):
        create_key(api, namespace, name)
    poll(lambda: len(key_sources(api.create_namespaced_pod(
        namespace, pod_body("probe"), dry_run="All"))) == 3, what="three keys admitted")
    cli(cfg, "keys", "retire", "k2", "-n", namespace, "--yes")  # number 2 in between
    before_secrets = secrets_of(api, namespace)
    before_files = key_sources(create_pod(api, namespace, "before"))
    assert before_files == [("k1", "encryption-key-1"), ("k3", "encryption-key-3")]

    path, recipient = age_identity
    backup = tmp_path / "keys.age"
    made = cli(cfg, "keys", "backup", "-n", namespace, "-o", str(backup),
               "--recipient", recipient)
    assert "3 key Secret(s)" in made.stdout
    raw = backup.read_bytes()
    assert raw.startswith(b"age-encryption.org/v1")
    key_bytes = [base64.b64decode(v[1]) for v in before_secrets.values() if v[1]]
    assert len(key_bytes) == 2 and not any(k in raw for k in key_bytes)
    assert "every fingerprint matches" in cli(cfg, "keys", "backup", "--verify", str(backup),
                                              "--identity", str(path)).stdout

    # The age format's reference reader (the age CLI) reads it: the exact key bytes.
    age = shutil.which("age")
    if age is None:
        assert os.environ.get("KEYMOUNT_E2E") != "required", "the age CLI is missing"
    else:
        plain = subprocess.run([age, "-d", "-i", str(path), str(backup)],
                               capture_output=True, check=True).stdout
        inside = {k["name"]: k for k in json.loads(plain)["keys"]}
        assert sorted(inside) == ["k1", "k2", "k3"] and inside["k2"]["retired"]
        assert {base64.b64decode(inside[n]["key"]) for n in ("k1", "k3")} == set(key_bytes)

    api.delete_namespace(namespace)
    poll(lambda: _gone(api, namespace), timeout=120, what="the namespace deleted")
    api.create_namespace({"metadata": {"name": namespace}})
    restored = cli(cfg, "keys", "restore", str(backup), "--identity", str(path))
    assert "k2: restored at number 2 (retired)" in restored.stdout
    assert secrets_of(api, namespace) == before_secrets
    assert key_sources(create_pod(api, namespace, "after")) == before_files
    again = cli(cfg, "keys", "restore", str(backup), "--identity", str(path))
    assert again.stdout.count("already there, unchanged") == 3  # the same keys: a no-op
    logs = keymount.log_text()
    spellings = [s for k in key_bytes for s in (k.hex(), base64.b64encode(k).decode())]
    assert [s for s in spellings for out in [*OUTPUTS, logs] if s in out] == []


def _gone(api, namespace: str) -> bool:
    try:
        api.read_namespace(namespace)
        return False
    except ApiException as exc:
        return exc.status == 404


def test_a_damaged_or_unreadable_backup_restores_nothing(api, namespace, keymount,
                                                         admin_kubeconfig, age_identity,
                                                         tmp_path):
    cfg = admin_kubeconfig
    create_key(api, namespace, "k1")
    path, recipient = age_identity
    backup = tmp_path / "keys.age"
    cli(cfg, "keys", "backup", "-n", namespace, "-o", str(backup), "--recipient", recipient)
    empty = f"{namespace}-empty"
    api.create_namespace({"metadata": {"name": empty}})
    data = backup.read_bytes()
    damaged = {"truncated": data[:-7], "tampered": data[:-30] + bytes([data[-30] ^ 1]) +
               data[-29:]}
    other = tmp_path / "other.txt"
    other.write_text(f"{x25519.Identity.generate()}\n")
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
    attempts = [[str(tmp_path / "truncated"), "--identity", str(path)],
                [str(tmp_path / "tampered"), "--identity", str(path)],
                [str(backup), "--identity", str(other)],
                [str(backup), "--passphrase-file", str(other)]]
    for args in attempts:
        result = cli(cfg, "keys", "restore", *args, "-n", namespace, check=False)
        assert result.returncode == 1, args
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("keymount: cannot decrypt") and "nothing was restored" in line
    # Restoring into a namespace whose number 1 is another key refuses the whole file.
    create_key(api, empty, "intruder")
    raw = backup.read_bytes()
    moved = tmp_path / "moved.age"
    plain = json.loads(x25519_decrypt(raw, path))
    for key in plain["keys"]:
        key["namespace"] = empty
    moved.write_bytes(__import__("pyrage").encrypt(json.dumps(plain).encode(),
                                                   [x25519.Recipient.from_str(recipient)]))
    refused = cli(cfg, "keys", "restore", str(moved), "--identity", str(path), check=False)
    assert refused.returncode == 1 and "held by key Secret 'intruder'" in refused.stderr
    assert sorted(secrets_of(api, empty)) == ["intruder"]


def x25519_decrypt(data: bytes, identity_path) -> bytes:
    import pyrage
    lines = [line for line in identity_path.read_text().splitlines()
             if line.startswith("AGE-SECRET-KEY")]
    return pyrage.decrypt(data, [x25519.Identity.from_str(lines[0])])


RBAC_LEAK = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: read-keys, namespace: NS}
rules:
- {apiGroups: [""], resources: [secrets], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: auditors-read-keys, namespace: NS}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-keys}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: contractors}
"""


def test_audit_lists_each_problem_with_exit_1_and_nothing_once_fixed(
        api, namespace, keymount, admin_kubeconfig, tmp_path):
    cfg = admin_kubeconfig
    other = f"{namespace}-twin"
    api.create_namespace({"metadata": {"name": other}})
    reused = random_key()
    create_key(api, namespace, "k1", key=reused)
    create_key(api, other, "twin", key=reused)
    kubectl(cfg, "apply", "-f", "-", stdin=RBAC_LEAK.replace("NS", namespace))
    poll(lambda: len(key_sources(api.create_namespaced_pod(
        namespace, pod_body("probe"), dry_run="All"))) == 1, what="k1 admitted")
    create_pod(api, namespace, "early")
    create_key(api, namespace, "by-hand")  # a name no running Pod lists: "early" is stale
    poll(lambda: keymount.metric("keymount_stale_pods",
                                 f'namespace="{namespace}",state="stale"') == 1,
         what="the early Pod stale")
    # The e2e secret admins (mallory, bob) may read Secrets everywhere; not this test's
    # subject: audit one grant at a time, so take theirs away while it runs.
    kubectl(cfg, "delete", "clusterrolebinding", "keymount-e2e-secret-admins")
    # The age bar must outlast a rotation, a retirement and an audit below: three CLI
    # processes, each importing the Kubernetes client, took more than 6 s once on a busy
    # CI machine, and the fresh key already counted as too old.
    max_age = "20s"
    try:
        poll(lambda: cli(cfg, "audit", "-A", "-o", "json", "--max-key-age", max_age,
                         "--own-user", "keymount", check=False).returncode == 1, timeout=30,
             what="a finding")
        found = poll(lambda: (r := _audit(cfg, max_age)) and
                     any(f["kind"] == "key-too-old" and f["namespace"] == namespace
                         for f in r) and r, timeout=60, what=f"the keys {max_age} old")
        kinds = {(f["kind"], f["namespace"], f["subject"]) for f in found}
        assert ("key-writers-unset", "*", "-") in kinds
        assert ("secret-reader", namespace, "group:contractors") in kinds
        assert ("stale-pod", namespace, "early") in kinds
        assert ("key-too-old", namespace, "by-hand") in kinds
        assert any(k == "reused-key" and set(ns.split(",")) == {namespace, other}
                   for k, ns, _ in kinds)

        # Fix each: rotate away from the reused key, revoke the grant, restart the stale
        # Pod, rotate the overdue keys, and say who the key writers are. Each namespace
        # is audited right after its rotation: its newest key is then seconds old.
        kubectl(cfg, "delete", "rolebinding", "auditors-read-keys", "-n", namespace)
        api.delete_namespaced_pod("early", namespace, grace_period_seconds=0)
        poll(lambda: not [p for p in api.list_namespaced_pod(namespace).items
                          if p.metadata.name == "early"], what="the stale Pod gone")
        cli(cfg, "keys", "rotate", "-n", other)
        cli(cfg, "keys", "retire", "twin", "-n", other, "--yes")
        twin = cli(cfg, "audit", "-n", other, "--max-key-age", max_age, "--own-user", "keymount",
                   "--key-writers", KEY_WRITERS, check=False)
        assert twin.returncode == 0, twin.stdout
        cli(cfg, "keys", "rotate", "-n", namespace)
        clean = cli(cfg, "audit", "-n", namespace, "--max-key-age", max_age, "--own-user",
                    "keymount", "--key-writers", KEY_WRITERS, check=False)
        assert clean.returncode == 0, clean.stdout
        assert "no findings" in clean.stdout
    finally:
        from conftest import RBAC
        kubectl(cfg, "apply", "-f", "-", stdin=RBAC)


def _audit(cfg, max_age: str) -> list:
    result = cli(cfg, "audit", "-A", "-o", "json", "--max-key-age", max_age, "--own-user",
                 "keymount", check=False)
    return json.loads(result.stdout) if result.returncode == 1 else []
