"""List, then watch, one kind of object by label selector, and keep a sink in step.

The official client is synchronous, so every call runs in a daemon thread (never on
the event loop, and never holding up process exit); watch events are handed to the
loop in order with `call_soon_threadsafe`, and only the loop thread touches the sink.

Recovery follows client-go's reflector: a watch that ends is resumed from the last
resourceVersion seen (bookmarks keep it fresh); 410 Gone, or any error, means re-list;
a client-side read timeout a little longer than the server-side `timeoutSeconds` turns
a half-open connection into an error instead of a silent freeze; and a periodic
re-list (resync) bounds how long any drift can last. Parsing happens in the thread:
what reaches the sink is already the small record the caller keeps (for key Secrets,
never key bytes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("keymount.watch")
T = TypeVar("T")
R = TypeVar("R", contravariant=True)


async def in_daemon_thread(function: Callable[[], T]) -> T:
    """Run a blocking call in a daemon thread: unlike the default executor, a read
    blocked on a quiet watch cannot delay shutdown. On cancellation the thread is
    abandoned, not interrupted: closing an SSL socket that another thread is reading
    blocks on the socket's lock (seen here as a SIGTERM that never finished)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(), None)
        except BaseException as exc:  # handed to the awaiting task
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(_settle, future, *outcome)
        except RuntimeError:
            pass  # the loop closed while this call was blocked: nobody is waiting

    threading.Thread(target=target, daemon=True, name="keymount-api").start()
    return await future


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


@dataclass(frozen=True)
class WatchTimings:
    # A watch the server ends every 30 s, and a client-side read timeout of 45 s: a
    # connection that goes silent (half-open, a proxy that dropped it) is noticed and
    # replaced by a re-list well within a minute; a healthy one costs one request per
    # 30 s per scope, resumed from its resourceVersion.
    watch_seconds: int = 30  # server-side timeoutSeconds of one watch
    read_timeout: float = 45.0  # client-side: longer than a healthy watch can be quiet
    connect_timeout: float = 10.0
    resync_seconds: float = 600.0
    retry_seconds: float = 1.0  # first backoff after an error, doubled up to 30 s
    max_retry_seconds: float = 30.0


def call_list(api: Any, singular: str, namespace: str | None, **kwargs: Any) -> Any:
    """One list (or, with watch=True, watch) of `secret` or `pod` objects, cluster-wide
    when `namespace` is None."""
    if namespace is None:
        return getattr(api, f"list_{singular}_for_all_namespaces")(**kwargs)
    return getattr(api, f"list_namespaced_{singular}")(namespace, **kwargs)


LIST_PAGE = 500  # objects per page of a list: what client-go's reflector asks for
# A watch that ends sooner than this with no event is a failure, retried after backoff
# (client-go's reflector: "very short watch").
SHORT_WATCH = 1.0


class Gone(Exception):
    """The resourceVersion is too old (410 Gone): re-list."""


class Sink(Protocol[R]):
    """Where the records go; only ever called on the event loop thread."""

    def replace_all(self, records: Iterable[R], *, version: str = "") -> None: ...

    def replace_namespace(self, namespace: str, records: Iterable[R], *,
                          version: str = "") -> Any: ...

    def put(self, record: R) -> None: ...

    def remove(self, record: R) -> None: ...


class Named(Protocol):
    @property
    def namespace(self) -> str: ...

    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


class ListWatch(Generic[N]):
    """One kind of object, one label selector, one or more scopes (None = the whole
    cluster with one watch; otherwise one watch per namespace)."""

    def __init__(self, api: Any, *, singular: str, selector: str,
                 scopes: list[str | None], parse: Callable[[Mapping[str, Any]], N],
                 sink: Sink[N], timings: WatchTimings = WatchTimings(),
                 on_restart: Callable[[], None] = lambda: None,
                 on_event: Callable[[], None] = lambda: None,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.api, self.singular, self.selector = api, singular, selector
        self.scopes, self.parse, self.sink, self.timings = scopes, parse, sink, timings
        self.on_restart, self.on_event, self.sleep = on_restart, on_event, sleep
        self.versions: dict[str | None, str] = {}
        # Set once every scope has been listed: the sink holds the whole world once
        # (client-go's HasSynced); it stays set through later re-lists.
        self.synced = asyncio.Event()

    def _note_listed(self) -> None:
        if all(scope in self.versions for scope in self.scopes):
            self.synced.set()

    def list(self, scope: str | None) -> tuple[list[N], str]:
        """A list (blocking), in pages of LIST_PAGE objects: the parsed records and the
        list's resourceVersion. Pages are one consistent snapshot (the API server keeps
        the version in the continue token), and only one page's JSON is alive at a time:
        decoded whole, the 30,000 key Secrets of the scale benchmark held the process at
        219 MiB at /readyz, in pages at 134 MiB: memory the allocator keeps once
        grown (README, "The controller at scale")."""
        records: list[N] = []
        version, token = "", None
        while True:
            paging: dict[str, Any] = {"limit": LIST_PAGE}
            if token:
                paging["_continue"] = token
            response = call_list(self.api, self.singular, scope, label_selector=self.selector,
                                 _preload_content=False,
                                 _request_timeout=(self.timings.connect_timeout, 60.0),
                                 **paging)
            body = json.loads(response.data)
            del response
            records.extend(self.parse(item) for item in body.get("items") or [])
            meta = body.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            token = meta.get("continue")
            if not token:
                return records, version

    async def load(self) -> int:
        """The first full list of every scope; returns how many records came."""
        results = []
        for scope in self.scopes:
            results.append(await in_daemon_thread(partial(self.list, scope)))
        for scope, (_, version) in zip(self.scopes, results, strict=True):
            self.versions[scope] = version
        # One scope's list is as of its resourceVersion; several scopes' lists are taken
        # at different ones, and they fill an empty cache: then the lists are the truth.
        version = results[0][1] if len(results) == 1 else ""
        self.sink.replace_all((r for records, _ in results for r in records), version=version)
        self.on_event()
        self._note_listed()
        return sum(len(records) for records, _ in results)

    async def run(self) -> None:
        await asyncio.gather(*(self._keep_watching(scope) for scope in self.scopes))

    async def _relist(self, scope: str | None) -> None:
        records, version = await in_daemon_thread(lambda: self.list(scope))
        self.versions[scope] = version
        if scope is None:
            self.sink.replace_all(records, version=version)
        else:
            self.sink.replace_namespace(scope, records, version=version)
        self.on_event()
        self._note_listed()

    async def _keep_watching(self, scope: str | None) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.timings.retry_seconds
        next_resync = loop.time() + self.timings.resync_seconds
        while True:
            try:
                if scope not in self.versions or loop.time() >= next_resync:
                    await self._relist(scope)
                    next_resync = loop.time() + self.timings.resync_seconds
                started = loop.time()
                seen = await in_daemon_thread(lambda: self._watch(scope, loop))
                if not seen and loop.time() - started < SHORT_WATCH:
                    # Ended at once with nothing in it (a proxy closing the stream, a
                    # server shedding load): without a pause this would be a loop of
                    # requests. client-go's reflector calls it a "very short watch".
                    log.warning("watch ended at once with no event; retrying after backoff",
                                extra={"kind": self.singular, "scope": scope or "*",
                                       "retry_seconds": backoff})
                    self.on_restart()
                    await self.sleep(backoff * (1 + random.random() / 2))
                    backoff = min(backoff * 2, self.timings.max_retry_seconds)
                    continue
                backoff = self.timings.retry_seconds
            except Gone:
                log.info("watch resourceVersion expired; re-listing",
                         extra={"kind": self.singular, "scope": scope or "*"})
                self.versions.pop(scope, None)
                self.on_restart()
            except Exception as exc:
                log.warning("watch failed; re-listing after backoff",
                            extra={"kind": self.singular, "scope": scope or "*",
                                   "error": describe_error(exc), "retry_seconds": backoff})
                self.versions.pop(scope, None)
                self.on_restart()
                await self.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, self.timings.max_retry_seconds)

    def _watch(self, scope: str | None, loop: asyncio.AbstractEventLoop) -> int:
        """One watch request, in a thread; returns, when the server ends it, how many
        events (bookmarks included) it brought."""
        seen = 0
        response = call_list(
            self.api, self.singular, scope, label_selector=self.selector, watch=True,
            allow_watch_bookmarks=True, resource_version=self.versions[scope],
            timeout_seconds=self.timings.watch_seconds, _preload_content=False,
            _request_timeout=(self.timings.connect_timeout, self.timings.read_timeout))
        try:
            for line in iter_resp_lines(response):
                if not line:
                    continue
                event = json.loads(line)
                seen += 1
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    loop.call_soon_threadsafe(self._apply, kind, self.parse(obj))
                elif kind == "BOOKMARK":
                    loop.call_soon_threadsafe(self.on_event)
                if version:
                    loop.call_soon_threadsafe(self.versions.__setitem__, scope, version)
        finally:
            response.release_conn()
        return seen

    def _apply(self, kind: str, record: N) -> None:
        if kind == "DELETED":
            self.sink.remove(record)
        else:
            self.sink.put(record)
        self.on_event()


def describe_error(exc: Exception) -> str:
    """An API error as one line: the status and the server's message."""
    if isinstance(exc, ApiException):
        try:
            body = json.loads(exc.body or "{}")
        except (ValueError, TypeError):
            body = None
        # A Status object by contract; anything else (a proxy's error page, a JSON list)
        # must not turn a logged failure into a traceback.
        message = body.get("message") if isinstance(body, dict) else None
        return f"API server said {exc.status}: {message or exc.reason}"
    return f"cannot reach the API server: {type(exc).__name__}: {exc}"
