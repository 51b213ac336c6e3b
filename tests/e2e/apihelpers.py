"""Creating keys and Pods through the real API server, and reading what it stored."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes.client.rest import ApiException

from polling import poll

ROOT = Path(__file__).resolve().parents[2]
BACKEND = {"app.kubernetes.io/component": "backend"}
KEY_LABELS = {"keymount.io/encryption-key": "true"}


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
    api.create_namespaced_secret(namespace, {"metadata": meta, "data": data})


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
