"""Key material: validity, fingerprint, and the numbers of a namespace's keys.

Everything here is pure. Key bytes enter `check_key` and never leave it: what comes
out is a `KeyCheck` holding the verdict and the fingerprint (docs/contract.md, "Valid
keys"), so the rest of the program cannot log or cache key material by accident.
"""

from __future__ import annotations

import bisect
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# The validity rule lives in the standard-library package applications import; its
# names stay importable from here.
from keymount.keyrule import KEY_BYTES as KEY_BYTES
from keymount.keyrule import KeyEncoding as KeyEncoding
from keymount.keyrule import decode_key

from .names import (
    ACTIVATED_AT_ANNOTATION,
    INDEX_ANNOTATION,
    NUMBERS_USED_ANNOTATION,
    RETIRED_ANNOTATION,
    STAGED_AT_ANNOTATION,
    key_file_name,
    slot_secret_name,
    staged_field,
)


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


def check_key(value: bytes | None, *, subject: str = "field 'encryption-key'",
              encoding: KeyEncoding = "auto") -> KeyCheck:
    """Decide whether the bytes of a key field are a usable AES-256 key
    (docs/contract.md, "Valid keys"), by the rule applications' readers share
    (keymount/keyrule.py).

    `subject` names where the bytes came from in the reason ("field 'x'", "stdin").
    """
    decoded = decode_key(value, subject=subject, encoding=encoding)
    if not decoded.valid:
        return KeyCheck(False, decoded.reason)
    return KeyCheck(True, fingerprint=fingerprint_key(decoded.key), encoding=decoded.encoding,
                    warning=decoded.warning)


def generate_key() -> bytes:
    """32 bytes from the OS CSPRNG (`secrets`), redrawn in the astronomically unlikely
    case that they would fail our own checks."""
    while True:
        key = secrets.token_bytes(KEY_BYTES)
        result = check_key(key)
        if result.valid and not result.warning:
            return key


MAX_NUMBERS_TEXT = 4096
"""The longest `keymount.io/numbers-used` value keymount reads. The annotation is
stamped by keymount as ranges (`1-41,57`), a few characters for any real namespace;
the cap keeps the work on a hostile value small and is checked before anything else
looks at it."""


def _merged(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return tuple(merged)


@dataclass(frozen=True, slots=True)
class NumberSet:
    """Key numbers as sorted, disjoint, non-adjacent closed ranges.

    Never expanded into its members: `1-999999999` costs what `1` costs, so the size
    of keymount's work follows the length of the annotation a request carries, not the
    numbers it spells (docs/architecture.md, "Bounded work"). There is deliberately no
    `__iter__`."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, *parts: int | NumberSet | Iterable[int]) -> NumberSet:
        """The union of numbers, number sets and small collections of numbers."""
        spans: list[tuple[int, int]] = []
        for part in parts:
            if isinstance(part, NumberSet):
                spans.extend(part.ranges)
            elif isinstance(part, int):
                spans.append((part, part))
            else:
                spans.extend((n, n) for n in part)
        return cls(_merged(spans))

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, int):
            return False
        i = bisect.bisect_right(self.ranges, number, key=lambda span: span[0]) - 1
        return i >= 0 and self.ranges[i][1] >= number

    def __or__(self, other: int | NumberSet | Iterable[int]) -> NumberSet:
        return NumberSet.of(self, other)

    def __le__(self, other: NumberSet) -> bool:
        """Every number of this set is in `other`."""
        for low, high in self.ranges:
            i = bisect.bisect_right(other.ranges, low, key=lambda span: span[0]) - 1
            if i < 0 or other.ranges[i][1] < high:
                return False
        return True

    def __bool__(self) -> bool:
        return bool(self.ranges)

    @property
    def highest(self) -> int:
        """The highest number, 0 for an empty set."""
        return self.ranges[-1][1] if self.ranges else 0

    def __str__(self) -> str:
        """`1-3,5`: the form of the numbers-used annotation."""
        return ",".join(str(low) if low == high else f"{low}-{high}"
                        for low, high in self.ranges)


_NUMBER_PART = re.compile(r"\s*([0-9]{1,9})(?:-([0-9]{1,9}))?\s*")


def parse_numbers(text: str | None) -> NumberSet | None:
    """`1-3,5` as a NumberSet; None when it is not that form or longer than
    MAX_NUMBERS_TEXT (checked first: nothing longer is even split)."""
    if text is None or not text.strip():
        return NumberSet()
    if len(text) > MAX_NUMBERS_TEXT:
        return None
    spans: list[tuple[int, int]] = []
    for part in text.split(","):
        match = _NUMBER_PART.fullmatch(part)
        if not match:
            return None
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if low < 1 or high < low:
            return None
        spans.append((low, high))
    return NumberSet(_merged(spans))


def format_numbers(numbers: NumberSet | Iterable[int]) -> str:
    """{1, 2, 3, 5} as `1-3,5`."""
    return str(numbers if isinstance(numbers, NumberSet) else NumberSet.of(numbers))


def revision(resource_version: object) -> int:
    """An object's or a list's resourceVersion as a number, 0 when it is not one.

    The API server's resourceVersions are etcd revisions, one counter for the whole
    store, so they order every change of every object (Kubernetes 1.34 guarantees
    this ordering: KEP-5504, comparable resource versions). The key cache uses the
    order to never go back in time; 0 (a source without versions, such as
    `--keys-from`) makes the newest arrival win, as before."""
    text = resource_version if isinstance(resource_version, str) else ""
    return int(text) if text.isdigit() and len(text) <= 19 else 0


KeyState = Literal["valid", "invalid", "retired", "slot", "staged"]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What keymount keeps of one key Secret: metadata and the verdict, never bytes."""

    namespace: str
    name: str
    check: KeyCheck
    index: int = 0  # keymount.io/key-index; 0 when the Secret has none
    index_explicit: bool = False
    created: datetime | None = None
    retired: bool = False  # a tombstone: keymount.io/retired, no key material
    numbers_used: NumberSet = NumberSet()  # keymount.io/numbers-used at creation
    recorded: bool = False  # carries keymount.io/numbers-used: numbered by keymount
    revision: int = 0  # metadata.resourceVersion as a number; 0 when unknown
    # A key slot: `keymount-key-<n>`, numbered n, no key material yet. Reserved in
    # advance so Pods can list it; filling it (an UPDATE) is how a key is made.
    slot: bool = False
    # A staged key: a slot whose bytes are in the staged field only. `check` judges
    # those bytes (its fingerprint is the key's), but it is not a key yet: not valid,
    # not counted, not a file; Pods hold it under staged/ until it is activated.
    staged: bool = False
    # keymount.io/staged-at and keymount.io/activated-at, as keymount's mutating webhook
    # stamped them; None when absent or not a time (a key from before staged keys).
    staged_at: datetime | None = None
    activated_at: datetime | None = None

    @property
    def valid(self) -> bool:
        return self.check.valid and not self.retired and not self.staged

    @property
    def fingerprint(self) -> str:
        return self.check.fingerprint

    @property
    def active_since(self) -> datetime | None:
        """When the key became usable: its activation (a slot filled or a staged key
        activated, maybe long after the slot was made), else its creation."""
        return self.activated_at or self.created

    @property
    def numbered(self) -> bool:
        """Its number is its index for good: keymount stamped or pinned it. Otherwise it
        is a legacy key (made before keymount numbered keys), numbered as 0.1 did."""
        return self.index_explicit and self.recorded

    @property
    def state(self) -> KeyState:
        if self.retired:
            return "retired"
        if self.staged:
            return "staged"
        return "slot" if self.slot else "valid" if self.check.valid else "invalid"


def parse_key_index(raw: str | None) -> tuple[int, bool, str]:
    """(index, explicit, error) from the key-index annotation's value."""
    if raw is None:
        return 0, False, ""
    text = raw.strip()
    if not re.fullmatch(r"\+?[0-9]{1,9}", text) or int(text) < 1:
        return 0, False, f"annotation {INDEX_ANNOTATION}={raw!r} is not a positive integer"
    return int(text), True, ""


MAX_TIME_TEXT = 64  # longer than any RFC 3339 time; a longer value is not parsed


# The times keymount reads are kept within these (in UTC): a time outside cannot be
# shown in UTC (year 1 with a positive offset) or have a period of up to ten years
# added (year 9999), and anyone who may write a key Secret's annotations chose it.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(9000, 1, 1, tzinfo=UTC)


def parse_time(text: object) -> datetime | None:
    """An RFC 3339 time with its offset (`2026-12-02T13:00:00Z`), in UTC, between 1970
    and 9000; None for anything else."""
    if not isinstance(text, str) or not text or len(text) > MAX_TIME_TEXT:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if value.tzinfo is None:
            return None
        value = value.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    return value if EARLIEST_TIME <= value < LATEST_TIME else None


def build_key_record(*, namespace: str, name: str, value: bytes | None,
                     annotations: Mapping[str, str], created: datetime | None,
                     field: str, encoding: KeyEncoding,
                     staged_value: bytes | None = None) -> KeyRecord:
    """Check one Secret's key field (and staged field) and annotations; the bytes stop
    here."""
    retired = RETIRED_ANNOTATION in annotations
    staged_name = staged_field(field)
    if retired:
        # A tombstone keeps its number and nothing else (docs/contract.md, retiring).
        check = (KeyCheck(False, "retired") if value is None and staged_value is None else
                 KeyCheck(False, f"marked {RETIRED_ANNOTATION} but still holds key material"))
    elif value is not None and staged_value is not None and value != staged_value:
        # An activated key keeps its staged field: running Pods may read either, so the
        # two must be one key (the guard refuses anything else; this is a Secret written
        # around it).
        check = KeyCheck(False, f"fields {field!r} and {staged_name!r} hold different "
                                f"bytes; an activated key holds the same key in both")
    else:
        check = check_key(value, subject=f"field {field!r}", encoding=encoding)
    index, explicit, index_error = parse_key_index(annotations.get(INDEX_ANNOTATION))
    numbers_used = parse_numbers(annotations.get(NUMBERS_USED_ANNOTATION))
    if index_error:
        check = KeyCheck(False, index_error)
    elif numbers_used is None:
        check = KeyCheck(False, f"annotation {NUMBERS_USED_ANNOTATION} is not a list of "
                                f"numbers such as 1-3,5 of at most {MAX_NUMBERS_TEXT} "
                                f"characters")
    if retired and (value is not None or staged_value is not None):
        retired = False  # judged as an invalid key, not as a tombstone
    # A slot: the reserved name of its own number, no key material, no other fault.
    slot = (value is None and RETIRED_ANNOTATION not in annotations and explicit
            and numbers_used is not None and name == slot_secret_name(index))
    staged = False
    if slot and staged_value is not None:
        # A staged key: a slot holding its key in the staged field only.
        slot = False
        check = check_key(staged_value, subject=f"field {staged_name!r}", encoding=encoding)
        staged = check.valid
    elif slot:
        check = KeyCheck(False, "empty slot: reserved for the next key")
    return KeyRecord(
        namespace=namespace, name=name, check=check, index=index, index_explicit=explicit,
        created=created, retired=retired, numbers_used=numbers_used or NumberSet(),
        recorded=NUMBERS_USED_ANNOTATION in annotations, slot=slot, staged=staged,
        staged_at=parse_time(annotations.get(STAGED_AT_ANNOTATION)),
        activated_at=parse_time(annotations.get(ACTIVATED_AT_ANNOTATION)),
    )


def legacy_order(record: KeyRecord) -> tuple[int, bool, float, str]:
    """keymount 0.1's file order: index (missing first), creationTimestamp (missing
    first), then name. Legacy keys are numbered by their position in it, so a 0.1
    namespace keeps its files after the upgrade."""
    created = record.created
    return (record.index, created is not None, created.timestamp() if created else 0.0,
            record.name)


@dataclass(frozen=True, slots=True)
class KeyFile:
    """One file of the mounted volume: its number, its Secret, its key's fingerprint."""

    number: int
    secret: str
    fingerprint: str
    file: str = field(init=False, compare=False)  # encryption-key-<number>

    def __post_init__(self) -> None:
        object.__setattr__(self, "file", key_file_name(self.number))

    def as_status(self) -> dict[str, str]:
        return {"file": self.file, "secret": self.secret, "fingerprint": self.fingerprint}


# weakref_slot: the webhook's remembered verdicts name a keyring without keeping it
# alive (webhook/podverdicts.py).
@dataclass(frozen=True, slots=True, weakref_slot=True)
class Keyring:
    """The keys of one namespace, numbered, computed once per change.

    A key's number is its `keymount.io/key-index` once keymount has numbered it (it
    then carries `keymount.io/numbers-used`). A legacy key, made before keymount
    numbered keys, keeps the number keymount 0.1 gave it: its position among the
    legacy keys in 0.1's order. New keys cannot become legacy (the webhook stamps
    them), and no key can be retired while a legacy key remains (`keys pin` first), so
    these positions never move. `files` and `status` (the JSON of the
    keymount.io/status and audit annotations) are derived here, once, rather than on
    every admission.
    """

    namespace: str
    keys: tuple[KeyRecord, ...] = ()  # valid keys, by number; keys[-1] is the active one
    files: tuple[KeyFile, ...] = ()  # one per key, same order
    invalid: tuple[KeyRecord, ...] = ()
    retired: tuple[KeyRecord, ...] = ()
    slots: tuple[KeyRecord, ...] = ()  # empty slots, by number
    conflict: tuple[KeyRecord, KeyRecord] | None = None  # two keys share a number
    used: NumberSet = NumberSet()  # every number this namespace has used
    status: str = "[]"
    # Staged keys, by number: at most one as the guard allows it (two writers staging
    # two slots at one instant can both pass; `staged` is then the lowest).
    staged_keys: tuple[KeyRecord, ...] = ()
    # What admissions derive from this keyring and the settings (the projected volume),
    # computed on first use: a keyring never changes, a new one replaces it.
    derived: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def derive(self, key: Any, build: Callable[[], Any]) -> Any:
        """`derived[key]`, built on first use."""
        if key not in self.derived:
            self.derived[key] = build()
        return self.derived[key]

    @property
    def newest(self) -> KeyRecord | None:
        return self.keys[-1] if self.keys else None

    @property
    def next_number(self) -> int:
        """The number a new key gets: one above every number ever used here."""
        return self.used.highest + 1

    @property
    def legacy(self) -> tuple[KeyRecord, ...]:
        """Valid keys keymount has not numbered: `keymount keys pin` stamps them."""
        return tuple(r for r in self.keys if not r.numbered)

    @property
    def active_number(self) -> int:
        """The number of the key applications encrypt with; 0 without one."""
        return self.files[-1].number if self.files else 0

    @property
    def staged(self) -> KeyRecord | None:
        """The staged key (the next to activate), if any."""
        return self.staged_keys[0] if self.staged_keys else None

    @property
    def free_slots(self) -> tuple[KeyRecord, ...]:
        """Empty slots above the active key, lowest first: the next keys' places. (A
        slot left below the active key, when a key made under another name took a
        higher number, stays empty: its number is used.) A staged key is no free slot."""
        active = self.active_number
        return tuple(r for r in self.slots if r.index > active)

    def find(self, name: str) -> KeyRecord | None:
        return self._names()[0].get(name)

    def number_of(self, name: str) -> int | None:
        """The number of a valid key, or of a tombstone, slot or staged key; None for
        anything else."""
        return self._names()[1].get(name)

    def _names(self) -> tuple[dict[str, KeyRecord], dict[str, int]]:
        """`find` and `number_of` as two maps, built once per keyring: a review's volume
        may name thousands of sources, each looked up (a scan per lookup was seconds of
        work for a forged review against a namespace of many keys)."""
        def build() -> tuple[dict[str, KeyRecord], dict[str, int]]:
            records: dict[str, KeyRecord] = {}
            for r in (*self.keys, *self.invalid, *self.retired, *self.slots,
                      *self.staged_keys):
                records.setdefault(r.name, r)  # the first, as a scan finds it
            numbers: dict[str, int | None] = {}
            for key_file in self.files:
                numbers.setdefault(key_file.secret, key_file.number)
            for r in (*self.retired, *self.slots, *self.staged_keys):
                numbers.setdefault(r.name, r.index if r.index_explicit else None)
            return records, {n: i for n, i in numbers.items() if i is not None}
        names: tuple[dict[str, KeyRecord], dict[str, int]] = self.derive("names", build)
        return names

    def holder_of(self, number: int) -> KeyRecord | None:
        """The valid key, tombstone, slot or staged key that holds `number` now, if
        any."""
        for key_file, record in zip(self.files, self.keys, strict=True):
            if key_file.number == number:
                return record
        return next((r for r in (*self.retired, *self.slots, *self.staged_keys)
                     if r.index_explicit and r.index == number), None)


def describe_conflict(keyring: Keyring) -> str:
    """What is wrong when two keys of a namespace share a number, and how to end it."""
    if keyring.conflict is None:
        return ""
    a, b = keyring.conflict
    ns = keyring.namespace
    number = (a.index if a.index_explicit and b.index_explicit and a.index == b.index
              else keyring.number_of(a.name))
    how = ("both made before keymount numbered keys" if not (a.numbered or b.numbered) else
           f"{INDEX_ANNOTATION} written without keymount's webhook")
    return (f"key Secrets {a.name!r} and {b.name!r} in namespace {ns!r} both have number "
            f"{number} ({how}): keymount cannot tell which one is file "
            f"encryption-key-{number}, and their names must not decide which key encrypts "
            f"new data. `keymount keys list -n {ns}` shows both with their fingerprints. "
            f"Keep the one your data was encrypted with and delete the other, after keeping "
            f"a copy as safe as the key itself (keymount allows the delete while they share "
            f"a number): kubectl delete secret NAME -n {ns}")


def build_keyring(namespace: str, records: Iterable[KeyRecord]) -> Keyring:
    records = list(records)
    valid = [r for r in records if r.valid]
    retired = sorted((r for r in records if r.retired), key=lambda r: (r.index, r.name))
    slots = sorted((r for r in records if r.slot), key=lambda r: r.index)
    staged = sorted((r for r in records if r.staged), key=lambda r: r.index)
    numbered = [(r.index, r) for r in valid if r.numbered]
    # Legacy keys take 0.1's positions: in 0.1's order, the lowest numbers not held by
    # a numbered key or a tombstone. A legacy key pinned at its position keeps it, and
    # the others keep theirs, so pinning some keys (one at a time) moves nothing.
    # A key keymount numbered keeps its number while it is invalid (a settings change,
    # a manifest edited around the guard): no legacy key may slide into it.
    taken = {n for n, _ in numbered} | {r.index for r in retired if r.index_explicit} | {
        r.index for r in records if r.state == "invalid" and r.numbered}
    number = 1
    for record in sorted((r for r in valid if not r.numbered), key=legacy_order):
        while number in taken:
            number += 1
        numbered.append((number, record))
        number += 1
    numbered.sort(key=lambda pair: (pair[0], pair[1].name))
    invalid = sorted((r for r in records if r.state == "invalid"), key=lambda r: r.name)

    conflict = None
    holders: dict[int, KeyRecord] = {}
    for number, record in [*numbered, *((r.index, r) for r in (*retired, *slots, *staged)
                                        if r.index_explicit)]:
        if number in holders and conflict is None:
            conflict = (holders[number], record)
        holders.setdefault(number, record)
    # Two legacy keys that declare one index conflict, as keymount 0.1 refused them,
    # although legacy numbering would give them two files: otherwise their names would
    # decide which one encrypts new data. (A legacy key may share its declared index
    # with a keymount-numbered one: 0.1 sorted by index, and pinning its unindexed
    # predecessor at position 1 is how such a pair comes about.)
    declared: dict[int, KeyRecord] = {}
    for record in sorted((r for r in valid if r.index_explicit and not r.numbered),
                         key=lambda r: r.name):
        if record.index in declared and conflict is None:
            conflict = (declared[record.index], record)
        declared.setdefault(record.index, record)

    used = NumberSet.of(holders, (r.index for r in invalid if r.index_explicit),
                        *(record.numbers_used for record in records))
    files = tuple(KeyFile(n, r.name, r.fingerprint) for n, r in numbered)
    status = json.dumps([f.as_status() for f in files], separators=(",", ":"))
    return Keyring(namespace, tuple(r for _, r in numbered), files, tuple(invalid),
                   tuple(retired), tuple(slots), conflict, used, status, tuple(staged))
