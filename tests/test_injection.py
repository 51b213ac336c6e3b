"""docs/contract.md, "Injection" and "Refusals": what is injected, what is refused,
and idempotency."""

import json
import os
from datetime import UTC
from pathlib import Path

import pytest
import yaml

from webhook.config import Settings
from webhook.injection import Injected, Refused, inject_keys, needs_keys
from webhook.names import VOLUME_NAME

from builders import container, fixed_key, key_secret, keyring_of, pod, random_key, slot_secret

GOLDEN = Path(__file__).parent / "golden" / "pods"
UPDATE = os.environ.get("KEYMOUNT_UPDATE_GOLDEN") == "1"
SETTINGS = Settings()
KEYRING = keyring_of(key_secret("key-b", fixed_key("b"), index=2),
                     key_secret("key-a", fixed_key("a"), index=1), slot_secret(3), slot_secret(4))


def inject(obj, keyring=KEYRING, settings=SETTINGS, **kw):
    return inject_keys(obj, keyring=keyring, settings=settings, **kw)


def injected(obj, **kw) -> tuple[dict, Injected]:
    outcome = inject(obj, **kw)
    assert isinstance(outcome, Injected), outcome
    return outcome.apply(obj), outcome


@pytest.mark.parametrize("case", sorted(p.name.removesuffix(".in.yaml")
                                        for p in GOLDEN.glob("*.in.yaml")))
def test_injected_pod_matches_golden_file(case):
    source = yaml.safe_load((GOLDEN / f"{case}.in.yaml").read_text())
    result, _ = injected(source)
    golden = GOLDEN / f"{case}.out.yaml"
    if UPDATE:
        golden.write_text(yaml.safe_dump(result, sort_keys=False))
    assert result == yaml.safe_load(golden.read_text())


@pytest.mark.parametrize("case", sorted(p.name.removesuffix(".in.yaml")
                                        for p in GOLDEN.glob("*.in.yaml")))
def test_injecting_the_webhooks_own_output_changes_nothing(case):
    once, _ = injected(yaml.safe_load((GOLDEN / f"{case}.in.yaml").read_text()))
    twice, outcome = injected(once)
    assert outcome.patch == ()
    assert twice == once


def test_files_are_numbered_in_key_order_with_the_newest_last():
    result, outcome = injected(pod())
    sources = result["spec"]["volumes"][0]["projected"]["sources"]
    assert [(s["secret"]["name"], s["secret"]["items"][0]["path"], s["secret"]["optional"])
            for s in sources] == [
        ("key-a", "encryption-key-1", False), ("key-b", "encryption-key-2", False),
        ("keymount-key-3", "encryption-key-3", True), ("keymount-key-4", "encryption-key-4", True)]
    assert [f.file for f in outcome.files] == ["encryption-key-1", "encryption-key-2"]


@pytest.mark.parametrize(("slots", "existing", "listed"), [
    (2, [3, 4], [3, 4]), (0, [3, 4], []), (1, [3, 4], [3]), (3, [3, 4], [3, 4]),
    (2, [], []), (2, [4], [4]), (2, [1, 5], [5]),
], ids=["two-of-two", "none-wanted", "lowest-first", "only-what-exists", "no-slots",
        "a-gap", "not-below-the-active-key"])
def test_only_existing_slots_above_the_active_key_are_listed_as_optional_sources(
        slots, existing, listed):
    # Slot 1 below the active key 2 stays empty for good (its number is used).
    ring = keyring_of(key_secret("key-a", fixed_key("a"), index=1) if 1 not in existing
                      else slot_secret(1), key_secret("key-b", fixed_key("b"), index=2),
                      *(slot_secret(n) for n in existing if n != 1))
    result, outcome = injected(pod(), keyring=ring, settings=Settings(rotation_slots=slots))
    sources = result["spec"]["volumes"][0]["projected"]["sources"]
    optional = [(s["secret"]["name"], s["secret"]["items"][0]["path"]) for s in sources
                if s["secret"]["optional"]]
    assert optional == [(f"keymount-key-{n}", f"encryption-key-{n}") for n in listed]
    assert outcome.files[-1].file == "encryption-key-2"


def test_volume_is_projected_read_only_0440_and_keys_are_not_optional():
    result, _ = injected(pod())
    volume = result["spec"]["volumes"][0]
    assert volume["name"] == "keymount-encryption-keys"
    assert volume["projected"]["defaultMode"] == 0o440
    assert all(s["secret"]["optional"] is False for s in volume["projected"]["sources"]
               if not s["secret"]["name"].startswith("keymount-key-"))
    assert result["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "keymount-encryption-keys", "mountPath": "/encryption-keys", "readOnly": True}]


def test_status_annotation_lists_each_file_with_secret_and_fingerprint():
    from webhook.keys import fingerprint_key
    result, _ = injected(pod())
    status = json.loads(result["metadata"]["annotations"]["keymount.io/status"])
    assert status == [
        {"file": "encryption-key-1", "secret": "key-a",
         "fingerprint": fingerprint_key(fixed_key("a"))},
        {"file": "encryption-key-2", "secret": "key-b",
         "fingerprint": fingerprint_key(fixed_key("b"))},
    ]


def test_init_containers_are_mounted_only_when_the_annotation_names_them():
    result, _ = injected(pod(init=[container("migrate")]))
    assert "volumeMounts" not in result["spec"]["initContainers"][0]


def test_reinvocation_after_a_key_is_added_replaces_the_volume_in_place():
    once, _ = injected(pod(container("app", volumeMounts=[{"name": "x", "mountPath": "/x"}])))
    three = keyring_of(key_secret("key-a", fixed_key("a"), index=1),
                       key_secret("key-b", fixed_key("b"), index=2),
                       key_secret("key-c", fixed_key("c"), index=3), slot_secret(4),
                       slot_secret(5))
    twice, outcome = injected(once, keyring=three)
    assert [op["op"] for op in outcome.patch] == ["replace", "add"]
    assert len(twice["spec"]["volumes"]) == 1
    assert len(twice["spec"]["volumes"][0]["projected"]["sources"]) == 3 + 2  # keys, slots
    assert len(twice["spec"]["containers"][0]["volumeMounts"]) == 2


@pytest.mark.parametrize("given", ["//run/keys", "//run/keys/", "/run//keys", "/run/./keys"],
                         ids=["leading-double-slash", "and-trailing", "inner", "dot"])
def test_a_mount_path_flag_is_read_as_the_kubelet_reads_pod_mount_paths(given):
    # Kept as `//run/keys`, another volume at /run/keys would not count as a conflict.
    settings = Settings(mount_path=given)
    assert settings.mount_path == "/run/keys"
    obj = pod(container("app", volumeMounts=[{"name": "mine", "mountPath": "/run/keys"}]))
    outcome = refused(obj, settings=settings)
    assert outcome.reason == "mount-conflict" and "'mine'" in outcome.message


@pytest.mark.parametrize("given", ["/", "//", "/."], ids=["root", "double", "dot"])
def test_the_root_directory_is_no_mount_path(given):
    with pytest.raises(ValueError, match="container's root directory"):
        Settings(mount_path=given)


def test_mount_path_is_configurable():
    result, _ = injected(pod(), settings=Settings(mount_path="/run/keys/"))
    assert result["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/run/keys"


# --- refusals -----------------------------------------------------------------

def refused(obj, **kw) -> Refused:
    outcome = inject(obj, **kw)
    assert isinstance(outcome, Refused), outcome
    return outcome


def test_no_valid_key_refuses_with_namespace_label_field_and_the_fixing_command():
    outcome = refused(pod(), keyring=keyring_of(namespace="shop"))
    assert outcome.reason == "no-valid-key" and outcome.from_key_state
    for part in ("'shop'", "keymount.io/encryption-key=true", "'encryption-key'",
                 "keymount keys create encryption-key-1 -n shop --generate"):
        assert part in outcome.message


def test_an_invalid_key_secret_refuses_the_pod_under_invalid_keys_deny():
    ring = keyring_of(key_secret("good", random_key()), key_secret("short", random_key()[:20]))
    outcome = refused(pod(), keyring=ring)
    assert outcome.reason == "invalid-keys"
    assert "short: field 'encryption-key' holds 20 bytes" in outcome.message
    assert "--invalid-keys skip" in outcome.message


def test_invalid_keys_skip_injects_the_valid_ones_with_a_warning():
    ring = keyring_of(key_secret("good", random_key()), key_secret("short", random_key()[:20]))
    result, outcome = injected(pod(), keyring=ring, settings=Settings(invalid_keys="skip"))
    assert [f.secret for f in outcome.files] == ["good"]
    assert any("invalid key Secrets skipped: short" in w for w in outcome.warnings)


def test_only_invalid_keys_under_skip_is_still_no_valid_key():
    ring = keyring_of(key_secret("short", b"x" * 5))
    assert refused(pod(), keyring=ring, settings=Settings(invalid_keys="skip")).reason == \
        "no-valid-key"


def test_ambiguous_order_refuses_and_names_both_secrets():
    ring = keyring_of(key_secret("k1", random_key(), index=4),
                      key_secret("k2", random_key(), index=4))
    outcome = refused(pod(), keyring=ring)
    assert outcome.reason == "ambiguous-order"
    assert "'k1'" in outcome.message and "'k2'" in outcome.message
    assert "both have number 4" in outcome.message
    assert "kubectl delete secret NAME -n shop" in outcome.message
    assert "made before keymount" not in outcome.message


@pytest.mark.parametrize("mount_path", ["/encryption-keys", "/encryption-keys/",
                                        "/encryption-keys/sub"], ids=["at", "at-slash", "under"])
def test_another_volume_at_or_under_the_mount_path_refuses_naming_container_and_volume(mount_path):
    obj = pod(container("app", volumeMounts=[{"name": "mine", "mountPath": mount_path}]))
    outcome = refused(obj)
    assert outcome.reason == "mount-conflict"
    assert "'app'" in outcome.message and "'mine'" in outcome.message


def test_an_unknown_container_name_in_the_annotation_refuses_the_pod():
    obj = pod(annotations={"keymount.io/containers": "app,ghost"})
    outcome = refused(obj)
    assert outcome.reason == "unknown-container"
    assert "'ghost'" in outcome.message and "containers: app" in outcome.message


@pytest.mark.parametrize("name", [["app"], {"n": 1}], ids=["list", "object"])
def test_a_container_named_by_no_string_cannot_be_selected_by_the_annotation(name):
    # Only a direct client can send it (the API server decodes a Pod before admission);
    # it used to raise TypeError (unhashable) and be answered as an internal error.
    obj = pod(container("app"), annotations={"keymount.io/containers": "app"})
    obj["spec"]["containers"].append({"name": name})
    outcome = inject(obj)
    assert isinstance(outcome, Injected)
    assert [op["path"] for op in outcome.patch if "volumeMounts" in op["path"]] == \
        ["/spec/containers/0/volumeMounts"]
    obj["metadata"]["annotations"]["keymount.io/containers"] = str(name)
    assert refused(obj).reason == "unknown-container"


@pytest.mark.parametrize("obj", [
    {"metadata": {}},
    {"spec": {"containers": "nope"}},
    {"spec": {"containers": [{"name": "a"}], "volumes": {"x": 1}}},
    {"spec": {"containers": [{"name": "a", "volumeMounts": ["x"]}]}},
    {"spec": {"containers": [{"name": "a"}], "ephemeralContainers": [{"volumeMounts": 1}]}},
    {"spec": {"containers": [{"name": "a"}], "ephemeralContainers": [{"volumeMounts": "x"}]}},
], ids=["no-spec", "containers-not-list", "volumes-not-list", "mounts-not-objects",
        "ephemeral-mounts-a-number", "ephemeral-mounts-a-string"])
def test_a_malformed_pod_is_refused_not_crashed_on(obj):
    assert refused(obj).reason == "malformed-pod"


@pytest.mark.parametrize("value", [5, "abc", {"a": 1}], ids=["number", "string", "object"])
def test_ephemeral_containers_that_are_no_list_are_none(value):
    # Only a direct client can send them; a number used to raise TypeError.
    assert isinstance(inject(pod(ephemeralContainers=value)), Injected)


# --- warnings -------------------------------------------------------------------

def warnings_for(obj, **kw):
    return injected(obj, **kw)[1].warnings


def test_a_passphrase_like_key_earns_a_warning():
    ring = keyring_of(key_secret("pw", b"correct horse battery staple 123"))
    assert any("'pw'" in w and "passphrase" in w for w in warnings_for(pod(), keyring=ring))


def test_more_than_ten_keys_earn_a_warning():
    ring = keyring_of(*[key_secret(f"k{i}", random_key(), index=i) for i in range(1, 12)])
    assert any("11 keys" in w for w in warnings_for(pod(), keyring=ring))
    ten = keyring_of(*[key_secret(f"k{i}", random_key(), index=i) for i in range(1, 11)])
    assert warnings_for(pod(), keyring=ten) == ()


@pytest.mark.parametrize(("pod_sc", "container_sc", "warned"), [
    ({"runAsNonRoot": True}, {}, True),
    ({"runAsUser": 1000}, {}, True),
    ({}, {"runAsUser": 1000}, True),
    ({}, {"runAsNonRoot": True}, True),
    ({"runAsNonRoot": True, "fsGroup": 1000}, {}, False),
    ({"runAsUser": 1000}, {"runAsUser": 0}, False),
    ({}, {}, False),
], ids=["pod-nonroot", "pod-uid", "container-uid", "container-nonroot", "with-fsgroup",
        "container-root-overrides", "root"])
def test_a_non_root_pod_without_fsgroup_earns_a_warning(pod_sc, container_sc, warned):
    obj = pod(container("app", securityContext=container_sc), securityContext=pod_sc)
    assert any("fsGroup" in w for w in warnings_for(obj)) is warned


def test_backend_pods_are_those_matching_the_pod_selector():
    assert needs_keys(pod(), settings=SETTINGS)
    assert not needs_keys(pod(labels={"app": "web"}), settings=SETTINGS)
    assert not needs_keys({"metadata": {"labels": None}}, settings=SETTINGS)


def test_a_newest_key_older_than_max_key_age_earns_a_rotation_warning():
    from datetime import datetime, timedelta
    ring = keyring_of(key_secret("old", random_key(), created="2026-01-01T00:00:00Z"))
    settings = Settings(max_key_age=timedelta(days=90))
    late = datetime(2026, 6, 1, tzinfo=UTC)
    warnings = warnings_for(pod(), keyring=ring, settings=settings, now=late)
    assert any("keymount keys rotate -n shop" in w for w in warnings)
    early = datetime(2026, 2, 1, tzinfo=UTC)
    assert warnings_for(pod(), keyring=ring, settings=settings, now=early) == ()


@pytest.mark.parametrize("mounts", [
    [{"name": "cache", "mountPath": "//encryption-keys"}],
    [{"name": "cache", "mountPath": "/./encryption-keys/"}],
    [{"name": "cache", "mountPath": "/encryption-keys/sub"}],
    [{"name": "keymount-encryption-keys", "mountPath": "/elsewhere",
      "subPath": "encryption-key-1"}],
    [{"name": "keymount-encryption-keys", "mountPath": "/encryption-keys", "readOnly": False}],
    [{"name": "keymount-encryption-keys", "mountPath": "/encryption-keys", "readOnly": True},
     {"name": "keymount-encryption-keys", "mountPath": "/copy", "readOnly": True}],
], ids=["double-slash", "dot-segment", "under-the-path", "second-mount-with-subpath",
        "writable", "mounted-twice"])
def test_every_other_use_of_the_mount_path_or_of_keymounts_volume_is_refused(mounts):
    outcome = refused(pod(container("app", volumeMounts=mounts)))
    assert outcome.reason == "mount-conflict"


def test_a_container_the_annotation_does_not_select_may_not_mount_the_keys_itself():
    sidecar = container("sidecar", volumeMounts=[
        {"name": "keymount-encryption-keys", "mountPath": "/stolen", "readOnly": True}])
    outcome = refused(pod(container("app"), sidecar,
                          annotations={"keymount.io/containers": "app"}))
    assert outcome.reason == "mount-conflict" and "'sidecar'" in outcome.message


def test_a_pod_with_two_volumes_of_keymounts_name_is_refused_not_half_replaced():
    # Found by the property tests: only the first was replaced, the second passed on.
    obj = pod(container("app"), volumes=[{"name": "keymount-encryption-keys"},
                                         {"name": "keymount-encryption-keys",
                                          "emptyDir": {}}])
    assert refused(obj).reason == "malformed-pod"


def test_the_volume_is_built_once_per_keyring_and_settings():
    from webhook.injection import build_volume
    keyring = keyring_of(key_secret("k1", random_key(), index=1), slot_secret(2),
                         slot_secret(3))
    first = build_volume(keyring, settings=SETTINGS)
    assert build_volume(keyring, settings=SETTINGS) is first
    other = build_volume(keyring, settings=Settings(rotation_slots=0))
    assert other is not first and len(other["projected"]["sources"]) == 1
    assert len(first["projected"]["sources"]) == 1 + SETTINGS.rotation_slots


def test_changing_an_applied_pod_leaves_the_shared_volume_alone():
    keyring = keyring_of(key_secret("k1", random_key(), index=1), slot_secret(2),
                         slot_secret(3))
    outcome = inject(pod(), keyring=keyring)
    result = outcome.apply(pod())
    [volume] = [v for v in result["spec"]["volumes"] if v["name"] == VOLUME_NAME]
    volume["projected"]["sources"].clear()
    again = inject(pod(), keyring=keyring)
    assert again.patch == outcome.patch
    assert len(again.apply(pod())["spec"]["volumes"][-1]["projected"]["sources"]) == \
        1 + SETTINGS.rotation_slots


@pytest.mark.parametrize("shape", [
    pod(),
    pod(container("a"), container("b", volumeMounts=[{"name": "x", "mountPath": "/x"}])),
    pod(volumes=[{"name": "x", "emptyDir": {}}], annotations={"other": "1"}),
    pod(container("a", volumeMounts=[{"name": VOLUME_NAME, "mountPath": "/encryption-keys",
                                      "readOnly": True}])),
], ids=["bare-pod", "two-containers-one-mount", "volumes-and-annotations", "mount-present"])
def test_the_encoded_patch_is_the_patch_whatever_the_shape_and_the_cache(shape):
    import base64

    import orjson
    keyring = keyring_of(key_secret("k1", random_key(), index=1))
    for _ in range(2):  # built, then from the keyring's cache
        outcome = inject(shape, keyring=keyring)
        assert orjson.loads(base64.b64decode(outcome.encoded)) == list(outcome.patch)


def test_a_keyring_keeps_at_most_a_bounded_number_of_patch_shapes():
    import base64

    from webhook.injection import MAX_PATCH_SHAPES
    keyring = keyring_of(key_secret("k1", random_key(), index=1))
    for count in range(1, MAX_PATCH_SHAPES + 10):
        outcome = inject(pod(*(container(f"c{i}") for i in range(count))), keyring=keyring)
        assert len(json.loads(base64.b64decode(outcome.encoded))) == count + 2
    assert sum(1 for key in keyring.derived if key[0] == "patch") == MAX_PATCH_SHAPES


# --- staged keys ---------------------------------------------------------------------

def staged_slot(number, key):
    """A staged key as keymount's webhooks store it: the slot with its staged field."""
    import base64
    secret = slot_secret(number)
    secret["data"]["staged-encryption-key"] = base64.b64encode(key).decode()
    secret["metadata"]["annotations"]["keymount.io/staged-at"] = "2026-12-02T13:00:00Z"
    return secret


def slot_sources(result):
    sources = result["spec"]["volumes"][0]["projected"]["sources"]
    return [(s["secret"]["name"], [i["path"] for i in s["secret"]["items"]])
            for s in sources if s["secret"]["optional"]]


def test_a_pod_created_during_staging_lists_the_staged_file_and_then_the_free_slots():
    ring = keyring_of(key_secret("key-a", fixed_key("a"), index=1),
                      staged_slot(2, fixed_key("b")), slot_secret(3), slot_secret(4))
    result, outcome = injected(pod(), keyring=ring)
    assert slot_sources(result) == [
        ("keymount-key-2", ["encryption-key-2", "staged/encryption-key-2"]),
        ("keymount-key-3", ["encryption-key-3", "staged/encryption-key-3"]),
        ("keymount-key-4", ["encryption-key-4", "staged/encryption-key-4"])]
    # Staged is not active: the Pod encrypts with key 1 until the activation.
    assert [f.file for f in outcome.files] == ["encryption-key-1"]


def test_every_slot_source_lists_its_key_field_and_its_staged_field_optionally():
    result, _ = injected(pod())
    sources = result["spec"]["volumes"][0]["projected"]["sources"]
    slot = next(s["secret"] for s in sources if s["secret"]["name"] == "keymount-key-3")
    assert slot == {"name": "keymount-key-3", "optional": True, "items": [
        {"key": "encryption-key", "path": "encryption-key-3"},
        {"key": "staged-encryption-key", "path": "staged/encryption-key-3"}]}


def test_a_namespace_with_only_a_staged_key_has_no_valid_key_and_is_told_to_activate_it():
    ring = keyring_of(staged_slot(1, fixed_key("a")), slot_secret(2))
    outcome = inject(pod(), keyring=ring)
    assert isinstance(outcome, Refused) and outcome.reason == "no-valid-key"
    assert "only the staged key 'keymount-key-1'" in outcome.message
    assert "keymount keys activate -n shop" in outcome.message


def test_an_activated_key_is_a_plain_key_source_of_its_key_field():
    active = staged_slot(2, fixed_key("b"))
    active["data"]["encryption-key"] = active["data"]["staged-encryption-key"]
    ring = keyring_of(key_secret("key-a", fixed_key("a"), index=1), active, slot_secret(3))
    result, outcome = injected(pod(), keyring=ring)
    sources = result["spec"]["volumes"][0]["projected"]["sources"]
    assert sources[1]["secret"] == {"name": "keymount-key-2", "optional": False, "items": [
        {"key": "encryption-key", "path": "encryption-key-2"}]}
    assert outcome.files[-1].file == "encryption-key-2"
