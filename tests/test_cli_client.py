"""The CLI holds its cluster client as `cli_keys.KeyApi`: keymount's `KeyClient` is
one, and the key commands work against a fake of it."""

from __future__ import annotations

import argparse
import base64
import copy
import inspect
from datetime import UTC, datetime, timedelta
from typing import get_type_hints

import pytest

from webhook import audit, cli_keys
from webhook.cli_keys import (
    KeyApi,
    activate_staged_key,
    activation_warning,
    cluster_keyrings,
    fill_next_slot,
    pin_legacy_keys,
    report_rollout,
    rotation_mode,
    should_stage,
    slot_manifest,
)
from webhook.cluster import KeyClient
from webhook.config import Settings
from webhook.errors import UserFacingError
from webhook.injection import Injected, inject_keys
from webhook.key_secrets import build_key_secret, parse_key_secret
from webhook.keys import KeyRecord, build_keyring

from builders import (
    key_secret,
    keyring_of,
    keys_sharing_a_fingerprint,
    pod,
    random_key,
    slot_secret,
)

SETTINGS = Settings()
API_METHODS = [name for name in vars(KeyApi) if not name.startswith("_")]


@pytest.mark.parametrize("name", API_METHODS, ids=API_METHODS)
def test_keymounts_client_has_each_key_api_method_with_its_signature_and_types(name):
    wanted, got = getattr(KeyApi, name), getattr(KeyClient, name)
    assert inspect.signature(got).parameters.keys() == \
        inspect.signature(wanted).parameters.keys()
    # KeyApi names Rbac and Grant for the type checker only (the CLI imports audit lazily).
    names = {**vars(cli_keys), "Rbac": audit.Rbac, "Grant": audit.Grant}
    assert get_type_hints(got) == get_type_hints(wanted, globalns=names)


class FakeKeys:
    """A KeyApi that records patches and serves fixed records and Pods."""

    def __init__(self, records: list[KeyRecord], pods: list[dict] | None = None) -> None:
        self.records, self.pods = records, pods or []
        self.patches: list[tuple[str, str, dict]] = []

    def key_records(self, namespace):
        return [r for r in self.records if namespace is None or r.namespace == namespace]

    def backend_pods(self, namespace):
        return self.pods

    def patch_secret(self, namespace, name, patch):
        self.patches.append((namespace, name, patch))

    def controller_of(self, namespace, pod, *, owners=None):
        # KeyClient checks each link (tests/test_cluster_client.py); here they hold.
        from webhook.lifecycle import controller_ref
        kind, name, _ = controller_ref(pod)
        return ("Deployment", "api") if kind == "ReplicaSet" else (kind, name)


def records(*secrets) -> list[KeyRecord]:
    return [parse_key_secret(s, settings=SETTINGS) for s in secrets]


def test_cluster_keyrings_groups_the_listed_records_by_namespace():
    keys = FakeKeys(records(key_secret("a", random_key(), index=1),
                            key_secret("b", random_key(), index=1, namespace="web")))
    assert list(cluster_keyrings(keys, None)) == ["shop", "web"]
    assert [r.name for r in cluster_keyrings(keys, "quiet").get("quiet").keys] == []


def test_pin_legacy_keys_patches_each_legacy_key_at_its_current_number(capsys):
    keyring = keyring_of(key_secret("old", random_key(), created="2025-01-01T00:00:00Z"),
                         key_secret("new", random_key(), index=2))
    keys = FakeKeys([])
    assert pin_legacy_keys(keys, keyring) == 1
    [(namespace, name, patch)] = keys.patches
    assert (namespace, name) == ("shop", "old")
    assert patch["metadata"]["annotations"]["keymount.io/key-index"] == "1"
    assert "secret/old pinned at number 1" in capsys.readouterr().out


def test_report_rollout_names_the_controller_to_restart(capsys):
    pod = {"metadata": {"name": "api-7", "ownerReferences": [
        {"kind": "ReplicaSet", "name": "api-5d8", "controller": True}]}, "spec": {}}
    [record] = records(key_secret("keymount-key-3", random_key(), index=3))
    report_rollout(FakeKeys([], [pod]), "shop", record)
    assert "kubectl rollout restart deployment/api -n shop" in capsys.readouterr().out


# --- staged keys ---------------------------------------------------------------------

def staged_secret(number, key, *, staged_at="2026-12-02T13:00:00Z"):
    import base64
    secret = slot_secret(number)
    secret["data"]["staged-encryption-key"] = base64.b64encode(key).decode()
    secret["metadata"]["annotations"]["keymount.io/staged-at"] = staged_at
    return secret


class StagingKeys:
    """A KeyApi over a namespace's key Secrets: `stage_slot` and `activate_staged` lose
    `conflicts` races first (another writer got there), as the API server answers 409."""

    def __init__(self, *secrets, policy=False, conflicts=0):
        self.secrets = list(secrets)
        self.policy, self.conflicts = policy, conflicts
        self.calls: list[tuple[str, str]] = []

    def keyring(self, namespace):
        return build_keyring(namespace, records(*self.secrets))

    def has_policy(self, namespace):
        self.calls.append(("has_policy", namespace))
        return self.policy

    def _lose(self):
        if self.conflicts:
            self.conflicts -= 1
            return True
        return False

    def stage_slot(self, namespace, slot, key):
        self.calls.append(("stage_slot", slot.name))
        if self._lose():
            # Another writer staged nothing but took this slot (filled it).
            self._replace(slot.name, key_secret(slot.name, random_key(), index=slot.index,
                                                annotations={"keymount.io/numbers-used":
                                                             f"1-{slot.index}"}))
            return None
        stored = staged_secret(slot.index, key)
        self._replace(slot.name, stored)
        return records(stored)[0]

    def fill_slot(self, namespace, slot, key):
        self.calls.append(("fill_slot", slot.name))
        return None

    def activate_staged(self, namespace, staged):
        self.calls.append(("activate_staged", staged.name))
        if self._lose():
            return None
        secret = next(s for s in self.secrets if s["metadata"]["name"] == staged.name)
        secret["data"]["encryption-key"] = secret["data"]["staged-encryption-key"]
        return records(secret)[0]

    def reserve_slot(self, namespace, number):
        self.secrets.append(slot_secret(number))
        return "reserved"

    def _replace(self, name, secret):
        self.secrets = [s for s in self.secrets if s["metadata"]["name"] != name] + [secret]


@pytest.mark.parametrize(("stage", "activate_now", "policy", "staged"), [
    (False, False, False, False), (False, False, True, True), (True, False, False, True),
    (False, True, True, False), (True, False, True, True),
], ids=["no-policy", "policy", "flag-stage", "activate-now-beats-policy",
        "flag-and-policy"])
def test_rotate_stages_with_the_flag_or_a_policy_unless_activate_now(
        stage, activate_now, policy, staged):
    assert should_stage(stage=stage, activate_now=activate_now, has_policy=policy) is staged


@pytest.mark.parametrize(("flags", "asked"), [
    ({"stage": True, "activate_now": False}, False),
    ({"stage": False, "activate_now": True}, False),
    ({"stage": False, "activate_now": False}, True),
], ids=["stage", "activate-now", "no-flag"])
def test_the_policy_is_looked_up_only_when_no_flag_says_how(flags, asked):
    keys = StagingKeys(policy=True)
    rotation_mode(keys, "shop", **flags)
    assert (("has_policy", "shop") in keys.calls) is asked


def test_activate_now_warns_that_it_skips_staging(capsys):
    assert rotation_mode(StagingKeys(policy=True), "shop", stage=False,
                         activate_now=True) == "activate"
    err = capsys.readouterr().err
    assert "warning: --activate-now skips staging" in err
    assert "keymount keys rotate -n shop --stage" in err


def test_staging_fills_the_staged_field_of_the_lowest_free_slot_and_moves_on_after_a_race():
    keys = StagingKeys(key_secret("keymount-key-1", random_key(), index=1), slot_secret(2),
                       slot_secret(3), conflicts=1)
    key = random_key()
    record = fill_next_slot(keys, "shop", key, staged=True)
    assert (record.name, record.state) == ("keymount-key-3", "staged")
    assert [c for c in keys.calls if c[0] == "stage_slot"] == [
        ("stage_slot", "keymount-key-2"), ("stage_slot", "keymount-key-3")]


@pytest.mark.parametrize("staged", [True, False], ids=["stage", "activate-now"])
def test_no_key_is_added_while_one_is_staged(staged):
    keys = StagingKeys(key_secret("keymount-key-1", random_key(), index=1),
                       staged_secret(2, random_key()), slot_secret(3))
    with pytest.raises(UserFacingError) as refused:
        fill_next_slot(keys, "shop", random_key(), staged=staged)
    assert "has a staged key, keymount-key-2" in str(refused.value)
    assert "keymount keys activate -n shop" in str(refused.value)
    assert not [c for c in keys.calls if c[0] in ("stage_slot", "fill_slot")]


def test_activate_copies_the_staged_key_and_reads_again_after_a_conflict():
    key = random_key()
    keys = StagingKeys(key_secret("keymount-key-1", random_key(), index=1),
                       staged_secret(2, key), conflicts=1)
    record = activate_staged_key(keys, "shop")
    from webhook.keys import fingerprint_key
    assert (record.name, record.state, record.fingerprint) == \
        ("keymount-key-2", "valid", fingerprint_key(key))
    assert keys.calls == [("activate_staged", "keymount-key-2")] * 2
    assert keys.keyring("shop").active_number == 2


def test_activate_with_nothing_staged_says_how_to_stage():
    keys = StagingKeys(key_secret("keymount-key-1", random_key(), index=1), slot_secret(2))
    with pytest.raises(UserFacingError) as refused:
        activate_staged_key(keys, "shop")
    assert "has no staged key to activate" in str(refused.value)
    assert "keymount keys rotate -n shop --stage" in str(refused.value)


@pytest.mark.parametrize(("age", "warned"), [(30, True), (119, True), (120, False)],
                         ids=["30s", "119s", "120s"])
def test_activating_a_key_staged_moments_ago_earns_a_warning(age, warned):
    [record] = records(staged_secret(2, random_key()))
    now = datetime(2026, 12, 2, 13, 0, tzinfo=UTC) + timedelta(seconds=age)
    warning = activation_warning(record, now=now)
    assert bool(warning) is warned
    if warned:
        assert f"staged {age}s ago" in warning


def test_a_staged_manifest_holds_the_key_in_the_staged_field_of_the_next_slot():
    import base64
    ring = build_keyring("shop", records(key_secret("keymount-key-1", random_key(), index=1),
                                         slot_secret(2)))
    key = random_key()
    manifest = slot_manifest(ring, key=key, name=None, settings=SETTINGS, staged=True)
    assert manifest["metadata"]["name"] == "keymount-key-2"
    assert manifest["data"] == {"staged-encryption-key": base64.b64encode(key).decode()}
    assert records(manifest)[0].state == "staged"


@pytest.mark.parametrize("staged", [True, False], ids=["stage", "activate-now"])
def test_the_next_slots_manifest_is_refused_while_a_key_is_staged(staged):
    # `keys create --dry-run` previews what `keys create` would write: nothing then.
    ring = build_keyring("shop", records(key_secret("keymount-key-1", random_key(), index=1),
                                         staged_secret(2, random_key()), slot_secret(3)))
    with pytest.raises(UserFacingError) as refused:
        slot_manifest(ring, key=random_key(), name=None, settings=SETTINGS, staged=staged)
    assert "has a staged key, keymount-key-2" in str(refused.value)
    assert "keymount keys activate -n shop" in str(refused.value)


@pytest.mark.parametrize(("secrets", "reserved"), [
    (lambda: [staged_secret(2, random_key()), slot_secret(3)], []),
    (lambda: [staged_secret(2, random_key())], [3]),
    (lambda: [slot_secret(2)], [3]),
], ids=["staged-and-a-slot", "staged-alone", "a-slot-alone"])
def test_keep_slots_counts_a_staged_key_among_the_numbers_waiting(secrets, reserved):
    from webhook.cli_keys import keep_slots
    keys = StagingKeys(key_secret("keymount-key-1", random_key(), index=1), *secrets())
    before = {s["metadata"]["name"] for s in keys.secrets}
    keep_slots(keys, "shop", Settings(rotation_slots=2))
    added = sorted(int(s["metadata"]["name"].rsplit("-", 1)[1]) for s in keys.secrets
                   if s["metadata"]["name"] not in before)
    assert added == reserved


def test_a_user_who_may_not_read_policies_gets_the_key_active_with_a_warning(capsys):
    from webhook.errors import PolicyUnknown

    class Forbidden(StagingKeys):
        def has_policy(self, namespace):
            raise PolicyUnknown("you may not list KeyPolicies in namespace 'shop'")
    assert rotation_mode(Forbidden(), "shop", stage=False, activate_now=False) == "activate"
    err = capsys.readouterr().err
    assert "may not list KeyPolicies" in err
    assert "keymount keys rotate -n shop --stage" in err


# --- restore ---------------------------------------------------------------------------

class RestoreKeys:
    """A KeyApi for `restore_keys`: the cluster's key records and Secret names, and the
    API server's answers to each create in turn (True: created; False: keymount's 429;
    an exception: a failed write)."""

    def __init__(self, secrets=(), names=None, answers=()) -> None:
        self.secrets, self.answers = list(secrets), list(answers)
        self.records = records(*secrets)
        self.names = names
        self.created: list[str] = []

    def key_records(self, namespace):
        return [r for r in self.records if namespace is None or r.namespace == namespace]

    def key_secrets(self, namespace):
        return [s for s in self.secrets if s["metadata"]["namespace"] == namespace]

    def secret_names(self, namespaces):
        return self.names or {ns: frozenset() for ns in namespaces}

    def restore_secret(self, manifest):
        answer = self.answers.pop(0) if self.answers else True
        if isinstance(answer, Exception):
            raise answer
        if answer:
            self.created.append(manifest["metadata"]["name"])
        return answer


def backup_entries(count, namespace="shop"):
    from webhook.backup import BackedUpKey
    from webhook.keys import check_key
    entries = []
    for n in range(1, count + 1):
        value = random_key()
        entries.append(BackedUpKey(namespace, f"k{n}", n, "", check_key(value).fingerprint,
                                   f"1-{n}" if n > 1 else "1", False, value))
    return entries


def restore(client, entries, **kw):
    clock = [0.0]

    def sleep(seconds):
        clock[0] += seconds
    return cli_keys.restore_keys(client, entries, settings=SETTINGS, source="b.age",
                                 sleep=sleep, clock=lambda: clock[0], **kw)


def test_a_restore_waits_out_keymounts_429s_and_writes_every_key():
    client = RestoreKeys(answers=[True, False, False, True, False, True])
    assert restore(client, backup_entries(3)) == 0
    assert client.created == ["k1", "k2", "k3"]


def test_a_restore_gives_up_on_endless_429s_and_says_what_is_left(capsys):
    client = RestoreKeys(answers=[True] + [False] * 1000)
    with pytest.raises(UserFacingError) as info:
        restore(client, backup_entries(3), patience=5.0)
    message = str(info.value)
    assert "limits live reads" in message and "1 of 3 key Secret(s) were written" in message
    assert "2 are not: shop/k2, shop/k3" in message and "run the same command again" in message


def test_a_failed_write_half_way_is_finished_by_running_the_same_restore_again(capsys):
    from webhook.cluster import ClusterError
    entries = backup_entries(3)
    client = RestoreKeys(answers=[True, ClusterError("cannot reach the API server")])
    with pytest.raises(UserFacingError, match="1 of 3 key Secret"):
        restore(client, entries)
    # The cluster now holds k1 as backed up: the same command writes only the rest.
    written = [key_secret("k1", entries[0].value, index=1,
                          annotations={"keymount.io/numbers-used": "1"})]
    again = RestoreKeys(written)
    assert restore(again, entries) == 0
    assert again.created == ["k2", "k3"]
    assert "shop/k1: number 1 already there, unchanged" in capsys.readouterr().out


def test_a_key_there_with_the_backups_fingerprint_but_other_bytes_refuses_the_restore():
    """A fingerprint is 3 bytes: a key with the backed-up key's is found in seconds."""
    from webhook.backup import BackedUpKey
    from webhook.keys import check_key
    victim = bytes.fromhex("3c2df1b74dc2f148bc6f76a17c9df3901acc31b0518d766138fc4038eb1582f7")
    forged = bytes.fromhex("39f196b74dc2f148bc6f76a17c9df3901acc31b0518d766138fc4038eb1582f7")
    assert check_key(victim).fingerprint == check_key(forged).fingerprint
    entries = [BackedUpKey("shop", "k1", 1, "", check_key(victim).fingerprint, "1", False,
                           victim), *backup_entries(2)[1:]]
    client = RestoreKeys([key_secret("k1", forged, index=1,
                                     annotations={"keymount.io/numbers-used": "1"})])
    with pytest.raises(UserFacingError, match="other key material") as info:
        restore(client, entries)
    assert "nothing was restored" in str(info.value)
    assert client.created == []


@pytest.mark.parametrize(("cluster", "names"), [
    ([key_secret("intruder", random_key(), index=2,
                 annotations={"keymount.io/numbers-used": "1-2"})], None),
    ([], {"shop": None}),
    ([], {"shop": frozenset({"k3"})}),
], ids=["number-held-by-another-key", "namespace-missing", "name-held-by-another-secret"])
def test_a_restore_the_cluster_contradicts_writes_nothing(cluster, names):
    client = RestoreKeys(cluster, names=names)
    with pytest.raises(UserFacingError, match="nothing was restored"):
        restore(client, backup_entries(3))
    assert client.created == []


# --- backup output ---------------------------------------------------------------------

class BackupKeys:
    def __init__(self, *secrets):
        self.secrets = list(secrets)

    def key_secrets(self, namespace):
        return self.secrets


def run_backup(monkeypatch, output):
    from pyrage import x25519

    from webhook.cli import build_parser
    identity = x25519.Identity.generate()
    keys = BackupKeys(key_secret("keymount-key-1", random_key(), index=1))
    monkeypatch.setattr(cli_keys, "connect", lambda args, settings: (keys, None))
    args = build_parser().parse_args(["keys", "backup", "-A", "-o", str(output),
                                      "--recipient", str(identity.to_public())])
    return args.func(args), identity


def test_a_backup_never_writes_through_a_link_planted_at_its_temporary_name(tmp_path,
                                                                           monkeypatch):
    """-o in a directory someone else can write: a link at `.keys.age.tmp` must not make
    keymount overwrite the file it points to, nor leave the backup as that link."""
    from webhook.backup import decrypt_file
    precious = tmp_path / "precious"
    precious.write_bytes(b"not yours to overwrite")
    (tmp_path / ".keys.age.tmp").symlink_to(precious)
    code, identity = run_backup(monkeypatch, tmp_path / "keys.age")
    assert code == 0
    assert precious.read_bytes() == b"not yours to overwrite"
    backup = tmp_path / "keys.age"
    assert not backup.is_symlink() and backup.stat().st_mode & 0o777 == 0o600
    assert [k.name for k in decrypt_file(str(backup), identities=[identity])] == [
        "keymount-key-1"]


def test_a_backup_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserFacingError, match=r"cannot write .*no-such-dir.*keys\.age"):
        run_backup(monkeypatch, tmp_path / "no-such-dir" / "keys.age")


# --- audit ---------------------------------------------------------------------------

class AuditKeys:
    def __init__(self, *secrets):
        self.secrets = list(secrets)

    def key_records(self, namespace):
        return records(*self.secrets)

    def key_secrets(self, namespace):
        return self.secrets

    def backend_pods(self, namespace):
        return []

    def slot_named_secrets(self, namespace):
        return []

    def rbac(self, namespace):
        return audit.Rbac([], [], [], [])

    def confirm(self, grants):
        return {}


def test_audit_calls_two_keys_reused_only_when_their_bytes_are_the_same(monkeypatch,
                                                                         capsys):
    """A fingerprint is 3 bytes: among 5,000 keys two share one more often than not
    (at 50,000, some 75 pairs). Different keys with one fingerprint are no finding."""
    import json

    from webhook.cli import build_parser
    key, other = keys_sharing_a_fingerprint()

    def run(*secrets):
        keys = AuditKeys(*secrets)
        monkeypatch.setattr(cli_keys, "connect", lambda args, settings: (keys, None))
        args = build_parser().parse_args(["audit", "-A", "-o", "json", "--key-writers",
                                          "group:keymount:key-writers", "--own-user", "me"])
        args.func(args)
        return [row["kind"] for row in json.loads(capsys.readouterr().out)]

    assert run(key_secret("a", key, index=1),
               key_secret("b", other, index=1, namespace="bank")) == []
    assert run(key_secret("a", key, index=1),
               key_secret("b", key, index=1, namespace="bank")) == ["reused-key"]


# --- retire reads every Pod; rotate skips a slot name a legacy key holds ------------------

class RetireCluster:
    """A KeyApi over fixed key Secrets and Pods; lists Pods as the API server would."""

    def __init__(self, secrets, pods):
        self.secrets, self.all = secrets, pods
        self.patches = []

    def keyring(self, namespace):
        return build_keyring(namespace, [parse_key_secret(s, settings=SETTINGS)
                                         for s in self.secrets])

    def backend_pods(self, namespace):
        # KeyClient lists with the pod selector as labelSelector.
        return [p for p in self.all
                if SETTINGS.pod_selector.matches(p["metadata"].get("labels") or {})]

    def pods(self, namespace):
        return list(self.all)

    def patch_secret(self, namespace, name, patch):
        self.patches.append((name, patch))


def test_retire_refuses_while_a_pod_that_lost_the_backend_label_still_mounts_the_key(
        monkeypatch):
    k1 = key_secret("k1", random_key(), index=1, annotations={"keymount.io/numbers-used": "1"})
    k2 = key_secret("k2", random_key(), index=2, annotations={"keymount.io/numbers-used": "1-2"})
    ring = build_keyring("shop", [parse_key_secret(s, settings=SETTINGS) for s in (k1,)])
    injected = inject_keys(pod(name="api-0"), keyring=ring, settings=SETTINGS)
    assert isinstance(injected, Injected)
    running = injected.apply(pod(name="api-0"))
    running["metadata"]["namespace"] = "shop"
    running["status"] = {"phase": "Running"}
    # Taken out of its Service for debugging: `kubectl label pod api-0 app.kubernetes.io/component-`
    running["metadata"]["labels"] = {"debug": "quarantined"}
    cluster = RetireCluster([k1, k2], [running])
    monkeypatch.setattr(cli_keys, "connect_namespace", lambda args, settings: (cluster, "shop"))
    args = argparse.Namespace(name="k1", yes=True, force=False, namespace="shop",
                              key_field="encryption-key", key_selector=None)
    monkeypatch.setattr(cli_keys, "_settings", lambda args: SETTINGS)
    with pytest.raises(UserFacingError, match="Pods still mount k1"):
        cli_keys.cmd_retire(args)
    assert cluster.patches == []


def merged(obj, patch):
    """A merge patch applied as the API server applies it to a Secret's maps."""
    out = dict(obj)
    for name, value in patch.items():
        if value is None:
            out.pop(name, None)
        elif isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = merged(out[name], value)
        else:
            out[name] = value
    return out


def test_retire_leaves_no_copy_of_the_key_in_kubectls_last_applied_annotation(
        monkeypatch, capsys):
    """A key Secret applied with client-side `kubectl apply` (the GitOps path of `keys
    create --dry-run -o yaml`) holds its whole manifest, key included, in the
    kubectl.kubernetes.io/last-applied-configuration annotation. Retiring destroys the
    key material: that copy too, or the tombstone, kept for good, still holds the key."""
    import json
    key = random_key()
    k1 = key_secret("k1", key, index=1, annotations={"keymount.io/numbers-used": "1"})
    k1["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = \
        json.dumps(k1)
    k2 = key_secret("k2", random_key(), index=2, annotations={"keymount.io/numbers-used": "1-2"})
    cluster = RetireCluster([k1, k2], [])
    monkeypatch.setattr(cli_keys, "connect_namespace", lambda args, settings: (cluster, "shop"))
    monkeypatch.setattr(cli_keys, "_settings", lambda args: SETTINGS)
    args = argparse.Namespace(name="k1", yes=True, force=False, namespace="shop",
                              key_field="encryption-key", key_selector=None)
    assert cli_keys.cmd_retire(args) == 0
    assert "its key material is destroyed" in capsys.readouterr().out
    [(name, patch)] = cluster.patches
    tombstone = json.dumps(merged(k1, patch))
    assert parse_key_secret(merged(k1, patch), settings=SETTINGS).state == "retired"
    spellings = [base64.b64encode(key).decode(), key.hex()]
    assert not any(s in tombstone for s in spellings), "the tombstone still holds the key"


class LegacySlotCluster:
    """A KeyApi over one namespace's key Secrets, answering as the API server does."""

    def __init__(self, *secrets):
        self.secrets = {s["metadata"]["name"]: copy.deepcopy(s) for s in secrets}

    def keyring(self, namespace):
        return build_keyring(namespace, [parse_key_secret(s, settings=SETTINGS)
                                         for s in self.secrets.values()])

    def reserve_slot(self, namespace, number):
        name = f"keymount-key-{number}"
        if name in self.secrets:
            return "exists"  # 409, and the Secret there has the key label
        self.secrets[name] = build_key_secret(name, namespace=namespace, key=None,
                                              index=number, settings=SETTINGS,
                                              numbers_used=f"1-{number}")
        return "reserved"

    def fill_slot(self, namespace, slot, key):
        stored = self.secrets[slot.name]
        stored["data"]["encryption-key"] = base64.b64encode(key).decode()
        return parse_key_secret(stored, settings=SETTINGS)


def test_rotate_skips_a_slot_name_held_by_a_legacy_key_numbered_otherwise():
    # keymount 0.1: keymount-key-1 was deleted long ago; keymount-key-2 is the only key,
    # number 1 by 0.1's order.
    legacy = key_secret("keymount-key-2", random_key(), created="2025-01-01T00:00:00Z")
    cluster = LegacySlotCluster(legacy)
    assert [(f.secret, f.number) for f in cluster.keyring("shop").files] == \
        [("keymount-key-2", 1)]
    record = fill_next_slot(cluster, "shop", random_key())
    assert record.valid and record.index == 3 and record.name == "keymount-key-3"
    assert [(f.secret, f.number) for f in cluster.keyring("shop").files] == \
        [("keymount-key-2", 1), ("keymount-key-3", 3)]


def test_retiring_a_numbered_key_made_invalid_by_a_setting_says_its_number_stays_reserved(
        monkeypatch, capsys):
    # k2 (number 2) holds base64 text, invalid under --key-encoding raw: it keeps its
    # number, and retiring it keeps that number reserved. The CLI said it "had no number".
    raw = Settings(key_encoding="raw")
    k1 = key_secret("k1", random_key(), index=1, annotations={"keymount.io/numbers-used": "1"})
    k2 = key_secret("k2", None, index=2, annotations={"keymount.io/numbers-used": "1-2"})
    k2["data"]["encryption-key"] = base64.b64encode(base64.b64encode(random_key())).decode()
    k3 = key_secret("k3", random_key(), index=3, annotations={"keymount.io/numbers-used": "1-3"})

    class Cluster(RetireCluster):
        def keyring(self, namespace):
            return build_keyring(namespace, [parse_key_secret(s, settings=raw)
                                             for s in self.secrets])
    cluster = Cluster([k1, k2, k3], [])
    assert [r.name for r in cluster.keyring("shop").invalid] == ["k2"]
    monkeypatch.setattr(cli_keys, "connect_namespace", lambda args, settings: (cluster, "shop"))
    monkeypatch.setattr(cli_keys, "_settings", lambda args: raw)
    args = argparse.Namespace(name="k2", yes=True, force=False, namespace="shop",
                              key_field="encryption-key", key_selector=None)
    assert cli_keys.cmd_retire(args) == 0
    out = capsys.readouterr().out
    assert "number 2 stays reserved" in out, out
