"""Decoding an AdmissionReview body without what keymount never reads.

The API server sends each object with `metadata.managedFields`, the field ownership of
server-side apply: on a typical Pod that is two fifths of the review's bytes and about
half of its JSON objects, and keymount reads none of it. Building those objects and
freeing them again was the largest single cost of an admission (README, "Benchmark").

`decode_review` decodes against the shape of an AdmissionReview (`admission.k8s.io/v1`)
whose object and oldObject are Pods or Secrets, given below as TypedDicts: msgspec
builds the dicts, lists and scalars orjson would build, in C, for the fields named
here, and checks every other field to be valid JSON without building it. So
managedFields is never built, nor a field Kubernetes may add later to a review, a
request, an object's top level or its ObjectMeta: keymount reads none of those (what it
reads is listed here, once). Anything that does not fit the shape (a `metadata` that is
no object, a container that is no object, invalid JSON) falls back to decoding the
whole body with orjson, and the checks that follow in `admission.parse_review` judge it
as before. tests/test_decoding.py holds the fast path to the full decode minus what it
leaves out, and every decision on a Pod to the decision on the full decode. One
difference stays: an integer beyond 64 bits is an exact int here and a float from
orjson; no number keymount reads is one.

A Pod's spec is decoded leaner still: of its containers and init containers only the
fields keymount reads (name, volumeMounts, securityContext), and of the spec only those
lists, the ephemeral containers, the volumes and the securityContext; images,
environment variables, probes and resources are checked and skipped. Those are most of
a Pod's JSON objects. It applies to the spec of a core `Pod` only: another kind's spec
(a KeyPolicy's) is decoded whole. A rule that reads another field of a Pod, its
metadata or the review adds it here.

The shape is TypedDicts, not msgspec Structs: msgspec builds a TypedDict as the dict
itself, where Structs had to be converted to dicts afterwards, field by field, which
took two fifths of the decode (README, "Benchmark").
"""

from __future__ import annotations

from typing import Any, TypedDict

import msgspec
import orjson


class _Metadata(TypedDict, total=False):
    """ObjectMeta (meta/v1), without managedFields."""

    name: Any
    generateName: Any  # camelCase: the wire's names
    namespace: Any
    selfLink: Any
    uid: Any
    resourceVersion: Any
    generation: Any
    creationTimestamp: Any
    deletionTimestamp: Any
    deletionGracePeriodSeconds: Any
    labels: Any
    annotations: Any
    ownerReferences: Any
    finalizers: Any


class _Object(TypedDict, total=False):
    """The top-level fields of a Pod and of a Secret; a spec of any kind, whole."""

    apiVersion: Any
    kind: Any
    metadata: _Metadata | None
    spec: Any
    status: Any
    data: Any
    stringData: Any
    binaryData: Any
    type: Any
    immutable: Any


class _Container(TypedDict, total=False):
    """What keymount reads of a Pod's container (webhook/injection.py)."""

    name: Any
    volumeMounts: Any
    securityContext: Any


class _PodSpec(TypedDict, total=False):
    """What keymount reads of a Pod's spec. Ephemeral containers are kept whole: a Pod
    update compares them whole (decisions._backend_pod_change); they are rare."""

    containers: list[_Container] | None
    initContainers: list[_Container] | None
    ephemeralContainers: Any
    volumes: Any
    securityContext: Any


class _PodObject(_Object, total=False):
    spec: _PodSpec | None  # narrowed: a core Pod's spec


class _Request(TypedDict, total=False):
    """AdmissionRequest (admission.k8s.io/v1)."""

    uid: Any
    kind: Any
    resource: Any
    subResource: Any
    requestKind: Any
    requestResource: Any
    requestSubResource: Any
    name: Any
    namespace: Any
    operation: Any
    userInfo: Any
    object: _Object | None
    oldObject: _Object | None
    dryRun: Any
    options: Any


class _PodRequest(_Request, total=False):
    object: _PodObject | None
    oldObject: _PodObject | None


class _Review(TypedDict, total=False):
    apiVersion: Any
    kind: Any
    request: _Request | None


class _PodReview(_Review, total=False):
    request: _PodRequest | None


_decoder = msgspec.json.Decoder(_Review)
_pod_decoder = msgspec.json.Decoder(_PodReview)


def decode_review(body: bytes) -> Any:
    """The review as builtins, as `orjson.loads(body)` gives it, of the fields named
    above. Raises orjson.JSONDecodeError for a body that is not JSON."""
    try:
        # msgspec checks the strings it skips for JSON escapes, not for UTF-8: checked
        # here, so that a body orjson refuses is never answered.
        body.decode()
        # Most reviews are of Pods: decoded as one first; a spec of any other kind is
        # decoded again, whole.
        review: Any = _pod_decoder.decode(body)
        request = review.get("request")
        if request is not None and not _is_pod(request.get("kind")) and any(
                isinstance(o, dict) and "spec" in o
                for o in (request.get("object"), request.get("oldObject"))):
            review = _decoder.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return orjson.loads(body)
    return review


def _is_pod(kind: Any) -> bool:
    """The request's kind is a core Pod (as admission.AdmissionRequest.is_pod reads it)."""
    return isinstance(kind, dict) and kind.get("kind") == "Pod" and not kind.get("group")
