"""Key integrity through the real API server: stable numbers, the key-Secret guard and
--key-writers. Each attack of a user who may write Secrets is reproduced here first;
afterwards the namespace's keys and the files new Pods get are what they were."""

from __future__ import annotations

import base64
import json
import threading

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from apihelpers import (
    KEY_LABELS,
    OUTPUTS,
    create_key,
    create_pod,
    denial,
    key_material,
    key_sources,
    keymount_cli,
    pod_body,
    random_key,
)
from conftest import KEY_WRITERS
from polling import poll

cli = keymount_cli


@pytest.fixture
def mallory(user_kubeconfig):
    """Full Secret and Pod RBAC everywhere, and no key writer."""
    return client.CoreV1Api(config.new_client_from_config(
        config_file=str(user_kubeconfig("mallory"))))


def snapshot(api, namespace: str) -> dict:
    """The namespace's keys as Secrets and as the files of a new backend Pod."""
    secrets = {s.metadata.name: (dict(s.data or {}), dict(s.metadata.annotations or {}))
               for s in api.list_namespaced_secret(namespace).items
               if (s.metadata.labels or {}).get("keymount.io/encryption-key") == "true"}
    pod = api.create_namespaced_pod(namespace, pod_body(), dry_run="All")
    return {"secrets": secrets, "files": key_sources(pod)}


def three_keys(api, namespace: str, keymount) -> dict:
    for name in ("k1", "k2", "k3"):
        create_key(api, namespace, name)
    poll(lambda: len(snapshot(api, namespace)["files"]) == 3, what="three keys admitted")
    return snapshot(api, namespace)


# --- the attacks of the security review ------------------------------------------------------

def test_a_secret_writer_cannot_plant_a_key_at_number_999(api, mallory, namespace, keymount):
    before = three_keys(api, namespace, keymount)
    message = denial(lambda: create_key(mallory, namespace, "evil", index=999))
    assert "user 'mallory' may not create key Secret 'evil'" in message
    assert KEY_WRITERS.replace(",", ", ") in message
    assert snapshot(api, namespace) == before


def test_a_duplicate_number_is_refused_and_pods_are_still_admitted(api, mallory, namespace,
                                                                  keymount):
    before = three_keys(api, namespace, keymount)
    assert "may not create" in denial(lambda: create_key(mallory, namespace, "dup", index=2))
    # Not even a key writer can give a second key a number in use.
    message = denial(lambda: create_key(api, namespace, "dup", index=2))
    assert "number 2 is already held by key Secret 'k2'" in message
    assert "keymount assigns the next number (4)" in message
    assert snapshot(api, namespace) == before


@pytest.mark.parametrize("who", ["mallory", "admin"])
def test_changing_a_keys_index_is_refused_for_everyone(api, mallory, namespace, keymount, who):
    before = three_keys(api, namespace, keymount)
    actor = mallory if who == "mallory" else api
    message = denial(lambda actor=actor: actor.patch_namespaced_secret("k1", namespace, {
        "metadata": {"annotations": {"keymount.io/key-index": "5"}}}))
    assert "has number 1 for good" in message
    assert snapshot(api, namespace) == before


def test_allow_delete_then_new_bytes_then_unannotate_leaves_the_key_as_it_was(
        api, mallory, namespace, keymount):
    before = three_keys(api, namespace, keymount)
    mallory.patch_namespaced_secret("k1", namespace, {  # harmless metadata: allowed
        "metadata": {"annotations": {"keymount.io/allow-delete": "true"}}})
    for actor in (mallory, api):
        message = denial(lambda actor=actor: actor.patch_namespaced_secret("k1", namespace, {
            "data": {"encryption-key": base64.b64encode(random_key()).decode()}}))
        assert "replaces the key material of key Secret 'k1'" in message
    assert "may not delete" in denial(lambda: mallory.delete_namespaced_secret("k1", namespace))
    assert "Retire it first" in denial(lambda: api.delete_namespaced_secret("k1", namespace))
    mallory.patch_namespaced_secret("k1", namespace, {
        "metadata": {"annotations": {"keymount.io/allow-delete": None}}})
    assert snapshot(api, namespace) == before


# Two keys with one fingerprint (a 3-byte key check value: found in seconds).
VICTIM = bytes.fromhex("3c2df1b74dc2f148bc6f76a17c9df3901acc31b0518d766138fc4038eb1582f7")
FORGED = bytes.fromhex("39f196b74dc2f148bc6f76a17c9df3901acc31b0518d766138fc4038eb1582f7")


def test_a_key_with_the_same_fingerprint_or_frozen_for_good_is_refused(
        api, mallory, namespace, keymount):
    create_key(api, namespace, "k1", key=VICTIM)
    for actor in (mallory, api):
        message = denial(lambda actor=actor: actor.patch_namespaced_secret("k1", namespace, {
            "data": {"encryption-key": base64.b64encode(FORGED).decode()}}))
        assert "replaces the key material of key Secret 'k1'" in message
        message = denial(lambda actor=actor: actor.patch_namespaced_secret(
            "k1", namespace, {"immutable": True}))
        assert "cannot be immutable" in message
    assert "may not change the finalizers of" in denial(
        lambda: mallory.patch_namespaced_secret("k1", namespace, {
            "metadata": {"finalizers": ["example.com/hold"]}}))
    stored = api.read_namespaced_secret("k1", namespace)
    assert base64.b64decode(stored.data["encryption-key"]) == VICTIM
    assert not stored.immutable and not stored.metadata.finalizers


def test_removing_the_key_label_is_refused(api, mallory, namespace, keymount):
    before = three_keys(api, namespace, keymount)
    message = denial(lambda: mallory.patch_namespaced_secret("k1", namespace, {
        "metadata": {"labels": {"keymount.io/encryption-key": None}}}))
    assert "removes the key label" in message
    assert snapshot(api, namespace) == before


def test_retiring_and_deleting_key_1_of_three_moves_no_file_and_never_reuses_1(
        api, namespace, keymount, admin_kubeconfig):
    before = three_keys(api, namespace, keymount)
    assert before["files"] == [("k1", "encryption-key-1"), ("k2", "encryption-key-2"),
                               ("k3", "encryption-key-3")]
    cli(admin_kubeconfig, "keys", "retire", "k1", "-n", namespace, "--yes")
    api.delete_namespaced_secret("k1", namespace)
    after = snapshot(api, namespace)
    assert after["files"] == [("k2", "encryption-key-2"), ("k3", "encryption-key-3")]
    for name in ("k2", "k3"):  # the same bytes behind the same files
        assert after["secrets"][name] == before["secrets"][name]
    assert "number 1 was used before" in denial(
        lambda: create_key(api, namespace, "again", index=1))
    rotated = cli(admin_kubeconfig, "keys", "rotate", "-n", namespace)
    assert "number 4 (file encryption-key-4)" in rotated.stdout
    poll(lambda: ("keymount-key-4", "encryption-key-4") in
         snapshot(api, namespace)["files"], what="key 4 admitted")


def test_no_secret_but_a_key_can_take_a_name_running_pods_list(api, mallory, namespace,
                                                               keymount):
    # The kubelet would mount any Secret of a listed name as the newest key, label or
    # not. Keys created without slots: a Pod lists no optional source at all...
    before = three_keys(api, namespace, keymount)
    pod = create_pod(api, namespace, "listing")
    assert key_sources(pod, optional=True) == []
    # ...so a Secret planted under the next key's name is nobody's file. keymount no
    # longer sees Secrets without the key label (no webhook in front of every Secret).
    mallory.create_namespaced_secret(namespace, {
        "metadata": {"name": "keymount-key-4"},
        "data": {"encryption-key": base64.b64encode(random_key()).decode()}})
    assert "may not create" in denial(lambda: create_key(mallory, namespace, "keymount-key-5"))
    assert snapshot(api, namespace) == before
    assert key_sources(create_pod(api, namespace, "after"), optional=True) == []


# --- who may ----------------------------------------------------------------------------------

def test_a_key_writer_may_create_rotate_and_retire_and_a_secret_admin_may_not(
        api, namespace, keymount, user_kubeconfig):
    bob, mallory = user_kubeconfig("bob"), user_kubeconfig("mallory")
    for args in (["keys", "create", "k1", "--generate"], ["keys", "rotate"],
                 ["keys", "retire", "k1", "--yes"]):
        refused = cli(mallory, *args, "-n", namespace, check=False)
        assert refused.returncode == 1, args
        assert "user 'mallory' may not" in refused.stderr or \
            "no key Secret 'k1'" in refused.stderr, refused.stderr
        cli(bob, *args, "-n", namespace)
    tombstone = api.read_namespaced_secret("k1", namespace)
    assert "keymount.io/retired" in tombstone.metadata.annotations
    assert "encryption-key" not in (tombstone.data or {})
    refused = cli(mallory, "keys", "rotate", "-n", namespace, check=False)
    assert "user 'mallory' may not fill" in refused.stderr  # the next slot
    mallory_api = client.CoreV1Api(config.new_client_from_config(config_file=str(mallory)))
    assert "may not delete" in denial(lambda: mallory_api.delete_namespaced_secret(
        "k1", namespace))
    assert [f for _, f in snapshot(api, namespace)["files"]] == ["encryption-key-2"]


def test_the_stamp_the_dry_run_prediction_and_the_next_pods_file_agree(
        api, namespace, keymount, admin_kubeconfig):
    three_keys(api, namespace, keymount)
    predicted = yaml.safe_load(cli(admin_kubeconfig, "keys", "rotate", "-n", namespace,
                                   "--dry-run", "-o", "yaml").stdout)
    number = predicted["metadata"]["annotations"]["keymount.io/key-index"]
    created = cli(admin_kubeconfig, "keys", "create", "by-hand", "-n", namespace,
                  "--generate", "--dry-run", "-o", "yaml")
    assert yaml.safe_load(created.stdout)["metadata"]["annotations"][
        "keymount.io/key-index"] == number
    assert "encrypt it" in created.stderr
    create_key(api, namespace, "by-hand")  # no index: keymount stamps it
    stamped = api.read_namespaced_secret("by-hand", namespace).metadata.annotations
    assert stamped["keymount.io/key-index"] == number == "4"
    assert stamped["keymount.io/numbers-used"] == "1-4"
    poll(lambda: snapshot(api, namespace)["files"][-1] == ("by-hand", f"encryption-key-{number}"),
         what="the stamped key as the newest file")


def test_two_writers_filling_one_slot_at_the_same_moment_make_one_key(
        api, namespace, keymount, admin_kubeconfig):
    # keymount holds nothing between reviews: the API server takes one write per
    # resourceVersion, so of two fills sent against the slot's version one loses.
    cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate",
        "--rotation-slots", "1")
    slot = api.read_namespaced_secret("keymount-key-2", namespace)
    outcomes: dict[str, object] = {}
    start = threading.Barrier(2)

    def fill(name: str) -> None:
        start.wait()
        try:
            api.patch_namespaced_secret("keymount-key-2", namespace, {
                "metadata": {"resourceVersion": slot.metadata.resource_version},
                "data": {"encryption-key": base64.b64encode(random_key()).decode()}})
            outcomes[name] = "filled"
        except ApiException as exc:
            outcomes[name] = exc.status

    threads = [threading.Thread(target=fill, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(str, outcomes.values())) == ["409", "filled"], outcomes
    numbers = [s.metadata.annotations["keymount.io/key-index"]
               for s in api.list_namespaced_secret(namespace).items
               if (s.data or {}).get("encryption-key")]
    assert sorted(numbers) == ["1", "2"]


def test_a_pod_cannot_become_a_backend_pod_by_a_label_change(api, mallory, namespace,
                                                             keymount):
    create_key(api, namespace, "k1")
    create_pod(mallory, namespace, "web", labels={"app": "web"})
    message = denial(lambda: mallory.patch_namespaced_pod("web", namespace, {
        "metadata": {"labels": {"app.kubernetes.io/component": "backend"}}}))
    assert "cannot become a backend Pod" in message
    backend = create_pod(api, namespace, "api")
    api.patch_namespaced_pod("api", namespace, {"metadata": {"labels": {"tier": "x"}}})
    assert key_sources(backend) == [("k1", "encryption-key-1")]


def hand_made_pod(name: str, sources: list, *, labels: dict) -> dict:
    """A Pod whose author wrote a volume named like keymount's (no webhook sees a Pod
    created without the backend label)."""
    body = pod_body(name, labels=labels)
    body["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "keymount-encryption-keys", "mountPath": "/encryption-keys", "readOnly": True}]
    body["spec"]["volumes"] = [{"name": "keymount-encryption-keys", "projected": {
        "defaultMode": 0o440, "sources": sources}}]
    return body


def test_a_pod_with_a_volume_of_its_own_making_cannot_become_a_backend_pod(
        api, mallory, namespace, keymount):
    """Only the old key: the Pod would encrypt new data with a key rotated away."""
    create_key(api, namespace, "k1")
    create_key(api, namespace, "k2")
    old_key_only = [{"secret": {"name": "k1", "optional": False, "items": [
        {"key": "encryption-key", "path": "encryption-key-1"}]}}]
    mallory.create_namespaced_pod(namespace, hand_made_pod("web", old_key_only,
                                                           labels={"app": "web"}))
    message = denial(lambda: mallory.patch_namespaced_pod("web", namespace, {
        "metadata": {"labels": {"app.kubernetes.io/component": "backend"}}}))
    assert "does not deliver key Secret(s) 'k2'" in message


def test_a_pods_labels_cannot_change_through_its_status(api, mallory, namespace, keymount):
    """keymount's webhooks see Pod updates, not pods/status: the API server keeps a
    status update from changing a Pod's labels."""
    create_key(api, namespace, "k1")
    mallory.create_namespaced_pod(namespace, pod_body("web", labels={"app": "web"}))
    try:
        mallory.patch_namespaced_pod_status("web", namespace, {
            "metadata": {"labels": {"app.kubernetes.io/component": "backend"}}})
    except ApiException as exc:
        assert exc.status in (403, 422), exc.body
    labels = api.read_namespaced_pod("web", namespace).metadata.labels
    assert "app.kubernetes.io/component" not in labels, labels


def test_a_backend_pods_status_annotation_cannot_be_rewritten(api, mallory, namespace,
                                                             keymount):
    create_key(api, namespace, "k1")
    backend = create_pod(api, namespace, "api")
    message = denial(lambda: mallory.patch_namespaced_pod("api", namespace, {
        "metadata": {"annotations": {"keymount.io/status": "[]"}}}))
    assert "keymount.io/status" in message
    mallory.patch_namespaced_pod("api", namespace, {"metadata": {"annotations": {"a": "b"}}})
    stored = api.read_namespaced_pod("api", namespace).metadata.annotations
    assert stored["keymount.io/status"] == backend.metadata.annotations["keymount.io/status"]


def test_a_backend_pod_with_the_keys_cannot_be_relabelled_out_of_keymounts_sight(
        api, mallory, namespace, keymount):
    # Out of the webhooks' objectSelector, an ephemeral container could mount the keys
    # unchecked; the API server sends the relabel because the old Pod matches.
    create_key(api, namespace, "k1")
    create_pod(api, namespace, "api")
    message = denial(lambda: mallory.patch_namespaced_pod("api", namespace, {
        "metadata": {"labels": {"app.kubernetes.io/component": "debugging"}}}))
    assert "stays a backend Pod" in message and "kubectl delete pod api" in message
    labels = api.read_namespaced_pod("api", namespace).metadata.labels
    assert labels["app.kubernetes.io/component"] == "backend"


# --- audit trail -------------------------------------------------------------------------------

def events(api, namespace: str) -> list:
    return api.list_namespaced_event(namespace).items


def test_every_key_operation_logs_the_user_records_events_and_leaks_no_key_byte(
        api, namespace, keymount, user_kubeconfig):
    bob = user_kubeconfig("bob")
    mallory_api = client.CoreV1Api(config.new_client_from_config(
        config_file=str(user_kubeconfig("mallory"))))
    api.create_namespaced_secret(namespace, {
        "metadata": {"name": "dry", "labels": KEY_LABELS},
        "data": {"encryption-key": base64.b64encode(random_key()).decode()}}, dry_run="All")
    cli(bob, "keys", "create", "k1", "-n", namespace, "--generate")
    cli(bob, "keys", "rotate", "-n", namespace)
    cli(bob, "keys", "retire", "k1", "-n", namespace, "--yes")
    denial(lambda: create_key(mallory_api, namespace, "evil"))
    keyless = f"{namespace}-keyless"
    api.create_namespace({"metadata": {"name": keyless}})
    # A ReplicaSet that exists (no replicas: nothing here runs it), and one that does not:
    # an Event names an owner only once keymount has seen it exist, with that uid.
    replica_set = client.AppsV1Api(api.api_client).create_namespaced_replica_set(keyless, {
        "metadata": {"name": "api-5d9c"}, "spec": {
            "replicas": 0, "selector": {"matchLabels": {"app": "api"}},
            "template": {"metadata": {"labels": {"app": "api"}},
                         "spec": {"containers": [{"name": "app", "image": "x"}]}}}})
    for name, uid in (("api-5d9c", replica_set.metadata.uid),
                      ("forged-owner", "2b3c5d7e-0000-4000-8000-000000000001")):
        owned = pod_body(f"{name}-pod")
        owned["metadata"]["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name, "controller": True,
            "uid": uid}]
        denial(lambda owned=owned: api.create_namespaced_pod(keyless, owned))
    denial(lambda: create_pod(api, keyless, "bare"))

    def reasons():
        return {(e.reason, e.involved_object.kind, e.involved_object.name)
                for e in events(api, namespace) + events(api, keyless)}
    wanted = {("KeyCreated", "Secret", "k1"), ("KeyCreated", "Secret", "keymount-key-2"),
              ("KeyRetired", "Secret", "k1"), ("KeyChangeRefused", "Secret", "evil"),
              ("BackendPodRefused", "ReplicaSet", "api-5d9c"),
              ("BackendPodRefused", "Namespace", keyless)}
    poll(lambda: wanted <= reasons(), what=f"events {wanted}")
    assert not any(name == "dry" for _, _, name in reasons())  # never on dryRun
    assert not any(name == "forged-owner" for _, _, name in reasons())
    retired = next(e for e in events(api, namespace) if e.reason == "KeyRetired")
    assert "by bob" in retired.message and "number 1" in retired.message

    def decisions():
        return [line for line in keymount.log_lines()
                if line.get("namespace") == namespace and line.get("kind") == "Secret"
                and line.get("webhook") == "validate"]
    logged = {("k1", "created", "bob"), ("keymount-key-2", "created", "bob"),
              ("k1", "retired", "bob"), ("evil", "refused", "mallory")}
    # Log lines reach the file within the sink's interval (docs/operations.md, "Logs"),
    # an Event may be sooner.
    poll(lambda: logged <= {(d["object"], d.get("key_action"), d["user"])
                            for d in decisions()}, timeout=5, what=f"decision lines {logged}")
    assert all("fingerprint" in d for d in decisions() if d.get("key_action") == "created")

    spellings = key_material(api, namespace)
    assert spellings
    texts = [keymount.log_text(), *OUTPUTS,
             *(e.message for e in events(api, namespace) + events(api, keyless))]
    assert [s for s in spellings for t in texts if s in t] == []


# --- migration -----------------------------------------------------------------------------------

def guarded(api, namespace: str) -> bool:
    """Whether keymount's key-Secret webhooks see the namespace yet (the API server
    learns of namespace labels through its informer)."""
    try:
        api.create_namespaced_secret(namespace, {
            "metadata": {"name": "probe", "labels": KEY_LABELS},
            "stringData": {"encryption-key": "short"}}, dry_run="All")
    except ApiException as exc:
        return exc.status == 403 and "keymount" in exc.body
    return False


def test_a_0_1_namespace_upgraded_in_place_keeps_its_files(api, namespace, keymount,
                                                          admin_kubeconfig):
    # Made as keymount 0.1 made it: `keys create` (no index), then `keys rotate`
    # (index max+1 = 1). keymount 0.1 numbered files by position, Secrets without an
    # index first: first, then rotated. The unguarded label keeps today's key webhooks
    # out, as if keymount 0.1 still ran.
    old = f"{namespace}-v01"
    api.create_namespace({"metadata": {"name": old,
                                       "labels": {"keymount-e2e/unguarded": "1"}}})
    create_key(api, old, "first")
    create_key(api, old, "rotated", index=1)
    assert not any("keymount.io/numbers-used" in (s.metadata.annotations or {})
                   for s in api.list_namespaced_secret(old).items)
    as_0_1 = [("first", "encryption-key-1"), ("rotated", "encryption-key-2")]
    assert snapshot(api, old)["files"] == as_0_1

    api.patch_namespace(old, {"metadata": {"labels": {"keymount-e2e/unguarded": None}}})
    poll(lambda: guarded(api, old), what="the upgrade reaching the namespace")
    poll(lambda: snapshot(api, old)["files"] == as_0_1, what="0.1 files after the upgrade")
    listing = json.loads(cli(admin_kubeconfig, "keys", "list", "-n", old, "-o", "json").stdout)
    assert [r["state"] for r in listing] == ["older, legacy", "active, legacy"]
    assert "keymount keys pin" in denial(lambda: api.patch_namespaced_secret("first", old, {
        "data": {"encryption-key": None},
        "metadata": {"annotations": {"keymount.io/retired": "2026-11-29T00:00:00Z"}}}))
    pinned = cli(admin_kubeconfig, "keys", "pin", "-n", old)
    assert "secret/rotated pinned at number 2" in pinned.stdout
    assert snapshot(api, old)["files"] == as_0_1
    assert "number 3" in cli(admin_kubeconfig, "keys", "rotate", "-n", old).stdout
    cli(admin_kubeconfig, "keys", "retire", "first", "-n", old, "--yes")
    poll(lambda: snapshot(api, old)["files"] == [
        ("rotated", "encryption-key-2"), ("keymount-key-3", "encryption-key-3")],
        what="files after retiring the oldest 0.1 key")
