"""What the controller does next in one namespace: a pure function of what is stored.

Level-based, as controller-runtime's reconcilers are: the controller reads the
namespace's key Secrets live, asks `next_step` for the one write that brings them
closer to the policy, makes that write with the resourceVersion it read, and asks
again. Nothing is remembered between two steps, so a controller killed between any two
of them, or a new leader, continues from what the API server holds (docs/contract.md,
"Managed rotation"):

- a namespace whose keys are invalid or ambiguous is not touched (`Hold`);
- a staged key is activated once its staging period has passed (`Activate`), or at
  once when it is below the active key (a key writer made a higher key active by hand
  meanwhile): it is never the active key, so nothing waits for it, and activating it
  only moves its file out of `staged/`, which readers look in as well;
- a namespace with no key gets key 1 active at once (`Fill`): there is nothing to
  decrypt yet, so nothing to stage for;
- an active key gets a successor, staged (`Stage`), one staging period before it is
  one rotation period old, so that the successor is active when the period ends: the
  rotation period bounds how long a key is the one applications encrypt with, which is
  what a ClusterKeyPolicy's `maxRotationPeriod` promises (docs/contract.md);
- empty slots are kept, never more than `slots` numbers above the active key;
- otherwise nothing is written until `Wait.until` (None: until something changes).
The controller never retires or deletes a key: that stays a person's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class Schedule:
    """The namespace's effective policy, as far as the next step depends on it."""

    rotation_period: timedelta | None  # None: rotated by hand only
    staging_period: timedelta


@dataclass(frozen=True, slots=True)
class NamespaceKeys:
    """What the next step depends on, read from the namespace's key Secrets."""

    namespace: str
    active: int | None  # the active key's number
    active_since: datetime | None  # its activation, else its creation
    staged: int | None
    staged_since: datetime | None
    free_slots: tuple[int, ...]  # empty slots' numbers, ascending
    next_number: int  # the lowest number no Secret and no record has used
    problem: str | None = None  # why the keys cannot be rotated now (invalid, ambiguous)


@dataclass(frozen=True, slots=True)
class Reserve:
    number: int


@dataclass(frozen=True, slots=True)
class Fill:
    number: int  # an empty slot that becomes the active key at once


@dataclass(frozen=True, slots=True)
class Stage:
    number: int  # an empty slot that gets a new key under staged/


@dataclass(frozen=True, slots=True)
class Activate:
    number: int


@dataclass(frozen=True, slots=True)
class Wait:
    until: datetime | None  # None: nothing is due until the namespace changes


@dataclass(frozen=True, slots=True)
class Hold:
    reason: str


Step = Reserve | Fill | Stage | Activate | Wait | Hold


def next_step(keys: NamespaceKeys, schedule: Schedule, *, now: datetime, slots: int
              ) -> Step:
    """The one write that brings `keys` closer to `schedule` at `now`, or when to look
    again. `slots` (>= 1) is how many numbers may wait above the active key, the staged
    one included."""
    if keys.problem is not None:
        return Hold(keys.problem)
    if keys.staged is not None:
        assert keys.staged_since is not None
        due = keys.staged_since + schedule.staging_period
        if now >= due or not staged_is_next(keys):
            return Activate(keys.staged)
        return _keep_slots(keys, slots) or Wait(due)
    if keys.active is None:
        return Fill(keys.free_slots[0]) if keys.free_slots else Reserve(keys.next_number)
    due_staging = _staging_due(keys, schedule)
    if due_staging is not None and now >= due_staging:
        return Stage(keys.free_slots[0]) if keys.free_slots else Reserve(keys.next_number)
    return _keep_slots(keys, slots) or Wait(due_staging)


def next_rotation(keys: NamespaceKeys, schedule: Schedule) -> datetime | None:
    """When the active key is replaced: its successor becomes active (None: never by
    schedule). The staged key's activation while one is staged; otherwise one rotation
    period after the active key's activation, or one staging period when that is longer
    (conflicting bounds: the successor is staged at once). For the policy's status."""
    if keys.staged_since is not None and staged_is_next(keys):
        return keys.staged_since + schedule.staging_period
    if schedule.rotation_period is None or keys.active_since is None:
        return None
    return keys.active_since + max(schedule.rotation_period, schedule.staging_period)


def staged_is_next(keys: NamespaceKeys) -> bool:
    """Whether the staged key becomes the active key when activated: only one above
    the active key does (the guard stages only there, but a key writer may make a
    higher key active while one is staged)."""
    return keys.staged is not None and (keys.active is None or keys.staged > keys.active)


def _staging_due(keys: NamespaceKeys, schedule: Schedule) -> datetime | None:
    """When the active key's successor is staged: one staging period before the active
    key is one rotation period old, and never before the active key's activation."""
    if schedule.rotation_period is None or keys.active_since is None:
        return None
    return keys.active_since + max(schedule.rotation_period - schedule.staging_period,
                                   timedelta(0))


def _keep_slots(keys: NamespaceKeys, slots: int) -> Reserve | None:
    waiting = len(keys.free_slots) + (keys.staged is not None)
    return Reserve(keys.next_number) if waiting < slots else None
