"""keymount against a real kube-apiserver: Pods and Secrets created through the API."""

from __future__ import annotations

import base64
import json

from apihelpers import (
    KEY_LABELS,
    create_key,
    create_pod,
    denial,
    key_sources,
    pod_body,
    wait_for_cached_keys,
)
from polling import poll


def test_a_backend_pod_is_stored_with_both_keys_in_spec_order(api, namespace):
    create_key(api, namespace, "second", index=2)
    create_key(api, namespace, "first", index=1)
    pod = create_pod(api, namespace, containers=("app", "sidecar"))
    assert key_sources(pod) == [("first", "encryption-key-1"), ("second", "encryption-key-2")]
    volume = next(v for v in pod.spec.volumes if v.name == "keymount-encryption-keys")
    assert volume.projected.default_mode == 0o440
    for container in pod.spec.containers:
        mounts = [(m.name, m.mount_path, m.read_only) for m in container.volume_mounts]
        assert ("keymount-encryption-keys", "/encryption-keys", True) in mounts
    status = json.loads(pod.metadata.annotations["keymount.io/status"])
    assert [s["file"] for s in status] == ["encryption-key-1", "encryption-key-2"]
    assert [s["secret"] for s in status] == ["first", "second"]


def test_a_pod_too_large_for_the_event_loop_gets_its_keys_from_the_review_worker(
        api, namespace, keymount):
    create_key(api, namespace, "only", index=1)
    body = pod_body("large")
    body["spec"]["containers"][0]["env"] = [{"name": f"E{i}", "value": "v" * 40}
                                            for i in range(600)]  # ~35 KB as reviewed
    large = keymount.metric("keymount_large_reviews_total")
    pod = api.create_namespaced_pod(namespace, body)
    assert key_sources(pod) == [("only", "encryption-key-1")]
    assert len(pod.spec.containers[0].env) == 600
    # Both webhooks saw it over 16 KiB: the mutating one, then the validating one.
    assert keymount.metric("keymount_large_reviews_total") == large + 2
    message = denial(lambda: api.create_namespaced_pod(namespace, {
        **body, "metadata": {"name": "clash", "labels": body["metadata"]["labels"]},
        "spec": {**body["spec"], "volumes": [{"name": "other", "emptyDir": {}}],
                 "containers": [{**body["spec"]["containers"][0], "volumeMounts": [
                     {"name": "other", "mountPath": "/encryption-keys/x"}]}]}}))
    assert "mounts volume 'other' at or under /encryption-keys" in message


def test_a_namespace_without_keys_rejects_backend_pods_with_the_fix(api, namespace):
    message = denial(lambda: create_pod(api, namespace))
    assert f"keymount keys create encryption-key-1 -n {namespace} --generate" in message
    assert api.list_namespaced_pod(namespace).items == []


def test_an_invalid_key_rejects_backend_pods(api, namespace):
    # The Secret guard would refuse this Secret; an unguarded namespace lets it in.
    api.patch_namespace(namespace, {"metadata": {"labels": {"keymount-e2e/unguarded": "1"}}})
    create_key(api, namespace, "good")
    api.create_namespaced_secret(namespace, {
        "metadata": {"name": "short", "labels": KEY_LABELS},
        "data": {"encryption-key": base64.b64encode(b"too short").decode()}})
    message = denial(lambda: create_pod(api, namespace))
    assert "short: field 'encryption-key' holds 9 bytes" in message


def test_a_non_backend_pod_is_stored_untouched(api, namespace):
    pod = create_pod(api, namespace, labels={"app": "web"})
    assert not any(v.name == "keymount-encryption-keys" for v in pod.spec.volumes or [])
    assert "keymount.io/status" not in (pod.metadata.annotations or {})


def test_a_namespace_never_gets_another_namespaces_keys(api, namespace, keymount):
    other = f"{namespace}-other"
    api.create_namespace({"metadata": {"name": other}})
    create_key(api, namespace, "mine")
    create_key(api, other, "theirs")
    wait_for_cached_keys(keymount, 2)
    assert key_sources(create_pod(api, namespace)) == [("mine", "encryption-key-1")]
    assert key_sources(create_pod(api, other)) == [("theirs", "encryption-key-1")]
    third = f"{namespace}-empty"
    api.create_namespace({"metadata": {"name": third}})
    assert "no valid encryption key" in denial(lambda: create_pod(api, third))


def test_after_rotation_the_next_pod_gets_three_files_newest_last(api, namespace, keymount):
    create_key(api, namespace, "k1", index=1)
    create_key(api, namespace, "k2", index=2)
    before = create_pod(api, namespace, "before")
    assert len(key_sources(before)) == 2
    valid = keymount.metric("keymount_key_secrets", 'state="valid"')
    create_key(api, namespace, "k3", index=3)
    wait_for_cached_keys(keymount, valid + 1)
    after = create_pod(api, namespace, "after")
    assert key_sources(after) == [("k1", "encryption-key-1"), ("k2", "encryption-key-2"),
                                  ("k3", "encryption-key-3")]


def test_a_key_created_just_before_the_pod_causes_no_false_deny(api, namespace, keymount):
    create_key(api, namespace, "fresh")
    pod = create_pod(api, namespace)  # no wait: the cache may not have it yet
    assert key_sources(pod) == [("fresh", "encryption-key-1")]


def test_a_server_side_dry_run_is_admitted_and_creates_nothing(api, namespace):
    create_key(api, namespace, "k")
    pod = api.create_namespaced_pod(namespace, pod_body(), dry_run="All")
    assert key_sources(pod) == [("k", "encryption-key-1")]
    assert api.list_namespaced_pod(namespace).items == []


def test_deleting_a_key_secret_is_refused_until_retired_and_recorded(api, namespace):
    create_key(api, namespace, "k1")
    create_key(api, namespace, "k2")
    message = denial(lambda: api.delete_namespaced_secret("k1", namespace))
    assert f"keymount keys retire k1 -n {namespace}" in message
    # keymount 0.1's escape hatch no longer opens anything.
    api.patch_namespaced_secret("k1", namespace, {
        "metadata": {"annotations": {"keymount.io/allow-delete": "true"}}})
    assert "Retire it first" in denial(lambda: api.delete_namespaced_secret("k1", namespace))
    api.patch_namespaced_secret("k1", namespace, {
        "data": {"encryption-key": None},
        "metadata": {"annotations": {"keymount.io/retired": "2026-11-29T00:00:00Z"}}})
    api.delete_namespaced_secret("k1", namespace)  # k2 records number 1


def test_an_invalid_labelled_secret_is_refused_with_keymounts_reason(api, namespace):
    message = denial(lambda: api.create_namespaced_secret(namespace, {
        "metadata": {"name": "bad", "labels": KEY_LABELS},
        "stringData": {"encryption-key": "hunter2!"}}))
    assert "holds 8 bytes" in message, message


def test_steady_state_admission_makes_no_api_requests(api, namespace, keymount,
                                                      control_plane):
    create_key(api, namespace, "k")
    wait_for_cached_keys(keymount, 1)
    create_pod(api, namespace, "warm")

    def keymount_requests():
        return [e for e in control_plane.audit_events(user="keymount")
                if e.get("verb") != "watch"]

    before = len(keymount_requests())
    admitted = keymount.metric("keymount_admission_requests_total",
                               'result="injected",webhook="mutate"')
    for i in range(20):
        create_pod(api, namespace, f"p{i}")
    assert keymount.metric("keymount_admission_requests_total",
                           'result="injected",webhook="mutate"') == admitted + 20
    assert len(keymount_requests()) == before


def test_the_cache_survives_an_api_server_restart_and_etcd_compaction(
        api, namespace, keymount, control_plane):
    create_key(api, namespace, "before")
    wait_for_cached_keys(keymount, 1)
    restarts = keymount.metric("keymount_watch_restarts_total")
    for i in range(5):  # move etcd past the watch's resourceVersion, then compact it away
        api.create_namespaced_config_map(namespace, {"metadata": {"name": f"c{i}"}})
    control_plane.compact_etcd()
    control_plane.restart_apiserver()

    assert key_sources(create_pod(api, namespace, "after-restart")) == \
        [("before", "encryption-key-1")]
    poll(lambda: keymount.metric("keymount_watch_restarts_total") > restarts,
         what="keymount re-established its watch")
    later = f"{namespace}-later"
    api.create_namespace({"metadata": {"name": later}})
    valid = keymount.metric("keymount_key_secrets", 'state="valid"')
    create_key(api, later, "new")
    wait_for_cached_keys(keymount, valid + 1)  # seen through the watch, not a live read
    reads = keymount.metric("keymount_live_reads_total")
    assert key_sources(create_pod(api, later)) == [("new", "encryption-key-1")]
    assert keymount.metric("keymount_live_reads_total") == reads


def test_a_start_up_failure_with_the_kubernetes_source_is_one_line_and_exit_1(
        control_plane, tmp_path):
    import socket
    import subprocess
    import sys

    from conftest import ROOT
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "kc",
                                                token=control_plane.keymount_token)
    subprocess.run([sys.executable, "-m", "webhook", "certs", "--service", "k", "--namespace",
                    "k", "--out", str(tmp_path / "certs")], check=True, capture_output=True)
    with socket.socket() as free:  # --probe-port refuses 0: a port free a moment ago
        free.bind(("127.0.0.1", 0))
        probe = free.getsockname()[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1", "--port",
             str(taken.getsockname()[1]), "--probe-port", str(probe), "--kubeconfig",
             kubeconfig,
             "--tls-cert", str(tmp_path / "certs/tls.crt"),
             "--tls-key", str(tmp_path / "certs/tls.key")],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("keymount: cannot serve on")
    assert "Fatal Python error" not in result.stderr and "Traceback" not in result.stderr


def test_serve_warns_that_namespace_exclusion_is_not_tamper_proof_before_1_21(keymount):
    # The test bed's API server is 1.20.
    # Lines reach the log within the sink's interval (docs/operations.md, "Logs").
    poll(lambda: any("not tamper-proof" in w["msg"] and w.get("version", "").startswith(
        "v1.20") for w in keymount.log_lines() if w.get("level") == "warning"),
        timeout=5, what="the warning about Kubernetes before 1.21")
