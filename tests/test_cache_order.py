"""The key cache never goes back in time: a live read (confirm) and the watch race,
and per Secret the newer state wins whichever arrives last.

Both interleavings are forced through the injected API object: the live read's list
call is held in its thread while the real watch loop delivers events, or the watch's
events are held while the live read lands. The loop, its threads, the parsing and the
store are keymount's own.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from kubernetes import client

from webhook import cluster
from webhook.cluster import KubernetesKeySource
from webhook.config import Settings
from webhook.store import KeyStore

from polling import wait_for
from test_watch import FakeApi, Response, event, listing, secret

SETTINGS = Settings()


class HeldApi(FakeApi):
    """FakeApi whose scripted answers may be callables, run in the caller's thread:
    a list that waits for the test before it answers."""

    def _answer(self, namespace: str | None, kwargs: dict[str, Any]) -> Response:
        answer = super()._answer(namespace, kwargs)
        return answer() if callable(answer) else answer


def held(response: Response, release: threading.Event, taken: threading.Event):
    def answer() -> Response:
        taken.set()  # the list is taken now (its resourceVersion says as of when) ...
        release.wait(10)  # ... and its answer arrives when the test says
        return response
    return answer


@pytest.fixture
async def parts(monkeypatch):
    monkeypatch.setattr(cluster.client, "VersionApi", None)  # never called below
    api, store = HeldApi(), KeyStore()
    source = KubernetesKeySource(client.ApiClient(), settings=SETTINGS, store=store)
    source.api = source.keys.api = api
    tasks: list[asyncio.Task] = []
    yield api, store, source, tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def names(store: KeyStore) -> dict[str, str]:
    return {r.name: r.state for r in (*store.keyring("shop").keys,
                                      *store.keyring("shop").retired)}


def retired(obj: dict, version: str) -> dict:
    obj = {**obj, "data": {}, "metadata": {**obj["metadata"], "resourceVersion": version}}
    obj["metadata"]["annotations"] = {**obj["metadata"]["annotations"],
                                      "keymount.io/retired": "2026-12-01T00:00:00Z"}
    return obj


k1 = secret("k1", "10", index=1)
k2 = secret("k2", "21", index=2, annotations={"keymount.io/numbers-used": "1-2"})


async def start(api: HeldApi, source: KubernetesKeySource, tasks, *, listed: list,
                at: str, watch_lines: list, hold_watch: threading.Event | None = None):
    api.lists.append(listing(listed, at))
    await source.keys.load()
    hang = threading.Event()
    lines = Response(lines=watch_lines, hang=hang)
    if hold_watch is not None:
        api.watches.append(held(lines, hold_watch, threading.Event()))
    else:
        api.watches.append(lines)
    tasks.append(asyncio.create_task(source.keys.run()))
    return hang


@pytest.mark.parametrize(("listed", "watched", "expected"), [
    ([k1], [event("ADDED", k2)], {"k1": "valid", "k2": "valid"}),
    ([k1, k2], [event("MODIFIED", retired(k1, "22"))], {"k1": "retired", "k2": "valid"}),
    ([k1, k2], [event("DELETED", {**k2, "metadata": {**k2["metadata"],
                                                   "resourceVersion": "23"}})],
     {"k1": "valid"}),
], ids=["key-created-after-the-read", "key-retired-after-the-read",
        "key-deleted-after-the-read"])
async def test_a_live_read_overtaken_by_the_watch_does_not_undo_what_the_watch_saw(
        parts, listed, watched, expected):
    api, store, source, tasks = parts
    # The first list holds what existed at its revision: k2 only if the read saw it too.
    hang = await start(api, source, tasks, listed=[k1, *([k2] if k2 in listed else [])],
                       at="21" if k2 in listed else "10", watch_lines=watched)
    release, taken = threading.Event(), threading.Event()
    # The live read lists the namespace as of revision 21 ...
    api.lists.append(held(listing(listed, "21" if k2 in listed else "20"), release, taken))
    confirm = asyncio.create_task(source.confirm("shop"))
    await wait_for(taken.is_set, what="the live read's list taken")
    # ... the watch delivers a later change meanwhile ...
    await wait_for(lambda: names(store) == expected, what="the watch event applied")
    release.set()  # ... and then the read's answer lands.
    ring = await confirm
    hang.set()
    assert names(store) == expected
    assert {r.name for r in (*ring.keys, *ring.retired)} == set(expected)


@pytest.mark.parametrize(("watched", "expected"), [
    ([event("MODIFIED", secret("k1", "15", index=1))], {"k1": "retired", "k2": "valid"}),
    # k2 was deleted at 18 and created again at 21; the watch has not got to 21 yet.
    ([event("DELETED", {**k2, "metadata": {**k2["metadata"], "resourceVersion": "18"}})],
     {"k1": "retired", "k2": "valid"}),
], ids=["older-change-of-a-key", "older-deletion-of-a-recreated-key"])
async def test_a_watch_lagging_behind_a_live_read_does_not_undo_what_the_read_saw(
        parts, watched, expected):
    api, store, source, tasks = parts
    hold = threading.Event()
    hang = await start(api, source, tasks, listed=[k1], at="10", watch_lines=watched,
                       hold_watch=hold)
    # The live read sees k1 retired (revision 22) and k2 (created again at 21) ...
    api.lists.append(listing([retired(k1, "22"), k2], "22"))
    await source.confirm("shop")
    assert names(store) == expected
    # ... then the watch, which lags, delivers the older events.
    hold.set()
    await wait_for(lambda: source.keys.versions.get(None) == watched[-1]["object"][
        "metadata"]["resourceVersion"], what="the lagging events applied")
    hang.set()
    assert names(store) == expected


async def test_a_secret_a_later_list_did_not_hold_is_not_brought_back_by_an_older_event(parts):
    # X was added at 15 and deleted at 20; a live read at 22 lists nothing. The watch,
    # lagging, then delivers ADDED X@15 (its DELETED@20 still to come).
    api, store, source, tasks = parts
    x = secret("x", "15", index=1)
    hold = threading.Event()
    hang = await start(api, source, tasks, listed=[], at="10",
                       watch_lines=[event("ADDED", x)], hold_watch=hold)
    api.lists.append(listing([], "22"))
    await source.confirm("shop")
    hold.set()
    await wait_for(lambda: source.keys.versions.get(None) == "15", what="ADDED x@15 applied")
    hang.set()
    assert names(store) == {}


def test_a_list_without_a_version_is_the_truth_as_it_stands():
    # --keys-from (no resourceVersions): a file replaced by an older export still wins.
    from webhook.key_secrets import parse_key_secret
    store = KeyStore()
    newer = parse_key_secret(secret("k1", "30", index=1), settings=SETTINGS)
    older = parse_key_secret(secret("k1", "12", index=1), settings=SETTINGS)
    store.replace_all([newer])
    store.replace_all([older])
    assert [r.revision for r in store.keyring("shop").keys] == [12]


def test_a_live_read_older_than_a_cluster_relist_does_not_bring_back_what_it_missed():
    # The watch broke (410); meanwhile x was made (12) and deleted (18) in a namespace
    # with no other key Secret, so no event about it ever reaches the cache. A live read
    # of that namespace taken at 15 (x still there) lands after the re-list at 20, which
    # held nothing there: x must not come back (new Pods would list a deleted Secret
    # until the next resync, ten minutes later).
    from webhook.key_secrets import parse_key_secret
    store = KeyStore()
    store.replace_all([], version="10")
    store.replace_all([], version="20")  # the re-list after 410
    x = parse_key_secret(secret("x", "12", index=1), settings=SETTINGS)
    store.replace_namespace("shop", [x], version="15")  # the live read, landing late
    assert names(store) == {}


def test_live_reads_of_namespaces_without_keys_leave_nothing_behind_in_the_cache():
    # Anything that reaches the port (without --client-ca) can name any namespace in a
    # review; each key-state refusal lists that namespace live and hands the (empty)
    # list to the store. The store's memory must not grow with names it never holds a
    # key Secret of: at 20 made-up names a second, 190 bytes each filled the 320Mi
    # limit within a day.
    import gc
    import tracemalloc

    from webhook.store import REMEMBERED_DELETIONS
    store = KeyStore()
    store.replace_all([], version="10")

    def forged(first: int) -> None:
        for i in range(first, first + REMEMBERED_DELETIONS):
            store.replace_namespace(f"made-up-{i:08d}", [], version=str(20 + i))

    forged(0)  # fills what is bounded on purpose (the lists' revisions) ...
    tracemalloc.start()
    try:
        forged(REMEMBERED_DELETIONS)  # ... and, traced, turns it over once
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        forged(2 * REMEMBERED_DELETIONS)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100 * 1024, f"{grown} bytes for {REMEMBERED_DELETIONS} made-up names"
    assert store.namespaces() == []


def test_a_namespace_emptied_and_refilled_never_shows_an_earlier_version_again():
    # LiveReads reuses a read only while version(namespace) is what it was then: any
    # change in between, even one undone since, must show.
    from webhook.key_secrets import parse_key_secret
    store = KeyStore()
    seen = {store.version("shop")}
    for revision in range(11, 17):
        if revision % 2:
            store.put(parse_key_secret(secret("k1", str(revision), index=1),
                                       settings=SETTINGS))
        else:
            store.remove(parse_key_secret(secret("k1", str(revision), index=1),
                                          settings=SETTINGS))
        assert store.version("shop") not in seen, revision
        seen.add(store.version("shop"))
