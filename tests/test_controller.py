"""The controller's loop parts: the due-time queue and the write budget."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from webhook.controller import Queue, WriteBudget
from webhook.rotation import Hold, Wait

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_the_queue_hands_out_namespaces_when_due_earliest_first() -> None:
    clock = Clock()
    queue = Queue(clock=clock)
    queue.set("b", T0 + timedelta(seconds=20))
    queue.set("a", T0 + timedelta(seconds=10))
    queue.set("later", T0 + timedelta(days=90))
    assert queue.take_due() == []
    clock.now = T0 + timedelta(seconds=30)
    assert queue.take_due() == ["a", "b"]
    assert queue.take_due() == [] and len(queue) == 1


def test_a_poke_moves_a_namespace_earlier_never_later() -> None:
    clock = Clock()
    queue = Queue(clock=clock)
    queue.set("a", T0 + timedelta(hours=1))
    queue.poke("a", T0 + timedelta(hours=2))
    assert queue.due_at("a") == T0 + timedelta(hours=1)
    queue.poke("a")
    assert queue.take_due() == ["a"]
    clock.now = T0 + timedelta(hours=3)
    assert queue.take_due() == []  # the superseded entry is not handed out again


def test_a_change_that_arrives_while_a_namespace_is_handled_is_not_lost() -> None:
    # The policy watches deliver while the leader handles a namespace (its reads and
    # writes run in threads): the handling ends by setting the next due time from what
    # it read, which must not overwrite the poke of a change it did not see.
    clock = Clock()
    queue = Queue(clock=clock)
    queue.set("a", T0)
    assert queue.pop_due() == "a"  # being handled
    queue.poke("a")  # a ClusterKeyPolicy arrives meanwhile
    queue.set("a", T0 + timedelta(days=30))  # the handling's result, from older state
    queue.done("a")
    assert queue.due_at("a") == T0  # handled again at once
    assert queue.pop_due() == "a"
    queue.set("a", T0 + timedelta(days=30))
    queue.done("a")  # nothing arrived this time: the result stands
    assert queue.due_at("a") == T0 + timedelta(days=30)


def test_a_staged_namespace_goes_before_a_wave_that_fell_due_earlier() -> None:
    # 10,000 namespaces due at T0 take an hour to stage at the write budget; a key staged
    # among the first must be activated when its staging ends, not after the wave.
    clock = Clock()
    queue = Queue(clock=clock)
    for n in range(1000):
        queue.set(f"wave-{n}", T0)
    queue.set("staged", T0 + timedelta(minutes=2), urgent=True)
    clock.now = T0 + timedelta(minutes=1)
    assert queue.pop_due() == "wave-0"  # not due yet: the wave goes on
    clock.now = T0 + timedelta(minutes=2)
    assert queue.pop_due() == "staged"
    assert queue.pop_due() == "wave-1"
    queue.set("staged", T0 + timedelta(minutes=5), urgent=True)
    queue.poke("staged")  # a change moves it earlier and keeps it urgent
    assert queue.pop_due() == "staged"


def test_superseded_entries_do_not_pile_up() -> None:
    queue = Queue(clock=Clock())
    for minute in range(10_000):
        queue.set("a", T0 + timedelta(minutes=10_000 - minute))
    assert sum(map(len, queue._heaps.values())) < 200  # the bound is the point


async def test_waiting_ends_when_the_earliest_namespace_is_due() -> None:
    queue = Queue()
    queue.set("soon", datetime.now(UTC) + timedelta(milliseconds=50))
    queue.set("later", datetime.now(UTC) + timedelta(days=1))
    await asyncio.wait_for(queue.wait(), 5)
    assert queue.take_due() == ["soon"]


async def test_waiting_with_nothing_due_ends_only_on_a_change() -> None:
    queue = Queue()
    waiting = asyncio.create_task(queue.wait())
    done, _ = await asyncio.wait({waiting}, timeout=0.2)
    assert not done  # no timer: nothing is due
    queue.poke("new")
    await asyncio.wait_for(waiting, 5)
    assert queue.take_due() == ["new"]


@pytest.mark.parametrize(("rate", "burst", "writes", "seconds"), [
    pytest.param(5.0, 5, 5, 0.0, id="a-burst-goes-at-once"),
    pytest.param(5.0, 5, 25, 4.0, id="beyond-the-burst-at-the-rate"),
    pytest.param(20.0, 1, 101, 5.0, id="no-burst"),
])
async def test_the_write_budget_spreads_writes(rate: float, burst: int, writes: int,
                                               seconds: float) -> None:
    now = [0.0]

    async def sleep(delay: float) -> None:
        now[0] += delay

    budget = WriteBudget(rate, burst, clock=lambda: now[0], sleep=sleep)
    for _ in range(writes):
        await budget.take()
    assert now[0] == pytest.approx(seconds)


def test_the_key_cache_wakes_the_controller_only_for_namespaces_that_changed() -> None:
    from webhook.config import Settings
    from webhook.key_secrets import parse_key_secret
    from webhook.store import KeyStore

    from builders import key_secret, random_key

    def record(name: str, namespace: str, version: str) -> object:
        secret = key_secret(name, random_key(), namespace=namespace, index=1)
        secret["metadata"]["resourceVersion"] = version
        return parse_key_secret(secret, settings=Settings())

    store, woken = KeyStore(), []
    store.listeners.append(woken.append)
    a, b = record("k1", "a", "5"), record("k1", "b", "6")
    store.replace_all([a, b], version="6")
    assert sorted(woken) == ["a", "b"]
    woken.clear()
    store.replace_all([a, b], version="9")  # a resync's re-list: nothing new
    assert woken == []
    store.put(record("k2", "b", "10"))
    assert woken == ["b"]


# --- reconcile: the cache may only say "nothing is due" ------------------------------

class CountingApi:
    """A fake of our own ControllerApi: one namespace whose keys never change, the
    live reads counted and every write recorded."""

    def __init__(self, keyring) -> None:
        self.ring, self.reads, self.writes = keyring, 0, []

    def keyring(self, namespace):
        self.reads += 1
        return self.ring

    def reserve_slot(self, namespace, number):
        self.writes.append(("reserve", number))
        return "reserved"

    def fill_slot(self, namespace, slot, key):
        self.writes.append(("fill", slot.index))

    def stage_slot(self, namespace, slot, key):
        self.writes.append(("stage", slot.index))

    def activate_staged(self, namespace, staged):
        self.writes.append(("activate", staged.index))

    def write_policy_status(self, namespace, name, status, *, resource_version=None):
        self.writes.append(("status", name))
        return True


def rotated_at(when: str, *, slots: tuple[int, ...] = (2, 3)):
    from builders import key_secret, keyring_of, random_key, slot_secret
    return keyring_of(key_secret("keymount-key-1", random_key(), index=1,
                                 annotations={"keymount.io/activated-at": when}),
                      *(slot_secret(n) for n in slots))


@pytest.mark.parametrize(("cached", "reads", "writes"), [
    pytest.param(rotated_at("2026-01-01T00:00:00Z"), 0, [], id="cache-says-not-due-no-read"),
    pytest.param(rotated_at("2025-01-01T00:00:00Z"), 6, [("stage", 2)] * 6,
                 id="cache-says-due-decided-again-live"),
    pytest.param(None, 1, [], id="no-cache-reads-live"),
])
async def test_the_cache_only_spares_reads_when_nothing_is_due(cached, reads, writes) -> None:
    from webhook.controller import reconcile
    from webhook.rotation import Schedule, Wait

    # The live keys agree with the cache, or say the key is due (and stay so: the fake
    # never changes, so every step is decided again and made again, up to the bound).
    api = CountingApi(cached or rotated_at("2026-01-01T00:00:00Z"))
    schedule = Schedule(rotation_period=timedelta(days=30),
                        staging_period=timedelta(minutes=2))
    result, _ = await reconcile(api, "shop", schedule, slots=2,
                                budget=WriteBudget(1000.0, 1000),
                                clock=lambda: T0 + timedelta(days=1), cached=cached)
    assert api.reads == reads and api.writes == writes
    assert isinstance(result, Wait)


# --- restart: rolling ----------------------------------------------------------------

class RollingApi(CountingApi):
    """Pods of two Deployments and a bare Pod; workloads as the API server holds them."""

    def __init__(self, keyring, pods, workloads, *, forged=(), failing=()) -> None:
        super().__init__(keyring)
        self.pods, self.workloads = pods, workloads
        self.forged, self.failing = set(forged), set(failing)

    def backend_pods(self, namespace):
        return self.pods

    def controller_of(self, namespace, pod, *, owners=None):
        # KeyClient checks each link against the API server (tests/test_cluster_client.py);
        # here every reference is genuine but `forged`.
        from webhook.lifecycle import controller_ref
        kind, name, _ = controller_ref(pod)
        if name in self.forged:
            return None
        return ("Deployment", name.rsplit("-", 1)[0]) if kind == "ReplicaSet" else (kind, name)

    def read_workload(self, namespace, kind, name):
        from webhook.cluster import ClusterError
        if (kind, name) not in self.workloads:
            raise ClusterError(f"{kind.lower()}s.apps {name!r} not found")
        return self.workloads[(kind, name)]

    def restart_workload(self, namespace, kind, name, *, at, resource_version=None):
        from webhook.cluster import ClusterError
        if (kind, name) in self.failing:
            raise ClusterError("the server is currently unable to handle the request")
        self.writes.append(("restart", kind, name, at))
        return True


def running_pod(name: str, owner: str | None, secrets: list[str]) -> dict:
    import json as json_module
    meta = {"name": name, "namespace": "shop", "annotations": {
        "keymount.io/status": json_module.dumps([{"secret": s} for s in secrets])}}
    if owner:
        meta["ownerReferences"] = [{"kind": "ReplicaSet", "name": owner, "controller": True}]
    return {"metadata": meta, "status": {"phase": "Running"}}


def deployment(restarted_at: str | None = None) -> dict:
    annotations = {"kubectl.kubernetes.io/restartedAt": restarted_at} if restarted_at else {}
    return {"spec": {"template": {"metadata": {"annotations": annotations}}}}


@pytest.mark.parametrize(("restarted_at", "rolled"), [
    pytest.param(None, True, id="never-restarted-is-rolled"),
    pytest.param("2026-01-01T00:00:00Z", True, id="restarted-before-activation-is-rolled"),
    pytest.param("2026-01-03T00:00:00Z", False, id="restarted-since-is-left-alone"),
])
async def test_rolling_restarts_only_workloads_whose_pods_lack_the_active_key(restarted_at, rolled):
    from webhook.controller import roll_workloads

    ring = rotated_at("2026-01-02T00:00:00Z")  # key 1 activated on Jan 2
    pods = [running_pod("old-abc12-x", "old-abc12", []),  # started without key 1
            running_pod("new-def34-y", "new-def34", ["keymount-key-1"]),
            running_pod("bare", None, [])]  # no workload to roll: never touched
    api = RollingApi(ring, pods, {("Deployment", "old"): deployment(restarted_at),
                                  ("Deployment", "new"): deployment()})
    taken = []

    async def take():
        taken.append(1)
    rolled_now = (await roll_workloads(api, ring, now=T0 + timedelta(days=3),
                                       take=take)).restarted
    assert rolled_now == ((("Deployment", "old"),) if rolled else ())
    assert len(taken) == len(rolled_now)  # every restart went through the budget
    assert [w[:3] for w in api.writes] == [("restart", "Deployment", "old")] * rolled


# --- status ----------------------------------------------------------------------------

def test_a_clusterkeypolicy_is_ready_only_while_none_of_its_namespaces_is_held() -> None:
    from webhook.controller import Summary, cluster_policy_status

    fine = Summary(("baseline",), None, 2, T0, T0 + timedelta(days=30))
    held = Summary(("baseline",), "two keys hold number 1", 1, T0 - timedelta(days=1), None)
    status = cluster_policy_status([fine, held], generation=3, now=T0, previous={})
    assert status["keys"] == 3 and status["observedGeneration"] == 3
    assert status["lastRotation"] == "2026-01-01T00:00:00Z"
    assert status["nextRotation"] == "2026-01-31T00:00:00Z"
    [ready] = status["conditions"]
    assert ready["status"] == "False" and "two keys hold number 1" in ready["message"]
    later = cluster_policy_status([fine], generation=3, now=T0 + timedelta(hours=1),
                                  previous=status)
    assert later["conditions"][0]["status"] == "True"
    assert later["conditions"][0]["lastTransitionTime"] == "2026-01-01T01:00:00Z"
    again = cluster_policy_status([fine], generation=3, now=T0 + timedelta(hours=2),
                                  previous=later)
    assert again == later  # nothing changed: the same status, nothing to write


def test_a_keypolicy_condition_keeps_its_transition_time_while_its_status_stays() -> None:
    from webhook.controller import policy_status
    from webhook.rotation import NamespaceKeys, Schedule

    keys = NamespaceKeys("shop", active=1, active_since=T0, staged=None, staged_since=None,
                         free_slots=(2, 3), next_number=4)
    schedule = Schedule(rotation_period=timedelta(days=30), staging_period=timedelta(minutes=2))
    first = policy_status(keys, Wait(T0 + timedelta(days=30)), schedule=schedule,
                          valid_keys=1, generation=1, now=T0, previous={})
    assert first["activeKey"] == 1 and first["stagedKey"] is None
    assert first["nextRotation"] == "2026-01-31T00:00:00Z"
    stored = {k: v for k, v in first.items() if v is not None}  # as the merge patch left it
    later = policy_status(keys, Wait(T0 + timedelta(days=30)), schedule=schedule,
                          valid_keys=1, generation=1, now=T0 + timedelta(days=1),
                          previous=stored)
    assert later == first
    held = policy_status(keys, Hold("invalid key"), schedule=schedule, valid_keys=1,
                         generation=1, now=T0 + timedelta(days=2), previous=stored)
    ready = next(c for c in held["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["lastTransitionTime"] == "2026-01-03T00:00:00Z"


async def test_a_policy_watch_that_fails_is_retried_and_never_ends_the_leaders_work() -> None:
    # A replica without the rights to list policies (or without the CRDs) must keep the
    # Lease and keep trying, not step down and flap (seen on the e2e bed).
    from kubernetes.client.rest import ApiException

    from webhook.controller import KeyController
    from webhook.metrics import Metrics
    from webhook.policystore import PolicyStore, parse_stored_keypolicy
    from webhook.store import KeyStore
    from webhook.watch import ListWatch

    lists = []

    class Forbidden:
        def list_object_for_all_namespaces(self, **kwargs):
            lists.append(kwargs)
            raise ApiException(status=403, reason="Forbidden")

    async def quick(delay: float) -> None:
        await asyncio.sleep(0.001)

    policies = PolicyStore()
    controller = KeyController(
        CountingApi(None), keys=KeyStore(), policies=policies,
        watches=lambda: [ListWatch(Forbidden(), singular="object", selector="",
                                   scopes=[None], parse=parse_stored_keypolicy,
                                   sink=policies.keypolicies, sleep=quick)],
        slots=2, budget=WriteBudget(10.0, 20), metrics=Metrics())
    work = asyncio.create_task(controller.run())
    await asyncio.sleep(0.3)
    assert not work.done() and len(lists) >= 3  # still leading, still trying
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work


@pytest.mark.parametrize(("won", "reported"), [(True, 1), (False, 0)],
                         ids=["write-made-is-reported", "race-lost-is-not"])
async def test_only_a_write_the_api_server_took_is_reported(won, reported) -> None:
    # Events and keymount_rotations_total say what keymount did, not what it tried.
    from webhook.controller import reconcile
    from webhook.rotation import Schedule

    class Racing(CountingApi):
        def stage_slot(self, namespace, slot, key):
            super().stage_slot(namespace, slot, key)
            return slot if won else None  # None: another writer changed the slot first

    api, steps = Racing(rotated_at("2025-01-01T00:00:00Z")), []
    await reconcile(api, "shop", Schedule(rotation_period=timedelta(days=30),
                                          staging_period=timedelta(minutes=2)),
                    slots=2, budget=WriteBudget(1000.0, 1000),
                    clock=lambda: T0 + timedelta(days=1),
                    on_step=lambda keyring, step: steps.append(step))
    assert len(steps) == reported * len(api.writes) and api.writes


def test_where_a_bound_replaced_a_declared_period_the_keypolicy_status_says_so() -> None:
    from webhook.controller import policy_status
    from webhook.rotation import NamespaceKeys, Schedule

    keys = NamespaceKeys("shop", active=1, active_since=T0, staged=None, staged_since=None,
                         free_slots=(2, 3), next_number=4)
    schedule = Schedule(rotation_period=timedelta(days=90), staging_period=timedelta(days=90))
    adjusted = ("KeyPolicy 'rotation' gives rotationPeriod 3650d; maxRotationPeriod 90d of "
                "ClusterKeyPolicy 'baseline' applies",)
    status = policy_status(keys, Wait(T0), schedule=schedule, valid_keys=1, generation=1,
                           now=T0, previous={}, adjusted=adjusted)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "BoundsApplied")
    assert adjusted[0] in ready["message"]
    # On schedule the successor is active when the key is one (bounded) period old.
    assert status["nextRotation"] == "2026-04-01T00:00:00Z"
    plain = policy_status(keys, Wait(T0), schedule=schedule, valid_keys=1, generation=1,
                          now=T0, previous={})
    assert next(c for c in plain["conditions"] if c["type"] == "Ready")["reason"] == \
        "Reconciled"


def test_a_clusterkeypolicy_status_reports_bounds_its_namespaces_are_held_to() -> None:
    from webhook.controller import Summary, cluster_policy_status

    conflict = ("each key stays active for 2h, its staging period (minStagingPeriod of "
                "ClusterKeyPolicy 'slow'), longer than the rotation period 1h; "
                "maxRotationPeriod 1h of ClusterKeyPolicy 'fast' cannot be kept")
    fine = Summary(("fast", "slow"), None, 2, T0, T0 + timedelta(hours=2))
    bounded = Summary(("fast", "slow"), None, 1, T0, T0 + timedelta(hours=2),
                      adjusted=(f"namespace 'shop': {conflict}",))
    status = cluster_policy_status([fine, bounded], generation=1, now=T0, previous={})
    [ready] = status["conditions"]
    assert (ready["status"], ready["reason"]) == ("True", "BoundsApplied")
    assert "1 of 2 namespaces held to bounds" in ready["message"]
    assert conflict in ready["message"]
