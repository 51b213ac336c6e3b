"""AdmissionReview parsing and the /mutate and /validate decisions (pure)."""

import base64
import json

import jsonpatch
import pytest

from webhook.admission import MalformedReview, complete, parse_review
from webhook.config import Settings
from webhook.decisions import review_mutation, review_validation

from builders import container, key_secret, keyring_of, pod, random_key, review

SETTINGS = Settings()
KEYRING = keyring_of(key_secret("key-a", random_key(), index=1),
                     key_secret("key-b", random_key(), index=2))


def parse(obj) -> object:
    return parse_review(json.dumps(obj).encode())


def mutate(body, keyring=KEYRING):
    return review_mutation(parse(body), keyring=keyring, settings=SETTINGS)


def validate(body, keyring=KEYRING):
    return review_validation(parse(body), keyring=keyring, settings=SETTINGS)


def patched_object(body, verdict):
    ops = json.loads(base64.b64decode(verdict.response["patch"]))
    return jsonpatch.apply_patch(body["request"]["object"], ops)


@pytest.mark.parametrize(("body", "error"), [
    (b"{not json", "not valid JSON"),
    (b"[]", "not an AdmissionReview"),
    (json.dumps({"kind": "Pod"}).encode(), "not an AdmissionReview"),
    (json.dumps({"kind": "AdmissionReview", "apiVersion": "v2"}).encode(), "apiVersion"),
    (json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}).encode(),
     "no request"),
    (json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
                 "request": {"kind": {"kind": "Pod"}, "operation": "CREATE"}}).encode(),
     "no uid"),
    (json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
                 "request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "EAT"}}).encode(),
     "operation"),
    (json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
                 "request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE",
                             "object": [1]}}).encode(), "request.object"),
    (json.dumps(review(pod(), operation="UPDATE", old={"metadata": "x"})).encode(),
     r"request.oldObject.metadata is not an object"),
    (json.dumps(review(pod(labels={"app.kubernetes.io/component": ["backend"]}))).encode(),
     r"request.object.metadata.labels is not a map of strings"),
    (json.dumps(review(pod(annotations={"keymount.io/containers": 1}))).encode(),
     r"request.object.metadata.annotations is not a map of strings"),
], ids=["bad-json", "json-array", "wrong-kind", "wrong-version", "no-request", "no-uid",
        "bad-operation", "object-not-a-map", "metadata-not-a-map", "label-not-a-string",
        "annotation-not-a-string"])
def test_a_malformed_review_is_refused_with_the_reason(body, error):
    with pytest.raises(MalformedReview, match=error):
        parse_review(body)


def test_a_backend_pod_gets_a_jsonpatch_that_applies_to_the_request_object():
    body = review(pod())
    verdict = mutate(body)
    assert verdict.result == "injected"
    answer = complete(parse(body), verdict.response)["response"]
    assert answer["uid"] == "0f6a2b1e-uid" and answer["allowed"] is True
    assert "uid" not in verdict.response  # set once, by complete()
    assert verdict.response["patchType"] == "JSONPatch"
    result = patched_object(body, verdict)
    assert result["spec"]["volumes"][0]["name"] == "keymount-encryption-keys"


def test_audit_annotations_list_files_and_fingerprints():
    verdict = mutate(review(pod()))
    audit = json.loads(verdict.response["auditAnnotations"]["encryption-keys"])
    assert [a["secret"] for a in audit] == ["key-a", "key-b"]
    assert all(len(a["fingerprint"]) == 6 for a in audit)


@pytest.mark.parametrize("body", [
    review(pod(labels={"app": "web"})),
    review(pod(), operation="UPDATE", old=pod()),
    review({"kind": "Service"}, kind="Service"),
    review(pod(), operation="DELETE"),
], ids=["not-backend", "update", "not-a-pod", "delete"])
def test_anything_but_a_backend_pod_create_is_allowed_without_patch(body):
    verdict = mutate(body, keyring=keyring_of())
    assert verdict.result == "skipped"
    assert verdict.response == {"allowed": True}


def test_a_denial_is_403_with_the_message_and_marks_key_state():
    verdict = mutate(review(pod()), keyring=keyring_of())
    assert verdict.response["allowed"] is False
    assert verdict.response["status"]["code"] == 403
    assert "keymount keys create" in verdict.response["status"]["message"]
    assert verdict.key_state is True


def test_a_mount_conflict_is_not_key_state():
    obj = pod(container("app", volumeMounts=[{"name": "v", "mountPath": "/encryption-keys"}]))
    verdict = mutate(review(obj))
    assert verdict.result == "denied" and verdict.key_state is False


def test_v1beta1_reviews_are_answered_too():
    assert parse(review(pod(), api_version="admission.k8s.io/v1beta1")).api_version == \
        "admission.k8s.io/v1beta1"


# --- /validate: the final Pod (docs/contract.md) --------------------------------------------------

def final_pod(obj=None, keyring=KEYRING):
    obj = obj or pod()
    return patched_object(review(obj), mutate(review(obj), keyring=keyring))


def test_a_pod_as_keymount_injected_it_passes_validation():
    assert validate(review(final_pod())).result == "allowed"


KEYS = [key_secret("key-a", random_key(), index=1), key_secret("key-b", random_key(), index=2),
        key_secret("key-d", random_key(), index=9)]


@pytest.mark.parametrize(("made", "number", "allowed"), [
    ("2026-12-02T13:00:00Z", 10, True), ("2026-12-02T12:00:00Z", 10, False),
    ("2026-12-02T13:00:00Z", 4, False), (None, 10, False)],
    ids=["made-a-moment-before", "made-an-hour-before", "numbered-below-a-listed-key",
         "the-pod-has-no-creation-time"])
def test_a_pod_validated_after_a_key_was_added_still_passes(made, number, allowed):
    """The mutating webhook lists every key it saw: a key numbered above all it listed,
    made around the Pod's creation (which the API server stamps before validating),
    came after it. Any other missing key is refused."""
    older_pod = final_pod(keyring=keyring_of(*KEYS))
    if made is not None:
        older_pod["metadata"]["creationTimestamp"] = "2026-12-02T13:00:30Z"
    added = key_secret("key-c", random_key(), index=number, created=made or "2026-12-02T13:00:00Z")
    verdict = validate(review(older_pod), keyring=keyring_of(*KEYS, added))
    assert (verdict.result == "allowed") is allowed, verdict.message


@pytest.mark.parametrize("tamper", [
    lambda p: p["spec"].pop("volumes"),
    lambda p: p["spec"]["containers"][0].pop("volumeMounts"),
    lambda p: p["spec"]["containers"][0]["volumeMounts"][0].update(readOnly=False),
    lambda p: p["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "evil", "mountPath": "/encryption-keys/x"}),
    lambda p: p["spec"]["volumes"][0]["projected"]["sources"].append(
        {"configMap": {"name": "x"}}),
    lambda p: p["spec"]["volumes"][0]["projected"].update(defaultMode=0o444),
    lambda p: p["spec"]["volumes"][0]["projected"]["sources"][0]["secret"]["items"][0].update(
        path="other"),
    lambda p: p["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "keymount-encryption-keys", "mountPath": "/x", "subPath": "encryption-key-1"}),
    lambda p: p["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "cache", "mountPath": "//encryption-keys"}),
    lambda p: p["spec"]["volumes"][0]["projected"]["sources"].append(
        {"secret": {"name": "other", "optional": True,
                    "items": [{"key": "encryption-key", "path": "encryption-key-9"}]}}),
], ids=["volume-removed", "mount-removed", "mount-writable", "other-volume-under-path",
        "extra-source", "mode-changed", "file-renamed", "second-mount-with-subpath",
        "emptydir-at-double-slash", "optional-source-not-a-slot"])
def test_a_backend_pod_changed_after_injection_is_denied(tamper):
    obj = final_pod()
    tamper(obj)
    verdict = validate(review(obj))
    assert verdict.result == "denied" and verdict.key_state is False
    assert "mutatingwebhookconfigurations" in verdict.message


def test_a_pod_referencing_a_secret_that_is_not_a_valid_key_is_denied_as_key_state():
    obj = final_pod()
    obj["spec"]["volumes"][0]["projected"]["sources"][0]["secret"]["name"] = "not-a-key"
    verdict = validate(review(obj))
    assert verdict.result == "denied" and verdict.key_state is True


def test_a_non_backend_pod_passes_validation_untouched():
    assert validate(review(pod(labels={"app": "web"}))).result == "allowed"
