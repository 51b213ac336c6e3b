"""SPEC §2 (validity, fingerprint) and §3 (order), table-driven."""

import base64

import pytest
from builders import key_secret, keyring_of, random_key

from webhook.config import Settings
from webhook.keys import check_key, fingerprint_key

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


# --- SPEC §3: order -------------------------------------------------------------------

def names(keyring):
    return [r.name for r in keyring.keys]


def test_keys_sort_by_index_then_creation_then_name():
    ring = keyring_of(
        key_secret("c", random_key(), index=2),
        key_secret("b", random_key(), created="2026-03-01T00:00:00Z"),
        key_secret("a", random_key(), created="2026-03-01T00:00:00Z"),
        key_secret("old", random_key(), created="2025-01-01T00:00:00Z"),
        key_secret("nodate", random_key(), created=None),
        key_secret("first", random_key(), index=1),
    )
    assert names(ring) == ["nodate", "old", "a", "b", "first", "c"]


def test_invalid_secrets_take_no_part_in_the_order():
    ring = keyring_of(key_secret("good", random_key()), key_secret("bad", b"short"),
                      key_secret("good2", random_key(), index=1))
    assert names(ring) == ["good", "good2"]
    assert [r.name for r in ring.invalid] == ["bad"]


def test_two_secrets_with_the_same_explicit_index_make_the_order_ambiguous():
    ring = keyring_of(key_secret("x", random_key(), index=3),
                      key_secret("y", random_key(), index=3))
    assert ring.conflict is not None
    assert {r.name for r in ring.conflict} == {"x", "y"}


def test_missing_indexes_never_conflict():
    ring = keyring_of(key_secret("x", random_key()), key_secret("y", random_key()))
    assert ring.conflict is None


@pytest.mark.parametrize("index", ["0", "-1", "two", "1.5", ""], ids=repr)
def test_a_non_positive_or_non_integer_index_makes_the_secret_invalid(index):
    ring = keyring_of(key_secret("x", random_key(), index=index))
    assert names(ring) == []
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
