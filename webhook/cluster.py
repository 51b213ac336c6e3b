"""Key source: the Kubernetes API (SPEC §7), with the official `kubernetes` client.

List, then watch, key Secrets by label selector, cluster-wide or per namespace, and
keep only what `KeyRecord` holds: no key bytes outlive `parse_key_secret`. The client
is synchronous, so every call runs in a daemon thread (never on the event loop, and
never holding up process exit); watch events are handed to the loop in order with
`call_soon_threadsafe`, and only the loop thread touches the store.

Recovery follows client-go's reflector: a watch that ends is resumed from the last
resourceVersion seen (bookmarks keep it fresh); 410 Gone, or any error, means
re-list; a client-side read timeout a little longer than the server-side
`timeoutSeconds` turns a half-open connection into an error instead of a silent
freeze; and a periodic re-list (resync) bounds how long any drift can last.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from .config import Settings
from .errors import UserFacingError
from .key_secrets import build_key_secret, parse_key_secret
from .keys import KeyRecord, Keyring, build_keyring, generate_key
from .lifecycle import GENERATED_KEY_NAME
from .names import GENERATED_ANNOTATION
from .metrics import Metrics
from .store import KeyStore

log = logging.getLogger("keymount.cluster")
T = TypeVar("T")


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


def describe_api_error(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except ValueError:
            message = exc.reason
        return f"API server said {exc.status}: {message}"
    return f"cannot reach the API server: {type(exc).__name__}: {exc}"


async def in_daemon_thread(function: Callable[[], T]) -> T:
    """Run a blocking call in a daemon thread: unlike the default executor, a read
    blocked on a quiet watch cannot delay shutdown. On cancellation the thread is
    abandoned, not interrupted: closing an SSL socket that another thread is reading
    blocks on the socket's lock (seen here as a SIGTERM that never finished)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            outcome = (function(), None)
        except BaseException as exc:  # handed to the awaiting task
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(_settle, future, *outcome)
        except RuntimeError:
            pass  # the loop closed while this call was blocked: nobody is waiting

    threading.Thread(target=target, daemon=True, name="keymount-api").start()
    return await future


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


@dataclass(frozen=True)
class WatchTimings:
    watch_seconds: int = 240  # server-side timeoutSeconds of one watch
    read_timeout: float = 270.0  # client-side: longer than a healthy watch can be quiet
    connect_timeout: float = 10.0
    resync_seconds: float = 600.0
    retry_seconds: float = 1.0  # first backoff after an error, doubled up to 30 s


def call_list(api: client.CoreV1Api, singular: str, namespace: str | None,
              **kwargs: Any) -> Any:
    """One list (or, with watch=True, watch) of `secret` or `pod` objects, cluster-wide
    when `namespace` is None."""
    if namespace is None:
        return getattr(api, f"list_{singular}_for_all_namespaces")(**kwargs)
    return getattr(api, f"list_namespaced_{singular}")(namespace, **kwargs)


class _Gone(Exception):
    """The resourceVersion is too old (410 Gone): re-list."""


class KubernetesKeySource:
    def __init__(self, api_client: client.ApiClient, *, settings: Settings, store: KeyStore,
                 metrics: Metrics | None = None, namespaces: list[str] | None = None,
                 timings: WatchTimings = WatchTimings()) -> None:
        self.api = client.CoreV1Api(api_client)
        self.settings = settings
        self.store = store
        self.metrics = metrics
        # None watches every namespace with one watch; otherwise one watch each.
        self.scopes: list[str | None] = list(namespaces) if namespaces else [None]
        self.timings = timings
        self._versions: dict[str | None, str] = {}

    # --- reading ---------------------------------------------------------------------

    def _list(self, scope: str | None) -> tuple[list[KeyRecord], str]:
        response = call_list(self.api, "secret", scope,
                             label_selector=self.settings.key_selector.text,
                             _preload_content=False,
                             _request_timeout=(self.timings.connect_timeout, 60.0))
        body = json.loads(response.data)
        records = [parse_key_secret(item, settings=self.settings)
                   for item in body.get("items") or []]
        return records, body["metadata"]["resourceVersion"]

    async def _relist(self, scope: str | None) -> None:
        records, version = await in_daemon_thread(lambda: self._list(scope))
        self._versions[scope] = version
        if scope is None:
            self.store.replace_all(records)
        else:
            self.store.replace_namespace(scope, records)

    async def load(self) -> None:
        """The first full list; the store (and /readyz) is ready only after it."""
        results = [await in_daemon_thread(lambda s=s: self._list(s)) for s in self.scopes]
        for scope, (_, version) in zip(self.scopes, results):
            self._versions[scope] = version
        self.store.replace_all(r for records, _ in results for r in records)
        log.info("listed key Secrets", extra={"count": sum(len(r) for r, _ in results),
                                              "scopes": [s or "*" for s in self.scopes]})

    async def confirm(self, namespace: str) -> Keyring:
        """One live read of a namespace before a key-state deny (SPEC §5)."""
        records, _ = await in_daemon_thread(lambda: self._list(namespace))
        if None in self.scopes or namespace in self.scopes:
            return self.store.replace_namespace(namespace, records)
        # Not watched: answer from the read, but do not cache what no watch keeps fresh.
        return build_keyring(namespace, records)

    async def create_generated_key(self, namespace: str) -> Keyring:
        """--auto-generate: make the namespace's one generated key, or reuse it.

        The name is fixed, so the API server arbitrates between replicas: whoever
        loses the race gets 409 AlreadyExists and reads the winner's key instead of
        making a second one (SPEC §8).
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

    async def send_event(self, event: dict[str, Any]) -> None:
        """Record one Event (events.EventRecorder's sender)."""
        namespace = event["metadata"]["namespace"]
        await in_daemon_thread(lambda: self.api.create_namespaced_event(
            namespace, event, _request_timeout=(5, 10)))

    # --- watching --------------------------------------------------------------------

    async def run(self) -> None:
        await asyncio.gather(*(self._keep_watching(scope) for scope in self.scopes))

    async def _keep_watching(self, scope: str | None) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.timings.retry_seconds
        next_resync = loop.time() + self.timings.resync_seconds
        while True:
            try:
                if scope not in self._versions or loop.time() >= next_resync:
                    await self._relist(scope)
                    next_resync = loop.time() + self.timings.resync_seconds
                await in_daemon_thread(lambda: self._watch(scope, loop))
                backoff = self.timings.retry_seconds
            except _Gone:
                log.info("watch resourceVersion expired; re-listing",
                         extra={"scope": scope or "*"})
                self._versions.pop(scope, None)
                self._count_restart()
            except Exception as exc:
                log.warning("key Secret watch failed; re-listing after backoff",
                            extra={"scope": scope or "*", "error": describe_api_error(exc),
                                   "retry_seconds": backoff})
                self._versions.pop(scope, None)
                self._count_restart()
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, 30.0)

    def _count_restart(self) -> None:
        if self.metrics:
            self.metrics.watch_restarts.inc()

    def _watch(self, scope: str | None, loop: asyncio.AbstractEventLoop) -> None:
        """One watch request, in a thread; returns when the server ends it."""
        response = call_list(
            self.api, "secret", scope, label_selector=self.settings.key_selector.text,
            watch=True, allow_watch_bookmarks=True, resource_version=self._versions[scope],
            timeout_seconds=self.timings.watch_seconds, _preload_content=False,
            _request_timeout=(self.timings.connect_timeout, self.timings.read_timeout))
        try:
            for line in iter_resp_lines(response):
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if kind != "BOOKMARK":
                    record = parse_key_secret(obj, settings=self.settings)
                    loop.call_soon_threadsafe(self._apply, kind, record)
                if version:
                    loop.call_soon_threadsafe(self._versions.__setitem__, scope, version)
        finally:
            response.release_conn()

    def _apply(self, kind: str, record: KeyRecord) -> None:
        if kind == "DELETED":
            self.store.remove(record.namespace, record.name)
        else:
            self.store.put(record)


# --- the CLI's calls -------------------------------------------------------------

def current_namespace(*, kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the kubeconfig context, as kubectl defaults to it."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        if path.is_file():
            return path.read_text().strip() or "default"
    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


class KeyClient:
    """The API calls the CLI makes, each turned into one clear error line."""

    def __init__(self, api_client: client.ApiClient, *, settings: Settings) -> None:
        self.api = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.settings = settings

    @classmethod
    def from_kubeconfig(cls, *, kubeconfig: str | None, context: str | None,
                        settings: Settings) -> KeyClient:
        return cls(load_api_client(kubeconfig=kubeconfig, context=context), settings=settings)

    def _call(self, function: Callable[..., Any], *args: Any,
              errors: Mapping[int, str] | None = None, **kwargs: Any) -> Any:
        """Call the API; `errors` gives the message for a status the caller can explain."""
        try:
            return function(*args, **kwargs)
        except ApiException as exc:
            message = (errors or {}).get(exc.status) or describe_api_error(exc)
            raise ClusterError(message) from None
        except Exception as exc:  # connection refused, TLS, timeouts
            raise ClusterError(describe_api_error(exc)) from None

    def _list_json(self, namespace: str | None, singular: str, *,
                   label_selector: str) -> list[dict]:
        response = self._call(call_list, self.api, singular, namespace,
                              label_selector=label_selector, _preload_content=False,
                              _request_timeout=(10, 60))
        return json.loads(response.data).get("items") or []

    def key_records(self, namespace: str | None) -> list[KeyRecord]:
        items = self._list_json(namespace, "secret",
                                label_selector=self.settings.key_selector.text)
        return [parse_key_secret(i, settings=self.settings) for i in items]

    def keyring(self, namespace: str) -> Keyring:
        return build_keyring(namespace, self.key_records(namespace))

    def backend_pods(self, namespace: str | None) -> list[dict]:
        return self._list_json(namespace, "pod",
                               label_selector=self.settings.pod_selector.text)

    def create_secret(self, manifest: dict[str, Any]) -> KeyRecord:
        """Create a key Secret; what was stored (keymount's webhook stamps the number)."""
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        response = self._call(self.api.create_namespaced_secret, namespace, manifest,
                              _preload_content=False, errors={
            409: f"secret {name!r} already exists in namespace {namespace!r}; pick another "
                 f"name, or add a key with `keymount keys rotate -n {namespace}`",
            404: f"namespace {namespace!r} not found; create it first: "
                 f"kubectl create namespace {namespace}"})
        return parse_key_secret(json.loads(response.data), settings=self.settings)

    def patch_secret(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """A strategic merge patch of one Secret (`null` deletes a field); keymount's
        guard judges it."""
        self._call(self.api.patch_namespaced_secret, name, namespace, patch,
                   _preload_content=False, errors={
                       404: f"secret {name!r} not found in namespace {namespace!r}; "
                            f"`keymount keys list -n {namespace}` shows its keys"})

    def _workload_api(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        singular = {"Deployment": "deployment", "StatefulSet": "stateful_set",
                    "DaemonSet": "daemon_set"}[kind]
        return (getattr(self.apps, f"read_namespaced_{singular}"),
                getattr(self.apps, f"patch_namespaced_{singular}"))

    def restart_workload(self, namespace: str, kind: str, name: str, *, at: str) -> None:
        """What `kubectl rollout restart` does: a new Pod template annotation."""
        _, patch = self._workload_api(kind)
        self._call(patch, name, namespace, {"spec": {"template": {"metadata": {
            "annotations": {"kubectl.kubernetes.io/restartedAt": at}}}}})

    def read_workload(self, namespace: str, kind: str, name: str) -> dict[str, Any]:
        read, _ = self._workload_api(kind)
        response = self._call(read, name, namespace, _preload_content=False)
        return json.loads(response.data)

    def controller_of(self, namespace: str, kind: str, name: str) -> tuple[str, str]:
        """A ReplicaSet's Deployment, so the user restarts what they manage."""
        if kind != "ReplicaSet":
            return kind, name
        try:
            rs = self.apps.read_namespaced_replica_set(name, namespace)
        except Exception:
            return kind, name
        for ref in rs.metadata.owner_references or []:
            if ref.controller:
                return ref.kind, ref.name
        return kind, name
