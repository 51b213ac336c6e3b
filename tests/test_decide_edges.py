"""server.decide's edge steps, against a fake key source: the live read a verdict asks
for, --auto-generate's key, and dryRun, which writes nothing."""

from __future__ import annotations

import base64
import json

import jsonpatch
import pytest

from webhook.admission import parse_review
from webhook.config import Settings
from webhook.keys import Keyring
from webhook.lifecycle import GENERATED_KEY_NAME
from webhook.metrics import Metrics
from webhook.server import Runtime, decide
from webhook.store import KeyStore

from builders import key_secret, keyring_of, pod, random_key, review


class FakeSource:
    """A cluster key source whose live reads return `live`, counted."""

    def __init__(self, live: dict[str, Keyring] | None = None) -> None:
        self.live = dict(live or {})
        self.reads: list[str] = []
        self.created: list[str] = []
        self.pod_reads: list[tuple[str, str]] = []
        self.listing: dict[str, tuple[str, ...]] = {}  # Secret -> the Pods listing it

    async def load(self) -> None:
        pass

    async def run(self) -> None:
        pass

    async def confirm(self, namespace: str) -> Keyring:
        self.reads.append(namespace)
        return self.live.get(namespace, Keyring(namespace))

    async def create_generated_key(self, namespace: str) -> Keyring:
        self.created.append(namespace)
        self.live[namespace] = keyring_of(
            key_secret(GENERATED_KEY_NAME, random_key(), index=1, namespace=namespace),
            namespace=namespace)
        return self.live[namespace]

    def event_sink(self):  # pragma: no cover - the events recorder is not wired here
        raise NotImplementedError

    async def pods_listing(self, namespace: str, secret: str) -> tuple[str, ...] | None:
        self.pod_reads.append((namespace, secret))
        return self.listing.get(secret, ())


def runtime_of(source: FakeSource, *, auto_generate: bool = False,
               limited: bool = False) -> Runtime:
    store = KeyStore()
    return Runtime(settings=Settings(), store=store, source=source, metrics=Metrics(store),
                   auto_generate=auto_generate,
                   live_read_rate=0.0 if limited else 10.0,
                   live_read_burst=0 if limited else 20)


def request(obj, **kw):
    return parse_review(json.dumps(review(obj, **kw)).encode())


def applied(obj, verdict):
    return jsonpatch.apply_patch(obj, json.loads(base64.b64decode(verdict.response["patch"])))


LIVE = {"shop": keyring_of(key_secret("key-a", random_key(), index=1),
                           key_secret("key-b", random_key(), index=2))}


# --- live reads --------------------------------------------------------------------------

async def test_a_key_state_refusal_on_the_cache_is_decided_again_on_a_live_read():
    source = FakeSource(LIVE)
    verdict = await decide(runtime_of(source), request(pod()), "mutate")
    assert verdict.result == "injected"
    assert source.reads == ["shop"]


async def test_an_allowed_pod_costs_no_live_read():
    source = FakeSource(LIVE)
    verdict = await decide(runtime_of(source), request(pod(labels={"app": "web"})),
                           "mutate")
    assert verdict.result == "skipped" and source.reads == []


async def test_a_new_key_is_numbered_on_a_live_read_never_the_cache():
    source = FakeSource(LIVE)  # the cache is empty: on it, the number would be 1
    verdict = await decide(runtime_of(source), request(key_secret("k3", random_key()),
                                                       kind="Secret"), "mutate")
    assert verdict.key is not None and verdict.key.number == 3
    assert source.reads == ["shop"]


@pytest.mark.parametrize(("obj", "kind", "message"), [
    (key_secret("k3", random_key()), "Secret", "retry in a few seconds"),
    (pod(), "Pod", "no valid encryption key"),
], ids=["new-key", "pod"])
async def test_past_the_live_read_limit_the_cached_refusal_stands(obj, kind, message):
    source = FakeSource(LIVE)
    verdict = await decide(runtime_of(source, auto_generate=True, limited=True),
                           request(obj, kind=kind), "mutate")
    assert verdict.response["allowed"] is False and message in verdict.message
    assert source.reads == [] and source.created == []


# --- --auto-generate ----------------------------------------------------------------------

async def test_auto_generate_creates_the_key_and_injects_it_with_a_backup_warning():
    source = FakeSource()
    verdict = await decide(runtime_of(source, auto_generate=True), request(pod()), "mutate")
    assert source.created == ["shop"]
    assert verdict.result == "injected"
    assert any("back it up now" in w for w in verdict.response["warnings"])
    volume = applied(pod(), verdict)["spec"]["volumes"][0]
    assert volume["projected"]["sources"][0]["secret"]["name"] == GENERATED_KEY_NAME


@pytest.mark.parametrize(("auto_generate", "dry_run", "webhook"), [
    (False, False, "mutate"), (True, True, "mutate"), (True, False, "validate")],
    ids=["flag-unset", "dry-run", "validate"])
async def test_no_key_is_generated_without_the_flag_on_dry_run_or_at_validate(
        auto_generate, dry_run, webhook):
    source = FakeSource()
    obj = pod() if webhook == "mutate" else applied(pod(), await decide(
        runtime_of(FakeSource(LIVE)), request(pod()), "mutate"))
    verdict = await decide(runtime_of(source, auto_generate=auto_generate),
                           request(obj, dry_run=dry_run), webhook)
    assert verdict.response["allowed"] is False
    assert source.created == []


async def test_auto_generate_leaves_a_namespace_with_an_invalid_key_alone():
    bad = key_secret("bad", b"short", index=1)
    source = FakeSource({"shop": keyring_of(bad)})
    verdict = await decide(runtime_of(source, auto_generate=True), request(pod()), "mutate")
    assert verdict.response["allowed"] is False and source.created == []


# --- nothing held between reviews -------------------------------------------------------

async def stamped_key(runtime: Runtime, name: str) -> dict:
    obj = key_secret(name, random_key())
    verdict = await decide(runtime, request(obj, kind="Secret"), "mutate")
    return applied(obj, verdict)


async def test_a_key_review_leaves_nothing_behind_that_a_later_review_could_trip_on():
    # keymount 0.2 held an allowed key's number in memory for 30 s: a forged review
    # from anyone who reaches the port got the admin's next key refused. Two writers
    # racing for one number now race for one slot, which the API server arbitrates.
    runtime = runtime_of(FakeSource(LIVE))
    forged = await stamped_key(runtime, "forged")
    assert (await decide(runtime, request(forged, kind="Secret"),
                         "validate")).response["allowed"] is True
    real = await stamped_key(runtime, "real")
    verdict = await decide(runtime, request(real, kind="Secret"), "validate")
    assert verdict.response["allowed"] is True, verdict.message
    index = "keymount.io/key-index"
    assert real["metadata"]["annotations"][index] == forged["metadata"]["annotations"][index]


@pytest.mark.parametrize(("client_ca", "recorded"), [(None, False), ("ca.crt", True)],
                         ids=["anyone-may-send-reviews", "only-the-api-server"])
def test_admissions_write_events_only_when_reviews_come_from_the_api_server(
        client_ca, recorded, caplog):
    # A forged review's Event would outlive its answer, in any namespace, naming any user.
    from webhook.cli import build_event_recorder

    class Sink:
        pass
    source = FakeSource()
    source.event_sink = lambda: Sink()
    store = KeyStore()
    recorder = build_event_recorder(source, client_ca=client_ca, metrics=Metrics(store))
    assert (recorder is not None) is recorded
    assert ("no Kubernetes Events without --client-ca" in caplog.text) is not recorded


async def test_no_review_makes_later_ones_read_the_namespace_again():
    # keymount 0.2 dropped the namespace's reused read after allowing a new key, so a
    # forged "key allowed" review in between every Pod review spent a read each.
    source = FakeSource(LIVE)
    runtime = runtime_of(source)
    assert (await decide(runtime, request(pod()), "mutate")).result == "injected"
    forged = await stamped_key(runtime, "forged")
    assert (await decide(runtime, request(forged, kind="Secret"),
                         "validate")).response["allowed"] is True
    reads = len(source.reads)
    assert (await decide(runtime, request(pod()), "mutate")).result == "injected"
    assert len(source.reads) == reads  # the Pod reused the read the key review made


async def test_auto_generate_leaves_a_namespace_with_only_an_empty_slot_to_its_writers():
    # Its generated key would take the name keymount-key-1, which slot 1 holds: creating
    # it would only ever meet 409 and refuse every Pod of the namespace again.
    from builders import slot_secret
    source = FakeSource({"shop": keyring_of(slot_secret(1))})
    verdict = await decide(runtime_of(source, auto_generate=True), request(pod()), "mutate")
    assert verdict.response["allowed"] is False and source.created == []


# --- a tombstone's deletion, decided on a live read of the Pods ---------------------------

def tombstone_delete():
    from webhook.keyguard import parse_key_writers
    retired = key_secret("k1", None, index=1, annotations={
        "keymount.io/retired": "2026-11-29T00:00:00Z", "keymount.io/numbers-used": "1"})
    body = review(None, kind="Secret", operation="DELETE", old=retired, username="alice")
    body["request"]["name"] = "k1"
    return retired, parse_review(json.dumps(body).encode()), parse_key_writers("user:alice")


@pytest.mark.parametrize(("listing", "expected"), [
    pytest.param((), "allowed", id="no-pod-lists-it-deleted"),
    pytest.param(("api-x2",), "denied", id="a-running-pod-lists-it-kept"),
])
async def test_which_pods_list_a_tombstone_is_read_live_before_its_deletion(listing, expected):
    retired, req, writers = tombstone_delete()
    source = FakeSource()
    source.listing = {"k1": listing}
    runtime = runtime_of(source)
    runtime.writers = writers
    runtime.store.replace_all([parse_key(retired), parse_key(key_secret(
        "k2", random_key(), index=2, annotations={"keymount.io/numbers-used": "1-2"}))])
    verdict = await decide(runtime, req, "validate")
    assert verdict.result == expected
    assert source.pod_reads == [("shop", "k1")]


async def test_past_the_pod_read_limit_a_tombstone_stays():
    retired, req, writers = tombstone_delete()
    source = FakeSource()
    runtime = runtime_of(source)
    runtime.writers = writers
    runtime.store.replace_all([parse_key(retired), parse_key(key_secret(
        "k2", random_key(), index=2, annotations={"keymount.io/numbers-used": "1-2"}))])
    results = [(await decide(runtime, req, "validate")).result for _ in range(8)]
    assert results[:5] == ["allowed"] * 5  # the burst
    assert "denied" in results[5:]  # then about one a second: forged reviews cost little
    assert len(source.pod_reads) < 8


def parse_key(secret):
    from webhook.key_secrets import parse_key_secret
    return parse_key_secret(secret, settings=Settings())


# --- a key's material or its only Secret lost on a cache a moment behind ------------------

def key_review(operation, old, new=None, *, name):
    from webhook.keyguard import parse_key_writers
    body = review(new, kind="Secret", operation=operation, old=old, username="alice")
    body["request"]["name"] = name
    return parse_review(json.dumps(body).encode()), parse_key_writers("user:alice")


async def test_retiring_the_active_key_is_refused_also_when_the_cache_has_not_seen_it_yet():
    # k2 was made a moment ago (the watch has not delivered it here: another replica
    # admitted it, or this one's watch is re-listing): on this cache k1 is the newest,
    # so retiring k2, the key applications encrypt with, looked like retiring an old one
    # and its key material was destroyed.
    k1 = key_secret("k1", random_key(), index=1)
    k2 = key_secret("k2", random_key(), index=2,
                    annotations={"keymount.io/numbers-used": "1-2"})
    retired = {**k2, "data": {}, "metadata": {**k2["metadata"], "annotations": {
        **k2["metadata"]["annotations"], "keymount.io/retired": "2026-12-01T00:00:00Z"}}}
    source = FakeSource({"shop": keyring_of(k1, k2)})
    runtime = runtime_of(source)
    req, runtime.writers = key_review("UPDATE", k2, retired, name="k2")
    runtime.store.replace_all([parse_key(k1)])
    verdict = await decide(runtime, req, "validate")
    assert verdict.result == "denied" and "is the active key" in verdict.message
    assert source.reads == ["shop"]


async def test_deleting_a_key_whose_twin_is_already_gone_is_refused_on_a_cache_behind():
    # a and b shared number 1; b was deleted a moment ago (`kubectl delete secret b a`),
    # and this cache still shows both. Deleting a, now the only key of number 1, must be
    # refused as for any valid key: no running Pod lists it, so nothing else stops it.
    a = key_secret("a", random_key(), index=1)
    b = key_secret("b", random_key(), index=1)
    source = FakeSource({"shop": keyring_of(a)})
    runtime = runtime_of(source)
    req, runtime.writers = key_review("DELETE", a, name="a")
    runtime.store.replace_all([parse_key(a), parse_key(b)])
    verdict = await decide(runtime, req, "validate")
    assert verdict.result == "denied" and "Retire it first" in verdict.message
    assert source.reads == ["shop"]


async def test_deleting_one_of_two_keys_that_share_a_number_is_still_allowed():
    a = key_secret("a", random_key(), index=1)
    b = key_secret("b", random_key(), index=1)
    source = FakeSource({"shop": keyring_of(a, b)})
    runtime = runtime_of(source)
    req, runtime.writers = key_review("DELETE", b, name="b")
    runtime.store.replace_all([parse_key(a), parse_key(b)])
    verdict = await decide(runtime, req, "validate")
    assert verdict.result == "allowed", verdict.message


def _legacy(secret):
    secret["metadata"].pop("annotations", None)
    return secret


@pytest.mark.parametrize("case", ["rotated-then-retired", "pinned-then-retired"])
async def test_a_retire_refused_on_a_cache_a_moment_behind_is_decided_on_a_live_read(case):
    # `keys rotate` then `keys retire k1`: the CLI reads the namespace live (k2 is there)
    # and patches; this replica's watch has not delivered k2 yet. Or `keys retire k1` in a
    # keymount 0.1 namespace: the CLI pins the legacy keys, then patches the retirement a
    # millisecond later, before the pins reach this cache. The cache's refusal ("the
    # active key", "pin them first") would stand, telling the user to do what they just
    # did: it is decided on a live read instead, as an allowed retirement is.
    k1 = key_secret("k1", random_key(), index=1)
    k2 = key_secret("k2", random_key(), index=2,
                    annotations={"keymount.io/numbers-used": "1-2"})
    if case == "rotated-then-retired":
        cached = [k1]
    else:
        cached = [_legacy(json.loads(json.dumps(k1))), _legacy(json.loads(json.dumps(k2)))]
    retired = {**k1, "data": {}, "metadata": {**k1["metadata"], "annotations": {
        **k1["metadata"]["annotations"], "keymount.io/retired": "2026-12-01T00:00:00Z"}}}
    source = FakeSource({"shop": keyring_of(k1, k2)})
    runtime = runtime_of(source)
    req, runtime.writers = key_review("UPDATE", k1, retired, name="k1")
    runtime.store.replace_all([parse_key(s) for s in cached])
    verdict = await decide(runtime, req, "validate")
    assert verdict.result == "allowed", verdict.message
    assert source.reads == ["shop"]
