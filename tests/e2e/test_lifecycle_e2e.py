"""The key lifecycle end to end: the CLI and --auto-generate against the real API server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from kubernetes.client.rest import ApiException

from apihelpers import (
    OUTPUTS,
    create_pod,
    denial,
    key_material,
    key_sources,
    keymount_cli,
    wait_for_cached_keys,
    wait_for_slots,
)
from conftest import ROOT, kubectl, launch_keymount
from polling import poll


def test_create_list_rotate_status_retire_delete(api, namespace, keymount, admin_kubeconfig):
    cfg = admin_kubeconfig
    created = keymount_cli(cfg, "keys", "create", "k1", "-n", namespace, "--generate")
    assert (f"secret/k1 created in namespace {namespace}: number 1 (file encryption-key-1)"
            in created.stdout)

    rows = json.loads(keymount_cli(cfg, "keys", "list", "-n", namespace, "-o", "json").stdout)
    assert [(r["file"], r["secret"], r["index"], r["state"]) for r in rows] == [
        ("encryption-key-1", "k1", "1", "active"), ("-", "keymount-key-2", "2", "slot"),
        ("-", "keymount-key-3", "3", "slot")]  # keys create keeps two empty slots

    wait_for_cached_keys(keymount, 1)
    wait_for_slots(api, namespace, 2)
    old = create_pod(api, namespace, "old")
    assert key_sources(old) == [("k1", "encryption-key-1")]

    valid_before = keymount.metric("keymount_key_secrets", 'state="valid"')
    assert key_sources(old, optional=True) == [("keymount-key-2", "encryption-key-2"),
                                               ("keymount-key-3", "encryption-key-3")]
    rotated = keymount_cli(cfg, "keys", "rotate", "-n", namespace)
    assert "secret/keymount-key-2 created" in rotated.stdout and "number 2" in rotated.stdout
    assert "1 running Pod(s) get it live" in rotated.stdout and ": old" in rotated.stdout

    wait_for_cached_keys(keymount, valid_before + 1)
    new = create_pod(api, namespace, "new")
    assert key_sources(new) == [("k1", "encryption-key-1"), ("keymount-key-2",
                                                              "encryption-key-2")]

    states = {s["pod"]: s for s in json.loads(
        keymount_cli(cfg, "status", "-n", namespace, "-o", "json").stdout)}
    assert states["old"]["state"] == "updating"
    assert states["old"]["missing"][0].startswith("keymount-key-2 (")
    assert states["old"]["live"] == states["old"]["missing"]
    assert states["new"]["state"] == "current"
    table = keymount_cli(cfg, "status", "-n", namespace).stdout
    assert "old" in table and "live (kubelet sync)" in table and "new " not in table

    # A key added under a name no Pod lists reaches running Pods only by a restart. It
    # takes a number above the slots (3 and 4, kept by the rotation).
    other = keymount_cli(cfg, "keys", "create", "by-hand", "-n", namespace, "--generate")
    assert "number 5" in other.stdout
    wait_for_cached_keys(keymount, valid_before + 2)
    states = {s["pod"]: s for s in json.loads(
        keymount_cli(cfg, "status", "-n", namespace, "-o", "json").stdout)}
    assert states["new"]["state"] == "stale" and states["new"]["live"] == []
    assert "after a restart" in keymount_cli(cfg, "status", "-n", namespace).stdout
    # The server follows backend Pods too: convergence as a metric.
    poll(lambda: keymount.metric("keymount_stale_pods",
                                 f'namespace="{namespace}",state="stale"') == 2,
         what="keymount_stale_pods counting both Pods stale")

    assert f"keymount keys retire k1 -n {namespace}" in denial(
        lambda: api.delete_namespaced_secret("k1", namespace))
    used_keys = key_material(api, namespace)  # both keys, read before one is destroyed
    assert len(used_keys) >= 4
    refused = keymount_cli(cfg, "keys", "retire", "k1", "-n", namespace, "--yes", check=False)
    assert refused.returncode == 1 and "2 Pod(s) still mount k1" in refused.stdout
    assert "  new" in refused.stdout and "  old" in refused.stdout
    assert "retire anyway with --force" in refused.stderr
    assert "keymount.io/retired" not in (
        api.read_namespaced_secret("k1", namespace).metadata.annotations or {})
    retired = keymount_cli(cfg, "keys", "retire", "k1", "-n", namespace, "--yes", "--force")
    assert "number 1 stays reserved" in retired.stdout
    tombstone = api.read_namespaced_secret("k1", namespace)
    assert "encryption-key" not in (tombstone.data or {})
    # The Pods still list k1: deleted, its name would be anyone's to create, and the
    # kubelet would mount their bytes as those Pods' encryption-key-1.
    kept = denial(lambda: api.delete_namespaced_secret("k1", namespace))
    assert "2 Pod(s) still list it (new, old)" in kept
    for pod in ("new", "old"):
        api.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)

    def deleted() -> bool:
        try:
            api.delete_namespaced_secret("k1", namespace)
        except ApiException as exc:
            assert "still list it" in json.loads(exc.body)["message"]
            return False
        return True
    poll(deleted, what="the tombstone deleted once no Pod lists it")

    server_log = keymount.log_text()
    leaks = [s for s in used_keys for out in [*OUTPUTS, server_log] if s in out]
    assert leaks == []


def test_retire_without_yes_and_without_a_terminal_changes_nothing(api, namespace,
                                                                   admin_kubeconfig):
    keymount_cli(admin_kubeconfig, "keys", "create", "k", "-n", namespace, "--generate")
    keymount_cli(admin_kubeconfig, "keys", "rotate", "-n", namespace)
    result = keymount_cli(admin_kubeconfig, "keys", "retire", "k", "-n", namespace,
                          check=False)
    assert result.returncode == 1 and "confirm with --yes" in result.stderr
    secret = api.read_namespaced_secret("k", namespace)
    assert "keymount.io/retired" not in (secret.metadata.annotations or {})
    assert "encryption-key" in secret.data


def test_the_active_key_cannot_be_retired(namespace, admin_kubeconfig):
    keymount_cli(admin_kubeconfig, "keys", "create", "k", "-n", namespace, "--generate")
    result = keymount_cli(admin_kubeconfig, "keys", "retire", "k", "-n", namespace, "--yes",
                          check=False)
    assert result.returncode == 1
    assert f"Add a new key first: keymount keys rotate -n {namespace}" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["keys", "create", "k", "-n", "no-such-namespace", "--generate"],
     "namespace 'no-such-namespace' not found; create it first"),
    (["keys", "retire", "ghost", "-n", "default", "--yes"], "no key Secret 'ghost'"),
], ids=["missing-namespace", "missing-secret"])
def test_api_refusals_are_one_clear_line(admin_kubeconfig, keymount, args, message):
    result = keymount_cli(admin_kubeconfig, *args, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"keymount: {result.stderr.strip()[10:]}"]
    assert message in result.stderr


def test_forbidden_is_one_clear_line(control_plane, namespace, tmp_path):
    # The keymount user may read Secrets, never write them.
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "kc",
                                                token=control_plane.keymount_token)
    result = keymount_cli(kubeconfig, "keys", "create", "k", "-n", namespace, "--generate",
                          check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("keymount: API server said 403:")
    assert "Traceback" not in result.stderr


AUTOGEN_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: keymount-e2e-autogen}
rules:
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: keymount-e2e-autogen}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: keymount-e2e-autogen}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: keymount}
"""


def backend_review(namespace: str, uid: str, *, dry_run: bool = False) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE", "namespace": namespace, "dryRun": dry_run,
        "object": {"metadata": {"name": uid, "labels": {"app.kubernetes.io/component":
                                                        "backend"}},
                   "spec": {"containers": [{"name": "app", "image": "x"}]}}}}


def test_auto_generate_answers_only_the_api_server_and_two_racing_replicas_make_one_key(
        api, namespace, control_plane, admin_kubeconfig, tmp_path):
    kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=AUTOGEN_RBAC)
    work = tmp_path / "replicas"
    replicas = [launch_keymount(control_plane, work, "--auto-generate", "--client-ca",
                                str(work / "certs/ca.crt")) for _ in range(2)]
    try:
        # Anything that reaches the port without the API server's client certificate
        # is turned away before it can make keymount write a key Secret.
        import ssl
        import urllib.error
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            replicas[0].review(backend_review(namespace, "forged"), client_cert=False)
        assert [s.metadata.name for s in api.list_namespaced_secret(namespace).items] == []

        dry = replicas[0].review(backend_review(namespace, "dry", dry_run=True))
        assert dry["allowed"] is False
        assert "no valid encryption key" in dry["status"]["message"]
        assert [s.metadata.name for s in api.list_namespaced_secret(namespace).items] == []

        answers: dict[int, dict] = {}
        start = threading.Barrier(2)

        def race(i: int) -> None:
            start.wait()
            answers[i] = replicas[i].review(backend_review(namespace, f"race-{i}"))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        keys = [s for s in api.list_namespaced_secret(namespace).items
                if (s.metadata.labels or {}).get("keymount.io/encryption-key") == "true"]
        assert [s.metadata.name for s in keys] == ["keymount-key-1"]
        audits = [json.loads(answers[i]["auditAnnotations"]["encryption-keys"])
                  for i in range(2)]
        assert audits[0] == audits[1] and audits[0][0]["secret"] == "keymount-key-1"
        assert any("back it up" in w for a in answers.values() for w in a.get("warnings", []))
        logs = "".join(r.log.read_text() for r in replicas)
        assert not [s for s in key_material(api, namespace) if s in logs]
    finally:
        for replica in replicas:
            replica.stop()
        kubectl(admin_kubeconfig, "delete", "-f", "-", stdin=AUTOGEN_RBAC)


def test_inject_without_keys_from_reads_the_clusters_keys(api, namespace, admin_kubeconfig):
    keymount_cli(admin_kubeconfig, "keys", "create", "k", "-n", namespace, "--generate")
    manifest = (ROOT / "tests/golden/inject/workloads.in.yaml").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "webhook", "inject", "-f", "-", "-n", namespace,
         "--kubeconfig", str(admin_kubeconfig)],
        input=manifest.split("---")[2], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "name: k\n" in result.stdout and "path: encryption-key-1" in result.stdout


def test_max_key_age_flags_a_namespace_whose_newest_key_is_older(namespace,
                                                                 admin_kubeconfig):
    keymount_cli(admin_kubeconfig, "keys", "create", "k", "-n", namespace, "--generate")
    fresh = keymount_cli(admin_kubeconfig, "keys", "list", "-n", namespace,
                         "--max-key-age", "1d")
    assert "older than --max-key-age" not in fresh.stderr
    poll(lambda: "older than --max-key-age" in keymount_cli(
        admin_kubeconfig, "keys", "list", "-n", namespace, "--max-key-age", "1s").stderr,
        timeout=15, what="key older than 1s")
    status = keymount_cli(admin_kubeconfig, "status", "-n", namespace, "--max-key-age", "1s")
    assert f"keymount keys rotate -n {namespace}" in status.stderr


def test_kubectl_keymount_is_a_kubectl_plugin(api, namespace, admin_kubeconfig):
    """`kubectl keymount …`: kubectl runs kubectl-keymount from PATH, as installed."""
    import os
    import shutil
    plugin = shutil.which("kubectl-keymount", path=str(ROOT / ".venv" / "bin")) or \
        shutil.which("kubectl-keymount")
    assert plugin, "kubectl-keymount is not installed (pip install keymount)"
    keymount_cli(admin_kubeconfig, "keys", "create", "k1", "-n", namespace, "--generate")
    env = {**os.environ, "PATH": f"{os.path.dirname(plugin)}:{os.environ['PATH']}"}
    result = subprocess.run(["kubectl", "keymount", "keys", "list", "-n", namespace,
                             "-o", "json", "--kubeconfig", str(admin_kubeconfig)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["secret"], r["file"], r["state"]) for r in rows] == [
        ("k1", "encryption-key-1", "active"), ("keymount-key-2", "-", "slot"),
        ("keymount-key-3", "-", "slot")]
