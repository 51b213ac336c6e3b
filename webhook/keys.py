"""Key material: validity, fingerprint, and the order of a namespace's keys.

Everything here is pure. Key bytes enter `check_key` and never leave it: what comes
out is a `KeyCheck` holding the verdict and the fingerprint (SPEC §2), so the rest of
the program cannot log or cache key material by accident.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
KeyEncoding = Literal["auto", "raw", "base64"]

INDEX_ANNOTATION = "keymount.io/key-index"
ALLOW_DELETE_ANNOTATION = "keymount.io/allow-delete"

# Standard and URL-safe alphabets, padding optional (SPEC §2).
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/\-_]+={0,2}")
_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]+")


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """The verdict on one key field. Holds no key bytes."""

    valid: bool
    reason: str = ""
    fingerprint: str = ""
    encoding: Literal["raw", "base64", ""] = ""
    warning: str = ""


def fingerprint_key(key: bytes) -> str:
    """Key check value: first 3 bytes of AES-256-ECB(key, zero block), in hex."""
    encryptor = Cipher(algorithms.AES256(key), modes.ECB()).encryptor()
    return (encryptor.update(bytes(16)) + encryptor.finalize())[:3].hex()


def decode_base64_key(text: bytes) -> bytes | None:
    """Standard or URL-safe base64, padding optional; None when it is not base64."""
    if not _BASE64_TEXT.fullmatch(text):
        return None
    unpadded = text.rstrip(b"=")
    padded = unpadded + b"=" * (-len(unpadded) % 4)
    try:
        return base64.b64decode(padded.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError):
        return None


def check_key(value: bytes | None, *, subject: str = "field 'encryption-key'",
              encoding: KeyEncoding = "auto") -> KeyCheck:
    """Decide whether the bytes of a key field are a usable AES-256 key (SPEC §2).

    `subject` names where the bytes came from in the reason ("field 'x'", "stdin").
    """
    if value is None:
        return KeyCheck(False, f"{subject} is missing")
    if not value:
        return KeyCheck(False, f"{subject} is empty (0 bytes); need 32 random bytes")
    if encoding != "base64" and len(value) == KEY_BYTES:
        return _check_key_bytes(value, encoding="raw")
    if encoding != "raw":
        text = value.rstrip()
        decoded = decode_base64_key(text)
        if decoded is not None:
            if len(decoded) == KEY_BYTES:
                return _check_key_bytes(decoded, encoding="base64")
            return KeyCheck(False, f"{subject} is base64 of {len(decoded)} bytes; "
                                   f"need base64 of exactly {KEY_BYTES} bytes")
    wanted = {
        "auto": f"exactly {KEY_BYTES} raw bytes or base64 of {KEY_BYTES} bytes",
        "raw": f"exactly {KEY_BYTES} raw bytes (--key-encoding raw)",
        "base64": f"base64 of exactly {KEY_BYTES} bytes (--key-encoding base64)",
    }[encoding]
    return KeyCheck(False, f"{subject} holds {len(value)} bytes; need {wanted}")


def generate_key() -> bytes:
    """32 bytes from the OS CSPRNG (`secrets`), redrawn in the astronomically unlikely
    case that they would fail our own checks."""
    while True:
        key = secrets.token_bytes(KEY_BYTES)
        result = check_key(key)
        if result.valid and not result.warning:
            return key


def _check_key_bytes(key: bytes, *, encoding: Literal["raw", "base64"]) -> KeyCheck:
    if key.count(key[:1]) == len(key):
        return KeyCheck(False, f"key is degenerate: all {KEY_BYTES} bytes are equal")
    warning = ""
    if encoding == "raw" and _PRINTABLE_ASCII.fullmatch(key):
        warning = ("key is 32 printable ASCII characters: it looks like a passphrase, "
                   "not random bytes; generate one with `keymount keys create --generate`")
    return KeyCheck(True, fingerprint=fingerprint_key(key), encoding=encoding, warning=warning)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What keymount keeps of one key Secret: metadata and the verdict, never bytes."""

    namespace: str
    name: str
    check: KeyCheck
    index: int = 0  # keymount.io/key-index; missing counts as 0 (SPEC §3)
    index_explicit: bool = False
    created: datetime | None = None

    @property
    def valid(self) -> bool:
        return self.check.valid

    @property
    def fingerprint(self) -> str:
        return self.check.fingerprint


def parse_key_index(raw: str | None) -> tuple[int, bool, str]:
    """(index, explicit, error) from the key-index annotation's value."""
    if raw is None:
        return 0, False, ""
    text = raw.strip()
    if not re.fullmatch(r"\+?[0-9]+", text) or int(text) < 1:
        return 0, False, f"annotation {INDEX_ANNOTATION}={raw!r} is not a positive integer"
    return int(text), True, ""


def build_key_record(*, namespace: str, name: str, value: bytes | None,
                     annotations: Mapping[str, str], created: datetime | None,
                     field: str, encoding: KeyEncoding) -> KeyRecord:
    """Check one Secret's key field and index annotation; the bytes stop here."""
    check = check_key(value, subject=f"field {field!r}", encoding=encoding)
    index, explicit, index_error = parse_key_index(annotations.get(INDEX_ANNOTATION))
    if index_error:
        check = KeyCheck(False, index_error)
    return KeyRecord(
        namespace=namespace, name=name, check=check, index=index, index_explicit=explicit,
        created=created,
    )


def sort_key(record: KeyRecord) -> tuple:
    """SPEC §3: index (missing = 0), then creationTimestamp (missing first), then name."""
    created = record.created
    return (record.index, created is not None, created.timestamp() if created else 0.0,
            record.name)


@dataclass(frozen=True, slots=True)
class KeyFile:
    """One file of the mounted volume: its name, its Secret, its key's fingerprint."""

    file: str
    secret: str
    fingerprint: str

    def as_status(self) -> dict[str, str]:
        return {"file": self.file, "secret": self.secret, "fingerprint": self.fingerprint}


@dataclass(frozen=True, slots=True)
class Keyring:
    """The keys of one namespace, in file order, computed once per change.

    `files` and `status` (the files as the JSON of the keymount.io/status and audit
    annotations) are derived here, once, rather than on every admission.
    """

    namespace: str
    keys: tuple[KeyRecord, ...] = ()  # valid keys; keys[0] is encryption-key-1
    invalid: tuple[KeyRecord, ...] = ()
    conflict: tuple[KeyRecord, KeyRecord] | None = None  # two valid keys share an index
    files: tuple[KeyFile, ...] = ()
    status: str = "[]"

    @property
    def newest(self) -> KeyRecord | None:
        return self.keys[-1] if self.keys else None

    def find(self, name: str) -> KeyRecord | None:
        return next((r for r in (*self.keys, *self.invalid) if r.name == name), None)


def build_keyring(namespace: str, records: Iterable[KeyRecord]) -> Keyring:
    records = list(records)
    valid = sorted((r for r in records if r.valid), key=sort_key)
    invalid = sorted((r for r in records if not r.valid), key=lambda r: r.name)
    conflict = None
    by_index: dict[int, KeyRecord] = {}
    for record in valid:
        if record.index_explicit and record.index in by_index:
            conflict = (by_index[record.index], record)
            break
        if record.index_explicit:
            by_index[record.index] = record
    files = tuple(KeyFile(f"encryption-key-{n}", r.name, r.fingerprint)  # SPEC §3: 1..N
                  for n, r in enumerate(valid, start=1))
    status = json.dumps([f.as_status() for f in files], separators=(",", ":"))
    return Keyring(namespace, tuple(valid), tuple(invalid), conflict, files, status)
