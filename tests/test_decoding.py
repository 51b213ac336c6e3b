"""The AdmissionReview decoder that skips managedFields answers exactly what decoding
the whole body would, minus managedFields and the fields keymount never reads; whatever
does not fit its shape goes the full way."""

from __future__ import annotations

import copy
import json
from typing import Any
from unittest.mock import patch

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.admission import MalformedReview, Verdict, parse_review
from webhook.config import CONTAINERS_ANNOTATION, STATUS_ANNOTATION, VOLUME_NAME, Settings
from webhook.decisions import View, route
from webhook.decoding import decode_review
from webhook.keys import Keyring

from builders import key_secret, keyring_of, pod, random_key, review
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


# The fields the fast decoder builds at each level (webhook/decoding.py), stated again
# here as the contract the tests hold it to: every other field is left out.
REVIEW_READ = {"apiVersion", "kind", "request"}
REQUEST_READ = {"uid", "kind", "resource", "subResource", "requestKind", "requestResource",
                "requestSubResource", "name", "namespace", "operation", "userInfo", "object",
                "oldObject", "dryRun", "options"}
OBJECT_READ = {"apiVersion", "kind", "metadata", "spec", "status", "data", "stringData",
               "binaryData", "type", "immutable"}
METADATA_READ = {"name", "generateName", "namespace", "selfLink", "uid", "resourceVersion",
                 "generation", "creationTimestamp", "deletionTimestamp",
                 "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences",
                 "finalizers"}  # not managedFields
POD_SPEC_READ = {"containers", "initContainers", "ephemeralContainers", "volumes",
                 "securityContext"}
CONTAINER_READ = {"name", "volumeMounts", "securityContext"}


def only(value: Any, fields: set[str]) -> Any:
    return {k: v for k, v in value.items() if k in fields} if isinstance(value, dict) \
        else value


def as_keymount_reads(decoded: Any) -> Any:
    """What the full decode gives, as keymount reads it: of each level only the fields
    named above (so no managedFields), and of a core Pod's spec and its containers only
    what keymount reads."""
    decoded = only(copy.deepcopy(decoded), REVIEW_READ)
    request = decoded.get("request") if isinstance(decoded, dict) else None
    if not isinstance(request, dict):
        return decoded
    request = decoded["request"] = only(request, REQUEST_READ)
    kind = request.get("kind")
    is_pod = isinstance(kind, dict) and kind.get("kind") == "Pod" and not kind.get("group")
    for field in ("object", "oldObject"):
        obj = request.get(field)
        if not isinstance(obj, dict):
            continue
        obj = request[field] = only(obj, OBJECT_READ)
        if "metadata" in obj:
            obj["metadata"] = only(obj["metadata"], METADATA_READ)
        if is_pod and isinstance(obj.get("spec"), dict):
            spec = obj["spec"] = only(obj["spec"], POD_SPEC_READ)
            for name in ("containers", "initContainers"):
                if isinstance(spec.get(name), list):
                    spec[name] = [only(c, CONTAINER_READ) for c in spec[name]]
    return decoded


def same_as_full(body: bytes) -> None:
    fast = decode_review(body)
    full = orjson.loads(body)
    # The fast path answered (exactly the full decode, as keymount reads it), or it
    # went the full way.
    assert fast == full or fast == as_keymount_reads(full)


@given(bodies)
def test_any_review_decodes_as_the_full_decode_of_what_keymount_reads(value):
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
    assert decoded == as_keymount_reads(body)
    assert "managedFields" not in json.dumps(decoded)


def test_every_field_keymount_reads_is_kept():
    body = review(managed(pod(FULL_CONTAINER, init=[FULL_CONTAINER])), operation="UPDATE",
                  old=managed(pod()))
    request = body["request"]
    for field in REQUEST_READ - set(request):
        request[field] = f"request {field}"
    for obj in (request["object"], request["oldObject"]):
        for field in OBJECT_READ - set(obj):
            obj[field] = f"object {field}"
        for field in METADATA_READ - set(obj["metadata"]):
            obj["metadata"][field] = f"metadata {field}"
        for field in POD_SPEC_READ - set(obj["spec"]):
            obj["spec"][field] = [{"name": field}]
    decoded = decode_review(json.dumps(body).encode())
    assert decoded == as_keymount_reads(body)
    assert "managedFields" not in decoded["request"]["object"]["metadata"]  # the fast path
    for field in METADATA_READ:
        assert field in decoded["request"]["object"]["metadata"]


@pytest.mark.parametrize("edit, left_out", [
    (lambda b: b["request"]["object"]["metadata"].update(future={"x": 1}),
     lambda d: "future" not in d["request"]["object"]["metadata"]),
    (lambda b: b["request"]["object"].update(future=[1]),
     lambda d: "future" not in d["request"]["object"]),
    (lambda b: b["request"].update(future="x"), lambda d: "future" not in d["request"]),
    (lambda b: b.update(future="x"), lambda d: "future" not in d),
], ids=["unknown-metadata-field", "unknown-object-field", "unknown-request-field",
        "unknown-review-field"])
def test_a_field_keymount_never_reads_is_left_out(edit, left_out):
    body = review(managed(pod()), operation="UPDATE", old=managed(pod()))
    edit(body)
    decoded = decode_review(json.dumps(body).encode())
    assert left_out(decoded)
    assert decoded == as_keymount_reads(body)
    assert "managedFields" not in decoded["request"]["oldObject"]["metadata"]


@pytest.mark.parametrize("edit, kept", [
    (lambda b: b["request"]["object"].update(metadata="a string"),
     lambda d: d["request"]["object"]["metadata"] == "a string"),
    (lambda b: b["request"]["object"]["spec"]["containers"].append("not a container"),
     lambda d: d["request"]["object"]["spec"]["containers"][-1] == "not a container"),
    (lambda b: b["request"]["object"]["spec"].update(containers={"app": {}}),
     lambda d: d["request"]["object"]["spec"]["containers"] == {"app": {}}),
], ids=["metadata-not-an-object", "container-not-an-object", "containers-not-a-list"])
def test_what_does_not_fit_the_shape_is_decoded_in_full(edit, kept):
    body = review(managed(pod()), operation="UPDATE", old=managed(pod()))
    edit(body)
    decoded = decode_review(json.dumps(body).encode())
    assert kept(decoded)
    # The full decode: the untouched oldObject keeps its managedFields.
    assert "managedFields" in decoded["request"]["oldObject"]["metadata"]


@pytest.mark.parametrize("absent", ["request", "object", "metadata"])
def test_null_and_absent_are_kept_apart_as_in_the_full_decode(absent):
    body = review(pod())
    parent = {"request": body, "object": body["request"],
              "metadata": body["request"]["object"]}[absent]
    for value in (None, "absent"):
        if value is None:
            parent[absent] = None
        else:
            parent.pop(absent)
        encoded = json.dumps(body).encode()
        assert decode_review(encoded) == as_keymount_reads(orjson.loads(encoded))


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


# --- a Pod's spec: only what keymount reads ---------------------------------------------

FULL_CONTAINER = {"name": "app", "image": "example.com/app:1",
                  "env": [{"name": "A", "value": "1"}],
                  "resources": {"limits": {"cpu": "1"}}, "ports": [{"containerPort": 80}],
                  "securityContext": {"runAsUser": 1000},
                  "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}]}


def test_a_pods_containers_keep_only_what_keymount_reads():
    body = review(managed(pod(FULL_CONTAINER, init=[FULL_CONTAINER],
                              volumes=[{"name": "config", "configMap": {"name": "c"}}],
                              securityContext={"fsGroup": 1}, dnsPolicy="ClusterFirst",
                              tolerations=[{"key": "k"}])))
    spec = decode_review(json.dumps(body).encode())["request"]["object"]["spec"]
    assert spec == {
        "containers": [{k: FULL_CONTAINER[k] for k in ("name", "securityContext",
                                                      "volumeMounts")}],
        "initContainers": [{k: FULL_CONTAINER[k] for k in ("name", "securityContext",
                                                          "volumeMounts")}],
        "volumes": [{"name": "config", "configMap": {"name": "c"}}],
        "securityContext": {"fsGroup": 1}}


@pytest.mark.parametrize("kind, group", [("KeyPolicy", "keymount.io"), ("Pod", "example.com"),
                                         ("Deployment", "")],
                         ids=["keymount-policy", "pod-of-another-group", "another-core-kind"])
def test_the_spec_of_anything_but_a_core_pod_is_decoded_whole(kind, group):
    obj = managed(pod(FULL_CONTAINER, dnsPolicy="ClusterFirst"))
    body = review(obj, kind=kind)
    body["request"]["kind"]["group"] = group
    decoded = decode_review(json.dumps(body).encode())
    assert decoded["request"]["object"]["spec"] == obj["spec"]


# Pods as anyone may write them: containers with mounts of keymount's volume or near its
# path, fields keymount never reads, volumes, security contexts, and values of any type.
mount_paths = st.sampled_from(["/encryption-keys", "/encryption-keys/", "/encryption-keys/x",
                               "//encryption-keys", "/etc/app", "/", ""]) | json_values
mounts = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from([VOLUME_NAME, "config", "kube-api-access-x1"]) | json_values,
    "mountPath": mount_paths, "readOnly": st.booleans() | json_values,
    "subPath": st.sampled_from(["", "a"]),
    "mountPropagation": st.sampled_from(["None", "HostToContainer"])})
security = st.fixed_dictionaries({}, optional={
    "runAsUser": st.sampled_from([0, 1000]) | json_values, "runAsNonRoot": st.booleans(),
    "fsGroup": st.sampled_from([None, 1000])})
containers = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["app", "proxy", "init"]) | json_values,
    "image": st.text(max_size=8), "env": json_values, "resources": json_values,
    "volumeMounts": st.lists(mounts, max_size=3) | json_values, "securityContext": security})
pod_specs = st.fixed_dictionaries({"containers": st.lists(containers, min_size=1, max_size=3)},
                                  optional={
    "initContainers": st.lists(containers, max_size=2) | st.none(),
    "ephemeralContainers": st.lists(containers, max_size=2),
    "volumes": st.lists(st.fixed_dictionaries({"name": st.sampled_from(
        [VOLUME_NAME, "config"])}, optional={"configMap": json_values}), max_size=2) | json_values,
    "securityContext": security, "dnsPolicy": json_values, "tolerations": json_values})
pod_annotations = st.dictionaries(st.sampled_from([CONTAINERS_ANNOTATION, STATUS_ANNOTATION,
                                                   "note"]),
                                  st.sampled_from(["app", "init", "app,proxy", "x"]), max_size=2)


def decided(body: bytes, webhook: str, keyring: Keyring, *, full: bool) -> Verdict:
    """The routed handler's verdict on the body, decoded as keymount does or in full."""
    if full:
        with patch("webhook.admission.decode_review", orjson.loads):
            request = parse_review(body)
    else:
        request = parse_review(body)
    return route(webhook, request)(request, View(keyring, Settings(), source="cache"))


KEYRING = keyring_of(key_secret("k1", random_key(), index=1),
                     key_secret("k2", random_key(), index=2))


@settings(max_examples=300, deadline=None)
@given(spec=pod_specs, old_spec=pod_specs, annotations=pod_annotations,
       backend=st.booleans(), webhook=st.sampled_from(["mutate", "validate"]),
       operation=st.sampled_from(["CREATE", "UPDATE"]))
def test_every_decision_on_a_pod_is_the_one_the_full_decode_gives(
        spec, old_spec, annotations, backend, webhook, operation):
    obj = pod(labels=None if backend else {}, annotations=annotations)
    obj["spec"] = spec
    obj["future"] = obj["metadata"]["future"] = {"left": "out"}  # never read
    old = pod()
    old["spec"] = old_spec
    body = json.dumps(review(managed(obj), operation=operation,
                             old=managed(old) if operation == "UPDATE" else None)).encode()
    assert decided(body, webhook, KEYRING, full=False) == \
        decided(body, webhook, KEYRING, full=True)
