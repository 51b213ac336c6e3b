"""The AdmissionReview decoder that skips managedFields answers exactly what decoding
the whole body would, minus managedFields; whatever it does not know goes the full way."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.admission import MalformedReview, parse_review
from webhook.decoding import decode_review

from builders import key_secret, pod, random_key, review
from strategies import json_values

# Known ObjectMeta fields, managedFields, and names keymount's decoder has never heard of.
metadata = st.dictionaries(st.sampled_from([
    "name", "generateName", "namespace", "uid", "labels", "annotations", "ownerReferences",
    "creationTimestamp", "managedFields", "managedFields", "resourceVersion", "future"]),
    json_values, max_size=6)
objects = st.one_of(json_values, st.dictionaries(st.sampled_from([
    "apiVersion", "kind", "metadata", "spec", "status", "data", "stringData", "type",
    "immutable", "future"]), json_values, max_size=5).flatmap(
        lambda o: metadata.map(lambda m: {**o, "metadata": m})))
requests = st.dictionaries(st.sampled_from([
    "uid", "kind", "operation", "namespace", "name", "userInfo", "dryRun", "options",
    "object", "oldObject", "future"]), json_values, max_size=6).flatmap(
        lambda r: st.fixed_dictionaries({}, optional={"object": objects,
                                                      "oldObject": objects}).map(
            lambda o: {**r, **o}))
bodies = st.dictionaries(st.sampled_from(["apiVersion", "kind", "request", "future"]),
                         json_values, max_size=3).flatmap(
    lambda b: st.fixed_dictionaries({}, optional={"request": requests}).map(
        lambda r: {**b, **r}))


def without_managed_fields(decoded: Any) -> Any:
    """What the full decode gives, as keymount reads it: no managedFields in object and
    oldObject, and an absent object the same as a null one."""
    decoded = copy.deepcopy(decoded)
    request = decoded.get("request") if isinstance(decoded, dict) else None
    if isinstance(request, dict):
        for field in ("object", "oldObject"):
            obj = request.get(field)
            if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
                obj["metadata"].pop("managedFields", None)
    return decoded


def same_as_full(body: bytes) -> None:
    fast = decode_review(body)
    full = orjson.loads(body)
    if fast != full:  # the fast path answered: exactly the full decode, as keymount reads it
        request = fast["request"]
        for field in ("object", "oldObject"):
            if request[field] is None:
                full["request"].setdefault(field, None)
        assert fast == without_managed_fields(full)


@given(bodies)
def test_any_review_decodes_as_the_full_decode_minus_managed_fields(value):
    same_as_full(orjson.dumps(value))


def managed(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["managedFields"] = [
        {"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}}}]
    return obj


SECRET = key_secret("k1", random_key(), index=1)


@pytest.mark.parametrize("body", [
    review(managed(pod())),
    review(managed(SECRET), kind="Secret", operation="UPDATE", old=managed(SECRET)),
    review(None, kind="Secret", operation="DELETE", old=managed(SECRET)),
], ids=["pod-create", "secret-update", "secret-delete"])
def test_managed_fields_are_never_built_and_nothing_else_is_lost(body):
    decoded = decode_review(json.dumps(body).encode())
    expected = without_managed_fields(body)
    expected["request"].setdefault("oldObject", None)
    assert decoded == expected
    assert "managedFields" not in json.dumps(decoded)


@pytest.mark.parametrize("edit, kept", [
    (lambda b: b["request"]["object"]["metadata"].update(future={"x": 1}),
     lambda d: d["request"]["object"]["metadata"]["future"] == {"x": 1}),
    (lambda b: b["request"]["object"].update(future=[1]),
     lambda d: d["request"]["object"]["future"] == [1]),
    (lambda b: b["request"].update(future="x"), lambda d: d["request"]["future"] == "x"),
    (lambda b: b["request"]["object"].update(metadata=None),
     lambda d: d["request"]["object"]["metadata"] is None),
], ids=["unknown-metadata-field", "unknown-object-field", "unknown-request-field",
        "null-metadata"])
def test_what_the_fast_decoder_does_not_know_is_decoded_in_full(edit, kept):
    body = review(managed(pod()), operation="UPDATE", old=managed(pod()))
    edit(body)
    decoded = decode_review(json.dumps(body).encode())
    assert kept(decoded)
    # The full decode: the untouched oldObject keeps its managedFields.
    assert "managedFields" in decoded["request"]["oldObject"]["metadata"]


def test_duplicate_keys_mean_the_last_one_in_both_decoders():
    body = (b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{'
            b'"uid":"a","uid":"b","kind":{"kind":"Pod"},"operation":"CREATE","object":{'
            b'"metadata":{"labels":{"x":"1"},"labels":{"y":"2"}}}}}')
    decoded = decode_review(body)
    assert decoded["request"]["uid"] == orjson.loads(body)["request"]["uid"] == "b"
    assert decoded["request"]["object"]["metadata"]["labels"] == {"y": "2"}


@pytest.mark.parametrize("body, message", [
    (b'{"kind":"AdmissionReview","request":{"object":{"metadata":{"managedFields":[}}}}',
     "body is not valid JSON"),
    (b'{"kind":"AdmissionReview","request":{"object":{"metadata":{"managedFields":"\xff"}}}}',
     "body is not valid JSON"),
    (b'{"kind":"AdmissionReview","request":{"object":{"metadata":{"managedFields":'
     + b"[" * 50_000 + b"]" * 50_000 + b"}}}}", "body is not valid JSON"),
    (json.dumps(review("a string")).encode(), "request.object is not an object"),
], ids=["broken-inside-managed-fields", "invalid-utf8-inside-managed-fields",
        "deep-nesting-inside-managed-fields", "object-not-an-object"])
def test_malformed_bodies_get_the_same_400_as_before(body, message):
    with pytest.raises(MalformedReview, match=message):
        parse_review(body)
