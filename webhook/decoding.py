"""Decoding an AdmissionReview body without its managedFields.

The API server sends each object with `metadata.managedFields`, the field ownership of
server-side apply: on a typical Pod that is two fifths of the review's bytes and about
half of its JSON objects, and keymount reads none of it. Building those objects and
freeing them again was the largest single cost of an admission (README, "Benchmark").

`decode_review` first decodes against the shape of an AdmissionReview
(`admission.k8s.io/v1`) whose object and oldObject are Pods or Secrets, with msgspec:
managedFields is checked to be valid JSON but never built. Every field of those types
that keymount may read is kept, as the same dicts, lists and scalars orjson would
build. Anything outside that shape (an unknown field at any of these levels, a
`metadata` that is no object, invalid JSON) falls back to decoding the whole body with
orjson, and the checks that follow in `admission.parse_review` judge it as before: the
fast path only ever answers what the full decode would, minus managedFields
(tests/test_decoding.py). One difference stays: an integer beyond 64 bits is an exact
int here and a float from orjson; no number keymount reads is one.

A Pod's spec is decoded leaner still: of its containers and init containers only the
fields keymount reads (name, volumeMounts, securityContext), and of the spec only those
lists, the ephemeral containers, the volumes and the securityContext; images,
environment variables, probes and resources are checked to be valid JSON and skipped.
Those are most of a Pod's JSON objects: skipping them takes about a seventh off the
decode of the benchmark's review (README, "Benchmark"). It applies to the spec of a
core `Pod` only: another kind's spec (a KeyPolicy's) is decoded whole. What keymount
reads of a Pod is listed once, here: a rule that reads another field of a Pod's spec
adds it to `_Container` or `_PodSpec`, and tests/test_decoding.py holds that every
decision on a Pod is the one the full decode gives.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
from msgspec import UNSET, Raw, UnsetType


class _Metadata(msgspec.Struct, forbid_unknown_fields=True):
    """ObjectMeta (meta/v1); a field Kubernetes adds later falls back to the full decode."""

    name: Any = UNSET
    generateName: Any = UNSET  # camelCase: the wire's names
    namespace: Any = UNSET
    selfLink: Any = UNSET
    uid: Any = UNSET
    resourceVersion: Any = UNSET
    generation: Any = UNSET
    creationTimestamp: Any = UNSET
    deletionTimestamp: Any = UNSET
    deletionGracePeriodSeconds: Any = UNSET
    labels: Any = UNSET
    annotations: Any = UNSET
    ownerReferences: Any = UNSET
    finalizers: Any = UNSET
    managedFields: Raw = Raw(b"")  # validated, never built


class _Object(msgspec.Struct, forbid_unknown_fields=True):
    """The top-level fields of a Pod and of a Secret."""

    apiVersion: Any = UNSET
    kind: Any = UNSET
    metadata: _Metadata | None = None
    spec: Any = UNSET
    status: Any = UNSET
    data: Any = UNSET
    stringData: Any = UNSET
    binaryData: Any = UNSET
    type: Any = UNSET
    immutable: Any = UNSET


class _Container(msgspec.Struct):
    """What keymount reads of a Pod's container (webhook/injection.py): its other
    fields are skipped, not built."""

    name: Any = UNSET
    volumeMounts: Any = UNSET
    securityContext: Any = UNSET


class _PodSpec(msgspec.Struct):
    """What keymount reads of a Pod's spec. Ephemeral containers are kept whole: a Pod
    update compares them whole (decisions._backend_pod_change); they are rare."""

    containers: list[_Container] | UnsetType | None = UNSET
    initContainers: list[_Container] | UnsetType | None = UNSET
    ephemeralContainers: Any = UNSET
    volumes: Any = UNSET
    securityContext: Any = UNSET


class _PodObject(_Object, forbid_unknown_fields=True):
    spec: _PodSpec | UnsetType | None = UNSET


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    """AdmissionRequest (admission.k8s.io/v1)."""

    uid: Any = UNSET
    kind: Any = UNSET
    resource: Any = UNSET
    subResource: Any = UNSET
    requestKind: Any = UNSET
    requestResource: Any = UNSET
    requestSubResource: Any = UNSET
    name: Any = UNSET
    namespace: Any = UNSET
    operation: Any = UNSET
    userInfo: Any = UNSET
    object: _Object | None = None
    oldObject: _Object | None = None
    dryRun: Any = UNSET
    options: Any = UNSET


class _Review(msgspec.Struct, forbid_unknown_fields=True):
    apiVersion: Any = UNSET
    kind: Any = UNSET
    request: _Request | None = None


class _PodRequest(_Request, forbid_unknown_fields=True):
    object: _PodObject | None = None
    oldObject: _PodObject | None = None


class _PodReview(_Review, forbid_unknown_fields=True):
    request: _PodRequest | None = None


_decoder = msgspec.json.Decoder(_Review)
_pod_decoder = msgspec.json.Decoder(_PodReview)
_asdict = msgspec.structs.asdict


def decode_review(body: bytes) -> Any:
    """The review as builtins, as `orjson.loads(body)` gives it, without the
    managedFields of its object and oldObject. Raises orjson.JSONDecodeError for a body
    that is not JSON."""
    try:
        # msgspec checks the strings it skips for JSON escapes, not for UTF-8: checked
        # here, so that a body orjson refuses is never answered.
        body.decode()
        # Most reviews are of Pods: decoded as one first; a spec of any other kind is
        # decoded again, whole.
        review: _Review = _pod_decoder.decode(body)
        request = review.request
        if request is not None and not _is_pod(request.kind) and any(
                o is not None and o.spec is not UNSET
                for o in (request.object, request.oldObject)):
            review = _decoder.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return orjson.loads(body)
    request = review.request
    # A Struct field that defaults to None reads an absent key and a null alike: the
    # rare review without a request or an object without metadata goes the full way.
    if request is None or any(o is not None and o.metadata is None
                              for o in (request.object, request.oldObject)):
        return orjson.loads(body)
    fields = _fields(review)
    fields["request"] = request_fields = _fields(request)
    # An absent object reads as null: admission.parse_review treats both alike.
    request_fields["object"] = _object_dict(request.object)
    request_fields["oldObject"] = _object_dict(request.oldObject)
    return fields


def _fields(struct: msgspec.Struct) -> dict[str, Any]:
    # asdict copies the fields in C; filtering its dict is half the cost of a getattr
    # per field (bench/cpu_profile.py).
    return {name: value for name, value in _asdict(struct).items() if value is not UNSET}


def _is_pod(kind: Any) -> bool:
    """The request's kind is a core Pod (as admission.AdmissionRequest.is_pod reads it)."""
    return isinstance(kind, dict) and kind.get("kind") == "Pod" and not kind.get("group")


def _object_dict(obj: _Object | None) -> dict[str, Any] | None:
    if obj is None or obj.metadata is None:
        return None
    fields = _fields(obj)
    fields["metadata"] = meta = _fields(obj.metadata)
    del meta["managedFields"]
    spec = fields.get("spec")
    if isinstance(spec, _PodSpec):
        fields["spec"] = spec_fields = _fields(spec)
        for name in ("containers", "initContainers"):
            containers = spec_fields.get(name)
            if containers:
                spec_fields[name] = [_fields(c) for c in containers]
    return fields
