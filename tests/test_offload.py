"""Large reviews, decoded and judged in the worker process (webhook/offload.py), over
real TLS: the same answers as on the event loop, a bounded loop, and a dead worker
answered allowed: false."""

import asyncio
import gzip
import json
import os
import signal
import ssl
import time
import zlib

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict

from webhook.admission import MAX_CONTAINERS, parse_review
from webhook.certs import build_certificates, write_certificates
from webhook.config import Settings
from webhook.events import event_for
from webhook.localdir import DirectoryKeySource
from webhook.metrics import Metrics
from webhook.offload import HEAD_STRING, INLINE_BODY, Offload, ReadAhead, head_of
from webhook.server import MAX_BODY, Runtime
from webhook.store import KeyStore
from webhook.tls import build_ssl_context

from builders import container, key_secret, pod, random_key, review, slot_secret
from polling import wait_for


@pytest.fixture
def certs(tmp_path):
    return write_certificates(tmp_path / "certs", build_certificates(
        service="keymount", namespace="keymount", ips=["127.0.0.1"]))


@pytest.fixture
async def offload():
    offload = Offload(max_body=MAX_BODY)
    await offload.start()
    yield offload
    offload.close()


@pytest.fixture
def runtime(tmp_path, offload):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "keys.yaml").write_text(yaml.safe_dump_all([
        key_secret("key-a", random_key(), index=1), key_secret("key-b", random_key(), index=2),
        slot_secret(3)]))
    store = KeyStore()
    source = DirectoryKeySource(keys, settings=Settings(), store=store, poll_interval=3600)
    return Runtime(settings=Settings(), store=store, source=source, metrics=Metrics(store),
                   offload=offload)


@pytest.fixture
async def server(webhook_site, runtime, certs):
    server = await webhook_site(runtime, ssl=build_ssl_context(
        str(certs.tls_cert), str(certs.tls_key)))
    await wait_for(lambda: runtime.store.ready)
    return server


@pytest.fixture
async def client(server, certs):
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    async with aiohttp.ClientSession(base_url=str(server.make_url("/")),
                                     connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def post(client, path, body: bytes):
    async with client.post(path, data=body, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


def padded(body: dict, size: int = 4 * INLINE_BODY) -> bytes:
    """`body` with environment variables on its Pod's first container (or a filler
    data field on its Secret) until it is `size` bytes: past INLINE_BODY, into the worker."""
    obj = body["request"]["object"]
    filler = "x" * (size - len(json.dumps(body).encode()))
    if obj["kind"] == "Pod":
        obj["spec"]["containers"][0]["env"] = [{"name": "FILLER", "value": filler}]
    else:
        obj.setdefault("data", {})["filler"] = filler
    encoded = json.dumps(body).encode()
    assert len(encoded) > INLINE_BODY
    return encoded


KEYPOLICY = {"apiVersion": "keymount.io/v1alpha1", "kind": "KeyPolicy",
             "metadata": {"name": "default", "namespace": "shop"},
             "spec": {"rotationPeriod": "720h", "stagingPeriod": "24h"}}


def keypolicy_review() -> dict:
    body = review(json.loads(json.dumps(KEYPOLICY)), kind="KeyPolicy")
    body["request"]["kind"]["group"] = "keymount.io"
    return body


CASES = {
    "backend-pod-injected": ("/mutate", review(pod())),
    "mount-conflict-denied": ("/mutate", review(pod(container("app", volumeMounts=[
        {"name": "other", "mountPath": "/encryption-keys"}])))),
    "other-pod-skipped": ("/mutate", review(pod(labels={"app": "web"}))),
    "no-key-namespace-denied-after-a-live-read": ("/mutate", review(pod(), namespace="empty")),
    "dry-run": ("/mutate", review(pod(), dry_run=True)),
    "key-secret-stamped": ("/mutate", review(key_secret("key-c", random_key()),
                                              kind="Secret")),
    "key-secret-guarded": ("/validate", review(key_secret("key-c", random_key(), index=3),
                                                kind="Secret")),
    "final-pod-checked": ("/validate", review(pod())),
    "keypolicy-without-the-api": ("/validate", keypolicy_review()),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
async def test_a_large_review_gets_the_answer_the_event_loop_would_give(
        client, runtime, offload, case):
    path, body = CASES[case]
    data = padded(body)
    status, worker_answer = await post(client, path, data)
    runtime.offload = None  # the same runtime, the same keys: decoded on the loop
    inline_status, inline_answer = await post(client, path, data)
    assert (status, worker_answer) == (inline_status, inline_answer)
    assert status == 200 and worker_answer["response"]["uid"] == body["request"]["uid"]


@pytest.mark.parametrize("body", [
    b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": ' +
    b" " * INLINE_BODY + b"nope}",
    b"[" + b"{}," * (MAX_CONTAINERS + 1) + b"{}]",
], ids=["invalid-json", "too-many-objects"])
async def test_a_large_malformed_body_is_400_with_the_event_loops_message(
        client, runtime, body):
    status, answer = await post(client, "/mutate", body)
    runtime.offload = None
    assert (status, answer) == await post(client, "/mutate", body)
    assert status == 400


async def test_an_overlong_uid_in_a_large_review_is_400():
    body = review(pod(), uid="u" * (HEAD_STRING + 1))
    request = parse_review(padded(body))
    from webhook.offload import check_head
    assert "request uid is over" in check_head(head_of(request))


def hostile_review() -> bytes:
    """Just under 7 MiB: a backend Pod with ~95,000 environment variables, about
    50 ms to decode on the event loop."""
    body = review(pod())
    body["request"]["object"]["spec"]["containers"][0]["env"] = [
        {"name": f"E{i:06d}", "value": "v" * 40} for i in range(95_000)]
    data = json.dumps(body).encode()
    assert 6 * 2**20 < len(data) < MAX_BODY
    return data


async def test_a_7_mib_review_costs_the_event_loop_under_a_millisecond(client, runtime):
    data = hostile_review()
    status, answer = await post(client, "/mutate", data)
    assert status == 200 and answer["response"]["allowed"] is True
    offloaded = runtime.metrics.admissions.loop_cpu["mutate"][-1]  # the sum, one request
    assert offloaded < 0.001, f"{offloaded * 1000:.2f} ms of loop CPU"
    # The same review on the loop: what the worker spares it (so the bound can fail).
    runtime.offload = None
    assert (await post(client, "/mutate", data))[1] == answer
    assert runtime.metrics.admissions.loop_cpu["mutate"][-1] - offloaded > 0.005


async def test_a_dead_worker_refuses_its_review_and_the_next_one_starts_a_new_worker(
        client, runtime, offload):
    restarts = []
    offload._on_restart = lambda: restarts.append(1)
    pool = offload._executor()
    os.kill(next(iter(pool._processes)), signal.SIGKILL)
    data = padded(review(pod()))
    status, answer = await post(client, "/mutate", data)
    assert status == 500 and "worker" in answer["error"] and "allowed" not in answer
    assert restarts == [1]
    status, answer = await post(client, "/mutate", data)
    assert status == 200 and answer["response"]["allowed"] is True
    assert "patch" in answer["response"]


async def test_a_large_body_sent_slowly_does_not_hold_up_other_large_reviews(
        server, client, runtime, certs):
    # A client that announces a large body and sends it a byte now and then: were the
    # worker's lock taken before the body is in, every large review from the API
    # server would wait behind it until the connection's request deadline, one slow
    # client after another.
    data = padded(review(pod()))
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context,
                                              server_hostname="127.0.0.1")
    try:
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: keymount\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data)
                     + data[:1000])
        await writer.drain()
        await wait_for(lambda: runtime.metrics.large_reviews._value.get() == 1,
                       what="the slow body's handler has started")
        status, answer = await asyncio.wait_for(post(client, "/mutate", data), timeout=5)
        assert status == 200 and answer["response"]["allowed"] is True
        assert "patch" in answer["response"]
    finally:
        writer.close()


async def test_a_slow_sender_filling_the_read_ahead_is_dropped_for_the_next_review(
        server, client, runtime, certs):
    # Bodies read ahead of the worker are bounded in all; a client that announces a
    # body as large as that bound and sends it slowly would otherwise keep every other
    # large review waiting until its request deadline.
    runtime.offload.read_ahead = ReadAhead(MAX_BODY, slow=0.3)
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context,
                                                   server_hostname="127.0.0.1")
    try:
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: keymount\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n{" % MAX_BODY)
        await writer.drain()
        await wait_for(lambda: runtime.offload.read_ahead.used == MAX_BODY,
                       what="the slow body holds the whole read-ahead")
        status, answer = await asyncio.wait_for(
            post(client, "/mutate", padded(review(pod()))), timeout=5)
        assert status == 200 and answer["response"]["allowed"] is True
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # dropped
        dropped = runtime.metrics.connections_dropped.labels("slow-body")._value.get()
        assert dropped == 1
        assert runtime.offload.read_ahead.used == 0
    finally:
        writer.close()


async def test_copying_a_7_mib_body_into_the_worker_never_holds_the_loop_a_millisecond(
        offload):
    chunks = [os.urandom(64 * 1024)] * 112  # 7 MiB as the socket hands it over
    copied = False
    slices: list[float] = []

    async def another_request() -> None:
        # What the loop spends between two turns of this task is the copy's slice.
        while not copied:
            mark = time.thread_time()
            await asyncio.sleep(0)
            slices.append(time.thread_time() - mark)

    other = asyncio.create_task(another_request())
    await asyncio.sleep(0)
    async with offload.lock:
        length = await offload.write(chunks)
    copied = True
    await other
    assert length == 112 * 64 * 1024
    assert bytes(offload.buffer[:length]) == b"".join(chunks)
    assert len(slices) >= length // (2 * 2**20), "the copy never let another request run"
    assert max(slices) < 0.001, f"a slice of {max(slices) * 1000:.2f} ms"


def test_the_head_gives_events_and_logs_what_the_whole_request_gives():
    owned = pod()
    owned["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "1"},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-7d9", "uid": "2",
         "controller": True, "blockOwnerDeletion": True}]
    from webhook.admission import Verdict, denied
    from webhook.keyguard import KeyDecision
    refused = Verdict("denied", denied("no key"))
    for body in (review(owned), review(pod(name="")), review({}), review(None),
                 review(key_secret("key-c", random_key()), kind="Secret", operation="DELETE",
                        old=key_secret("key-c", random_key()))):
        request = parse_review(json.dumps(body).encode())
        head = head_of(request).request
        assert head.object_name == request.object_name
        assert (head.is_pod, head.uid, head.namespace) == (request.is_pod, request.uid,
                                                          request.namespace)
        assert event_for(head, refused, webhook="validate") == \
            event_for(request, refused, webhook="validate")
        key = Verdict("denied", denied("no"), key=KeyDecision(False, "refused", "no"))
        assert event_for(head, key, webhook="validate") == \
            event_for(request, key, webhook="validate")


async def test_a_refusal_quoting_a_megabyte_name_is_refused_without_the_quote(client):
    long_name = "c" * (300 * 1024)
    body = review(pod(container(long_name, volumeMounts=[
        {"name": "other", "mountPath": "/encryption-keys"}])))
    status, answer = await post(client, "/mutate", json.dumps(body).encode())
    response = answer["response"]
    assert status == 200 and response["allowed"] is False
    assert response["status"]["code"] == 500 and "limit" in response["status"]["message"]
    assert long_name not in json.dumps(answer)


async def test_the_worker_yields_the_cpu_to_the_event_loop(offload):
    pool = offload._executor()
    (pid,) = pool._processes
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)


def compressed_hostile_review() -> bytes:
    """A backend Pod with 95,000 environment variables, gzipped to a few KiB: its
    Content-Length is under INLINE_BODY, what it inflates to is MiBs."""
    body = review(pod())
    body["request"]["object"]["spec"]["containers"][0]["env"] = [
        {"name": "E", "value": "v"} for _ in range(95_000)]
    data = gzip.compress(json.dumps(body, separators=(",", ":")).encode(), 9)
    assert len(data) < INLINE_BODY
    return data


@pytest.mark.parametrize("encoding", ["gzip", "deflate", ["identity", "gzip"],
                                      "identity, gzip", " GZIP "],
                         ids=["gzip", "deflate", "two-headers", "two-codings", "spaced"])
async def test_a_compressed_review_is_never_inflated_and_decoded_on_the_event_loop(
        client, runtime, encoding):
    # The Content-Length of a compressed body is its compressed size: a few KiB says
    # "inline", and aiohttp inflates it to MiBs that the loop then decodes (tens of
    # ms, every other admission waiting), past the worker and past the connection
    # guard's and read-ahead's byte counts. The API server never compresses a review.
    data = compressed_hostile_review()
    if encoding == "deflate":
        data = zlib.compress(gzip.decompress(data), 9)
    headers = CIMultiDict({"Content-Type": "application/json"})
    for value in encoding if isinstance(encoding, list) else [encoding]:
        headers.add("Content-Encoding", value)
    async with client.post("/mutate", data=data, headers=headers) as r:
        status = r.status
        await r.read()
    assert status == 415
    cpu = runtime.metrics.admissions.loop_cpu.get("mutate")
    assert cpu is None or cpu[-1] < 0.001, f"{cpu[-1] * 1000:.2f} ms of loop CPU"


async def test_a_large_malformed_review_is_refused_in_a_few_words_not_quoted_back_whole(
        client, runtime):
    # parse_review quotes an unsupported apiVersion: from the worker, that is the whole
    # 7 MiB of it, which the loop would encode into the 400's JSON (tens of ms, every
    # other admission waiting) and send back.
    body = json.dumps({"apiVersion": "v" * (MAX_BODY - 1024), "kind": "AdmissionReview",
                       "request": review(pod())["request"]}).encode()
    assert INLINE_BODY < len(body) < MAX_BODY
    async with client.post("/mutate", data=body,
                           headers={"Content-Type": "application/json"}) as r:
        status, answer = r.status, await r.read()
    assert status == 400 and b"apiVersion" in answer
    assert len(answer) < 4096, f"a 400 of {len(answer)} bytes"
