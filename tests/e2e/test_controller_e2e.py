"""Managed rotation on the real API server: `keymount serve --controller` replicas
running as the least-privileged user keymount with manifests/components/controller's
RBAC, their writes judged by keymount's webhooks as manifests/ declares them."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from datetime import datetime, timedelta

import pytest
from kubernetes import client

from webhook.cluster import KeyClient, load_api_client
from webhook.config import Settings
from webhook.controller import WriteBudget, reconcile
from webhook.rotation import Schedule

from apihelpers import GROUP, VERSION, key_policy, keys_in, stored_keys
from conftest import controller_home, controller_rights, launch_keymount
from polling import poll


@pytest.fixture
def custom(api):
    return client.CustomObjectsApi(api.api_client)


@pytest.fixture
def controllers(api, control_plane, admin_kubeconfig, namespace, policy_crds, tmp_path):
    """Start `serve --controller` replicas whose Lease lives in a namespace of their own
    (they never rotate that one), to rotate the test's namespace."""
    started = []
    with controller_home(api, admin_kubeconfig, control_plane.keymount_user) as home:
        def start(count: int = 1):
            for _ in range(count):
                started.append(launch_keymount(
                    control_plane, tmp_path / f"c{len(started)}", "--controller",
                    "--controller-namespace", home))
            return started[-count:]
        yield start
        for server in started:
            if server.proc.poll() is None:
                server.stop()


def test_a_policy_rotates_a_namespace_staging_each_key_before_it_is_active(
        api, custom, namespace, controllers):
    key_policy(custom, namespace, rotationPeriod="40s", stagingPeriod="10s")
    controllers(1)
    # No key yet: key 1 is made active at once (nothing is encrypted to stage for).
    poll(lambda: keys_in(api, namespace, "active") == [1], timeout=60, what="key 1")
    poll(lambda: keys_in(api, namespace, "slot") == [2, 3], timeout=30, what="two slots")
    poll(lambda: keys_in(api, namespace, "active") == [1, 2], timeout=120,
         what="key 2 active after its rotation")
    keys = stored_keys(api, namespace)
    first, second = keys[1], keys[2]
    # Staged one staging period before the rotation period ends, active when it ends:
    # key 1 encrypted for the 40 s the policy gives it, not 40 s plus the staging.
    assert second["staged_at"] - first["activated_at"] >= timedelta(seconds=30)
    assert second["activated_at"] - second["staged_at"] >= timedelta(seconds=10)
    assert second["activated_at"] - first["activated_at"] < timedelta(seconds=50)
    # While key 2 was staged it counted among the two numbers waiting; after its
    # activation slot 4 is reserved, and never more than two wait.
    poll(lambda: keys_in(api, namespace, "slot") == [3, 4], timeout=30, what="slots 3, 4")

    def status() -> dict:
        policy = custom.get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                     "keypolicies", "rotation")
        return policy.get("status") or {}
    poll(lambda: status().get("activeKey") == 2, timeout=30, what="the KeyPolicy's status")
    written = status()
    assert written["keys"] == 2 and written.get("stagedKey") is None
    ready = {c["type"]: c["status"] for c in written["conditions"]}
    assert ready == {"Ready": "True", "RotationDue": "False", "Staged": "False"}
    # One Event per fact: the controller and the validating webhook (which sees the
    # controller's write) both record a staging and an activation, under one name.
    steps = sorted((e.reason, e.involved_object.name)
                   for e in api.list_namespaced_event(namespace).items
                   if e.reason in ("KeyStaged", "KeyActivated"))
    assert steps == [("KeyActivated", "keymount-key-1"), ("KeyActivated", "keymount-key-2"),
                     ("KeyStaged", "keymount-key-2")]


class Killed(Exception):
    """The controller stopped between two writes (a lost Lease, SIGKILL)."""


class KillingBudget(WriteBudget):
    """Lets `writes` writes through, then stops the controller before the next."""

    def __init__(self, writes: int) -> None:
        super().__init__(1000.0, 1000)
        self.left = writes

    async def take(self) -> None:
        if self.left == 0:
            raise Killed()
        self.left -= 1
        await super().take()


# The writes of a namespace's first key and one rotation: reserve 1, fill 1, reserve 2
# and 3; then stage 2, reserve 4; then activate 2.
@pytest.mark.parametrize("kill_after", range(7), ids=lambda n: f"killed-after-{n}-writes")
def test_a_controller_killed_between_any_two_writes_is_finished_by_the_next(
        api, namespace, keymount, control_plane, admin_kubeconfig, tmp_path, kill_after):
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "kubeconfig",
                                                token=control_plane.keymount_token)
    with controller_rights(admin_kubeconfig, namespace, control_plane.keymount_user):
        killed_then_finished_with(kubeconfig, api, namespace, kill_after)


def killed_then_finished_with(kubeconfig, api, namespace: str, kill_after: int) -> None:
    keys = KeyClient(load_api_client(kubeconfig=str(kubeconfig)), settings=Settings())
    first = Schedule(rotation_period=timedelta(hours=1), staging_period=timedelta(seconds=1))
    due = Schedule(rotation_period=timedelta(seconds=1), staging_period=timedelta(seconds=1))

    async def run(schedule: Schedule, budget: WriteBudget) -> None:
        await reconcile(keys, namespace, schedule, slots=2, budget=budget)

    def key_two_active() -> bool:
        return 2 in keys_in(api, namespace, "active")

    async def killed_then_finished() -> None:
        budget = KillingBudget(kill_after)
        try:
            await run(first, budget)
            await run(due, budget)
            # The staging period passes on the clock (a second, plus the stamp's second).
            deadline = time.monotonic() + 20
            while not key_two_active() and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                await run(due, budget)
        except Killed:
            pass
        # A new controller: nothing carried over but what the API server holds.
        await run(first, WriteBudget(1000.0, 1000))
        deadline = time.monotonic() + 20
        while not key_two_active() and time.monotonic() < deadline:
            await run(due, WriteBudget(1000.0, 1000))
            await asyncio.sleep(0.5)

    asyncio.run(killed_then_finished())
    final = stored_keys(api, namespace)
    active = [n for n, key in final.items() if key["state"] == "active"]
    assert active[:2] == [1, 2]  # key 1, then its successor: never two of one number
    assert all(key["state"] != "staged" or n > active[-1] for n, key in final.items())
    assert len([n for n, k in final.items() if k["state"] in ("slot", "staged")]) == 2


def test_the_next_leader_activates_the_key_a_killed_leader_staged(
        api, custom, namespace, controllers):
    key_policy(custom, namespace, rotationPeriod="30s", stagingPeriod="25s")
    replicas = controllers(2)
    poll(lambda: keys_in(api, namespace, "staged") == [2], timeout=120, what="key 2 staged")
    leader = next(r for r in replicas if r.metric("keymount_leader") == 1)
    other = next(r for r in replicas if r is not leader)
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(10)
    killed = time.monotonic()
    poll(lambda: other.metric("keymount_leader") == 1, timeout=30, what="the other leading")
    took = time.monotonic() - killed
    poll(lambda: keys_in(api, namespace, "active") == [1, 2], timeout=60,
         what="key 2 activated by the new leader")
    keys = stored_keys(api, namespace)  # raises if two Secrets hold one number
    assert keys[2]["activated_at"] - keys[2]["staged_at"] >= timedelta(seconds=25)
    assert took < 30
    secret = api.read_namespaced_secret(keys[2]["name"], namespace)
    assert secret.data["encryption-key"] == secret.data["staged-encryption-key"]
    assert len(base64.b64decode(secret.data["encryption-key"])) == 32


def cluster_policy_for(api, custom, namespace: str, prefix: str, **spec: str) -> str:
    """A ClusterKeyPolicy that selects `namespace` alone (by a label of its own)."""
    import uuid
    mark = uuid.uuid4().hex[:8]
    api.patch_namespace(namespace, {"metadata": {"labels": {f"keymount-e2e/{prefix}": mark}}})
    name = f"{prefix}-{mark}"
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterkeypolicies", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterKeyPolicy",
        "metadata": {"name": name},
        "spec": {"namespaceSelector": {"matchLabels": {f"keymount-e2e/{prefix}": mark}},
                 **spec}})
    return name


def test_a_clusterkeypolicy_gives_its_namespaces_keys_and_reports_them(
        api, custom, namespace, controllers):
    name = cluster_policy_for(api, custom, namespace, "managed", rotationPeriod="30d")
    try:
        controllers(1)
        poll(lambda: keys_in(api, namespace, "active") == [1], timeout=60, what="key 1")

        def ready() -> dict:
            status = custom.get_cluster_custom_object(
                GROUP, VERSION, "clusterkeypolicies", name).get("status") or {}
            return {c["type"]: c["status"] for c in status.get("conditions") or []} | {
                "keys": status.get("keys")}
        poll(lambda: ready() == {"Ready": "True", "keys": 1}, timeout=30,
             what="the ClusterKeyPolicy's status")
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "clusterkeypolicies", name)


def test_a_keypolicy_admitted_before_a_bound_runs_by_it_and_its_status_says_so(
        api, custom, namespace, controllers):
    # Ten years, staged for nearly as long: admitted while nothing bounded the namespace.
    key_policy(custom, namespace, rotationPeriod="3650d", stagingPeriod="3649d")
    name = cluster_policy_for(api, custom, namespace, "bound", maxRotationPeriod="90d")
    try:
        controllers(1)
        poll(lambda: keys_in(api, namespace, "active") == [1], timeout=60, what="key 1")

        def ready() -> dict:
            status = custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, "keypolicies", "rotation").get("status") or {}
            return next((c for c in status.get("conditions") or []
                         if c["type"] == "Ready"), {}) | {"status_": status}
        seen: list[dict] = [{}]

        def bounded() -> dict | None:
            seen[0] = ready()
            return seen[0] if seen[0].get("reason") == "BoundsApplied" else None
        try:
            condition = poll(bounded, timeout=30, what="the KeyPolicy's status")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status: {seen[0]}") from None
        assert condition["status"] == "True"
        assert f"maxRotationPeriod 90d of ClusterKeyPolicy {name!r} applies" in \
            condition["message"]
        assert "stagingPeriod 3649d, which is longer than the rotation period 90d" in \
            condition["message"]
        # The staging is held to the 90 days, so key 2 is staged as soon as key 1 is
        # active, and active when key 1 is 90 days old, not 90 days plus a decade.
        poll(lambda: keys_in(api, namespace, "staged") == [2], timeout=30, what="key 2 staged")

        def times() -> tuple[datetime, datetime] | None:
            status = ready()["status_"]
            if status.get("stagedKey") != 2:
                return None
            last, following = (datetime.fromisoformat(status[f].replace("Z", "+00:00"))
                               for f in ("lastRotation", "nextRotation"))
            return last, following
        last, following = poll(times, timeout=30, what="the status with key 2 staged")
        assert timedelta(days=90) <= following - last < timedelta(days=90, minutes=1)
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "clusterkeypolicies", name)


def test_only_a_workload_that_owns_a_pod_is_named_for_a_restart(api, namespace, keymount,
                                                                 node, admin_kubeconfig):
    # `node` runs kube-controller-manager: the Deployment's ReplicaSet and Pod are real.
    # restart: rolling (and keys rotate --restart) restart what controller_of names. A
    # Pod's ownerReferences are its creator's to write: a Pod pointing at the
    # namespace's database StatefulSet must not get it restarted.
    from apihelpers import BACKEND, create_key, pod_body
    create_key(api, namespace, "k1")
    apps = client.AppsV1Api(api.api_client)
    template = pod_body("x", labels={"app": "api", **BACKEND})
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "api"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": template["metadata"]["labels"]},
                              "spec": template["spec"]}}})
    database = apps.create_namespaced_stateful_set(namespace, {
        "metadata": {"name": "payments-db"},
        "spec": {"replicas": 0, "serviceName": "payments-db",
                 "selector": {"matchLabels": {"app": "db"}},
                 "template": {"metadata": {"labels": {"app": "db", **BACKEND}},
                              "spec": template["spec"]}}})
    # The ReplicaSet controller's Pod: every link genuine.
    made = poll(lambda: api.list_namespaced_pod(namespace, label_selector="app=api").items,
                timeout=60, what="the Deployment's Pod")
    serialize = api.api_client.sanitize_for_serialization
    keys = KeyClient(load_api_client(kubeconfig=str(admin_kubeconfig)), settings=Settings())
    assert keys.controller_of(namespace, serialize(made[0])) == ("Deployment", "api")

    def forged(name: str, uid: str, app: str) -> dict:
        body = pod_body(name, labels={"app": app, **BACKEND})
        body["metadata"]["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "payments-db",
            "uid": uid, "controller": True}]
        return serialize(api.create_namespaced_pod(namespace, body))
    wrong_uid = forged("wrong-uid", "00000000-0000-0000-0000-000000000000", "db")
    unselected = forged("unselected", database.metadata.uid, "api")
    assert keys.controller_of(namespace, wrong_uid) is None
    assert keys.controller_of(namespace, unselected) is None


def test_a_restart_is_refused_by_the_api_server_once_the_workload_moved_on(
        api, namespace, admin_kubeconfig):
    # restart: rolling makes each restart conditional on the read that decided it; the
    # API server refuses a patch whose metadata.resourceVersion is no longer the
    # object's (409), which KeyClient answers as False so the controller reads again.
    apps = client.AppsV1Api(api.api_client)
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "api"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}},
                              "spec": {"containers": [{"name": "app", "image": "x"}]}}}})
    keys = KeyClient(load_api_client(kubeconfig=str(admin_kubeconfig)), settings=Settings())

    def restarted_at_the_version_read() -> str | None:
        # With kube-controller-manager running (another test's node), the Deployment
        # controller writes the new object's status a moment after it is created: the
        # very race this answers False to. Read again until a restart lands.
        read = keys.read_workload(namespace, "Deployment", "api")["metadata"][
            "resourceVersion"]
        return read if keys.restart_workload(
            namespace, "Deployment", "api", at="2026-12-03T00:00:00Z",
            resource_version=read) else None
    read = poll(restarted_at_the_version_read, timeout=30, what="a conditional restart")
    assert keys.restart_workload(namespace, "Deployment", "api", at="2026-12-03T00:00:01Z",
                                 resource_version=read) is False
    stored = apps.read_namespaced_deployment("api", namespace)
    assert stored.spec.template.metadata.annotations == {
        "kubectl.kubernetes.io/restartedAt": "2026-12-03T00:00:00Z"}
