"""Properties over generated AdmissionReviews and Pod shapes (Hypothesis).

Whatever arrives: parsing either yields a request or a MalformedReview (the 400), a
decision never raises, every answer is an AdmissionReview response with the uid, and
no backend Pod is ever allowed without its keys: /mutate either refuses it or patches
it so that every selected container mounts every key, and /validate accepts exactly
that result.
"""

from __future__ import annotations

import base64
import copy
import json
import sys
from collections import Counter
from unittest.mock import patch

import jsonpatch
import pytest
import test_decoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webhook.admission import MalformedReview, complete, parse_review
from webhook.config import Settings
from webhook.decisions import review_mutation, review_validation
from webhook.injection import build_mount, build_volume, inject_keys, needs_keys, plain_pod
from webhook.names import VOLUME_NAME, as_dict

from builders import container, key_secret, keyring_of, pod, random_key, review, slot_secret
from strategies import json_values

SETTINGS = Settings()
KEYRING = keyring_of(key_secret("k1", random_key(), index=1),
                     key_secret("k2", random_key(), index=2))
RUNS: Counter[str] = Counter()


paths = st.sampled_from(["/encryption-keys", "//encryption-keys", "/encryption-keys/",
                         "/./encryption-keys", "/encryption-keys/sub", "/data", "/", "",
                         "/encryption-keysx", "/a/../encryption-keys"])
mounts = st.fixed_dictionaries(
    {"name": st.sampled_from([VOLUME_NAME, "data", "cache"]), "mountPath": paths},
    optional={"readOnly": st.booleans(), "subPath": st.sampled_from(["", "encryption-key-1"]),
              "mountPropagation": st.sampled_from(["None", "HostToContainer"])})
containers = st.fixed_dictionaries(
    {"name": st.sampled_from(["app", "sidecar", "init", "x"])},
    optional={"volumeMounts": st.lists(mounts, max_size=3) | json_values,
              "securityContext": st.fixed_dictionaries(
                  {}, optional={"runAsUser": st.integers(0, 2), "runAsNonRoot": st.booleans()}),
              "image": st.text(max_size=5)})
volumes = st.lists(st.fixed_dictionaries(
    {"name": st.sampled_from([VOLUME_NAME, "data", "cache"])},
    optional={"emptyDir": st.just({}), "projected": json_values}), max_size=3)
labels = st.dictionaries(st.sampled_from(["app.kubernetes.io/component", "app"]),
                         st.sampled_from(["backend", "web", ""]), max_size=2)
annotations = st.dictionaries(st.sampled_from(["keymount.io/containers", "keymount.io/status",
                                               "other"]),
                              st.sampled_from(["app", "app,sidecar", "ghost", "", "init"]),
                              max_size=2)
pods = st.fixed_dictionaries(
    {"metadata": st.fixed_dictionaries({"labels": labels}, optional={
        "annotations": annotations, "name": st.text(max_size=5)}),
     "spec": st.fixed_dictionaries({}, optional={
         "containers": st.lists(containers, max_size=3) | json_values,
         "initContainers": st.lists(containers, max_size=2),
         "volumes": volumes | json_values,
         "securityContext": st.fixed_dictionaries({}, optional={"fsGroup": st.integers(0, 5)}),
     })},
    optional={"apiVersion": st.just("v1"), "kind": st.just("Pod")})
kinds = st.sampled_from([{"group": "", "version": "v1", "kind": "Pod"},
                         {"group": "", "version": "v1", "kind": "Secret"},
                         {"group": "apps", "version": "v1", "kind": "Deployment"}])
reviews = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["admission.k8s.io/v1", "admission.k8s.io/v1beta1", "v2"]),
    "kind": st.sampled_from(["AdmissionReview", "AdmissionReview", "Pod"]),
    "request": st.fixed_dictionaries(
        {"uid": st.sampled_from(["u-1", ""]), "kind": kinds,
         "operation": st.sampled_from(["CREATE", "CREATE", "UPDATE", "DELETE", "EAT"])},
        optional={"namespace": st.sampled_from(["shop", "other", ""]),
                  "object": pods | json_values, "oldObject": pods | json_values,
                  "dryRun": st.booleans(),
                  "userInfo": st.fixed_dictionaries({}, optional={
                      "username": st.text(max_size=5), "groups": json_values})})})


def decide(body: bytes, webhook: str):
    """Parse and decide as the server does; None for a body answered with a 400."""
    try:
        request = parse_review(body)
    except MalformedReview:
        RUNS["4xx"] += 1
        return None, None
    keyring = KEYRING if request.namespace == "shop" else keyring_of(namespace=request.namespace)
    if webhook == "mutate":
        return request, review_mutation(request, keyring=keyring, settings=SETTINGS)
    return request, review_validation(request, keyring=keyring, settings=SETTINGS)


def assert_wire_response(request, verdict) -> None:
    response = complete(request, verdict.response)["response"]
    assert response["uid"] == request.uid and isinstance(response["allowed"], bool)
    if not response["allowed"]:
        assert response["status"]["code"] in (400, 403, 500) and response["status"]["message"]
    json.dumps(response)  # serialisable as it is sent


def assert_keys_mounted(pod, request) -> None:
    """The patched backend Pod carries every key, mounted in every selected container."""
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == VOLUME_NAME)
    files = {s["secret"]["items"][0]["path"] for s in volume["projected"]["sources"]
             if not s["secret"]["optional"]}
    assert files == {f.file for f in KEYRING.files}
    again, verdict = decide(json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": request.uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "operation": "CREATE", "namespace": request.namespace,
                    "object": pod}}).encode(), "validate")
    assert verdict.result == "allowed", verdict.message


@settings(max_examples=400)
@given(body=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64))
def test_any_body_is_a_request_or_a_400_never_an_exception(body):
    RUNS["any-body"] += 1
    for webhook in ("mutate", "validate"):
        request, verdict = decide(body, webhook)
        if verdict is not None:
            assert_wire_response(request, verdict)


@settings(max_examples=1500)
@given(review=reviews)
def test_no_backend_pod_is_ever_allowed_without_its_keys(review):
    RUNS["review"] += 1
    body = json.dumps(review).encode()
    request, verdict = decide(body, "mutate")
    if verdict is None:
        return
    assert_wire_response(request, verdict)
    pod = request.object
    backend_create = (request.is_pod and request.operation == "CREATE"
                      and isinstance(pod, dict) and needs_keys(pod, settings=SETTINGS))
    if not backend_create or not verdict.response["allowed"]:
        RUNS["refused-or-not-backend"] += 1
        return
    assert request.namespace == "shop"  # a keyless namespace never lets one through
    patch = json.loads(__import__("base64").b64decode(verdict.response["patch"]))
    assert_keys_mounted(jsonpatch.apply_patch(pod, patch), request)
    RUNS["injected"] += 1
    _, validated = decide(body, "validate")
    assert validated.result in ("allowed", "denied")


backend_labels = labels.map(lambda d: {**d, "app.kubernetes.io/component": "backend"})
backend_pods = st.fixed_dictionaries(
    {"metadata": st.fixed_dictionaries({"labels": backend_labels},
                                       optional={"annotations": annotations}),
     "spec": st.fixed_dictionaries(
         {"containers": st.lists(containers, min_size=1, max_size=3)},
         optional={"initContainers": st.lists(containers, max_size=2),
                   "volumes": volumes,
                   "securityContext": st.fixed_dictionaries(
                       {}, optional={"fsGroup": st.integers(0, 5)})})})


@settings(max_examples=1500)
@given(pod=backend_pods, webhook=st.sampled_from(["mutate", "validate"]))
def test_a_backend_pod_of_any_shape_is_refused_or_gets_every_key(pod, webhook):
    RUNS["backend-pod"] += 1
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": "u-1", "operation": "CREATE", "namespace": "shop",
                                   "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                   "object": pod}}).encode()
    request, verdict = decide(body, webhook)
    assert_wire_response(request, verdict)
    if not verdict.response["allowed"]:
        RUNS[f"{webhook}-refused"] += 1
        return
    assert webhook == "mutate", "validate allowed a backend Pod that keymount never saw"
    patch = json.loads(__import__("base64").b64decode(verdict.response["patch"]))
    assert_keys_mounted(jsonpatch.apply_patch(pod, patch), request)
    RUNS["injected"] += 1


# A backend Pod as /mutate leaves it, with key slots, an init container selected by the
# containers annotation, another volume, an ephemeral container and a security context:
# most of what the Pod rules read. Broken in one place at a time, anywhere.
SLOTTED = keyring_of(key_secret("k1", random_key(), index=1),
                     key_secret("k2", random_key(), index=2), slot_secret(3))


def _injected_pod() -> dict:
    obj = pod(container("app", volumeMounts=[{"name": "data", "mountPath": "/data"}]),
              init=[container("init")], annotations={"keymount.io/containers": "app,init"},
              volumes=[{"name": "data", "emptyDir": {}}], securityContext={"fsGroup": 1},
              ephemeralContainers=[container("debug")])
    obj["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    verdict = review_mutation(parse_review(json.dumps(review(obj)).encode()),
                              keyring=SLOTTED, settings=SETTINGS)
    assert verdict.result == "injected", verdict.message
    patch = json.loads(base64.b64decode(verdict.response["patch"]))
    return jsonpatch.apply_patch(obj, patch)


INJECTED = _injected_pod()
INJECTED_PLAIN = jsonpatch.apply_patch(pod(), json.loads(base64.b64decode(review_mutation(
    parse_review(json.dumps(review(pod())).encode()), keyring=SLOTTED,
    settings=SETTINGS).response["patch"])))


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            found += _paths(inner, (*prefix, i))
    return found


def _broken(path: tuple, value: object) -> object:
    if not path:
        return value
    broken = copy.deepcopy(INJECTED)
    parent = broken
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return broken


@settings(max_examples=1000)
@given(path=st.sampled_from(_paths(INJECTED)), value=json_values,
       webhook=st.sampled_from(["mutate", "validate"]),
       operation=st.sampled_from(["CREATE", "UPDATE", "UPDATE-of-the-broken"]))
def test_a_pod_broken_anywhere_is_a_400_or_a_verdict_never_an_exception(
        path, value, webhook, operation):
    """Only a direct client can send such a Pod (the API server decodes a Pod before
    admission), and an exception fails closed (a 500); but a 400 or a verdict says
    what is wrong, and no backend Pod gets through /mutate without its keys."""
    obj, old = _broken(path, value), INJECTED
    if operation == "UPDATE-of-the-broken":
        obj, old = old, obj
    body = review(obj, operation=operation[:6], old=old if operation != "CREATE" else None)
    try:
        request = parse_review(json.dumps(body).encode())
    except MalformedReview:
        RUNS["broken-4xx"] += 1
        return
    decide_on = review_mutation if webhook == "mutate" else review_validation
    verdict = decide_on(request, keyring=SLOTTED, settings=SETTINGS)
    assert_wire_response(request, verdict)
    if webhook == "mutate" and operation == "CREATE" and needs_keys(as_dict(obj),
                                                                    settings=SETTINGS):
        assert verdict.result in ("injected", "denied")
    RUNS[f"broken-{verdict.result}"] += 1


def _with_keymounts_own(spec: dict, volume: str, mounted: list[bool]) -> dict:
    """The spec with keymount's volume and mounts as it adds them (or, "changed", its
    volume as an older keyring made it), as a Pod that went through /mutate before."""
    if volume != "none" and isinstance(spec.get("volumes"), list):
        ours = build_volume(SLOTTED if volume == "as-added" else KEYRING, settings=SETTINGS)
        spec["volumes"] = [*spec["volumes"], copy.deepcopy(ours)]
    for member, mount in zip(spec["containers"], mounted, strict=False):
        if mount and isinstance(member.get("volumeMounts", []), list):
            member["volumeMounts"] = [*member.get("volumeMounts", []),
                                         build_mount(settings=SETTINGS)]
    return spec


@settings(max_examples=1000)
@given(spec=test_decoding.pod_specs, annotations=test_decoding.pod_annotations,
       volume=st.sampled_from(["none", "as-added", "changed"]),
       mounted=st.lists(st.booleans(), max_size=3))
def test_the_plain_pod_shortcut_decides_as_the_rules_do(spec, annotations, volume, mounted):
    obj = pod(annotations=annotations)
    obj["spec"] = _with_keymounts_own(spec, volume, mounted)
    shortcut = inject_keys(obj, keyring=SLOTTED, settings=SETTINGS)
    with patch("webhook.injection.plain_pod", return_value=None):
        rules = inject_keys(obj, keyring=SLOTTED, settings=SETTINGS)
    assert shortcut == rules
    plain = plain_pod(obj["spec"], meta=obj["metadata"],
                      volume=build_volume(SLOTTED, settings=SETTINGS), settings=SETTINGS)
    RUNS["plain-shortcut" if plain is not None else "plain-rules"] += 1


def test_a_plain_pod_and_its_reinjection_take_the_shortcut():
    volume = build_volume(SLOTTED, settings=SETTINGS)
    assert plain_pod(INJECTED_PLAIN["spec"], meta=INJECTED_PLAIN["metadata"], volume=volume,
                     settings=SETTINGS) == ("", [("/spec/containers/0",
                                                  INJECTED_PLAIN["spec"]["containers"][0])],
                                            (("/spec/containers/0", ""),))
    fresh = pod()
    assert plain_pod(fresh["spec"], meta=fresh["metadata"], volume=volume,
                     settings=SETTINGS) == (
        None, [("/spec/containers/0", fresh["spec"]["containers"][0])],
        (("/spec/containers/0", None),))


@pytest.fixture(scope="module", autouse=True)
def report_examples():
    yield
    print(f"\nHypothesis examples run: {dict(RUNS)}")
    if RUNS["plain-shortcut"] + RUNS["plain-rules"]:
        # The shortcut's property holds it to the rules only if its Pods take both ways.
        assert RUNS["plain-shortcut"] and RUNS["plain-rules"], dict(RUNS)


@given(st.text(alphabet="/.ab~-", max_size=24) | st.none() | st.integers())
def test_a_mount_path_normalises_as_the_kubelet_resolves_it(path):
    # The fast path for already-normal paths must agree with normpath everywhere.
    import posixpath

    from webhook.injection import normalize_path
    assert normalize_path(path) == posixpath.normpath("/" + str(path or "/").lstrip("/"))


def test_every_property_test_runs_without_timing_checks_and_keeps_its_examples():
    # A loaded machine must not fail a property (tests/conftest.py): no @settings may
    # bring back a deadline or the too_slow health check, or cut the examples.
    import test_metrics
    tests = {f"{module.__name__}.{name}": test
             for module in (sys.modules[__name__], test_decoding, test_metrics)
             for name, test in vars(module).items()
             if getattr(test, "is_hypothesis_test", False)}
    assert len(tests) >= 6, sorted(tests)
    for name, test in tests.items():
        chosen = test._hypothesis_internal_use_settings
        assert chosen.deadline is None, name
        assert HealthCheck.too_slow in chosen.suppress_health_check, name
        assert chosen.max_examples >= 100, name
