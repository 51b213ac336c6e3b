"""Who may change key Secrets, and how: the number stamp and the key-Secret guard.

The newest key decides how every new record is encrypted, so writing a key Secret is
a privileged act (docs/contract.md, "Trust"). Two pure decisions live here:

- `stamp_key_secret` (`/mutate`): a key Secret created without a number gets the next
  one, and every new key records the numbers used so far, so that a number is never
  handed out twice even after its tombstone is deleted.
- `guard_key_secret` (`/validate`): invalid keys, any change of a key's bytes or
  number, removing the label, a number in use or used before, and writes by anyone
  outside `--key-writers` are refused, each with what to do instead.

Both take the namespace's `Keyring` as the server last read it; for a new key the
server reads it live first, so a number is judged against the API server's truth.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from keymount.keyrule import decode_key

from .config import Settings
from .key_secrets import is_key_secret, parse_key_secret, read_key_field
from .keys import KeyRecord, Keyring, NumberSet, format_numbers, parse_time
from .names import (
    ACTIVATED_AT_ANNOTATION,
    INDEX_ANNOTATION,
    NUMBERS_USED_ANNOTATION,
    STAGED_AT_ANNOTATION,
    as_dict,
    slot_number,
    staged_field,
)

# The namespace controller deletes every object of a namespace being deleted; refusing
# it leaves the namespace stuck in Terminating (kube-controller-manager's namespace
# deleter retries forever), so it may always delete key Secrets.
NAMESPACE_CONTROLLER = "system:serviceaccount:kube-system:namespace-controller"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


# --- who may write keys -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Requester:
    """The user of an admission request (AdmissionRequest.userInfo)."""

    username: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Subject:
    kind: Literal["user", "group", "serviceaccount"]
    name: str  # for a service account: NAMESPACE:NAME

    def matches(self, requester: Requester) -> bool:
        if self.kind == "group":
            return self.name in requester.groups
        if self.kind == "serviceaccount":
            return requester.username == SERVICE_ACCOUNT_PREFIX + self.name
        return requester.username == self.name

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class KeyWriters:
    """`--key-writers`: who may create, retire, pin or delete key Secrets.

    `subjects` None means the flag is unset: RBAC alone decides (and `serve` warns).
    keymount itself (`own_user`, for --auto-generate) and the namespace controller
    always may.
    """

    subjects: tuple[Subject, ...] | None = None
    own_user: str = ""

    @property
    def configured(self) -> bool:
        return self.subjects is not None

    def allows(self, requester: Requester) -> bool:
        if self.subjects is None:
            return True
        if requester.username in (NAMESPACE_CONTROLLER, self.own_user) and requester.username:
            return True
        return any(s.matches(requester) for s in self.subjects)

    def describe(self) -> str:
        return ", ".join(map(str, self.subjects or ())) or "nobody"


def parse_key_writers(text: str | None, *, own_user: str = "") -> KeyWriters:
    """`user:NAME,group:NAME,serviceaccount:NS:NAME`; empty or None: unset."""
    if text is None or not text.strip():
        return KeyWriters(None, own_user)
    subjects = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        kind, _, name = part.partition(":")
        if kind not in ("user", "group", "serviceaccount") or not name or \
                (kind == "serviceaccount" and len(name.split(":")) != 2):
            raise ValueError(
                f"--key-writers entry {part!r}: use user:NAME, group:NAME or "
                f"serviceaccount:NAMESPACE:NAME, comma-separated")
        subjects.append(Subject(kind, name))  # type: ignore[arg-type]
    return KeyWriters(tuple(subjects), own_user)


# --- outcomes ---------------------------------------------------------------------------

KeyAction = Literal["created", "reserved", "staged", "activated", "retired", "pinned",
                    "deleted", "updated", "refused", "none"]


@dataclass(frozen=True, slots=True)
class KeyDecision:
    """What to answer about one key Secret; the server turns it into a response."""

    allowed: bool
    action: KeyAction
    message: str = ""
    warnings: tuple[str, ...] = ()
    patch: tuple[dict[str, Any], ...] = ()
    number: int | None = None
    fingerprint: str = ""
    # A refusal that a fresher view of the namespace could turn around (a key
    # referenced but not yet cached): the server confirms it with a live read.
    key_state: bool = False
    # A refusal a retry in a moment may turn around (a stamp made on a cache that was a
    # moment behind): answered with 429, which clients retry.
    retry: bool = False
    # A refusal that stands only because which Pods list the Secret is not known: the
    # server reads the namespace's Pods live and asks again (`listed_by`).
    needs_pods: bool = False
    # Allowed on what the keyring says (which key is active, which keys share a number)
    # a change that destroys a key or its only Secret: on the cache, a moment behind
    # the API server, the server confirms it on a live read first.
    on_keyring: bool = False


def _refused(message: str, *, number: int | None = None, fingerprint: str = "",
             key_state: bool = False, retry: bool = False) -> KeyDecision:
    return KeyDecision(False, "refused", message, number=number, fingerprint=fingerprint,
                       key_state=key_state, retry=retry)


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One key-Secret admission request, as the guard needs it."""

    operation: str
    namespace: str
    name: str
    new: Mapping[str, Any] | None
    old: Mapping[str, Any] | None
    requester: Requester


def is_new_key(change: KeyChange, *, settings: Settings) -> bool:
    """A CREATE of a key Secret, an UPDATE that gives a Secret the key label, or one
    that gives key material to a labelled Secret that never held a key keymount
    numbered (an invalid one, from keymount 0.1 or written while the webhooks were
    away): it is judged and numbered as the new key it is, never by the number its
    name or creation time would suggest."""
    if change.new is None or not is_key_secret(change.new, settings=settings):
        return False
    if change.operation == "CREATE":
        return True
    if change.operation != "UPDATE":
        return False
    if change.old is None or not is_key_secret(change.old, settings=settings):
        return True
    old = parse_key_secret(change.old, settings=settings, namespace=change.namespace)
    if old.state != "invalid" or old.numbered:
        return False
    return parse_key_secret(change.new, settings=settings,
                            namespace=change.namespace).state in ("valid", "staged")


# --- /mutate: the number stamp ------------------------------------------------------------

# keymount's annotations on a key Secret that nobody changes once set; a tool that
# rewrites annotations and leaves them out gets them back from the mutating webhook.
KEPT_ANNOTATIONS = (INDEX_ANNOTATION, NUMBERS_USED_ANNOTATION, STAGED_AT_ANNOTATION,
                    ACTIVATED_AT_ANNOTATION)


def format_time(now: datetime) -> str:
    """RFC 3339 in UTC, to the second: what keymount stamps (reinvocation a moment
    later stamps the same value)."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_stamps(change: KeyChange, *, settings: Settings,
                now: datetime | None) -> dict[str, str]:
    """The time annotations this change earns: staged-at when a slot becomes a staged
    key, activated-at when a key gets its key field (a new key, a filled slot, an
    activated staged key). keymount's clock, never the request's, with one exception: a
    new key may keep an activated-at earlier than now (a restore brings the time the
    key was first activated). An earlier time only makes the key older, so rotation and
    --max-key-age act sooner, never later; a staging time stays keymount's, since the
    staging period counts from when this cluster's Pods can see the key."""
    if now is None or change.new is None:
        return {}
    after = parse_key_secret(change.new, settings=settings, namespace=change.namespace)
    new_key = is_new_key(change, settings=settings)
    before = None if new_key else parse_key_secret(change.old or {}, settings=settings,
                                                   namespace=change.namespace)
    stamps = {}
    if after.state == "staged" and (before is None or before.state != "staged"):
        stamps[STAGED_AT_ANNOTATION] = format_time(now)
    had_key = before is not None and _has_field(change.old, settings.key_field)
    if after.state == "valid" and _has_field(change.new, settings.key_field) and not had_key:
        given = parse_time(_annotations(change.new).get(ACTIVATED_AT_ANNOTATION))
        if not (new_key and given is not None and given <= now):
            stamps[ACTIVATED_AT_ANNOTATION] = format_time(now)
    return stamps


def _has_field(obj: Mapping[str, Any] | None, field: str) -> bool:
    return obj is not None and read_key_field(obj, field)[0] is not None


def stamp_key_secret(change: KeyChange, *, keyring: Keyring, settings: Settings,
                     now: datetime | None = None) -> KeyDecision:
    """Give a new key Secret its number and the namespace's used numbers, and any key
    Secret the times it was staged and activated."""
    new = change.new
    if new is None or not is_key_secret(new, settings=settings):
        return KeyDecision(True, "none")
    annotations = _annotations(new)
    stamps = time_stamps(change, settings=settings, now=now)
    if not is_new_key(change, settings=settings):
        old = parse_key_secret(change.old or {}, settings=settings, namespace=change.namespace)
        if old.numbered:
            # A tool that rewrites annotations (a GitOps sync, External Secrets) and
            # leaves keymount's out gets them back; changing them is the guard's call.
            lost = {k: v for k, v in _annotations(change.old or {}).items()
                    if k in KEPT_ANNOTATIONS and k not in annotations}
            restored = {**lost, **{k: v for k, v in stamps.items()
                                   if annotations.get(k) != v}}
            return KeyDecision(True, "none", patch=_annotation_patch(new, restored)
                               if restored else ())
        # A legacy key (made before keymount numbered keys) is pinned at the number it
        # has today on its next update, so it can never move.
        number = keyring.number_of(change.name)
        kept = parse_key_secret(new, settings=settings, namespace=change.namespace)
        if (old.numbered or old.state != "valid" or number is None or keyring.conflict
                or kept.state != "valid"
                or not same_key_bytes(change.old, new, settings=settings)):
            return KeyDecision(True, "none")  # the guard judges anything else
        if NUMBERS_USED_ANNOTATION in annotations:
            return KeyDecision(True, "none")  # a pin the request already spells out
        return KeyDecision(True, "pinned", patch=_annotation_patch(new, pin_annotations(
            keyring, number)), number=number)
    wanted: dict[str, str] = {}
    record = parse_key_secret(new, settings=settings, namespace=change.namespace)
    number = record.index if record.index_explicit else None
    if number is None and INDEX_ANNOTATION not in annotations:
        # A slot's name carries its number (running Pods list it as that file).
        number = slot_number(change.name) or keyring.next_number
        wanted[INDEX_ANNOTATION] = str(number)
    wanted.update(stamps)
    if number is not None:
        # Union with what the Secret already records (a restored key brings the numbers
        # its namespace had used, some of them on no Secret any more): more reserved
        # numbers are harmless, a forgotten one could be handed out again.
        wanted[NUMBERS_USED_ANNOTATION] = format_numbers(
            NumberSet.of(keyring.used, number, record.numbers_used))
    if not wanted or all(annotations.get(k) == v for k, v in wanted.items()):
        return KeyDecision(True, "none", number=number)
    return KeyDecision(True, "created", patch=_annotation_patch(new, wanted), number=number)


def pin_annotations(keyring: Keyring, number: int) -> dict[str, str]:
    """What numbers a legacy key for good: its index, and the record that makes it
    keymount's (every number used in the namespace today)."""
    return {INDEX_ANNOTATION: str(number),
            NUMBERS_USED_ANNOTATION: format_numbers(keyring.used | number)}


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    meta = obj.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    return annotations if isinstance(annotations, Mapping) else {}


def _annotation_patch(obj: Mapping[str, Any], values: Mapping[str, str]
                      ) -> tuple[dict[str, Any], ...]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ({"op": "add", "path": "/metadata", "value": {"annotations": dict(values)}},)
    if not isinstance(meta.get("annotations"), Mapping):
        return ({"op": "add", "path": "/metadata/annotations", "value": dict(values)},)
    return tuple({"op": "add", "path": "/metadata/annotations/" + _escape(k), "value": v}
                 for k, v in values.items())


def _escape(key: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


# --- /validate: the guard -----------------------------------------------------------------

def guard_key_secret(change: KeyChange, *, keyring: Keyring, settings: Settings,
                     writers: KeyWriters, listed_by: tuple[str, ...] | None = None
                     ) -> KeyDecision:
    """Refuse what would lose a key, change one, or let a non-writer pick the key.
    `listed_by`: for a DELETE, the Pods not yet finished whose volumes name the Secret,
    as the server read them live (None: not read; a deletion that depends on it is
    refused with `needs_pods`, and the server reads them and asks again)."""
    old_is_key = change.old is not None and is_key_secret(change.old, settings=settings)
    new_is_key = change.new is not None and is_key_secret(change.new, settings=settings)
    if change.operation == "DELETE":
        if change.old is None:
            # Before 1.15 DELETE carried no oldObject; without it nothing can be checked,
            # and the webhook fails closed.
            return _refused(f"cannot tell whether Secret {change.name!r} holds a key: the "
                            f"DELETE request carries no oldObject")
        return _guard_delete(change, keyring=keyring, settings=settings, writers=writers,
                             listed_by=listed_by) if old_is_key else KeyDecision(True, "none")
    if change.operation not in ("CREATE", "UPDATE") or change.new is None:
        return KeyDecision(True, "none")
    if old_is_key and not new_is_key and change.operation == "UPDATE":
        before = _record(change.old, change, settings=settings)
        if before.state == "slot":
            return _refused(_slot_kept(change, before, "removing its key label"))
        if before.state == "invalid" and before.numbered:
            # Unlabelled, its DELETE never reaches keymount: the same refusal as a delete.
            return _refused(
                f"key Secret {change.name!r} in namespace {change.namespace!r} has number "
                f"{before.index} and is invalid now ({before.check.reason}), but it was a "
                f"key: removing its key label would take it out of keymount's sight (and "
                f"let it be deleted). Retire it instead (it keeps its number reserved): "
                f"keymount keys retire {change.name} -n {change.namespace}",
                number=before.index)
        if before.state == "invalid":
            if not writers.allows(change.requester):
                return _writer_refusal(change, writers, "remove the key label from")
            # Unlabelled, its DELETE (or a change of its bytes) never reaches keymount:
            # while Pods list it, the same refusal as a delete.
            return _retire_while_listed(change.name, change.namespace, before,
                                        listed_by) or KeyDecision(True, "updated")
        return _refused(
            f"this update removes the key label from key Secret {change.name!r} in namespace "
            f"{change.namespace!r} (number {_number(before, keyring)}); keymount would stop "
            f"mounting it and data encrypted with it would become undecryptable. Keys are "
            f"retired, not unlabelled: keymount keys retire {change.name} -n "
            f"{change.namespace}", fingerprint=before.fingerprint)
    if not new_is_key:
        # The shipped webhooks send only key Secrets (objectSelector on the key label),
        # so this is reached only through a registration that sends every Secret, as
        # keymount 0.2's did: then it still keeps unlabelled Secrets off slot names.
        reserved = slot_number(change.name)
        if reserved is not None:
            return _refused(
                f"Secret name {change.name!r} is reserved for encryption key number "
                f"{reserved}: running backend Pods in namespace {change.namespace!r} list "
                f"it and would mount it as file encryption-key-{reserved}. Pick another "
                f"name, or add a key with keymount keys rotate -n {change.namespace}")
        return KeyDecision(True, "none")
    if is_new_key(change, settings=settings):
        return _guard_create(change, keyring=keyring, settings=settings, writers=writers)
    return _guard_update(change, keyring=keyring, settings=settings, writers=writers)


def _record(obj: Mapping[str, Any] | None, change: KeyChange, *,
            settings: Settings) -> KeyRecord:
    return parse_key_secret(obj or {}, settings=settings, namespace=change.namespace)


def _number(record: KeyRecord, keyring: Keyring) -> str:
    if record.index_explicit:
        return str(record.index)
    number = keyring.number_of(record.name)
    return str(number) if number is not None else "none"


# Key numbers have at most nine digits (keys.parse_key_index); a new key may jump ahead
# (an explicit number, a record of numbers used) up to here, leaving a million.
HIGHEST_NEW_NUMBER = 999_999_999 - 1_000_000


def _lifetime_change(change: KeyChange) -> str:
    """What an update changes of how long the key Secret lives, or "": made immutable
    (no key writer could retire it then: retiring removes the key material, and an
    immutable Secret's data never changes), or given owners (the garbage collector
    would try to delete it with them) or finalizers (its deletion would hang)."""
    old, new = change.old or {}, change.new or {}
    if new.get("immutable") is True and old.get("immutable") is not True:
        return "immutable"
    old_meta, new_meta = as_dict(old.get("metadata")), as_dict(new.get("metadata"))
    for field in ("ownerReferences", "finalizers"):
        if (old_meta.get(field) or None) != (new_meta.get(field) or None):
            return field
    return ""


def _immutable_refusal(change: KeyChange) -> KeyDecision:
    return _refused(
        f"key Secret {change.name!r} in namespace {change.namespace!r} cannot be "
        f"immutable: retiring a key removes its key material, which an immutable Secret "
        f"never allows, so a key that leaked could never be retired. Leave out "
        f"`immutable` (keymount's webhook already keeps every key from changing)")


def _writer_refusal(change: KeyChange, writers: KeyWriters, verb: str) -> KeyDecision:
    return _refused(
        f"user {change.requester.username!r} may not {verb} key Secret {change.name!r} in "
        f"namespace {change.namespace!r}: only keymount's key writers may ({writers.describe()};"
        f" keymount serve --key-writers). The key that encrypts new data is chosen by "
        f"them alone; ask one of them to run the keymount command")


def _writer_only(change: KeyChange, writers: KeyWriters, action: KeyAction,
                 verb: str) -> KeyDecision:
    if not writers.allows(change.requester):
        return _writer_refusal(change, writers, verb)
    return KeyDecision(True, action)


def _guard_delete(change: KeyChange, *, keyring: Keyring, settings: Settings,
                  writers: KeyWriters, listed_by: tuple[str, ...] | None) -> KeyDecision:
    if change.requester.username == NAMESPACE_CONTROLLER:
        return KeyDecision(True, "deleted")
    old = _record(change.old, change, settings=settings)
    ns, name = change.namespace, change.name
    if not writers.allows(change.requester):
        return _writer_refusal(change, writers, "delete")
    if slot_number(name) is not None:
        # Pods list slot names as optional sources (and a filled slot is a key): once
        # deleted, the name is anyone's to create, and the kubelet mounts what they put
        # there. A tombstone costs nothing; it stays (docs/contract.md, key slots).
        return _refused(_slot_kept(change, old, "deleting it"))
    if old.state == "valid" and keyring.conflict and name in (r.name for r in keyring.conflict):
        # Two keys share this number: Pods are refused until one goes, and only the
        # user knows which one their data was encrypted with (keys.describe_conflict).
        # Pods admitted before the second one came list this one: its name stays while
        # they run (retiring it also resolves the conflict, and keeps the name).
        listing = _retire_while_listed(name, ns, old, listed_by)
        if listing:
            return listing
        return KeyDecision(True, "deleted", number=old.index if old.index_explicit else None,
                           fingerprint=old.fingerprint, on_keyring=True)
    if old.state == "valid":
        return _refused(
            f"Secret {name!r} in namespace {ns!r} holds encryption key number "
            f"{_number(old, keyring)} (fingerprint {old.fingerprint}), which old data may "
            f"still need; deleting it makes that data undecryptable. Retire it first (it "
            f"keeps its number reserved): keymount keys retire {name} -n {ns}",
            fingerprint=old.fingerprint)
    if old.state == "invalid" and old.numbered:
        # keymount numbered it, so it was a key: a setting (--key-encoding, --key-field)
        # may be all that makes it invalid now, with its bytes intact and Pods holding it.
        return _refused(
            f"key Secret {name!r} in namespace {ns!r} has number {old.index} and is "
            f"invalid now ({old.check.reason}), but it was a key: its bytes may be what old "
            f"data needs, and running Pods may list its name. Retire it first (it keeps "
            f"its number reserved): keymount keys retire {name} -n {ns}",
            number=old.index)
    if old.state == "invalid":
        listing = _retire_while_listed(name, ns, old, listed_by)
        if listing:
            return listing
    if old.state == "retired" and old.index_explicit and not any(
            old.index in r.numbers_used for r in (*keyring.keys, *keyring.retired,
                                                  *keyring.invalid) if r.name != name):
        return _refused(
            f"retired key Secret {name!r} in namespace {ns!r} is the only record that number "
            f"{old.index} was used; deleting it would let the number be given to another key. "
            f"Keep it (it holds no key material), or add a key first (it records every number "
            f"used): keymount keys rotate -n {ns}", number=old.index)
    if old.state == "retired":
        listing = _still_listed(name, ns, old, listed_by,
                                instead=f"Restart their workloads (kubectl rollout "
                                        f"restart deployment/NAME -n {ns}), then delete it")
        if listing:
            return listing
    return KeyDecision(True, "deleted", number=old.index if old.index_explicit else None)


def _retire_while_listed(name: str, ns: str, old: KeyRecord,
                         listed_by: tuple[str, ...] | None) -> KeyDecision | None:
    """`_still_listed` for a key Secret that retiring keeps: it keeps the name."""
    return _still_listed(name, ns, old, listed_by,
                         instead=f"Retire it instead (it keeps the name): keymount keys "
                                 f"retire {name} -n {ns}")


def _still_listed(name: str, ns: str, old: KeyRecord, listed_by: tuple[str, ...] | None,
                  *, instead: str) -> KeyDecision | None:
    """The refusal while Pods list the name of a key Secret being deleted; None when
    none does. Pods list a key's Secret as a source that is not optional (a tombstone's,
    when they were admitted before a forced retirement): once it is deleted the name is
    anyone's to create, and the kubelet mounts what they put there at that Pod's file of
    the number (the slots' reason, docs/contract.md). `listed_by` None: not known yet,
    and the server reads the Pods live (needs_pods)."""
    number = old.index if old.index_explicit else None
    at = f" as file encryption-key-{old.index}" if old.index_explicit else ""
    why = (f"once it is deleted, anyone who may create Secrets in namespace {ns!r} could "
           f"create {name!r}, and the kubelet would mount what they put there{at}")
    if listed_by is None:
        return KeyDecision(
            False, "refused",
            f"keymount could not read which Pods list key Secret {name!r} (it reads them "
            f"live, a few a second: retry in a few seconds); while a running Pod does, "
            f"{why}", number=number, needs_pods=True)
    if not listed_by:
        return None
    shown = ", ".join(listed_by[:5]) + (", ..." if len(listed_by) > 5 else "")
    return _refused(f"key Secret {name!r} stays: {len(listed_by)} Pod(s) still list it "
                    f"({shown}), and {why}. {instead}", number=number)


def _guard_create(change: KeyChange, *, keyring: Keyring, settings: Settings,
                  writers: KeyWriters) -> KeyDecision:
    ns, name = change.namespace, change.name
    if not writers.allows(change.requester):
        return _writer_refusal(change, writers, "create")
    if (change.new or {}).get("immutable") is True:
        return _immutable_refusal(change)
    record = _record(change.new, change, settings=settings)
    if record.state == "invalid":
        return _refused(
            f"key Secret {name!r} in namespace {ns!r} is invalid: {record.check.reason}. "
            f"Check key material with `keymount keys check FILE`, or generate one with "
            f"`keymount keys create {name} -n {ns} --generate`")
    if not record.index_explicit:
        return _refused(
            f"key Secret {name!r} in namespace {ns!r} has no {INDEX_ANNOTATION}: keymount's "
            f"mutating webhook stamps it, so it did not run for this request. Check that the "
            f"MutatingWebhookConfiguration keymount has its key-Secret rule "
            f"(kubectl get mutatingwebhookconfiguration keymount -o yaml)")
    number = record.index
    highest = max(number, record.numbers_used.highest)
    if highest > keyring.next_number and highest > HIGHEST_NEW_NUMBER:
        # Numbers are nine digits: a jump to near the top would leave the namespace no
        # number for its next keys (every later key and slot refused). Counting up one
        # by one is never refused.
        return _refused(
            f"key Secret {name!r} in namespace {ns!r} records number {highest}: keymount "
            f"gives a new key a number up to {HIGHEST_NEW_NUMBER}, so that keys after it "
            f"still get one (numbers have at most nine digits). Give it a lower "
            f"{INDEX_ANNOTATION} and {NUMBERS_USED_ANNOTATION}, or omit both",
            number=number, fingerprint=record.fingerprint)
    reserved = slot_number(name)
    if reserved is not None and reserved != number:
        return _refused(
            f"key Secret name {name!r} is reserved for key number {reserved} (running Pods "
            f"list it as file encryption-key-{reserved}), but it has number {number}. Name "
            f"it otherwise, or omit {INDEX_ANNOTATION}", number=number,
            fingerprint=record.fingerprint)
    holder = keyring.holder_of(number)
    next_hint = (f"omit {INDEX_ANNOTATION} and keymount assigns the next number "
                 f"({keyring.next_number}), or run keymount keys rotate -n {ns}")
    if holder is not None and holder.name != name:
        return _refused(
            f"number {number} is already held by key Secret {holder.name!r} in namespace "
            f"{ns!r} ({holder.state}); a number belongs to one key for good. {next_hint}",
            number=number, fingerprint=record.fingerprint)
    if holder is None and number in keyring.used and not record.retired:
        return _refused(
            f"number {number} was used before in namespace {ns!r} by a key since retired; "
            f"data encrypted under that number would be read with this key. {next_hint}",
            number=number, fingerprint=record.fingerprint)
    recorded = record.numbers_used
    # What the record must hold to prove keymount's stamp ran. A slot's number is its
    # name's, and a slot is judged on the cache, not a live read: the stamping replica
    # (or worker) may have seen less of the namespace than this one, and a record that
    # knows less only keeps tombstones longer. Any other new key was stamped from a
    # live read, so its record covers everything this process knows.
    required = NumberSet.of(number) if record.slot else NumberSet.of(number, keyring.used)
    if not required <= recorded:
        if number in recorded:
            # The stamp ran, on a key cache a moment behind the live read here (a key
            # made through another request just before): stamped again on a retry.
            return _refused(
                f"key Secret {name!r} does not record the numbers used in namespace "
                f"{ns!r} ({NUMBERS_USED_ANNOTATION}): keymount stamped it on a view of the "
                f"namespace a moment behind (a key was made just before it); retry in a "
                f"few seconds", number=number, retry=True)
        return _refused(
            f"key Secret {name!r} does not record the numbers used in namespace {ns!r} "
            f"({NUMBERS_USED_ANNOTATION}); keymount's mutating webhook stamps it, so it did "
            f"not run for this request or another webhook changed it afterwards",
            number=number)
    warnings = []
    if record.check.warning:
        warnings.append(f"key Secret {name!r}: {record.check.warning}")
    newest = keyring.newest
    if not record.retired and newest is not None and number < (keyring.number_of(newest.name)
                                                                or 0):
        warnings.append(
            f"key Secret {name!r} has number {number}, below the active key "
            f"{newest.name!r} ({keyring.number_of(newest.name)}): applications decrypt with "
            f"it but do not encrypt with it")
    if record.state == "staged":
        refusal = _staging_refusal(change, record, keyring=keyring)
        if refusal is not None:
            return refusal
    action: KeyAction = ("retired" if record.retired else "reserved" if record.slot
                         else "staged" if record.staged else "created")
    return KeyDecision(True, action, warnings=tuple(warnings), number=number,
                       fingerprint=record.fingerprint)


def _guard_update(change: KeyChange, *, keyring: Keyring, settings: Settings,
                  writers: KeyWriters) -> KeyDecision:
    ns, name = change.namespace, change.name
    before = _record(change.old, change, settings=settings)
    after = _record(change.new, change, settings=settings)
    number = _number(before, keyring)
    lifetime = _lifetime_change(change)
    if lifetime == "immutable":
        return _immutable_refusal(change)
    if lifetime and not writers.allows(change.requester):
        return _writer_refusal(change, writers, f"change the {lifetime} of")
    # Before the pin: a pin sets no time either (keys pin writes the number alone).
    changed_time = _changed_time_stamp(change, before, after, settings=settings)
    if changed_time:
        return _refused(
            f"annotation {changed_time} of key Secret {name!r} in namespace {ns!r} is "
            f"stamped by keymount's mutating webhook when the key is staged or activated; "
            f"nobody sets, changes or removes it. Leave it out of your manifest or patch "
            f"(keymount keeps it); `keymount keys list -n {ns}` shows the key",
            fingerprint=before.fingerprint)
    if before.state == "valid" and not before.numbered and after.numbered:
        return _guard_pin(change, before, after, keyring=keyring, writers=writers,
                          settings=settings)
    if before.index_explicit and (not after.index_explicit or after.index != before.index):
        return _refused(
            f"key Secret {name!r} in namespace {ns!r} has number {before.index} for good: "
            f"applications may have recorded it with the data it encrypted, and changing it "
            f"would hand them another key. Add a new key instead: keymount keys rotate -n {ns}",
            number=before.index, fingerprint=before.fingerprint)
    old_ann, new_ann = _annotations(change.old or {}), _annotations(change.new or {})
    if old_ann.get(NUMBERS_USED_ANNOTATION) != new_ann.get(NUMBERS_USED_ANNOTATION):
        return _refused(f"annotation {NUMBERS_USED_ANNOTATION} of key Secret {name!r} is "
                        f"keymount's record of the numbers used in namespace {ns!r}; it "
                        f"cannot change", fingerprint=before.fingerprint)
    if before.state == "slot":
        return _guard_fill(change, before, after, keyring=keyring, writers=writers)
    if before.state == "staged":
        return _guard_staged(change, before, after, keyring=keyring, writers=writers,
                             settings=settings)
    if before.state == "retired":
        if after.state != "retired":
            return _refused(
                f"key Secret {name!r} in namespace {ns!r} is retired: its key material is "
                f"gone and its number {number} stays reserved. A retired key cannot be "
                f"brought back; add a new key: keymount keys rotate -n {ns}",
                fingerprint=after.fingerprint)
        return KeyDecision(True, "none")
    if before.state == "valid" and after.state == "retired":
        return _guard_retire(change, before, keyring=keyring, writers=writers)
    if (before.state == "valid" and after.state != "retired"
            and _staged_bytes(change.old, settings) != _staged_bytes(change.new, settings)):
        return _refused(
            f"this update changes field {staged_field(settings.key_field)!r} of key Secret "
            f"{name!r} in namespace {ns!r} (number {number}): running Pods that received "
            f"the key while it was staged read it from there until their next sync, so it "
            f"stays as it was. Leave the field as it is; a new key is added with keymount "
            f"keys rotate -n {ns}", fingerprint=before.fingerprint)
    if before.state == "valid" and not same_key_bytes(change.old, change.new,
                                                      settings=settings):
        return _refused(
            f"this update replaces the key material of key Secret {name!r} in namespace "
            f"{ns!r} (number {number}, fingerprint {before.fingerprint}); data encrypted with "
            f"that key would become undecryptable. Keys never change in place; add a new "
            f"key instead: keymount keys rotate -n {ns}", fingerprint=before.fingerprint)
    if before.state == "valid" and after.state == "invalid":
        # Same bytes, but annotations that make it no key (keymount.io/retired with the
        # material kept, a bad index on a legacy key): new Pods would lose it (or all be
        # refused), and an invalid Secret may be deleted, freeing its name.
        return _refused(
            f"this update would make key Secret {name!r} in namespace {ns!r} (number "
            f"{number}) invalid: {after.check.reason}. A key stays a key until it is "
            f"retired, which removes its key material: keymount keys retire {name} -n {ns}",
            fingerprint=before.fingerprint)
    if before.state == "invalid" and _data_changed(change):
        # A key made invalid by a setting keeps its bytes, and running Pods that list it
        # receive whatever its data becomes (applications' readers take either encoding).
        if not writers.allows(change.requester):
            return _writer_refusal(change, writers, "change the data of")
        if after.state != "retired" and not _keeps_readable_key(change, settings=settings):
            # Data may be encrypted under this number with the key readers take from it:
            # a key writer re-encodes that key (a repair), never puts another in its
            # place; retiring it (its material destroyed on purpose) stays allowed.
            return _refused(
                f"this update replaces the key that key Secret {name!r} in namespace "
                f"{ns!r} (number {number}) holds: it is invalid under this keymount's "
                f"settings ({before.check.reason}), but applications' readers take it, so "
                f"data may be encrypted with it. Keep that key (re-encoding it is allowed) "
                f"or add a new key instead: keymount keys rotate -n {ns}",
                fingerprint=before.fingerprint)
    if before.state == "invalid" and after.state != "invalid":
        # A numbered key made invalid by a settings change (is_new_key takes the rest).
        if not writers.allows(change.requester):
            return _writer_refusal(change, writers, "repair")
        if after.state == "staged":
            refusal = _staging_refusal(change, after, keyring=keyring)
            if refusal is not None:
                return refusal
        return KeyDecision(True, "updated")
    if not before.index_explicit and after.index_explicit:
        return _refused(
            f"key Secret {name!r} in namespace {ns!r} has number {number} today; it is "
            f"numbered for good together with {NUMBERS_USED_ANNOTATION}: keymount keys pin "
            f"-n {ns}", fingerprint=before.fingerprint)
    return KeyDecision(True, "none", fingerprint=before.fingerprint)


def _data_changed(change: KeyChange) -> bool:
    """Whether an update changes any data field of the Secret (stored bytes, whole)."""
    old, new = change.old or {}, change.new or {}
    return (as_dict(old.get("data")) != as_dict(new.get("data"))
            or bool(new.get("stringData")))


def _slot_kept(change: KeyChange, slot: KeyRecord, act: str) -> str:
    number = slot_number(slot.name)
    how = ("retire it (it keeps its name and number, and costs nothing): keymount keys "
           f"retire {slot.name} -n {change.namespace}" if slot.state in ("slot", "valid",
                                                                         "staged")
           else "the tombstone stays")
    return (f"{slot.name!r} in namespace {change.namespace!r} is the slot of key number "
            f"{number}: running backend Pods may list it, and {act} would let anyone who "
            f"may create Secrets give them a key of their own under that name. A slot is "
            f"filled or retired, never removed; {how}")


def same_key_bytes(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, *,
                   settings: Settings) -> bool:
    """Whether a key Secret's key field holds the same stored bytes before and after,
    compared whole. Never by fingerprint: that is a 3-byte key check value for people to
    compare, and a key with a given one is found in seconds."""
    before = None if old is None else read_key_field(old, settings.key_field)[0]
    after = None if new is None else read_key_field(new, settings.key_field)[0]
    return before is not None and after is not None and hmac.compare_digest(before, after)


def _keeps_readable_key(change: KeyChange, *, settings: Settings) -> bool:
    """Whether an update keeps the key that applications' readers take from the key
    field (either encoding: keymount.keyrule, as keymount.reader reads it), when the old
    field holds one. Compared whole, never kept."""
    held = decode_key(read_key_field(change.old or {}, settings.key_field)[0],
                      subject="the old key field")
    if not held.valid:
        return True  # no reader ever took a key from it
    kept = decode_key(read_key_field(change.new or {}, settings.key_field)[0],
                      subject="the new key field")
    return kept.valid and hmac.compare_digest(kept.key, held.key)


def _staged_bytes(obj: Mapping[str, Any] | None, settings: Settings) -> bytes | None:
    """The stored bytes of a Secret's staged field (compared here, never kept)."""
    return None if obj is None else read_key_field(obj, staged_field(settings.key_field))[0]


def _changed_time_stamp(change: KeyChange, before: KeyRecord, after: KeyRecord, *,
                        settings: Settings) -> str:
    """The time annotation this update sets, changes or removes on a change that
    keymount does not stamp it on (time_stamps), or ""."""
    old_ann, new_ann = _annotations(change.old or {}), _annotations(change.new or {})
    for name in (STAGED_AT_ANNOTATION, ACTIVATED_AT_ANNOTATION):
        old, new = old_ann.get(name), new_ann.get(name)
        if old == new:
            continue
        if _stamped_now(name, change, before, after, settings=settings):
            continue  # keymount's webhook stamps it on this change, whatever was there
        return name
    return ""


def _stamped_now(name: str, change: KeyChange, before: KeyRecord, after: KeyRecord, *,
                 settings: Settings) -> bool:
    """Whether this update is one keymount stamps `name` on, with a well-formed time."""
    if parse_time(_annotations(change.new or {}).get(name)) is None:
        return False
    if name == STAGED_AT_ANNOTATION:
        return before.state == "slot" and after.state == "staged"
    return (after.state == "valid" and not _has_field(change.old, settings.key_field)
            and _has_field(change.new, settings.key_field))


def _staging_refusal(change: KeyChange, staged: KeyRecord, *,
                     keyring: Keyring) -> KeyDecision | None:
    """At most one staged key per namespace, above the active key, of a number nobody
    else holds."""
    ns, name, number = change.namespace, change.name, staged.index
    other = next((r for r in keyring.staged_keys if r.name != name), None)
    if other is not None:
        return _refused(
            f"namespace {ns!r} already has a staged key, {other.name!r} (number "
            f"{other.index}); at most one key is staged at a time, so that applications "
            f"encrypt with the keys in the order they reached every Pod. Activate it "
            f"(keymount keys activate -n {ns}) or cancel it (keymount keys retire "
            f"{other.name} -n {ns}) first", number=number, fingerprint=staged.fingerprint)
    holder = keyring.holder_of(number)
    if holder is not None and holder.name != name:
        return _refused(
            f"number {number} of slot {name!r} in namespace {ns!r} is already held by key "
            f"Secret {holder.name!r} (made under another name meanwhile); two keys never "
            f"share a number. Retire the slot and stage into the next one: keymount keys "
            f"retire {name} -n {ns}, then keymount keys rotate -n {ns} --stage",
            number=number)
    if number < keyring.active_number:
        return _refused(
            f"slot {name!r} (number {number}) in namespace {ns!r} is below the active key "
            f"(number {keyring.active_number}): once activated it would not be the key "
            f"applications encrypt with. Stage into the next free slot: keymount keys "
            f"rotate -n {ns} --stage", number=number, fingerprint=staged.fingerprint)
    if STAGED_AT_ANNOTATION not in _annotations(change.new or {}):
        return _refused(
            f"staged key {name!r} in namespace {ns!r} has no {STAGED_AT_ANNOTATION}: "
            f"keymount's mutating webhook stamps it, so it did not run for this request. "
            f"Check that the MutatingWebhookConfiguration keymount has its key-Secret rule "
            f"(kubectl get mutatingwebhookconfiguration keymount -o yaml)", number=number)
    return None


def _guard_staged(change: KeyChange, before: KeyRecord, after: KeyRecord, *,
                  keyring: Keyring, writers: KeyWriters, settings: Settings) -> KeyDecision:
    """An UPDATE of a staged key: activation (the key field gets the staged bytes, the
    only change ever allowed to a key's material), cancelling (retiring), or metadata.
    The staged bytes themselves never change: running Pods may hold them already."""
    ns, name, number = change.namespace, change.name, before.index
    if not writers.allows(change.requester):
        return _writer_refusal(change, writers, "activate, cancel or change")
    if after.state == "retired":
        return KeyDecision(True, "retired", number=number, fingerprint=before.fingerprint)
    staged_name = staged_field(settings.key_field)
    if _staged_bytes(change.old, settings) != _staged_bytes(change.new, settings):
        return _refused(
            f"this update changes or removes field {staged_name!r} of staged key {name!r} "
            f"in namespace {ns!r} (number {number}, fingerprint {before.fingerprint}): "
            f"running Pods may hold those bytes already, and data may be encrypted with "
            f"them once the key is activated. Activate it (keymount keys activate -n {ns}) "
            f"or cancel it (keymount keys retire {name} -n {ns}); a different key is staged "
            f"after that with keymount keys rotate -n {ns} --stage",
            number=number, fingerprint=before.fingerprint)
    if after.state == "staged":
        return KeyDecision(True, "none", number=number, fingerprint=before.fingerprint)
    if after.state != "valid":
        # The key field holds other bytes than the staged field (or is malformed).
        return _refused(
            f"activating staged key {name!r} in namespace {ns!r} (number {number}) must "
            f"copy its field {staged_name!r} unchanged into field {settings.key_field!r}: "
            f"{after.check.reason}. Activate it with keymount keys activate -n {ns}",
            number=number, fingerprint=before.fingerprint)
    holder = keyring.holder_of(number)
    if holder is not None and holder.name != name:
        return _refused(
            f"number {number} of staged key {name!r} in namespace {ns!r} is already held "
            f"by key Secret {holder.name!r}; two keys never share a number. Cancel this "
            f"one and stage the next: keymount keys retire {name} -n {ns}, then keymount "
            f"keys rotate -n {ns} --stage", number=number, fingerprint=before.fingerprint)
    warnings = _below_active(f"key {name!r}", number, keyring)
    return KeyDecision(True, "activated", warnings=tuple(warnings), number=number,
                       fingerprint=after.fingerprint)


def _below_active(what: str, number: int, keyring: Keyring) -> list[str]:
    """The warning for a key that becomes a file below the active one."""
    if number >= keyring.active_number:
        return []
    return [f"{what} (number {number}) is below the active key (number "
            f"{keyring.active_number}): applications decrypt with it but do not encrypt "
            f"with it"]


def _guard_fill(change: KeyChange, before: KeyRecord, after: KeyRecord, *, keyring: Keyring,
                writers: KeyWriters) -> KeyDecision:
    """An UPDATE of an empty slot: filling it is how a key is made (one write per
    resourceVersion, so two writers racing for one number end with one key and a
    conflict), staging it how a key is first delivered, retiring it closes it;
    anything else only touches its metadata."""
    ns, name, number = change.namespace, change.name, before.index
    if not writers.allows(change.requester):
        # Also metadata: a non-writer could otherwise make the slot `immutable` (never
        # fillable) or keep changing its resourceVersion under the writers' fills.
        return _writer_refusal(change, writers, "fill, stage, retire or change")
    if after.state == "slot":
        return KeyDecision(True, "none", number=number)
    if after.state == "retired":
        return KeyDecision(True, "retired", number=number)
    if after.state == "staged":
        refusal = _staging_refusal(change, after, keyring=keyring)
        return refusal or KeyDecision(True, "staged", number=number,
                                      fingerprint=after.fingerprint)
    if after.state == "invalid":
        return _refused(
            f"key material for slot {name!r} in namespace {ns!r} is invalid: "
            f"{after.check.reason}. Check it with `keymount keys check FILE`, or let "
            f"keymount make one: keymount keys rotate -n {ns} --generate", number=number)
    holder = keyring.holder_of(number)
    if holder is not None and holder.name != name:
        return _refused(
            f"number {number} of slot {name!r} in namespace {ns!r} is already held by key "
            f"Secret {holder.name!r} (made under another name meanwhile); two keys never "
            f"share a number. Retire the slot and fill the next one: keymount keys retire "
            f"{name} -n {ns}, then keymount keys rotate -n {ns}", number=number)
    warnings = [f"key Secret {name!r}: {after.check.warning}"] if after.check.warning else []
    warnings += _below_active(f"slot {name!r}", number, keyring)
    return KeyDecision(True, "created", warnings=tuple(warnings), number=number,
                       fingerprint=after.fingerprint)


def _guard_pin(change: KeyChange, before: KeyRecord, after: KeyRecord, *, keyring: Keyring,
               writers: KeyWriters, settings: Settings) -> KeyDecision:
    """A legacy key becomes keymount-numbered: only at the number it has today."""
    ns, name = change.namespace, change.name
    current = keyring.number_of(name)
    if current is None or after.index != current:
        return _refused(
            f"key Secret {name!r} in namespace {ns!r} has number {current} today; pinning it "
            f"at {after.index} would move its file. Pin every key at its current number: "
            f"keymount keys pin -n {ns}", fingerprint=before.fingerprint)
    if not same_key_bytes(change.old, change.new, settings=settings):
        return _refused(f"pinning key Secret {name!r} cannot change its key material",
                        fingerprint=before.fingerprint)
    if after.state != "valid":
        return _refused(
            f"this update would pin key Secret {name!r} in namespace {ns!r} (number "
            f"{current}) and make it invalid: {after.check.reason}. A key stays a key until "
            f"it is retired, which removes its key material: keymount keys retire {name} "
            f"-n {ns}", fingerprint=before.fingerprint)
    if not writers.allows(change.requester):
        return _writer_refusal(change, writers, "pin")
    return KeyDecision(True, "pinned", number=current, fingerprint=before.fingerprint)


def _guard_retire(change: KeyChange, before: KeyRecord, *, keyring: Keyring,
                  writers: KeyWriters) -> KeyDecision:
    ns, name = change.namespace, change.name
    if not writers.allows(change.requester):
        return _writer_refusal(change, writers, "retire")
    if keyring.legacy:
        return _refused(
            f"namespace {ns!r} still has keys made before keymount numbered keys "
            f"({', '.join(r.name for r in keyring.legacy)}); retiring any key could "
            f"renumber them. Pin them first (it moves no file): keymount keys pin -n {ns}",
            fingerprint=before.fingerprint, key_state=True)
    newest = keyring.newest
    if newest is not None and newest.name == name:
        return _refused(
            f"key Secret {name!r} in namespace {ns!r} is the active key (number "
            f"{before.index}): applications encrypt new data with it. Add a new key first, "
            f"then retire this one: keymount keys rotate -n {ns}",
            number=before.index, fingerprint=before.fingerprint, key_state=True)
    # Both refusals above are on the keyring, which a cache a moment behind may state
    # wrongly (a key just added, pins just written): key_state, a live read decides.
    return KeyDecision(True, "retired", number=before.index, fingerprint=before.fingerprint,
                       on_keyring=True)
