"""The controller's next step, decided from what is stored and the clock alone."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.rotation import (
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
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
STAGING = timedelta(minutes=2)
POLICY = Schedule(rotation_period=30 * DAY, staging_period=STAGING)


def keys(**fields: object) -> NamespaceKeys:
    base = NamespaceKeys(namespace="team-a", active=1, active_since=T0, staged=None,
                         staged_since=None, free_slots=(2, 3), next_number=4)
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("stored", "now", "expected"), [
    # A successor is staged one staging period before the period ends, so that it
    # becomes active when the active key is one rotation period old.
    pytest.param(keys(), T0 + DAY, Wait(T0 + 30 * DAY - STAGING),
                 id="fresh-key-waits-until-its-successor-must-be-staged"),
    pytest.param(keys(), T0 + 30 * DAY - STAGING, Stage(2),
                 id="successor-staged-one-staging-period-before-the-period-ends"),
    pytest.param(keys(), T0 + 30 * DAY - STAGING - timedelta(seconds=1),
                 Wait(T0 + 30 * DAY - STAGING), id="not-staged-a-second-early"),
    pytest.param(keys(free_slots=()), T0 + 31 * DAY, Reserve(4),
                 id="due-without-a-slot-reserves-one-first"),
    pytest.param(keys(staged=2, staged_since=T0, free_slots=(3,)), T0 + STAGING / 2,
                 Wait(T0 + STAGING), id="staged-key-waits-out-its-staging"),
    pytest.param(keys(staged=2, staged_since=T0, free_slots=(3,)), T0 + STAGING,
                 Activate(2), id="staged-key-activates-after-staging"),
    pytest.param(keys(staged=2, staged_since=T0, free_slots=()), T0,
                 Reserve(4), id="slots-kept-while-staging"),
    pytest.param(keys(active=None, active_since=None, free_slots=(1, 2), next_number=3),
                 T0, Fill(1), id="first-key-is-active-at-once"),
    pytest.param(keys(active=None, active_since=None, free_slots=(), next_number=1),
                 T0, Reserve(1), id="first-key-needs-a-slot"),
    pytest.param(keys(free_slots=(2,)), T0, Reserve(4), id="missing-slot-reserved"),
    # A key writer made key 3 active by hand while key 2 was staged: key 2 is never
    # the active key now, so it waits for nothing; activating it at once only moves its
    # file out of staged/ (readers look in both) and frees the one staged place for the
    # active key's successor.
    pytest.param(keys(active=3, staged=2, staged_since=T0, free_slots=(), next_number=4),
                 T0 + STAGING / 2, Activate(2), id="staged-key-below-the-active-one-is-"
                 "activated-at-once"),
    pytest.param(keys(problem="two keys hold number 1"), T0 + 90 * DAY,
                 Hold("two keys hold number 1"), id="ambiguous-keys-are-never-rotated"),
])
def test_next_step(stored: NamespaceKeys, now: datetime, expected: Step) -> None:
    assert next_step(stored, POLICY, now=now, slots=2) == expected


def test_a_namespace_without_a_period_is_only_kept_in_slots() -> None:
    manual = Schedule(rotation_period=None, staging_period=STAGING)
    assert next_step(keys(), manual, now=T0 + 900 * DAY, slots=2) == Wait(None)
    assert next_rotation(keys(), manual) is None


# --- the model: steps applied to a namespace as the API server would hold them ---------

def apply(stored: NamespaceKeys, step: Step, *, now: datetime) -> NamespaceKeys:
    match step:
        case Reserve(number):
            return dataclasses.replace(stored, free_slots=(*stored.free_slots, number),
                                       next_number=number + 1)
        case Fill(number):
            rest = tuple(n for n in stored.free_slots if n != number)
            return dataclasses.replace(stored, active=number, active_since=now,
                                       free_slots=rest)
        case Stage(number):
            rest = tuple(n for n in stored.free_slots if n != number)
            return dataclasses.replace(stored, staged=number, staged_since=now,
                                       free_slots=rest)
        case Activate(number):
            return dataclasses.replace(stored, active=number, active_since=now,
                                       staged=None, staged_since=None)
    raise AssertionError(step)


@given(period_hours=st.integers(1, 24 * 90), staging_seconds=st.integers(10, 3600),
       slots=st.integers(1, 4), gaps=st.lists(st.integers(1, 48 * 3600), max_size=60))
def test_rotations_follow_the_schedule_without_running_ahead(
        period_hours: int, staging_seconds: int, slots: int, gaps: list[int]) -> None:
    schedule = Schedule(rotation_period=timedelta(hours=period_hours),
                        staging_period=timedelta(seconds=staging_seconds))
    stored = keys(active=None, active_since=None, free_slots=(), next_number=1)
    now = T0
    for gap in [0, *gaps]:  # the controller wakes at arbitrary times
        now += timedelta(seconds=gap)
        for _ in range(10):  # enough writes to settle one wake-up
            step = next_step(stored, schedule, now=now, slots=slots)
            if isinstance(step, Wait):
                assert step.until is None or step.until > now
                break
            before = stored
            stored = apply(stored, step, now=now)
            if isinstance(step, Activate):
                assert before.staged_since is not None
                assert now - before.staged_since >= schedule.staging_period
        else:
            raise AssertionError(f"no rest at {now}: {stored}")
        assert stored.active is not None
        ahead = len(stored.free_slots) + (stored.staged is not None)
        assert ahead == slots  # kept full, never beyond
        assert stored.active_since is not None
        overdue = now - stored.active_since
        # A key whose successor is due to be staged always has one by now.
        assert overdue < schedule.rotation_period - schedule.staging_period \
            or stored.staged is not None
        numbers = [n for n in (stored.active, stored.staged, *stored.free_slots) if n]
        assert len(numbers) == len(set(numbers))
        assert max(numbers) < stored.next_number


@given(period=st.integers(1, 90 * 86400), staging=st.integers(10, 180 * 86400),
       rotations=st.integers(1, 6))
def test_a_controller_on_time_replaces_each_key_when_it_is_one_period_old(
        period: int, staging: int, rotations: int) -> None:
    """The rotation period bounds how long a key is the one applications encrypt with:
    its successor is staged early enough to be active when the period ends. A staging
    period as long as the rotation period (or longer, when bounds conflict) stages the
    successor at once, and the key is active for the staging period."""
    schedule = Schedule(rotation_period=timedelta(seconds=period),
                        staging_period=timedelta(seconds=staging))
    stored = keys(active=None, active_since=None, free_slots=(), next_number=1)
    now, activations = T0, []
    while len(activations) <= rotations:
        step = next_step(stored, schedule, now=now, slots=2)
        if isinstance(step, Wait):
            assert step.until is not None and step.until > now
            now = step.until  # the controller wakes when it said it would
            continue
        stored = apply(stored, step, now=now)
        if isinstance(step, Fill | Activate):
            activations.append(now)
    lives = {b - a for a, b in itertools.pairwise(activations)}
    assert lives == {max(schedule.rotation_period, schedule.staging_period)}
    assert next_rotation(stored, schedule) == \
        stored.active_since + max(schedule.rotation_period, schedule.staging_period)


def test_the_next_rotation_is_when_the_staged_key_becomes_active() -> None:
    staged = keys(staged=2, staged_since=T0 + 40 * DAY, free_slots=(3,))
    assert next_rotation(staged, POLICY) == T0 + 40 * DAY + STAGING
    assert next_rotation(keys(), POLICY) == T0 + 30 * DAY


def test_a_staged_key_below_the_active_one_is_not_the_next_rotation() -> None:
    """Its activation replaces no key: the status announces the active key's own
    schedule, not a rotation that changes nothing."""
    behind = keys(active=3, active_since=T0 + DAY, staged=2, staged_since=T0,
                  free_slots=(), next_number=4)
    assert next_rotation(behind, POLICY) == T0 + 31 * DAY
