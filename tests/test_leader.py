"""Leader election for `serve --controller` (webhook/leader.py): the decisions on an
observed Lease record, the wire format, and the elector's loop against a fake of our own
LeaseApi (never a fake cluster)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from webhook.config import Settings
from webhook.keys import Keyring
from webhook.leader import (
    Claim,
    Controller,
    Held,
    LeaderElector,
    LeaseConflict,
    LeaseRecord,
    Observation,
    StoredLease,
    Timings,
    controller_identity,
    controller_namespace,
    decide,
    lease_object,
    next_attempt,
    observe,
    parse_lease,
    released,
    renewal_overdue,
    together,
)
from webhook.metrics import Metrics
from webhook.server import Runtime, _control
from webhook.store import KeyStore

from polling import wait_for

ME, OTHER = "keymount-7d9f-a", "keymount-7d9f-b"
WALL = datetime(2026, 12, 2, 13, 0, 0, 123456, tzinfo=UTC)
T = Timings()  # 15 s lease, 10 s renew deadline, 2 s retry


def record(holder: str = OTHER, *, renewed: datetime = WALL, duration: int = 15,
           transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder, duration, WALL - timedelta(minutes=5), renewed, transitions)


# --- the decisions ----------------------------------------------------------------------

DECISIONS = [
    # (what we observed: None = no Lease, else (record, seconds since we first saw it)),
    # what we decide
    pytest.param(None, Claim(LeaseRecord(ME, 15, WALL, WALL, 0), renewal=False),
                 id="no-lease-create-it"),
    pytest.param((record(), 3.0), Held(OTHER, until=1000.0 - 3.0 + 15),
                 id="held-by-other-not-expired"),
    pytest.param((record(), 14.9), Held(OTHER, until=1000.0 - 14.9 + 15),
                 id="held-by-other-just-before-expiry"),
    pytest.param((record(), 15.0), Claim(LeaseRecord(ME, 15, WALL, WALL, 4), renewal=False),
                 id="held-by-other-expired-take-over-transitions-plus-one"),
    pytest.param((record(""), 0.0), Claim(LeaseRecord(ME, 15, WALL, WALL, 4), renewal=False),
                 id="released-take-at-once"),
    pytest.param((record(duration=0), 0.0),
                 Claim(LeaseRecord(ME, 15, WALL, WALL, 4), renewal=False),
                 id="no-duration-is-expired"),
    pytest.param((record(ME, renewed=WALL - timedelta(seconds=2)), 2.0),
                 Claim(LeaseRecord(ME, 15, WALL - timedelta(minutes=5), WALL, 3),
                       renewal=True),
                 id="ours-renew-keeping-acquire-time-and-transitions"),
    pytest.param((record(ME), 60.0),
                 Claim(LeaseRecord(ME, 15, WALL - timedelta(minutes=5), WALL, 3),
                       renewal=True),
                 id="ours-even-after-a-restart-renew"),
    # Clock skew: the holder's clock is an hour behind ours. Its renewTime looks long
    # expired, but we saw the record change a second ago: it is held.
    pytest.param((record(renewed=WALL - timedelta(hours=1)), 1.0),
                 Held(OTHER, until=1000.0 - 1.0 + 15), id="skew-holder-clock-behind-still-held"),
    # ... and an hour ahead: its renewTime is in our future, but nothing changed for
    # 16 s of our clock: the holder is gone.
    pytest.param((record(renewed=WALL + timedelta(hours=1)), 16.0),
                 Claim(LeaseRecord(ME, 15, WALL, WALL, 4), renewal=False),
                 id="skew-holder-clock-ahead-still-expires"),
]


@pytest.mark.parametrize(("observed", "expected"), DECISIONS)
def test_a_candidate_decides_on_the_record_and_when_it_saw_it_change(observed, expected):
    now = 1000.0
    observation = None if observed is None else Observation(observed[0], now - observed[1])
    assert decide(observation, identity=ME, now=now, wall=WALL, timings=T) == expected


@pytest.mark.parametrize(("change", "restarts"), [
    pytest.param({}, False, id="same-record-keeps-the-time"),
    pytest.param({"renewed": WALL + timedelta(seconds=2)}, True, id="renewal-restarts-term"),
    pytest.param({"holder": ME}, True, id="new-holder-restarts-term"),
    pytest.param({"transitions": 4}, True, id="any-change-restarts-term"),
])
def test_a_record_is_timed_from_when_it_was_first_seen_as_it_is(change, restarts):
    first = observe(None, record(), now=10.0)
    again = observe(first, record(**change), now=14.0)
    assert again.seen_at == (14.0 if restarts else 10.0)


def test_the_remote_timestamps_never_decide_only_our_observation_does():
    # The same record read over 20 s of our clock: held for 15 s, then taken, whatever
    # renewTime says (here: a time far in the future of the reader).
    future = record(renewed=WALL + timedelta(days=1))
    observation = None
    verdicts = []
    for now in (100.0, 105.0, 114.0, 115.0, 120.0):
        observation = observe(observation, future, now=now)
        verdicts.append(type(decide(observation, identity=ME, now=now, wall=WALL,
                                    timings=T)).__name__)
    assert verdicts == ["Held", "Held", "Held", "Claim", "Claim"]


@pytest.mark.parametrize(("since_renewal", "overdue"), [
    pytest.param(2.0, False, id="just-renewed"),
    pytest.param(9.99, False, id="before-deadline"),
    pytest.param(10.0, True, id="at-deadline"),
    pytest.param(30.0, True, id="long-past"),
])
def test_a_leader_stops_leading_at_the_renew_deadline(since_renewal, overdue):
    assert renewal_overdue(100.0, now=100.0 + since_renewal, timings=T) is overdue


def test_the_leader_gives_up_before_any_follower_may_take_over():
    # A follower that saw the last renewal at once may take the Lease lease_duration later;
    # the leader stopped renew_deadline after sending it: never both leading.
    assert T.renew_deadline < T.lease_duration


@pytest.mark.parametrize(("held_until", "spread", "delay"), [
    pytest.param(None, 0.0, 2.0, id="retry-period"),
    pytest.param(None, 0.99, 2.0 * (1 + 0.2 * 0.99), id="spread-at-most-a-fifth-more"),
    pytest.param(1000.5, 0.5, 0.55, id="wake-when-the-holder-expires"),
    pytest.param(999.0, 0.5, 0.05, id="already-expired-try-now"),
])
def test_a_follower_tries_again_each_retry_period_or_when_the_lease_runs_out(
        held_until, spread, delay):
    held = None if held_until is None else Held(OTHER, held_until)
    assert next_attempt(held, now=1000.0, timings=T, spread=spread) == pytest.approx(delay)


def test_a_released_lease_has_no_holder_and_keeps_its_transitions():
    assert released(record(ME, transitions=7), wall=WALL) == LeaseRecord("", 1, WALL, WALL, 7)


@pytest.mark.parametrize("timings", [
    pytest.param({"lease_duration": 10.0, "renew_deadline": 10.0}, id="lease-not-over-renew"),
    pytest.param({"renew_deadline": 2.0, "retry_period": 2.0}, id="renew-not-over-retry"),
    pytest.param({"retry_period": 0.0}, id="no-retry-period"),
])
def test_timings_that_could_give_two_leaders_are_refused(timings):
    with pytest.raises(ValueError, match="lease duration > renew deadline"):
        Timings(**timings)


def test_a_lease_duration_the_lease_cannot_hold_is_refused():
    # Followers read leaseDurationSeconds, a whole number: 15.5 would be read as 15.
    with pytest.raises(ValueError, match="whole seconds"):
        Timings(lease_duration=15.5)


# --- the wire ---------------------------------------------------------------------------

def test_a_lease_written_reads_back_as_the_same_record():
    body = lease_object(record(ME), name="keymount-controller", namespace="keymount",
                        resource_version="42")
    assert body["spec"]["renewTime"] == "2026-12-02T13:00:00.123456Z"
    assert body["metadata"] == {"name": "keymount-controller", "namespace": "keymount",
                                "resourceVersion": "42"}
    assert parse_lease(body) == StoredLease(record(ME), "42")


def test_a_create_names_no_resource_version():
    body = lease_object(record(ME), name="n", namespace="ns", resource_version=None)
    assert "resourceVersion" not in body["metadata"]


@pytest.mark.parametrize("spec", [
    pytest.param(None, id="no-spec"),
    pytest.param({"holderIdentity": None, "leaseDurationSeconds": None}, id="nulls"),
    pytest.param({"holderIdentity": 5, "leaseDurationSeconds": "15",
                  "renewTime": "yesterday", "leaseTransitions": True}, id="wrong-types"),
])
def test_a_lease_edited_into_nonsense_reads_as_released_and_expired(spec):
    stored = parse_lease({"metadata": {"resourceVersion": "7"}, "spec": spec})
    assert stored == StoredLease(LeaseRecord(), "7")
    observation = Observation(stored.record, 100.0)
    assert isinstance(decide(observation, identity=ME, now=100.0, wall=WALL, timings=T),
                      Claim)


# --- where and who --------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "environ", "service_account", "expected"), [
    pytest.param("ops", {"POD_NAMESPACE": "pod"}, "sa", "ops", id="flag-first"),
    pytest.param(None, {"POD_NAMESPACE": "pod"}, "sa", "pod", id="then-pod-namespace"),
    pytest.param(None, {}, "sa", "sa", id="then-service-account"),
    pytest.param(None, {"POD_NAMESPACE": " "}, None, "keymount", id="else-keymount"),
])
def test_the_lease_lives_in_keymounts_namespace(flag, environ, service_account, expected):
    assert controller_namespace(flag, environ,
                                service_account_namespace=service_account) == expected


@pytest.mark.parametrize(("environ", "expected"), [
    pytest.param({"POD_NAME": "keymount-5f7c-x2"}, "keymount-5f7c-x2", id="pod-name"),
    pytest.param({}, "node-1_4242", id="host-and-pid"),
])
def test_a_candidate_is_named_by_its_pod_else_host_and_pid(environ, expected):
    assert controller_identity(environ, hostname="node-1", pid=4242) == expected


# --- the elector, against a fake of our own LeaseApi ----------------------------------

class FakeLeases:
    """LeaseApi in memory, with the API server's optimistic concurrency: a write names
    the resourceVersion it read, and a stale one is a conflict."""

    where = "keymount/keymount-controller"

    def __init__(self) -> None:
        self.stored: StoredLease | None = None
        self.version = 0
        self.failing = False  # every call raises, as with the API server unreachable
        self.hanging = False  # every call blocks, as on a dead connection
        self.writes: list[tuple[float, LeaseRecord]] = []

    async def _call(self) -> None:
        await asyncio.sleep(0)
        if self.hanging:
            await asyncio.Future()
        if self.failing:
            raise ConnectionRefusedError("API server unreachable")

    def _store(self, record: LeaseRecord) -> StoredLease:
        self.version += 1
        self.stored = StoredLease(record, str(self.version))
        self.writes.append((time.monotonic(), record))
        return self.stored

    async def read(self) -> StoredLease | None:
        await self._call()
        return self.stored

    async def create(self, record: LeaseRecord) -> StoredLease:
        await self._call()
        if self.stored is not None:
            raise LeaseConflict("409")
        return self._store(record)

    async def replace(self, record: LeaseRecord, *, resource_version: str) -> StoredLease:
        await self._call()
        if self.stored is None or self.stored.resource_version != resource_version:
            raise LeaseConflict("409")
        return self._store(record)

    @property
    def holder(self) -> str | None:
        return None if self.stored is None else self.stored.record.holder


# About the production ratios (15 : 10 : 2), scaled down so a test takes seconds; the
# Lease holds its duration in whole seconds.
FAST = Timings(lease_duration=2.0, renew_deadline=1.3, retry_period=0.25)


class Work:
    """The leader's work, recording when it started and when it was cancelled."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.cancelled: list[float] = []

    async def __call__(self) -> None:
        self.started.append(time.monotonic())
        try:
            await asyncio.Future()
        except asyncio.CancelledError:
            self.cancelled.append(time.monotonic())
            raise


def elector(leases: FakeLeases, identity: str, gauge: list[int] | None = None
            ) -> LeaderElector:
    return LeaderElector(leases, identity=identity, timings=FAST,
                         on_change=lambda leading: gauge.append(int(leading))
                         if gauge is not None else None)


async def test_the_work_is_cancelled_when_renewals_fail_past_the_renew_deadline():
    leases, work, gauge = FakeLeases(), Work(), []
    candidate = elector(leases, ME, gauge)
    stop = asyncio.Event()
    running = asyncio.create_task(candidate.run(work, stop=stop))
    await wait_for(lambda: work.started, what="the leader's work started")
    await wait_for(lambda: len(leases.writes) >= 3, what="a few renewals")
    leases.failing = True
    last_renewal = leases.writes[-1][0]
    await wait_for(lambda: work.cancelled, timeout=3 * FAST.renew_deadline,
                   what="the work cancelled")
    # Not before the deadline (a renewal may still succeed), promptly after it, and
    # before any follower could take the Lease (lease_duration after that renewal).
    waited = work.cancelled[0] - last_renewal
    assert FAST.renew_deadline - FAST.retry_period <= waited < FAST.lease_duration, waited
    assert gauge == [1, 0] and not candidate.leading
    assert leases.holder == ME  # nothing could be written, nothing was released
    stop.set()
    await asyncio.wait_for(running, 5)


async def test_a_hung_api_call_does_not_keep_a_leader_past_the_renew_deadline():
    leases, work = FakeLeases(), Work()
    stop = asyncio.Event()
    running = asyncio.create_task(elector(leases, ME).run(work, stop=stop))
    await wait_for(lambda: work.started, what="the leader's work started")
    leases.hanging = True
    hung_at = time.monotonic()
    await wait_for(lambda: work.cancelled, timeout=3 * FAST.renew_deadline,
                   what="the work cancelled")
    assert work.cancelled[0] - hung_at < FAST.lease_duration
    stop.set()
    await asyncio.wait_for(running, 5)


async def test_of_two_candidates_one_leads_and_a_stop_hands_over_at_once():
    leases, works = FakeLeases(), {ME: Work(), OTHER: Work()}
    stops = {name: asyncio.Event() for name in works}
    candidates = {name: elector(leases, name) for name in works}
    tasks = {name: asyncio.create_task(candidates[name].run(works[name], stop=stops[name]))
             for name in works}
    await wait_for(lambda: any(c.leading for c in candidates.values()),
                   what="a leader")
    await asyncio.sleep(3 * FAST.retry_period)  # time for a second leader to appear, wrongly
    leaders = [name for name, c in candidates.items() if c.leading]
    assert len(leaders) == 1 and leases.holder == leaders[0]
    leader = leaders[0]
    follower = OTHER if leader == ME else ME
    transitions = leases.stored.record.transitions

    stops[leader].set()
    stopped_at = time.monotonic()
    await asyncio.wait_for(tasks[leader], 5)
    # Cancelled first, then released: the follower cannot start while the work runs.
    assert works[leader].cancelled and leases.writes[-1][1].holder == ""
    assert works[leader].cancelled[0] <= leases.writes[-1][0]
    await wait_for(lambda: candidates[follower].leading, timeout=FAST.lease_duration,
                   what="the follower leading")
    # Released: taken at the follower's next attempt, not a lease duration later.
    assert time.monotonic() - stopped_at < FAST.retry_period * (1 + FAST.jitter) + 0.2
    assert leases.holder == follower
    assert leases.stored.record.transitions == transitions + 1
    stops[follower].set()
    await asyncio.wait_for(tasks[follower], 5)


async def test_a_follower_takes_a_dead_leaders_lease_after_the_lease_duration():
    leases, works = FakeLeases(), {ME: Work(), OTHER: Work()}
    first = elector(leases, ME)
    stop = asyncio.Event()
    leading = asyncio.create_task(first.run(works[ME], stop=stop))
    await wait_for(lambda: first.leading, what="the first leading")
    second = elector(leases, OTHER)
    following = asyncio.create_task(second.run(works[OTHER], stop=stop))
    await asyncio.sleep(2 * FAST.retry_period)
    assert not second.leading
    leading.cancel()  # dies without a word: no release
    with pytest.raises(asyncio.CancelledError):
        await leading
    last_renewal = leases.writes[-1][0]
    assert leases.holder == ME
    await wait_for(lambda: second.leading, timeout=3 * FAST.lease_duration,
                   what="the follower leading")
    took = time.monotonic() - last_renewal
    assert FAST.lease_duration <= took < FAST.lease_duration + 2 * FAST.retry_period, took
    assert leases.holder == OTHER and works[OTHER].started
    stop.set()
    await asyncio.wait_for(following, 5)


async def test_work_that_fails_makes_the_leader_step_down_and_campaign_again():
    leases, gauge = FakeLeases(), []
    attempts: list[float] = []

    async def failing() -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("reconcile broke")
    stop = asyncio.Event()
    running = asyncio.create_task(elector(leases, ME, gauge).run(failing, stop=stop))
    await wait_for(lambda: len(attempts) >= 2, timeout=5, what="the work started again")
    stop.set()
    await asyncio.wait_for(running, 5)
    # Each failure released the Lease (another replica could have taken it) before the
    # next term began.
    assert [r.holder for _, r in leases.writes][:3] == [ME, "", ME]
    assert gauge[:4] == [1, 0, 1, 0]
    # Not at once: followers get two retry periods to take over, and a failing work
    # does not loop on the API server.
    assert attempts[1] - attempts[0] >= 2 * FAST.retry_period


async def test_with_no_work_registered_the_leader_holds_the_lease():
    leases, gauge = FakeLeases(), []
    controller = Controller(elector(leases, ME, gauge))
    stop = asyncio.Event()
    running = asyncio.create_task(controller.run(stop=stop))
    await wait_for(lambda: len(leases.writes) >= 4, what="renewals")
    assert gauge == [1] and {r.holder for _, r in leases.writes} == {ME}
    stop.set()
    await asyncio.wait_for(running, 5)
    assert leases.holder == "" and gauge == [1, 0]


async def test_registered_work_runs_together_and_one_failing_cancels_the_others():
    other = Work()

    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("broke")
    with pytest.raises(ExceptionGroup):
        await together([other, failing])()
    assert other.started and other.cancelled


async def test_a_write_that_loses_the_race_leaves_the_candidate_following():
    leases = FakeLeases()
    leases._store(LeaseRecord(OTHER, 15, WALL, WALL, 0))
    candidate = elector(leases, ME)
    # Someone else writes between our read and our write.
    real_replace = leases.replace

    async def raced(record, *, resource_version):
        leases._store(LeaseRecord(OTHER, 15, WALL, WALL + timedelta(seconds=1), 0))
        return await real_replace(record, resource_version=resource_version)
    leases.replace = raced
    candidate.observation = Observation(leases.stored.record, time.monotonic() - 60)
    assert await candidate._attempt() is None
    assert leases.holder == OTHER and not candidate.leading


# --- the CLI --------------------------------------------------------------------------

def test_controller_needs_the_cluster_key_source(tmp_path, capfd):
    from webhook.cli import main
    assert main(["serve", "--keys-from", str(tmp_path), "--controller"]) == 2
    assert "--controller needs the Kubernetes key source" in capfd.readouterr().err


@pytest.mark.parametrize(("worker_index", "campaigns"), [
    pytest.param(None, True, id="single-process"),
    pytest.param(0, True, id="worker-0"),
    pytest.param(1, False, id="worker-1"),
])
def test_with_workers_only_worker_0_campaigns(monkeypatch, worker_index, campaigns):
    from webhook.cli import build_controller, build_parser
    from webhook.cluster import KubernetesKeySource
    from webhook.config import Settings
    from webhook.metrics import Metrics
    from webhook.store import KeyStore
    monkeypatch.setenv("POD_NAME", "keymount-abc")
    monkeypatch.setenv("POD_NAMESPACE", "keymount-system")
    args = build_parser().parse_args(["serve", "--controller"])
    args.worker_index = worker_index
    source = KubernetesKeySource(client.ApiClient(), settings=Settings(), store=KeyStore())
    controller = build_controller(args, source=source, metrics=Metrics())
    assert (controller is not None) is campaigns
    if controller is not None:
        assert controller.elector.identity == "keymount-abc"
        assert controller.elector.leases.where == "keymount-system/keymount-controller"
        # The namespaces the webhooks skip are none of the controller's to rotate.
        assert controller.work[0].__self__.unmanaged == {"kube-system", "keymount-system"}


# --- beside the server ----------------------------------------------------------------

class NoKeys:
    """A key source with nothing in it: the server's election needs only `loaded`."""

    async def load(self) -> None:
        pass

    async def run(self) -> None:
        pass

    async def confirm(self, namespace: str) -> Keyring:
        return Keyring(namespace)


async def test_the_server_campaigns_once_keys_are_loaded_and_releases_on_stop():
    leases, store = FakeLeases(), KeyStore()
    metrics = Metrics(store)
    candidate = elector(leases, ME)
    candidate.on_change = lambda leading: metrics.leader.set(int(leading))
    runtime = Runtime(settings=Settings(), store=store, source=NoKeys(), metrics=metrics,
                      controller=Controller(candidate))
    stop = asyncio.Event()
    task = asyncio.create_task(_control(runtime, stop))
    for _ in range(20):  # turns of the loop, no time: an attempt would be made by now
        await asyncio.sleep(0)
    assert leases.writes == []  # the key cache is not loaded yet
    runtime.loaded.set()
    await wait_for(lambda: metrics.registry.get_sample_value("keymount_leader") == 1,
                   what="leading")
    assert leases.holder == ME
    stop.set()
    await asyncio.wait_for(task, 5)
    assert leases.holder == ""
    assert metrics.registry.get_sample_value("keymount_leader") == 0
