"""The Kubernetes API, with the official `kubernetes` client: keymount's key source
(list and watch of key Secrets, through `watch.ListWatch`) and the CLI's calls.

The cache keeps only what `KeyRecord` holds: no key bytes outlive `parse_key_secret`.
Every blocking call runs in a daemon thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .audit import Grant, Rbac
from .config import Settings
from .errors import PolicyUnknown, UserFacingError
from .events import EventExists, EventGone, NamespaceGone
from .key_secrets import (
    ApiObject,
    SlotOutcome,
    build_key_secret,
    is_key_secret,
    parse_key_secret,
)
from .keys import KeyRecord, Keyring, build_keyring, generate_key
from .lifecycle import (
    GENERATED_KEY_NAME,
    RESTARTABLE,
    PodKeys,
    controller_ref,
    controls,
    parse_pod_keys,
    pods_listing,
)
from .metrics import Metrics
from .names import (
    CLUSTERKEYPOLICY_PLURAL,
    GENERATED_ANNOTATION,
    KEYPOLICY_PLURAL,
    POLICY_GROUP,
    POLICY_VERSION,
    as_dict,
    slot_number,
    slot_secret_name,
    staged_field,
)
from .policyreads import PolicyReadError
from .policystore import PolicyStore
from .store import KeyStore, PodStore
from .watch import ListWatch, WatchTimings, call_list, describe_error, in_daemon_thread

log = logging.getLogger("keymount.cluster")
__all__ = ["ClusterError", "KeyClient", "KubernetesKeySource", "WatchTimings",
           "describe_api_error", "in_daemon_thread", "load_api_client"]


class ClusterError(UserFacingError):
    """An API failure, as one line a user can act on."""


def has_cluster_config(kubeconfig: str | None = None) -> bool:
    if kubeconfig:
        return Path(kubeconfig).is_file()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    paths = os.environ.get("KUBECONFIG", "").split(os.pathsep)
    return any(Path(p).is_file() for p in paths if p) or \
        Path("~/.kube/config").expanduser().is_file()


SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def service_account_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str | None:
    """The namespace of this Pod's ServiceAccount; None outside a cluster."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def in_cluster_username(token_file: Path = SERVICE_ACCOUNT_TOKEN) -> str:
    """The username the API server gives this Pod's ServiceAccount token: its `sub`
    claim, `system:serviceaccount:NS:NAME`. Read from our own token file, so no
    signature check is needed; empty outside a cluster."""
    try:
        payload = token_file.read_text().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (OSError, IndexError, ValueError):
        return ""
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else ""


def load_api_client(*, kubeconfig: str | None = None, context: str | None = None
                    ) -> client.ApiClient:
    """In-cluster config inside a Pod, else the kubeconfig kubectl would use."""
    try:
        if not kubeconfig and not context and os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (config.ConfigException, OSError) as exc:
        raise ClusterError(f"cannot load Kubernetes configuration: {exc}") from None


describe_api_error = describe_error  # one error line for API calls, here and in the CLI


def kubernetes_before(major: str, minor: str, want_major: int, want_minor: int) -> bool:
    """Whether an API server's version ("1", "20+") is older than want_major.want_minor."""
    try:
        return (int(major.rstrip("+")), int(minor.rstrip("+"))) < (want_major, want_minor)
    except ValueError:
        return False


class KubernetesKeySource:
    """Key Secrets by list and watch, and optionally backend Pods (for the stale-Pod
    metric); one live read before a key-state refusal; --auto-generate; Events."""

    def __init__(self, api_client: client.ApiClient, *, settings: Settings, store: KeyStore,
                 metrics: Metrics | None = None, namespaces: list[str] | None = None,
                 timings: WatchTimings = WatchTimings(), pods: PodStore | None = None) -> None:
        self.api = client.CoreV1Api(api_client)
        self.settings = settings
        self.store = store
        self.metrics = metrics
        # None watches every namespace with one watch; otherwise one watch each.
        self.scopes: list[str | None] = list(namespaces) if namespaces else [None]
        restarts = metrics.watch_restarts.inc if metrics else (lambda: None)
        seen = metrics.watch_event if metrics else (lambda: None)
        self.keys: ListWatch[KeyRecord] = ListWatch(
            self.api, singular="secret", selector=settings.key_selector.text,
            scopes=self.scopes, parse=lambda item: parse_key_secret(item, settings=settings),
            sink=store, timings=timings, on_restart=restarts, on_event=seen)
        self.pods: ListWatch[PodKeys] | None = None if pods is None else ListWatch(
            self.api, singular="pod", selector=settings.pod_selector.text,
            scopes=self.scopes, parse=parse_pod_keys, sink=pods, timings=timings,
            on_restart=restarts)

    async def load(self) -> None:
        """The first full list; the store (and /readyz) is ready only after it."""
        await self.check_version()
        count = await self.keys.load()
        log.info("listed key Secrets", extra={"count": count,
                                              "scopes": [s or "*" for s in self.scopes]})
        if self.pods is not None:
            try:
                await self.pods.load()
            except Exception as exc:  # the metric is a help, not a condition to serve
                log.warning("cannot list backend Pods; keymount_stale_pods stays empty",
                            extra={"error": describe_error(exc)})
                self.pods = None

    async def run(self) -> None:
        await asyncio.gather(self.keys.run(), *([self.pods.run()] if self.pods else []))

    async def check_version(self) -> None:
        """Namespace exclusion is tamper-proof only from Kubernetes 1.21, which sets the
        label kubernetes.io/metadata.name itself; before, anyone who may label a
        namespace can label it kube-system and switch keymount off there."""
        try:
            info = await in_daemon_thread(lambda: client.VersionApi(
                self.api.api_client).get_code(_request_timeout=(5, 10)))
        except Exception as exc:
            log.warning("cannot read the API server's version",
                        extra={"error": describe_error(exc)})
            return
        if kubernetes_before(str(info.major), str(info.minor), 1, 21):
            log.warning(
                "Kubernetes before 1.21: the webhooks' namespaceSelector on "
                "kubernetes.io/metadata.name is not tamper-proof (the label is not set "
                "and guarded by the API server), so whoever may label a namespace can "
                "exclude it from keymount; restrict namespace updates in RBAC, or upgrade",
                extra={"version": info.git_version})

    async def confirm(self, namespace: str) -> Keyring:
        """One live read of a namespace before a key-state refusal (docs/contract.md,
        "Refusals"), or before judging a new key's number."""
        records, version = await in_daemon_thread(lambda: self.keys.list(namespace))
        if None in self.scopes or namespace in self.scopes:
            # The watch may have delivered newer changes while the read was in flight:
            # the store keeps whichever is newer, per Secret (store.KeyStore).
            return self.store.replace_namespace(namespace, records, version=version)
        # Not watched: answer from the read, but do not cache what no watch keeps fresh.
        return build_keyring(namespace, records)

    async def pods_listing(self, namespace: str, secret: str) -> tuple[str, ...] | None:
        """Every Pod of the namespace, listed live without a label selector (a Pod
        relabelled out of the backend selector still runs with its volumes), and those
        whose volumes name `secret` (lifecycle.pods_listing)."""
        def read() -> tuple[str, ...]:
            response = call_list(self.api, "pod", namespace, _preload_content=False,
                                 _request_timeout=(10, 60))
            return pods_listing(list_items(response), secret)
        return await in_daemon_thread(read)

    async def create_generated_key(self, namespace: str) -> Keyring:
        """--auto-generate: make the namespace's one generated key, or reuse it.

        The name is fixed, so the API server arbitrates between replicas: whoever
        loses the race gets 409 AlreadyExists and reads the winner's key instead of
        making a second one.
        """
        manifest = build_key_secret(GENERATED_KEY_NAME, namespace=namespace,
                                    key=generate_key(), index=1, settings=self.settings)
        manifest["metadata"].setdefault("annotations", {})[GENERATED_ANNOTATION] = "true"

        def create() -> None:
            try:
                self.api.create_namespaced_secret(namespace, manifest,
                                                  _request_timeout=(5, 10))
            except ApiException as exc:
                if exc.status != 409:
                    raise
                log.info("generated key already exists; reusing it",
                         extra={"namespace": namespace, "secret": GENERATED_KEY_NAME})

        await in_daemon_thread(create)
        return await self.confirm(namespace)

    def event_sink(self) -> KubernetesEvents:
        return KubernetesEvents(self.api.api_client)


# A list of ClusterKeyPolicies longer than this is refused unread: with the schema's
# caps, MAX_CLUSTER_POLICIES of them fill far less.
MAX_POLICY_LIST_BYTES = 8 * 1024 * 1024


class KubernetesPolicyApi:
    """policyreads.PolicyApi: the reads behind a KeyPolicy decision, each in a daemon
    thread and bounded in time well inside the webhook's 5 s timeout."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # Each read below runs whole in its thread: with _preload_content=False the body is
    # read when asked for, so reading and decoding it there keeps it off the loop.

    async def namespace_labels(self, namespace: str) -> dict[str, str]:
        def read() -> dict[str, str]:
            try:
                response = self.core.read_namespace(
                    namespace, _request_timeout=(2, 3), _preload_content=False)
            except ApiException as exc:
                if exc.status == 404:
                    raise PolicyReadError(f"namespace {namespace!r} not found") from None
                raise
            found = _bounded_json(response, what=f"namespace {namespace!r}")
            labels = (found.get("metadata") or {}).get("labels") or {}
            return {str(k): str(v) for k, v in labels.items()} \
                if isinstance(labels, dict) else {}
        return await in_daemon_thread(read)

    async def cluster_policies(self, limit: int) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            listed = _bounded_json(self.custom.list_cluster_custom_object(
                POLICY_GROUP, POLICY_VERSION, CLUSTERKEYPOLICY_PLURAL, limit=limit,
                _request_timeout=(2, 3), _preload_content=False),
                what="the ClusterKeyPolicies")
            if (listed.get("metadata") or {}).get("continue"):
                raise PolicyReadError(f"there are more than {limit} ClusterKeyPolicies; "
                                      f"merge some (kubectl get {CLUSTERKEYPOLICY_PLURAL})")
            items = listed.get("items") or []
            return [item for item in items if isinstance(item, dict)]
        return await in_daemon_thread(read)

    async def keypolicy_names(self, namespace: str, limit: int) -> list[str]:
        def read() -> list[str]:
            listed = _bounded_json(self.custom.list_namespaced_custom_object(
                POLICY_GROUP, POLICY_VERSION, namespace, KEYPOLICY_PLURAL, limit=limit,
                _request_timeout=(2, 3), _preload_content=False),
                what=f"the KeyPolicies of namespace {namespace!r}")
            items = listed.get("items") or []
            return [str(name) for item in items if isinstance(item, dict)
                    for name in [(item.get("metadata") or {}).get("name")] if name]
        return await in_daemon_thread(read)


def _bounded_json(response: Any, *, what: str) -> Any:
    """The JSON body of a response asked for with _preload_content=False, read (at most
    MAX_POLICY_LIST_BYTES) and decoded in the caller's thread."""
    data = response.read(MAX_POLICY_LIST_BYTES + 1)
    if len(data) > MAX_POLICY_LIST_BYTES:
        response.close()  # the rest unread: the connection is not reused
        raise PolicyReadError(f"{what} take more than {MAX_POLICY_LIST_BYTES} bytes")
    response.release_conn()
    found = json.loads(data)
    if not isinstance(found, dict):
        raise PolicyReadError(f"{what}: the API server's answer is not a JSON object")
    return found


# The controllers whose Pods keymount may refuse, and how to read one. Any other owner
# kind (a custom resource) is not read: its refusals are recorded on the namespace.
_OWNER_READERS: dict[tuple[str, str], tuple[str, str]] = {
    ("apps/v1", "ReplicaSet"): ("apps", "read_namespaced_replica_set"),
    ("apps/v1", "StatefulSet"): ("apps", "read_namespaced_stateful_set"),
    ("apps/v1", "DaemonSet"): ("apps", "read_namespaced_daemon_set"),
    ("batch/v1", "Job"): ("batch", "read_namespaced_job"),
    ("v1", "ReplicationController"): ("core", "read_namespaced_replication_controller"),
}


class KubernetesEvents:
    """events.EventSink: the Event and owner calls of events.EventRecorder, each in a
    daemon thread, with the API's "not found" turned into what the recorder decides on."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.apis: dict[str, Any] = {"core": client.CoreV1Api(api_client),
                                     "apps": client.AppsV1Api(api_client),
                                     "batch": client.BatchV1Api(api_client)}

    async def create_event(self, event: dict[str, Any]) -> None:
        namespace = event["metadata"]["namespace"]
        try:
            await in_daemon_thread(lambda: self.apis["core"].create_namespaced_event(
                namespace, event, _request_timeout=(5, 10), _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:  # NamespaceLifecycle: no such namespace
                raise NamespaceGone(namespace) from None
            if exc.status == 409:
                raise EventExists(event["metadata"]["name"]) from None
            raise

    async def patch_event(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        try:
            # The client would send a dict as a JSON patch (its first content type).
            await in_daemon_thread(lambda: self.apis["core"].patch_namespaced_event(
                name, namespace, patch, _content_type="application/merge-patch+json",
                _request_timeout=(5, 10), _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                raise EventGone(name) from None
            raise

    async def owner_uid(self, namespace: str, api_version: str, kind: str,
                        name: str) -> str | None:
        reader = _OWNER_READERS.get((api_version, kind))
        if reader is None:
            return None
        read = getattr(self.apis[reader[0]], reader[1])
        try:
            response = await in_daemon_thread(lambda: read(
                name, namespace, _request_timeout=(5, 10), _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        uid = (json.loads(response.data).get("metadata") or {}).get("uid")
        return uid if isinstance(uid, str) else None


# --- the CLI's calls -------------------------------------------------------------

def current_namespace(*, kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the kubeconfig context, as kubectl defaults to it."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        path = SERVICE_ACCOUNT_NAMESPACE
        if path.is_file():
            return path.read_text().strip() or "default"
    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"



T = TypeVar("T")
THROTTLED = 429  # keymount's refusal while it limits live reads (webhook/decisions.py)
PATCH_PATIENCE = 120.0  # how long a judged patch (retire, pin) waits out keymount's 429s


def list_items(response: Any) -> list[ApiObject]:
    """The items of a list read with _preload_content=False (raw JSON)."""
    items: list[ApiObject] = json.loads(response.data).get("items") or []
    return items


# A bound on `audit`'s SubjectAccessReviews: one per finding, each a request.
MAX_ACCESS_REVIEWS = 500
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


def access_review(grant: Grant) -> ApiObject:
    """The SubjectAccessReview that asks whether the grant's subject may do its access."""
    kind, _, name = grant.subject.partition(":")
    who: ApiObject = {"groups": [name]} if kind == "group" else \
        {"user": f"system:serviceaccount:{name}" if kind == "serviceaccount" else name}
    access = grant.access
    # RBAC writes a subresource as `pods/exec`; a review names it apart.
    resource, _, subresource = access.resource.partition("/")
    attributes = {"verb": access.verb, "group": access.group, "resource": resource,
                  "namespace": access.namespace, "name": access.name}
    if subresource:
        attributes["subresource"] = subresource
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {**who, "resourceAttributes": attributes}}


class KeyClient:
    """The API calls the CLI makes, each turned into one clear error line (the CLI
    holds it as `cli_keys.KeyApi`)."""

    def __init__(self, api_client: client.ApiClient, *, settings: Settings) -> None:
        self.api = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.settings = settings
        self.sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_kubeconfig(cls, *, kubeconfig: str | None, context: str | None,
                        settings: Settings) -> KeyClient:
        return cls(load_api_client(kubeconfig=kubeconfig, context=context), settings=settings)

    def _call(self, function: Callable[..., T], *args: Any,
              errors: Mapping[int, str] | None = None, **kwargs: Any) -> T:
        """Call the API; `errors` gives the message for a status the caller can explain."""
        try:
            return function(*args, **kwargs)
        except ApiException as exc:
            message = (errors or {}).get(exc.status) or describe_api_error(exc)
            raise ClusterError(message) from None
        except Exception as exc:  # connection refused, TLS, timeouts
            raise ClusterError(describe_api_error(exc)) from None

    def _list_json(self, namespace: str | None, singular: str, *,
                   label_selector: str) -> list[ApiObject]:
        return list_items(self._call(call_list, self.api, singular, namespace,
                                     label_selector=label_selector, _preload_content=False,
                                     _request_timeout=(10, 60)))

    def key_secrets(self, namespace: str | None) -> list[ApiObject]:
        """The key Secrets as stored, key bytes included (backups only)."""
        return self._list_json(namespace, "secret",
                               label_selector=self.settings.key_selector.text)

    def secret_names(self, namespaces: list[str]) -> dict[str, frozenset[str] | None]:
        """For a restore's check before it writes: per namespace, the names of every
        Secret in it (key Secrets or not: a name is one Secret), None when the namespace
        does not exist. One list of namespaces, then one list of Secrets each."""
        listed = list_items(self._call(self.api.list_namespace, _preload_content=False,
                                       _request_timeout=(10, 60)))
        existing = {(item.get("metadata") or {}).get("name") for item in listed}
        names: dict[str, frozenset[str] | None] = {}
        for namespace in namespaces:
            if namespace not in existing:
                names[namespace] = None
                continue
            items = list_items(self._call(self.api.list_namespaced_secret, namespace,
                                          _preload_content=False, _request_timeout=(10, 60)))
            names[namespace] = frozenset(
                str((item.get("metadata") or {}).get("name")) for item in items)
        return names

    def restore_secret(self, manifest: ApiObject) -> bool:
        """Create one restored key Secret; False when keymount refused it only because
        it is limiting live reads right now (HTTP 429: retry after a moment)."""
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            self.api.create_namespaced_secret(namespace, manifest, _preload_content=False,
                                              _request_timeout=(10, 30))
            return True
        except ApiException as exc:
            if exc.status == THROTTLED:
                return False
            message = {404: f"namespace {namespace!r} not found",
                       409: f"secret {name!r} already exists in namespace {namespace!r}"
                       }.get(exc.status or 0) or describe_api_error(exc)
            raise ClusterError(message) from None
        except Exception as exc:
            raise ClusterError(describe_api_error(exc)) from None

    def rbac(self, namespace: str | None) -> Rbac:
        """Roles and bindings (of one namespace, and cluster-wide), for `audit`."""
        rbac = client.RbacAuthorizationV1Api(self.api.api_client)

        def items(function: Callable[..., Any], *args: Any) -> list[ApiObject]:
            return list_items(self._call(function, *args, _preload_content=False,
                                         _request_timeout=(10, 60)))
        if namespace is None:
            roles = items(rbac.list_role_for_all_namespaces)
            bindings = items(rbac.list_role_binding_for_all_namespaces)
        else:
            roles = items(rbac.list_namespaced_role, namespace)
            bindings = items(rbac.list_namespaced_role_binding, namespace)
        return Rbac(items(rbac.list_cluster_role), items(rbac.list_cluster_role_binding),
                    roles, bindings)

    def confirm(self, grants: list[Grant]) -> dict[Grant, bool]:
        """What the API server answers, by SubjectAccessReview, for each grant's subject
        and access: True, it may. Asked as the kubeconfig's user, who needs `create` on
        subjectaccessreviews (cluster admins have it); without it, or past
        MAX_ACCESS_REVIEWS, a grant is left out and audit shows it unconfirmed."""
        reviews = client.AuthorizationV1Api(self.api.api_client)
        answers: dict[Grant, bool] = {}
        for grant in grants[:MAX_ACCESS_REVIEWS]:
            try:
                response = reviews.create_subject_access_review(
                    access_review(grant), _preload_content=False, _request_timeout=(10, 30))
            except ApiException as exc:
                if exc.status in (401, 403):  # the caller says what is unconfirmed
                    break
                raise ClusterError(describe_api_error(exc)) from None
            except Exception as exc:  # connection refused, TLS, timeouts
                raise ClusterError(describe_api_error(exc)) from None
            status = json.loads(response.data).get("status") or {}
            answers[grant] = status.get("allowed") is True
        return answers

    def slot_named_secrets(self, namespace: str | None) -> list[ApiObject]:
        """The metadata (never the data: the API server sends PartialObjectMetadata) of
        every Secret named like a key slot, labelled or not, page by page."""
        found: list[ApiObject] = []
        token = ""
        while True:
            response = self._call(call_list, self.api, "secret", namespace, limit=500,
                                  _continue=token or None,
                                  _headers={"Accept": METADATA_LIST},
                                  _preload_content=False, _request_timeout=(10, 60))
            page = json.loads(response.data)
            found += [item for item in page.get("items") or []
                      if slot_number(str((item.get("metadata") or {}).get("name"))) is not None]
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return found

    def key_records(self, namespace: str | None) -> list[KeyRecord]:
        items = self._list_json(namespace, "secret",
                                label_selector=self.settings.key_selector.text)
        return [parse_key_secret(i, settings=self.settings) for i in items]

    def keyring(self, namespace: str) -> Keyring:
        return build_keyring(namespace, self.key_records(namespace))

    def backend_pods(self, namespace: str | None) -> list[ApiObject]:
        return self._list_json(namespace, "pod",
                               label_selector=self.settings.pod_selector.text)

    def pods(self, namespace: str | None) -> list[ApiObject]:
        """Every Pod, whatever its labels (which can change on a running Pod)."""
        return self._list_json(namespace, "pod", label_selector="")

    def create_secret(self, manifest: ApiObject) -> KeyRecord:
        """Create a key Secret; what was stored (keymount's webhook stamps the number)."""
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        response = self._call(self.api.create_namespaced_secret, namespace, manifest,
                              _preload_content=False, errors={
            409: f"secret {name!r} already exists in namespace {namespace!r}; pick another "
                 f"name, or add a key with `keymount keys rotate -n {namespace}`",
            404: f"namespace {namespace!r} not found; create it first: "
                 f"kubectl create namespace {namespace}"})
        return parse_key_secret(json.loads(response.data), settings=self.settings)

    def reserve_slot(self, namespace: str, number: int) -> SlotOutcome:
        """Create the empty slot of key `number`: "reserved"; "exists" when a key
        Secret has that name already (another writer reserved it first); "taken" when
        a Secret that is no key Secret has it (the number cannot be a slot)."""
        name = slot_secret_name(number)
        manifest = build_key_secret(name, namespace=namespace, key=None, index=number,
                                    settings=self.settings)
        try:
            self.api.create_namespaced_secret(namespace, manifest, _request_timeout=(5, 30))
            return "reserved"
        except ApiException as exc:
            if exc.status != 409:
                raise ClusterError(describe_api_error(exc)) from None
        except Exception as exc:
            raise ClusterError(describe_api_error(exc)) from None
        response = self._call(self.api.read_namespaced_secret, name, namespace,
                              _preload_content=False, _request_timeout=(5, 30))
        return "exists" if is_key_secret(json.loads(response.data),
                                         settings=self.settings) else "taken"

    def fill_slot(self, namespace: str, slot: KeyRecord, key: bytes) -> KeyRecord | None:
        """Give an empty slot its key, only if it is still as `slot` read it: the patch
        carries the resourceVersion, so of two writers filling one slot the API server
        takes one and answers the other 409 Conflict. None for the loser (or when the
        slot is gone); the stored key otherwise."""
        return self._patch_versioned(namespace, slot.name, slot.revision, {
            self.settings.key_field: base64.b64encode(key).decode()})

    def stage_slot(self, namespace: str, slot: KeyRecord, key: bytes) -> KeyRecord | None:
        """Stage a key in an empty slot (its staged field), as `fill_slot` fills one:
        None when another writer changed the slot first."""
        return self._patch_versioned(namespace, slot.name, slot.revision, {
            staged_field(self.settings.key_field): base64.b64encode(key).decode()})

    def activate_staged(self, namespace: str, staged: KeyRecord) -> KeyRecord | None:
        """Activate a staged key: its key field gets the staged field's bytes, copied as
        stored (the CLI never decodes them), if the Secret is still as read here. None
        when it changed meanwhile (read the namespace again) or is gone."""
        response = self._call(self.api.read_namespaced_secret, staged.name, namespace,
                              _preload_content=False, _request_timeout=(5, 30), errors={
            404: f"staged key {staged.name!r} is gone from namespace {namespace!r}; "
                 f"`keymount keys list -n {namespace}` shows its keys"})
        secret = json.loads(response.data)
        data = secret.get("data") or {}
        stored = data.get(staged_field(self.settings.key_field))
        if not isinstance(stored, str) or data.get(self.settings.key_field):
            return None  # activated (by another writer) or cancelled meanwhile
        # Conditional on the version the activation was decided on, when the caller
        # read one: a Secret changed since is read and judged again.
        version = staged.revision or (secret.get("metadata") or {}).get("resourceVersion")
        return self._patch_versioned(namespace, staged.name, version,
                                     {self.settings.key_field: stored})

    def has_policy(self, namespace: str) -> bool:
        """Whether the namespace has a policy (keymount.io/v1alpha1): a KeyPolicy of its
        own, or a ClusterKeyPolicy selecting it. Then `keys rotate` stages. Without the
        CRDs installed (404) there is none; PolicyUnknown when the user may not read
        them (403: RBAC answers before the API server looks for the resource, so this is
        also what a user without that right sees when the CRDs are not installed)."""
        if self._listed(namespace, KEYPOLICY_PLURAL, lambda: list_items(
                self.custom.list_namespaced_custom_object(
                    POLICY_GROUP, POLICY_VERSION, namespace, KEYPOLICY_PLURAL, limit=1,
                    _preload_content=False, _request_timeout=(5, 30)))):
            return True
        cluster = self._listed(namespace, CLUSTERKEYPOLICY_PLURAL, lambda: list_items(
            self.custom.list_cluster_custom_object(
                POLICY_GROUP, POLICY_VERSION, CLUSTERKEYPOLICY_PLURAL,
                _preload_content=False, _request_timeout=(5, 30))))
        if not cluster:
            return False
        from .policy import PolicyError, parse_cluster_key_policy
        response = self._call(self.api.read_namespace, namespace, _preload_content=False,
                              _request_timeout=(5, 30))
        labels = as_dict(as_dict(json.loads(response.data).get("metadata")).get("labels"))
        for obj in cluster:
            try:
                if parse_cluster_key_policy(obj).selects(labels):
                    return True
            except PolicyError:
                continue  # an invalid one selects nothing (the controller says so)
        return False

    def write_cluster_policy_status(self, name: str, status: dict[str, Any], *,
                                    resource_version: str | None = None) -> bool:
        """The controller's status of a ClusterKeyPolicy (its status subresource), as
        `write_policy_status` writes a KeyPolicy's."""
        return self._write_status(partial(
            self.custom.patch_cluster_custom_object_status, POLICY_GROUP, POLICY_VERSION,
            CLUSTERKEYPOLICY_PLURAL, name), status, resource_version)

    def _listed(self, namespace: str, plural: str,
                list_call: Callable[[], list[ApiObject]]) -> list[ApiObject]:
        try:
            return list_call()
        except ApiException as exc:
            if exc.status == 404:
                return []
            if exc.status == 403:
                raise PolicyUnknown(
                    f"you may not list {plural} (keymount.io), so keymount cannot tell "
                    f"whether new keys are staged in namespace {namespace!r}") from None
            raise ClusterError(
                f"cannot tell whether namespace {namespace!r} has a policy "
                f"({describe_api_error(exc)}); say how to rotate: --stage, or "
                f"--activate-now") from None
        except Exception as exc:
            raise ClusterError(describe_api_error(exc)) from None

    def write_policy_status(self, namespace: str, name: str, status: dict[str, Any], *,
                            resource_version: str | None = None) -> bool:
        """The controller's status of a KeyPolicy, through its status subresource (a
        merge patch: a field set to None is removed). With `resource_version`, only if
        the policy is still as read then: False when it is not (409)."""
        return self._write_status(partial(
            self.custom.patch_namespaced_custom_object_status, POLICY_GROUP, POLICY_VERSION,
            namespace, KEYPOLICY_PLURAL, name), status, resource_version)

    def _write_status(self, patch: Callable[..., Any], status: dict[str, Any],
                      resource_version: str | None) -> bool:
        return _conditional_patch(partial(patch, _request_timeout=(5, 30)),
                                  {"status": status}, resource_version)

    def _patch_versioned(self, namespace: str, name: str, version: object,
                         data: dict[str, str]) -> KeyRecord | None:
        """A merge patch of `data` that the API server applies only at `version` (409
        otherwise): None on a conflict or when the Secret is gone."""
        patch = {"metadata": {"resourceVersion": str(version)}, "data": data}
        try:
            response = self.api.patch_namespaced_secret(
                name, namespace, patch, _preload_content=False, _request_timeout=(5, 30))
        except ApiException as exc:
            if exc.status in (404, 409):
                return None
            raise ClusterError(describe_api_error(exc)) from None
        except Exception as exc:
            raise ClusterError(describe_api_error(exc)) from None
        return parse_key_secret(json.loads(response.data), settings=self.settings)

    def patch_secret(self, namespace: str, name: str, patch: ApiObject) -> None:
        """A strategic merge patch of one Secret (`null` deletes a field); keymount's
        guard judges it. Retiring is judged only on a live read: keymount's 429 while it
        limits them is waited out (0.05 s doubling to 1 s), as a restore does."""
        deadline, delay = time.monotonic() + PATCH_PATIENCE, 0.05
        while True:
            try:
                self.api.patch_namespaced_secret(name, namespace, patch,
                                                 _preload_content=False)
                return
            except ApiException as exc:
                if exc.status == THROTTLED and time.monotonic() + delay <= deadline:
                    self.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise ClusterError(
                    f"secret {name!r} not found in namespace {namespace!r}; `keymount keys "
                    f"list -n {namespace}` shows its keys" if exc.status == 404
                    else describe_api_error(exc)) from None
            except Exception as exc:  # connection refused, TLS, timeouts
                raise ClusterError(describe_api_error(exc)) from None

    def _workload_api(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        singular = {"Deployment": "deployment", "StatefulSet": "stateful_set",
                    "DaemonSet": "daemon_set"}[kind]
        return (getattr(self.apps, f"read_namespaced_{singular}"),
                getattr(self.apps, f"patch_namespaced_{singular}"))

    def restart_workload(self, namespace: str, kind: str, name: str, *, at: str,
                         resource_version: str | None = None) -> bool:
        """What `kubectl rollout restart` does: a new Pod template annotation. With
        `resource_version`, only if the workload is still as read then: False when it
        is not (409: someone else restarted or changed it since; read it again)."""
        _, patch = self._workload_api(kind)
        return _conditional_patch(partial(patch, name, namespace), {"spec": {"template": {
            "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": at}}}}},
            resource_version)

    def read_workload(self, namespace: str, kind: str, name: str) -> ApiObject:
        read, _ = self._workload_api(kind)
        response = self._call(read, name, namespace, _preload_content=False)
        workload: ApiObject = json.loads(response.data)
        return workload

    def controller_of(self, namespace: str, pod: ApiObject, *,
                      owners: dict[tuple[str, str], ApiObject | None] | None = None
                      ) -> tuple[str, str] | None:
        """The workload that controls `pod` (a ReplicaSet's Deployment, so the user
        restarts what they manage), each link read and checked as Kubernetes' own
        controllers check it (lifecycle.controls), and only along the links they make:
        Pod to ReplicaSet to Deployment, Pod to StatefulSet (a Pod named
        `<set>-<ordinal>`), Pod to DaemonSet. None when a link does not check out, or
        its owner is gone or not readable (404, 403). A Pod's ownerReferences are
        written by whoever creates it, and keymount restarts what this returns. Other
        errors raise (retried). `owners`: reads shared across one pass's Pods."""
        ref = controller_ref(pod)
        if ref is None:
            return None
        kind, name, uid = ref
        if kind == "ReplicaSet":
            rs = self._read_owner(namespace, kind, name, owners)
            if rs is None or not controls(rs, uid=uid, pod=pod):
                return None
            up = controller_ref(rs)
            if up is None or up[0] != "Deployment":
                return kind, name  # not a Deployment's: reported, never restarted
            kind, name, uid = up
        elif kind == "StatefulSet":
            ordinal = str(as_dict(pod.get("metadata")).get("name", "")).removeprefix(
                f"{name}-")
            if not ordinal.isdigit():
                return None  # the StatefulSet controller names its Pods so
        elif kind != "DaemonSet":
            # A Deployment never controls a Pod itself; other kinds are reported.
            return None if kind in RESTARTABLE else (kind, name)
        workload = self._read_owner(namespace, kind, name, owners)
        return (kind, name) if workload is not None and controls(
            workload, uid=uid, pod=pod) else None

    def _read_owner(self, namespace: str, kind: str, name: str,
                    owners: dict[tuple[str, str], ApiObject | None] | None
                    ) -> ApiObject | None:
        if owners is not None and (kind, name) in owners:
            return owners[(kind, name)]
        read = self.apps.read_namespaced_replica_set if kind == "ReplicaSet" \
            else self._workload_api(kind)[0]
        try:
            response = read(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status not in (403, 404):
                raise ClusterError(describe_api_error(exc)) from None
            found = None  # gone, or not ours to read: nothing to restart through it
        except Exception as exc:  # connection refused, TLS, timeouts: retried
            raise ClusterError(describe_api_error(exc)) from None
        else:
            found = json.loads(response.data)
        if owners is not None:
            owners[(kind, name)] = found
        return found


class _ClusterList:
    """A cluster-wide list/watch of one resource in the shape ListWatch calls
    (`list_object_for_all_namespaces`): custom objects and Namespaces."""

    def __init__(self, list_call: Callable[..., Any]) -> None:
        self.list_object_for_all_namespaces = list_call


def _conditional_patch(send: Callable[[ApiObject], Any], body: ApiObject,
                       resource_version: str | None) -> bool:
    """Send a patch, with `resource_version` as its precondition if given: False when
    the object is no longer at that version (409: read it again); other errors raise."""
    if resource_version:
        body = {**body, "metadata": {"resourceVersion": resource_version}}
    try:
        send(body)
    except ApiException as exc:
        if exc.status == 409 and resource_version:
            return False
        raise ClusterError(describe_api_error(exc)) from None
    except Exception as exc:  # connection refused, TLS, timeouts
        raise ClusterError(describe_api_error(exc)) from None
    return True


def policy_watches(api_client: client.ApiClient, policies: PolicyStore
                   ) -> list[ListWatch[Any]]:
    """The controller's watches: every KeyPolicy, every ClusterKeyPolicy and the
    namespaces' labels (what a namespaceSelector matches), each cluster-wide."""
    from .policystore import (
        parse_stored_clusterkeypolicy,
        parse_stored_keypolicy,
        parse_stored_namespace,
    )
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    kinds: list[tuple[Callable[..., Any], Callable[..., Any], Any]] = [
        (partial(custom.list_cluster_custom_object, POLICY_GROUP, POLICY_VERSION,
                 KEYPOLICY_PLURAL), parse_stored_keypolicy, policies.keypolicies),
        (partial(custom.list_cluster_custom_object, POLICY_GROUP, POLICY_VERSION,
                 CLUSTERKEYPOLICY_PLURAL), parse_stored_clusterkeypolicy,
         policies.clusterkeypolicies),
        (core.list_namespace, parse_stored_namespace, policies.namespaces),
    ]
    return [ListWatch(_ClusterList(call), singular="object", selector="", scopes=[None],
                      parse=parse, sink=sink) for call, parse, sink in kinds]
