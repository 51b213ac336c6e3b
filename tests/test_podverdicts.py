"""The webhook's remembered verdicts on backend Pods (webhook/podverdicts.py): always the
verdict decided afresh, bounded, and never used across keyrings, settings or the age of
the newest key."""

from __future__ import annotations

import gc
import json
import weakref
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.admission import parse_review
from webhook.config import CONTAINERS_ANNOTATION, STATUS_ANNOTATION, Settings
from webhook.decisions import View, inject_pod
from webhook.injection import inject_keys
from webhook.podverdicts import MAX_CONTENT, MAX_VERDICT, PodVerdicts, pod_content, verdict_size

from builders import container, key_secret, keyring_of, pod, random_key, review
from strategies import json_values

SETTINGS = Settings()
AGING = Settings(max_key_age=timedelta(days=90))
KEYRING = keyring_of(key_secret("k1", random_key(), index=1, created="2026-01-01T00:00:00Z"))
ROTATED = keyring_of(key_secret("k1", random_key(), index=1, created="2026-01-01T00:00:00Z"),
                     key_secret("k2", random_key(), index=2, created="2026-01-02T00:00:00Z"))
EMPTY = keyring_of()
EARLY = datetime(2026, 2, 1, tzinfo=UTC)  # the newest key is younger than 90 days
LATE = datetime(2026, 6, 1, tzinfo=UTC)  # and older


def request_of(obj: object):
    """The request as the webhook decodes it: the remembered verdicts rely on it."""
    return parse_review(json.dumps(review(obj)).encode())  # type: ignore[arg-type]


def verdict(obj: object, memo: PodVerdicts | None, *, keyring=KEYRING, settings=SETTINGS,
            now: datetime | None = None):
    return inject_pod(request_of(obj), View(keyring, settings, now=now, pod_verdicts=memo))


# Values the rules tell apart that `==` does not (True == 1 == 1.0), and the types a
# direct client may send where the API server would send another.
flags = st.sampled_from([True, False, 1, 0, 1.0, 0.0, None, "true"])
security = st.fixed_dictionaries({}, optional={
    "runAsUser": st.sampled_from([0, 1, 0.0, 1.0, False, True, None]),
    "runAsNonRoot": flags, "fsGroup": st.sampled_from([0, 0.0, False, None, 2])})
mounts = st.fixed_dictionaries({"name": st.sampled_from(["keymount-encryption-keys", "data"]),
                                "mountPath": st.sampled_from(["/encryption-keys", "/data"])},
                               optional={"readOnly": flags})
containers = st.fixed_dictionaries({"name": st.sampled_from(["app", "proxy", 1, True])},
                                   optional={"securityContext": security,
                                             "volumeMounts": st.lists(mounts, max_size=2)})
# The review's parser takes metadata only as an object and annotations only as strings.
annotation_values = st.sampled_from(["app", "proxy", "app,proxy", "", " , ", "[]"])
metadata = st.one_of(
    st.none(),
    st.fixed_dictionaries({"labels": st.just({"app.kubernetes.io/component": "backend"})},
                          optional={"name": st.sampled_from(["api-0", "api-1"]),
                                    "annotations": st.none() | st.dictionaries(
                                        st.sampled_from([CONTAINERS_ANNOTATION,
                                                         STATUS_ANNOTATION, "note"]),
                                        annotation_values, max_size=3)}))
pods = st.fixed_dictionaries({"metadata": metadata, "spec": st.fixed_dictionaries(
    {"containers": st.lists(containers, min_size=1, max_size=2) | json_values},
    optional={"initContainers": st.lists(containers, max_size=1),
              "securityContext": security,
              "volumes": st.lists(st.fixed_dictionaries(
                  {"name": st.sampled_from(["keymount-encryption-keys", "data"])}),
                  max_size=2)})})
# Admissions in a row, each with the keyring, settings and clock it is decided on: few
# values, so that one memory meets the same and nearly the same Pods again.
admissions = st.lists(st.tuples(
    pods, st.sampled_from([KEYRING, ROTATED, EMPTY]), st.sampled_from([SETTINGS, AGING]),
    st.sampled_from([None, EARLY, LATE])), min_size=1, max_size=12)


@settings(max_examples=500)
@given(admissions=admissions, size=st.integers(1, 4))
def test_a_remembered_verdict_is_the_verdict_decided_afresh(admissions, size):
    memo = PodVerdicts(size)
    for obj, keyring, chosen, now in admissions:
        afresh = verdict(obj, None, keyring=keyring, settings=chosen, now=now)
        remembered = verdict(obj, memo, keyring=keyring, settings=chosen, now=now)
        assert remembered == afresh
        assert len(memo) <= size


def test_the_next_pod_of_a_workload_is_answered_from_memory():
    memo = PodVerdicts()
    first = verdict(pod(name="api-0", annotations={"note": "a"}), memo)
    # Another name, another label, another value of an annotation the rules do not read:
    # the same verdict.
    second = verdict(pod(name="api-1", labels={"app.kubernetes.io/component": "backend",
                                               "pod-template-hash": "x"},
                         annotations={"note": "b"}), memo)
    assert first.result == "injected"
    assert second is first and len(memo) == 1


@pytest.mark.parametrize(("before", "after"), [
    pytest.param({}, {"keyring": ROTATED}, id="a-rotated-keyring"),
    pytest.param({}, {"settings": Settings(mount_path="/keys")}, id="other-settings"),
    pytest.param({"settings": AGING, "now": EARLY}, {"settings": AGING, "now": LATE},
                 id="the-newest-key-past-its-age"),
])
def test_a_verdict_is_not_used_for_another_keyring_settings_or_key_age(before, after):
    memo = PodVerdicts()
    kept = verdict(pod(), memo, **before)
    other = verdict(pod(), memo, **after)
    assert other != kept and other == verdict(pod(), None, **after)
    assert len(memo) == 2


def test_the_age_warning_follows_the_clock_both_ways():
    memo = PodVerdicts()
    young = verdict(pod(), memo, settings=AGING, now=EARLY)
    old = verdict(pod(), memo, settings=AGING, now=LATE)
    assert not any("--max-key-age" in w for w in young.response.get("warnings", []))
    assert any("--max-key-age" in w for w in old.response["warnings"])
    assert verdict(pod(), memo, settings=AGING, now=EARLY) is young


@pytest.mark.parametrize(("one", "other"), [
    pytest.param(True, 1, id="true-and-1"), pytest.param(1, 1.0, id="1-and-1.0"),
    pytest.param(False, 0, id="false-and-0")])
def test_values_equal_under_eq_are_remembered_apart(one, other):
    # runAsNonRoot true earns the fsGroup warning; 1 (not a boolean) does not.
    def runs_as(value: object) -> dict:
        return pod(container("app", securityContext={"runAsNonRoot": value}))
    memo = PodVerdicts()
    assert verdict(runs_as(one), memo) == verdict(runs_as(one), None)
    assert verdict(runs_as(other), memo) == verdict(runs_as(other), None)
    assert len(memo) == 2


def test_at_most_size_verdicts_are_kept_and_the_oldest_goes_first():
    memo = PodVerdicts(3)
    first = verdict(pod(container("c0")), memo)
    for n in range(1, 6):
        verdict(pod(container(f"c{n}")), memo)
    assert len(memo) == 3
    again = verdict(pod(container("c0")), memo)
    assert again is not first and again == first
    assert verdict(pod(container("c5")), memo) is verdict(pod(container("c5")), memo)


@pytest.mark.parametrize("spec", [
    # Fields the review's decoder keeps (webhook/decoding.py).
    pytest.param({"containers": [container("x" * MAX_CONTENT)]}, id="longer-than-MAX_CONTENT"),
    pytest.param({"containers": [container("app", securityContext={"runAsUser": 2**70})]},
                 id="an-integer-past-64-bits"),
])
def test_a_pod_that_cannot_be_named_exactly_is_decided_afresh(spec):
    obj = {**pod(), "spec": spec}
    request = request_of(obj)
    assert pod_content(request.object, keyring=KEYRING, settings=SETTINGS, aged=False) is None
    memo = PodVerdicts()
    assert verdict(obj, memo).result == "injected"
    assert len(memo) == 0


def test_a_pod_that_is_not_a_backend_pod_is_skipped_and_not_kept():
    memo = PodVerdicts()
    assert verdict(pod(labels={"app": "web"}), memo).result == "skipped"
    assert len(memo) == 0


def test_a_refusal_is_remembered_as_the_refusal():
    memo = PodVerdicts()
    denied = verdict(pod(), memo, keyring=EMPTY)
    assert denied.result == "denied" and verdict(pod(), memo, keyring=EMPTY) is denied


@pytest.mark.parametrize(("one", "other"), [
    pytest.param({"metadata": None}, {"metadata": {"annotations": None}},
                 id="no-metadata-and-no-annotations"),
    pytest.param({"metadata": {"annotations": None}}, {"metadata": {"annotations": {}}},
                 id="no-annotations-and-none-set"),
    pytest.param({"metadata": {"annotations": {}}},
                 {"metadata": {"annotations": {STATUS_ANNOTATION: KEYRING.status}}},
                 id="without-and-with-the-status-annotation"),
])
def test_pods_the_rules_decide_apart_are_never_named_alike(one, other):
    # Some only reach inject_keys from the CLI (a backend Pod has metadata), but
    # pod_content names them apart all the same.
    spec = {"containers": [container("app")]}
    one, other = {**one, "spec": spec}, {**other, "spec": spec}
    assert inject_keys(one, keyring=KEYRING, settings=SETTINGS) \
        != inject_keys(other, keyring=KEYRING, settings=SETTINGS)
    assert pod_content(one, keyring=KEYRING, settings=SETTINGS, aged=False) \
        != pod_content(other, keyring=KEYRING, settings=SETTINGS, aged=False)


def test_a_remembered_verdict_does_not_keep_its_keyring_alive():
    keyring = keyring_of(key_secret("k1", random_key(), index=1))
    memo = PodVerdicts()
    verdict(pod(), memo, keyring=keyring)
    assert len(memo) == 1
    alive = weakref.ref(keyring)
    del keyring
    gc.collect()
    assert alive() is None


def test_an_entry_answers_only_its_own_keyring_even_under_its_id():
    # What a keyring collected and another allocated at its address would look like.
    memo = PodVerdicts()
    request = request_of(pod())
    content = pod_content(request.object, keyring=KEYRING, settings=SETTINGS, aged=False)
    assert content is not None
    memo.keep(content, verdict(pod(), None), keyring=KEYRING, settings=SETTINGS)
    assert memo.get(content, keyring=KEYRING, settings=SETTINGS) is not None
    assert memo.get(content, keyring=ROTATED, settings=SETTINGS) is None
    assert memo.get(content, keyring=KEYRING, settings=AGING) is None


def test_a_verdict_larger_than_MAX_VERDICT_is_decided_afresh():
    many = keyring_of(*(key_secret(f"k{n}", random_key(), index=n) for n in range(1, 121)))
    memo = PodVerdicts()
    large = verdict(pod(), memo, keyring=many)
    assert large.result == "injected" and verdict_size(large) > MAX_VERDICT
    assert len(memo) == 0
    assert verdict_size(verdict(pod(), memo)) <= MAX_VERDICT and len(memo) == 1
