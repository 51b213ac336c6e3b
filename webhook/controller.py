"""The controller's loop: which namespace is due when, and one step at a time.

`rotation.next_step` decides; this module only runs it. Every write is one API call
made with the resourceVersion just read (a slot is filled, staged or activated only if
it is still as read; a slot is reserved by a CREATE the API server takes once), and
before every step the namespace is read again live: nothing in memory decides a write,
so a controller killed between two steps, or a new leader, carries on from what the
API server holds (docs/contract.md, "Managed rotation").

Between due times it uses no CPU: namespaces wait in a heap ordered by when they are
next due, and the loop sleeps until the earliest or until a change (a key Secret or a
policy) pokes a namespace. Writes go through one token bucket (`WriteBudget`), so a
wave of namespaces due in the same minute is spread out instead of landing on the API
server at once (docs/operations.md, "The controller").
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol

from .events import EventNote, EventRecorder, occurrence
from .key_secrets import SlotOutcome
from .keys import KeyRecord, Keyring
from .metrics import Metrics
from .names import KEYPOLICY_KIND, POLICY_API_VERSION, as_dict, slot_secret_name
from .policy import EffectivePolicy
from .policystore import PolicyStore, Stored
from .rotation import (
    Activate,
    Fill,
    Hold,
    NamespaceKeys,
    Reserve,
    Schedule,
    Stage,
    Step,
    Wait,
    next_rotation,
    next_step,
    staged_is_next,
)
from .store import KeyStore
from .watch import ListWatch, in_daemon_thread

log = logging.getLogger("keymount.controller")

# Steps taken in one namespace before it goes back in the queue: a namespace needs at
# most four writes to settle (a slot, a key, the slots above it); anything more means
# another writer keeps changing it, and the others must not wait behind it.
MAX_STEPS = 6
# A restart conditional on a read that a workload's status update overtook is read and
# tried again at once, this many times in all, before it waits for the namespace's retry.
RESTART_ATTEMPTS = 3
RETRY_AFTER = timedelta(seconds=30)  # a namespace whose step failed is looked at again
# How often a write held back for want of a confirmed leadership looks again (the
# elector cancels the work within a retry period of its renew deadline).
LEADERSHIP_POLL = 0.1


class Budget(Protocol):
    """What each write waits on before it is sent (WriteBudget; KeyController.take adds
    the leadership check)."""

    async def take(self) -> None: ...


class ControllerApi(Protocol):
    """The controller's writes and its live read; blocking calls, run in a thread."""

    def keyring(self, namespace: str) -> Keyring: ...
    def reserve_slot(self, namespace: str, number: int) -> SlotOutcome: ...
    def fill_slot(self, namespace: str, slot: KeyRecord, key: bytes) -> KeyRecord | None: ...
    def stage_slot(self, namespace: str, slot: KeyRecord, key: bytes) -> KeyRecord | None: ...
    def activate_staged(self, namespace: str, staged: KeyRecord) -> KeyRecord | None: ...
    def write_policy_status(self, namespace: str, name: str, status: dict[str, Any], *,
                            resource_version: str | None = None) -> bool: ...
    def write_cluster_policy_status(self, name: str, status: dict[str, Any], *,
                                    resource_version: str | None = None) -> bool: ...
    # restart: rolling
    def backend_pods(self, namespace: str | None) -> list[dict[str, Any]]: ...
    def controller_of(self, namespace: str, pod: dict[str, Any], *,
                      owners: dict[tuple[str, str], Any] | None = None
                      ) -> tuple[str, str] | None: ...
    def read_workload(self, namespace: str, kind: str, name: str) -> dict[str, Any]: ...
    def restart_workload(self, namespace: str, kind: str, name: str, *, at: str,
                         resource_version: str | None = None) -> bool: ...


class WriteBudget:
    """A token bucket the controller's writes wait on: `rate` writes a second, at most
    `burst` at once."""

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rate, self.burst, self.clock, self.sleep = rate, burst, clock, sleep
        self.tokens, self.filled = float(burst), clock()

    async def take(self) -> None:
        """Wait for this write's turn. The token is taken at once (the count may go
        below zero), so concurrent writers queue in order, as a reservation in Go's
        x/time/rate does."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.filled) * self.rate)
        self.filled = now
        self.tokens -= 1
        if self.tokens < 0:
            await self.sleep(-self.tokens / self.rate)


class SlotTaken(Exception):
    """The name of the slot to reserve is held by another Secret: (number, what holds
    it and how to free it)."""


def execute(api: ControllerApi, keyring: Keyring, step: Step) -> bool:
    """Make the write `step` stands for, from the records of `keyring` (their
    resourceVersions). False when another writer got there first: no error, the next
    read shows who won (and no Event or count claims the step)."""
    namespace = keyring.namespace
    match step:
        case Reserve(number):
            name = slot_secret_name(number)
            outcome = api.reserve_slot(namespace, number)
            if outcome == "taken":
                raise SlotTaken(number, (
                    f"Secret {name!r} in namespace {namespace!r} is not a key Secret, so "
                    f"keymount cannot reserve that slot; delete or rename it: kubectl "
                    f"delete secret {name} -n {namespace}"))
            return outcome == "reserved"
        case Fill(number):
            return api.fill_slot(namespace, _slot(keyring, number),
                                 secrets.token_bytes(32)) is not None
        case Stage(number):
            return api.stage_slot(namespace, _slot(keyring, number),
                                  secrets.token_bytes(32)) is not None
        case Activate(number):
            staged = keyring.staged
            return (staged is not None and staged.index == number
                    and api.activate_staged(namespace, staged) is not None)
        case _:
            raise AssertionError(f"not a write: {step!r}")


def _slot(keyring: Keyring, number: int) -> KeyRecord:
    for slot in keyring.free_slots:
        if slot.index == number:
            return slot
    raise AssertionError(f"no empty slot {number} in {keyring.namespace}")


async def reconcile(api: ControllerApi, namespace: str, schedule: Schedule, *, slots: int,
                    budget: Budget,
                    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                    on_step: Callable[[Keyring, Step], None] = lambda keyring, step: None,
                    cached: Keyring | None = None,
                    held: str | None = None,
                    first_seen: Callable[[Keyring], datetime] | None = None
                    ) -> tuple[Wait | Hold, Keyring]:
    """Step `namespace` towards `schedule` until nothing is due now: when to look again
    (`Wait`) or why it cannot be rotated (`Hold`), and the keys as last read.

    `cached`, the watch's copy of the keys, may only say that nothing is due: then no
    live read is made (a controller starting with 10,000 namespaces reads none of them
    until one is due). Anything else is decided again on a live read. `held`: why the
    namespace may not be rotated at all now (nothing is written). `first_seen`: when
    this controller first saw the keyring's staged key, by its own clock; an activation
    also waits a staging period from then (KeyController.first_seen)."""
    if held is not None:
        keyring = cached if cached is not None else \
            await in_daemon_thread(lambda: api.keyring(namespace))
        return Hold(held), keyring
    if cached is not None:
        if first_seen is not None and cached.staged is not None:
            first_seen(cached)  # noted whenever seen, so that it delays nothing needlessly
        step = next_step(observe(cached), schedule, now=clock(), slots=slots)
        if isinstance(step, Wait):
            return step, cached
    for _ in range(MAX_STEPS):
        keyring = await in_daemon_thread(lambda: api.keyring(namespace))
        if first_seen is not None and keyring.staged is not None:
            first_seen(keyring)
        keys = observe(keyring)
        step = next_step(keys, schedule, now=clock(), slots=slots)
        if isinstance(step, Wait | Hold):
            return step, keyring
        # A key below the active one replaces nothing: it waits for no leader's clock.
        if isinstance(step, Activate) and first_seen is not None and staged_is_next(keys):
            ready = first_seen(keyring) + schedule.staging_period
            if clock() < ready:
                return Wait(ready), keyring
        await budget.take()
        try:
            made = await in_daemon_thread(lambda: execute(api, keyring, step))  # noqa: B023
        except SlotTaken as taken:
            return Hold(taken.args[1]), keyring
        if made:
            on_step(keyring, step)
    # Still not settled: another writer keeps changing the namespace. Looked at again
    # later, not at once: at once, a step that never lands would spend the shared write
    # budget in a loop.
    return Wait(clock() + RETRY_AFTER), keyring


class Queue:
    """Namespaces by when they are next due; `poke` moves one earlier (never later,
    except through `set`). An `urgent` namespace (a staged key waiting for activation)
    goes before every other due one: a wave of 10,000 namespaces due at once must not
    keep keys staged for the hour their stagings take at the write budget."""

    def __init__(self, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.clock = clock
        self._due: dict[str, tuple[datetime, bool]] = {}
        self._heaps: dict[bool, list[tuple[datetime, str]]] = {True: [], False: []}
        self._changed = asyncio.Event()
        # Handed out and not `done` yet; and of those, poked meanwhile. The handling
        # ends with a `set` decided on what it read, which would overwrite a poke for a
        # change it did not see (controller-runtime's workqueue keeps such an item
        # "dirty" for the same reason).
        self._out: set[str] = set()
        self._again: set[str] = set()

    def __len__(self) -> int:
        return len(self._due)

    def due_at(self, namespace: str) -> datetime | None:
        entry = self._due.get(namespace)
        return entry[0] if entry else None

    def poke(self, namespace: str, at: datetime | None = None) -> None:
        """Look at `namespace` at `at` (now by default), unless it is due earlier."""
        at = at or self.clock()
        if namespace in self._out and at <= self.clock():
            self._again.add(namespace)
        current = self._due.get(namespace)
        if current is None or at < current[0]:
            self.set(namespace, at, urgent=current[1] if current else False)

    def set(self, namespace: str, at: datetime | None, *, urgent: bool = False) -> None:
        """Look at `namespace` at `at` exactly; None: only when poked."""
        if at is None:
            self._due.pop(namespace, None)
        else:
            self._due[namespace] = (at, urgent)
            heapq.heappush(self._heaps[urgent], (at, namespace))
        if sum(map(len, self._heaps.values())) > 2 * len(self._due) + 64:
            for flag in (True, False):  # drop superseded entries
                self._heaps[flag] = [(when, ns) for ns, (when, u) in self._due.items()
                                     if u is flag]
                heapq.heapify(self._heaps[flag])
        self._changed.set()

    def _head(self, urgent: bool) -> tuple[datetime, str] | None:
        heap = self._heaps[urgent]
        while heap and self._due.get(heap[0][1]) != (heap[0][0], urgent):
            heapq.heappop(heap)  # superseded by a later set or poke
        return heap[0] if heap else None

    def pop_due(self) -> str | None:
        """The next namespace due now (urgent ones first, then the earliest); it leaves
        the queue. None when nothing is due."""
        now = self.clock()
        for urgent in (True, False):
            head = self._head(urgent)
            if head is not None and head[0] <= now:
                heapq.heappop(self._heaps[urgent])
                del self._due[head[1]]
                self._out.add(head[1])
                return head[1]
        return None

    def done(self, namespace: str) -> None:
        """`namespace`'s handling has ended: if it was poked meanwhile, it is due now."""
        self._out.discard(namespace)
        if namespace in self._again:
            self._again.discard(namespace)
            self.poke(namespace)

    def take_due(self) -> list[str]:
        """Every namespace due now, in the order `pop_due` gives them."""
        due = []
        while (namespace := self.pop_due()) is not None:
            self._out.discard(namespace)  # not handled here: nothing to mark
            due.append(namespace)
        return due

    async def wait(self) -> None:
        """Until something is due or the queue changed; no timer runs while nothing is
        due (the heads say when)."""
        self._changed.clear()
        heads = [head[0] for head in (self._head(True), self._head(False)) if head]
        timeout = max(0.0, (min(heads) - self.clock()).total_seconds()) if heads else None
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass


# --- from a keyring to what the next step depends on ---------------------------------------

def observe(keyring: Keyring) -> NamespaceKeys:
    """What `next_step` reads of a namespace's keys (pure)."""
    from .keys import describe_conflict
    problem = None
    if keyring.conflict is not None:
        problem = describe_conflict(keyring)
    elif keyring.invalid:
        bad = keyring.invalid[0]
        problem = (f"key Secret {bad.name!r} is invalid ({bad.check.reason}); keymount "
                   f"rotates only a namespace whose keys are all valid. Check it: keymount "
                   f"keys list -n {keyring.namespace}")
    newest, staged = keyring.newest, keyring.staged
    if staged is not None and staged.staged_at is None and problem is None:
        problem = (f"staged key {staged.name!r} carries no keymount.io/staged-at, so its "
                   f"staging period cannot be counted; activate it by hand: keymount keys "
                   f"activate -n {keyring.namespace}")
    return NamespaceKeys(
        namespace=keyring.namespace,
        active=keyring.active_number or None,
        active_since=(newest.activated_at or newest.created) if newest else None,
        staged=staged.index if staged else None,
        # The stamp is to the second, rounded down: counting from one second later, a
        # key is never active before its whole staging period has passed.
        staged_since=(staged.staged_at + timedelta(seconds=1)
                      if staged and staged.staged_at else None),
        free_slots=tuple(slot.index for slot in keyring.free_slots),
        next_number=_free_number(keyring), problem=problem)


def _free_number(keyring: Keyring) -> int:
    """The next number whose slot name no key Secret holds: a key from before keymount
    numbered keys may be named like a slot (`keymount-key-2`) and numbered otherwise.
    Its number is skipped (numbers may have gaps), as `keys rotate` skips one whose
    name an unlabelled Secret has."""
    number = keyring.next_number
    while keyring.find(slot_secret_name(number)) is not None:
        number += 1
    return number


# --- restart: rolling -----------------------------------------------------------------------

def needs_restart(workload: Mapping[str, Any], *, activated: datetime) -> bool:
    """Whether a workload whose Pods lack the active key still needs rolling: not if
    its Pod template was restarted at or after the key's activation (a rollout under
    way, by keymount or by anyone). Read from the workload itself, so a new leader
    never rolls a workload twice for one key."""
    from .lifecycle import RESTARTED_AT
    template = (workload.get("spec") or {}).get("template") or {}
    stamp = ((template.get("metadata") or {}).get("annotations") or {}).get(RESTARTED_AT)
    if not isinstance(stamp, str):
        return True
    try:
        restarted = datetime.fromisoformat(stamp)
    except ValueError:
        return True
    return (restarted if restarted.tzinfo else restarted.replace(tzinfo=UTC)) < activated


@dataclass(frozen=True, slots=True)
class Rolled:
    """One `restart: rolling` pass: what was restarted, and what could not be (kind,
    name, why), each on its own."""

    restarted: tuple[tuple[str, str], ...] = ()
    failed: tuple[tuple[str, str, str], ...] = ()


async def roll_workloads(api: ControllerApi, keyring: Keyring, *, now: datetime,
                         take: Callable[[], Awaitable[None]]) -> Rolled:
    """`restart: rolling`: restart each Deployment, StatefulSet or DaemonSet whose
    running Pods started without the active key, as `keys rotate --restart` does, unless
    it was restarted since the key's activation. Only workloads that really control
    those Pods (ControllerApi.controller_of checks each link). `take` is called before
    each write; each restart is conditional on the resourceVersion of the read that
    decided it, so two leaders never both roll a workload for one key; a workload that
    changed in between (its status moves with every Pod's readiness) is read and judged
    again, up to RESTART_ATTEMPTS times. One workload's failure never stops the others.
    Each call is its own trip to a thread from the loop, so the leader's work, cancelled
    when leadership ends, sends no write after it."""
    from .lifecycle import restart_targets
    active = keyring.newest
    if active is None or active.activated_at is None:
        return Rolled()  # a key never activated by keymount (made before staged keys)
    namespace = keyring.namespace
    restarted: list[tuple[str, str]] = []
    failed: list[tuple[str, str, str]] = []
    owners: dict[tuple[str, str], Any] = {}  # each owner read once a pass

    def controller_of(pod: dict[str, Any]) -> tuple[str, str] | None:
        try:
            return api.controller_of(namespace, pod, owners=owners)
        except Exception as exc:  # its owner unreadable for now: retried with the rest
            failed.append(("Pod", str(as_dict(pod.get("metadata")).get("name", "")),
                           _describe(exc)))
            return None
    workloads, _ = await in_daemon_thread(lambda: restart_targets(
        api.backend_pods(namespace), active.name, controller_of=controller_of))
    # Never stamped before the activation: activated-at is the stamping replica's
    # clock, and a leader whose clock runs behind it would otherwise leave a stamp that
    # needs_restart reads as "not restarted since", and roll the workload again on
    # every handling until its clock catches up.
    at = _time(max(now, active.activated_at)) or ""
    for kind, name in workloads:
        try:
            for _ in range(RESTART_ATTEMPTS):
                workload = await in_daemon_thread(
                    partial(api.read_workload, namespace, kind, name))
                if not needs_restart(workload, activated=active.activated_at):
                    break  # restarted since the activation (by another leader, too)
                await take()
                version = str(as_dict(workload.get("metadata")).get("resourceVersion") or "")
                if await in_daemon_thread(partial(
                        api.restart_workload, namespace, kind, name, at=at,
                        resource_version=version or None)):
                    restarted.append((kind, name))
                    break
            else:
                failed.append((kind, name, f"it changed while being restarted, "
                                           f"{RESTART_ATTEMPTS} times in a row"))
        except Exception as exc:  # reported by the caller, retried with the namespace
            failed.append((kind, name, _describe(exc)))
    return Rolled(tuple(restarted), tuple(failed))


# --- a KeyPolicy's status ------------------------------------------------------------------

def _time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC; None for no time, or one that has none in UTC."""
    try:
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else None
    except (OverflowError, ValueError):
        return None


def expected_rotation(keys: NamespaceKeys, schedule: Schedule,
                      result: Wait | Hold) -> datetime | None:
    """When the active key is replaced, as the status says it: the schedule's time
    (rotation.next_rotation), or, while a staged key waits longer because this leader
    saw it late (KeyController.first_seen), the end of that wait: not a rotation
    overdue."""
    due = next_rotation(keys, schedule)
    if staged_is_next(keys) and isinstance(result, Wait) and result.until is not None \
            and due is not None and result.until > due:
        return result.until
    return due


def policy_status(keys: NamespaceKeys, result: Wait | Hold, *, schedule: Schedule,
                  valid_keys: int, generation: int, now: datetime,
                  previous: Mapping[str, Any], adjusted: tuple[str, ...] = ()
                  ) -> dict[str, Any]:
    """The `status` keymount writes on the KeyPolicy in effect (pure). A condition keeps
    its lastTransitionTime while its status stays (metav1.Condition's rule). `adjusted`:
    where a ClusterKeyPolicy's bound replaced what the KeyPolicy declares, said in
    `Ready`'s message (reason `BoundsApplied`), so its author sees what runs."""
    due = expected_rotation(keys, schedule, result)
    before = {c.get("type"): c for c in previous.get("conditions") or []
              if isinstance(c, Mapping)}

    def condition(kind: str, true: bool, reason: str, message: str) -> dict[str, Any]:
        status = "True" if true else "False"
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        return {"type": kind, "status": status, "reason": reason, "message": message[:1024],
                "lastTransitionTime": since or _time(now)}

    held = isinstance(result, Hold)
    return {
        "activeKey": keys.active, "stagedKey": keys.staged, "keys": valid_keys,
        "lastRotation": _time(keys.active_since), "nextRotation": _time(due),
        "observedGeneration": generation,
        "conditions": [
            condition("Ready", not held,
                      "NotRotated" if held else "BoundsApplied" if adjusted else "Reconciled",
                      result.reason if isinstance(result, Hold) else
                      "keys follow the policy, held to the bounds: " + "; ".join(adjusted)
                      if adjusted else "keys follow the policy"),
            condition("RotationDue", due is not None and due <= now,
                      "PeriodElapsed" if due is not None and due <= now else "NotDue",
                      f"next rotation {_time(due)}" if due else "no rotationPeriod"),
            condition("Staged", keys.staged is not None,
                      "KeyStaged" if keys.staged is not None else "NothingStaged",
                      f"key {keys.staged} is staged" if keys.staged is not None else
                      "no key is staged"),
        ],
    }


def ignored_status(in_effect: str, *, generation: int, now: datetime,
                   previous: Mapping[str, Any]) -> dict[str, Any]:
    """The `status` of a namespace's KeyPolicy that is not in effect (pure): one per
    namespace is meant, and the oldest rules; this one's author is told so."""
    return _not_in_effect("Ignored", (
        f"KeyPolicy {in_effect!r} is in effect in this namespace (the oldest; one "
        f"KeyPolicy per namespace): this one is ignored; delete it, or merge what it "
        f"says into {in_effect!r}"), generation=generation, now=now, previous=previous)


def invalid_status(problem: str, *, fix: str, generation: int, now: datetime,
                   previous: Mapping[str, Any]) -> dict[str, Any]:
    """The `status` of a stored policy that does not parse (pure): stored before
    keymount's webhook judged policies, or while it was down, it counts as no policy
    (policystore), and its author is told what is wrong with it instead."""
    return _not_in_effect("Invalid", (
        f"keymount cannot read this policy and does not rotate by it: {problem}; fix it "
        f"({fix}) or delete it"), generation=generation, now=now, previous=previous)


def _not_in_effect(reason: str, message: str, *, generation: int, now: datetime,
                   previous: Mapping[str, Any]) -> dict[str, Any]:
    old = next((c for c in previous.get("conditions") or []
                if isinstance(c, Mapping) and c.get("type") == "Ready"), {})
    since = old.get("lastTransitionTime") if old.get("status") == "False" else None
    return {
        "activeKey": None, "stagedKey": None, "keys": None, "lastRotation": None,
        "nextRotation": None, "observedGeneration": generation,
        "conditions": [{
            "type": "Ready", "status": "False", "reason": reason,
            "message": message[:1024], "lastTransitionTime": since or _time(now)}],
    }


@dataclass(frozen=True, slots=True)
class Summary:
    """One managed namespace, as a ClusterKeyPolicy's status counts it."""

    cluster_policies: tuple[str, ...]
    held: str | None  # why it is not rotated, if it is not
    keys: int
    last_rotation: datetime | None
    next_rotation: datetime | None
    adjusted: tuple[str, ...] = ()  # where a bound replaced a default, per namespace


def cluster_policy_status(summaries: list[Summary], *, generation: int, now: datetime,
                          previous: Mapping[str, Any]) -> dict[str, Any]:
    """A ClusterKeyPolicy's `status` (pure): its namespaces' valid keys, their latest
    rotation and the next one due, and Ready unless one of them is held. Namespaces
    held to bounds other than their declared periods (conflicting ClusterKeyPolicies
    among them) are counted in the message, reason `BoundsApplied`."""
    held = [s.held for s in summaries if s.held]
    bounded = [s.adjusted for s in summaries if s.adjusted]
    old = next((c for c in previous.get("conditions") or []
                if isinstance(c, Mapping) and c.get("type") == "Ready"), {})
    ready = "False" if held else "True"
    since = old.get("lastTransitionTime") if old.get("status") == ready else None
    if held:
        reason = "NotRotated"
        message = f"{len(held)} of {len(summaries)} namespaces not rotated; first: {held[0]}"
    elif bounded:
        reason = "BoundsApplied"
        message = (f"{len(summaries)} namespaces follow their policy; {len(bounded)} of "
                   f"{len(summaries)} namespaces held to bounds; first: "
                   + "; ".join(bounded[0]))
    else:
        reason, message = "Reconciled", f"{len(summaries)} namespaces follow their policy"
    return {
        "keys": sum(s.keys for s in summaries),
        "lastRotation": _time(max((s.last_rotation for s in summaries if s.last_rotation),
                                  default=None)),
        "nextRotation": _time(min((s.next_rotation for s in summaries if s.next_rotation),
                                  default=None)),
        "observedGeneration": generation,
        "conditions": [{"type": "Ready", "status": ready, "reason": reason,
                        "message": message[:1024], "lastTransitionTime": since or _time(now)}],
    }


# --- the leader's work ---------------------------------------------------------------------

HOLD_RETRY = timedelta(minutes=5)  # a held namespace is also looked at again after this
_STEP_NAMES = {Reserve: "reserved", Fill: "first", Stage: "staged", Activate: "activated"}


class KeyController:
    """Managed rotation, run by the holder of the controller Lease (webhook/leader.py):
    `run` is the leader's work, cancelled when leadership ends. Everything it holds is
    rebuilt on the next `run`: the policies from their watches, the due times from the
    keys."""

    def __init__(self, api: ControllerApi, *, keys: KeyStore, policies: PolicyStore,
                 watches: Callable[[], list[ListWatch[Any]]], slots: int,
                 budget: WriteBudget, metrics: Metrics,
                 events: EventRecorder | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 may_write: Callable[[], bool] = lambda: True,
                 unmanaged: Iterable[str] = ("kube-system",)) -> None:
        self.api, self.keys, self.policies, self.watches = api, keys, policies, watches
        # Namespaces keymount's webhooks skip (manifests/: keymount's own and
        # kube-system): nothing stamps or guards key Secrets there and no backend Pod is
        # injected, so a ClusterKeyPolicy selecting every namespace must not rotate them.
        self.unmanaged = frozenset(unmanaged)
        self.slots, self.budget, self.metrics = max(1, slots), budget, metrics
        self.events, self.clock, self.may_write = events, clock, may_write
        self.queue = Queue(clock=clock)
        # What each managed namespace looked like when last handled, for the
        # ClusterKeyPolicies' status only (never for a write).
        self.summaries: dict[str, Summary] = {}
        # Per namespace, its staged key (name, staged-at) and when this process first
        # saw it: memory that can only delay an activation, never cause one.
        self.seen: dict[str, tuple[str, datetime | None, datetime]] = {}
        # Noted on every replica, leader or not, from the key watch that serves
        # admission: a new leader has usually seen a staged key already, and a change
        # of leaders does not start its wait again.
        keys.listeners.append(self._note_staged)

    def first_seen(self, keyring: Keyring) -> datetime:
        """When this controller first saw `keyring`'s staged key, by its own clock.
        keymount.io/staged-at is stamped by whichever replica's webhook admitted the
        staging, with that replica's clock: one that runs behind would shorten the
        staging, and Pods would be asked to decrypt with a key the kubelet has not
        delivered yet. Waiting a staging period from this too costs at most one staging
        period, to a leader that had not seen the key staged (every replica notes it from
        its key watch: _note_staged); the written time stays what schedules the rest."""
        staged = keyring.staged
        assert staged is not None  # called only for a keyring with a staged key
        namespace, now = keyring.namespace, self.clock()
        known = self.seen.get(namespace)
        if known is None or known[:2] != (staged.name, staged.staged_at):
            known = self.seen[namespace] = (staged.name, staged.staged_at, now)
        return known[2]

    async def take(self) -> None:
        """A write's turn, waited for just before it is sent: its token from the write
        budget, then a leadership still within its renew deadline (`may_write`:
        LeaderElector.may_write). A leader paused past its deadline (a GC pause, a
        throttled CPU) may have a successor already; it sends nothing, and the elector
        cancels its work (client-go's leaders stop at the same deadline)."""
        await self.budget.take()
        # A poll, not an Event: the deadline passes with time, not with anything the
        # elector does.
        while not self.may_write():  # noqa: ASYNC110
            await asyncio.sleep(LEADERSHIP_POLL)

    def _note_staged(self, namespace: str) -> None:
        keyring = self.keys.keyring(namespace)
        if keyring.staged is not None and keyring.staged.staged_at is not None:
            self.first_seen(keyring)
        else:
            self.seen.pop(namespace, None)  # bounded: one entry per staged key

    def _effective(self, namespace: str) -> EffectivePolicy | None:
        """What `namespace` rotates by; None: not the controller's to rotate."""
        if namespace in self.unmanaged:
            return None
        return self.policies.effective(namespace)

    def _key_changed(self, namespace: str) -> None:
        if self._effective(namespace) is not None:
            self.queue.poke(namespace)

    def _policy_changed(self, namespace: str | None) -> None:
        # Whether a namespace has a policy is judged when it is handled, a namespace at
        # a time between yields: judging 10,000 here would stall the loop (0.25 s).
        if namespace is not None:
            self.queue.poke(namespace)
            return
        for stored in list(self.policies.namespaces.all()):
            self.queue.poke(stored.name)

    async def run(self) -> None:
        self.queue, self.summaries = Queue(clock=self.clock), {}
        self.keys.listeners.append(self._key_changed)
        self.policies.listeners.append(self._policy_changed)
        try:
            async with asyncio.TaskGroup() as group:
                if self.events is not None:
                    group.create_task(self.events.run(), name="keymount-controller-events")
                # Each watch lists first and keeps re-listing after an error (with
                # backoff, logged): a missing right or CRD is reported and retried, never
                # a reason to give up the Lease. Its first list pokes what it brings.
                watches = self.watches()
                for watch in watches:
                    group.create_task(watch.run(), name="keymount-policy-watch")
                # Nothing is handled before every watch has listed once: a namespace
                # handled on its ClusterKeyPolicy's defaults before its own KeyPolicy
                # arrived would be rotated on the wrong periods (a staged key activated
                # early). client-go's controllers wait for their caches the same way
                # (WaitForCacheSync).
                await asyncio.gather(*(watch.synced.wait() for watch in watches))
                # Every namespace once: a store kept from an earlier term lists nothing
                # new, and its re-list changes nothing that would poke a namespace.
                self._policy_changed(None)
                log.info("controller started: following the policies")
                while True:
                    handled = 0
                    # One at a time, so an activation that falls due meanwhile goes next;
                    # the loop yields between namespaces, so a wave never holds up the
                    # admissions this process serves.
                    while (namespace := self.queue.pop_due()) is not None:
                        await self._handle_one(namespace)
                        handled += 1
                        await asyncio.sleep(0)
                    if handled:
                        await self._write_cluster_status()
                    await self.queue.wait()
        finally:
            self.keys.listeners.remove(self._key_changed)
            self.policies.listeners.remove(self._policy_changed)
            self.metrics.key_activations.clear()

    async def _handle_one(self, namespace: str) -> None:
        """`handle`, where nothing one namespace holds can end the leader's work for
        every other: an unexpected error is logged, counted and retried like a failed
        write (its key Secrets and policies are written by the namespace's users)."""
        try:
            await self.handle(namespace)
        except Exception as exc:
            self.metrics.rotations.labels("failed").inc()
            # Described, never a traceback: what the objects it read hold stays out of
            # the log (describe_api_error keeps API errors to one line).
            log.warning("rotation of a namespace failed; retrying later",
                        extra={"namespace": namespace, "error": _describe(exc),
                               "error_type": type(exc).__name__,
                               "retry_seconds": RETRY_AFTER.total_seconds()})
            self._event(namespace, "Namespace", namespace, "v1", "Warning", "RotationFailed",
                        f"keymount could not handle this namespace ({type(exc).__name__}); "
                        f"it retries in {RETRY_AFTER.total_seconds():g}s: see its log")
            self.queue.poke(namespace, self.clock() + RETRY_AFTER)
        finally:
            self.queue.done(namespace)

    async def handle(self, namespace: str) -> None:
        """Bring one due namespace up to its policy, write its status, and say when it
        is due next."""
        effective = self._effective(namespace)
        if namespace not in self.unmanaged:
            await self._report_invalid(namespace)
        if effective is None:
            self.metrics.key_activations.pop(namespace, None)
            self.summaries.pop(namespace, None)
            self.seen.pop(namespace, None)
            return  # no policy (any more): rotated by hand
        schedule = Schedule(effective.rotation_period, effective.staging_period)
        # A stored policy that does not parse (one from before keymount's webhook judged
        # policies) may be this namespace's KeyPolicy or carry the bounds that hold it:
        # the namespace is held and told, never rotated by what is left.
        problems = self.policies.problems(namespace)
        held = (f"{problems[0]}; keymount does not rotate by a policy it cannot read, nor "
                f"without bounds it cannot read: fix or delete it (kubectl get "
                f"keypolicies,clusterkeypolicies -A)") if problems else None
        try:
            result, keyring = await reconcile(self.api, namespace, schedule, slots=self.slots,
                                              budget=self, clock=self.clock,
                                              on_step=self._stepped,
                                              cached=self.keys.keyring(namespace),
                                              held=held, first_seen=self.first_seen)
        except Exception as exc:  # an API error: this namespace waits, the others go on
            self.metrics.rotations.labels("failed").inc()
            log.warning("rotation step failed; retrying later",
                        extra={"namespace": namespace, "error": _describe(exc),
                               "retry_seconds": RETRY_AFTER.total_seconds()})
            self._event(namespace, "Namespace", namespace, "v1", "Warning", "RotationFailed",
                        f"a rotation step failed: {_describe(exc)}; keymount retries in "
                        f"{RETRY_AFTER.total_seconds():g}s")
            self.queue.set(namespace, self.clock() + RETRY_AFTER)
            return
        keys = observe(keyring)
        if keys.active_since is not None:
            self.metrics.key_activations[namespace] = keys.active_since
        self.summaries[namespace] = Summary(
            effective.cluster_policies, result.reason if isinstance(result, Hold) else None,
            len(keyring.keys), keys.active_since, expected_rotation(keys, schedule, result),
            tuple(f"namespace {namespace!r}: {line}" for line in effective.adjusted))
        if isinstance(result, Hold):
            log.warning("namespace not rotated", extra={"namespace": namespace,
                                                         "reason": result.reason})
            self._event(namespace, "Namespace", namespace, "v1", "Warning", "RotationFailed",
                        result.reason)
            self.queue.set(namespace, self.clock() + HOLD_RETRY)
        else:
            self.queue.set(namespace, result.until, urgent=keys.staged is not None)
        if effective.restart == "rolling" and isinstance(result, Wait) \
                and not await self._roll(keyring):
            self.queue.poke(namespace, self.clock() + RETRY_AFTER)
        if effective.keypolicy is not None and not await self._write_status(
                namespace, effective.keypolicy, keys, result, schedule, len(keyring.keys),
                effective.adjusted):
            self.queue.poke(namespace, self.clock() + RETRY_AFTER)
        # The namespace's users write its KeyPolicies, as many as they like: at most
        # MAX_STEPS of their statuses a handling, the rest after the other namespaces'
        # turn (the leader handles one namespace at a time, each write at the budget).
        in_effect = effective.keypolicy or ""
        stale = [name for name in effective.ignored
                 if self._ignored_stale(namespace, name, in_effect)]
        for name in stale[:MAX_STEPS]:
            if not await self._write_ignored(namespace, name, in_effect):
                self.queue.poke(namespace, self.clock() + RETRY_AFTER)
        if len(stale) > MAX_STEPS:
            self.queue.poke(namespace, self.clock() + RETRY_AFTER)

    def _ignored_status(self, stored: Stored[Any], in_effect: str) -> dict[str, Any]:
        return ignored_status(in_effect, generation=stored.generation, now=self.clock(),
                              previous=stored.status)

    def _ignored_stale(self, namespace: str, name: str, in_effect: str) -> bool:
        """Whether an ignored KeyPolicy's status, as watched, is not the one to write."""
        stored = self.policies.keypolicies.get(namespace, name)
        return stored is not None and not _written(
            stored.status, self._ignored_status(stored, in_effect))

    async def _write_ignored(self, namespace: str, name: str, in_effect: str) -> bool:
        return await self._write_keypolicy_status(
            namespace, name, lambda stored: self._ignored_status(stored, in_effect))

    async def _report_invalid(self, namespace: str) -> None:
        """Each of the namespace's KeyPolicies that does not parse gets a status that
        says so, and a Warning Event, once (while the status stays written): it counts
        as no policy, so without this its author would see nothing at all."""
        for stored in [r for r in self.policies.policy_objects(namespace)
                       if r.problem][:MAX_STEPS]:
            def status_of(current: Stored[Any]) -> dict[str, Any]:
                return invalid_status(
                    current.problem or "", generation=current.generation, now=self.clock(),
                    previous=current.status,
                    fix=f"kubectl edit keypolicy {current.name} -n {namespace}")
            status = status_of(stored)
            if _written(stored.status, status):
                continue
            log.warning("a KeyPolicy does not parse; it is not in effect", extra={
                "namespace": namespace, "policy": stored.name, "error": stored.problem})
            self._event(namespace, KEYPOLICY_KIND, stored.name, POLICY_API_VERSION,
                        "Warning", "InvalidPolicy", status["conditions"][0]["message"])
            if not await self._write_keypolicy_status(namespace, stored.name, status_of):
                self.queue.poke(namespace, self.clock() + RETRY_AFTER)

    async def _write_status(self, namespace: str, name: str, keys: NamespaceKeys,
                            result: Wait | Hold, schedule: Schedule, valid: int,
                            adjusted: tuple[str, ...]) -> bool:
        return await self._write_keypolicy_status(namespace, name, lambda stored: (
            policy_status(keys, result, schedule=schedule, valid_keys=valid,
                          generation=stored.generation, now=self.clock(),
                          previous=stored.status, adjusted=adjusted)))

    async def _write_keypolicy_status(self, namespace: str, name: str,
                                      status_of: Callable[[Stored[Any]], dict[str, Any]]
                                      ) -> bool:
        """A KeyPolicy's status as `status_of` makes it from the watched object (gone
        from the watch: nothing to write)."""
        stored = self.policies.keypolicies.get(namespace, name)
        if stored is None:
            return True
        status = status_of(stored)
        return await self._patch_status(
            stored.status, status, partial(self.api.write_policy_status, namespace, name,
                                           status, resource_version=stored.version or None),
            what=f"KeyPolicy {namespace}/{name}")

    async def _patch_status(self, stored: Mapping[str, Any], status: dict[str, Any],
                            write: Callable[[], bool], *, what: str) -> bool:
        """Write `status` unless the watch shows it stored already (a None field is
        absent once written: the merge patch removes it). The write is conditional on
        the policy's resourceVersion as watched, so a leader that read the world before
        another leader wrote never puts its older status over the newer one. False when
        the write failed (logged, counted) or lost that race (the watch brings the newer
        policy): the caller looks again after RETRY_AFTER."""
        if _written(stored, status):
            return True
        await self.take()
        try:
            written = await in_daemon_thread(write)
        except Exception as exc:
            self.metrics.rotations.labels("failed").inc()
            log.warning("could not write a policy's status",
                        extra={"policy": what, "error": _describe(exc)})
            return False
        if not written:
            log.debug("a policy changed since it was read; its status is written again",
                      extra={"policy": what})
        return written

    async def _write_cluster_status(self) -> None:
        """Each ClusterKeyPolicy's status: over the namespaces it gives their policy, the
        valid keys, the latest rotation, the next one, and Ready unless one is held."""
        for stored in list(self.policies.clusterkeypolicies.all()):
            summaries = [summary for summary in self.summaries.values()
                         if stored.name in summary.cluster_policies]
            try:
                if stored.value is None:
                    status = invalid_status(
                        stored.problem or "", generation=stored.generation,
                        now=self.clock(), previous=stored.status,
                        fix=f"kubectl edit clusterkeypolicy {stored.name}")
                else:
                    status = cluster_policy_status(
                        summaries, generation=stored.generation, now=self.clock(),
                        previous=stored.status)
            except Exception as exc:  # one policy's figures never stop the others'
                log.warning("could not compute a ClusterKeyPolicy's status",
                            extra={"policy": stored.name, "error": _describe(exc)})
                continue
            written = await self._patch_status(
                stored.status, status, partial(self.api.write_cluster_policy_status,
                                               stored.name, status,
                                               resource_version=stored.version or None),
                what=f"ClusterKeyPolicy {stored.name}")
            governed = next((namespace for namespace, summary in self.summaries.items()
                             if stored.name in summary.cluster_policies), None)
            if not written and governed is not None:
                # Written again after the next handling: one of its namespaces, looked
                # at again after RETRY_AFTER, brings this pass back (a lost race, 409,
                # or a failure), else the status could wait for the next rotation.
                self.queue.poke(governed, self.clock() + RETRY_AFTER)

    async def _roll(self, keyring: Keyring) -> bool:
        """`restart: rolling` for one namespace; False when something failed (counted,
        logged, an Event), so the namespace is looked at again after RETRY_AFTER."""
        namespace = keyring.namespace
        try:
            rolled = await roll_workloads(self.api, keyring, now=self.clock(), take=self.take)
        except Exception as exc:
            rolled = Rolled(failed=(("Namespace", namespace, _describe(exc)),))
        for kind, name in rolled.restarted:
            self.metrics.rotations.labels("restarted").inc()
            log.info("workload restarted for the active key", extra={
                "namespace": namespace, "workload": f"{kind.lower()}/{name}"})
        for kind, name, why in rolled.failed:
            self.metrics.rotations.labels("failed").inc()
            log.warning("could not restart a workload; retrying later", extra={
                "namespace": namespace, "workload": f"{kind.lower()}/{name}", "error": why,
                "retry_seconds": RETRY_AFTER.total_seconds()})
            self._event(namespace, "Namespace", namespace, "v1", "Warning", "RotationFailed",
                        f"restart: rolling of {kind.lower()}/{name} failed: {why}; keymount "
                        f"retries in {RETRY_AFTER.total_seconds():g}s")
        return not rolled.failed

    def _stepped(self, keyring: Keyring, step: Step) -> None:
        namespace = keyring.namespace
        self.metrics.rotations.labels(_STEP_NAMES[type(step)]).inc()
        log.info("rotation step", extra={"namespace": namespace,
                                         "step": _STEP_NAMES[type(step)],
                                         "number": getattr(step, "number", None)})
        name = slot_secret_name(getattr(step, "number", 0))
        if isinstance(step, Stage):
            self._event(namespace, "Secret", name, "v1", "Normal", "KeyStaged",
                        f"key number {step.number} staged in {name}: running Pods get it as "
                        f"staged/encryption-key-{step.number}, and it becomes active after "
                        f"the staging period", once=step.number)
        elif isinstance(step, Activate) and step.number < keyring.active_number:
            self._event(namespace, "Secret", name, "v1", "Normal", "KeyActivated",
                        f"key number {step.number} in {name} is activated below the active "
                        f"key (number {keyring.active_number}), which a key writer made "
                        f"active while it was staged: it decrypts only; applications go "
                        f"on encrypting with encryption-key-{keyring.active_number}",
                        once=step.number)
        elif isinstance(step, Activate | Fill):
            self._event(namespace, "Secret", name, "v1", "Normal", "KeyActivated",
                        f"key number {step.number} in {name} is active: applications "
                        f"encrypt with encryption-key-{step.number} from now on",
                        once=step.number)

    def _event(self, namespace: str, kind: str, name: str, api_version: str, type_: str,
               reason: str, message: str, *, once: int | None = None) -> None:
        """`once`: the key number of a one-time fact, which the validating webhook
        records too when it sees this write (with --client-ca): one Event, whoever
        is first (events.occurrence)."""
        if self.events is not None:
            self.events.emit(EventNote(namespace=namespace, kind=kind, name=name,
                                       api_version=api_version, uid="", type=type_,
                                       reason=reason, message=message,
                                       occurrence=occurrence(reason, once)))


def _written(stored: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Whether `status` is stored already (a None field is absent once written: the
    merge patch removes it)."""
    return {k: v for k, v in status.items() if v is not None} == stored


def _describe(exc: Exception) -> str:
    from .cluster import describe_api_error
    return describe_api_error(exc)
