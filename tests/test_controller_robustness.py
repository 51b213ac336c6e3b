"""The leader's work against what a namespace's users write: keys with odd times, Pods
with forged owners, workloads that fail, statuses and Events (webhook/controller.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest
from test_controller import CountingApi

from webhook.controller import (
    HOLD_RETRY,
    MAX_STEPS,
    RESTART_ATTEMPTS,
    RETRY_AFTER,
    KeyController,
    Rolled,
    WriteBudget,
    roll_workloads,
)
from webhook.keys import build_keyring
from webhook.metrics import Metrics
from webhook.policystore import (
    PolicyStore,
    parse_stored_clusterkeypolicy,
    parse_stored_keypolicy,
    parse_stored_namespace,
)
from webhook.store import KeyStore

from builders import key_secret, keyring_of, random_key, slot_secret

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=1)


# --- fakes of the project's own ControllerApi --------------------------------------------

class FakeApi(CountingApi):
    """ControllerApi over a fixed keyring: live reads return it, every write is
    recorded. Workloads and Pods for `restart: rolling`."""

    def __init__(self, ring, *, pods=(), workloads=None, replicasets=None) -> None:
        super().__init__(ring)
        self.pods = list(pods)
        self.workloads = dict(workloads or {})
        self.replicasets = dict(replicasets or {})  # name -> (kind, name) of its owner
        self.fail_restart: set[tuple[str, str]] = set()
        self.verified = {GENUINE}
        self.cluster_status_sink = None

    def write_cluster_policy_status(self, name, status, *, resource_version=None):
        self.writes.append(("cluster-status", name))
        if self.cluster_status_sink is not None:
            self.cluster_status_sink(name, status)
        return True

    # restart: rolling, as webhook/cluster.py's KeyClient behaves
    def backend_pods(self, namespace):
        return [p for p in self.pods if p["metadata"].get("namespace") == namespace]

    def controller_of(self, namespace, pod, *, owners=None):
        # KeyClient checks each link against the API server
        # (tests/test_cluster_client.py); here a reference is genuine when `verified`
        # says so, and a ReplicaSet leads to the Deployment `replicasets` names.
        from webhook.lifecycle import controller_ref
        kind, name, uid = controller_ref(pod)
        if uid not in self.verified:
            return None
        if kind != "ReplicaSet":
            return kind, name
        return self.replicasets.get(name, (kind, name))

    def read_workload(self, namespace, kind, name):
        try:
            return self.workloads[(namespace, kind, name)]
        except KeyError:
            # KeyClient._call turns the API server's 404 into a ClusterError
            from webhook.cluster import ClusterError
            raise ClusterError(f"{kind.lower()}s.apps {name!r} not found") from None

    def restart_workload(self, namespace, kind, name, *, at, resource_version=None):
        if (kind, name) in self.fail_restart:
            from webhook.cluster import ClusterError
            raise ClusterError("the server is currently unable to handle the request")
        self.writes.append(("restart", namespace, kind, name))
        return True


GENUINE = "11111111-2222-3333-4444-555555555555"


async def no_wait() -> None:
    """A write budget that never waits."""


def running_pod(name, *, namespace="shop", owner=None, secrets=(), uid=GENUINE):
    meta = {"name": name, "namespace": namespace, "annotations": {
        "keymount.io/status": json.dumps([{"secret": s} for s in secrets])}}
    if owner is not None:
        kind, owner_name = owner
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind,
                                    "name": owner_name, "controller": True,
                                    "uid": uid}]
    return {"metadata": meta, "status": {"phase": "Running"}}


def workload(restarted_at=None):
    annotations = {"kubectl.kubernetes.io/restartedAt": restarted_at} if restarted_at else {}
    return {"spec": {"template": {"metadata": {"annotations": annotations}}}}


def keypolicy(namespace="shop", name="rotation", **spec):
    return {"apiVersion": "keymount.io/v1alpha1", "kind": "KeyPolicy",
            "metadata": {"name": name, "namespace": namespace, "generation": 1,
                         "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": spec}


def clusterkeypolicy(name="baseline", status=None, **spec):
    obj = {"apiVersion": "keymount.io/v1alpha1", "kind": "ClusterKeyPolicy",
           "metadata": {"name": name, "generation": 1,
                        "creationTimestamp": "2025-01-01T00:00:00Z"},
           "spec": {"namespaceSelector": {}, **spec}}
    if status is not None:
        obj["status"] = status
    return obj


def namespace_object(name="shop", labels=None):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}}


def controller_for(api, *, keypolicies=(), clusterpolicies=(), namespaces=("shop",),
                   clock=lambda: NOW):
    policies = PolicyStore()
    for ns in namespaces:
        policies.namespaces.put(parse_stored_namespace(namespace_object(ns)))
    for obj in keypolicies:
        policies.keypolicies.put(parse_stored_keypolicy(obj))
    for obj in clusterpolicies:
        policies.clusterkeypolicies.put(parse_stored_clusterkeypolicy(obj))
    controller = KeyController(api, keys=KeyStore(), policies=policies, watches=lambda: [],
                               slots=2, budget=WriteBudget(1000.0, 1000), metrics=Metrics(),
                               clock=clock)
    return controller, policies


def ring_activated_at(when, *, namespace="shop"):
    """Key 1 active since `when` (keymount.io/activated-at), slots 2 and 3 waiting."""
    return keyring_of(
        key_secret("keymount-key-1", random_key(), index=1, namespace=namespace,
                   annotations={"keymount.io/activated-at": when}),
        slot_secret(2, namespace=namespace), slot_secret(3, namespace=namespace),
        namespace=namespace)


# --- 1. an admitted activated-at ends the leader's loop ------------------------------------

# A key created with an activated-at earlier than keymount's clock keeps it
# (docs/contract.md, "Staged keys"). This one is 14 hours before 0001-01-01T00:00Z UTC:
# earlier than any clock, so the mutating webhook keeps it, but it cannot be converted
# to UTC.
ANCIENT = "0001-01-01T00:00:00+14:00"


def test_an_activated_at_that_has_no_utc_time_is_replaced_by_keymounts_clock():
    # The precondition of the finding: the webhook admits and keeps such a key.
    import base64

    import jsonpatch

    from webhook.admission import parse_review
    from webhook.config import Settings
    from webhook.decisions import review_mutation, review_validation
    from webhook.keyguard import parse_key_writers

    from builders import review

    secret = key_secret("restored", random_key(), index=None,
                        annotations={"keymount.io/activated-at": ANCIENT})
    ring = keyring_of(key_secret("k1", random_key(), index=1))
    body = review(secret, kind="Secret", username="alice")
    body["request"]["name"] = "restored"
    mutation = review_mutation(parse_review(json.dumps(body).encode()), keyring=ring,
                               settings=Settings(), now=NOW)
    ops = json.loads(base64.b64decode(mutation.response["patch"]))
    stored = jsonpatch.apply_patch(secret, ops)
    body["request"]["object"] = stored
    verdict = review_validation(parse_review(json.dumps(body).encode()), keyring=ring,
                                settings=Settings(),
                                writers=parse_key_writers("user:alice", own_user="ks"))
    assert verdict.result == "allowed"
    kept = stored["metadata"]["annotations"]["keymount.io/activated-at"]
    # The finding: keymount keeps a time it cannot itself format. It should stamp its
    # own clock over it (or refuse it), as it does for a malformed one.
    assert kept != ANCIENT, "an activated-at outside datetime's UTC range was kept"


async def test_a_stored_activated_at_out_of_range_does_not_end_the_leaders_work():
    # One namespace's key (its key writer's restore) must not stop rotation for all
    # namespaces: handle() is called straight from KeyController.run's TaskGroup, so any
    # exception it raises ends the leader's work (the elector steps down, campaigns,
    # leads, and hits the same namespace again).
    api = FakeApi(ring_activated_at(ANCIENT))
    controller, _ = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d")])
    try:
        await controller.handle("shop")
    except OverflowError as exc:  # pragma: no cover - the finding
        pytest.fail(f"KeyController.handle raised {exc!r}: the leader's loop would end")


async def test_a_stored_activated_at_out_of_range_does_not_end_the_cluster_status_pass():
    # The same through a ClusterKeyPolicy (no KeyPolicy): _write_cluster_status runs in
    # KeyController.run, outside handle()'s error handling.
    api = FakeApi(ring_activated_at(ANCIENT))
    controller, _ = controller_for(api, clusterpolicies=[clusterkeypolicy(
        rotationPeriod="30d")])
    await controller.handle("shop")
    try:
        await controller._write_cluster_status()
    except OverflowError as exc:  # pragma: no cover - the finding
        pytest.fail(f"the ClusterKeyPolicy status pass raised {exc!r}")


# --- 2. ClusterKeyPolicy status is rewritten on every pass -----------------------------------

def test_a_stored_clusterkeypolicy_keeps_its_status():
    status = {"keys": 1, "observedGeneration": 1}
    stored = parse_stored_clusterkeypolicy(clusterkeypolicy(status=status))
    assert stored.status == status  # parse_stored_keypolicy keeps it; this drops it


async def test_an_unchanged_clusterkeypolicy_status_is_not_written_again():
    api = FakeApi(ring_activated_at("2026-01-01T00:00:00Z"))
    controller, policies = controller_for(api, clusterpolicies=[clusterkeypolicy(
        rotationPeriod="30d")])

    def delivered(name, status):  # the watch brings the written status back
        obj = clusterkeypolicy(name=name, status={k: v for k, v in status.items()
                                                  if v is not None}, rotationPeriod="30d")
        policies.clusterkeypolicies.put(parse_stored_clusterkeypolicy(obj))

    api.cluster_status_sink = delivered
    await controller.handle("shop")
    await controller._write_cluster_status()
    await controller.handle("shop")  # nothing changed
    await controller._write_cluster_status()
    writes = [w for w in api.writes if w[0] == "cluster-status"]
    assert len(writes) == 1, f"the same ClusterKeyPolicy status was written {len(writes)} times"


# --- 3. restart: rolling trusts a Pod's ownerReference ---------------------------------------

async def test_a_pods_forged_owner_reference_does_not_restart_someone_elses_workload():
    # A user who may create Pods (not Deployments/StatefulSets) in the namespace gives
    # a backend Pod a controller ownerReference naming a StatefulSet it does not own.
    # After each activation keymount restarts that StatefulSet.
    ring = ring_activated_at("2026-01-01T00:00:00Z")
    forged = running_pod("mallory", owner=("StatefulSet", "payments-db"), uid="made-up")
    api = FakeApi(ring, pods=[forged],
                  workloads={("shop", "StatefulSet", "payments-db"): workload()})
    rolled = (await roll_workloads(api, ring, now=NOW, take=no_wait)).restarted
    assert ("StatefulSet", "payments-db") not in rolled, \
        "a bare Pod's unverified ownerReference made keymount restart a StatefulSet"


# --- 4. one failing workload stops every restart in the namespace ----------------------------

async def test_one_missing_workload_does_not_stop_the_others_being_restarted():
    # A Pod whose controller ownerReference names a Deployment that does not exist
    # (forged, or deleted meanwhile) sorts first; reading it fails, and the real
    # Deployment, whose Pods lack the active key, is never restarted.
    ring = ring_activated_at("2026-01-01T00:00:00Z")
    pods = [running_pod("ghost-pod", owner=("Deployment", "aaa-ghost")),
            running_pod("api-abc12-x", owner=("ReplicaSet", "api-abc12"))]
    api = FakeApi(ring, pods=pods,
                  workloads={("shop", "Deployment", "api"): workload()},
                  replicasets={"api-abc12": ("Deployment", "api")})
    api.verified.add("ghost-uid")  # say the reference checks out, and the read fails
    pods[0]["metadata"]["ownerReferences"][0]["uid"] = "ghost-uid"
    rolled = await roll_workloads(api, ring, now=NOW, take=no_wait)
    assert ("restart", "shop", "Deployment", "api") in api.writes, \
        "the Deployment whose Pods lack the key was not restarted"
    assert rolled.restarted == (("Deployment", "api"),)
    assert [(kind, name) for kind, name, _ in rolled.failed] == [("Deployment", "aaa-ghost")]


# --- 5. a failed restart is not retried --------------------------------------------------------

async def test_a_failed_rolling_restart_is_counted_and_retried_after_30s():
    # docs/contract.md, "Managed rotation": a failed write is counted as
    # rotations_total{step="failed"} and retried after 30 s. A restart that fails is
    # only logged; the namespace waits for its next due time (here ~29 days).
    ring = ring_activated_at("2026-01-01T00:00:00Z")
    pods = [running_pod("api-abc12-x", owner=("ReplicaSet", "api-abc12"))]
    api = FakeApi(ring, pods=pods, workloads={("shop", "Deployment", "api"): workload()},
                  replicasets={"api-abc12": ("Deployment", "api")})
    api.fail_restart.add(("Deployment", "api"))
    controller, _ = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d",
                                                               restart="rolling")])
    await controller.handle("shop")
    due = controller.queue.due_at("shop")
    failed = controller.metrics.rotations.labels("failed")._value.get()
    assert due is not None and due <= NOW + timedelta(seconds=30), \
        f"a failed restart is looked at again only at {due}"
    assert failed == 1


# --- 1b. the same, seen from KeyController.run: every namespace stops --------------------

class PerNamespaceApi(FakeApi):
    def __init__(self, rings) -> None:
        super().__init__(None)
        self.rings = rings

    def keyring(self, namespace):
        return self.rings[namespace]


async def test_one_namespace_that_fails_unexpectedly_never_stops_rotation_in_the_others():
    # Whatever one namespace's objects make handle() raise (its key Secrets and policies
    # are written by its users), the leader's work goes on for every other namespace.
    from webhook.keys import build_keyring

    from polling import wait_for

    class Faulty(KeyController):
        async def handle(self, namespace):
            if namespace == "alpha":
                raise RuntimeError("something alpha holds")
            await super().handle(namespace)

    api = PerNamespaceApi({"alpha": build_keyring("alpha", []),
                           "zeta": build_keyring("zeta", [])})
    policies = PolicyStore()
    for ns in ("alpha", "zeta"):
        policies.namespaces.put(parse_stored_namespace(namespace_object(ns)))
        policies.keypolicies.put(parse_stored_keypolicy(keypolicy(ns, rotationPeriod="30d")))
    controller = Faulty(api, keys=KeyStore(), policies=policies, watches=lambda: [], slots=2,
                        budget=WriteBudget(1000.0, 1000), metrics=Metrics())
    work = asyncio.create_task(controller.run())
    try:
        await wait_for(lambda: controller._policy_changed in policies.listeners,
                       what="the leader's work started")
        controller._policy_changed("alpha")  # first in the queue
        controller._policy_changed("zeta")
        await wait_for(lambda: work.done() or any(w[0] == "reserve" for w in api.writes),
                       what="zeta's first key")
        assert not work.done(), f"the leader's work ended: {work.exception()!r}"
        assert controller.metrics.rotations.labels("failed")._value.get() == 1
        due = controller.queue.due_at("alpha")
        assert due is not None  # looked at again, after RETRY_AFTER
    finally:
        work.cancel()


# --- 7. restarts are not conditional on what was read --------------------------------------

async def test_two_leaders_do_not_both_restart_a_workload_for_one_key():
    # A paused leader and its successor each read the Deployment (not restarted since
    # the activation), then each patch restartedAt: two rollouts for one key. The patch
    # carries no resourceVersion of the read that decided it, so the API server cannot
    # refuse the second. The fake honours a resource_version if one is passed.
    ring = ring_activated_at("2026-01-01T00:00:00Z")
    pods = [running_pod("api-abc12-x", owner=("ReplicaSet", "api-abc12"))]

    class Versioned(FakeApi):
        version = 1

        def read_workload(self, namespace, kind, name):
            obj = super().read_workload(namespace, kind, name)
            obj = json.loads(json.dumps(obj))
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
            return obj

        def restart_workload(self, namespace, kind, name, *, at, resource_version=None):
            if resource_version is not None and resource_version != str(self.version):
                return False  # KeyClient's answer to the API server's 409
            self.version += 1
            stored = self.workloads[(namespace, kind, name)]
            stored["spec"]["template"]["metadata"]["annotations"][
                "kubectl.kubernetes.io/restartedAt"] = at
            self.writes.append(("restart", namespace, kind, name))
            return True

    api = Versioned(ring, pods=pods, workloads={("shop", "Deployment", "api"): workload()},
                    replicasets={"api-abc12": ("Deployment", "api")})
    other_leader_ran = []

    async def take():  # the first leader pauses here, between its read and its write
        if not other_leader_ran:
            other_leader_ran.append(1)
            await roll_workloads(api, ring, now=NOW, take=no_wait)

    late = await roll_workloads(api, ring, now=NOW + timedelta(seconds=20), take=take)
    restarts = [w for w in api.writes if w[0] == "restart"]
    assert len(restarts) == 1, f"one key, {len(restarts)} rollouts of Deployment 'api'"
    # Refused, read again: restarted since the activation, so nothing left to do.
    assert late == Rolled()


async def test_a_busy_workload_is_read_again_and_restarted_in_the_same_pass():
    # A Deployment's status changes with each Pod's readiness, moving its
    # resourceVersion between the controller's read and its conditional restart. A
    # refused restart used to be a failure retried 30 s later, and a Deployment busy
    # enough was never restarted; it is read and tried again at once, a bounded number
    # of times.
    ring = ring_activated_at("2026-01-01T00:00:00Z")
    pods = [running_pod("api-abc12-x", owner=("ReplicaSet", "api-abc12"))]

    class Busy(FakeApi):
        version = 1
        changes = 0  # status updates still to come, one after each read

        def read_workload(self, namespace, kind, name):
            obj = json.loads(json.dumps(super().read_workload(namespace, kind, name)))
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
            if self.changes:
                self.changes -= 1
                self.version += 1  # a readiness change lands before the patch
            return obj

        def restart_workload(self, namespace, kind, name, *, at, resource_version=None):
            if resource_version != str(self.version):
                self.writes.append(("refused", namespace, kind, name))
                return False
            self.writes.append(("restart", namespace, kind, name))
            return True

    async def run(changes):
        api = Busy(ring, pods=pods, workloads={("shop", "Deployment", "api"): workload()},
                   replicasets={"api-abc12": ("Deployment", "api")})
        api.changes = changes
        taken = []

        async def take():
            taken.append(1)
        rolled = await roll_workloads(api, ring, now=NOW, take=take)
        return api, rolled, len(taken)

    api, rolled, writes = await run(changes=RESTART_ATTEMPTS - 1)
    assert rolled == Rolled(restarted=(("Deployment", "api"),))
    assert [w[0] for w in api.writes] == ["refused"] * (RESTART_ATTEMPTS - 1) + ["restart"]
    assert writes == RESTART_ATTEMPTS  # each try takes from the write budget
    # Busier than that: a failure, retried with the namespace, after a bounded number of
    # writes.
    api, rolled, writes = await run(changes=RESTART_ATTEMPTS)
    assert rolled.restarted == () and writes == RESTART_ATTEMPTS
    assert rolled.failed == (("Deployment", "api",
                              f"it changed while being restarted, {RESTART_ATTEMPTS} "
                              f"times in a row"),)


async def test_an_owner_unreadable_for_a_moment_is_a_failure_to_retry_not_a_bare_pod():
    # A 503 while reading a Pod's StatefulSet must not make the Pod look bare (nothing
    # restarted, nothing failed, so nothing retried until the next key is due).
    from webhook.cluster import ClusterError

    class Flaky(FakeApi):
        def controller_of(self, namespace, pod, *, owners=None):
            if pod["metadata"]["name"] == "db-0":
                raise ClusterError("etcdserver: request timed out")
            return super().controller_of(namespace, pod, owners=owners)

    ring = ring_activated_at("2026-01-01T00:00:00Z")
    pods = [running_pod("db-0", owner=("StatefulSet", "db")),
            running_pod("api-abc12-x", owner=("ReplicaSet", "api-abc12"))]
    api = Flaky(ring, pods=pods, workloads={("shop", "Deployment", "api"): workload()},
                replicasets={"api-abc12": ("Deployment", "api")})
    rolled = await roll_workloads(api, ring, now=NOW, take=no_wait)
    assert rolled.restarted == (("Deployment", "api"),)
    assert [(kind, name) for kind, name, _ in rolled.failed] == [("Pod", "db-0")]


# --- 8. a stored policy that does not parse ---------------------------------------------------

async def test_a_stored_clusterkeypolicy_that_does_not_parse_holds_rotation_not_its_bounds():
    # Stored before keymount's webhook judged policies: a 5s staging its parser refuses.
    # Its bounds (maxRotationPeriod 30d) used to vanish with it, and the namespace ran
    # by its own KeyPolicy's ten years, unreported.
    broken = parse_stored_clusterkeypolicy(clusterkeypolicy(
        "prod-bounds", maxRotationPeriod="30d", stagingPeriod="5s"))
    assert broken.problem
    api = FakeApi(ring_activated_at("2025-01-01T00:00:00Z"))  # a year old: due anywhere
    controller, policies = controller_for(api, keypolicies=[keypolicy(rotationPeriod="3650d")])
    policies.clusterkeypolicies.put(broken)
    await controller.handle("shop")
    assert [w for w in api.writes if w[0] != "status"] == []  # nothing rotated
    held = controller.summaries["shop"].held
    assert held is not None and held.startswith("ClusterKeyPolicy 'prod-bounds': ")
    assert "fix or delete it" in held
    assert controller.queue.due_at("shop") == NOW + HOLD_RETRY


async def test_a_second_keypolicy_is_told_it_is_ignored():
    # One KeyPolicy per namespace is meant; of several the oldest rules. The others
    # used to get no status at all: their authors could not tell they did nothing.
    api = FakeApi(ring_activated_at("2026-01-01T00:00:00Z"))
    first = keypolicy(name="rotation", rotationPeriod="30d")
    second = keypolicy(name="faster", rotationPeriod="7d")
    second["metadata"]["creationTimestamp"] = "2025-06-01T00:00:00Z"  # the younger one
    statuses = {}
    api.write_policy_status = lambda namespace, name, status, *, resource_version=None: (
        statuses.__setitem__(name, status) or True)
    controller, _ = controller_for(api, keypolicies=[first, second])
    await controller.handle("shop")
    assert statuses["rotation"]["conditions"][0]["status"] == "True"
    ready = statuses["faster"]["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "Ignored")
    assert "KeyPolicy 'rotation' is in effect in this namespace" in ready["message"]
    assert statuses["faster"]["activeKey"] is None


async def test_a_keypolicy_that_does_not_parse_is_told_so_not_silently_ignored():
    # Stored before keymount's webhook judged policies (or while it was down): it counts
    # as no policy, so the namespace is rotated by hand only. Its author used to see
    # nothing at all: no status, no Event, while they believed keys rotated.
    api = FakeApi(ring_activated_at("2026-01-01T00:00:00Z"))
    statuses = {}
    api.write_policy_status = lambda namespace, name, status, *, resource_version=None: (
        statuses.__setitem__(name, status) or True)
    # A 5s staging: the CRD's schema admits it, keymount's parser does not (>= 10s).
    controller, _ = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d",
                                                               stagingPeriod="5s")])
    notes = []
    controller.events = type("Sink", (), {"emit": lambda self, note: notes.append(note)})()
    await controller.handle("shop")
    assert [w for w in api.writes if w[0] != "status"] == []  # nothing rotated by a guess
    ready = statuses["rotation"]["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "Invalid")
    assert "stagingPeriod" in ready["message"]
    assert "kubectl edit keypolicy rotation -n shop" in ready["message"]
    assert [(n.kind, n.name, n.type, n.reason) for n in notes] == [
        ("KeyPolicy", "rotation", "Warning", "InvalidPolicy")]
    # Told once: a second handling with the status stored writes and records nothing new.
    stored = controller.policies.keypolicies.get("shop", "rotation")
    controller.policies.keypolicies.put(dataclasses.replace(stored, status={
        k: v for k, v in statuses["rotation"].items() if v is not None}))  # as merged
    statuses.clear()
    await controller.handle("shop")
    assert statuses == {} and len(notes) == 1


async def test_a_clusterkeypolicy_that_does_not_parse_says_so_in_its_status():
    api = FakeApi(ring_activated_at("2026-01-01T00:00:00Z"))
    written = {}
    api.cluster_status_sink = written.__setitem__
    controller, _ = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d")],
                                   clusterpolicies=[clusterkeypolicy(
                                       name="prod-bounds", maxRotationPeriod="30d",
                                       stagingPeriod="5s")])
    await controller.handle("shop")
    await controller._write_cluster_status()
    ready = written["prod-bounds"]["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "Invalid")
    assert "stagingPeriod" in ready["message"]
    assert "kubectl edit clusterkeypolicy prod-bounds" in ready["message"]


# --- clocks, many KeyPolicies, namespaces the webhooks skip --------------------------------

def _stamp(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class RestartingApi(FakeApi):
    """Workloads as the API server keeps them: a restart stores its restartedAt."""

    def read_workload(self, namespace, kind, name):
        return json.loads(json.dumps(super().read_workload(namespace, kind, name)))

    def restart_workload(self, namespace, kind, name, *, at, resource_version=None):
        stored = self.workloads[(namespace, kind, name)]
        stored["spec"]["template"]["metadata"]["annotations"][
            "kubectl.kubernetes.io/restartedAt"] = at
        self.writes.append(("restart", namespace, kind, name))
        return True


async def test_a_leader_whose_clock_runs_behind_rolls_a_workload_once_per_key():
    # keymount.io/activated-at is stamped by whichever replica's webhook admitted the
    # activation, with that replica's clock; the leader's clock runs 30 s behind it.
    # restart: rolling stamps restartedAt with the leader's clock, so the workload looks
    # "restarted before the activation" on every later handling (each key event pokes
    # the namespace) and is rolled again and again until the leader's clock catches up.
    activated = NOW + timedelta(seconds=30)
    ring = keyring_of(
        key_secret("keymount-key-1", random_key(), index=1,
                   annotations={"keymount.io/activated-at": _stamp(activated)}),
        slot_secret(2), slot_secret(3))
    pods = [running_pod("api-abc12-x", owner=("ReplicaSet", "api-abc12"))]
    api = RestartingApi(ring, pods=pods,
                        workloads={("shop", "Deployment", "api"): workload()},
                        replicasets={"api-abc12": ("Deployment", "api")})
    controller, _ = controller_for(api, keypolicies=[keypolicy(rotationPeriod="30d",
                                                               restart="rolling")])
    for _ in range(3):  # the activation, then the key watch's events poke it again
        await controller.handle("shop")
    restarts = [w for w in api.writes if w[0] == "restart"]
    assert len(restarts) == 1, f"one key, {len(restarts)} rollouts of Deployment 'api'"


class CountingBudget:
    def __init__(self) -> None:
        self.taken = 0

    async def take(self) -> None:
        self.taken += 1


async def test_one_handling_writes_a_bounded_number_of_ignored_keypolicy_statuses():
    # The leader handles one namespace at a time, and each of the controller's writes
    # waits its turn at --controller-writes-per-second (4 by default). A tenant who may
    # write KeyPolicies in their namespace creates 400 of them (only the oldest is in
    # effect): one handling of that namespace writes 400 "Ignored" statuses, 100 s
    # during which no other namespace is handled (a staged key elsewhere waits past its
    # activation); deleting the oldest KeyPolicy changes every status again.
    policies = [keypolicy(name="rotation", rotationPeriod="30d")]
    for n in range(400):
        extra = keypolicy(name=f"extra-{n:03d}", rotationPeriod="30d")
        extra["metadata"]["creationTimestamp"] = "2025-06-01T00:00:00Z"
        policies.append(extra)
    api = FakeApi(ring_activated_at("2026-01-01T00:00:00Z"))
    controller, store = controller_for(api, keypolicies=policies)

    def written(namespace, name, status, *, resource_version=None):
        # The watch brings the written status back, as the API server stored it.
        obj = next(p for p in policies if p["metadata"]["name"] == name)
        obj = {**obj, "status": {k: v for k, v in status.items() if v is not None}}
        store.keypolicies.put(parse_stored_keypolicy(obj))
        api.writes.append(("status", name))
        return True

    api.write_policy_status = written
    budget = CountingBudget()
    controller.budget = budget
    await controller.handle("shop")
    statuses = [w for w in api.writes if w[0] == "status"]
    assert budget.taken <= MAX_STEPS + 1, (
        f"one handling of one namespace took {budget.taken} writes from the shared budget "
        f"({len(statuses)} KeyPolicy statuses)")
    # The rest are written later, a bounded batch each time, after the others' turn.
    due = controller.queue.due_at("shop")
    assert due is not None and due <= NOW + RETRY_AFTER
    for _ in range(400 // MAX_STEPS + 1):
        controller.queue.set("shop", None)
        await controller.handle("shop")
    written = {w[1] for w in api.writes if w[0] == "status"}
    assert len(written) == 401 and timedelta(0) <= due - NOW


async def test_namespaces_the_webhooks_skip_are_not_rotated():
    # Nothing stamps keymount.io/staged-at there (numbers.keymount.io skips them), so the
    # first staged key is held for good (a RotationFailed Event every 5 minutes, the
    # ClusterKeyPolicy Ready=False), and the slots and keys written there are outside
    # the key guard; no backend Pod there is injected to use them.
    for namespace in ("kube-system", "keymount"):
        api = FakeApi(build_keyring(namespace, []))
        controller, _ = controller_for(
            api, clusterpolicies=[clusterkeypolicy(rotationPeriod="30d")],
            namespaces=(namespace,))
        controller.unmanaged = frozenset({"kube-system", "keymount"})
        await controller.handle(namespace)
        assert api.writes == [], f"the controller wrote in {namespace}: {api.writes}"
        assert namespace not in controller.summaries
