"""The Kubernetes key source and the CLI's API calls through an injected API object:
what each call sends, what each answer becomes, every error as one line. The same
calls against a real API server are in tests/e2e."""

from __future__ import annotations

import base64
import inspect
import json
import logging
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from webhook import cluster
from webhook.cluster import (
    ClusterError,
    KeyClient,
    KubernetesEvents,
    KubernetesKeySource,
    current_namespace,
    has_cluster_config,
    in_cluster_username,
    load_api_client,
)
from webhook.config import Settings
from webhook.events import EventExists, EventGone, NamespaceGone
from webhook.store import KeyStore, PodStore

from builders import key_secret, random_key

SETTINGS = Settings()


class Response:
    def __init__(self, body: Any) -> None:
        self.data = json.dumps(body).encode()


def api_error(status: int, message: str = "no") -> ApiException:
    error = ApiException(status=status, reason="Reason")
    error.body = json.dumps({"message": message})
    return error


class FakeApi:
    """What the API server holds (`secrets`, `pods`) and every call made to it, seen
    through `strict` views of the client's API classes; `fail` names a method to
    raise from, `answers` gives a method its own answer."""

    def __init__(self) -> None:
        self.secrets: list[dict] = []
        self.pods: list[dict] = []
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail: dict[str, Exception] = {}
        self.answers: dict[str, Any] = {}

    def strict(self, api_class: type) -> StrictApi:
        return StrictApi(self, api_class)

    def answer(self, name: str, args: tuple, kwargs: dict) -> Any:
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]
        if name in self.answers:
            return self.answers[name](*args, **kwargs)
        if "secret" in name and name.startswith("list"):
            items = [s for s in self.secrets
                     if not args or s["metadata"]["namespace"] == args[0]]
            return Response({"items": items, "metadata": {"resourceVersion": "7"}})
        if "pod" in name and name.startswith("list"):
            return Response({"items": self.pods, "metadata": {"resourceVersion": "8"}})
        if name == "create_namespaced_secret":
            return Response(args[1])
        if name.startswith("read_namespaced"):
            return Response({"metadata": {"name": args[0], "uid": f"uid-{args[0]}"},
                             "status": {}})
        if name.startswith("list"):
            return Response({"items": [], "metadata": {"resourceVersion": "9"}})
        return None

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


class StrictApi:
    """One of the client's API classes (CoreV1Api, AppsV1Api, ...) answered by a
    `FakeApi`: only that class's methods exist, and each call is bound to the real
    method's signature, so a misspelt method, a method of another API group, a
    missing argument or an unknown keyword fails here as it would on the client."""

    def __init__(self, fake: FakeApi, api_class: type) -> None:
        self._fake, self._class = fake, api_class
        self.api_client = object()

    def __getattr__(self, name: str) -> Any:
        method = None if name.startswith("_") else getattr(self._class, name, None)
        if not callable(method):
            raise AttributeError(f"kubernetes.client.{self._class.__name__} has no "
                                 f"method {name!r}")
        signature = inspect.signature(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                signature.bind(self, *args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self._class.__name__}.{name}: {exc}") from None
            return self._fake.answer(name, args, kwargs)
        return call


@pytest.fixture
def fake() -> FakeApi:
    api = FakeApi()
    api.secrets = [key_secret("k1", random_key(), namespace="shop", index=1),
                   key_secret("k2", random_key(), namespace="shop", index=2)]
    return api


class FakeVersion:
    version = ("1", "20")

    def __init__(self, api_client: Any) -> None:
        pass

    def get_code(self, **kwargs: Any) -> Any:
        major, minor = FakeVersion.version
        return type("Info", (), {"major": major, "minor": minor,
                                 "git_version": f"v{major}.{minor}.0"})()


def source_with(fake: FakeApi, monkeypatch, *, pods: PodStore | None = None,
                namespaces: list[str] | None = None) -> tuple[KubernetesKeySource, KeyStore]:
    monkeypatch.setattr(cluster.client, "VersionApi", FakeVersion)
    store = KeyStore()
    source = KubernetesKeySource(client.ApiClient(), settings=SETTINGS, store=store,
                                 pods=pods, namespaces=namespaces)
    source.api = source.keys.api = fake.strict(client.CoreV1Api)
    if source.pods is not None:
        source.pods.api = fake.strict(client.CoreV1Api)
    return source, store


async def test_load_lists_keys_and_pods_and_warns_before_1_21(fake, monkeypatch, caplog):
    pods = PodStore()
    source, store = source_with(fake, monkeypatch, pods=pods)
    with caplog.at_level(logging.WARNING):
        await source.load()
    assert store.ready and [r.name for r in store.keyring("shop").keys] == ["k1", "k2"]
    assert "list_pod_for_all_namespaces" in fake.names()
    assert "not tamper-proof" in caplog.text


async def test_no_warning_from_1_21_and_a_failing_version_read_is_only_logged(
        fake, monkeypatch, caplog):
    source, _ = source_with(fake, monkeypatch)
    FakeVersion.version = ("1", "30")
    try:
        with caplog.at_level(logging.WARNING):
            await source.load()
        assert "tamper-proof" not in caplog.text
        monkeypatch.setattr(cluster.client, "VersionApi",
                            lambda api: (_ for _ in ()).throw(OSError("down")))
        await source.check_version()
        assert "cannot read the API server's version" in caplog.text
    finally:
        FakeVersion.version = ("1", "20")


async def test_without_rbac_for_pods_the_stale_pod_metric_is_dropped_not_the_source(
        fake, monkeypatch, caplog):
    fake.fail["list_pod_for_all_namespaces"] = api_error(403, "pods is forbidden")
    source, store = source_with(fake, monkeypatch, pods=PodStore())
    await source.load()
    assert store.ready and source.pods is None
    assert "keymount_stale_pods stays empty" in caplog.text


async def test_confirm_caches_a_watched_namespace_and_not_an_unwatched_one(fake,
                                                                          monkeypatch):
    source, store = source_with(fake, monkeypatch, namespaces=["shop"])
    ring = await source.confirm("shop")
    assert [r.name for r in ring.keys] == ["k1", "k2"] and store.namespaces() == ["shop"]
    fake.secrets.append(key_secret("x", random_key(), namespace="other", index=1))
    other = await source.confirm("other")
    assert [r.name for r in other.keys] == ["x"] and store.namespaces() == ["shop"]


@pytest.mark.parametrize("status", [None, 409], ids=["created", "already-there"])
async def test_auto_generate_creates_once_and_reuses_a_racing_replicas_key(
        fake, monkeypatch, status):
    if status:
        fake.fail["create_namespaced_secret"] = api_error(status)
    source, _ = source_with(fake, monkeypatch)
    await source.create_generated_key("shop")
    name, (namespace, manifest), _ = next(c for c in fake.calls
                                          if c[0] == "create_namespaced_secret")
    assert namespace == "shop" and manifest["metadata"]["name"] == "keymount-key-1"
    assert manifest["metadata"]["annotations"]["keymount.io/generated"] == "true"
    assert fake.names()[-1] == "list_namespaced_secret"  # then read back


async def test_auto_generate_fails_on_any_other_error(fake, monkeypatch):
    fake.fail["create_namespaced_secret"] = api_error(403)
    source, _ = source_with(fake, monkeypatch)
    with pytest.raises(ApiException):
        await source.create_generated_key("shop")


@pytest.fixture
def event_api(fake) -> KubernetesEvents:
    sink = KubernetesEvents(client.ApiClient())
    sink.apis = {"core": fake.strict(client.CoreV1Api), "apps": fake.strict(client.AppsV1Api),
                 "batch": fake.strict(client.BatchV1Api)}
    return sink


async def test_an_event_is_created_in_its_namespace(event_api, fake):
    await event_api.create_event({"metadata": {"namespace": "shop", "name": "a.1"}})
    name, args, _ = fake.calls[-1]
    assert name == "create_namespaced_event" and args[0] == "shop"


async def test_an_event_in_a_missing_namespace_raises_namespace_gone(event_api, fake):
    fake.fail["create_namespaced_event"] = api_error(404)
    with pytest.raises(NamespaceGone):
        await event_api.create_event({"metadata": {"namespace": "gone", "name": "a.1"}})


async def test_an_event_whose_name_exists_raises_event_exists(event_api, fake):
    fake.fail["create_namespaced_event"] = api_error(409)
    with pytest.raises(EventExists):
        await event_api.create_event({"metadata": {"namespace": "shop",
                                                   "name": "keymount-key-2.keystaged-2"}})


async def test_a_repeat_is_a_merge_patch_of_the_named_event(event_api, fake):
    await event_api.patch_event("shop", "a.1", {"count": 2})
    name, args, kwargs = fake.calls[-1]
    assert (name, args[:3]) == ("patch_namespaced_event", ("a.1", "shop", {"count": 2}))
    assert kwargs["_content_type"] == "application/merge-patch+json"


async def test_patching_an_expired_event_raises_event_gone(event_api, fake):
    fake.fail["patch_namespaced_event"] = api_error(404)
    with pytest.raises(EventGone):
        await event_api.patch_event("shop", "a.1", {"count": 2})


@pytest.mark.parametrize(("api_version", "kind", "method"), [
    ("apps/v1", "ReplicaSet", "read_namespaced_replica_set"),
    ("apps/v1", "StatefulSet", "read_namespaced_stateful_set"),
    ("apps/v1", "DaemonSet", "read_namespaced_daemon_set"),
    ("batch/v1", "Job", "read_namespaced_job"),
    ("v1", "ReplicationController", "read_namespaced_replication_controller"),
], ids=["replicaset", "statefulset", "daemonset", "job", "replicationcontroller"])
async def test_an_owner_is_read_by_its_kind_and_answers_its_uid(event_api, fake, api_version,
                                                                kind, method):
    assert await event_api.owner_uid("shop", api_version, kind, "api") == "uid-api"
    assert fake.calls[-1][0] == method and fake.calls[-1][1][:2] == ("api", "shop")


async def test_a_missing_owner_has_no_uid(event_api, fake):
    fake.fail["read_namespaced_replica_set"] = api_error(404)
    assert await event_api.owner_uid("shop", "apps/v1", "ReplicaSet", "api") is None


async def test_an_owner_of_another_kind_is_not_read(event_api, fake):
    assert await event_api.owner_uid("shop", "example.com/v1", "Rollout", "api") is None
    assert fake.calls == []


async def test_the_key_source_records_events_through_the_kubernetes_sink(fake, monkeypatch):
    source, _ = source_with(fake, monkeypatch)
    assert isinstance(source.event_sink(), KubernetesEvents)


# --- the CLI's client ---------------------------------------------------------------------

@pytest.fixture
def keys(fake) -> KeyClient:
    client_ = KeyClient(client.ApiClient(), settings=SETTINGS)
    client_.api = fake.strict(client.CoreV1Api)
    client_.apps = fake.strict(client.AppsV1Api)
    return client_


def test_key_records_keyrings_secrets_and_pods_come_from_label_selected_lists(keys, fake):
    assert [r.name for r in keys.keyring("shop").keys] == ["k1", "k2"]
    assert len(keys.key_secrets(None)) == 2 and keys.backend_pods("shop") == []
    selectors = {kw["label_selector"] for _, _, kw in fake.calls}
    assert selectors == {"keymount.io/encryption-key=true", "app.kubernetes.io/component=backend"}


@pytest.mark.parametrize(("status", "message"), [
    (409, "secret 'k9' already exists in namespace 'shop'; pick another name"),
    (404, "namespace 'shop' not found; create it first"),
    (403, "API server said 403: admission webhook denied"),
], ids=["conflict", "no-namespace", "refused"])
def test_create_errors_are_one_clear_line(keys, fake, status, message):
    fake.fail["create_namespaced_secret"] = api_error(status, "admission webhook denied")
    with pytest.raises(ClusterError, match=message):
        keys.create_secret(key_secret("k9", random_key(), index=9))


def test_a_created_key_is_read_back_as_stored(keys):
    record = keys.create_secret(key_secret("k3", random_key(), index=3))
    assert record.name == "k3" and record.index == 3 and record.valid


def test_an_unreachable_api_server_is_one_line(keys, fake):
    fake.fail["patch_namespaced_secret"] = ConnectionRefusedError("refused")
    with pytest.raises(ClusterError, match="cannot reach the API server: "
                                           "ConnectionRefusedError"):
        keys.patch_secret("shop", "k1", {"metadata": {}})
    fake.fail["patch_namespaced_secret"] = api_error(404)
    with pytest.raises(ClusterError, match="secret 'k1' not found in namespace 'shop'"):
        keys.patch_secret("shop", "k1", {"metadata": {}})


@pytest.mark.parametrize(("status", "outcome"), [
    (None, True), (429, False), (409, "already exists in namespace 'shop'"),
    (404, "namespace 'shop' not found")], ids=["created", "throttled-429-is-retryable",
                                               "name-taken", "namespace-gone"])
def test_a_restored_secret_is_created_once_and_a_throttled_refusal_is_told_apart(
        keys, fake, status, outcome):
    if status is not None:
        fake.fail["create_namespaced_secret"] = api_error(status)
    manifest = key_secret("k5", random_key(), index=5)
    if isinstance(outcome, bool):
        assert keys.restore_secret(manifest) is outcome
    else:
        with pytest.raises(ClusterError, match=outcome):
            keys.restore_secret(manifest)
    [(_, _, kwargs)] = [c for c in fake.calls if c[0] == "create_namespaced_secret"]
    assert "dry_run" not in kwargs


def test_a_restore_learns_which_namespaces_exist_and_every_secret_name_there(keys, fake):
    fake.secrets = [key_secret("k1", random_key(), index=1),
                    {"metadata": {"name": "plain", "namespace": "shop"}}]
    fake.answers["list_namespace"] = lambda **_: Response(
        {"items": [{"metadata": {"name": "shop"}}]})
    assert keys.secret_names(["shop", "gone"]) == {"shop": frozenset({"k1", "plain"}),
                                                   "gone": None}


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet"])
def test_workloads_are_restarted_as_kubectl_does_and_read_back(keys, fake, kind):
    keys.restart_workload("shop", kind, "api", at="2026-11-29T00:00:00Z")
    name, args, _ = fake.calls[-1]
    assert name.startswith("patch_namespaced_") and args[:2] == ("api", "shop")
    assert args[2]["spec"]["template"]["metadata"]["annotations"] == {
        "kubectl.kubernetes.io/restartedAt": "2026-11-29T00:00:00Z"}
    assert keys.read_workload("shop", kind, "api")["metadata"]["name"] == "api"


def owned_by(kind: str, name: str, uid: str, pod_name: str = "p", **labels: str) -> dict:
    return {"metadata": {"name": pod_name, "namespace": "shop", "labels": labels,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind,
                                              "name": name, "uid": uid,
                                              "controller": True}]}}


def workload_object(name: str, uid: str, *, owner: dict | None = None,
                    selector: dict | None = None) -> Response:
    meta: dict = {"name": name, "uid": uid}
    if owner:
        meta["ownerReferences"] = [{**owner, "controller": True}]
    return Response({"metadata": meta,
                     "spec": {"selector": {"matchLabels": selector or {"app": "api"}}}})


def test_a_replicasets_deployment_is_the_thing_to_restart(keys, fake):
    fake.answers["read_namespaced_replica_set"] = lambda name, namespace, **_: workload_object(
        name, "rs-uid", owner={"kind": "Deployment", "name": "api", "uid": "deploy-uid"})
    fake.answers["read_namespaced_deployment"] = lambda name, namespace, **_: workload_object(
        name, "deploy-uid")
    pod = owned_by("ReplicaSet", "api-5d9c", "rs-uid", app="api")
    assert keys.controller_of("shop", pod) == ("Deployment", "api")
    assert keys.controller_of("shop", owned_by("Job", "migrate", "job-uid")) == \
        ("Job", "migrate")


@pytest.mark.parametrize(("pod", "why"), [
    pytest.param(owned_by("StatefulSet", "payments-db", "made-up", app="api"),
                 "another-uid", id="a-uid-that-is-not-the-workloads"),
    pytest.param(owned_by("StatefulSet", "payments-db", "sts-uid", app="other"),
                 "not-selected", id="a-pod-its-selector-does-not-select"),
    pytest.param(owned_by("ReplicaSet", "api-5d9c", "made-up", app="api"),
                 "replicaset-uid", id="a-replicaset-that-is-not-its-owner"),
    pytest.param(owned_by("DaemonSet", "gone", "gone-uid", app="api"),
                 "unreadable", id="a-workload-that-cannot-be-read"),
    pytest.param(owned_by("StatefulSet", "payments-db", "sts-uid", "mallory", app="api"),
                 "not-its-pod-name", id="a-name-the-statefulset-never-gives"),
    pytest.param(owned_by("Deployment", "api", "deploy-uid", app="api"),
                 "deployments-own-replicasets", id="a-deployment-named-by-a-pod-itself"),
])
def test_a_pods_controller_reference_is_believed_only_when_it_checks_out(keys, fake, pod, why):
    # Whoever creates a Pod writes its ownerReferences: a Pod of mallory's naming the
    # namespace's database StatefulSet must not get that StatefulSet restarted.
    fake.answers["read_namespaced_stateful_set"] = lambda name, namespace, **_: \
        workload_object(name, "sts-uid")
    fake.answers["read_namespaced_replica_set"] = lambda name, namespace, **_: \
        workload_object(name, "rs-uid", owner={"kind": "Deployment", "name": "api",
                                              "uid": "deploy-uid"})
    fake.answers["read_namespaced_deployment"] = lambda name, namespace, **_: \
        workload_object(name, "deploy-uid", selector={"app": "api"})
    fake.fail["read_namespaced_daemon_set"] = api_error(404)
    assert keys.controller_of("shop", pod) is None, why
    genuine = owned_by("StatefulSet", "payments-db", "sts-uid", "payments-db-0", app="api")
    assert keys.controller_of("shop", genuine) == ("StatefulSet", "payments-db")


def test_a_replicaset_that_is_not_a_deployments_is_reported_never_restarted(keys, fake):
    fake.answers["read_namespaced_replica_set"] = lambda name, namespace, **_: \
        workload_object(name, "rs-uid", owner={"kind": "StatefulSet", "name": "payments-db",
                                              "uid": "sts-uid"}, selector={"app": "db"})
    pod = owned_by("ReplicaSet", "mallory-rs", "rs-uid", app="db")
    assert keys.controller_of("shop", pod) == ("ReplicaSet", "mallory-rs")


def test_an_owner_that_cannot_be_read_for_a_moment_is_an_error_to_retry(keys, fake):
    # 404 and 403 mean no owner to restart through; a 503 or a timeout means "not now".
    fake.fail["read_namespaced_stateful_set"] = api_error(503, "etcdserver: timed out")
    pod = owned_by("StatefulSet", "payments-db", "sts-uid", "payments-db-0", app="db")
    with pytest.raises(ClusterError, match="timed out"):
        keys.controller_of("shop", pod)


def test_one_passes_owners_are_read_once_whatever_the_number_of_pods(keys, fake):
    fake.answers["read_namespaced_replica_set"] = lambda name, namespace, **_: \
        workload_object(name, "rs-uid", owner={"kind": "Deployment", "name": "api",
                                              "uid": "deploy-uid"})
    fake.answers["read_namespaced_deployment"] = lambda name, namespace, **_: \
        workload_object(name, "deploy-uid")
    owners: dict = {}
    for n in range(200):
        pod = owned_by("ReplicaSet", "api-5d9c", "rs-uid", f"api-5d9c-{n}", app="api")
        assert keys.controller_of("shop", pod, owners=owners) == ("Deployment", "api")
    assert len([n for n in fake.names() if n.startswith("read_namespaced")]) == 2


def test_a_restart_is_conditional_on_the_version_read(keys, fake):
    assert keys.restart_workload("shop", "Deployment", "api", at="2026-11-29T00:00:00Z",
                                 resource_version="41") is True
    _, args, _ = fake.calls[-1]
    assert args[2]["metadata"] == {"resourceVersion": "41"}


def test_a_conditional_restart_the_workload_outran_says_so_and_any_other_error_raises(
        keys, fake):
    fake.fail["patch_namespaced_deployment"] = api_error(409, "the object has been modified")
    assert keys.restart_workload("shop", "Deployment", "api", at="2026-11-29T00:00:00Z",
                                 resource_version="41") is False
    # Unconditional (keys rotate --restart), a 409 is an error like any other.
    with pytest.raises(ClusterError, match="modified"):
        keys.restart_workload("shop", "Deployment", "api", at="2026-11-29T00:00:00Z")
    fake.fail["patch_namespaced_deployment"] = api_error(403, "deployments is forbidden")
    with pytest.raises(ClusterError, match="forbidden"):
        keys.restart_workload("shop", "Deployment", "api", at="2026-11-29T00:00:00Z",
                              resource_version="41")


@pytest.mark.parametrize("namespace", ["shop", None], ids=["one-namespace", "all"])
def test_rbac_is_read_for_one_namespace_or_all(keys, fake, monkeypatch, namespace):
    rbac_api = fake.strict(client.RbacAuthorizationV1Api)  # before the class is patched
    monkeypatch.setattr(cluster.client, "RbacAuthorizationV1Api", lambda api: rbac_api)
    fake.secrets = []
    rbac = keys.rbac(namespace)
    called = {name for name, _, _ in fake.calls}
    assert {"list_cluster_role", "list_cluster_role_binding"} <= called
    assert ("list_namespaced_role" in called) is (namespace is not None)
    assert list(rbac.roles) == []


def test_slot_named_secrets_are_read_as_metadata_page_by_page(keys, fake):
    pages = iter([{"items": [{"metadata": {"name": "keymount-key-2"}},
                             {"metadata": {"name": "db-password"}}],
                   "metadata": {"continue": "next"}},
                  {"items": [{"metadata": {"name": "keymount-key-5"}}], "metadata": {}}])
    fake.answers["list_namespaced_secret"] = lambda *a, **kw: Response(next(pages))
    names = [s["metadata"]["name"] for s in keys.slot_named_secrets("shop")]
    assert names == ["keymount-key-2", "keymount-key-5"]
    sent = [kw for name, _, kw in fake.calls if name == "list_namespaced_secret"]
    assert [kw["_continue"] for kw in sent] == [None, "next"]
    assert {kw["_headers"]["Accept"] for kw in sent} == {cluster.METADATA_LIST}


def grants(count: int) -> list:
    from webhook.audit import Access, Grant
    return [Grant(f"user:u{i}", Access("create", "", "pods", "shop"), "b", "r")
            for i in range(count)]


@pytest.mark.parametrize(("answer", "confirmed"), [
    (lambda *a, **kw: Response({"status": {"allowed": True}}), [True, True]),
    (lambda *a, **kw: Response({"status": {"allowed": False}}), [False, False]),
    (None, []),
], ids=["allowed", "denied", "may-not-ask"])
def test_each_grant_is_confirmed_by_a_subject_access_review(keys, fake, monkeypatch,
                                                            answer, confirmed):
    reviews = fake.strict(client.AuthorizationV1Api)  # before the class is patched
    monkeypatch.setattr(cluster.client, "AuthorizationV1Api", lambda api: reviews)
    if answer is None:
        fake.fail["create_subject_access_review"] = api_error(403)
    else:
        fake.answers["create_subject_access_review"] = answer
    asked = grants(2)
    assert list(keys.confirm(asked).values()) == confirmed
    sent = [a[0] for name, a, _ in fake.calls if name == "create_subject_access_review"]
    assert sent[0]["spec"]["user"] == "u0"
    assert len(sent) == (1 if answer is None else 2)  # a refusal is not asked again


def test_subject_access_reviews_are_bounded(keys, fake, monkeypatch):
    reviews = fake.strict(client.AuthorizationV1Api)
    monkeypatch.setattr(cluster.client, "AuthorizationV1Api", lambda api: reviews)
    monkeypatch.setattr(cluster, "MAX_ACCESS_REVIEWS", 3)
    fake.answers["create_subject_access_review"] = \
        lambda *a, **kw: Response({"status": {"allowed": True}})
    assert len(keys.confirm(grants(5))) == 3


# --- configuration ------------------------------------------------------------------------

def kubeconfig(path, namespace: str | None = "team") -> str:
    context: dict = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "main",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "main", "context": context},
                     {"name": "other", "context": {"cluster": "c", "user": "u"}}]}))
    return str(path)


def test_the_namespace_comes_from_the_kubeconfig_context_as_kubectl_takes_it(tmp_path,
                                                                             monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = kubeconfig(tmp_path / "kc")
    assert current_namespace(kubeconfig=path, context=None) == "team"
    assert current_namespace(kubeconfig=path, context="other") == "default"
    assert current_namespace(kubeconfig=str(tmp_path / "missing"), context=None) == "default"
    assert has_cluster_config(path) and not has_cluster_config(str(tmp_path / "missing"))
    assert load_api_client(kubeconfig=path).configuration.host == "https://127.0.0.1:1"
    with pytest.raises(ClusterError, match="cannot load Kubernetes configuration"):
        load_api_client(kubeconfig=str(tmp_path / "missing"))


def test_keymounts_own_user_is_read_from_its_service_account_token(tmp_path):
    claims = base64.urlsafe_b64encode(json.dumps(
        {"sub": "system:serviceaccount:keymount:keymount"}).encode()).rstrip(b"=").decode()
    token = tmp_path / "token"
    token.write_text(f"header.{claims}.signature")
    assert in_cluster_username(token) == "system:serviceaccount:keymount:keymount"
    token.write_text("not a token")
    assert in_cluster_username(token) == ""
    assert in_cluster_username(tmp_path / "missing") == ""


# --- staged keys ---------------------------------------------------------------------

@pytest.fixture
def policy_keys(keys, fake) -> KeyClient:
    keys.custom = fake.strict(client.CustomObjectsApi)
    return keys


@pytest.mark.parametrize(("answer", "expected"), [
    ({"items": [{"metadata": {"name": "rotation"}}]}, True),
    ({"items": []}, False),
    (api_error(404, "the server could not find the requested resource"), False),
], ids=["a-policy", "no-policy", "crd-not-installed"])
def test_has_policy_lists_the_namespaces_keypolicies(policy_keys, fake, answer, expected):
    def answered(*args, **kwargs):
        if isinstance(answer, Exception):
            raise answer
        return Response(answer)
    fake.answers["list_namespaced_custom_object"] = answered
    assert policy_keys.has_policy("shop") is expected
    [(_, args, _)] = [c for c in fake.calls if c[0] == "list_namespaced_custom_object"]
    assert args == ("keymount.io", "v1alpha1", "shop", "keypolicies")


@pytest.mark.parametrize(("selector", "expected"), [
    ({"matchLabels": {"tier": "payments"}}, True),
    ({"matchLabels": {"tier": "web"}}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "Bogus"}]}, False),
], ids=["selected", "not-selected", "invalid-selects-nothing"])
def test_a_namespace_selected_by_a_clusterkeypolicy_has_a_policy(policy_keys, fake, selector,
                                                                 expected):
    policy_keys.api = fake.strict(client.CoreV1Api)
    fake.answers["list_cluster_custom_object"] = lambda *a, **kw: Response({"items": [
        {"metadata": {"name": "baseline"}, "spec": {"namespaceSelector": selector}}]})
    fake.answers["read_namespace"] = lambda name, **kw: Response(
        {"metadata": {"name": name, "labels": {"tier": "payments"}}})
    assert policy_keys.has_policy("shop") is expected


@pytest.mark.parametrize(("status", "error", "message"), [
    (403, "PolicyUnknown", "may not list keypolicies .* staged in namespace 'shop'"),
    (500, "ClusterError", "--stage, or --activate-now"),
], ids=["forbidden", "server-error"])
def test_a_policy_that_cannot_be_read_is_an_error_that_says_why(policy_keys, fake, status,
                                                                 error, message):
    from webhook.errors import PolicyUnknown
    fake.fail["list_namespaced_custom_object"] = api_error(status, "no")
    with pytest.raises(ClusterError if error == "ClusterError" else PolicyUnknown,
                       match=message):
        policy_keys.has_policy("shop")


def test_staging_patches_the_staged_field_at_the_slots_version(keys, fake):
    from webhook.key_secrets import parse_key_secret

    from builders import slot_secret
    slot = slot_secret(3)
    slot["metadata"]["resourceVersion"] = "41"
    key = random_key()

    def patched(name, namespace, body, **kwargs):
        stored = json.loads(json.dumps(slot))
        stored["data"].update(body["data"])
        return Response(stored)
    fake.answers["patch_namespaced_secret"] = patched
    record = keys.stage_slot("shop", parse_key_secret(slot, settings=SETTINGS), key)
    [(_, args, _)] = [c for c in fake.calls if c[0] == "patch_namespaced_secret"]
    assert args[2] == {"metadata": {"resourceVersion": "41"},
                       "data": {"staged-encryption-key": base64.b64encode(key).decode()}}
    assert record is not None and record.state == "staged"


@pytest.mark.parametrize("status", [409, 404], ids=["conflict", "gone"])
def test_a_lost_staging_race_is_none(keys, fake, status):
    from webhook.key_secrets import parse_key_secret

    from builders import slot_secret
    fake.fail["patch_namespaced_secret"] = api_error(status)
    slot = parse_key_secret(slot_secret(3), settings=SETTINGS)
    assert keys.stage_slot("shop", slot, random_key()) is None


def test_activation_copies_the_staged_field_as_stored_at_the_version_read(keys, fake):
    from webhook.key_secrets import parse_key_secret

    from builders import slot_secret
    stored = slot_secret(3)
    stored["metadata"]["resourceVersion"] = "57"
    stored["data"]["staged-encryption-key"] = base64.b64encode(random_key()).decode()
    fake.answers["read_namespaced_secret"] = lambda *a, **kw: Response(stored)
    fake.answers["patch_namespaced_secret"] = lambda name, ns, body, **kw: Response(
        {**stored, "data": {**stored["data"], **body["data"]}})
    record = keys.activate_staged("shop", parse_key_secret(stored, settings=SETTINGS))
    [(_, args, _)] = [c for c in fake.calls if c[0] == "patch_namespaced_secret"]
    assert args[2] == {"metadata": {"resourceVersion": "57"},
                       "data": {"encryption-key": stored["data"]["staged-encryption-key"]}}
    assert record is not None and record.state == "valid"


async def test_which_pods_list_a_secret_is_read_live_from_every_pods_volumes(fake, monkeypatch):
    # Without a label selector: a Pod relabelled out of the backend selector, or whose
    # keymount.io/status was changed, still mounts what its volumes name.
    def running(name, volumes, *, phase="Running", labels=None, annotations=None):
        return {"metadata": {"name": name, "namespace": "shop", "labels": labels or {},
                             "annotations": annotations or {}},
                "spec": {"volumes": volumes}, "status": {"phase": phase}}
    projected = [{"name": "keymount-encryption-keys", "projected": {"sources": [
        {"secret": {"name": "k1", "items": [{"key": "encryption-key",
                                              "path": "encryption-key-1"}]}}]}}]
    fake.pods = [
        running("relabelled", projected, annotations={"keymount.io/status": "garbled"}),
        running("own-volume", [{"name": "mine", "secret": {"secretName": "k1"}}]),
        running("done", projected, phase="Succeeded"),
        running("other", [{"name": "mine", "secret": {"secretName": "k2"}}])]
    source, _ = source_with(fake, monkeypatch)
    assert await source.pods_listing("shop", "k1") == ("own-volume", "relabelled")
    [(_, _, kwargs)] = [c for c in fake.calls if c[0] == "list_namespaced_pod"]
    assert "label_selector" not in kwargs


def test_a_retire_or_pin_waits_out_keymounts_429_as_a_restore_does(keys, fake):
    # Retiring a key is allowed only on a live read (docs/contract.md, "Refusals"): while
    # keymount limits its live reads it answers 429, "retry in a few seconds". `keys
    # retire` sends one patch; a 429 must be waited out (as `keys restore` does), not
    # end the command after it has asked "Destroy the key material ...?".
    answers = [api_error(429, "keymount is limiting live reads; retry in a few seconds")] * 3
    slept = []

    def patch(*args, **kwargs):
        if answers:
            raise answers.pop()
        return Response({})
    fake.answers["patch_namespaced_secret"] = patch
    keys.sleep = slept.append
    keys.patch_secret("shop", "k1", {"metadata": {"annotations": {"keymount.io/retired": "x"}}})
    assert fake.names().count("patch_namespaced_secret") == 4 and len(slept) == 3
