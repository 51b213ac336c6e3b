"""Encrypted backups of key Secrets, and the plan of a restore.

A backup is one file in the age format (age-encryption.org/v1), to one or more age
recipients or a passphrase; the age CLI, rage and SOPS read it. Inside is a JSON
document listing every key Secret of the chosen namespaces with its number, creation
and activation times, fingerprint, the numbers its namespace had used, and the key
field's bytes as stored. Key bytes exist only inside the ciphertext and in this
process's memory: they never go to a temporary file, a log or an error. The
cryptography is pyrage's (rage, a maintained implementation of age); nothing here
encrypts by hand.

Restoring is all or nothing (docs/operations.md, "Backup and restore"): the whole file
is judged first, against itself (one number, one name per key in a namespace), then
against the cluster (a number held by a different key, a missing namespace, a name held
by another Secret refuse the whole restore; the same key already present is a no-op).
Only keys of the file are then written, as backed up, so a restore that stops half-way
is finished by running it again.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import pyrage
from pyrage import passphrase as age_passphrase
from pyrage import x25519

from .config import Settings
from .errors import UserFacingError
from .key_secrets import read_key_field
from .keys import (
    KeyRecord,
    Keyring,
    NumberSet,
    check_key,
    format_numbers,
    parse_numbers,
    parse_time,
)
from .names import (
    ACTIVATED_AT_ANNOTATION,
    GENERATED_ANNOTATION,
    INDEX_ANNOTATION,
    NUMBERS_USED_ANNOTATION,
    RETIRED_ANNOTATION,
    staged_field,
)

FORMAT = "keymount-backup/v1"


class BackupError(UserFacingError):
    """A backup that cannot be made, read or restored; nothing was written."""


@dataclass(frozen=True, slots=True)
class BackedUpKey:
    namespace: str
    name: str
    number: int
    created: str
    fingerprint: str
    numbers_used: str
    retired: bool
    # The key field as stored; None for a retired key. Left out of repr() (as
    # keyrule.DecodedKey leaves its key): a debugger, `pytest --showlocals` or an error
    # reporter that records a traceback's locals prints the entry, and with it every
    # RestorePlan and list of entries, by its fingerprint only.
    value: bytes | None = field(repr=False)
    generated: bool = False
    # A staged key: `value` is its staged field, restored there (not yet active).
    staged: bool = False
    # keymount.io/activated-at in seconds since the epoch, or 0: a restored key keeps
    # it, so its age counts from its first activation, not from the restore. An int
    # (32 bytes) rather than its text (76): a restore of 330,000 keys holds them all.
    activated_at: int = 0

    @property
    def activated_text(self) -> str:
        """activated-at as keymount stamps it (RFC 3339 UTC, to the second), or ""."""
        return datetime.fromtimestamp(self.activated_at, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ") if self.activated_at else ""

    def as_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "number": self.number,
                "created": self.created, "fingerprint": self.fingerprint,
                "numbersUsed": self.numbers_used, "retired": self.retired,
                "generated": self.generated, "staged": self.staged,
                "activatedAt": self.activated_text,
                "key": None if self.value is None else base64.b64encode(self.value).decode()}


# --- making a backup ---------------------------------------------------------------------

def collect(secrets: Iterable[Mapping[str, Any]], keyrings: Mapping[str, Keyring], *,
            settings: Settings) -> list[BackedUpKey]:
    """Every numbered key Secret (valid or retired), with its bytes, by namespace and
    number. Legacy keys must be pinned first: a restore needs their numbers for good."""
    keys = []
    for secret in secrets:
        meta = secret.get("metadata") or {}
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        keyring = keyrings[namespace]
        record = keyring.find(name)
        if record is None or record.state == "invalid":
            continue
        number = keyring.number_of(name)
        if number is None or not record.numbered:
            raise BackupError(
                f"key Secret {name!r} in namespace {namespace} has no number of its own yet "
                f"(made before keymount numbered keys); pin it first so a restore gives it "
                f"the same file: keymount keys pin -n {namespace}")
        staged = record.state == "staged"
        value, _ = read_key_field(secret, staged_field(settings.key_field) if staged
                                  else settings.key_field)
        annotations = meta.get("annotations") or {}
        keys.append(BackedUpKey(
            namespace, name, number, str(meta.get("creationTimestamp") or ""),
            record.fingerprint, format_numbers(record.numbers_used | number),
            record.retired, None if record.retired else value,
            annotations.get(GENERATED_ANNOTATION) == "true", staged,
            0 if staged else _seconds(annotations.get(ACTIVATED_AT_ANNOTATION))))
    return sorted(keys, key=lambda k: (k.namespace, k.number))


def encode(keys: list[BackedUpKey], *, now: datetime | None = None) -> bytes:
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({"format": FORMAT, "created": stamp,
                       "keys": [k.as_json() for k in keys]}, indent=1).encode()


def encrypt(plaintext: bytes, *, recipients: Sequence[str] = (),
            passphrase: str | None = None) -> bytes:
    if passphrase is not None:
        return bytes(age_passphrase.encrypt(plaintext, passphrase))
    try:
        parsed = [x25519.Recipient.from_str(r.strip()) for r in recipients]
    except pyrage.RecipientError:
        raise BackupError("a --recipient is not an age public key (age1…); make a key pair "
                          "with age-keygen and pass its public key") from None
    if not parsed:
        raise BackupError("give at least one --recipient AGE_PUBLIC_KEY or a "
                          "--passphrase-file")
    return bytes(pyrage.encrypt(plaintext, parsed))


# --- reading a backup ----------------------------------------------------------------------

def read_identities(text: str) -> list[x25519.Identity]:
    """An age identity file: AGE-SECRET-KEY-1… lines; comments and blanks ignored."""
    identities = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise BackupError("the identity file holds a line that is not an age secret key "
                              "(AGE-SECRET-KEY-1…)") from None
    if not identities:
        raise BackupError("the identity file holds no age secret key")
    return identities


def decrypt(ciphertext: bytes, *, identities: Sequence[x25519.Identity] = (),
            passphrase: str | None = None, source: str = "the backup") -> list[BackedUpKey]:
    """Decrypt and check every key's fingerprint; any fault refuses the whole file."""
    return parse(_open(ciphertext, identities=identities, passphrase=passphrase,
                       source=source), source=source)


def decrypt_file(path: str, *, identities: Sequence[x25519.Identity] = (),
                 passphrase: str | None = None) -> list[BackedUpKey]:
    """`decrypt` of a file, holding as little at once as it can: with identities the
    file is decrypted as a stream (the ciphertext is never in memory whole), the
    plaintext is dropped once decoded to text, and each entry becomes a `BackedUpKey`
    as soon as it is parsed (never a dict of the whole document), so a restore stays
    within twice the backup's size plus 100 MB (README, "Backup and restore"). pyrage
    decrypts a passphrase only from memory: such a file costs one more copy."""
    plaintext: bytes | memoryview
    try:
        with open(path, "rb") as handle:
            if passphrase is not None:
                plaintext = _open(handle.read(), identities=(), passphrase=passphrase,
                                  source=path)
            else:
                plaintext = _stream(handle, identities=identities, source=path)
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = str(plaintext, "utf-8")
    except ValueError:
        raise BackupError(f"{path} is not a keymount backup ({FORMAT})") from None
    finally:
        del plaintext
    try:
        return _keys_of(text, source=path)
    finally:
        del text  # not left in this frame's locals by a refusal (see _keys_of)


def _stream(handle: BinaryIO, *, identities: Sequence[x25519.Identity],
            source: str) -> bytes | memoryview:
    out = io.BytesIO()
    try:
        pyrage.decrypt_io(handle, out, list(identities))
    except (pyrage.DecryptError, OSError):  # a damaged stream is an OSError from pyrage
        raise BackupError(
            f"cannot decrypt {source}: wrong identity or passphrase, or the file is damaged "
            f"or truncated (age authenticates every chunk); nothing was restored") from None
    return out.getbuffer()


def _open(ciphertext: bytes, *, identities: Sequence[x25519.Identity],
          passphrase: str | None, source: str) -> bytes:
    try:
        return bytes(age_passphrase.decrypt(ciphertext, passphrase) if passphrase is not None
                     else pyrage.decrypt(ciphertext, list(identities)))
    except pyrage.DecryptError as exc:
        if str(exc).startswith("Excessive work"):
            # age refuses a passphrase file whose scrypt work factor is far over what it
            # measures this machine does in about a second (made on a faster machine,
            # or this one is busy): the passphrase was never tried.
            raise BackupError(
                f"cannot decrypt {source}: its passphrase was made costlier to try than "
                f"age accepts on this machine right now (age measures the machine; a busy "
                f"one measures slow). Retry on an idle or faster machine, or decrypt it "
                f"with the age CLI, which asks before a long decryption; nothing was "
                f"restored") from None
        raise BackupError(
            f"cannot decrypt {source}: wrong identity or passphrase, or the file is damaged "
            f"or truncated (age authenticates every chunk); nothing was restored") from None


_ENTRY_FIELDS = frozenset(("namespace", "name", "number", "fingerprint", "key"))


def _entry(obj: dict[str, Any]) -> Any:
    """json's object_hook: a key entry becomes a BackedUpKey at once (its dict is
    dropped); any other object (the document itself) is kept as it is."""
    if not _ENTRY_FIELDS <= obj.keys():
        return obj
    key = obj["key"]
    return BackedUpKey(
        # Interned: a namespace has many keys, and keymount names keys by their number
        # (keymount-key-<n>), so namespaces share names.
        sys.intern(str(obj["namespace"])), sys.intern(str(obj["name"])), int(obj["number"]),
        str(obj.get("created", "")), str(obj["fingerprint"]),
        sys.intern(str(obj.get("numbersUsed", ""))),  # keys of one number share it
        bool(obj.get("retired")),
        None if key is None else base64.b64decode(key, validate=True),
        bool(obj.get("generated")), bool(obj.get("staged")),
        _seconds(obj.get("activatedAt")))


def _seconds(text: object) -> int:
    """An RFC 3339 time as whole seconds since the epoch; 0 for none or a malformed one
    (the restored key is then stamped with the restore's time)."""
    when = parse_time(text)
    return 0 if when is None else max(0, int(when.timestamp()))


def parse(plaintext: bytes, *, source: str) -> list[BackedUpKey]:
    try:
        text = plaintext.decode()
    except ValueError:
        raise BackupError(f"{source} is not a keymount backup ({FORMAT})") from None
    finally:
        del plaintext
    try:
        return _keys_of(text, source=source)
    finally:
        del text  # not left in this frame's locals by a refusal (see _keys_of)


def _keys_of(text: str, *, source: str) -> list[BackedUpKey]:
    """The entries of a decrypted backup, every fingerprint checked.

    The text holds every key in base64, and so may a document only half turned into
    entries. A traceback keeps each frame's locals, and error reporters (Sentry,
    pytest --showlocals) print them: a refusal leaves neither in this frame, nor in
    its callers' (they drop theirs as it passes), only entries, which print by their
    fingerprint."""
    try:
        document = json.loads(text, object_hook=_entry)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError("format")
        keys = document["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, BackedUpKey) for k in keys):
            raise ValueError("keys")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        text, document = "", None
        raise BackupError(f"{source} is not a keymount backup ({FORMAT})") from None
    del text, document
    for key in keys:
        if key.retired:
            continue
        found = check_key(key.value).fingerprint
        if found != key.fingerprint:  # only fingerprints are ever named
            raise BackupError(
                f"{source}: key {key.namespace}/{key.name} (number {key.number}) does not "
                f"match its fingerprint {key.fingerprint} (found {found or 'no valid key'}); "
                f"nothing was restored")
    return keys


# --- restoring ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RestorePlan:
    create: tuple[BackedUpKey, ...]
    present: tuple[BackedUpKey, ...]  # the same key is already there: nothing to do


def file_conflict(keys: Iterable[BackedUpKey]) -> str | None:
    """Why the file contradicts itself, or None: two entries of one namespace with the
    same number, or the same name (the API server holds one Secret per name; a number
    belongs to one key). Both entries are named, so the user can tell which to drop."""
    by_number: dict[tuple[str, int], BackedUpKey] = {}
    by_name: dict[tuple[str, str], BackedUpKey] = {}
    for key in keys:
        first = by_number.setdefault((key.namespace, key.number), key)
        if first is not key:
            return (f"the backup holds two entries with number {key.number} in namespace "
                    f"{key.namespace}: {first.name!r} ({_describe(first)}) and {key.name!r} "
                    f"({_describe(key)})")
        first = by_name.setdefault((key.namespace, key.name), key)
        if first is not key:
            return (f"the backup holds two entries named {key.name!r} in namespace "
                    f"{key.namespace}: number {first.number} ({_describe(first)}) and "
                    f"number {key.number} ({_describe(key)})")
    return None


def _describe(key: BackedUpKey) -> str:
    return "retired" if key.retired else f"fingerprint {key.fingerprint}"


def plan_restore(keys: Sequence[BackedUpKey], keyrings: Mapping[str, Keyring], *,
                 secret_names: Mapping[str, frozenset[str] | None] | None = None
                 ) -> RestorePlan:
    """Judge the whole restore before anything is written: the file against itself,
    then against the namespaces as they are; refuse it whole on any entry the file
    contradicts, any number held by a different key, or used since the backup was made.
    What is left to create comes in the order the keys were made (`creation_order`).

    `secret_names`: per namespace of the file, the names of every Secret there (None:
    the namespace does not exist); without it only key Secrets are checked."""
    conflict = file_conflict(keys)
    if conflict is not None:
        raise BackupError(f"{conflict}; fix or remake the backup (keymount keys backup); "
                          f"nothing was restored")
    if secret_names is not None:
        missing = sorted({k.namespace for k in keys if secret_names.get(k.namespace) is None})
        if missing:
            raise BackupError(
                f"namespace(s) {', '.join(missing)} do not exist; create them first "
                f"(kubectl create namespace {' '.join(missing)}); nothing was restored")
    create, present = [], []
    for key in keys:
        keyring = keyrings.get(key.namespace) or Keyring(key.namespace)
        holder: KeyRecord | None = keyring.holder_of(key.number)
        same_name = keyring.find(key.name)
        if holder is not None:
            same = holder.name == key.name and (
                holder.fingerprint == key.fingerprint or (key.retired and holder.retired))
            if not same:
                raise BackupError(
                    f"number {key.number} in namespace {key.namespace} is held by key Secret "
                    f"{holder.name!r} (fingerprint {holder.fingerprint or '-'}), not by "
                    f"{key.name!r} ({key.fingerprint or 'retired'}) as in the backup; nothing "
                    f"was restored")
            present.append(key)
            continue
        if same_name is not None:
            raise BackupError(
                f"Secret {key.name!r} in namespace {key.namespace} exists with another "
                f"number; nothing was restored")
        names = (secret_names or {}).get(key.namespace) or frozenset()
        if key.name in names:
            raise BackupError(
                f"Secret {key.name!r} in namespace {key.namespace} exists and is not a key "
                f"Secret; rename or delete it (kubectl get secret {key.name} -n "
                f"{key.namespace}); nothing was restored")
        if key.number in keyring.used:
            raise BackupError(
                f"number {key.number} in namespace {key.namespace} was used after the backup "
                f"was made (its key is gone); restore into an empty namespace; nothing was "
                f"restored")
        create.append(key)
    create.sort(key=creation_order)
    return RestorePlan(tuple(create), tuple(present))


def check_present(present: Sequence[BackedUpKey],
                  stored: Mapping[str, Sequence[Mapping[str, Any]]], *,
                  settings: Settings) -> None:
    """Refuse the restore if a key the plan found present (its name, number and
    fingerprint) holds other bytes than the backup's: a fingerprint is a 3-byte check
    value, and a key with a given one is found in seconds. `stored`: the key Secrets of
    each namespace with a present key, as the API server holds them."""
    for key in present:
        if key.value is None:
            continue  # a tombstone holds no key material
        secrets = {str((s.get("metadata") or {}).get("name")): s
                   for s in stored.get(key.namespace, ())}
        field = staged_field(settings.key_field) if key.staged else settings.key_field
        held = read_key_field(secrets.get(key.name) or {}, field)[0]
        if held is None or not hmac.compare_digest(held, key.value):
            raise BackupError(
                f"key Secret {key.name!r} in namespace {key.namespace} holds number "
                f"{key.number} and fingerprint {key.fingerprint} as in the backup, but other "
                f"key material: it is not the backed-up key. Find out who wrote it (kubectl "
                f"get secret {key.name} -n {key.namespace} --show-managed-fields -o yaml); "
                f"nothing was restored")


def creation_order(key: BackedUpKey) -> tuple[str, int, int]:
    """Keys of a namespace in the order they were made: each key records every number
    used before it and its own, so a later key's record is strictly larger. Restored in
    that order, each key's number is one no key written before it recorded (an old key
    imported below the highest comes after the keys whose numbers it records)."""
    numbers = parse_numbers(key.numbers_used) or NumberSet()
    return (key.namespace, sum(high - low + 1 for low, high in numbers.ranges), key.number)


def restored_secret(key: BackedUpKey, *, settings: Settings,
                    labels: Mapping[str, str]) -> dict[str, Any]:
    """The Secret to create: its number and record of used numbers, as backed up."""
    annotations = {INDEX_ANNOTATION: str(key.number),
                   NUMBERS_USED_ANNOTATION: key.numbers_used or str(key.number)}
    if key.retired:
        annotations[RETIRED_ANNOTATION] = "restored"
    if key.generated:
        annotations[GENERATED_ANNOTATION] = "true"
    if key.activated_at and key.value is not None and not key.staged:
        # Kept by the mutating webhook only if it is earlier than its clock
        # (keyguard.time_stamps); anything else is stamped anew.
        annotations[ACTIVATED_AT_ANNOTATION] = key.activated_text
    secret: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": key.name, "namespace": key.namespace, "labels": dict(labels),
                     "annotations": annotations}}
    if key.value is not None:
        # An activated key held its bytes in both fields; the key field alone is the key.
        field = staged_field(settings.key_field) if key.staged else settings.key_field
        secret["data"] = {field: base64.b64encode(key.value).decode()}
    return secret
