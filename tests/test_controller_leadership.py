"""The leader's writes against the ways a leadership ends or overlaps: a new leader
before its caches have synced, a leader paused past its renew deadline, one that
stopped with restarts still to send, two leaders writing one status or one activation
(docs/operations.md, "The controller"; cf. client-go's leaderelection). Each was found
by a review and failed on the code before its fix."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from datetime import datetime, timedelta

from test_controller_robustness import (
    NOW,
    FakeApi,
    clusterkeypolicy,
    controller_for,
    keypolicy,
    namespace_object,
    running_pod,
    workload,
)

from webhook.controller import KeyController, WriteBudget
from webhook.metrics import Metrics
from webhook.policystore import (
    PolicyStore,
    parse_stored_clusterkeypolicy,
    parse_stored_keypolicy,
    parse_stored_namespace,
)
from webhook.store import KeyStore

from builders import key_secret, keyring_of, random_key, slot_secret
from polling import wait_for


def _stamp(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def staged_ring(staged_at, *, namespace="shop"):
    """Key 1 active since long ago; key 2 staged at `staged_at`; slot 3 free."""
    staged = key_secret("keymount-key-2", None, index=2, namespace=namespace,
                        annotations={"keymount.io/numbers-used": "1-2",
                                     "keymount.io/staged-at": _stamp(staged_at)})
    staged["data"]["staged-encryption-key"] = base64.b64encode(random_key()).decode()
    return keyring_of(
        key_secret("keymount-key-1", random_key(), index=1, namespace=namespace,
                   annotations={"keymount.io/activated-at": "2025-12-01T00:00:00Z"}),
        staged, slot_secret(3, namespace=namespace), namespace=namespace)


# --- the leader acts before its policy watches have listed ----------------------------

class ListedAfter:
    """A ListWatch as KeyController.run drives it (`run`, `synced`): its first list
    reaches the store after `delay` seconds, then it watches quietly."""

    def __init__(self, delay, deliver):
        self.delay, self.deliver = delay, deliver
        self.synced = asyncio.Event()

    async def run(self):
        await asyncio.sleep(self.delay)
        self.deliver()
        self.synced.set()
        await asyncio.Future()


async def test_a_new_leader_handles_nothing_before_every_policy_watch_has_listed():
    # shop's KeyPolicy says: stage for 1h (its Pods read keys hourly). The baseline
    # ClusterKeyPolicy's default is 2m. Key 2 was staged 5 minutes ago. A new leader's
    # three watches list concurrently; the KeyPolicy list (the largest) comes last.
    api = FakeApi(staged_ring(NOW - timedelta(minutes=5)))
    policies = PolicyStore()
    watches = [
        ListedAfter(0.0, lambda: policies.namespaces.replace_all(
            [parse_stored_namespace(namespace_object("shop"))])),
        ListedAfter(0.0, lambda: policies.clusterkeypolicies.replace_all(
            [parse_stored_clusterkeypolicy(clusterkeypolicy(rotationPeriod="30d"))])),
        ListedAfter(0.3, lambda: policies.keypolicies.replace_all(
            [parse_stored_keypolicy(keypolicy(rotationPeriod="30d", stagingPeriod="1h"))])),
    ]
    controller = KeyController(api, keys=KeyStore(), policies=policies,
                               watches=lambda: watches, slots=2,
                               budget=WriteBudget(1000.0, 1000), metrics=Metrics(),
                               clock=lambda: NOW)
    work = asyncio.create_task(controller.run())
    try:
        await wait_for(lambda: policies.policy_objects("shop"), what="KeyPolicies listed")
        await asyncio.sleep(0.2)
    finally:
        work.cancel()
    assert ("activate", 2) not in api.writes, (
        f"key 2 activated 5 minutes after staging although shop's KeyPolicy stages for "
        f"1h: the leader acted on ClusterKeyPolicy defaults before its KeyPolicy watch "
        f"had listed ({api.writes.count(('activate', 2))} activation writes)")


# --- the leader's restarts go on after it stopped leading and released the Lease -------

async def test_no_restart_is_sent_after_the_leader_stopped_and_released_the_lease():
    from test_controller_robustness import ring_activated_at
    from test_leader import FAST, FakeLeases

    from webhook.leader import LeaderElector

    ring = ring_activated_at("2026-01-01T00:00:00Z")
    pods = [running_pod(f"d{i}-rs-x", owner=("ReplicaSet", f"d{i}-rs")) for i in range(6)]
    api = FakeApi(ring, pods=pods,
                  workloads={("shop", "Deployment", f"d{i}"): workload() for i in range(6)},
                  replicasets={f"d{i}-rs": ("Deployment", f"d{i}") for i in range(6)})
    controller, policies = controller_for(api, keypolicies=[keypolicy(
        rotationPeriod="30d", restart="rolling")])
    controller.budget = WriteBudget(5.0, 1)  # a restart every 0.2 s
    leases = FakeLeases()
    candidate = LeaderElector(leases, identity="keymount-a", timings=FAST)
    stop = asyncio.Event()
    running = asyncio.create_task(candidate.run(controller.run, stop=stop))

    def restarts():
        return [w for w in api.writes if w[0] == "restart"]
    await wait_for(lambda: controller._policy_changed in policies.listeners, what="leading")
    controller._policy_changed("shop")
    await wait_for(lambda: restarts(), what="the first restart")
    stop.set()  # a rolling update of keymount: cancel the work, release the Lease
    await asyncio.wait_for(running, 5)
    assert leases.holder == ""  # released: a successor takes over at its next attempt
    at_release = len(restarts())
    await asyncio.sleep(1.5)
    assert len(restarts()) == at_release, (
        f"{len(restarts()) - at_release} workloads restarted by a replica that had stopped "
        f"leading and released the Lease ({at_release} before)")


# --- a status write has no precondition: a late leader overwrites a newer status -------

class Gate:
    """A WriteBudget whose first take waits for `opened` (a leader paused between its
    read and its write: a GC pause, a throttled CPU, a wave ahead of it)."""

    def __init__(self):
        self.opened, self.paused = asyncio.Event(), asyncio.Event()

    async def take(self):
        if not self.opened.is_set():
            self.paused.set()
            await self.opened.wait()


class StatusServer(FakeApi):
    """KeyPolicy status as the API server keeps it: a resourceVersion per write, and a
    write that names an older one refused (409), as a status patch with
    metadata.resourceVersion is."""

    shared = None

    def write_policy_status(self, namespace, name, status, *, resource_version=None):
        store = self.shared
        if resource_version is not None and resource_version != str(store["rv"]):
            return False  # KeyClient's answer to the API server's 409
        store["rv"] += 1
        store["status"] = status
        self.writes.append(("status", name))
        return True


async def test_a_late_leaders_status_does_not_overwrite_the_new_leaders():
    from test_controller_robustness import ring_activated_at

    shared = {"rv": 1, "status": None}
    old_ring = ring_activated_at("2026-01-01T00:00:00Z")  # key 1 active
    new_ring = keyring_of(  # what the API server holds now: key 2 activated since
        key_secret("keymount-key-1", random_key(), index=1,
                   annotations={"keymount.io/activated-at": "2026-01-01T00:00:00Z"}),
        key_secret("keymount-key-2", random_key(), index=2,
                   annotations={"keymount.io/numbers-used": "1-2",
                                "keymount.io/activated-at": "2026-01-01T12:00:00Z"}),
        slot_secret(3), slot_secret(4))
    late_api, new_api = StatusServer(old_ring), StatusServer(new_ring)
    late_api.shared = new_api.shared = shared
    policy = keypolicy(rotationPeriod="30d")
    policy["metadata"]["resourceVersion"] = "1"  # as both leaders' watches brought it
    late, _ = controller_for(late_api, keypolicies=[policy])
    new, _ = controller_for(new_api, keypolicies=[policy])
    gate = Gate()
    late.budget = gate
    paused = asyncio.create_task(late.handle("shop"))  # read key 1 active, then paused
    await asyncio.wait_for(gate.paused.wait(), 5)
    await new.handle("shop")  # the new leader: key 2 is active
    assert shared["status"]["activeKey"] == 2
    gate.opened.set()
    await asyncio.wait_for(paused, 5)
    assert shared["status"]["activeKey"] == 2, (
        f"the late leader's status (activeKey {shared['status']['activeKey']}, from a read "
        f"before key 2's activation) replaced the new leader's: status writes carry no "
        f"resourceVersion")


# --- a namespace user's KeyPolicy sets the rotation rate: unbounded Secrets and writes --

class Cluster(FakeApi):
    """One namespace's key Secrets as the API server and keymount's mutating webhook keep
    them: every write stamps its times with `clock` and bumps the resourceVersion; a
    write naming an older one is refused (None)."""

    def __init__(self, clock):
        super().__init__(None)
        from webhook.config import Settings
        self.settings, self.clock, self.version, self.records = Settings(), clock, 0, {}
        self.key_writes = 0
        self._put(key_secret("keymount-key-1", random_key(), index=1,
                             annotations={"keymount.io/activated-at": _stamp(clock())}))

    def _put(self, secret):
        from webhook.key_secrets import parse_key_secret
        self.version += 1
        secret["metadata"]["resourceVersion"] = str(self.version)
        record = parse_key_secret(secret, settings=self.settings)
        self.records[record.name] = record
        return record

    def keyring(self, namespace):
        from webhook.keys import build_keyring
        return build_keyring(namespace, self.records.values())

    def _current(self, slot):
        record = self.records.get(slot.name)
        return record if record is not None and record.revision == slot.revision else None

    def reserve_slot(self, namespace, number):
        self.key_writes += 1
        if f"keymount-key-{number}" in self.records:
            return "exists"
        self._put(slot_secret(number, numbers_used=f"1-{number}"))
        return "reserved"

    def fill_slot(self, namespace, slot, key):
        self.key_writes += 1
        if self._current(slot) is None:
            return None
        return self._put(key_secret(slot.name, key, index=slot.index, annotations={
            "keymount.io/numbers-used": f"1-{slot.index}",
            "keymount.io/activated-at": _stamp(self.clock())}))

    def stage_slot(self, namespace, slot, key):
        self.key_writes += 1
        if self._current(slot) is None:
            return None
        secret = slot_secret(slot.index)
        secret["metadata"]["annotations"]["keymount.io/staged-at"] = _stamp(self.clock())
        secret["data"]["staged-encryption-key"] = base64.b64encode(key).decode()
        return self._put(secret)

    def activate_staged(self, namespace, staged):
        self.key_writes += 1
        if self._current(staged) is None:
            return None
        key = random_key()  # the fake keeps no bytes; any valid key stands for it
        secret = key_secret(staged.name, key, index=staged.index, annotations={
            "keymount.io/numbers-used": f"1-{staged.index}",
            "keymount.io/staged-at": _stamp(staged.staged_at),
            "keymount.io/activated-at": _stamp(self.clock())})
        secret["data"]["staged-encryption-key"] = secret["data"]["encryption-key"]
        return self._put(secret)


# --- the renew deadline is overshot by up to a retry period ---------------------------

async def test_the_leader_stops_its_work_at_the_renew_deadline_not_a_retry_period_later():
    import time

    from test_leader import FAST, FakeLeases, Work

    from webhook.leader import LeaderElector

    leases, work = FakeLeases(), Work()
    candidate = LeaderElector(leases, identity="keymount-a", timings=FAST)
    slow_failures = [False]
    real_call = leases._call

    async def call():
        if slow_failures[0]:
            # The API server answers an error just before the deadline (a 5xx after a
            # long wait, a TLS handshake timing out).
            deadline = candidate._last_renewal + FAST.renew_deadline
            await asyncio.sleep(max(deadline - 0.02 - time.monotonic(), 0.0))
            raise ConnectionResetError("API server went away")
        await real_call()
    leases._call = call
    stop = asyncio.Event()
    running = asyncio.create_task(candidate.run(work, stop=stop))
    await wait_for(lambda: work.started and len(leases.writes) >= 2, what="leading")
    slow_failures[0] = True
    await wait_for(lambda: work.cancelled, timeout=5, what="the work cancelled")
    late = work.cancelled[0] - (candidate._last_renewal + FAST.renew_deadline)
    stop.set()
    await asyncio.wait_for(running, 5)
    # The bug this catches stops the work one retry period late (0.23 s here); half of
    # it leaves room for a loaded machine's scheduling delay without hiding that.
    assert late < FAST.retry_period / 2, (
        f"the leader's work ran {late:.2f}s past its renew deadline "
        f"(retry period {FAST.retry_period}s; 2 s of the 5 s margin in production)")


# --- activation is conditional on a fresh read, not on the read that decided it -------

def test_a_key_another_leader_activated_meanwhile_is_not_activated_again():
    from kubernetes import client
    from test_cluster_client import SETTINGS, Response
    from test_cluster_client import FakeApi as FakeServer

    from webhook.cluster import KeyClient
    from webhook.key_secrets import parse_key_secret

    decided_on = slot_secret(2)
    decided_on["metadata"]["resourceVersion"] = "57"
    decided_on["metadata"]["annotations"]["keymount.io/staged-at"] = "2026-01-01T00:00:00Z"
    decided_on["data"]["staged-encryption-key"] = base64.b64encode(random_key()).decode()
    staged = parse_key_secret(decided_on, settings=SETTINGS)
    assert staged.state == "staged"
    # Since that read, the other leader activated it: both fields hold the key.
    now_stored = json.loads(json.dumps(decided_on))
    now_stored["metadata"]["resourceVersion"] = "60"
    now_stored["data"]["encryption-key"] = now_stored["data"]["staged-encryption-key"]
    server = FakeServer()
    server.answers["read_namespaced_secret"] = lambda *a, **kw: Response(now_stored)
    server.answers["patch_namespaced_secret"] = lambda name, ns, body, **kw: Response(
        {**now_stored, "data": {**now_stored["data"], **body["data"]}})
    keys = KeyClient(client.ApiClient(), settings=SETTINGS)
    keys.api = server.strict(client.CoreV1Api)
    made = keys.activate_staged("shop", staged)
    patches = [args[2] for name, args, _ in server.calls if name == "patch_namespaced_secret"]
    assert made is None and not patches, (
        f"activation decided on resourceVersion 57 was written at {patches[0]['metadata']} "
        f"over a key already activated, and reported as made (so counted and logged as a "
        f"second activation)")


# --- a step that can never be made is retried at once, forever, on the shared budget --

async def test_a_slot_name_a_legacy_key_holds_is_skipped_not_created_in_a_loop():
    # A key from before keymount numbered keys (0.1), named like slot 2 and numbered 1
    # by legacy order: keymount's next number is 2, whose slot name is taken. Creating
    # it could only answer "exists", six times a handling, queued again for now.
    now = [NOW]
    api = Cluster(lambda: now[0])
    api.records.clear()
    api._put(key_secret("keymount-key-2", random_key()))  # legacy: no annotations
    assert api.keyring("shop").next_number == 2
    controller, _ = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d")],
                                   clock=lambda: now[0])
    await controller.handle("shop")
    # Number 2 is skipped (numbers may have gaps); the slots are 3 and 4, one create
    # each, and the namespace is not held.
    assert sorted(api.records) == ["keymount-key-2", "keymount-key-3", "keymount-key-4"]
    assert api.key_writes == 2
    assert controller.summaries["shop"].held is None


# --- nothing checks leadership (or its deadline) just before a write -------------------

async def test_no_key_write_is_sent_after_the_renew_deadline_passed():
    import time

    from test_controller_robustness import ring_activated_at
    from test_leader import FAST, FakeLeases

    from webhook.leader import LeaderElector

    loop = asyncio.get_running_loop()
    candidate = None
    sent = []

    class Stalling(FakeApi):
        stalled = False

        def keyring(self, namespace):
            if not self.stalled:
                # The leader's process stops for longer than the lease while this read is
                # on the wire (a GC pause, a CPU-throttled container, a frozen VM).
                self.stalled = True
                loop.call_soon_threadsafe(time.sleep, FAST.lease_duration + 0.5)
                time.sleep(0.1)
            return super().keyring(namespace)

        def stage_slot(self, namespace, slot, key):
            sent.append(time.monotonic() - candidate._last_renewal)
            return super().stage_slot(namespace, slot, key)

    api = Stalling(ring_activated_at("2025-01-01T00:00:00Z"))  # a successor is due
    controller, policies = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d")])
    leases = FakeLeases()
    changes = []
    candidate = LeaderElector(leases, identity="keymount-a", timings=FAST,
                              on_change=changes.append)
    controller.may_write = candidate.may_write  # as cli.build_controller wires it
    stop = asyncio.Event()
    running = asyncio.create_task(candidate.run(controller.run, stop=stop))
    await wait_for(lambda: controller._policy_changed in policies.listeners, what="leading")
    controller._policy_changed("shop")
    await wait_for(lambda: api.stalled and False in changes, timeout=10,
                   what="leadership lost after the stall")
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(running, 5)
    # After the stall the elector steps down; it may lead again (nobody else here
    # campaigns) and write then, each write right after a renewal. None past one.
    late = [s for s in sent if s >= FAST.renew_deadline]
    assert not late, (
        f"a staging write was sent {late[0]:.2f}s after the last renewal (renew deadline "
        f"{FAST.renew_deadline}s, lease {FAST.lease_duration}s): another replica may "
        f"already lead")


# --- a staging period is not shortened by another replica's slow clock ----------------------

async def test_a_staged_key_waits_its_staging_period_by_the_leaders_own_clock_too():
    # keymount.io/staged-at is stamped by whichever replica's webhook admitted the
    # staging, with that replica's clock. Five minutes slow, it made a 2m staging
    # look over one minute after the key was really staged: activated before the
    # kubelet could deliver it.
    now = [NOW]
    ring = staged_ring(NOW - timedelta(minutes=4))  # stamped 5 min slow, 1 min ago
    api = FakeApi(ring)
    controller, _ = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d",
                                                               stagingPeriod="2m")],
                                   clock=lambda: now[0])
    await controller.handle("shop")
    assert ("activate", 2) not in api.writes
    assert controller.queue.due_at("shop") == NOW + timedelta(minutes=2)
    now[0] = NOW + timedelta(minutes=2)  # two minutes after this leader first saw it
    await controller.handle("shop")
    assert ("activate", 2) in api.writes


async def test_a_leader_that_saw_the_staging_activates_on_time():
    # The other side of the rule above: a leader that saw the key staged (its own
    # staging, or any handling since) activates it one staging period after, not one
    # staging period after it first found it due.
    now = [NOW]
    api = FakeApi(staged_ring(NOW))
    controller, _ = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d",
                                                               stagingPeriod="2m")],
                                   clock=lambda: now[0])
    await controller.handle("shop")  # seen at once: not due yet
    assert ("activate", 2) not in api.writes
    due = controller.queue.due_at("shop")
    # Due by the stamp (read to the second, one second on: docs/contract.md), not a
    # second staging period later.
    assert due is not None and due <= NOW + timedelta(minutes=2, seconds=1)
    now[0] = due
    await controller.handle("shop")
    assert ("activate", 2) in api.writes


# --- leadership terms, first sight and status, from a review of the changes above -----------

async def _new_term(controller):
    """One leadership term of KeyController.run (as LeaderElector runs it), ended."""
    task = asyncio.create_task(controller.run())
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_leadership_changes_do_not_postpone_an_activation_without_bound():
    # Key 2 staged at NOW (stamp correct), staging 10m. Leadership changes every 6
    # minutes (API server blips, rolling updates of keymount): each term starts with
    # self.seen = {}, so each term's "first sight" restarts the staging.
    now = [NOW]
    api = FakeApi(staged_ring(NOW))
    controller, _ = controller_for(api, keypolicies=[keypolicy(
        rotationPeriod="30d", stagingPeriod="10m")], clock=lambda: now[0])
    for _ in range(10):  # one hour
        await _new_term(controller)
        await controller.handle("shop")
        now[0] += timedelta(minutes=6)
    assert ("activate", 2) in api.writes, (
        f"key 2 (staging 10m) still not activated {now[0] - NOW} after it was staged; "
        f"the controller last waits until {controller.queue.due_at('shop')}")


async def test_first_seen_forgets_a_namespace_that_no_longer_has_a_policy():
    api = FakeApi(staged_ring(NOW))
    controller, policies = controller_for(api, keypolicies=[keypolicy(
        rotationPeriod="30d", stagingPeriod="10m")])
    await controller.handle("shop")
    assert "shop" in controller.seen
    policies.namespaces.remove(next(iter(policies.namespaces.all())))  # namespace gone
    await controller.handle("shop")
    assert controller.summaries.get("shop") is None  # summaries are pruned ...
    assert "shop" not in controller.seen, "... first_seen memory is not"


async def test_status_next_rotation_is_when_the_controller_will_activate():
    now = [NOW]
    statuses = []
    api = FakeApi(staged_ring(NOW - timedelta(minutes=4)))  # stamp by a slow clock
    api.write_policy_status = lambda ns, name, status, *, resource_version=None: (
        statuses.append(status) or True)
    controller, _ = controller_for(api, keypolicies=[keypolicy(
        rotationPeriod="30d", stagingPeriod="2m")], clock=lambda: now[0])
    await controller.handle("shop")
    due = controller.queue.due_at("shop")
    assert due == NOW + timedelta(minutes=2)  # waits for its own first sight
    status = statuses[-1]
    rotation_due = next(c for c in status["conditions"] if c["type"] == "RotationDue")
    assert datetime.fromisoformat(status["nextRotation"]) >= due and \
        rotation_due["status"] == "False", (
            f"status says nextRotation {status['nextRotation']}, RotationDue "
            f"{rotation_due['status']} ({rotation_due['reason']}): docs/contract.md reads "
            f"that as 'the controller is behind', while it deliberately waits until {due}")


async def test_a_second_leadership_term_in_the_same_process_handles_its_namespaces():
    from test_controller_leadership import ListedAfter
    from test_controller_robustness import namespace_object

    from webhook.policystore import parse_stored_keypolicy, parse_stored_namespace

    from polling import wait_for
    api = FakeApi(staged_ring(NOW - timedelta(hours=1)))  # due now
    controller, policies = controller_for(api, namespaces=())  # an empty store
    ns, kp = namespace_object("shop"), keypolicy(rotationPeriod="30d", stagingPeriod="2m")

    def watches():
        return [ListedAfter(0.0, lambda: policies.namespaces.replace_all(
                    [parse_stored_namespace(ns)])),
                ListedAfter(0.0, lambda: policies.keypolicies.replace_all(
                    [parse_stored_keypolicy(kp)]))]
    controller.watches = watches
    for term in (1, 2):
        api.writes.clear()
        task = asyncio.create_task(controller.run())
        try:
            await wait_for(lambda: api.writes, timeout=2, what=f"term {term} handles shop")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_clusterkeypolicy_status_that_lost_a_race_is_written_again():
    from test_controller_robustness import clusterkeypolicy, ring_activated_at

    from webhook.policystore import parse_stored_clusterkeypolicy
    server = {"rv": 1, "status": None}

    class Server(FakeApi):
        def write_cluster_policy_status(self, name, status, *, resource_version=None):
            if resource_version is not None and resource_version != str(server["rv"]):
                return False  # KeyClient's answer to a 409
            server["rv"] += 1
            server["status"] = {k: v for k, v in status.items() if v is not None}
            return True

    now = [NOW]
    api = Server(ring_activated_at("2026-01-01T00:00:00Z"))
    ckp = clusterkeypolicy(rotationPeriod="30d")
    ckp["metadata"]["resourceVersion"] = "1"
    controller, policies = controller_for(api, clusterpolicies=[ckp],
                                          namespaces=("shop", "web"), clock=lambda: now[0])

    async def one_pass():  # KeyController.run's loop, once
        handled = 0
        while (namespace := controller.queue.pop_due()) is not None:
            await controller._handle_one(namespace)
            handled += 1
        if handled:
            await controller._write_cluster_status()

    controller.queue.poke("shop")
    await one_pass()  # written at rv 1 -> 2
    controller.queue.poke("web")
    await one_pass()  # the watch has not brought rv 2 yet: 409, dropped
    # The watch catches up (status and version are not compared: nothing is woken).
    seen = clusterkeypolicy(rotationPeriod="30d", status=server["status"])
    seen["metadata"]["resourceVersion"] = str(server["rv"])
    policies.clusterkeypolicies.put(parse_stored_clusterkeypolicy(seen))
    now[0] = NOW + timedelta(hours=1)  # an hour of the controller's loop
    for _ in range(3):
        await one_pass()
    message = server["status"]["conditions"][0]["message"]
    assert message == "2 namespaces follow their policy", (
        f"an hour later the ClusterKeyPolicy still says {message!r}; next pass due "
        f"{min(filter(None, (controller.queue.due_at(n) for n in ('shop', 'web'))))}")


# --- a staged key that a key writer's own key overtook -------------------------------------

def overtaken_ring():
    """Key 1 active long ago, key 2 staged a minute ago; then a key writer made key 3
    active by hand (the guard lets key writers add a key while one is staged)."""
    staged = key_secret("keymount-key-2", None, index=2,
                        annotations={"keymount.io/numbers-used": "1-2",
                                     "keymount.io/staged-at": _stamp(NOW - timedelta(
                                         minutes=1))})
    staged["data"]["staged-encryption-key"] = base64.b64encode(random_key()).decode()
    return keyring_of(
        key_secret("keymount-key-1", random_key(), index=1,
                   annotations={"keymount.io/activated-at": "2025-12-01T00:00:00Z"}),
        staged,
        key_secret("keymount-key-3", random_key(), index=3,
                   annotations={"keymount.io/numbers-used": "1-3",
                                "keymount.io/activated-at": _stamp(NOW)}))


async def test_a_staged_key_below_the_active_key_is_activated_at_once_and_not_announced():
    statuses = []
    api = FakeApi(overtaken_ring())
    api.write_policy_status = lambda ns, name, status, *, resource_version=None: (
        statuses.append(status) or True)
    controller, _ = controller_for(api, keypolicies=[keypolicy(
        rotationPeriod="30d", stagingPeriod="1h")])
    await controller.handle("shop")
    # Key 2 replaces nothing: it does not hold the one staged place for an hour (key
    # 3's successor could not be staged meanwhile), nor wait for the leader's clock.
    assert ("activate", 2) in api.writes
    # Its activation is not the next rotation: key 3's own schedule is.
    assert statuses and datetime.fromisoformat(statuses[-1]["nextRotation"]) == \
        NOW + timedelta(days=30), statuses[-1]["nextRotation"]


def test_the_event_for_an_overtaken_staged_key_does_not_call_it_the_key_to_encrypt_with():
    from webhook.rotation import Activate

    notes = []
    controller, _ = controller_for(FakeApi(overtaken_ring()))
    controller.events = type("Sink", (), {"emit": lambda self, note: notes.append(note)})()
    controller._stepped(overtaken_ring(), Activate(2))
    assert len(notes) == 1
    assert "encrypt with encryption-key-2" not in notes[0].message
    assert "encryption-key-3" in notes[0].message, notes[0].message
