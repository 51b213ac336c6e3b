"""Rotation on a real node: what running backend Pods read after `keys rotate`,
`keys rotate --restart --wait` and `keys retire`.

The kubelet of the test bed syncs Pods every 10 s (`syncFrequency`); the measured
window from `keys rotate` to the new file in every running container is printed and
appended to /tmp/keymount-node-timings.txt.
"""

from __future__ import annotations

import time

import pytest
from kubernetes import client, config

from apihelpers import BACKEND, create_key, denial, keymount_cli
from polling import poll
from test_node_e2e import TIMINGS_FILE, VALID_KEYS, expected_files, pod_spec, reporting

cli = keymount_cli


@pytest.fixture
def apps(admin_kubeconfig):
    return client.AppsV1Api(config.new_client_from_config(config_file=str(admin_kubeconfig)))


def deployment(name: str, *, image: str | None = None, deadline: int | None = None) -> dict:
    spec = pod_spec()
    if image:
        spec["containers"][0]["image"] = image
    body = {"metadata": {"name": name},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name, **BACKEND}},
                                  "spec": spec}}}
    if deadline:
        body["spec"]["progressDeadlineSeconds"] = deadline
    return body


def keys_cached(keymount, count: int, *, state: str = "valid"):
    """A condition: keymount's cache holds `count` more key Secrets in `state` than now.
    Only for the start of a test: a namespace another test deletes meanwhile lowers the
    count."""
    labels = (VALID_KEYS[0], f'state="{state}"')
    before = keymount.metric(*labels)
    return lambda: keymount.metric(*labels) >= before + count


def running_reporters(node, api, apps, namespace: str, name: str, files: dict) -> dict:
    """Start Deployment `name` and wait until both replicas report exactly `files`."""
    apps.create_namespaced_deployment(namespace, deployment(name))
    return poll(lambda: (r := reporting(node, api, namespace, f"app={name}", 2)) and
                all(report == files for _, report in r.values()) and r,
                timeout=90, what=f"{name}: two replicas reading {sorted(files)}")


def restarts(api, namespace: str, name: str) -> list[int]:
    pods = api.list_namespaced_pod(namespace, label_selector=f"app={name}").items
    return [s.restart_count for p in pods for s in p.status.container_statuses or []]


def one_key_and_a_running_deployment(api, apps, namespace, keymount, node,
                                     admin_kubeconfig) -> dict:
    """Key 1 and two empty slots (`keys create`), in keymount's cache, and Deployment
    api with both replicas reading key 1 and listing the slots."""
    arrived, slots = keys_cached(keymount, 1), keys_cached(keymount, 2, state="slot")
    cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
    poll(lambda: arrived() and slots(), what="key 1 and its slots cached")
    return running_reporters(node, api, apps, namespace, "api",
                             expected_files(api, namespace))


def test_a_rotation_reaches_running_pods_without_a_restart(
        api, apps, namespace, keymount, node, admin_kubeconfig):
    before = one_key_and_a_running_deployment(api, apps, namespace, keymount, node,
                                              admin_kubeconfig)

    started = time.monotonic()
    rotated = cli(admin_kubeconfig, "keys", "rotate", "-n", namespace)
    assert "number 2 (file encryption-key-2)" in rotated.stdout
    assert "2 running Pod(s) get it live" in rotated.stdout
    after = expected_files(api, namespace)
    assert sorted(after) == ["encryption-key-1", "encryption-key-2"]

    now = poll(lambda: (r := reporting(node, api, namespace, "app=api", 2)) and
               all(report == after for _, report in r.values()) and r,
               timeout=120, what="the new file in both running containers")
    window = time.monotonic() - started
    print(f"\nrotation reached both running Pods in {window:.1f}s "
          f"(kubelet syncFrequency 10s)")
    with TIMINGS_FILE.open("a") as out:
        out.write(f"rotate -> new file in both running containers: {window:.1f}s\n")
    assert {name: uid for name, (uid, _) in now.items()} == \
        {name: uid for name, (uid, _) in before.items()}  # the same Pods
    assert restarts(api, namespace, "api") == [0, 0]
    states = cli(admin_kubeconfig, "status", "-n", namespace, "-o", "json").stdout
    assert '"state": "updating"' in states  # what the API shows: the kubelet did the rest


def test_rotate_restart_wait_rolls_deployments_and_new_pods_carry_every_key(
        api, apps, namespace, keymount, node, admin_kubeconfig):
    before = one_key_and_a_running_deployment(api, apps, namespace, keymount, node,
                                              admin_kubeconfig)

    result = cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--restart", "--wait",
                 "--timeout", "90s")
    assert "deployment/api restarted" in result.stdout
    assert "deployment/api rolled out" in result.stdout
    every_key = expected_files(api, namespace)
    assert len(every_key) == 2
    now = poll(lambda: (r := reporting(node, api, namespace, "app=api", 2)) and
               all(report == every_key for _, report in r.values()) and r,
               timeout=60, what="the new Pods reading every key")
    assert not {uid for uid, _ in now.values()} & {uid for uid, _ in before.values()}


def test_rotate_restart_wait_stops_at_a_rollout_that_cannot_finish(
        api, apps, namespace, keymount, node, admin_kubeconfig):
    arrived = keys_cached(keymount, 1)
    create_key(api, namespace, "k1")
    poll(arrived, what="k1 cached")
    # Sorted first, it is rolled first: its Pods can never start (no such image).
    apps.create_namespaced_deployment(namespace, deployment(
        "aaa-broken", image="docker.io/local/no-such-image:1", deadline=10))
    running_reporters(node, api, apps, namespace, "zzz-fine", expected_files(api, namespace))
    poll(lambda: len(api.list_namespaced_pod(namespace, label_selector="app=aaa-broken")
                     .items) == 2, what="the broken Deployment's Pods")

    result = cli(admin_kubeconfig, "keys", "rotate", "-n", namespace, "--restart", "--wait",
                 "--timeout", "40s", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rollout of deployment/aaa-broken" in result.stderr
    assert "not restarted: deployment/zzz-fine" in result.stderr
    template = apps.read_namespaced_deployment("zzz-fine", namespace).spec.template
    assert "kubectl.kubernetes.io/restartedAt" not in (template.metadata.annotations or {})


def test_retiring_the_oldest_key_under_running_pods_leaves_every_other_file_and_its_name(
        api, apps, namespace, keymount, node, admin_kubeconfig):
    arrived = keys_cached(keymount, 3)
    for name in ("k1", "k2", "k3"):
        create_key(api, namespace, name)
    poll(arrived, what="three keys cached")
    files = expected_files(api, namespace)
    running_reporters(node, api, apps, namespace, "api", files)

    retired = cli(admin_kubeconfig, "keys", "retire", "k1", "-n", namespace, "--yes",
                  "--force")
    assert "2 Pod(s) still mount k1" in retired.stdout
    # While they run, the tombstone keeps the name: deleted, anyone who may create
    # Secrets could create k1, and the kubelet would mount it as encryption-key-1.
    kept = denial(lambda: api.delete_namespaced_secret("k1", namespace))
    assert "2 Pod(s) still list it" in kept
    others = {f: d for f, d in files.items() if f != "encryption-key-1"}
    api.create_namespaced_pod(namespace, {"metadata": {"name": "fresh", "labels": {
        "app": "fresh", **BACKEND}}, "spec": pod_spec()})
    fresh = poll(lambda: reporting(node, api, namespace, "app=fresh", 1), timeout=60,
                 what="a new Pod after the retirement")
    assert [report for _, report in fresh.values()] == [others]
    # By now the kubelet has synced the running Pods since the retirement (every 10 s
    # here): every other key's file is as it was.
    reports = reporting(node, api, namespace, "app=api", 2)
    for _, report in reports.values():
        assert {f: report[f] for f in others} == others
