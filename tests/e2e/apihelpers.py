"""Creating keys and Pods through the real API server, and reading what it stored."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from node import POD_LOGS, parse_key_reports
from polling import poll

ROOT = Path(__file__).resolve().parents[2]
BACKEND = {"app.kubernetes.io/component": "backend"}
KEY_LABELS = {"keymount.io/encryption-key": "true"}
KEY_LABEL = "keymount.io/encryption-key"
VOLUME = "keymount-encryption-keys"
GROUP, VERSION = "keymount.io", "v1alpha1"  # KeyPolicy, ClusterKeyPolicy


OUTPUTS: list[str] = []  # everything keymount's commands printed, checked for key material


def keymount_cli(kubeconfig, *args: str, check: bool = True, env: dict | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    """`keymount ARGS --kubeconfig KUBECONFIG` as a user runs it, no terminal."""
    result = subprocess.run([sys.executable, "-m", "webhook", *args, "--kubeconfig",
                             str(kubeconfig)], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    OUTPUTS.append(result.stdout + result.stderr)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def random_key() -> bytes:
    while True:
        key = os.urandom(32)
        if any(b < 0x20 or b > 0x7E for b in key):
            return key


def create_key(api, namespace: str, name: str, *, key: bytes | None = None,
               index: int | None = None) -> None:
    meta = {"name": name, "labels": KEY_LABELS}
    if index is not None:
        meta["annotations"] = {"keymount.io/key-index": str(index)}
    data = {"encryption-key": base64.b64encode(key or random_key()).decode()}
    body = {"metadata": meta, "data": data}

    def created() -> bool:
        # As a client should: keymount answers 429 when it stamped the key on a view a
        # moment behind (a key created just before it) or limits live reads right now.
        try:
            api.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 429:
                raise
            return False
        return True
    poll(created, timeout=30, what=f"key Secret {name!r} created past keymount's 429s")


def pod_body(name: str = "api", *, labels=BACKEND, containers=("app",)) -> dict:
    return {"metadata": {"name": name, "labels": dict(labels)},
            "spec": {"containers": [{"name": c, "image": "example.com/app:1"}
                                    for c in containers]}}


def create_pod(api, namespace: str, name: str = "api", **kw):
    return api.create_namespaced_pod(namespace, pod_body(name, **kw))


def denial(call) -> str:
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status in (400, 403), info.value.body
    return json.loads(info.value.body)["message"]


def key_sources(pod, *, optional: bool = False) -> list[tuple[str, str]]:
    """(Secret, file) of the keys a Pod mounts; with optional=True, of its rotation
    slots (the sources the kubelet fills in when a rotation creates them)."""
    volume = next(v for v in pod.spec.volumes if v.name == "keymount-encryption-keys")
    return [(s.secret.name, s.secret.items[0].path) for s in volume.projected.sources
            if bool(s.secret.optional) is optional]


def wait_for_cached_keys(keymount, count: int) -> None:
    poll(lambda: keymount.metric("keymount_key_secrets", 'state="valid"') >= count,
         what=f"keymount cache holding {count} valid keys")


def key_material(api, namespace: str) -> list[str]:
    """Every spelling of the namespace's keys that must never be printed."""
    spellings = []
    for secret in api.list_namespaced_secret(namespace).items:
        for field in ("encryption-key", "staged-encryption-key"):
            stored = (secret.data or {}).get(field)
            if stored:
                raw = base64.b64decode(stored)
                spellings += [stored, raw.hex()]
                if raw.isascii():
                    spellings.append(raw.decode())
    return spellings


def wait_for_slots(api, namespace: str, count: int) -> None:
    """Until a new backend Pod of the namespace lists `count` empty slots: keymount's
    cache has them (a Pod lists only slots it knows exist)."""
    poll(lambda: len(key_sources(api.create_namespaced_pod(namespace, pod_body("probe"),
                                                           dry_run="All"),
                                 optional=True)) == count,
         what=f"{count} key slots listed by a new Pod")


# Managed rotation: the controller's RBAC, KeyPolicies, what the controller stored.


def component_rbac(namespace: str, user: str) -> str:
    """manifests/components/controller's RBAC as it ships, the Lease Role moved to
    `namespace`, every binding given to the test bed's keymount user."""
    docs = list(yaml.safe_load_all(
        (ROOT / "manifests/components/controller/rbac.yaml").read_text()))
    for doc in docs:
        if doc["kind"] in ("Role", "RoleBinding"):
            doc["metadata"]["namespace"] = namespace
        if doc["kind"].endswith("Binding"):
            doc["subjects"] = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                "name": user}]
    return yaml.safe_dump_all(docs)


def key_policy(custom, namespace: str, **spec) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "keypolicies", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "KeyPolicy",
        "metadata": {"name": "rotation"}, "spec": spec})


def stored_keys(api, namespace: str) -> dict[int, dict]:
    """Every key Secret by number: its state and keymount's times."""
    found: dict[int, dict] = {}
    for secret in api.list_namespaced_secret(namespace, label_selector=KEY_LABEL).items:
        notes = secret.metadata.annotations or {}
        number = int(notes["keymount.io/key-index"])
        data = secret.data or {}
        state = ("active" if data.get("encryption-key") else
                 "staged" if data.get("staged-encryption-key") else "slot")
        assert number not in found, f"two key Secrets hold number {number}"
        found[number] = {"state": state, "name": secret.metadata.name,
                         "staged_at": when(notes.get("keymount.io/staged-at")),
                         "activated_at": when(notes.get("keymount.io/activated-at"))}
    return found


def when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def keys_in(api, namespace: str, state: str) -> list[int]:
    return sorted(n for n, key in stored_keys(api, namespace).items() if key["state"] == state)


# Backend Pods on the real node: what their containers read, and their volume.
def key_volume(node, uid: str) -> Path:
    """The kubelet's own directory for a Pod's keymount volume (`..data` and all)."""
    return (node.workdir / "kubelet" / "pods" / uid / "volumes" / "kubernetes.io~projected" /
            VOLUME)


def digest(key: bytes) -> str:
    """What tests compare and print instead of key bytes."""
    return hashlib.sha256(key).hexdigest()


def timed_reports(namespace: str, pod: str, uid: str) -> list[tuple[datetime, dict]]:
    """Every `keys:` report of a container with the time the runtime logged it."""
    reports = []
    for path in sorted((POD_LOGS / f"{namespace}_{pod}_{uid}" / "app").glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            stamp, _, rest = line.partition(" ")
            parsed = parse_key_reports(rest.split(" ", 2)[-1])
            if parsed and parsed[0] is not None:
                reports.append((datetime.fromisoformat(stamp.replace("Z", "+00:00")),
                                parsed[0]))
    return reports


def first_seen(reports: list[tuple[datetime, dict]], file: str,
               after: datetime) -> datetime | None:
    return next((at for at, files in reports if at >= after and file in files), None)
