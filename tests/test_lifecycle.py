"""Key lifecycle decisions (pure): listing, rotation, staleness, retirement, import."""

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from webhook.config import Settings
from webhook.lifecycle import (
    build_key_rows,
    build_pod_key_state,
    format_age,
    format_table,
    import_helm_values,
    legacy_pins,
    newest_key_too_old,
    pods_mounting,
    restart_command,
)

from builders import key_secret, keyring_of, pod, random_key, slot_secret

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_key_rows_list_every_key_by_number_with_its_state_then_every_invalid_secret():
    ring = keyring_of(key_secret("b", random_key(), index=3), key_secret("a", random_key()),
                      key_secret("gone", None, index=2,
                                 annotations={"keymount.io/retired": "2026-11-01"}),
                      key_secret("bad", b"short"))
    rows = [r.as_dict() for r in build_key_rows(ring, now=NOW)]
    assert [(r["file"], r["secret"], r["index"], r["state"]) for r in rows[:3]] == [
        ("encryption-key-1", "a", "-", "older, legacy"), ("-", "gone", "2", "retired"),
        ("encryption-key-3", "b", "3", "active")]
    assert rows[3]["state"].startswith("invalid: field 'encryption-key' holds 5 bytes")
    assert rows[3]["fingerprint"] == "-" and len(rows[0]["fingerprint"]) == 6


def test_key_rows_flag_both_keys_of_a_duplicate_number():
    ring = keyring_of(key_secret("x", random_key(), index=1),
                      key_secret("y", random_key(), index=1))
    assert [r.state for r in build_key_rows(ring, now=NOW)] == ["duplicate", "duplicate"]


def test_pins_stamp_legacy_keys_at_the_numbers_they_have_now():
    ring = keyring_of(key_secret("b", random_key(), created="2026-02-01T00:00:00Z"),
                      key_secret("a", random_key(), created="2026-01-01T00:00:00Z"),
                      key_secret("c", random_key(), index=3))
    assert legacy_pins(ring) == [("a", 1), ("b", 2)]


@pytest.mark.parametrize(("seconds", "shown"), [(5, "5s"), (130, "2m"), (7300, "2h"),
                                                (86400 * 91, "91d")])
def test_ages_read_like_kubectl(seconds, shown):
    assert format_age(NOW - timedelta(seconds=seconds), NOW) == shown


def test_a_namespace_whose_newest_key_is_older_than_max_key_age_is_flagged():
    ring = keyring_of(key_secret("old", random_key(), created="2026-01-01T00:00:00Z"))
    assert newest_key_too_old(ring, max_age=timedelta(days=90), now=NOW)
    assert not newest_key_too_old(ring, max_age=timedelta(days=365), now=NOW)
    assert not newest_key_too_old(ring, max_age=None, now=NOW)


@pytest.mark.parametrize(("indexes", "expected"), [
    ((), 1), ((None, None), 3), ((1, 2), 3), ((5, None), 6),
], ids=["empty", "no-indexes", "consecutive", "gap"])
def test_rotation_takes_the_number_after_the_highest_in_use(indexes, expected):
    ring = keyring_of(*[key_secret(f"k{i}", random_key(), index=ix)
                        for i, ix in enumerate(indexes)])
    assert ring.next_number == expected


def test_an_invalid_secret_index_counts_too_so_fixing_it_later_cannot_collide():
    ring = keyring_of(key_secret("k1", random_key(), index=1),
                      key_secret("broken", b"x", index=7))
    assert ring.next_number == 8


def injected_pod(ring, name="api-0", *, terminating=False):
    """A Pod as keymount injected it with `ring`: volume (slots included) and status."""
    from webhook.config import Settings
    from webhook.injection import inject_keys
    obj = inject_keys(pod(name=name), keyring=ring, settings=Settings()).apply(pod(name=name))
    obj["metadata"]["namespace"] = "shop"
    if terminating:
        obj["metadata"]["deletionTimestamp"] = "2026-11-29T00:00:00Z"
    return obj


def test_a_pod_started_before_a_rotation_gets_the_new_key_live_through_its_slot():
    k1 = key_secret("k1", random_key(), index=1)
    rotated = key_secret("keymount-key-2", random_key(), index=2)
    old = injected_pod(keyring_of(k1, slot_secret(2)), terminating=True)
    state = build_pod_key_state(old, keyring_of(k1, rotated))
    assert state.state == "updating" and state.terminating
    # Started before the namespace had slots: it lists none, so it needs a restart.
    before_slots = build_pod_key_state(injected_pod(keyring_of(k1)), keyring_of(k1, rotated))
    assert before_slots.state == "stale" and before_slots.live == ()
    assert state.missing[0].startswith("keymount-key-2 (") and state.live == state.missing


def test_a_key_added_under_another_name_reaches_a_running_pod_only_by_a_restart():
    k1, k2 = key_secret("k1", random_key(), index=1), key_secret("k2", random_key(), index=2)
    state = build_pod_key_state(injected_pod(keyring_of(k1)), keyring_of(k1, k2))
    assert state.state == "stale" and state.missing[0].startswith("k2 (") and state.live == ()


def test_a_pod_holding_a_retired_key_gets_nothing_live_and_a_current_one_is_current():
    k1, k2 = key_secret("k1", random_key(), index=1), key_secret("k2", random_key(), index=2)
    both = injected_pod(keyring_of(k1, k2))
    k3 = key_secret("keymount-key-3", random_key(), index=3)
    state = build_pod_key_state(both, keyring_of(k2, k3))
    assert state.removed[0].startswith("k1 (") and state.live == ()
    assert state.state == "stale"
    assert build_pod_key_state(both, keyring_of(k1, k2)).state == "current"


def test_replacing_a_keys_bytes_under_the_same_name_makes_pods_stale():
    k1 = key_secret("k1", random_key(), index=1)
    old = injected_pod(keyring_of(k1))
    assert build_pod_key_state(old, keyring_of(key_secret("k1", random_key(), index=1))
                               ).state == "stale"


def test_a_pod_without_status_annotation_is_not_judged():
    assert build_pod_key_state(pod(), keyring_of()) is None


def test_retire_finds_pending_running_and_terminating_pods_that_project_the_secret():
    def with_volume(name, secrets, phase="Running"):
        return {"metadata": {"name": name}, "status": {"phase": phase},
                "spec": {"volumes": [{"name": "keymount-encryption-keys", "projected": {
                    "sources": [{"secret": {"name": s}} for s in secrets]}}]}}
    pods = [with_volume("a", ["k1", "k2"]), with_volume("b", ["k2"]),
            with_volume("done", ["k1"], phase="Succeeded"),
            with_volume("starting", ["k1"], phase="Pending")]
    pods.append(with_volume("stopping", ["k1"]))
    pods[-1]["metadata"]["deletionTimestamp"] = "2026-11-29T00:00:00Z"
    assert pods_mounting(pods, "k1") == ["a", "starting", "stopping"]
    assert pods_mounting(pods, "k2") == ["a", "b"]


@pytest.mark.parametrize(("kind", "command"), [
    ("Deployment", "kubectl rollout restart deployment/api -n shop"),
    ("StatefulSet", "kubectl rollout restart statefulset/api -n shop"),
    ("Pod", "kubectl delete pod api -n shop"),
])
def test_restart_commands_name_the_workload(kind, command):
    assert restart_command(kind, "api", "shop").startswith(command)


def test_tables_align_columns_under_upper_case_headers():
    text = format_table(["file", "secret"], [["encryption-key-1", "a"], ["-", "longer-name"]])
    assert text.splitlines() == ["FILE               SECRET",
                                 "encryption-key-1   a",
                                 "-                  longer-name"]


# --- the old Helm chart -------------------------------------------------------------------

def values(key):
    return {"secrets": {"keysEncryption": {"userEncryptionKey": key}}}


def test_a_valid_chart_key_becomes_a_labelled_manifest_at_index_1():
    key = base64.b64encode(random_key()).decode()
    result = import_helm_values(values(key), name="encryption-key-1", namespace="shop",
                                settings=Settings())
    manifest = result.manifest
    assert manifest["metadata"]["annotations"] == {"keymount.io/key-index": "1",
                                                   "keymount.io/numbers-used": "1"}
    assert manifest["metadata"]["labels"] == {"keymount.io/encryption-key": "true"}
    assert base64.b64decode(manifest["data"]["encryption-key"]).decode() == key
    assert not (result.warning or result.refusal or result.explanation)


@pytest.mark.parametrize("empty", ["", "  ", None], ids=["empty", "blank", "absent"])
def test_an_empty_chart_key_is_explained_not_carried_over(empty):
    result = import_helm_values(values(empty), name="k", namespace="shop", settings=Settings())
    assert result.manifest is None
    assert "generated a key at template time" in result.explanation


def test_a_31_byte_chart_key_is_refused_with_its_length():
    key = base64.b64encode(random_key()[:31]).decode()
    result = import_helm_values(values(key), name="k", namespace="shop", settings=Settings())
    assert result.manifest is None and "base64 of 31 bytes" in result.refusal


def test_a_passphrase_like_chart_key_is_imported_with_a_warning():
    result = import_helm_values(values("correct horse battery staple 123"), name="k",
                                namespace="shop", settings=Settings())
    assert result.manifest is not None and "passphrase" in result.warning


def test_the_ca_bundle_patch_sets_every_webhook_of_the_manifests():
    import yaml

    from webhook.certs import build_ca_bundle_patch
    docs = list(yaml.safe_load_all(build_ca_bundle_patch("QUJD")))
    hooks = {h["name"]: h["clientConfig"]["caBundle"] for d in docs for h in d["webhooks"]}
    assert hooks == {"inject.keymount.io": "QUJD", "numbers.keymount.io": "QUJD",
                     "pods.keymount.io": "QUJD", "secrets.keymount.io": "QUJD",
                     "policies.keymount.io": "QUJD"}


def test_the_shipped_ca_bundle_patch_names_every_webhook():
    # A webhook missing here keeps the base's empty caBundle: the API server cannot
    # call it and, failing closed, refuses everything it matches.
    import yaml

    from webhook.certs import WEBHOOKS
    from webhook.names import as_dict
    path = Path(__file__).resolve().parents[1] / "manifests/ca-bundle.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    assert {d["kind"]: [h["name"] for h in as_dict(d).get("webhooks", [])]
            for d in docs} == WEBHOOKS


# --- keys rotate --restart ----------------------------------------------------------------

def deployment(**status):
    return {"metadata": {"generation": 2}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 2, **status}}


@pytest.mark.parametrize(("obj", "state"), [
    (deployment(updatedReplicas=2, replicas=2, availableReplicas=2), "done"),
    ({**deployment(), "status": {"observedGeneration": 1}}, "waiting"),
    (deployment(updatedReplicas=1, replicas=2, availableReplicas=2), "waiting"),
    (deployment(updatedReplicas=2, replicas=3, availableReplicas=2), "waiting"),
    (deployment(updatedReplicas=2, replicas=2, availableReplicas=1), "waiting"),
    (deployment(conditions=[{"type": "Progressing", "reason": "ProgressDeadlineExceeded",
                             "message": "ReplicaSet api-2 has timed out"}]), "failed"),
], ids=["complete", "generation-not-observed", "updating", "old-pods-terminating",
        "unavailable", "deadline-exceeded"])
def test_a_deployment_rollout_is_judged_as_kubectl_rollout_status_does(obj, state):
    from webhook.lifecycle import rollout_state
    assert rollout_state("Deployment", obj)[0] == state


@pytest.mark.parametrize(("kind", "status", "state"), [
    ("StatefulSet", {"readyReplicas": 2, "currentRevision": "a", "updateRevision": "a"}, "done"),
    ("StatefulSet", {"readyReplicas": 2, "currentRevision": "a", "updateRevision": "b"},
     "waiting"),
    ("DaemonSet", {"desiredNumberScheduled": 1, "updatedNumberScheduled": 1,
                   "numberAvailable": 1}, "done"),
    ("DaemonSet", {"desiredNumberScheduled": 2, "updatedNumberScheduled": 1,
                   "numberAvailable": 2}, "waiting"),
], ids=["sts-done", "sts-old-revision", "ds-done", "ds-updating"])
def test_statefulset_and_daemonset_rollouts_are_judged_too(kind, status, state):
    from webhook.lifecycle import rollout_state
    assert rollout_state(kind, deployment(**status))[0] == state


def test_restart_targets_are_the_workloads_whose_pods_started_without_the_new_key():
    from webhook.lifecycle import restart_targets
    k1 = key_secret("k1", random_key(), index=1)
    k2 = key_secret("keymount-key-2", random_key(), index=2)

    def owned(name, ring, kind, owner):
        obj = injected_pod(ring, name)
        obj["metadata"]["ownerReferences"] = [{"kind": kind, "name": owner, "controller": True}]
        return obj
    pods = [owned("api-1", keyring_of(k1), "ReplicaSet", "api-5d9c"),
            owned("api-2", keyring_of(k1, k2), "ReplicaSet", "api-77aa"),
            owned("db-0", keyring_of(k1), "StatefulSet", "db"),
            owned("job-x", keyring_of(k1), "Job", "migrate"),
            owned("mallory", keyring_of(k1), "StatefulSet", "payments-db"),
            injected_pod(keyring_of(k1), "bare")]
    controllers = {"api-1": ("Deployment", "api"), "api-2": ("Deployment", "api"),
                   "db-0": ("StatefulSet", "db"), "job-x": ("Job", "migrate"),
                   "mallory": None}  # its reference does not check out
    workloads, others = restart_targets(
        pods, "keymount-key-2",
        controller_of=lambda pod: controllers[pod["metadata"]["name"]])
    assert workloads == [("Deployment", "api"), ("StatefulSet", "db")]
    assert others == ["kubectl delete pod bare -n shop  # a bare Pod: recreate it",
                      "kubectl delete pod mallory -n shop  # a bare Pod: recreate it",
                      "restart job/migrate -n shop"]


def owner_object(uid="u-1", selector=None) -> dict:
    return {"metadata": {"name": "db", "uid": uid},
            "spec": {"selector": {"matchLabels": {"app": "db"}} if selector is None
                     else selector}}


@pytest.mark.parametrize(("owner", "uid", "labels", "expected"), [
    pytest.param(owner_object(), "u-1", {"app": "db"}, True, id="its-uid-and-selected"),
    pytest.param(owner_object(), "u-2", {"app": "db"}, False, id="another-objects-uid"),
    pytest.param(owner_object(), "", {"app": "db"}, False, id="no-uid"),
    pytest.param(owner_object(), "u-1", {"app": "api"}, False, id="not-selected"),
    pytest.param(owner_object(selector={"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["db", "cache"]}]}), "u-1",
        {"app": "cache"}, True, id="selected-by-expression"),
    pytest.param(owner_object(selector={"matchLabels": {"app": 7}}), "u-1", {"app": "db"},
                 False, id="a-selector-that-cannot-be-read"),
])
def test_an_owner_controls_a_pod_only_with_its_uid_and_a_selector_that_selects_it(
        owner, uid, labels, expected):
    from webhook.lifecycle import controls
    assert controls(owner, uid=uid, pod={"metadata": {"labels": labels}}) is expected


def test_key_rows_show_a_staged_key_at_its_staged_file_with_its_fingerprint():
    from webhook.keys import fingerprint_key
    key = random_key()
    staged = slot_secret(2)
    staged["data"]["staged-encryption-key"] = base64.b64encode(key).decode()
    ring = keyring_of(key_secret("keymount-key-1", random_key(), index=1), staged,
                      slot_secret(3))
    rows = [(r.file, r.secret, r.state, r.fingerprint) for r in build_key_rows(ring, now=NOW)]
    assert rows[1:] == [("staged/encryption-key-2", "keymount-key-2", "staged",
                         fingerprint_key(key)),
                        ("-", "keymount-key-3", "slot", "-")]
    assert rows[0][2] == "active"


@pytest.mark.parametrize(("activated", "too_old"), [
    ("2026-05-31T00:00:00Z", False), (None, True), ("2025-01-01T00:00:00Z", True),
], ids=["filled-yesterday", "never-stamped", "activated-long-ago"])
def test_a_keys_age_counts_from_its_activation_not_from_its_slots_creation(activated,
                                                                           too_old):
    # Slots are reserved in advance: a key that filled a year-old slot yesterday is new.
    annotations = {"keymount.io/numbers-used": "1"}
    if activated:
        annotations["keymount.io/activated-at"] = activated
    ring = keyring_of(key_secret("keymount-key-1", random_key(), index=1,
                                 created="2025-06-01T00:00:00Z", annotations=annotations))
    assert newest_key_too_old(ring, max_age=timedelta(days=90), now=NOW) is too_old
