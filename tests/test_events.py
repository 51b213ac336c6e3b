"""Kubernetes Events: which Event a decision deserves (pure), and the recorder that
aggregates repeats into one Event, confirms a refused Pod's owner before naming it,
and stays bounded whatever the reviews say. The recorder runs against a fake of
`events.EventSink`, keymount's wrapper of the API calls (tests/test_cluster_client.py
covers the wrapper itself)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from webhook.admission import AdmissionRequest, Verdict, allowed, denied, parse_review
from webhook.events import (
    EVENTS_REMEMBERED,
    EventExists,
    EventGone,
    EventNote,
    EventRecorder,
    NamespaceGone,
    Remembered,
    TokenBucket,
    aggregation_key,
    event_for,
    event_name,
    occurrence,
)
from webhook.keyguard import KeyDecision

from builders import pod, review
from polling import wait_for

RS_UID = "5c1d-rs-uid"
OWNER = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "payments-api-7d9f",
         "uid": RS_UID, "controller": True}


class FakeSink:
    """Events stored by namespace and name; owners by (namespace, kind, name) -> uid."""

    def __init__(self, owners: dict[tuple[str, str, str], str] | None = None,
                 namespaces: tuple[str, ...] = ("shop",)) -> None:
        self.owners = dict(owners or {})
        self.namespaces = set(namespaces)
        self.events: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[str] = []

    async def create_event(self, event: dict[str, Any]) -> None:
        self.calls.append("create")
        meta = event["metadata"]
        if meta["namespace"] not in self.namespaces:
            raise NamespaceGone(meta["namespace"])
        if (meta["namespace"], meta["name"]) in self.events:
            raise EventExists(meta["name"])  # the API server answers 409
        self.events[meta["namespace"], meta["name"]] = event

    async def patch_event(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append("patch")
        if (namespace, name) not in self.events:
            raise EventGone(name)
        self.events[namespace, name].update(patch)

    async def owner_uid(self, namespace: str, api_version: str, kind: str,
                        name: str) -> str | None:
        self.calls.append("get")
        return self.owners.get((namespace, kind, name))


def refused_pod(name: str, *, owner: dict[str, Any] | None = OWNER,
                namespace: str = "shop", dry_run: bool = False) -> AdmissionRequest:
    body = pod(name=name)
    if owner is not None:
        body["metadata"]["ownerReferences"] = [owner]
    return parse_review(orjson.dumps(review(body, namespace=namespace, dry_run=dry_run)))


REFUSED = Verdict("denied", denied("no valid key in namespace shop"))


def refusal(name: str = "payments-api-7d9f-x1", **kw: Any) -> EventNote:
    note = event_for(refused_pod(name, **kw), REFUSED, webhook="mutate")
    assert note is not None
    return note


def recorder(sink: FakeSink, **kw: Any) -> EventRecorder:
    return EventRecorder(sink, rate=1e9, burst=1_000_000, **kw)


def key_review(action: str, *, number: int = 2) -> EventNote | None:
    secret = {"metadata": {"name": f"keymount-key-{number}", "namespace": "shop",
                           "uid": "secret-uid"}}
    request = parse_review(orjson.dumps(review(secret, kind="Secret", operation="UPDATE")))
    decision = KeyDecision(True, action, number=number, fingerprint="sha256:ab12")
    return event_for(request, Verdict("allowed", allowed(), key=decision), webhook="validate")


def controller_note(reason: str, *, number: int = 2) -> EventNote:
    """What the controller records for its own staging or activation (controller._stepped)."""
    return EventNote("shop", "Secret", f"keymount-key-{number}", "v1", "", "Normal", reason,
                     f"the controller's own words on key {number}",
                     occurrence=occurrence(reason, number))


@pytest.mark.parametrize(("action", "name"), [
    ("staged", "keymount-key-2.keystaged-2"), ("activated", "keymount-key-2.keyactivated-2"),
    ("created", None), ("retired", None)],
    ids=["staged", "activated", "created-again-by-a-restore", "retired"])
def test_a_staging_or_activation_is_one_event_named_after_the_key(action, name):
    note = key_review(action)
    assert note is not None
    assert (event_name(note, 1234) if note.occurrence else None) == name


@pytest.mark.parametrize("reason", ["KeyStaged", "KeyActivated"])
async def test_the_controller_and_the_webhook_record_one_staging_or_activation(reason):
    """Both see the controller's write: whoever is first creates the Event; the other
    finds it (409) and adds nothing, and a repeat is never counted up."""
    sink = FakeSink()
    events = recorder(sink)
    webhook_note = key_review({"KeyStaged": "staged", "KeyActivated": "activated"}[reason])
    assert webhook_note is not None
    for note in (controller_note(reason), webhook_note, controller_note(reason)):
        events.emit(note)
        await events.flush()
    [(where, event)] = sink.events.items()
    assert where == ("shop", f"keymount-key-2.{reason.lower()}-2")
    assert event["count"] == 1 and event["message"] == "the controller's own words on key 2"
    assert sink.calls == ["create"] * 3
    # Another key's is an Event of its own.
    events.emit(controller_note(reason, number=3))
    await events.flush()
    assert len(sink.events) == 2


def test_a_dry_run_refusal_records_no_event():
    assert event_for(refused_pod("p", dry_run=True), REFUSED, webhook="mutate") is None


def test_refusals_of_one_owners_pods_share_one_aggregation_key():
    first, second = refusal("payments-api-7d9f-a1"), refusal("payments-api-7d9f-b2")
    assert first.message != second.message  # each names its Pod
    assert aggregation_key(first) == aggregation_key(second)


async def test_300_refusals_of_one_owners_pods_make_one_event_counted_300():
    sink = FakeSink({("shop", "ReplicaSet", "payments-api-7d9f"): RS_UID})
    events = recorder(sink)
    for i in range(300):
        events.emit(refusal(f"payments-api-7d9f-{i}"))
        if i % 7 == 0:  # the worker catches up now and then, as it would while serving
            await events.flush()
    await events.flush()
    assert len(sink.events) == 1
    (event,) = sink.events.values()
    assert event["count"] == 300 and event["reason"] == "BackendPodRefused"
    assert event["involvedObject"]["name"] == "payments-api-7d9f"
    assert event["involvedObject"]["uid"] == RS_UID
    assert event["message"].startswith("backend Pod payments-api-7d9f-299 ")
    assert sink.calls.count("get") == 1 and sink.calls.count("create") == 1
    assert sink.calls.count("patch") >= 1


async def test_the_running_recorder_sends_repeats_as_patches_of_one_event():
    sink = FakeSink({("shop", "ReplicaSet", "payments-api-7d9f"): RS_UID})
    events = recorder(sink)
    task = asyncio.create_task(events.run())
    try:
        for i in range(50):
            events.emit(refusal(f"payments-api-7d9f-{i}"))
            await asyncio.sleep(0)  # let the worker run between admissions
        await wait_for(lambda: [e["count"] for e in sink.events.values()] == [50],
                       what="one Event counted 50")
    finally:
        task.cancel()
    assert sink.calls.count("create") == 1 and sink.calls.count("patch") >= 1


@pytest.mark.parametrize("owners", [{}, {("shop", "ReplicaSet", "payments-api-7d9f"): "other"}],
                         ids=["owner-not-found", "uid-mismatch"])
async def test_a_forged_owner_reference_puts_the_event_on_the_namespace(owners):
    sink = FakeSink(owners)
    events = recorder(sink)
    for i in range(20):
        events.emit(refusal(f"p-{i}"))
        await events.flush()
    (event,) = sink.events.values()
    assert event["involvedObject"] == {"kind": "Namespace", "name": "shop",
                                       "apiVersion": "v1", "namespace": "shop"}
    assert event["count"] == 20
    assert sink.calls.count("get") == 1  # the verdict on the owner is remembered


async def test_an_event_in_a_namespace_that_does_not_exist_is_dropped_and_remembered():
    sink = FakeSink(namespaces=())
    events = recorder(sink)
    for i in range(10):
        events.emit(refusal(f"p-{i}", owner=None, namespace="nowhere"))
        await events.flush()
    assert sink.events == {} and sink.calls == ["create"]


async def test_an_expired_event_is_created_anew():
    sink = FakeSink()
    events = recorder(sink)
    events.emit(refusal(owner=None))
    await events.flush()
    sink.events.clear()  # the API server expired it
    events.emit(refusal(owner=None))
    await events.flush()
    assert sink.calls == ["create", "patch", "create"]
    assert [e["count"] for e in sink.events.values()] == [1]


async def test_a_burst_past_the_queue_counts_exactly_the_dropped_events():
    sink = FakeSink()
    dropped: list[int] = []
    events = recorder(sink, capacity=8, on_drop=lambda: dropped.append(1))
    for i in range(20):  # twenty distinct Events: none aggregates with another
        events.emit(EventNote("shop", "Secret", f"k{i}", "v1", f"uid-{i}", "Normal",
                              "KeyCreated", "key created"))
    assert len(events.pending) == 8 and len(dropped) == 12
    await events.flush()
    assert sorted(e["involvedObject"]["name"] for e in sink.events.values()) == \
        sorted(f"k{i}" for i in range(8))


async def test_repeats_of_a_waiting_event_take_no_room_in_the_queue():
    dropped: list[int] = []
    events = recorder(FakeSink(), capacity=1, on_drop=lambda: dropped.append(1))
    for i in range(100):
        events.emit(refusal(f"p-{i}", owner=None))
    assert dropped == [] and [p.count for p in events.pending.values()] == [100]


async def test_the_recorders_caches_never_exceed_their_size():
    owners = {("shop", "ReplicaSet", f"rs-{i}"): f"uid-{i}" for i in range(50)}
    events = recorder(FakeSink(owners))
    events.sent.size = events.owners.size = 10
    for i in range(50):
        events.emit(refusal(f"p-{i}", owner={**OWNER, "name": f"rs-{i}", "uid": f"uid-{i}"}))
        await events.flush()
        assert len(events.sent) <= 10 and len(events.owners) <= 10
    assert len(events.sent) == 10 and len(events.owners) == 10
    assert EVENTS_REMEMBERED == 4096  # client-go's correlator cache size


@pytest.mark.parametrize(("now", "expected"), [(15.0, None), (10.0, None), (9.9, "v")],
                         ids=["gone-after-ttl", "gone-at-ttl", "kept-before-ttl"])
def test_a_remembered_entry_lasts_its_ttl(now, expected):
    cache: Remembered[str, str] = Remembered(2, ttl=10.0)
    cache.put("k", "v", 0.0)
    assert cache.get("k", now) == expected


def test_the_least_recently_used_entry_leaves_first():
    cache: Remembered[str, int] = Remembered(2, ttl=60.0)
    cache.put("a", 1, 0.0)
    cache.put("b", 2, 0.0)
    assert cache.get("a", 1.0) == 1  # "b" is now the least recently used
    cache.put("c", 3, 1.0)
    assert (cache.get("a", 1.0), cache.get("b", 1.0), cache.get("c", 1.0)) == (1, None, 3)


def test_the_token_bucket_gives_its_burst_then_waits_for_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate=10.0, burst=3, clock=lambda: now[0])
    assert [bucket.wait() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.wait() == pytest.approx(0.1)
    now[0] = 1.0  # a second later the bucket is full again
    assert [bucket.wait() for _ in range(3)] == [0.0, 0.0, 0.0]
