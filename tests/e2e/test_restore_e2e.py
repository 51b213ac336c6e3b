"""`keys restore` through the real API server and keymount's webhooks: the whole file is
judged (against itself, then the cluster) before anything is written, a restore that
stopped half-way is finished by running it again, and restores of any size complete
(one namespace of 200 keys, 60 namespaces at once) without spending the live reads that
confirm a Pod's refusal."""

from __future__ import annotations

from datetime import datetime

import pytest

from webhook.backup import BackedUpKey, encode, encrypt
from webhook.keys import check_key

from apihelpers import create_key, key_sources, keymount_cli, pod_body, random_key

cli = keymount_cli
KEY_LABEL = "keymount.io/encryption-key=true"


def entry(namespace: str, name: str, number: int, *, key: bytes | None = None,
          retired: bool = False, activated_at: int = 0) -> BackedUpKey:
    """A backup entry as keymount makes one: its record covers every lower number."""
    value = None if retired else key or random_key()
    return BackedUpKey(namespace, name, number, "2026-12-01T00:00:00Z",
                       "" if value is None else check_key(value).fingerprint,
                       f"1-{number}" if number > 1 else "1", retired, value,
                       activated_at=activated_at)


def seconds(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def write_backup(path, recipient: str, entries: list[BackedUpKey]):
    path.write_bytes(encrypt(encode(entries), recipients=[recipient]))
    return path


def stored(api, namespace: str) -> dict[str, str]:
    """name -> number of the key Secrets in the namespace."""
    return {s.metadata.name: (s.metadata.annotations or {}).get("keymount.io/key-index")
            for s in api.list_namespaced_secret(namespace, label_selector=KEY_LABEL).items}


@pytest.mark.parametrize(("entries", "said"), [
    (lambda ns: [entry(ns, "dup-a", 1), entry(ns, "dup-b", 1), entry(ns, "k2", 2)],
     "two entries with number 1 in namespace {ns}: 'dup-a' (fingerprint"),
    (lambda ns: [entry(ns, "k1", 1), entry(ns, "dup", 2), entry(ns, "dup", 3)],
     "two entries named 'dup' in namespace {ns}: number 2 (fingerprint"),
], ids=["two-entries-one-number", "two-entries-one-name"])
def test_a_backup_that_contradicts_itself_writes_nothing_and_names_both_entries(
        api, namespace, keymount, admin_kubeconfig, age_identity, tmp_path, entries, said):
    path, recipient = age_identity
    backup = write_backup(tmp_path / "b.age", recipient, entries(namespace))
    refused = cli(admin_kubeconfig, "keys", "restore", str(backup), "--identity", str(path),
                  check=False)
    assert refused.returncode == 1
    assert said.format(ns=namespace) in refused.stderr
    assert "nothing was restored" in refused.stderr
    assert stored(api, namespace) == {}


@pytest.mark.parametrize("cluster", ["number-held-by-another-key",
                                     "name-held-by-a-secret-that-is-no-key",
                                     "namespace-missing"])
def test_a_restore_the_cluster_contradicts_writes_nothing(
        api, namespace, keymount, admin_kubeconfig, age_identity, tmp_path, cluster):
    path, recipient = age_identity
    other = f"{namespace}-x"  # a namespace of the file that is fine
    api.create_namespace({"metadata": {"name": other}})
    target = namespace
    if cluster == "number-held-by-another-key":
        create_key(api, namespace, "intruder", index=2)
    elif cluster == "name-held-by-a-secret-that-is-no-key":
        api.create_namespaced_secret(namespace, {"metadata": {"name": "k2"},
                                                 "stringData": {"password": "x"}})
    else:
        target = f"{namespace}-gone"
    entries = [entry(other, "k1", 1), entry(other, "k2", 2),
               entry(target, "k1", 1), entry(target, "k2", 2)]
    backup = write_backup(tmp_path / "b.age", recipient, entries)
    refused = cli(admin_kubeconfig, "keys", "restore", str(backup), "--identity", str(path),
                  check=False)
    assert refused.returncode == 1 and "nothing was restored" in refused.stderr
    expected = {"number-held-by-another-key": "number 2 in namespace",
                "name-held-by-a-secret-that-is-no-key": "exists and is not a key Secret",
                "namespace-missing": f"kubectl create namespace {target}"}[cluster]
    assert expected in refused.stderr
    assert stored(api, other) == {}  # not even the namespace that had no conflict
    if cluster == "number-held-by-another-key":
        assert stored(api, namespace) == {"intruder": "2"}


def test_keys_already_there_are_no_ops_and_the_rest_is_written(
        api, namespace, keymount, admin_kubeconfig, age_identity, tmp_path):
    # What a restore that stopped half-way leaves: the first keys, as in the backup.
    path, recipient = age_identity
    entries = [entry(namespace, f"k{n}", n, retired=n == 2) for n in range(1, 5)]
    first = write_backup(tmp_path / "first.age", recipient, entries[:2])
    cli(admin_kubeconfig, "keys", "restore", str(first), "--identity", str(path))
    backup = write_backup(tmp_path / "all.age", recipient, entries)
    done = cli(admin_kubeconfig, "keys", "restore", str(backup), "--identity", str(path))
    assert done.stdout.count("already there, unchanged") == 2
    assert f"{namespace}/k4: restored at number 4" in done.stdout
    assert stored(api, namespace) == {f"k{n}": str(n) for n in range(1, 5)}


def test_a_restored_key_keeps_its_first_activation_through_the_webhooks(
        api, namespace, keymount, admin_kubeconfig, age_identity, tmp_path):
    """An activation time earlier than keymount's clock survives the mutating webhook
    (the key's age and rotation count from it); a later one is stamped over."""
    path, recipient = age_identity
    old, ahead = "2024-11-30T09:00:00Z", "2099-01-01T00:00:00Z"
    entries = [entry(namespace, "k1", 1, activated_at=seconds(old)),
               entry(namespace, "k2", 2, activated_at=seconds(ahead))]
    cli(admin_kubeconfig, "keys", "restore", str(write_backup(tmp_path / "b.age", recipient,
                                                             entries)), "--identity", str(path))
    times = {s.metadata.name: s.metadata.annotations.get("keymount.io/activated-at")
             for s in api.list_namespaced_secret(namespace, label_selector=KEY_LABEL).items}
    assert times["k1"] == old
    assert times["k2"] not in (ahead, None) and times["k2"] < ahead


def test_one_namespace_of_200_keys_is_restored_whole(
        api, namespace, keymount, admin_kubeconfig, age_identity, tmp_path):
    path, recipient = age_identity
    entries = [entry(namespace, f"k{n}", n) for n in range(1, 201)]
    backup = write_backup(tmp_path / "b.age", recipient, entries)
    done = cli(admin_kubeconfig, "keys", "restore", str(backup), "--identity", str(path),
               timeout=300)
    assert done.stdout.count("restored at number") == 200
    assert stored(api, namespace) == {f"k{n}": str(n) for n in range(1, 201)}
    # Every Pod of the namespace gets the restored keys, the newest as the active file.
    pod = api.create_namespaced_pod(namespace, pod_body("probe"), dry_run="All")
    assert key_sources(pod)[-1] == ("k200", "encryption-key-200")


def test_a_backup_of_60_namespaces_is_restored_whole(
        api, namespace, keymount, admin_kubeconfig, age_identity, tmp_path):
    path, recipient = age_identity
    names = [f"{namespace}-{i}" for i in range(60)]
    for name in names:
        api.create_namespace({"metadata": {"name": name}})
    entries = [entry(ns, f"k{n}", n) for ns in names for n in (1, 2)]
    backup = write_backup(tmp_path / "b.age", recipient, entries)
    done = cli(admin_kubeconfig, "keys", "restore", str(backup), "--identity", str(path),
               timeout=300)
    assert done.stdout.count("restored at number") == 120
    assert all(stored(api, ns) == {"k1": "1", "k2": "2"} for ns in names)
