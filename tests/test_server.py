"""The HTTPS server over real TLS: bad input, failure paths, probes, metrics, reload."""

import asyncio
import base64
import json
import os
import ssl
from pathlib import Path

import aiohttp
import jsonpatch
import pytest
import yaml

from webhook.certs import build_certificates, write_certificates
from webhook.config import Settings
from webhook.localdir import DirectoryKeySource
from webhook.metrics import Metrics
from webhook.server import MAX_BODY, Runtime, build_probe_app
from webhook.store import KeyStore
from webhook.tls import CertReloader, build_ssl_context

from builders import container, key_secret, pod, random_key, review, slot_secret
from polling import wait_for


def write_keys(directory: Path, *secrets, name="keys.yaml"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(yaml.safe_dump_all(secrets))


@pytest.fixture
def certs(tmp_path):
    return write_certificates(tmp_path / "certs", build_certificates(
        service="keymount", namespace="keymount", ips=["127.0.0.1"]))


@pytest.fixture
def keys_dir(tmp_path):
    directory = tmp_path / "keys"
    write_keys(directory, key_secret("key-a", random_key(), index=1),
               key_secret("key-b", random_key(), index=2), slot_secret(3, namespace="shop"),
               slot_secret(4, namespace="shop"))
    return directory


@pytest.fixture
def runtime(keys_dir):
    store = KeyStore()
    # A long poll interval: only the startup load and confirm() read the directory.
    source = DirectoryKeySource(keys_dir, settings=Settings(), store=store, poll_interval=3600)
    return Runtime(settings=Settings(), store=store, source=source, metrics=Metrics(store))


@pytest.fixture
async def server(webhook_site, runtime, certs):
    srv = await webhook_site(runtime,
                             ssl=build_ssl_context(str(certs.tls_cert), str(certs.tls_key)))
    await wait_for(lambda: runtime.store.ready)
    return srv


@pytest.fixture
async def client(server, certs):
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    async with aiohttp.ClientSession(
            base_url=str(server.make_url("/")),
            connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def post(client, path, body, **kw):
    async with client.post(path, json=body, **kw) as resp:
        return resp.status, await resp.json()


async def test_a_backend_pod_is_patched_over_tls(client):
    body = review(pod())
    status, answer = await post(client, "/mutate", body)
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == body["request"]["uid"] and response["allowed"] is True
    result = jsonpatch.apply_patch(body["request"]["object"],
                                   json.loads(base64.b64decode(response["patch"])))
    assert [s["secret"]["name"] for s in result["spec"]["volumes"][0]["projected"]["sources"]] \
        == ["key-a", "key-b", "keymount-key-3", "keymount-key-4"]


def secrets_mounted(body: dict, answer: dict) -> list[str]:
    result = jsonpatch.apply_patch(body["request"]["object"],
                                   json.loads(base64.b64decode(answer["response"]["patch"])))
    return [s["secret"]["name"] for s in result["spec"]["volumes"][0]["projected"]["sources"]]


async def test_the_pods_of_a_workload_share_one_verdict_until_the_keys_change(
        client, runtime, keys_dir):
    bodies = [review(pod(name=f"api-{n}"), uid=f"uid-{n}") for n in range(3)]
    answers = [(await post(client, "/mutate", body))[1] for body in bodies[:2]]
    assert [a["response"]["uid"] for a in answers] == ["uid-0", "uid-1"]
    assert answers[0]["response"]["patch"] == answers[1]["response"]["patch"]
    assert len(runtime.pod_verdicts) == 1  # the second Pod was answered from memory
    write_keys(keys_dir, key_secret("key-c", random_key(), index=5), name="rotated.yaml")
    await runtime.source.load()
    _, rotated = await post(client, "/mutate", bodies[2])
    assert secrets_mounted(bodies[2], rotated)[:3] == ["key-a", "key-b", "key-c"]


@pytest.mark.parametrize(("path", "webhook"), [
    ("/mutate?timeout=10s", "mutate"), ("/validate?timeout=10s", "validate"),
    ("/mutate", "mutate")], ids=["mutate-as-the-api-server-calls-it",
                                 "validate-as-the-api-server-calls-it", "without-a-query"])
async def test_each_webhook_is_reached_at_its_path_whatever_the_query(client, path, webhook):
    # The API server appends ?timeout=<the webhook's timeoutSeconds> to the URL.
    status, answer = await post(client, path, review(pod()))
    assert status == 200
    # Told apart by their answers: mutate injects the keys, validate refuses a backend
    # Pod that has none.
    if webhook == "mutate":
        assert answer["response"]["allowed"] is True and "patch" in answer["response"]
    else:
        assert answer["response"]["allowed"] is False and "patch" not in answer["response"]


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("POST", "/", 404, None), ("POST", "/mutate/", 404, None), ("POST", "/healthz", 404, None),
    ("POST", "/MUTATE", 404, None), ("GET", "/mutate", 405, "POST"),
    ("PUT", "/validate", 405, "POST"), ("GET", "/nowhere", 404, None)],
    ids=["root", "trailing-slash", "a-probe-path", "upper-case", "get", "put", "get-elsewhere"])
async def test_only_post_to_the_two_webhook_paths_is_answered(client, method, path, status,
                                                              allow):
    async with client.request(method, path, data=json.dumps(review(pod())),
                              headers={"Content-Type": "application/json"}) as r:
        assert r.status == status
        assert r.headers.get("Allow") == allow
        assert (await r.json())["status"] == status


async def test_expect_100_continue_is_answered_and_the_review_decided(client):
    body = review(pod())
    # The client sends the body only once "100 Continue" has come: without it, this
    # times out.
    async with client.post("/mutate", json=body, expect100=True,
                           timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200
        assert (await r.json())["response"]["uid"] == body["request"]["uid"]


async def test_an_expectation_other_than_100_continue_is_417(client):
    async with client.post("/mutate", json=review(pod()),
                           headers={"Expect": "something-else"}) as r:
        assert r.status == 417
        assert "something-else" in (await r.json())["error"]


async def test_wrong_content_type_is_415(client):
    async with client.post("/mutate", data=b"{}", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415
        assert "application/json" in (await r.json())["error"]


async def test_a_body_over_7_mib_is_413(client):
    body = b"{" + b" " * MAX_BODY + b"}"
    async with client.post("/mutate", data=body,
                           headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        assert "limit" in (await r.json())["error"]


async def test_a_chunked_body_over_7_mib_is_413(client):
    async def chunks():
        for _ in range(8):
            yield b" " * (1024 * 1024)

    async with client.post("/mutate", data=chunks(),
                           headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413


@pytest.mark.parametrize("body", [b"{nope", b'{"kind": "ConfigMap"}', b"null",
                                  b"[" * 100_000 + b"]" * 100_000],
                         ids=["malformed-json", "not-a-review", "null", "nested-100000-deep"])
async def test_malformed_input_is_400_with_a_json_error(client, body):
    async with client.post("/validate", data=body,
                           headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert (await r.json())["status"] == 400


async def test_an_exception_inside_the_handler_answers_allowed_false_code_500(
        client, runtime, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    from webhook.decisions import ROUTES
    monkeypatch.setitem(ROUTES, ("mutate", "Pod", "CREATE"), explode)
    body = review(pod(), uid="uid-500")
    status, answer = await post(client, "/mutate", body)
    assert status == 200
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 500
    assert answer["response"]["uid"] == "uid-500"
    assert "patch" not in answer["response"]


async def test_a_failing_live_read_fails_closed(client, runtime, monkeypatch):
    async def unreachable(namespace):
        raise ConnectionError("API server unreachable")

    monkeypatch.setattr(runtime.source, "confirm", unreachable)
    status, answer = await post(client, "/mutate", review(pod(), namespace="empty"))
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 500


async def test_a_key_secret_written_a_moment_ago_causes_no_false_deny(client, keys_dir):
    write_keys(keys_dir, key_secret("fresh", random_key(), namespace="new-team"), name="new.yaml")
    status, answer = await post(client, "/mutate", review(pod(), namespace="new-team"))
    assert answer["response"]["allowed"] is True
    assert "patch" in answer["response"]


async def test_keys_come_from_the_request_namespace_never_the_objects(client):
    obj = pod()
    obj["metadata"]["namespace"] = "shop"  # has keys; the request says "other"
    status, answer = await post(client, "/mutate", review(obj, namespace="other"))
    assert answer["response"]["allowed"] is False
    assert "'other'" in answer["response"]["status"]["message"]


async def test_a_namespace_without_keys_is_denied_403(client):
    status, answer = await post(client, "/mutate", review(pod(), namespace="nokeys"))
    assert status == 200
    assert answer["response"]["status"]["code"] == 403
    assert "keymount keys create encryption-key-1 -n nokeys" in \
        answer["response"]["status"]["message"]


WEIRD_BACKEND_PODS = {
    "no-spec": {"metadata": {"labels": {"app.kubernetes.io/component": "backend"}}},
    "containers-null": {"metadata": {"labels": {"app.kubernetes.io/component": "backend"}},
                        "spec": {"containers": None}},
    "mounts-string": pod(container("app", volumeMounts="x")),
    "annotation-not-string": pod(annotations={"keymount.io/containers": ""}),
    "volumes-dict": pod(volumes={"a": 1}),
    "metadata-null": {**pod(), "metadata": None},
}


@pytest.mark.parametrize("namespace", ["shop", "nokeys"])
@pytest.mark.parametrize("obj", WEIRD_BACKEND_PODS.values(), ids=WEIRD_BACKEND_PODS.keys())
async def test_a_backend_pod_is_never_allowed_without_the_volume(client, obj, namespace):
    body = review(obj, namespace=namespace)
    status, answer = await post(client, "/mutate", body)
    response = answer["response"]
    if response["allowed"]:
        labels = ((obj.get("metadata") or {}).get("labels") or {})
        if labels.get("app.kubernetes.io/component") == "backend":
            result = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(response["patch"])))
            assert any(v["name"] == "keymount-encryption-keys" for v in result["spec"]["volumes"])
    else:
        assert response["status"]["code"] in (400, 403, 500)


async def test_validate_denies_a_backend_pod_without_the_volume(client):
    status, answer = await post(client, "/validate", review(pod()))
    assert answer["response"]["allowed"] is False
    assert "keymount-encryption-keys" in answer["response"]["status"]["message"]


async def test_validate_denies_deleting_a_key_secret(client):
    body = review(None, kind="Secret", operation="DELETE", old=key_secret("key-a", random_key()))
    status, answer = await post(client, "/validate", body)
    assert answer["response"]["allowed"] is False


def handshake(port: int, context: ssl.SSLContext, request: bytes | None = None
              ) -> tuple[str | None, str | None, bytes]:
    """A TLS connection to the server: the protocol it chose by ALPN, the TLS version,
    and the answer to `request` (read until the server closes)."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        answer = b""
        if request is not None:
            tls.sendall(request)
            while chunk := tls.recv(65536):
                answer += chunk
        return tls.selected_alpn_protocol(), tls.version(), answer


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_a_tls_1_1_client_is_refused(server, certs):
    client_context = ssl.create_default_context(cafile=str(certs.ca_cert))
    # SECLEVEL=0: this client really offers TLS 1.1, so a refusal is the server's.
    client_context.set_ciphers("ALL:@SECLEVEL=0")
    client_context.minimum_version = client_context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(handshake, server.port, client_context)
    # Set by keymount itself, not left to the system's OpenSSL policy.
    context = build_ssl_context(str(certs.tls_cert), str(certs.tls_key))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("offer", [None, ["h2", "http/1.1"], ["h2"]],
                         ids=["no-alpn", "h2-or-http/1.1", "h2-only"])
async def test_only_http_1_1_is_spoken_whatever_alpn_offers(server, certs, offer):
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    if offer:
        context.set_alpn_protocols(offer)
    body = json.dumps(review(pod())).encode()
    request = (b"POST /mutate HTTP/1.1\r\nHost: keymount\r\nContent-Type: application/json"
               b"\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() +
               b"\r\n\r\n" + body)
    chosen, version, answer = await asyncio.to_thread(handshake, server.port, context,
                                                      request)
    # An h2-only client is not told "h2": no ALPN answer, and it may hang up.
    assert chosen == ("http/1.1" if offer and "http/1.1" in offer else None)
    assert version in ("TLSv1.2", "TLSv1.3")
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_tls_1_2_client_is_served(server, certs):
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async with session.post(server.make_url("/mutate"), json=review(pod())) as resp:
            assert resp.status == 200 and resp.version == aiohttp.HttpVersion11


def peer_serial(port: int, ca_file: str) -> int:
    import socket

    from cryptography import x509
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def reloading_server(directory, runtime):
    reloader = CertReloader(str(directory / "tls.crt"), str(directory / "tls.key"),
                            on_reload=lambda r: runtime.metrics.tls_reloads.labels(r).inc())
    return reloader


@pytest.mark.parametrize("order", [("tls.crt", "tls.key"), ("tls.key", "tls.crt")],
                         ids=["cert-first", "key-first"])
async def test_a_renewed_pair_written_in_either_order_never_breaks_a_handshake(
        tmp_path, runtime, webhook_site, order):
    pems = build_certificates(service="keymount", namespace="keymount", ips=["127.0.0.1"])
    files = write_certificates(tmp_path / "live", pems)
    reloader = reloading_server(tmp_path / "live", runtime)
    srv = await webhook_site(runtime, ssl=reloader.listening)
    first = await asyncio.to_thread(peer_serial, srv.port, str(files.ca_cert))

    renewed = build_certificates(service="keymount", namespace="keymount", ips=["127.0.0.1"])
    (tmp_path / "live" / order[0]).write_bytes(renewed[order[0]])
    assert reloader.reload_if_changed() is False  # half a pair: the old one keeps serving
    assert await asyncio.to_thread(peer_serial, srv.port, str(files.ca_cert)) == first
    (tmp_path / "live" / order[1]).write_bytes(renewed[order[1]])
    assert reloader.reload_if_changed() is True
    (tmp_path / "ca.crt").write_bytes(renewed["ca.crt"])
    second = await asyncio.to_thread(peer_serial, srv.port, str(tmp_path / "ca.crt"))
    assert first != second
    metrics = runtime.metrics.registry
    assert metrics.get_sample_value("keymount_tls_reloads_total", {"result": "success"}) == 1
    assert metrics.get_sample_value("keymount_tls_reloads_total", {"result": "error"}) == 1


async def test_a_symlink_swap_as_the_kubelet_does_it_is_picked_up(tmp_path, runtime,
                                                                   webhook_site):
    # A Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..2026_11_29_v1, swapped at once.
    def version(name):
        pems = build_certificates(service="keymount", namespace="keymount", ips=["127.0.0.1"])
        write_certificates(tmp_path / name, pems)
        return pems
    old, new = version("..v1"), version("..v2")
    (tmp_path / "..data").symlink_to("..v1")
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    reloader = reloading_server(tmp_path, runtime)
    srv = await webhook_site(runtime, ssl=reloader.listening)
    first = await asyncio.to_thread(peer_serial, srv.port, str(tmp_path / "..v1" / "ca.crt"))
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert reloader.reload_if_changed() is True
    second = await asyncio.to_thread(peer_serial, srv.port, str(tmp_path / "..v2" / "ca.crt"))
    assert first != second and old != new


# --- probes and metrics ------------------------------------------------------------------

@pytest.fixture
async def probes(aiohttp_client, runtime):
    return await aiohttp_client(build_probe_app(runtime))


async def test_readyz_waits_for_the_first_full_list_and_fails_while_draining(probes, runtime):
    assert (await probes.get("/healthz")).status == 200
    assert (await probes.get("/readyz")).status == 503
    await runtime.source.load()
    assert (await probes.get("/readyz")).status == 200
    runtime.draining = True
    assert (await probes.get("/readyz")).status == 503


async def test_metrics_count_admissions_by_webhook_and_result(client, runtime, probes):
    await post(client, "/mutate", review(pod()))
    await post(client, "/mutate", review(pod(), namespace="nokeys"))
    text = await (await probes.get("/metrics")).text()
    assert 'keymount_admission_requests_total{result="injected",webhook="mutate"} 1.0' in text
    assert 'keymount_admission_requests_total{result="denied",webhook="mutate"} 1.0' in text
    assert 'keymount_key_secrets{state="valid"} 2.0' in text
    assert "keymount_cache_ready 1.0" in text
    assert "keymount_admission_duration_seconds_bucket" in text


async def test_loop_cpu_counts_every_request_whose_body_arrived(client, probes):
    """Decided and malformed alike: the CPU a hostile body costs the loop is the figure
    that matters most (README, "Benchmark")."""
    await post(client, "/mutate", review(pod()))
    resp = await client.post("/mutate", data=b"{not json",
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    text = await (await probes.get("/metrics")).text()
    count = next(line for line in text.splitlines()
                 if line.startswith('keymount_admission_loop_cpu_seconds_count{webhook="mutate"}'))
    assert float(count.split()[-1]) == 2.0


def spellings(key: bytes) -> list[str]:
    """Every way a log line could carry the key: base64 as in the Secret, hex, and
    the repr a `default=str` serializer or an f-string would print."""
    return [base64.b64encode(key).decode(), key.hex(), repr(key)[2:-1]]


@pytest.fixture
def emitted(tmp_path, runtime):
    """What keymount writes to stderr while serving: decision lines through a real
    `LineSink` (as `keymount serve` wires it) and every `logging` record rendered by
    keymount's own formatter, `extra` fields included. `caplog.text` shows neither."""
    import logging

    from webhook.logs import DecisionLog, JsonFormatter, LineSink

    path = tmp_path / "stderr.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    sink = LineSink(fd)
    runtime.decisions = DecisionLog(sink, fmt="json", level="debug")
    handler = logging.StreamHandler(open(tmp_path / "records.log", "w"))
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)

    def read() -> list[dict]:
        sink.close()
        handler.flush()
        text = path.read_text() + (tmp_path / "records.log").read_text()
        return [json.loads(line) for line in text.splitlines()]
    yield read
    root.removeHandler(handler)
    root.setLevel(previous)
    handler.close()
    sink.close()
    os.close(fd)


@pytest.mark.parametrize("body", [
    review(pod()),
    review(key_secret("k", random_key()), kind="Secret"),
    review(None, kind="Secret", operation="DELETE", old=key_secret("k", random_key())),
], ids=["pod", "secret-create", "secret-delete"])
async def test_every_decision_is_logged_as_one_line_without_key_material(
        client, body, emitted):
    path = "/mutate" if body["request"]["kind"]["kind"] == "Pod" else "/validate"
    status, answer = await post(client, path, body)
    assert status == 200
    lines = emitted()
    [decision] = [line for line in lines if line["logger"] == "keymount.admission"]
    assert decision["uid"] == body["request"]["uid"]
    secret = body["request"]["object"] or body["request"]["oldObject"]
    if secret.get("kind") == "Secret":
        assert decision["key_action"]  # a decision about this key, logged
        key = base64.b64decode(secret["data"]["encryption-key"])
        # Decoded values: a JSON line escapes the backslashes of a bytes repr.
        values = " ".join(str(value) for line in lines for value in line.values())
        leaked = any(spelling in values for spelling in spellings(key))
        assert not leaked, "a log line carries the key (spelling not shown: it is the key)"


async def test_a_reused_live_read_is_dropped_once_the_namespace_changes():
    from webhook.keys import Keyring
    from webhook.livereads import LiveReads
    reads = []
    version = {"shop": 1}

    async def read(namespace):
        reads.append(namespace)
        return Keyring(namespace)
    live = LiveReads(read, clock=lambda: 0.0, version=lambda ns: version[ns])
    await live.confirm("shop")
    await live.confirm("shop")
    assert reads == ["shop"]  # reused within the second
    version["shop"] = 2  # the watch delivered a change meanwhile
    await live.confirm("shop")
    assert reads == ["shop", "shop"]
