"""Valid keys, fingerprints and key numbers (docs/contract.md), table-driven."""

import base64
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.config import Settings
from webhook.key_secrets import parse_key_secret
from webhook.keys import (
    MAX_NUMBERS_TEXT,
    NumberSet,
    build_keyring,
    check_key,
    describe_conflict,
    fingerprint_key,
    format_numbers,
    parse_numbers,
)

from builders import key_secret, keyring_of, random_key

KEY = random_key()
B64 = base64.b64encode(KEY)
URLSAFE = base64.urlsafe_b64encode(KEY)


@pytest.mark.parametrize(("value", "encoding", "valid", "reason_part"), [
    pytest.param(KEY, "auto", True, "", id="32-raw-bytes"),
    pytest.param(B64, "auto", True, "", id="base64-padded-no-newline"),
    pytest.param(B64 + b"\n", "auto", True, "", id="base64-with-newline"),
    pytest.param(B64 + b"\r\n  \t", "auto", True, "", id="base64-trailing-whitespace"),
    pytest.param(B64.rstrip(b"="), "auto", True, "", id="base64-unpadded"),
    pytest.param(URLSAFE, "auto", True, "", id="urlsafe-base64"),
    pytest.param(URLSAFE.rstrip(b"=") + b"\n", "auto", True, "", id="urlsafe-unpadded-newline"),
    pytest.param(KEY[:31], "auto", False, "31 bytes", id="31-raw-bytes"),
    pytest.param(KEY + b"x", "auto", False, "33 bytes", id="33-raw-bytes"),
    pytest.param(base64.b64encode(KEY[:31]), "auto", False, "base64 of 31 bytes",
                 id="base64-of-31-bytes"),
    pytest.param(base64.b64encode(KEY + b"x"), "auto", False, "base64 of 33 bytes",
                 id="base64-of-33-bytes"),
    pytest.param(b"", "auto", False, "empty (0 bytes)", id="empty"),
    pytest.param(None, "auto", False, "missing", id="missing-field"),
    pytest.param(b"\x07" * 32, "auto", False, "degenerate", id="degenerate-raw"),
    pytest.param(base64.b64encode(bytes(32)), "auto", False, "degenerate",
                 id="degenerate-base64"),
    pytest.param(b" " + B64, "auto", False, "45 bytes", id="leading-space-not-stripped"),
    pytest.param(KEY, "raw", True, "", id="raw-only-accepts-raw"),
    pytest.param(B64, "raw", False, "44 bytes; need exactly 32 raw bytes (--key-encoding raw)",
                 id="raw-only-refuses-base64"),
    pytest.param(B64, "base64", True, "", id="base64-only-accepts-base64"),
    pytest.param(KEY, "base64", False, "--key-encoding base64", id="base64-only-refuses-raw"),
])
def test_key_validity_follows_spec_section_2(value, encoding, valid, reason_part):
    result = check_key(value, encoding=encoding)
    assert result.valid is valid
    assert reason_part in result.reason
    if valid:
        assert result.fingerprint == fingerprint_key(KEY)
    else:
        assert result.fingerprint == ""


def test_a_printable_ascii_raw_key_is_valid_but_warned_as_passphrase_like():
    result = check_key(b"correct horse battery staple 123")
    assert result.valid and result.encoding == "raw"
    assert "passphrase" in result.warning


def test_a_random_raw_key_earns_no_warning():
    assert check_key(KEY).warning == ""


def test_fingerprint_is_the_aes256_key_check_value():
    # NIST SP 800-38A style KCV of the all-zero key: AES-256(0^32, 0^16) = dc95c078...
    assert fingerprint_key(bytes(32)) == "dc95c0"


def test_reasons_never_contain_key_material():
    for value in (KEY[:31], base64.b64encode(KEY[:31]), KEY + b"!"):
        reason = check_key(value).reason
        assert base64.b64encode(KEY[:8]).decode()[:8] not in reason
        assert KEY[:8].hex() not in reason


# --- key numbers -------------------------------------------------------------------

def names(keyring):
    return [r.name for r in keyring.keys]


def files(keyring):
    return [(f.file, f.secret) for f in keyring.files]


def test_a_keys_file_is_its_index_and_numbers_may_have_gaps():
    ring = keyring_of(key_secret("k2", random_key(), index=2),
                      key_secret("k5", random_key(), index=5))
    assert files(ring) == [("encryption-key-2", "k2"), ("encryption-key-5", "k5")]
    assert ring.newest.name == "k5"


def test_keys_without_an_index_keep_the_numbers_keymount_0_1_gave_them():
    # 0.1 numbered by position: Secrets without an index first, by creation, then name.
    ring = keyring_of(
        key_secret("b", random_key(), created="2026-03-01T00:00:00Z"),
        key_secret("a", random_key(), created="2026-03-01T00:00:00Z"),
        key_secret("old", random_key(), created="2025-01-01T00:00:00Z"),
        key_secret("nodate", random_key(), created=None),
        key_secret("idx", random_key(), index=5),
    )
    assert files(ring) == [("encryption-key-1", "nodate"), ("encryption-key-2", "old"),
                           ("encryption-key-3", "a"), ("encryption-key-4", "b"),
                           ("encryption-key-5", "idx")]
    assert [r.name for r in ring.legacy] == ["nodate", "old", "a", "b"]


def test_a_0_1_namespace_keeps_the_files_0_1_gave_even_where_its_indexes_disagree():
    # 0.1: `keys create` (no index), then `keys rotate` (index max+1 = 1); files were
    # positions: the unindexed key first.
    ring = keyring_of(key_secret("first", random_key(), created="2026-01-01T00:00:00Z"),
                      key_secret("rotated", random_key(), index=1, legacy=True,
                                 created="2026-02-01T00:00:00Z"))
    assert files(ring) == [("encryption-key-1", "first"), ("encryption-key-2", "rotated")]
    assert ring.conflict is None and ring.next_number == 3
    assert [r.name for r in ring.legacy] == ["first", "rotated"]


@pytest.mark.parametrize("pinned", [["first"], ["rotated"], ["first", "rotated"]],
                         ids=["oldest", "newest", "both"])
def test_pinning_some_legacy_keys_moves_no_file(pinned):
    keys = {"first": random_key(), "rotated": random_key()}

    def secret(name, index, numbered):
        return key_secret(name, keys[name], index=index, legacy=not numbered,
                          created="2026-01-01T00:00:00Z")
    ring = keyring_of(secret("first", 1 if "first" in pinned else None, "first" in pinned),
                      secret("rotated", 2 if "rotated" in pinned else 1, "rotated" in pinned))
    assert files(ring) == [("encryption-key-1", "first"), ("encryption-key-2", "rotated")]
    assert ring.conflict is None


@pytest.mark.parametrize("change", ["add-higher", "add-lower-unused", "retire-oldest",
                                    "delete-oldest-tombstone", "invalid-sibling"])
def test_adding_retiring_or_invalidating_other_keys_never_renumbers_a_key(change):
    k1, k3 = random_key(), random_key()
    before = [key_secret("k1", k1, index=1), key_secret("k3", k3, index=3)]
    after = {
        "add-higher": [*before, key_secret("k9", random_key(), index=9)],
        "add-lower-unused": [*before, key_secret("k2", random_key(), index=2)],
        "retire-oldest": [key_secret("k1", None, index=1,
                                     annotations={"keymount.io/retired": "2026-11-29"}),
                          before[1]],
        "delete-oldest-tombstone": [before[1]],
        "invalid-sibling": [*before, key_secret("bad", b"short", index=7)],
    }[change]
    number = {f.secret: f.file for f in keyring_of(*after).files}
    assert number["k3"] == "encryption-key-3"
    if "k1" in number:
        assert number["k1"] == "encryption-key-1"


def test_the_next_number_is_above_every_number_ever_used():
    tombstone = key_secret("k1", None, index=1, annotations={"keymount.io/retired": "x"})
    newest = key_secret("k3", random_key(), index=3,
                        annotations={"keymount.io/numbers-used": "1-3,7"})
    assert keyring_of(tombstone, newest).next_number == 8
    assert str(keyring_of(newest).used) == "1-3,7"
    assert keyring_of().next_number == 1
    assert keyring_of(key_secret("broken", b"x", index=4)).next_number == 5


def test_a_retired_key_is_a_tombstone_with_a_number_and_no_key():
    ring = keyring_of(key_secret("k1", None, index=1, annotations={"keymount.io/retired": "x"}),
                      key_secret("k2", random_key(), index=2))
    assert files(ring) == [("encryption-key-2", "k2")]
    assert [r.name for r in ring.retired] == ["k1"] and ring.number_of("k1") == 1
    assert ring.holder_of(1).name == "k1" and ring.invalid == ()


def test_a_retired_mark_on_a_secret_that_still_holds_its_key_is_invalid():
    ring = keyring_of(key_secret("k1", random_key(), index=1,
                                 annotations={"keymount.io/retired": "x"}))
    assert ring.keys == () and ring.retired == ()
    assert "still holds key material" in ring.invalid[0].check.reason


def expand(numbers):
    """A NumberSet as the plain set it stands for (small sets only: tests)."""
    return {n for low, high in numbers.ranges for n in range(low, high + 1)}


@pytest.mark.parametrize(("text", "numbers"), [
    ("1-3,5", {1, 2, 3, 5}), ("", set()), ("7", {7}), (" 2 , 4-5 ", {2, 4, 5}),
    ("3-1", None), ("0", None), ("x", None), ("1,", None), ("1-3,2-5,9", {1, 2, 3, 4, 5, 9}),
], ids=["ranges", "empty", "one", "spaces", "backwards", "zero", "word", "trailing-comma",
        "overlapping"])
def test_numbers_used_parse_as_ranges_and_refuse_anything_else(text, numbers):
    parsed = parse_numbers(text)
    assert (None if parsed is None else expand(parsed)) == numbers
    if numbers:
        assert parse_numbers(format_numbers(numbers)) == parsed


def test_a_huge_range_costs_what_a_small_one_costs():
    # 150 ranges of 100,000 numbers: built as a set, 15 million ints (GBs of memory).
    text = ",".join(f"{i * 200_000 + 1}-{i * 200_000 + 100_000}" for i in range(150))
    started = time.process_time()
    parsed = parse_numbers(text)
    assert parsed is not None and len(parsed.ranges) == 150
    assert 29_900_000 in parsed and 100_001 not in parsed and parsed.highest == 29_900_000
    assert parse_numbers("1-999999999").highest == 999_999_999
    assert time.process_time() - started < 0.05


def test_a_numbers_annotation_over_the_cap_is_refused_before_it_is_split():
    assert parse_numbers("1," * (MAX_NUMBERS_TEXT // 2) + "1") is None
    record = keyring_of(key_secret("k", random_key(), index=1, annotations={
        "keymount.io/numbers-used": "1," * MAX_NUMBERS_TEXT + "1"})).invalid[0]
    assert f"at most {MAX_NUMBERS_TEXT} characters" in record.check.reason


numbers = st.frozensets(st.integers(1, 60), max_size=25)


@given(numbers, numbers, st.integers(0, 62))
def test_number_sets_behave_as_the_sets_they_stand_for(a, b, n):
    left, right = NumberSet.of(a), NumberSet.of(b)
    assert expand(left) == a and expand(left | right) == a | b
    assert (n in left) == (n in a) and (left <= right) == (a <= b)
    assert left.highest == max(a, default=0) and bool(left) == bool(a)
    assert parse_numbers(format_numbers(a)) == left


def test_invalid_secrets_take_no_part_in_the_numbers():
    ring = keyring_of(key_secret("good", random_key()), key_secret("bad", b"short"),
                      key_secret("good2", random_key(), index=2))
    assert files(ring) == [("encryption-key-1", "good"), ("encryption-key-2", "good2")]
    assert [r.name for r in ring.invalid] == ["bad"]


@pytest.mark.parametrize(("a", "b"), [
    ({"index": 3}, {"index": 3}),
    ({"index": 2, "annotations": {"keymount.io/retired": "x"}, "key": None}, {"index": 2}),
], ids=["same-index", "tombstone-and-key"])
def test_two_keys_with_one_number_are_a_conflict(a, b):
    first = key_secret("x", a.pop("key", random_key()), **a)
    second = key_secret("y", b.pop("key", random_key()), **b)
    ring = keyring_of(first, second)
    assert ring.conflict is not None
    assert {r.name for r in ring.conflict} == {"x", "y"}


def test_legacy_keys_never_conflict_they_take_the_numbers_left_free():
    ring = keyring_of(key_secret("x", random_key()), key_secret("y", random_key()),
                      key_secret("z", random_key(), index=1))
    assert ring.conflict is None
    assert files(ring) == [("encryption-key-1", "z"), ("encryption-key-2", "x"),
                           ("encryption-key-3", "y")]


@pytest.mark.parametrize("index", ["0", "-1", "two", "1.5", ""], ids=repr)
def test_a_non_positive_or_non_integer_index_makes_the_secret_invalid(index):
    ring = keyring_of(key_secret("x", random_key(), index=index))
    assert ring.keys == ()
    assert "not a positive integer" in ring.invalid[0].check.reason


def test_an_invalid_secret_sharing_an_index_does_not_conflict():
    ring = keyring_of(key_secret("x", random_key(), index=1), key_secret("y", b"bad", index=1))
    assert ring.conflict is None


def test_stringdata_wins_over_data_as_the_api_server_merges_it():
    secret = key_secret("x", b"short")
    secret["stringData"] = {"encryption-key": base64.b64encode(KEY).decode()}
    ring = keyring_of(secret)
    assert names(ring) == ["x"]


def test_data_that_is_not_base64_is_an_invalid_key_not_a_crash():
    secret = key_secret("x", KEY)
    secret["data"]["encryption-key"] = "!!!not base64!!!"
    ring = keyring_of(secret)
    assert "not valid base64" in ring.invalid[0].check.reason


def test_the_key_field_is_configurable():
    settings = Settings(key_field="aes")
    ring = keyring_of(key_secret("x", KEY, field="aes"), settings=settings)
    assert names(ring) == ["x"]


@pytest.mark.parametrize("legacy", [True, False], ids=["written-around-keymount-0.2",
                                                       "both-recording-numbers"])
def test_two_keys_declaring_one_index_are_a_conflict_whatever_their_names(legacy):
    # keymount 0.2 gave such a pair files 1 and 2 in name order: a name decided which
    # key encrypted new data.
    ring = keyring_of(key_secret("b-key", random_key(), index=1, legacy=legacy),
                      key_secret("a-key", random_key(), index=1, legacy=legacy))
    assert ring.conflict is not None and {r.name for r in ring.conflict} == {"a-key", "b-key"}
    message = describe_conflict(ring)
    assert "'a-key'" in message and "'b-key'" in message and "number 1" in message
    assert ("made before keymount numbered keys" in message) is legacy
    assert "kubectl delete secret NAME -n shop" in message


# --- staged keys ---------------------------------------------------------------------

def _slot_with(number, *, key=None, staged=None, retired=False):
    from builders import slot_secret
    secret = slot_secret(number)
    if key is not None:
        secret["data"]["encryption-key"] = base64.b64encode(key).decode()
    if staged is not None:
        secret["data"]["staged-encryption-key"] = base64.b64encode(staged).decode()
    if retired:
        secret["metadata"]["annotations"]["keymount.io/retired"] = "2026-12-01T00:00:00Z"
    secret["metadata"]["annotations"]["keymount.io/staged-at"] = "2026-12-02T13:00:00Z"
    return secret


OTHER = random_key()


@pytest.mark.parametrize(("fields", "state", "reason_part"), [
    pytest.param({"staged": KEY}, "staged", "", id="staged"),
    pytest.param({"staged": KEY, "key": KEY}, "valid", "", id="activated"),
    pytest.param({"staged": KEY, "key": OTHER}, "invalid", "hold different bytes",
                 id="two-different-keys"),
    pytest.param({"staged": bytes(31)}, "invalid", "field 'staged-encryption-key'",
                 id="staged-bytes-invalid"),
    pytest.param({"staged": KEY, "retired": True}, "invalid", "still holds key material",
                 id="retired-with-staged-bytes"),
    pytest.param({}, "slot", "", id="empty-slot"),
])
def test_a_slots_fields_decide_whether_it_is_a_slot_a_staged_key_or_a_key(
        fields, state, reason_part):
    from webhook.key_secrets import parse_key_secret
    record = parse_key_secret(_slot_with(4, **fields), settings=Settings())
    assert record.state == state
    assert reason_part in record.check.reason
    if state == "staged":
        assert record.fingerprint == fingerprint_key(KEY) and not record.valid
        assert record.staged_at is not None and record.staged_at.year == 2026


def test_a_staged_key_holds_its_number_but_is_neither_a_key_nor_a_free_slot():
    from builders import slot_secret
    ring = keyring_of(key_secret("key-a", random_key(), index=1), _slot_with(2, staged=KEY),
                      slot_secret(3))
    assert ring.staged is not None and ring.staged.name == "keymount-key-2"
    assert [r.name for r in ring.keys] == ["key-a"] and ring.active_number == 1
    assert [r.name for r in ring.free_slots] == ["keymount-key-3"]
    assert ring.holder_of(2) is ring.staged and ring.number_of("keymount-key-2") == 2
    assert 2 in ring.used and ring.next_number == 4


# --- a pinned key made invalid keeps the legacy keys' numbers -----------------------------

def _legacy(name: str, created: str, stored: bytes) -> dict:
    secret = key_secret(name, None, created=created)
    secret["data"]["encryption-key"] = base64.b64encode(stored).decode()
    return secret


def test_a_legacy_key_keeps_its_number_when_a_pinned_neighbour_becomes_invalid():
    # keymount 0.1's keys a, b, c (numbers 1, 2, 3 by creation); b was updated once,
    # so keymount pinned it at 2. a and c hold base64 text, b 32 raw bytes.
    a = _legacy("a", "2025-01-01T00:00:00Z", base64.b64encode(random_key()))
    b = _legacy("b", "2025-02-01T00:00:00Z", random_key())
    c = _legacy("c", "2025-03-01T00:00:00Z", base64.b64encode(random_key()))
    b["metadata"]["annotations"] = {"keymount.io/key-index": "2",
                                    "keymount.io/numbers-used": "1-3"}

    def numbers(settings: Settings) -> dict[str, int]:
        ring = build_keyring("shop", [parse_key_secret(s, settings=settings)
                                      for s in (a, b, c)])
        return {f.secret: f.number for f in ring.files}

    assert numbers(Settings()) == {"a": 1, "b": 2, "c": 3}
    # --key-encoding base64 makes b invalid (its bytes are still there, and data needs
    # them): c must stay encryption-key-3, not slide into b's number.
    assert numbers(Settings(key_encoding="base64"))["c"] == 3
