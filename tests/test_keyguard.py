"""The number stamp and the key-Secret guard (pure): every attack of a user who may
write Secrets, and what a key writer may still do."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime

import jsonpatch
import pytest

from webhook.admission import parse_review
from webhook.config import Settings
from webhook.decisions import review_mutation, review_validation
from webhook.injection import Injected, inject_keys
from webhook.key_secrets import parse_key_secret
from webhook.keyguard import NAMESPACE_CONTROLLER, parse_key_writers
from webhook.keys import build_keyring

from builders import key_secret, keyring_of, pod, random_key, review, slot_secret

SETTINGS = Settings()
WRITERS = parse_key_writers("group:keymount:key-writers,user:alice", own_user="keymount-sa")
RETIRED = {"keymount.io/retired": "2026-11-29T00:00:00Z"}
NOW = datetime(2026, 12, 2, 13, 0, 0, 123000, tzinfo=UTC)  # keymount's clock in reviews
STAMPED = "2026-12-02T13:00:00Z"


def parse(body):
    return parse_review(json.dumps(body).encode())


def through_api(obj, *, keyring, operation="CREATE", old=None, user="alice", groups=(),
                writers=WRITERS, now=NOW):
    """What the API server does: /mutate, apply its patch, then /validate the result."""
    body = review(obj, kind="Secret", operation=operation, old=old, username=user)
    body["request"]["userInfo"]["groups"] = list(groups)
    body["request"]["name"] = ((obj or old or {}).get("metadata") or {}).get("name", "")
    stored = obj
    if obj is not None:
        mutation = review_mutation(parse(body), keyring=keyring, settings=SETTINGS, now=now)
        assert mutation.response["allowed"] is True
        if "patch" in mutation.response:
            ops = json.loads(base64.b64decode(mutation.response["patch"]))
            stored = jsonpatch.apply_patch(obj, ops)
            body["request"]["object"] = stored
    verdict = review_validation(parse(body), keyring=keyring, settings=SETTINGS,
                                writers=writers)
    return verdict, stored


def annotations(obj):
    return obj["metadata"].get("annotations", {})


def three_keys():
    """Keys 1, 2, 3 as keymount makes them: each records the numbers used before it."""
    return (
        key_secret("k1", random_key(), index=1, annotations={"keymount.io/numbers-used": "1"}),
        key_secret("k2", random_key(), index=2, annotations={"keymount.io/numbers-used": "1-2"}),
        key_secret("k3", random_key(), index=3, annotations={"keymount.io/numbers-used": "1-3"}))


def ring_of_three():
    return keyring_of(*three_keys())


# --- the number stamp ------------------------------------------------------------------------

def test_a_key_created_without_an_index_gets_the_next_number_and_records_the_used_ones():
    verdict, stored = through_api(key_secret("k4", random_key()), keyring=ring_of_three())
    assert verdict.result == "allowed" and verdict.key.action == "created"
    assert annotations(stored)["keymount.io/key-index"] == "4"
    assert annotations(stored)["keymount.io/numbers-used"] == "1-4"


def test_a_key_created_in_an_empty_namespace_gets_number_1():
    verdict, stored = through_api(key_secret("first", random_key()), keyring=keyring_of())
    assert verdict.result == "allowed"
    assert annotations(stored) == {"keymount.io/key-index": "1",
                                   "keymount.io/numbers-used": "1",
                                   "keymount.io/activated-at": STAMPED}


def test_a_secret_gaining_the_key_label_is_a_create_and_gets_a_number():
    key = random_key()
    old = key_secret("later", key, labels={})
    verdict, stored = through_api(key_secret("later", key), operation="UPDATE", old=old,
                                  keyring=ring_of_three())
    assert verdict.result == "allowed" and annotations(stored)["keymount.io/key-index"] == "4"


def test_an_existing_key_without_an_index_is_pinned_at_its_number_on_its_next_update():
    key = random_key()
    legacy = key_secret("old", key, created="2025-01-01T00:00:00Z")
    ring = keyring_of(legacy, key_secret("k2", random_key(), index=2))
    changed = key_secret("old", key, created="2025-01-01T00:00:00Z",
                         annotations={"team": "payments"})
    verdict, stored = through_api(changed, operation="UPDATE", old=legacy, keyring=ring)
    assert verdict.result == "allowed"
    assert annotations(stored)["keymount.io/key-index"] == "1"


def test_an_update_that_drops_keymounts_annotations_gets_them_back():
    # A GitOps sync or External Secrets rewriting annotations must not fight the guard.
    key = random_key()
    old = key_secret("k2", key, index=2, annotations={"keymount.io/numbers-used": "1-2"})
    synced = key_secret("k2", key, annotations={"team": "payments"})
    verdict, stored = through_api(synced, operation="UPDATE", old=old, keyring=keyring_of(old))
    assert verdict.result == "allowed"
    assert annotations(stored) == {"team": "payments", "keymount.io/key-index": "2",
                                   "keymount.io/numbers-used": "1-2"}


def test_an_unlabelled_secret_is_neither_stamped_nor_judged():
    verdict, stored = through_api(key_secret("plain", b"x", labels={}), keyring=keyring_of())
    assert verdict.result == "allowed" and verdict.key.action == "none"
    assert "keymount.io/key-index" not in annotations(stored)


# --- attacks by someone who may write Secrets but is no key writer -----------------------------

@pytest.mark.parametrize("index", [None, 999], ids=["stamped", "index-999"])
def test_a_non_writer_cannot_create_a_key_and_is_told_who_may(index):
    verdict, _ = through_api(key_secret("evil", random_key(), index=index),
                             keyring=ring_of_three(), user="mallory", groups=("devs",))
    assert verdict.result == "denied"
    assert "user 'mallory' may not create key Secret 'evil'" in verdict.message
    assert "group:keymount:key-writers, user:alice" in verdict.message


def test_a_non_writer_cannot_give_an_existing_secret_the_key_label():
    key = random_key()
    verdict, _ = through_api(key_secret("sneaky", key), operation="UPDATE",
                             old=key_secret("sneaky", key, labels={}), keyring=ring_of_three(),
                             user="mallory")
    assert verdict.result == "denied" and "may not create" in verdict.message


def test_a_writer_by_group_membership_may_create():
    verdict, _ = through_api(key_secret("k4", random_key()), keyring=ring_of_three(),
                             user="bob", groups=("keymount:key-writers",))
    assert verdict.result == "allowed"


def test_keymounts_own_user_may_create_its_generated_key():
    verdict, _ = through_api(key_secret("keymount-key-1", random_key(), index=1),
                             keyring=keyring_of(), user="keymount-sa")
    assert verdict.result == "allowed"


def test_without_key_writers_rbac_alone_decides():
    verdict, _ = through_api(key_secret("k4", random_key()), keyring=ring_of_three(),
                             user="mallory", writers=parse_key_writers(None))
    assert verdict.result == "allowed"


def test_a_duplicate_number_is_refused_even_for_a_writer():
    verdict, _ = through_api(key_secret("dup", random_key(), index=2), keyring=ring_of_three())
    assert verdict.result == "denied"
    assert "number 2 is already held by key Secret 'k2'" in verdict.message
    assert "keymount assigns the next number (4)" in verdict.message


def test_a_number_used_by_a_deleted_tombstone_is_never_given_again():
    # k1 was retired and its tombstone deleted: only k2's and k3's records remember it.
    ring = keyring_of(
        key_secret("k2", random_key(), index=2, annotations={"keymount.io/numbers-used": "1-2"}),
        key_secret("k3", random_key(), index=3, annotations={"keymount.io/numbers-used": "1-3"}))
    verdict, _ = through_api(key_secret("again", random_key(), index=1), keyring=ring)
    assert verdict.result == "denied" and "number 1 was used before" in verdict.message
    _, stored = through_api(key_secret("next", random_key()), keyring=ring)
    assert annotations(stored)["keymount.io/key-index"] == "4"


def test_an_unused_low_number_is_allowed_for_an_import_with_a_warning():
    ring = keyring_of(key_secret("k5", random_key(), index=5,
                                 annotations={"keymount.io/numbers-used": "5"}))
    verdict, _ = through_api(key_secret("legacy-data", random_key(), index=2), keyring=ring)
    assert verdict.result == "allowed"
    assert any("below the active key 'k5'" in w for w in verdict.response["warnings"])


def test_an_invalid_key_is_refused_with_its_length():
    verdict, _ = through_api(key_secret("short", b"short"), keyring=keyring_of())
    assert verdict.result == "denied"
    assert "holds 5 bytes" in verdict.message and "keymount keys check" in verdict.message


def test_a_key_that_skipped_the_mutating_webhook_is_refused():
    body = review(key_secret("raw", random_key()), kind="Secret", username="alice")
    verdict = review_validation(parse(body), keyring=keyring_of(), settings=SETTINGS,
                                writers=WRITERS)
    assert verdict.result == "denied" and "mutating webhook stamps it" in verdict.message


def update(ring, old, new, **kw):
    return through_api(new, operation="UPDATE", old=old, keyring=ring, **kw)[0]


@pytest.mark.parametrize("user", ["mallory", "alice"], ids=["non-writer", "writer"])
def test_changing_a_keys_index_is_refused_for_everyone(user):
    key = random_key()
    old = key_secret("k1", key, index=1)
    verdict = update(keyring_of(old), old, key_secret("k1", key, index=5), user=user)
    assert verdict.result == "denied" and "has number 1 for good" in verdict.message


def test_removing_a_keys_index_puts_it_back_or_is_refused():
    key = random_key()
    old = key_secret("k1", key, index=1)
    _, stored = through_api(key_secret("k1", key), operation="UPDATE", old=old,
                            keyring=keyring_of(old))
    assert annotations(stored)["keymount.io/key-index"] == "1"  # the stamp restores it
    body = review(key_secret("k1", key, annotations={"keymount.io/numbers-used": "1"}),
                  kind="Secret", operation="UPDATE", old=old)
    body["request"]["name"] = "k1"
    direct = review_validation(parse(body), keyring=keyring_of(old), settings=SETTINGS,
                               writers=WRITERS)
    assert direct.result == "denied" and "has number 1 for good" in direct.message


@pytest.mark.parametrize("extra", [{}, {"keymount.io/allow-delete": "true"}],
                         ids=["plain", "with-old-allow-delete"])
def test_replacing_a_keys_bytes_is_refused_for_everyone(extra):
    old = key_secret("k1", random_key(), index=1, annotations=extra)
    verdict = update(keyring_of(old), old, key_secret("k1", random_key(), index=1,
                                                       annotations=extra))
    assert verdict.result == "denied"
    assert "replaces the key material" in verdict.message and "keys rotate" in verdict.message


# Two keys with one fingerprint: it is a 3-byte key check value, for people to compare,
# and one is found for any published fingerprint in seconds (2**24 AES key schedules).
VICTIM = bytes.fromhex("3c2df1b74dc2f148bc6f76a17c9df3901acc31b0518d766138fc4038eb1582f7")
FORGED = bytes.fromhex("39f196b74dc2f148bc6f76a17c9df3901acc31b0518d766138fc4038eb1582f7")


def as_stored(secret, raw):
    """The same key, stored in another form: its base64 text as the field's bytes."""
    changed = json.loads(json.dumps(secret))
    changed["data"]["encryption-key"] = base64.b64encode(base64.b64encode(raw)).decode()
    return changed


@pytest.mark.parametrize("user", ["mallory", "alice"], ids=["anyone", "a-key-writer"])
@pytest.mark.parametrize("replacement", ["same-fingerprint", "same-key-another-form"])
def test_a_keys_stored_bytes_never_change_whatever_their_fingerprint(user, replacement):
    from webhook.keys import fingerprint_key
    assert VICTIM != FORGED and fingerprint_key(VICTIM) == fingerprint_key(FORGED)
    ann = {"keymount.io/numbers-used": "1-2"}
    old = key_secret("k2", VICTIM, index=2, annotations=ann)
    ring = keyring_of(key_secret("k1", random_key(), index=1), old)
    new = key_secret("k2", FORGED, index=2, annotations=ann) \
        if replacement == "same-fingerprint" else as_stored(old, VICTIM)
    verdict = update(ring, old, new, user=user)
    assert verdict.result == "denied", verdict.message
    assert "replaces the key material" in verdict.message


def test_pinning_a_legacy_key_cannot_swap_it_for_one_of_the_same_fingerprint():
    legacy = key_secret("old", VICTIM, created="2025-01-01T00:00:00Z")
    ring = keyring_of(legacy)
    forged = key_secret("old", FORGED, created="2025-01-01T00:00:00Z")
    # The mutating webhook's own pin (on any update of a legacy key) does not apply...
    verdict, stored = through_api(forged, operation="UPDATE", old=legacy, keyring=ring)
    assert verdict.result == "denied", verdict.message
    # ...and neither does a pin the request spells out.
    pinned = key_secret("old", FORGED, index=1, created="2025-01-01T00:00:00Z",
                        annotations={"keymount.io/numbers-used": "1"})
    verdict = update(ring, legacy, pinned)
    assert verdict.result == "denied", verdict.message


def test_pinning_a_legacy_key_cannot_set_its_activation_or_staging_time():
    """A later activated-at would make the key look new: rotation and --max-key-age
    would stop acting on it."""
    key = random_key()
    legacy = key_secret("old", key, created="2025-01-01T00:00:00Z")
    ring = keyring_of(legacy, key_secret("k2", random_key(), index=2))
    for annotation in ("keymount.io/activated-at", "keymount.io/staged-at"):
        pinned = key_secret("old", key, created="2025-01-01T00:00:00Z",
                            annotations={annotation: "2099-01-01T00:00:00Z"})
        verdict, _ = through_api(pinned, operation="UPDATE", old=legacy, keyring=ring)
        assert verdict.result == "denied" and annotation in verdict.message


def changed(secret, **top):
    new = json.loads(json.dumps(secret))
    meta = top.pop("metadata", {})
    new.update(top)
    new["metadata"].update(meta)
    return new


OWNER = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "1"}


@pytest.mark.parametrize(("change", "writer_may"), [
    ({"immutable": True}, False),
    ({"metadata": {"ownerReferences": [OWNER]}}, True),
    ({"metadata": {"finalizers": ["example.com/hold"]}}, True),
    ({"metadata": {"annotations": {"keymount.io/numbers-used": "1", "team": "pay"}}}, True),
], ids=["made-immutable", "given-an-owner", "given-a-finalizer", "another-annotation"])
@pytest.mark.parametrize("user", ["mallory", "alice"], ids=["anyone", "a-key-writer"])
def test_how_long_a_key_lives_is_not_anyones_to_change(change, writer_may, user):
    """Immutable, no key could ever be retired (retiring removes its material); an
    owner's deletion or a finalizer would act on it behind the key writers' backs."""
    old = key_secret("k1", random_key(), index=1, annotations={"keymount.io/numbers-used": "1"})
    verdict = update(keyring_of(old), old, changed(old, **change), user=user)
    plain_annotation = "annotations" in change.get("metadata", {})
    allowed = plain_annotation or (user == "alice" and writer_may)
    assert (verdict.result != "denied") is allowed, verdict.message


def test_a_key_cannot_be_created_immutable():
    verdict, _ = through_api(changed(key_secret("k4", random_key()), immutable=True),
                             keyring=ring_of_three())
    assert verdict.result == "denied" and "cannot be immutable" in verdict.message


def broken(name="broken", *, created="2026-01-02T00:00:00Z", **kw):
    """An invalid key Secret keymount never numbered (keymount 0.1's, or written while
    the webhooks were away)."""
    return key_secret(name, b"short", created=created, **kw)


def test_repairing_an_invalid_secret_is_a_new_key_with_the_next_number():
    """Not a deleted key's number (records under it would open with another key)."""
    k2 = key_secret("k2", random_key(), index=2, annotations={"keymount.io/numbers-used": "1-2"})
    k3 = key_secret("k3", random_key(), index=3, annotations={"keymount.io/numbers-used": "1-3"})
    old = broken()
    ring = keyring_of(k2, k3, old)
    assert 1 in ring.used  # key 1 was retired and its tombstone deleted
    verdict, stored = through_api(key_secret("broken", random_key(),
                                             created="2026-01-02T00:00:00Z"),
                                  operation="UPDATE", old=old, keyring=ring)
    assert verdict.result == "allowed" and verdict.key.action == "created", verdict.message
    assert annotations(stored)["keymount.io/key-index"] == "4"
    assert keyring_of(k2, k3, stored).number_of("broken") == 4
    # ...and only a key writer's to make.
    refused, _ = through_api(key_secret("broken", random_key()), operation="UPDATE", old=old,
                             keyring=ring, user="mallory")
    assert refused.result == "denied"


def test_repairing_an_older_invalid_secret_moves_no_legacy_key():
    b = key_secret("b", random_key(), created="2026-02-01T00:00:00Z")  # legacy number 1
    c = key_secret("c", random_key(), created="2026-03-01T00:00:00Z")  # legacy number 2
    old = broken("a", created="2026-01-01T00:00:00Z")
    ring = keyring_of(b, c, old)
    verdict, stored = through_api(key_secret("a", random_key(), created="2026-01-01T00:00:00Z"),
                                  operation="UPDATE", old=old, keyring=ring)
    assert verdict.result == "allowed", verdict.message
    after = keyring_of(b, c, stored)
    assert (after.number_of("b"), after.number_of("c"), after.number_of("a")) == (1, 2, 3)


def test_repairing_an_invalid_secret_into_a_second_staged_key_is_refused():
    k1 = key_secret("k1", random_key(), index=1, annotations={"keymount.io/numbers-used": "1"})
    staged = staged_as_stored(2, random_key())
    old = broken("keymount-key-3", index=3)
    del old["metadata"]["annotations"]["keymount.io/numbers-used"]  # never numbered
    ring = keyring_of(k1, staged, old)
    new = json.loads(json.dumps(old))
    new["data"] = {"staged-encryption-key": base64.b64encode(random_key()).decode()}
    verdict, _ = through_api(new, operation="UPDATE", old=old, keyring=ring)
    assert verdict.result == "denied", verdict.message  # judged as the new key it is
    # A numbered key made invalid by a settings change, staged while another is.
    numbered = broken("keymount-key-3", index=3)
    staging = json.loads(json.dumps(numbered))
    staging["data"] = {"staged-encryption-key": base64.b64encode(random_key()).decode()}
    verdict, _ = through_api(staging, operation="UPDATE", old=numbered,
                             keyring=keyring_of(k1, staged, numbered))
    assert verdict.result == "denied", verdict.message


@pytest.mark.parametrize(("recorded", "allowed"), [
    ("1-2,999999999", False), ("1-2,998999999", True), ("1-2,5000", True)],
    ids=["at-the-top", "a-million-below-and-the-next-counts-on", "a-gap"])
def test_a_new_key_may_not_record_numbers_that_leave_none_for_the_next(recorded, allowed):
    """Numbers have nine digits: one recorded 999999999 would have every later key
    stamped with a ten-digit number, refused, and no rotation ever again."""
    k1 = key_secret("k1", random_key(), index=1, annotations={"keymount.io/numbers-used": "1"})
    imported = key_secret("k2", random_key(), index=2,
                          annotations={"keymount.io/numbers-used": recorded})
    verdict, stored = through_api(imported, keyring=keyring_of(k1))
    assert (verdict.result == "allowed") is allowed, verdict.message
    if allowed:
        after, _ = through_api(key_secret("k3", random_key()), keyring=keyring_of(k1, stored))
        assert after.result == "allowed", after.message
    else:  # nor by naming the number itself
        top, _ = through_api(key_secret("k9", random_key(), index=999999999),
                             keyring=keyring_of(k1))
        assert top.result == "denied" and "up to 998999999" in top.message


def test_removing_the_key_label_is_refused():
    key = random_key()
    old = key_secret("k1", key, index=1)
    verdict = update(keyring_of(old), old, key_secret("k1", key, index=1, labels={}))
    assert verdict.result == "denied" and "removes the key label" in verdict.message


def test_changing_the_record_of_used_numbers_is_refused():
    key = random_key()
    old = key_secret("k2", key, index=2, annotations={"keymount.io/numbers-used": "1-2"})
    new = key_secret("k2", key, index=2, annotations={"keymount.io/numbers-used": "2"})
    assert update(keyring_of(old), old, new).result == "denied"


def test_anyone_may_change_other_metadata_of_a_key():
    key = random_key()
    old = key_secret("k1", key, index=1)
    new = key_secret("k1", key, index=1, annotations={"owner": "payments"})
    assert update(keyring_of(old), old, new, user="mallory").result == "allowed"


# --- rotation slots: names running Pods already list ---------------------------------------

@pytest.mark.parametrize("user", ["mallory", "alice"], ids=["non-writer", "writer"])
def test_an_unlabelled_secret_may_not_take_a_reserved_slot_name(user):
    # Running Pods list keymount-key-4 as an optional source: the kubelet would mount
    # any Secret of that name as encryption-key-4, the newest key.
    verdict, _ = through_api(key_secret("keymount-key-4", random_key(), labels={}),
                             keyring=ring_of_three(), user=user)
    assert verdict.result == "denied"
    assert "reserved for encryption key number 4" in verdict.message


def test_a_key_with_a_reserved_name_gets_that_number():
    verdict, stored = through_api(key_secret("keymount-key-5", random_key()),
                                  keyring=ring_of_three())
    assert verdict.result == "allowed"
    assert annotations(stored)["keymount.io/key-index"] == "5"


def test_a_key_with_a_reserved_name_and_another_number_is_refused():
    verdict, _ = through_api(key_secret("keymount-key-9", random_key(), index=4),
                             keyring=ring_of_three())
    assert verdict.result == "denied" and "reserved for key number 9" in verdict.message


def test_a_reserved_name_whose_number_was_used_is_refused():
    verdict, _ = through_api(key_secret("keymount-key-2", random_key()),
                             keyring=ring_of_three())
    assert verdict.result == "denied" and "number 2 is already held" in verdict.message


def test_other_unlabelled_secrets_are_not_judged():
    verdict, _ = through_api(key_secret("keymount-key-x", b"x", labels={}),
                             keyring=ring_of_three(), user="mallory")
    assert verdict.result == "allowed"


# --- retiring and deleting -------------------------------------------------------------------

def retired(name, index, **extra):
    return key_secret(name, None, index=index, annotations={**RETIRED, **extra})


def test_a_writer_may_retire_an_older_key():
    ring = ring_of_three()
    old = key_secret("k1", random_key(), index=1)
    verdict = update(ring, old, retired("k1", 1))
    assert verdict.result == "allowed" and verdict.key.action == "retired"
    assert verdict.key.number == 1


def test_a_non_writer_may_not_retire():
    old = key_secret("k1", random_key(), index=1)
    verdict = update(ring_of_three(), old, retired("k1", 1), user="mallory")
    assert verdict.result == "denied" and "may not retire" in verdict.message


def test_the_active_key_cannot_be_retired():
    old = key_secret("k3", random_key(), index=3)
    verdict = update(ring_of_three(), old, retired("k3", 3))
    assert verdict.result == "denied"
    assert "is the active key" in verdict.message and "keys rotate" in verdict.message


def test_a_key_without_an_index_cannot_be_retired_before_pinning():
    ring = keyring_of(key_secret("a", random_key()), key_secret("b", random_key(), index=5))
    verdict = update(ring, key_secret("a", random_key()),
                     key_secret("a", None, annotations=RETIRED))
    assert verdict.result == "denied" and "keymount keys pin" in verdict.message


def test_a_retired_key_cannot_get_key_material_back():
    verdict = update(ring_of_three(), retired("k1", 1),
                     key_secret("k1", random_key(), index=1, annotations=RETIRED))
    assert verdict.result == "denied"


def delete(ring, old, user="alice", listed_by=()):
    body = review(None, kind="Secret", operation="DELETE", old=old, username=user)
    body["request"]["name"] = old["metadata"]["name"]
    return review_validation(parse(body), keyring=ring, settings=SETTINGS, writers=WRITERS,
                             listed_by=listed_by)


def test_deleting_a_live_key_is_refused_with_the_retire_command():
    verdict = delete(ring_of_three(), key_secret("k1", random_key(), index=1))
    assert verdict.result == "denied" and "keymount keys retire k1 -n shop" in verdict.message


@pytest.mark.parametrize("annotations", [{"keymount.io/allow-delete": "true"}, {}],
                         ids=["old-allow-delete-annotation", "plain"])
def test_the_allow_delete_annotation_no_longer_allows_a_delete(annotations):
    old = key_secret("k1", random_key(), index=1, annotations=annotations)
    assert delete(ring_of_three(), old).result == "denied"


def test_a_tombstone_whose_number_a_newer_key_records_may_be_deleted_by_a_writer():
    ring = keyring_of(retired("k1", 1, **{"keymount.io/numbers-used": "1"}),
                      key_secret("k2", random_key(), index=2,
                                 annotations={"keymount.io/numbers-used": "1-2"}))
    assert delete(ring, retired("k1", 1)).result == "allowed"
    assert delete(ring, retired("k1", 1), user="mallory").result == "denied"


def recorded_tombstone():
    return keyring_of(retired("k1", 1, **{"keymount.io/numbers-used": "1"}),
                      key_secret("k2", random_key(), index=2,
                                 annotations={"keymount.io/numbers-used": "1-2"}))


def test_a_tombstone_running_pods_still_list_stays_so_nobody_else_can_take_its_name():
    # Pods admitted before a forced retirement list k1 as their file encryption-key-1.
    # Once it is deleted, anyone who may create Secrets could create an unlabelled k1,
    # and the kubelet would mount their bytes there: the name must stay taken.
    verdict = delete(recorded_tombstone(), retired("k1", 1), listed_by=("api-7f9c", "api-x2"))
    assert verdict.result == "denied"
    assert "2 Pod(s) still list it (api-7f9c, api-x2)" in verdict.message
    assert "kubectl rollout restart deployment/NAME -n shop" in verdict.message


def test_a_tombstone_stays_while_keymount_cannot_tell_which_pods_list_it():
    verdict = delete(recorded_tombstone(), retired("k1", 1), listed_by=None)
    assert verdict.result == "denied" and verdict.key.needs_pods  # the server reads them
    assert "could not read which Pods list key Secret 'k1'" in verdict.message


def test_of_two_keys_sharing_a_number_one_that_pods_list_is_retired_not_deleted():
    # Pods admitted before the second key took number 1 list k1 as encryption-key-1:
    # deleting it would free its name just as deleting a tombstone would.
    ring = keyring_of(key_secret("k1", random_key(), index=1),
                      key_secret("k1-restored", random_key(), index=1))
    listed = delete(ring, key_secret("k1", random_key(), index=1), listed_by=("api-x2",))
    assert listed.result == "denied"
    assert "keymount keys retire k1 -n shop" in listed.message
    unknown = delete(ring, key_secret("k1", random_key(), index=1), listed_by=None)
    assert unknown.result == "denied" and unknown.key.needs_pods
    assert delete(ring, key_secret("k1", random_key(), index=1)).result == "allowed"


def test_a_tombstone_that_is_the_only_record_of_its_number_stays():
    ring = keyring_of(retired("k1", 1), key_secret("k2", random_key(), index=2))
    verdict = delete(ring, retired("k1", 1))
    assert verdict.result == "denied" and "only record that number 1" in verdict.message


def test_the_namespace_controller_may_always_delete():
    verdict = delete(ring_of_three(), key_secret("k3", random_key(), index=3),
                     user=NAMESPACE_CONTROLLER)
    assert verdict.result == "allowed"


def test_a_delete_without_old_object_fails_closed():
    body = review(None, kind="Secret", operation="DELETE")
    verdict = review_validation(parse(body), keyring=keyring_of(), settings=SETTINGS,
                                writers=WRITERS)
    assert verdict.result == "denied"


# --- pinning ----------------------------------------------------------------------------------

def test_a_writer_may_pin_a_legacy_key_only_at_its_current_number():
    key = random_key()
    legacy = key_secret("old", key, created="2025-01-01T00:00:00Z")
    ring = keyring_of(legacy, key_secret("k2", random_key(), index=2))
    pinned = key_secret("old", key, created="2025-01-01T00:00:00Z", index=1)
    moved = key_secret("old", key, created="2025-01-01T00:00:00Z", index=7)
    assert update(ring, legacy, pinned).key.action == "pinned"
    assert "would move its file" in update(ring, legacy, moved).message
    assert "may not pin" in update(ring, legacy, pinned, user="mallory").message


# --- key writers --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["admin", "role:x", "serviceaccount:only-name", "user:"],
                         ids=["no-kind", "unknown-kind", "sa-without-namespace", "empty-name"])
def test_a_malformed_key_writers_entry_says_the_form(text):
    with pytest.raises(ValueError, match="user:NAME, group:NAME or serviceaccount"):
        parse_key_writers(text)


def test_a_service_account_writer_matches_its_username():
    writers = parse_key_writers("serviceaccount:ops:rotator")
    from webhook.keyguard import Requester
    assert writers.allows(Requester("system:serviceaccount:ops:rotator"))
    assert not writers.allows(Requester("system:serviceaccount:other:rotator"))


@pytest.mark.parametrize("user", ["alice", "mallory"], ids=["writer", "non-writer"])
def test_either_key_of_a_pair_sharing_a_number_may_be_deleted_by_a_writer_alone(user):
    a = key_secret("a-key", random_key(), index=1, legacy=True)
    b = key_secret("b-key", random_key(), index=1, legacy=True)
    ring = keyring_of(a, b, key_secret("other", random_key(), index=2, legacy=True))
    for secret in (a, b):
        verdict = delete(ring, secret, user=user)
        assert verdict.result == ("allowed" if user == "alice" else "denied"), verdict.message
    # A key outside the pair is still protected.
    assert delete(ring, key_secret("other", random_key(), index=2, legacy=True)).result == \
        "denied"


# --- key slots ------------------------------------------------------------------------

def filled(slot, key):
    stored = json.loads(json.dumps(slot))
    stored["data"]["encryption-key"] = base64.b64encode(key).decode()
    return stored


@pytest.mark.parametrize(("user", "result"), [("alice", "allowed"), ("mallory", "denied")],
                         ids=["writer", "non-writer"])
def test_only_a_writer_reserves_a_slot_and_it_records_the_used_numbers(user, result):
    verdict, stored = through_api(slot_secret(4, numbers_used="4"), keyring=ring_of_three(),
                                  user=user)
    assert verdict.result == result, verdict.message
    if result == "allowed":
        assert verdict.key.action == "reserved" and verdict.key.number == 4
        assert annotations(stored)["keymount.io/numbers-used"] == "1-4"


def test_a_slot_reserved_through_two_processes_with_different_caches_is_allowed():
    # /mutate and /validate may reach different replicas (or --workers): the stamping
    # one has not seen slot 5 yet. A slot's number is its name's, so its record need
    # only prove the stamp ran; it may know less than the judging process (CI saw ten
    # concurrent `keys rotate` refused here).
    reserved = slot_secret(6)  # as `keys rotate` sends it: the stamp records the rest
    del reserved["metadata"]["annotations"]["keymount.io/numbers-used"]
    body = review(reserved, kind="Secret", username="alice")
    body["request"]["name"] = "keymount-key-6"
    stale = keyring_of(*three_keys(), slot_secret(4, numbers_used="1-4"))
    mutation = review_mutation(parse(body), keyring=stale, settings=SETTINGS)
    ops = json.loads(base64.b64decode(mutation.response["patch"]))
    body["request"]["object"] = stored = jsonpatch.apply_patch(reserved, ops)
    assert annotations(stored)["keymount.io/numbers-used"] == "1-4,6"
    newer = keyring_of(*three_keys(), slot_secret(4, numbers_used="1-4"),
                       slot_secret(5, numbers_used="1-5"))
    verdict = review_validation(parse(body), keyring=newer, settings=SETTINGS,
                                writers=WRITERS)
    assert verdict.result == "allowed", verdict.message
    assert verdict.key.action == "reserved" and verdict.key.number == 6


def test_a_slot_that_skipped_the_mutating_webhook_is_refused():
    unstamped = slot_secret(6)
    unstamped["metadata"]["annotations"]["keymount.io/numbers-used"] = "1-3"
    body = review(unstamped, kind="Secret", username="alice")
    body["request"]["name"] = "keymount-key-6"
    verdict = review_validation(parse(body), keyring=ring_of_three(), settings=SETTINGS,
                                writers=WRITERS)
    assert verdict.result == "denied" and "mutating webhook stamps it" in verdict.message


@pytest.mark.parametrize(("user", "result"), [("alice", "allowed"), ("mallory", "denied")],
                         ids=["writer", "non-writer"])
def test_filling_a_slot_is_how_a_writer_makes_a_key(user, result):
    ring = keyring_of(*three_keys(), slot_secret(4))
    key = random_key()
    verdict = update(ring, slot_secret(4), filled(slot_secret(4), key), user=user)
    assert verdict.result == result, verdict.message
    if result == "allowed":
        from webhook.keys import fingerprint_key
        assert (verdict.key.action, verdict.key.number) == ("created", 4)
        assert verdict.key.fingerprint == fingerprint_key(key)
    else:
        assert "may not fill, stage, retire or change key Secret" in verdict.message


def test_a_slot_filled_with_invalid_material_is_refused_with_the_reason():
    ring = keyring_of(*three_keys(), slot_secret(4))
    stored = filled(slot_secret(4), bytes(range(1, 32)))
    verdict = update(ring, slot_secret(4), stored)
    assert verdict.result == "denied" and "31 bytes" in verdict.message


@pytest.mark.parametrize("user", ["alice", "mallory"], ids=["writer", "non-writer"])
def test_nobody_deletes_or_unlabels_an_empty_slot_it_is_retired_instead(user):
    ring = keyring_of(*three_keys(), slot_secret(4))
    assert delete(ring, slot_secret(4), user=user).result == "denied"
    unlabelled = slot_secret(4)
    unlabelled["metadata"]["labels"] = {}
    verdict = update(ring, slot_secret(4), unlabelled, user=user)
    assert verdict.result == "denied"
    assert "keymount keys retire keymount-key-4 -n shop" in verdict.message
    retired = slot_secret(4)
    retired["metadata"]["annotations"]["keymount.io/retired"] = "2026-12-01T00:00:00Z"
    assert update(ring, slot_secret(4), retired, user=user).result == \
        ("allowed" if user == "alice" else "denied")


def test_the_namespace_controller_deletes_slots_with_their_namespace():
    ring = keyring_of(*three_keys(), slot_secret(4))
    assert delete(ring, slot_secret(4), user=NAMESPACE_CONTROLLER).result == "allowed"


def retired_slot(number):
    secret = slot_secret(number)
    secret["metadata"]["annotations"]["keymount.io/retired"] = "2026-12-01T00:00:00Z"
    return secret


@pytest.mark.parametrize("secret", [retired_slot(4), key_secret(
    "keymount-key-4", random_key(), index=4, annotations={"keymount.io/numbers-used": "1-4"})],
    ids=["retired-slot", "filled-slot"])
def test_a_slot_name_is_never_freed_not_even_by_a_writer(secret):
    # Pods admitted while it was an empty slot list the name: freed, anyone could create
    # it with a key of their own, and the kubelet would mount that as their newest file.
    later = key_secret("k5", random_key(), index=5, annotations={"keymount.io/numbers-used": "1-5"})
    ring = keyring_of(*three_keys(), secret, later)
    verdict = delete(ring, secret)
    assert verdict.result == "denied" and "slot of key number 4" in verdict.message


def test_a_non_writer_cannot_touch_a_slot_not_even_its_metadata():
    ring = keyring_of(*three_keys(), slot_secret(4))
    frozen = slot_secret(4)
    labelled = slot_secret(4)
    labelled["metadata"]["annotations"]["team"] = "payments"
    assert update(ring, slot_secret(4), labelled, user="mallory").result == "denied"
    assert update(ring, slot_secret(4), labelled, user="alice").result == "allowed"
    frozen["immutable"] = True  # never fillable again: not even a key writer's to do
    verdict = update(ring, slot_secret(4), frozen, user="alice")
    assert verdict.result == "denied" and "cannot be immutable" in verdict.message


def test_a_slot_whose_number_another_key_took_is_not_filled():
    taken = key_secret("gitops", random_key(), index=4,
                       annotations={"keymount.io/numbers-used": "1-4"})
    ring = keyring_of(*three_keys(), slot_secret(4), taken)
    verdict = update(ring, slot_secret(4), filled(slot_secret(4), random_key()))
    assert verdict.result == "denied" and "already held by key Secret 'gitops'" in verdict.message


# --- staged keys ------------------------------------------------------------------------

def staged(slot, key):
    """A slot staged as `keys rotate --stage` does it: the key in the staged field."""
    stored = json.loads(json.dumps(slot))
    stored["data"]["staged-encryption-key"] = base64.b64encode(key).decode()
    return stored


def staged_as_stored(number, key, *, at=STAMPED):
    """A staged key as the API server holds it after keymount's webhooks."""
    secret = staged(slot_secret(number), key)
    secret["metadata"]["annotations"]["keymount.io/staged-at"] = at
    return secret


def activated(secret):
    """`keys activate`: the key field gets the staged field's stored bytes."""
    stored = json.loads(json.dumps(secret))
    stored["data"]["encryption-key"] = stored["data"]["staged-encryption-key"]
    return stored


def test_a_writer_stages_a_slot_and_keymount_stamps_when():
    ring = keyring_of(*three_keys(), slot_secret(4), slot_secret(5))
    key = random_key()
    verdict, stored = through_api(staged(slot_secret(4), key), operation="UPDATE",
                                  old=slot_secret(4), keyring=ring)
    assert verdict.result == "allowed", verdict.message
    from webhook.keys import fingerprint_key
    assert (verdict.key.action, verdict.key.number, verdict.key.fingerprint) == \
        ("staged", 4, fingerprint_key(key))
    assert annotations(stored)["keymount.io/staged-at"] == STAMPED
    assert "keymount.io/activated-at" not in annotations(stored)


def test_the_staged_at_time_is_keymounts_not_the_requests():
    ring = keyring_of(*three_keys(), slot_secret(4))
    lying = staged(slot_secret(4), random_key())
    lying["metadata"]["annotations"]["keymount.io/staged-at"] = "2020-01-01T00:00:00Z"
    verdict, stored = through_api(lying, operation="UPDATE", old=slot_secret(4), keyring=ring)
    assert verdict.result == "allowed", verdict.message
    assert annotations(stored)["keymount.io/staged-at"] == STAMPED


def test_a_staging_that_skipped_the_mutating_webhook_is_refused():
    ring = keyring_of(*three_keys(), slot_secret(4))
    verdict = update(ring, slot_secret(4), staged(slot_secret(4), random_key()), now=None)
    assert verdict.result == "denied" and "has no keymount.io/staged-at" in verdict.message


@pytest.mark.parametrize("change", ["stage", "activate", "cancel", "change-metadata"])
def test_a_non_writer_can_neither_stage_nor_activate_nor_cancel(change):
    ring = keyring_of(*three_keys(), slot_secret(4))
    key = random_key()
    if change == "stage":
        old, new = slot_secret(4), staged(slot_secret(4), key)
    else:
        old = staged_as_stored(4, key)
        ring = keyring_of(*three_keys(), old)
        new = json.loads(json.dumps(old))
        if change == "activate":
            new = activated(old)
        elif change == "cancel":
            new["data"] = {}
            new["metadata"]["annotations"].update(RETIRED)
        else:
            new["metadata"]["labels"]["team"] = "payments"
    verdict = update(ring, old, new, user="mallory")
    assert verdict.result == "denied"
    assert "only keymount's key writers may" in verdict.message
    assert update(ring, old, new, user="alice").result == "allowed"


def test_a_second_staged_key_is_refused_with_the_commands_that_end_the_first():
    first = staged_as_stored(4, random_key())
    ring = keyring_of(*three_keys(), first, slot_secret(5))
    verdict = update(ring, slot_secret(5), staged(slot_secret(5), random_key()))
    assert verdict.result == "denied"
    assert "already has a staged key, 'keymount-key-4'" in verdict.message
    assert "keymount keys activate -n shop" in verdict.message
    assert "keymount keys retire keymount-key-4 -n shop" in verdict.message


def test_a_staged_key_whose_number_another_key_took_is_refused():
    taken = key_secret("gitops", random_key(), index=4,
                       annotations={"keymount.io/numbers-used": "1-4"})
    ring = keyring_of(*three_keys(), slot_secret(4), taken)
    verdict = update(ring, slot_secret(4), staged(slot_secret(4), random_key()))
    assert verdict.result == "denied" and "already held by key Secret 'gitops'" in verdict.message
    assert "keymount keys rotate -n shop --stage" in verdict.message


def test_staging_invalid_bytes_is_refused_with_the_reason():
    ring = keyring_of(*three_keys(), slot_secret(4))
    verdict = update(ring, slot_secret(4), staged(slot_secret(4), bytes(range(1, 32))))
    assert verdict.result == "denied"
    assert "field 'staged-encryption-key' holds 31 bytes" in verdict.message


def test_activation_copies_the_staged_bytes_and_keymount_stamps_when():
    key = random_key()
    old = staged_as_stored(4, key)
    ring = keyring_of(*three_keys(), old)
    verdict, stored = through_api(activated(old), operation="UPDATE", old=old, keyring=ring)
    assert verdict.result == "allowed", verdict.message
    assert (verdict.key.action, verdict.key.number) == ("activated", 4)
    assert annotations(stored)["keymount.io/activated-at"] == STAMPED
    assert annotations(stored)["keymount.io/staged-at"] == STAMPED  # kept


@pytest.mark.parametrize("data", [
    pytest.param(lambda old: {**old, "encryption-key": base64.b64encode(random_key()).decode()},
                 id="other-key-bytes"),
    pytest.param(lambda old: {"staged-encryption-key": base64.b64encode(random_key()).decode()},
                 id="staged-bytes-changed"),
    pytest.param(lambda old: {}, id="staged-bytes-removed"),
    pytest.param(lambda old: {"encryption-key": old["staged-encryption-key"]},
                 id="activated-without-the-staged-field"),
])
def test_a_staged_keys_bytes_change_only_by_being_copied_into_the_key_field(data):
    old = staged_as_stored(4, random_key())
    ring = keyring_of(*three_keys(), old)
    new = json.loads(json.dumps(old))
    new["data"] = data(dict(old["data"]))
    verdict = update(ring, old, new)
    assert verdict.result == "denied"
    assert "keymount keys activate -n shop" in verdict.message


def test_cancelling_a_staged_key_retires_it():
    old = staged_as_stored(4, random_key())
    ring = keyring_of(*three_keys(), old)
    cancelled = json.loads(json.dumps(old))
    cancelled["data"] = {}
    cancelled["metadata"]["annotations"].update(RETIRED)
    verdict = update(ring, old, cancelled)
    assert verdict.result == "allowed" and verdict.key.action == "retired"


@pytest.mark.parametrize("data", [
    pytest.param(lambda d: {"encryption-key": d["encryption-key"]}, id="staged-field-removed"),
    pytest.param(lambda d: {**d, "staged-encryption-key": base64.b64encode(
        random_key()).decode()}, id="staged-field-changed"),
])
def test_an_activated_keys_staged_field_stays_as_it_was(data):
    old = activated(staged_as_stored(4, random_key()))
    old["metadata"]["annotations"]["keymount.io/activated-at"] = STAMPED
    ring = keyring_of(*three_keys(), old)
    new = json.loads(json.dumps(old))
    new["data"] = data(dict(old["data"]))
    verdict = update(ring, old, new)
    assert verdict.result == "denied", verdict.message
    assert "staged-encryption-key" in verdict.message


@pytest.mark.parametrize("annotation", ["keymount.io/staged-at", "keymount.io/activated-at"])
@pytest.mark.parametrize("value", ["2030-01-01T00:00:00Z", None], ids=["changed", "removed"])
def test_the_staging_and_activation_times_cannot_be_changed_and_come_back_when_dropped(
        annotation, value):
    old = activated(staged_as_stored(4, random_key()))
    old["metadata"]["annotations"]["keymount.io/activated-at"] = STAMPED
    ring = keyring_of(*three_keys(), old)
    new = json.loads(json.dumps(old))
    if value is None:
        # A GitOps sync that leaves keymount's annotations out: they come back.
        del new["metadata"]["annotations"][annotation]
        verdict, stored = through_api(new, operation="UPDATE", old=old, keyring=ring)
        assert verdict.result == "allowed", verdict.message
        assert annotations(stored)[annotation] == STAMPED
    else:
        new["metadata"]["annotations"][annotation] = value
        verdict = update(ring, old, new)
        assert verdict.result == "denied" and annotation in verdict.message


def test_a_key_cannot_gain_an_activation_time_it_was_not_stamped_with():
    old = key_secret("k3", random_key(), index=3, annotations={"keymount.io/numbers-used": "1-3"})
    new = json.loads(json.dumps(old))
    new["metadata"]["annotations"]["keymount.io/activated-at"] = "2030-01-01T00:00:00Z"
    verdict = update(keyring_of(*three_keys()), old, new)
    assert verdict.result == "denied" and "keymount.io/activated-at" in verdict.message


def test_filling_a_slot_stamps_its_activation_time():
    ring = keyring_of(*three_keys(), slot_secret(4))
    verdict, stored = through_api(filled(slot_secret(4), random_key()), operation="UPDATE",
                                  old=slot_secret(4), keyring=ring)
    assert verdict.result == "allowed"
    assert annotations(stored)["keymount.io/activated-at"] == STAMPED


@pytest.mark.parametrize(("given", "kept"), [
    ("2025-06-01T08:00:00Z", True), ("2025-06-01T10:00:00+02:00", True),
    ("2026-12-02T13:00:01Z", False), ("2030-01-01T00:00:00Z", False),
    ("2025-06-01T08:00:00", False), ("last year", False)],
    ids=["earlier", "earlier-with-an-offset", "a-second-ahead", "in-the-future",
         "no-offset", "malformed"])
def test_a_new_key_keeps_an_earlier_activation_time_and_never_a_later_one(given, kept):
    """A restore brings the time the key was first activated: an earlier time only
    makes the key older (rotation and --max-key-age act sooner); a later one would
    postpone them, so keymount's clock stands."""
    secret = key_secret("k4", random_key(), annotations={"keymount.io/activated-at": given})
    verdict, stored = through_api(secret, keyring=ring_of_three())
    assert verdict.result == "allowed" and verdict.key.action == "created", verdict.message
    assert annotations(stored)["keymount.io/activated-at"] == (given if kept else STAMPED)


def test_a_new_staged_key_gets_keymounts_staging_time_whatever_it_brings():
    """The staging period counts from when running Pods here can see the key."""
    secret = staged(slot_secret(4), random_key())
    secret["metadata"]["annotations"]["keymount.io/staged-at"] = "2025-06-01T08:00:00Z"
    verdict, stored = through_api(secret, keyring=ring_of_three())
    assert verdict.result == "allowed", verdict.message
    assert annotations(stored)["keymount.io/staged-at"] == STAMPED


def test_a_slot_made_with_a_time_of_its_own_gets_keymounts_when_it_is_filled():
    slot = slot_secret(4)
    slot["metadata"]["annotations"]["keymount.io/activated-at"] = "2020-01-01T00:00:00Z"
    ring = keyring_of(*three_keys(), slot)
    verdict, stored = through_api(filled(slot, random_key()), operation="UPDATE", old=slot,
                                  keyring=ring)
    assert verdict.result == "allowed", verdict.message
    assert annotations(stored)["keymount.io/activated-at"] == STAMPED


# --- a live key made invalid by an update, then deleted -------------------------------------

def _invalidations():
    """Updates that keep a key's bytes but would make the guard read it as invalid."""
    def retired_with_material(secret):
        secret["metadata"]["annotations"].update(RETIRED)

    def garbage_index_on_legacy(secret):
        secret["metadata"].setdefault("annotations", {})["keymount.io/key-index"] = "x"
    return [pytest.param(retired_with_material, False, id="retired-but-keeps-its-bytes"),
            pytest.param(garbage_index_on_legacy, True, id="legacy-key-given-a-bad-index")]


@pytest.mark.parametrize("user", ["mallory", "alice"], ids=["non-writer", "writer"])
@pytest.mark.parametrize("edit,legacy", _invalidations())
def test_an_update_never_turns_a_live_key_into_an_invalid_one(user, edit, legacy):
    keys = list(three_keys())
    if legacy:
        # keymount 0.1's keys: no index, numbered by their order.
        for secret in keys:
            secret["metadata"].pop("annotations", None)
    ring = keyring_of(*keys)
    active = keys[2]
    changed = copy.deepcopy(active)
    edit(changed)
    verdict = update(ring, active, changed, user=user)
    assert verdict.result == "denied", (
        "an update that keeps the bytes but makes the key invalid drops it from every new "
        "backend Pod (or refuses them all), and opens it to deletion")
    # What it would have led to: the key gone from new Pods, and deletable.
    after = keyring_of(keys[0], keys[1], changed)
    assert [r.name for r in after.invalid] == ["k3"]
    injected = inject_keys(pod(), keyring=after, settings=Settings(invalid_keys="skip"))
    assert isinstance(injected, Injected) and "k3" not in injected.status


def test_a_live_key_is_not_deleted_by_way_of_an_invalidating_update():
    """With --key-writers unset (RBAC decides), someone who may update and delete Secrets
    still cannot delete a live key: not even in two steps."""
    keys = three_keys()
    ring = keyring_of(*keys)
    changed = copy.deepcopy(keys[1])
    changed["metadata"]["annotations"].update(RETIRED)
    verdict = update(ring, keys[1], changed, user="mallory", writers=parse_key_writers(None))
    assert verdict.result == "denied"


# --- a numbered key made invalid by a setting is not deleted ------------------------------

ALICE_WRITES = parse_key_writers("user:alice")


def _stored_as(name, stored: bytes, index, used):
    secret = key_secret(name, None, index=index,
                        annotations={"keymount.io/numbers-used": used})
    secret["data"]["encryption-key"] = base64.b64encode(stored).decode()
    return secret


def _delete(secret, *, settings, keyring, listed_by):
    body = review(None, kind="Secret", operation="DELETE", old=secret, username="alice")
    body["request"]["name"] = secret["metadata"]["name"]
    return review_validation(parse_review(json.dumps(body).encode()), keyring=keyring,
                             settings=settings, writers=ALICE_WRITES, listed_by=listed_by)


def _keys():
    k1 = _stored_as("k1", random_key(), 1, "1")
    k2 = _stored_as("k2", base64.b64encode(random_key()), 2, "1-2")  # base64 text
    return k1, k2


def test_a_numbered_key_made_invalid_by_a_setting_keeps_its_number_from_deletion():
    settings = Settings(key_encoding="raw")  # was auto: k2 (base64 text) turns invalid
    k1, k2 = _keys()
    ring = build_keyring("shop", [parse_key_secret(s, settings=settings) for s in (k1, k2)])
    assert [r.name for r in ring.invalid] == ["k2"] and ring.next_number == 3
    verdict = _delete(k2, settings=settings, keyring=ring, listed_by=())
    # Allowed today, and then nothing remembers number 2: the next key gets it.
    after = build_keyring("shop", [parse_key_secret(k1, settings=settings)])
    assert verdict.result != "allowed", (
        f"k2 (number 2, bytes intact) deleted; the next key then gets number "
        f"{after.next_number}")


def test_an_invalid_key_that_running_pods_list_is_not_deleted():
    settings = Settings(key_encoding="raw")
    k1, k2 = _keys()
    k3 = _stored_as("k3", random_key(), 3, "1-3")  # a newer key records number 2
    ring = build_keyring("shop", [parse_key_secret(s, settings=settings)
                                  for s in (k1, k2, k3)])
    verdict = _delete(k2, settings=settings, keyring=ring, listed_by=("api-0",))
    assert verdict.result != "allowed", (
        "Pod api-0 lists k2 as a source that is not optional: once deleted, anyone who may "
        "create Secrets can create 'k2' and the kubelet mounts it as encryption-key-2")


def _unlabel(secret, *, settings, keyring):
    unlabelled = copy.deepcopy(secret)
    unlabelled["metadata"]["labels"] = {}
    body = review(unlabelled, kind="Secret", operation="UPDATE", old=secret,
                  username="alice")
    body["request"]["name"] = secret["metadata"]["name"]
    return review_validation(parse_review(json.dumps(body).encode()), keyring=keyring,
                             settings=settings, writers=ALICE_WRITES)


def test_a_numbered_key_made_invalid_by_a_setting_is_not_unlabelled_out_of_the_guard():
    # Unlabelled, the Secret leaves the webhooks' sight (objectSelector on the key
    # label): its DELETE is never sent to keymount, so removing the label is deleting
    # it in two steps, and its bytes (number 2, intact) could be deleted or replaced by
    # anyone who may write Secrets, under a name running Pods list.
    settings = Settings(key_encoding="raw")
    k1, k2 = _keys()
    ring = build_keyring("shop", [parse_key_secret(s, settings=settings) for s in (k1, k2)])
    assert _delete(k2, settings=settings, keyring=ring, listed_by=()).result != "allowed"
    verdict = _unlabel(k2, settings=settings, keyring=ring)
    assert verdict.result != "allowed", (
        "k2's deletion is refused, yet its key label may be removed, after which keymount "
        "never sees its deletion")


@pytest.mark.parametrize("user", ["mallory", "alice"], ids=["non-writer", "writer"])
def test_a_pin_does_not_carry_an_invalidating_change_past_the_guard(user):
    # The guard refuses an update that makes a live key invalid. A legacy key's pin (its
    # number and record spelled out in the request, as `keys pin` writes them) is judged
    # on its number and bytes alone: sent together with keymount.io/retired over the
    # kept bytes, the active key turns invalid (new Pods encrypt with the key before it).
    keys = list(three_keys())
    for secret in keys:
        secret["metadata"].pop("annotations", None)  # keymount 0.1's keys: 1, 2, 3
    ring = keyring_of(*keys)
    active = keys[2]
    changed = copy.deepcopy(active)
    changed["metadata"]["annotations"] = {"keymount.io/key-index": "3",
                                          "keymount.io/numbers-used": "1-3", **RETIRED}
    verdict = update(ring, active, changed, user=user)
    assert verdict.result == "denied", verdict.key.action
    after = keyring_of(keys[0], keys[1], changed)
    assert [r.name for r in after.invalid] == ["k3"]


def _as_update(old, new, *, settings, keyring, user):
    body = review(new, kind="Secret", operation="UPDATE", old=old, username=user)
    body["request"]["name"] = old["metadata"]["name"]
    mutation = review_mutation(parse_review(json.dumps(body).encode()), keyring=keyring,
                               settings=settings, now=NOW)
    assert mutation.response["allowed"] is True
    if "patch" in mutation.response:
        ops = json.loads(base64.b64decode(mutation.response["patch"]))
        body["request"]["object"] = jsonpatch.apply_patch(new, ops)
    return review_validation(parse_review(json.dumps(body).encode()), keyring=keyring,
                             settings=settings, writers=ALICE_WRITES)


@pytest.mark.parametrize("replacement", ["own-key-as-base64", "removed"])
def test_a_non_writer_cannot_rewrite_the_bytes_of_a_key_made_invalid_by_a_setting(
        replacement):
    # k2 (number 2, the active key until --key-encoding raw) holds base64 text: invalid
    # to the webhook now, its bytes intact, its deletion and unlabelling refused. Running
    # Pods list it (a source that is not optional) and the kubelet syncs its data into
    # them; applications' readers take base64 too (keymount.reader). So whoever may
    # update Secrets must not touch those bytes: removed, data under number 2 is lost;
    # replaced by base64 of a key of their own (still invalid to the webhook), running
    # Pods get it as encryption-key-2 at their next sync and encrypt with it, and it is
    # the namespace's active key again once the setting is put back.
    settings = Settings(key_encoding="raw")
    k1, k2 = _keys()
    ring = build_keyring("shop", [parse_key_secret(s, settings=settings) for s in (k1, k2)])
    assert [r.name for r in ring.invalid] == ["k2"]
    changed = copy.deepcopy(k2)
    if replacement == "removed":
        changed["data"] = {}
    else:
        changed["data"]["encryption-key"] = base64.b64encode(
            base64.b64encode(random_key())).decode()
    verdict = _as_update(k2, changed, settings=settings, keyring=ring, user="mallory")
    assert verdict.result == "denied", (
        "a user who is no key writer rewrote the key material of k2 (number 2)")


@pytest.mark.parametrize("listed_by", [("api-0",), None], ids=["listed", "not-read-yet"])
def test_an_invalid_key_that_running_pods_list_is_not_unlabelled_out_of_the_guard(listed_by):
    # A legacy key (keymount 0.1: no number of keymount's) made invalid by
    # --key-encoding raw, its bytes intact; Pod api-0 was admitted while it was valid and
    # lists it as encryption-key-2. Its DELETE is refused while a Pod lists it. Removing
    # its key label takes it out of the webhooks' sight (objectSelector): then anyone who
    # may write Secrets deletes it and creates their own 'k2', or just rewrites its data,
    # and the kubelet gives api-0 their bytes as encryption-key-2.
    settings = Settings(key_encoding="raw")
    k1 = key_secret("k1", random_key(), created="2026-01-01T00:00:00Z")
    k2 = key_secret("k2", None, created="2026-02-01T00:00:00Z")
    k2["data"]["encryption-key"] = base64.b64encode(base64.b64encode(random_key())).decode()
    ring = build_keyring("shop", [parse_key_secret(s, settings=settings) for s in (k1, k2)])
    assert [r.name for r in ring.invalid] == ["k2"]
    assert _delete(k2, settings=settings, keyring=ring,
                   listed_by=listed_by).result != "allowed"
    unlabelled = copy.deepcopy(k2)
    unlabelled["metadata"]["labels"] = {}
    body = review(unlabelled, kind="Secret", operation="UPDATE", old=k2, username="alice")
    body["request"]["name"] = "k2"
    verdict = review_validation(parse_review(json.dumps(body).encode()), keyring=ring,
                                settings=settings, writers=ALICE_WRITES, listed_by=listed_by)
    assert verdict.result != "allowed", (
        "k2's deletion is refused while api-0 lists it, yet its key label may be removed, "
        "after which keymount never sees its deletion or a change of its bytes")
    if listed_by is None:
        assert verdict.key.needs_pods  # the server reads the Pods and asks again
    # And once no Pod lists it, it may go.
    verdict = review_validation(parse_review(json.dumps(body).encode()), keyring=ring,
                                settings=settings, writers=ALICE_WRITES, listed_by=())
    assert verdict.result == "allowed", verdict.message


@pytest.mark.parametrize(("replacement", "allowed"), [
    pytest.param("same-key-as-raw-bytes", True, id="same-key-re-encoded-is-a-repair"),
    pytest.param("another-key", False, id="another-key-is-a-replacement"),
    pytest.param("another-key-still-invalid", False,
                 id="another-key-kept-invalid-is-a-replacement-too"),
    pytest.param("retired", True, id="retiring-it-stays-allowed"),
])
def test_a_key_writer_repairs_a_key_made_invalid_by_a_setting_only_with_its_own_key(
        replacement, allowed):
    # k2 (number 2) holds base64 text, invalid under --key-encoding raw, its bytes
    # intact: running Pods' readers take base64 too, so data may be encrypted under
    # number 2 with the key it holds. Re-encoding that key keeps it; other bytes under
    # number 2 would make that data undecryptable, which keys never allow in place,
    # key writers included (they add a key instead: keymount keys rotate).
    settings = Settings(key_encoding="raw")
    k1, k2 = _keys()
    ring = build_keyring("shop", [parse_key_secret(s, settings=settings) for s in (k1, k2)])
    assert [r.name for r in ring.invalid] == ["k2"]
    held = base64.b64decode(base64.b64decode(k2["data"]["encryption-key"]))
    changed = copy.deepcopy(k2)
    if replacement == "retired":  # as `keymount keys retire k2` writes it
        changed["data"] = {}
        changed["metadata"]["annotations"]["keymount.io/retired"] = "2026-01-02T00:00:00Z"
    else:
        changed["data"]["encryption-key"] = base64.b64encode(
            held if replacement == "same-key-as-raw-bytes" else
            base64.b64encode(random_key()) if replacement == "another-key-still-invalid"
            else random_key()).decode()
    verdict = _as_update(k2, changed, settings=settings, keyring=ring, user="alice")
    assert (verdict.result == "allowed") is allowed, verdict.message
    if not allowed:
        assert "keymount keys rotate -n shop" in verdict.message
