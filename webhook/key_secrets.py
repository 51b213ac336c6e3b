"""Key Secrets as Kubernetes objects: reading one into a KeyRecord, writing one.

The same reader serves the API server's JSON, AdmissionReview objects and local YAML
manifests, so a key is judged the same way wherever it comes from (docs/contract.md, "Key sources").
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from .config import Settings
from .keys import KeyCheck, KeyRecord, build_key_record, revision
from .names import INDEX_ANNOTATION, NUMBERS_USED_ANNOTATION, staged_field

SecretObject = Mapping[str, Any]
ApiObject = dict[str, Any]  # an object as the API server sends it (JSON, not a model)
# What creating a key slot found: made now; a key Secret of that name already (another
# writer's slot); or a Secret that is no key Secret (the number cannot be a slot).
SlotOutcome = Literal["reserved", "exists", "taken"]


def parse_timestamp(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def read_key_field(secret: SecretObject, field: str) -> tuple[bytes | None, str]:
    """The field's stored bytes, and an error when `data` is not valid base64.

    `stringData` wins over `data` for the same key, as the API server merges it
    (k8s.io/kubernetes pkg/apis/core/v1 conversion of Secret).
    """
    string_data = secret.get("stringData") or {}
    if field in string_data:
        value = string_data[field]
        return (value.encode() if isinstance(value, str) else None), ""
    data = secret.get("data") or {}
    if field not in data:
        return None, ""
    value = data[field]
    if isinstance(value, bytes):
        return value, ""
    try:
        return base64.b64decode(value or "", validate=True), ""
    except (binascii.Error, ValueError, TypeError):
        return None, f"data field {field!r} is not valid base64"


def parse_key_secret(secret: SecretObject, *, settings: Settings,
                     namespace: str | None = None) -> KeyRecord:
    """Judge one key Secret. `namespace` overrides the object's own (admission requests)."""
    meta = secret.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    value, error = read_key_field(secret, settings.key_field)
    staged_value, staged_error = read_key_field(secret, staged_field(settings.key_field))
    error = error or staged_error
    record = build_key_record(
        namespace=namespace or meta.get("namespace") or "default",
        name=meta.get("name") or meta.get("generateName") or "",
        value=value,
        annotations=annotations,
        created=parse_timestamp(meta.get("creationTimestamp")),
        field=settings.key_field,
        encoding=settings.key_encoding,
        staged_value=staged_value,
    )
    version = revision(meta.get("resourceVersion"))
    if error:
        return dataclasses.replace(record, check=KeyCheck(False, error), revision=version,
                                   slot=False, staged=False)
    return dataclasses.replace(record, revision=version) if version else record


def is_key_secret(secret: SecretObject, *, settings: Settings) -> bool:
    labels = (secret.get("metadata") or {}).get("labels") or {}
    return settings.key_selector.matches(labels)


def key_labels(settings: Settings) -> dict[str, str]:
    """The labels that make a Secret match the key selector."""
    return {r.key: next(iter(r.values)) for r in settings.key_selector.requirements
            if r.operator in ("=", "in") and len(r.values) == 1}


def build_key_secret(name: str, *, namespace: str, key: bytes | None, index: int | None,
                     settings: Settings, numbers_used: str | None = None) -> dict[str, Any]:
    """A key Secret manifest, labelled so keymount's selector finds it; without `key`,
    an empty slot. `numbers_used` is the record of a slot the manifest fills (an
    update must not change it)."""
    labels = key_labels(settings)
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if index is not None:
        # The number is keymount's from the start; the webhook completes the record of
        # the namespace's used numbers when the Secret is created.
        meta["annotations"] = {INDEX_ANNOTATION: str(index),
                               NUMBERS_USED_ANNOTATION: str(index) if numbers_used is None
                               else numbers_used}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {} if key is None else {settings.key_field: base64.b64encode(key).decode()},
    }
