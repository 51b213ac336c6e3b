"""The list/watch loop through a simulated API: what it does on each kind of stream.

The API object is a fake of the client's two calls the loop makes (list and watch of
one kind), scripted per call; the loop, its threads, the parsing and the store are
the real ones. The real API server version of these paths is in tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from webhook.config import Settings
from webhook.key_secrets import parse_key_secret
from webhook.store import KeyStore
from webhook.watch import ListWatch, WatchTimings

from builders import key_secret, random_key
from polling import wait_for

SETTINGS = Settings()


class Response:
    """What the client returns with _preload_content=False: `.data`, `.stream()`."""

    def __init__(self, *, data: bytes = b"", lines: list[Any] = (), hang: threading.Event
                 | None = None) -> None:
        self.data, self.lines, self.hang = data, list(lines), hang
        self.released = False

    def stream(self, amt=None, decode_content=False):
        for line in self.lines:
            if isinstance(line, Exception):
                raise line
            yield (json.dumps(line) + "\n").encode()
        if self.hang is not None:  # a silent connection: nothing, until the test lets go
            self.hang.wait(10)
            raise TimeoutError("read timed out")

    def release_conn(self) -> None:
        self.released = True


class FakeApi:
    """list_namespaced_secret / list_secret_for_all_namespaces, scripted per call."""

    def __init__(self) -> None:
        self.lists: deque[Any] = deque()
        self.watches: deque[Any] = deque()
        self.calls: list[dict[str, Any]] = []

    def list_secret_for_all_namespaces(self, **kwargs: Any) -> Response:
        return self._answer(None, kwargs)

    def list_namespaced_secret(self, namespace: str, **kwargs: Any) -> Response:
        return self._answer(namespace, kwargs)

    def _answer(self, namespace: str | None, kwargs: dict[str, Any]) -> Response:
        self.calls.append({"namespace": namespace, **kwargs})
        queue = self.watches if kwargs.get("watch") else self.lists
        if not queue:  # nothing scripted: a watch that ends at once, an empty list
            if kwargs.get("watch"):
                return Response(hang=threading.Event())
            return listing([], "1")
        answer = queue.popleft()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def count(self, *, watch: bool) -> int:
        return sum(1 for c in self.calls if bool(c.get("watch")) is watch)


def listing(secrets: list[dict], version: str) -> Response:
    return Response(data=json.dumps({"items": secrets,
                                     "metadata": {"resourceVersion": version}}).encode())


def secret(name: str, version: str, **kw: Any) -> dict:
    obj = key_secret(name, random_key(), **kw)
    obj["metadata"]["resourceVersion"] = version
    return obj


def event(kind: str, obj: dict) -> dict:
    return {"type": kind, "object": obj}


class Recorder:
    def __init__(self) -> None:
        self.restarts = 0
        self.events = 0
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def loop_parts():
    api, store, recorder = FakeApi(), KeyStore(), Recorder()
    watcher = ListWatch(
        api, singular="secret", selector="keymount.io/encryption-key=true", scopes=[None],
        parse=lambda item: parse_key_secret(item, settings=SETTINGS), sink=store,
        timings=WatchTimings(resync_seconds=3600, retry_seconds=1.0, max_retry_seconds=4.0),
        on_restart=lambda: setattr(recorder, "restarts", recorder.restarts + 1),
        on_event=lambda: setattr(recorder, "events", recorder.events + 1),
        sleep=recorder.sleep)
    return api, store, recorder, watcher


async def running(watcher):
    task = asyncio.create_task(watcher.run())
    return task


async def stop(task):
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def names(store, namespace="shop"):
    return [r.name for r in store.keyring(namespace).keys]


async def test_the_first_list_fills_the_store_and_marks_it_ready(loop_parts):
    api, store, recorder, watcher = loop_parts
    api.lists.append(listing([secret("k1", "5", index=1), secret("k2", "6", index=2)], "7"))
    assert await watcher.load() == 2
    assert store.ready and names(store) == ["k1", "k2"]
    assert watcher.versions == {None: "7"}
    assert api.calls[0]["label_selector"] == "keymount.io/encryption-key=true"


async def test_a_list_is_read_in_pages_that_follow_the_continue_token(loop_parts):
    # One page's JSON alive at a time: decoded whole, 30,000 key Secrets raised the
    # peak by 36 MiB (an in-process probe).
    api, store, _, watcher = loop_parts
    first = {"items": [secret("k1", "5", index=1)],
             "metadata": {"resourceVersion": "9", "continue": "token-1"}}
    api.lists.append(Response(data=json.dumps(first).encode()))
    api.lists.append(listing([secret("k2", "6", index=2)], "9"))
    assert await watcher.load() == 2
    assert names(store) == ["k1", "k2"] and watcher.versions == {None: "9"}
    assert [call.get("limit") for call in api.calls] == [500, 500]
    assert [call.get("_continue") for call in api.calls] == [None, "token-1"]


async def test_watch_events_add_change_and_remove_keys_and_resume_from_the_last_version(
        loop_parts):
    api, store, recorder, watcher = loop_parts
    api.lists.append(listing([secret("k1", "5", index=1)], "5"))
    await watcher.load()
    k2 = secret("k2", "8", index=2)
    api.watches.append(Response(lines=[event("ADDED", k2),
                                       event("DELETED", secret("k1", "9", index=1))]))
    task = await running(watcher)
    await wait_for(lambda: names(store) == ["k2"], what="k2 added, k1 deleted")
    await wait_for(lambda: api.count(watch=True) >= 2, what="the watch resumed")
    await stop(task)
    second_watch = [c for c in api.calls if c.get("watch")][1]
    assert second_watch["resource_version"] == "9" and api.count(watch=False) == 1


async def test_a_bookmark_moves_the_version_and_counts_as_a_sign_of_life(loop_parts):
    api, store, recorder, watcher = loop_parts
    await watcher.load()
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "42"}}}
    api.watches.append(Response(lines=[bookmark]))
    events_before = recorder.events
    task = await running(watcher)
    await wait_for(lambda: api.count(watch=True) >= 2, what="a second watch")
    await stop(task)
    assert [c for c in api.calls if c.get("watch")][1]["resource_version"] == "42"
    assert recorder.events > events_before and store.namespaces() == []


async def test_410_gone_relists_at_once_without_backoff(loop_parts):
    api, store, recorder, watcher = loop_parts
    await watcher.load()
    api.watches.append(Response(lines=[event("ERROR", {"code": 410, "message": "too old"})]))
    api.lists.append(listing([secret("k1", "20", index=1)], "20"))
    task = await running(watcher)
    await wait_for(lambda: names(store) == ["k1"], what="re-listed after 410")
    await stop(task)
    assert recorder.restarts == 1 and recorder.sleeps == []


async def test_an_error_event_relists_after_a_backoff_that_doubles_and_is_capped(loop_parts):
    api, store, recorder, watcher = loop_parts
    await watcher.load()
    for _ in range(4):
        api.watches.append(Response(lines=[event("ERROR", {"code": 500, "message": "boom"})]))
    api.lists.extend(listing([], str(v)) for v in range(10, 13))
    api.lists.append(listing([secret("k1", "30", index=1)], "30"))
    task = await running(watcher)
    await wait_for(lambda: names(store) == ["k1"], what="recovered after four errors")
    await stop(task)
    assert recorder.restarts == 4
    # 1, 2, 4, 4 seconds, each with up to 50% jitter.
    for slept, base in zip(recorder.sleeps, [1, 2, 4, 4], strict=False):
        assert base <= slept <= base * 1.5


async def test_a_watch_that_ends_at_once_with_nothing_is_retried_after_a_backoff(loop_parts):
    # A proxy that closes every watch stream at once: without a pause, a loop of requests
    # (client-go's reflector calls it a "very short watch").
    api, store, recorder, watcher = loop_parts
    await watcher.load()
    for _ in range(3):
        api.watches.append(Response(lines=[]))
    task = await running(watcher)
    await wait_for(lambda: api.count(watch=True) == 4, what="three short watches and a fourth")
    await stop(task)
    assert recorder.restarts == 3 and api.count(watch=False) == 1  # no re-list needed
    for slept, base in zip(recorder.sleeps, [1, 2, 4], strict=True):
        assert base <= slept <= base * 1.5


async def test_a_failing_list_is_retried_and_keeps_the_cache_meanwhile(loop_parts):
    api, store, recorder, watcher = loop_parts
    api.lists.append(listing([secret("k1", "5", index=1)], "5"))
    await watcher.load()
    api.watches.append(Response(lines=[event("ERROR", {"code": 410, "message": "old"})]))
    api.lists.append(ApiException(status=503, reason="unavailable"))
    api.lists.append(listing([secret("k1", "5", index=1), secret("k2", "6", index=2)], "6"))
    task = await running(watcher)
    await wait_for(lambda: names(store) == ["k1", "k2"], what="the retried list")
    await stop(task)
    assert recorder.restarts == 2 and len(recorder.sleeps) == 1


async def test_a_silent_watch_that_times_out_relists_and_picks_up_what_it_missed(loop_parts):
    api, store, recorder, watcher = loop_parts
    await watcher.load()
    released = threading.Event()
    api.watches.append(Response(hang=released))
    api.lists.append(listing([secret("missed", "50", index=1)], "50"))
    task = await running(watcher)
    await wait_for(lambda: api.count(watch=True) == 1, what="the silent watch")
    released.set()  # the client's read timeout fires
    await wait_for(lambda: names(store) == ["missed"], what="re-listed after the timeout")
    await stop(task)
    assert recorder.restarts == 1


async def test_a_periodic_resync_relists_even_when_the_watch_is_healthy():
    api, store = FakeApi(), KeyStore()
    watcher = ListWatch(api, singular="secret", selector="x", scopes=[None],
                        parse=lambda item: parse_key_secret(item, settings=SETTINGS),
                        sink=store, timings=WatchTimings(resync_seconds=0.0))
    await watcher.load()
    for version in range(3):
        api.watches.append(Response())  # the server ends each watch cleanly
        api.lists.append(listing([], str(version)))
    task = asyncio.create_task(watcher.run())
    await wait_for(lambda: api.count(watch=False) >= 3, what="resync lists")
    await stop(task)


async def test_per_namespace_scopes_watch_each_namespace_and_replace_only_it():
    api, store = FakeApi(), KeyStore()
    watcher = ListWatch(api, singular="secret", selector="x", scopes=["a", "b"],
                        parse=lambda item: parse_key_secret(item, settings=SETTINGS),
                        sink=store, timings=WatchTimings(resync_seconds=3600))
    api.lists.append(listing([secret("ka", "1", namespace="a", index=1)], "1"))
    api.lists.append(listing([secret("kb", "1", namespace="b", index=1)], "1"))
    await watcher.load()
    assert store.namespaces() == ["a", "b"]
    assert {c["namespace"] for c in api.calls} == {"a", "b"}


async def test_cancelling_the_loop_returns_promptly_even_with_a_watch_blocked_in_a_thread(
        loop_parts):
    api, store, recorder, watcher = loop_parts
    await watcher.load()
    blocked = threading.Event()
    api.watches.append(Response(hang=blocked))
    task = await running(watcher)
    await wait_for(lambda: api.count(watch=True) == 1, what="the blocked watch")
    await asyncio.wait_for(stop(task), timeout=2)
    blocked.set()


def test_a_silent_watch_is_noticed_well_within_a_minute_by_default():
    timings = WatchTimings()
    assert timings.watch_seconds < timings.read_timeout < 60


@pytest.mark.parametrize(("major", "minor", "before"), [
    ("1", "20", True), ("1", "20+", True), ("1", "21", False), ("1", "30", False),
    ("2", "0", False), ("x", "y", False)])
def test_versions_before_1_21_are_recognised(major, minor, before):
    from webhook.cluster import kubernetes_before
    assert kubernetes_before(major, minor, 1, 21) is before


async def test_synced_is_set_once_the_first_list_came_and_not_before(loop_parts):
    # KeyController.run handles nothing before its watches' `synced` (client-go's
    # HasSynced): a list that fails first leaves it unset, the retried one sets it.
    api, store, recorder, watcher = loop_parts
    api.lists.append(ApiException(status=503, reason="unavailable"))
    api.lists.append(listing([secret("k1", "5", index=1)], "5"))
    assert not watcher.synced.is_set()
    task = await running(watcher)
    await wait_for(lambda: recorder.sleeps, what="the failed list's backoff")
    assert len(recorder.sleeps) == 1
    await asyncio.wait_for(watcher.synced.wait(), 5)
    assert names(store) == ["k1"]  # the store holds the list by the time it is set
    await stop(task)


@pytest.mark.parametrize(("body", "said"), [
    ('{"kind": "Status", "message": "secrets is forbidden"}', "secrets is forbidden"),
    ('["not", "a", "Status"]', "Forbidden"),
    ("<html>proxy error</html>", "Forbidden"),
    ('"a string"', "Forbidden"),
    (None, "Forbidden"),
], ids=["status", "json-list", "html", "json-string", "no-body"])
def test_an_api_error_is_described_in_one_line_whatever_its_body(body, said):
    from webhook.watch import describe_error
    exc = ApiException(status=403, reason="Forbidden")
    exc.body = body
    assert describe_error(exc) == f"API server said 403: {said}"
