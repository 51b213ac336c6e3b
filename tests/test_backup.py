"""Backups (pure parts): the document, age encryption through pyrage, and the plan of
a restore, refused whole on any conflict."""

from __future__ import annotations

import re

import pytest
from pyrage import x25519

from webhook.backup import (
    BackupError,
    collect,
    decrypt,
    encode,
    encrypt,
    plan_restore,
    read_identities,
)
from webhook.config import Settings
from webhook.key_secrets import parse_key_secret
from webhook.keys import build_keyring

from builders import key_secret, keyring_of, random_key

SETTINGS = Settings()
RETIRED = {"keymount.io/retired": "2026-11-29T00:00:00Z"}


def three_keys():
    """Keys 1 and 3, and number 2 retired in between, as keymount made them."""
    keys = [random_key(), random_key()]
    secrets = [key_secret("k1", keys[0], index=1, annotations={"keymount.io/numbers-used": "1"}),
               key_secret("k2", None, index=2, annotations={**RETIRED,
                                                            "keymount.io/numbers-used": "1-2"}),
               key_secret("k3", keys[1], index=3, annotations={"keymount.io/numbers-used": "1-3"})]
    ring = build_keyring("shop", [parse_key_secret(s, settings=SETTINGS) for s in secrets])
    return secrets, {"shop": ring}, keys


def test_a_backup_round_trips_through_age_with_every_number_and_byte():
    secrets, rings, keys = three_keys()
    identity = x25519.Identity.generate()
    ciphertext = encrypt(encode(collect(secrets, rings, settings=SETTINGS)),
                         recipients=[str(identity.to_public())])
    assert all(key not in ciphertext for key in keys)
    restored = decrypt(ciphertext, identities=[identity])
    assert [(k.name, k.number, k.retired) for k in restored] == [
        ("k1", 1, False), ("k2", 2, True), ("k3", 3, False)]
    assert [k.value for k in restored if not k.retired] == keys
    assert restored[2].numbers_used == "1-3"


def test_a_restored_key_keeps_the_time_it_was_first_activated():
    """Restored, a key two years old is two years old: its rotation and --max-key-age
    count from its first activation, not from the restore (the mutating webhook keeps
    an earlier activated-at on a new key)."""
    from webhook.backup import restored_secret
    secrets, _, _ = three_keys()
    secrets[0]["metadata"]["annotations"]["keymount.io/activated-at"] = "2024-11-30T09:00:00Z"
    rings = {"shop": build_keyring("shop", [parse_key_secret(s, settings=SETTINGS)
                                            for s in secrets])}
    identity = x25519.Identity.generate()
    ciphertext = encrypt(encode(collect(secrets, rings, settings=SETTINGS)),
                         recipients=[str(identity.to_public())])
    restored = decrypt(ciphertext, identities=[identity])
    assert [k.activated_text for k in restored] == ["2024-11-30T09:00:00Z", "", ""]
    manifests = [restored_secret(k, settings=SETTINGS,
                                 labels={"keymount.io/encryption-key": "true"})
                 for k in restored]
    assert [m["metadata"]["annotations"].get("keymount.io/activated-at")
            for m in manifests] == ["2024-11-30T09:00:00Z", None, None]


def test_a_passphrase_backup_needs_the_same_passphrase():
    secrets, rings, _ = three_keys()
    ciphertext = encrypt(encode(collect(secrets, rings, settings=SETTINGS)),
                         passphrase="correct horse")
    assert len(decrypt(ciphertext, passphrase="correct horse")) == 3
    with pytest.raises(BackupError, match="wrong identity or passphrase"):
        decrypt(ciphertext, passphrase="wrong")


def test_a_passphrase_backup_too_costly_for_this_machine_is_not_called_a_wrong_passphrase():
    # age refuses a scrypt work factor far over what it measures this machine does in a
    # second (a backup made on a faster machine, or a busy one now) before trying the
    # passphrase: "wrong passphrase" would send its owner looking for another.
    secrets, rings, _ = three_keys()
    ciphertext = encrypt(encode(collect(secrets, rings, settings=SETTINGS)),
                         passphrase="correct horse")
    costly = re.sub(rb"^(-> scrypt \S+) \d+$", rb"\1 30", ciphertext, count=1, flags=re.M)
    assert costly != ciphertext
    with pytest.raises(BackupError) as refused:
        decrypt(costly, passphrase="correct horse")
    assert "costlier to try than age accepts on this machine" in str(refused.value)
    assert "wrong identity or passphrase" not in str(refused.value)


@pytest.mark.parametrize("damage", [lambda b: b[:-20], lambda b: b[:-1] + bytes([b[-1] ^ 1]),
                                    lambda b: b[:len(b) // 2] + b"x" + b[len(b) // 2 + 1:]],
                         ids=["truncated", "last-byte-flipped", "middle-byte-changed"])
def test_a_damaged_backup_is_refused_whole_without_quoting_it(damage):
    secrets, rings, keys = three_keys()
    identity = x25519.Identity.generate()
    ciphertext = encrypt(encode(collect(secrets, rings, settings=SETTINGS)),
                         recipients=[str(identity.to_public())])
    with pytest.raises(BackupError) as info:
        decrypt(damage(ciphertext), identities=[identity])
    assert "nothing was restored" in str(info.value)


def test_another_identity_cannot_read_it():
    secrets, rings, _ = three_keys()
    ciphertext = encrypt(encode(collect(secrets, rings, settings=SETTINGS)),
                         recipients=[str(x25519.Identity.generate().to_public())])
    with pytest.raises(BackupError, match="cannot decrypt"):
        decrypt(ciphertext, identities=[x25519.Identity.generate()])


def test_an_identity_file_with_comments_is_read_and_garbage_is_refused():
    identity = x25519.Identity.generate()
    assert len(read_identities(f"# created: today\n# public key: x\n{identity}\n")) == 1
    with pytest.raises(BackupError, match="not an age secret key"):
        read_identities("AGE-SECRET-KEY-1NOPE\n")


def test_a_legacy_key_must_be_pinned_before_a_backup():
    secret = key_secret("old", random_key(), legacy=True)
    rings = {"shop": keyring_of(secret)}
    with pytest.raises(BackupError, match="keymount keys pin -n shop"):
        collect([secret], rings, settings=SETTINGS)


def backed_up():
    secrets, rings, _ = three_keys()
    return collect(secrets, rings, settings=SETTINGS), secrets


def test_restoring_into_an_empty_namespace_creates_every_key_in_number_order():
    keys, _ = backed_up()
    plan = plan_restore(keys, {})
    assert [k.number for k in plan.create] == [1, 2, 3] and plan.present == ()


def test_the_same_keys_already_present_are_a_no_op():
    keys, secrets = backed_up()
    plan = plan_restore(keys, {"shop": keyring_of(*secrets)})
    assert plan.create == () and len(plan.present) == 3


def test_a_number_held_by_a_different_key_refuses_the_whole_restore():
    keys, _ = backed_up()
    other = key_secret("intruder", random_key(), index=3,
                       annotations={"keymount.io/numbers-used": "3"})
    with pytest.raises(BackupError, match="number 3 in namespace shop is held by key Secret "
                                          "'intruder'"):
        plan_restore(keys, {"shop": keyring_of(other)})


def test_a_number_used_since_the_backup_refuses_the_whole_restore():
    keys, _ = backed_up()
    later = key_secret("k9", random_key(), index=9, annotations={"keymount.io/numbers-used": "1-9"})
    with pytest.raises(BackupError, match="used after the backup"):
        plan_restore(keys, {"shop": keyring_of(later)})


def test_a_staged_key_is_backed_up_and_restored_staged_with_its_bytes():
    import base64

    from webhook.backup import restored_secret

    from builders import slot_secret
    secrets, _, _ = three_keys()
    key = random_key()
    staged = slot_secret(4)
    staged["data"]["staged-encryption-key"] = base64.b64encode(key).decode()
    secrets.append(staged)
    rings = {"shop": build_keyring("shop", [parse_key_secret(s, settings=SETTINGS)
                                            for s in secrets])}
    identity = x25519.Identity.generate()
    ciphertext = encrypt(encode(collect(secrets, rings, settings=SETTINGS)),
                         recipients=[str(identity.to_public())])
    restored = decrypt(ciphertext, identities=[identity])  # checks every fingerprint
    [back] = [k for k in restored if k.number == 4]
    assert (back.name, back.staged, back.value) == ("keymount-key-4", True, key)
    manifest = restored_secret(back, settings=SETTINGS,
                               labels={"keymount.io/encryption-key": "true"})
    assert manifest["data"] == {"staged-encryption-key": base64.b64encode(key).decode()}
    assert parse_key_secret(manifest, settings=SETTINGS).state == "staged"


# --- the whole file judged before anything is written ------------------------------------

def entry(name, number, *, namespace="shop", retired=False, numbers_used=""):
    from webhook.backup import BackedUpKey
    from webhook.keys import check_key
    value = None if retired else random_key()
    return BackedUpKey(namespace, name, number, "", "" if retired else
                       check_key(value).fingerprint, numbers_used or str(number), retired,
                       value)


@pytest.mark.parametrize(("entries", "message"), [
    ([entry("dup-a", 1), entry("dup-b", 1)],
     "two entries with number 1 in namespace shop: 'dup-a' (fingerprint"),
    ([entry("dup", 1), entry("dup", 2)],
     "two entries named 'dup' in namespace shop: number 1 (fingerprint"),
    ([entry("k1", 1), entry("k2", 2, retired=True), entry("k2b", 2)],
     "two entries with number 2 in namespace shop: 'k2' (retired) and 'k2b'"),
], ids=["same-number", "same-name", "same-number-as-a-retired-entry"])
def test_a_file_that_contradicts_itself_is_refused_whole_naming_both_entries(entries, message):
    with pytest.raises(BackupError) as info:
        plan_restore(entries, {})
    assert message in str(info.value) and "nothing was restored" in str(info.value)


@pytest.mark.parametrize("entries", [
    [entry("k1", 1), entry("k1", 1, namespace="web")],
    [entry("k1", 1), entry("k2", 1, namespace="web")],
], ids=["same-name-other-namespace", "same-number-other-namespace"])
def test_the_same_number_or_name_in_two_namespaces_is_no_conflict(entries):
    assert len(plan_restore(entries, {}).create) == 2


@pytest.mark.parametrize(("names", "message"), [
    ({"shop": None}, "namespace(s) shop do not exist; create them first (kubectl create "
                     "namespace shop)"),
    ({"shop": frozenset({"k2"})}, "Secret 'k2' in namespace shop exists and is not a key "
                                  "Secret"),
], ids=["namespace-missing", "name-held-by-another-secret"])
def test_the_cluster_is_checked_for_every_entry_before_anything_is_written(names, message):
    keys, _ = backed_up()
    with pytest.raises(BackupError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_restore(keys, {}, secret_names=names)


def test_keys_are_created_in_the_order_they_were_made_not_by_number():
    # Key 2 was imported below the active key 5 (it records 1-5, so it came later):
    # written first, its record would make number 5 look used before.
    keys = [entry("k2", 2, numbers_used="1-5"), entry("k5", 5, numbers_used="1,5"),
            entry("k1", 1, numbers_used="1")]
    assert [k.name for k in plan_restore(keys, {}).create] == ["k1", "k5", "k2"]


@pytest.mark.parametrize("damage", [None, lambda b: b[:-20], lambda b: b[:-1] + bytes([b[-1] ^ 1])],
                         ids=["intact", "truncated", "last-byte-flipped"])
@pytest.mark.parametrize("secret", ["identity", "passphrase"])
def test_a_backup_file_is_read_as_a_stream_and_refused_whole_when_damaged(
        tmp_path, damage, secret):
    from webhook.backup import decrypt_file
    secrets, rings, keys = three_keys()
    identity = x25519.Identity.generate()
    plain = encode(collect(secrets, rings, settings=SETTINGS))
    ciphertext = (encrypt(plain, passphrase="pw") if secret == "passphrase"
                  else encrypt(plain, recipients=[str(identity.to_public())]))
    path = tmp_path / "b.age"
    path.write_bytes(damage(ciphertext) if damage else ciphertext)
    how = {"passphrase": "pw"} if secret == "passphrase" else {"identities": [identity]}
    if damage is None:
        assert [k.value for k in decrypt_file(str(path), **how) if not k.retired] == keys
        return
    with pytest.raises(BackupError, match="nothing was restored"):
        decrypt_file(str(path), **how)


def test_a_backed_up_key_and_a_restore_plan_print_no_key_bytes():
    """A decrypted backup entry holds the key's bytes; printing it (a debugger, an error
    reporter that shows a traceback's locals, pytest --showlocals) must show its
    fingerprint and never the bytes, as DecodedKey keeps its key out of repr()."""
    import base64
    import dataclasses
    import traceback
    secrets, rings, keys = three_keys()
    identity = x25519.Identity.generate()
    restored = decrypt(encrypt(encode(collect(secrets, rings, settings=SETTINGS)),
                               recipients=[str(identity.to_public())]), identities=[identity])
    twin = dataclasses.replace(restored[0], name="k1-twin")
    with pytest.raises(BackupError) as refused:  # raised with every entry in its locals
        plan_restore([*restored, twin], {})
    shown = " ".join([repr(restored), str(restored), repr(plan_restore(restored, {})),
                      # its frames from plan_restore on (this test's own locals hold keys)
                      "".join(traceback.TracebackException(
                          BackupError, refused.value, refused.tb.tb_next,
                          capture_locals=True).format())])
    assert restored[0].fingerprint in shown
    for key in keys:
        spellings = [base64.b64encode(key).decode(), key.hex(), repr(key)[2:-1]]
        assert not any(s in shown for s in spellings), "key bytes printed (not shown here)"


@pytest.mark.parametrize("fault", ["fingerprint", "format"])
@pytest.mark.parametrize("read", ["bytes", "file"])
def test_a_refused_backup_leaves_no_key_bytes_in_its_tracebacks_locals(tmp_path, fault, read):
    """A backup refused after decryption (an entry whose fingerprint does not match, a
    document that is no keymount backup) is refused with no key bytes in the locals of
    any frame its error passed through: the decrypted text holds every key."""
    import base64
    import dataclasses
    import json
    import traceback

    from webhook.backup import decrypt_file
    secrets, rings, keys = three_keys()
    entries = collect(secrets, rings, settings=SETTINGS)
    if fault == "fingerprint":
        entries[0] = dataclasses.replace(entries[0], fingerprint="000000")
        plain = encode(entries)
    else:
        plain = json.dumps({**json.loads(encode(entries)), "format": "other/v1"}).encode()
    identity = x25519.Identity.generate()
    ciphertext = encrypt(plain, recipients=[str(identity.to_public())])
    path = tmp_path / "b.age"
    path.write_bytes(ciphertext)
    with pytest.raises(BackupError) as refused:
        if read == "bytes":
            decrypt(ciphertext, identities=[identity])
        else:
            decrypt_file(str(path), identities=[identity])
    del secrets, entries, plain  # this test's own locals hold the keys
    shown = "".join(traceback.TracebackException(
        BackupError, refused.value, refused.tb.tb_next, capture_locals=True).format())
    for key in keys:
        spellings = [base64.b64encode(key).decode(), key.hex(), repr(key)[2:-1]]
        assert not any(s in shown for s in spellings), "key bytes in the locals (not shown)"
