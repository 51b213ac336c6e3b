"""keymount on a real node: what a backend Pod's process actually reads.

The `node` fixture (tests/e2e/node.py) runs containerd, a kubelet and the Deployment
controllers against the real API server.  The test app prints, every second, the
files under /encryption-keys with the sha256 of their bytes; the tests compare those
digests with the key bytes stored in the namespace's Secrets.  Only digests are
printed anywhere, never key material.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

from kubernetes import client, config

from apihelpers import BACKEND, KEY_LABELS, create_key
from node import NODE_NAME, NoReport, key_reporter_container, latest_keys, parse_key_reports
from polling import poll

TIMINGS_FILE = Path("/tmp/keymount-node-timings.txt")
VALID_KEYS = ("keymount_key_secrets", 'state="valid"')


def pod_spec() -> dict:
    """A Pod spec for the real node: no scheduler (nodeName), no CNI (hostNetwork)."""
    return {
        "nodeName": NODE_NAME,
        "hostNetwork": True,
        "terminationGracePeriodSeconds": 1,
        "tolerations": [{"operator": "Exists"}],  # the node stays NotReady (no CNI)
        "containers": [key_reporter_container("app")],  # imagePullPolicy: Never
    }


def expected_files(api, namespace: str) -> dict:
    """{file the key is mounted as: sha256 of the key's bytes} for the namespace's
    key Secrets, with the numbers keymount stamped on them."""
    files = {}
    selector = ",".join(f"{k}={v}" for k, v in KEY_LABELS.items())
    for secret in api.list_namespaced_secret(namespace, label_selector=selector).items:
        if not (secret.data or {}).get("encryption-key"):
            continue  # an empty slot or a tombstone: no file
        number = secret.metadata.annotations["keymount.io/key-index"]
        key = base64.b64decode(secret.data["encryption-key"])
        files[f"encryption-key-{number}"] = hashlib.sha256(key).hexdigest()
    return files


def reporting(node, api, namespace: str, selector: str, count: int):
    """{pod name: (uid, newest report)} once exactly `count` Pods matching `selector`
    run and each has printed a report; else None.  Reads the log files (cheap)."""
    pods = [p for p in api.list_namespaced_pod(namespace, label_selector=selector).items
            if p.metadata.deletion_timestamp is None]
    if len(pods) != count or any(p.status.phase != "Running" for p in pods):
        return None
    reports = {}
    for pod in pods:
        try:
            text = node.file_logs(namespace, pod.metadata.name, "app", pod.metadata.uid)
            reports[pod.metadata.name] = (pod.metadata.uid, latest_keys(text))
        except (NoReport, FileNotFoundError):
            return None
    return reports


def record_timings(node, **measured: float) -> None:
    lines = [f"node {phase}: {seconds:.2f}s" for phase, seconds in node.timings.items()]
    lines += [f"{what}: {seconds:.2f}s" for what, seconds in measured.items()]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    TIMINGS_FILE.write_text(text)


def test_a_backend_deployment_reads_exactly_its_namespaces_keys(
        api, namespace, keymount, node, admin_kubeconfig):
    apps = client.AppsV1Api(config.new_client_from_config(config_file=str(admin_kubeconfig)))
    other = f"{namespace}-other"
    api.create_namespace({"metadata": {"name": other}})
    try:
        valid_before = keymount.metric(*VALID_KEYS)
        create_key(api, namespace, "alpha")
        create_key(api, namespace, "beta")
        create_key(api, other, "gamma")
        # keymount injects from its watch cache: let it see all three keys first.
        poll(lambda: keymount.metric(*VALID_KEYS) >= valid_before + 3,
             what="keymount caching the three new keys")
        mine, theirs = expected_files(api, namespace), expected_files(api, other)
        assert sorted(mine) == ["encryption-key-1", "encryption-key-2"]
        assert sorted(theirs) == ["encryption-key-1"]

        created = time.monotonic()
        labels = {"app": "reporter", **BACKEND}
        apps.create_namespaced_deployment(namespace, {
            "metadata": {"name": "reporter"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "reporter"}},
                     "template": {"metadata": {"labels": labels}, "spec": pod_spec()}}})
        api.create_namespaced_pod(namespace, {
            "metadata": {"name": "plain", "labels": {"app": "plain"}}, "spec": pod_spec()})
        api.create_namespaced_pod(other, {
            "metadata": {"name": "neighbour", "labels": {"app": "neighbour", **BACKEND}},
            "spec": pod_spec()})

        replicas = poll(lambda: reporting(node, api, namespace, "app=reporter", 2),
                        timeout=90, what="both Deployment Pods running and reporting")
        pods_reporting = time.monotonic() - created
        plain = poll(lambda: reporting(node, api, namespace, "app=plain", 1),
                     timeout=60, what="the non-backend Pod reporting")
        neighbour = poll(lambda: reporting(node, api, other, "app=neighbour", 1),
                         timeout=60, what="the other namespace's backend Pod reporting")
        all_reporting = time.monotonic() - created

        # Each replica reads exactly its namespace's keys, byte for byte, and has done
        # so in every report since it started (read through `kubectl logs`).
        assert len(replicas) == 2
        for name, (_uid, from_file) in replicas.items():
            assert from_file == mine, name
            log = node.logs(namespace, name, "app")
            assert node.last_log_source == "kubectl"
            reports = parse_key_reports(log)
            assert reports and all(report == mine for report in reports), (name, reports)

        # A Pod without the backend label gets no key directory at all.
        (name, (uid, report)), = plain.items()
        assert report is None
        reports = parse_key_reports(node.logs(namespace, name, "app"))
        assert reports and all(report is None for report in reports), reports

        # A backend Pod elsewhere reads its own namespace's key and never this one's.
        (name, (uid, report)), = neighbour.items()
        assert report == theirs
        log = node.logs(other, name, "app")
        assert all(report == theirs for report in parse_key_reports(log))
        assert not any(digest in log for digest in mine.values())

        record_timings(node, deployment_pods_reporting=pods_reporting,
                       all_test_pods_reporting=all_reporting)
    finally:
        for ns in (namespace, other):
            api.delete_namespace(ns)
