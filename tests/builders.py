"""Small builders for the objects the tests feed keymount. Keys are made per run."""

from __future__ import annotations

import base64
import copy
import os
from typing import Any

from webhook.config import Settings
from webhook.key_secrets import parse_key_secret
from webhook.keys import Keyring, build_keyring

KEY_LABELS = {"keymount.io/encryption-key": "true"}
BACKEND = {"app.kubernetes.io/component": "backend"}


def random_key() -> bytes:
    """32 random bytes that are not all equal and not printable ASCII."""
    while True:
        key = os.urandom(32)
        if len(set(key)) > 1 and any(b < 0x20 or b > 0x7E for b in key):
            return key


def keys_sharing_a_fingerprint() -> tuple[bytes, bytes]:
    """Two different keys with one fingerprint: it is 3 bytes, so among some 5,000 random
    keys two share one more often than not."""
    from webhook.keys import fingerprint_key
    seen: dict[str, bytes] = {}
    while True:
        key = random_key()
        other = seen.setdefault(fingerprint_key(key), key)
        if other != key:
            return key, other


def key_secret(name: str, key: bytes | None = None, *, namespace: str = "shop",
               index: int | str | None = None, created: str | None = "2026-01-01T00:00:00Z",
               labels: dict[str, str] | None = None, field: str = "encryption-key",
               annotations: dict[str, str] | None = None,
               legacy: bool = False) -> dict[str, Any]:
    """A key Secret. With an index it is numbered as keymount stamps keys (it records
    the numbers used); `legacy=True` makes one as keymount 0.1 left it."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": dict(KEY_LABELS if labels is None else labels)}
    if created:
        meta["creationTimestamp"] = created
    annotations = dict(annotations or {})
    if index is not None:
        annotations["keymount.io/key-index"] = str(index)
        if not legacy:
            annotations.setdefault("keymount.io/numbers-used", str(index))
    if annotations:
        meta["annotations"] = annotations
    secret: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": meta,
                              "type": "Opaque", "data": {}}
    if key is not None:
        secret["data"][field] = base64.b64encode(key).decode()
    return secret


def keyring_of(*secrets: dict[str, Any], namespace: str = "shop",
               settings: Settings | None = None) -> Keyring:
    settings = settings or Settings()
    return build_keyring(namespace, [parse_key_secret(s, settings=settings) for s in secrets])


def container(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": "example.com/app:1", **extra}


def pod(*containers: dict[str, Any], labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None, name: str = "api-0",
        init: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(BACKEND if labels is None else labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    body: dict[str, Any] = {"containers": list(containers) or [container("app")], **spec}
    if init:
        body["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


def review(obj: dict[str, Any] | None, *, kind: str = "Pod", operation: str = "CREATE",
           namespace: str = "shop", uid: str = "0f6a2b1e-uid", old: dict | None = None,
           username: str = "alice", dry_run: bool = False,
           api_version: str = "admission.k8s.io/v1") -> dict[str, Any]:
    resource = {"Pod": "pods", "Secret": "secrets"}.get(kind, kind.lower() + "s")
    request: dict[str, Any] = {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": resource},
        "operation": operation, "namespace": namespace, "userInfo": {"username": username},
        "object": copy.deepcopy(obj), "oldObject": copy.deepcopy(old), "dryRun": dry_run,
    }
    return {"apiVersion": api_version, "kind": "AdmissionReview", "request": request}


def fixed_key(label: str) -> bytes:
    """A key derived from a label, so golden files can hold its fingerprint.

    Only the fingerprint ever lands in a golden file; the bytes are made here.
    """
    import hashlib
    return hashlib.sha256(f"keymount test key {label}".encode()).digest()


def slot_secret(number: int, *, namespace: str = "shop",
                numbers_used: str | None = None) -> dict[str, Any]:
    """An empty key slot as `keys rotate` reserves it: `keymount-key-<n>`, numbered n,
    labelled, no key material."""
    return key_secret(f"keymount-key-{number}", None, namespace=namespace, index=number,
                      annotations={"keymount.io/numbers-used": numbers_used or f"1-{number}"})
