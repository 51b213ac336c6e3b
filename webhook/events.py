"""Kubernetes Events for key decisions and refused backend Pods (docs/contract.md, "Trust").

`event_for` decides (pure) which Event a decision deserves: key created, retired or
refused, on the key Secret; a refused backend Pod, on the controller that tried to
create it (a bare Pod: its namespace), where `kubectl describe` shows it to the
person who can act. Never on a dryRun request: the webhooks declare
`sideEffects: NoneOnDryRun`. An Event names numbers, fingerprints and users, never
key material.

`EventRecorder` sends them in the background, as client-go's recorder does: one Event
object per involved object, type, reason and topic (`aggregation_key`), whose `count`
and `lastTimestamp` grow with each repeat (a PATCH of the Event keymount created)
instead of one object per refusal. Anyone who reaches the port can send a review, so
everything is bounded: the queue (a repeat of a queued Event only adds to its count;
past the bound, Events are dropped and counted), the caches (a fixed number of
entries, least recently used first out) and the API calls (a token bucket).

A refused Pod's ownerReference is a claim by whoever sent the review. The Event names
that owner only once one GET has found it with the same uid; otherwise the Event goes
to the Pod's namespace, and is dropped if the namespace does not exist either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from .admission import AdmissionRequest, Verdict
from .names import as_dict

log = logging.getLogger("keymount.events")
COMPONENT = "keymount"
MAX_MESSAGE = 1024  # the API server refuses Event messages over 1 KiB


@dataclass(frozen=True, slots=True)
class EventNote:
    namespace: str
    kind: str
    name: str
    api_version: str
    uid: str
    type: str  # Normal or Warning
    reason: str
    message: str
    # What, besides the object and reason, makes two notes one Event: a refused Pod's
    # message names the Pod, so its topic is the refusal alone; by default the message.
    topic: str = ""
    # The object comes from the review (a Pod's ownerReference), not from keymount's
    # own knowledge: name it only once the API server confirms it exists.
    claimed: bool = False
    # A fact that happens once (`occurrence`: key number 7's staging): the Event is
    # named after it, so whoever records it first (the controller, either webhook, any
    # replica) creates it and the others find it there; never counted up.
    occurrence: str = ""


_KEY_REASONS = {"created": ("Normal", "KeyCreated"), "retired": ("Normal", "KeyRetired"),
                "staged": ("Normal", "KeyStaged"), "activated": ("Normal", "KeyActivated"),
                "pinned": ("Normal", "KeyPinned"), "refused": ("Warning", "KeyChangeRefused")}


def event_for(request: AdmissionRequest, verdict: Verdict, *, webhook: str) -> EventNote | None:
    if request.dry_run:
        return None
    if verdict.key is not None:
        # Created and retired are recorded once, by the validating webhook: it runs
        # last, so its answer is the one the API server acts on.
        if verdict.key.action == "refused" or (
                webhook == "validate" and verdict.key.action in _KEY_REASONS):
            return _key_event(request, verdict)
        return None
    if request.is_pod and verdict.result == "denied":
        return _pod_event(request, verdict)
    return None


def occurrence(reason: str, number: int | None) -> str:
    """The name part of a key's one-time Event: its reason and number."""
    return "" if number is None else f"{reason.lower()}-{number}"


def _key_event(request: AdmissionRequest, verdict: Verdict) -> EventNote:
    decision = verdict.key
    assert decision is not None
    type_, reason = _KEY_REASONS[decision.action]
    obj = request.object or request.old_object or {}
    uid = str((obj.get("metadata") or {}).get("uid") or "")
    facts = [f"by {request.username or 'unknown user'}", f"operation {request.operation}"]
    if decision.number is not None:
        facts.append(f"number {decision.number}")
    if decision.fingerprint:
        facts.append(f"fingerprint {decision.fingerprint}")
    summary = {"created": "key created", "retired": "key retired", "pinned": "key number pinned",
               "staged": "key staged", "activated": "staged key activated",
               "refused": f"refused: {decision.message}"}[decision.action]
    # The controller records these two of its own writes too (controller._stepped). A
    # created key is not one-time: a restore creates the same name and number again.
    once = occurrence(reason, decision.number) if decision.action in ("staged", "activated") \
        else ""
    return EventNote(request.namespace, "Secret", request.object_name, "v1", uid, type_,
                     reason, _clip(f"{summary} ({', '.join(facts)})"), occurrence=once)


def _pod_event(request: AdmissionRequest, verdict: Verdict) -> EventNote:
    pod = request.object or {}
    meta = as_dict(pod.get("metadata"))
    owner = next((r for r in meta.get("ownerReferences") or []
                  if isinstance(r, Mapping) and r.get("controller")), None)
    message = _clip(f"backend Pod {request.object_name or '(unnamed)'} refused by keymount: "
                    f"{verdict.message}")
    if owner is not None:
        return EventNote(request.namespace, str(owner.get("kind")), str(owner.get("name")),
                         str(owner.get("apiVersion")), str(owner.get("uid") or ""), "Warning",
                         "BackendPodRefused", message, topic=verdict.message, claimed=True)
    return on_namespace(EventNote(request.namespace, "", "", "", "", "Warning",
                                  "BackendPodRefused", message, topic=verdict.message))


def on_namespace(note: EventNote) -> EventNote:
    """The same Event on the note's Namespace: a bare Pod's refusal, or one whose
    claimed owner could not be confirmed."""
    return replace(note, kind="Namespace", name=note.namespace, api_version="v1", uid="",
                   claimed=False)


AggregationKey = tuple[str, str, str, str, str, str, str, str]


def aggregation_key(note: EventNote) -> AggregationKey:
    """Notes with the same key are one Event object (client-go's EventCorrelator keys
    on the involved object, type, reason and message)."""
    return (note.namespace, note.kind, note.name, note.api_version, note.uid, note.type,
            note.reason, note.topic or note.message)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


def stamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_name(note: EventNote, nanos: int) -> str:
    """client-go's name, "<involved object>.<hex nanoseconds>": keymount names the
    Event itself, so it can PATCH it later without reading the API's answer. A one-time
    fact's Event is "<involved object>.<occurrence>" instead, the same from any
    recorder."""
    return f"{(note.name or 'keymount')[:200]}.{note.occurrence or f'{nanos:x}'}"


def build_event(note: EventNote, *, name: str, first: float, last: float, count: int,
                host: str = "") -> dict[str, Any]:
    """A core/v1 Event, as client-go's recorder writes one."""
    # The API server wants involvedObject.namespace to equal the Event's namespace;
    # for a bare Pod's refusal the Namespace is named from inside itself, so
    # `kubectl get events -n NS` shows it to the namespace's users.
    involved: dict[str, Any] = {"kind": note.kind, "name": note.name,
                                "apiVersion": note.api_version, "namespace": note.namespace}
    if note.uid:
        involved["uid"] = note.uid
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": note.namespace},
        "involvedObject": involved, "type": note.type, "reason": note.reason,
        "message": note.message, "firstTimestamp": stamp(first), "lastTimestamp": stamp(last),
        "count": count,
        "source": {"component": COMPONENT, **({"host": host} if host else {})},
        "reportingComponent": COMPONENT, "reportingInstance": host or COMPONENT,
    }


def repeat_patch(note: EventNote, *, count: int, last: float) -> dict[str, Any]:
    """The merge patch that records repeats on an Event keymount created."""
    return {"count": count, "lastTimestamp": stamp(last), "message": note.message}


class EventGone(Exception):
    """The Event to PATCH no longer exists (the API server expires Events)."""


class NamespaceGone(Exception):
    """The namespace to record an Event in does not exist."""


class EventExists(Exception):
    """An Event of that name exists: a one-time fact recorded by another recorder."""


class EventSink(Protocol):
    """The API calls the recorder makes (cluster.KubernetesEvents)."""

    async def create_event(self, event: dict[str, Any]) -> None:
        """Create the Event; NamespaceGone if its namespace does not exist, EventExists
        if an Event of its name does."""

    async def patch_event(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch an Event; EventGone if it no longer exists."""

    async def owner_uid(self, namespace: str, api_version: str, kind: str,
                        name: str) -> str | None:
        """The uid of the named object, or None if it does not exist or is of a kind
        keymount does not read."""


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Remembered(Generic[K, V]):
    """At most `size` entries, each for `ttl` seconds; the least recently used leaves
    first, so whatever a review names, memory stays bounded."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size, self.ttl = size, ttl
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now - entry[0] >= self.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V, now: float) -> None:
        self._entries[key] = (now, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class TokenBucket:
    """`rate` calls a second, `burst` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._filled = float(burst), clock()

    def wait(self) -> float:
        """Take a token: 0, or the seconds until it is there."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._filled) * self.rate)
        self._filled = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass(slots=True)
class Pending:
    note: EventNote  # the latest: its message is the one shown
    count: int
    first: float
    last: float


@dataclass(slots=True)
class Sent:
    name: str
    count: int


# client-go keeps 4096 Events in its correlator's LRU cache; so does keymount.
EVENTS_REMEMBERED = 4096
# A burst of refusals from one controller costs one GET of it; 1024 owners (or
# namespaces found missing) are remembered, each for OWNER_TTL seconds.
OWNERS_REMEMBERED = 1024
OWNER_TTL = 300.0
# A repeat within WINDOW seconds of the last one PATCHes the same Event; after that a
# new one starts (the API server expires Events after an hour by default).
WINDOW = 600.0


class EventRecorder:
    """Sends Events in the background through `sink` (the Kubernetes API)."""

    def __init__(self, sink: EventSink, *, capacity: int = 256, host: str = "",
                 on_drop: Callable[[], None] = lambda: None,
                 describe: Callable[[Exception], str] = lambda e: type(e).__name__,
                 rate: float = 10.0, burst: int = 50,
                 clock: Callable[[], float] = time.time) -> None:
        self.sink, self.host, self.on_drop, self.describe = sink, host, on_drop, describe
        self.capacity, self.clock = capacity, clock
        # Waiting notes by aggregation key, oldest first: a repeat of a waiting note
        # adds to its count and takes no room.
        self.pending: OrderedDict[AggregationKey, Pending] = OrderedDict()
        self._ready = asyncio.Event()
        self.sent: Remembered[AggregationKey, Sent] = Remembered(EVENTS_REMEMBERED, WINDOW)
        self.owners: Remembered[tuple[str, str, str, str, str], bool] = Remembered(
            OWNERS_REMEMBERED, OWNER_TTL)
        self.missing: Remembered[str, bool] = Remembered(OWNERS_REMEMBERED, OWNER_TTL)
        self.calls = TokenBucket(rate, burst, time.monotonic)
        self._last_nanos = 0

    def emit(self, note: EventNote) -> None:
        """Queue a note (on the event loop; never waits)."""
        now = self.clock()
        key = aggregation_key(note)
        waiting = self.pending.get(key)
        if waiting is not None:
            waiting.note, waiting.last = note, now
            waiting.count += 1
            return
        if len(self.pending) >= self.capacity:
            self.on_drop()
            return
        self.pending[key] = Pending(note, 1, now, now)
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            await self.send_next()

    async def flush(self) -> None:
        """Send everything waiting, in order (tests drive the recorder with it)."""
        while self.pending:
            await self.send_next()

    async def send_next(self) -> None:
        if not self.pending:
            self._ready.clear()
            return
        _, item = self.pending.popitem(last=False)
        if not self.pending:
            self._ready.clear()
        try:
            await self.record(item)
        except Exception as exc:  # an Event is best effort; the decision stands
            log.warning("could not record an Event",
                        extra={"reason": item.note.reason, "namespace": item.note.namespace,
                               "error": self.describe(exc)})

    async def record(self, item: Pending) -> None:
        note = item.note
        if self.missing.get(note.namespace, self.clock()):
            return
        if note.claimed and not await self._owner_exists(note):
            note = on_namespace(note)
        key = aggregation_key(note)
        sent = None if note.occurrence else self.sent.get(key, self.clock())
        if sent is not None:
            count = sent.count + item.count
            try:
                await self._call()
                await self.sink.patch_event(note.namespace, sent.name,
                                            repeat_patch(note, count=count, last=item.last))
                self.sent.put(key, Sent(sent.name, count), self.clock())
                return
            except EventGone:
                pass  # expired: start a new one
        name = event_name(note, self._nanos())
        await self._call()
        try:
            await self.sink.create_event(build_event(
                note, name=name, first=item.first, last=item.last, count=item.count,
                host=self.host))
        except NamespaceGone:
            self.missing.put(note.namespace, True, self.clock())
            log.info("Event dropped: its namespace does not exist",
                     extra={"reason": note.reason, "namespace": note.namespace})
            return
        except EventExists:
            if not note.occurrence:
                raise
            return  # recorded already, by whoever saw the fact first
        if not note.occurrence:
            self.sent.put(key, Sent(name, item.count), self.clock())

    async def _owner_exists(self, note: EventNote) -> bool:
        """One GET per owner (then remembered): found, and with the claimed uid."""
        key = (note.namespace, note.api_version, note.kind, note.name, note.uid)
        known = self.owners.get(key, self.clock())
        if known is not None:
            return known
        exists = False
        if note.uid:  # a controller reference always has a uid
            await self._call()
            try:
                found = await self.sink.owner_uid(note.namespace, note.api_version,
                                                  note.kind, note.name)
                exists = found == note.uid
            except Exception as exc:  # forbidden, unreachable: the namespace it is
                log.warning("could not confirm a refused Pod's owner; the Event goes to "
                            "its namespace", extra={"namespace": note.namespace,
                                                    "kind": note.kind,
                                                    "error": self.describe(exc)})
        self.owners.put(key, exists, self.clock())
        return exists

    async def _call(self) -> None:
        delay = self.calls.wait()
        if delay > 0:
            await asyncio.sleep(delay)  # rate limit, not synchronization

    def _nanos(self) -> int:
        self._last_nanos = max(self._last_nanos + 1, int(self.clock() * 1e9))
        return self._last_nanos
