"""KeyPolicy and ClusterKeyPolicy on the real API server: the CRDs as manifests/ ships
them, keymount's policies.keymount.io webhook as manifests/ declares it (only its
clientConfig replaced; conftest.webhook_configurations)."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from apihelpers import denial
from conftest import kubectl
from polling import poll

GROUP, VERSION = "keymount.io", "v1alpha1"


@pytest.fixture
def custom(api):
    return client.CustomObjectsApi(api.api_client)


@pytest.fixture
def selected(api, custom, keymount, namespace, policy_crds):
    """The test's namespace, labelled, and a ClusterKeyPolicy that selects it by that
    label alone (other tests' namespaces are not bound by it)."""
    mark = uuid.uuid4().hex[:8]
    api.patch_namespace(namespace, {"metadata": {"labels": {"keymount-e2e/policy": mark}}})
    name = f"bounds-{mark}"
    body = cluster_policy(name, {"matchLabels": {"keymount-e2e/policy": mark}},
                          maxRotationPeriod="90d", minStagingPeriod="1m",
                          minRotationPeriod="1h")
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterkeypolicies", body)
    yield namespace, name
    custom.delete_cluster_custom_object(GROUP, VERSION, "clusterkeypolicies", name)


def cluster_policy(name: str, selector: dict, **spec) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterKeyPolicy",
            "metadata": {"name": name}, "spec": {"namespaceSelector": selector, **spec}}


def key_policy(name: str, **spec) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "KeyPolicy",
            "metadata": {"name": name}, "spec": spec}


def create_key_policy(custom, namespace: str, body: dict, **kw):
    return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "keypolicies",
                                                  body, **kw)


def refusal_of(custom, namespace: str, body: dict) -> str | None:
    """keymount's refusal of a dry-run create, or None while it is allowed."""
    try:
        create_key_policy(custom, namespace, body, dry_run="All")
    except ApiException as exc:
        return json.loads(exc.body)["message"]
    return None


def test_a_keypolicy_outside_the_bounds_is_refused_naming_the_bound(custom, selected):
    namespace, bounds = selected
    # The CRDs may be minutes old or a moment old: wait until keymount judges them.
    message = poll(lambda: refusal_of(custom, namespace, key_policy(
        "rotation", rotationPeriod="180d", stagingPeriod="5m")),
        what="keymount judging KeyPolicies")
    assert 'admission webhook "policies.keymount.io" denied the request' in message
    assert (f"spec.rotationPeriod 180d is longer than maxRotationPeriod 90d of "
            f"ClusterKeyPolicy {bounds!r}; set spec.rotationPeriod to at most 90d") in message
    message = denial(lambda: create_key_policy(custom, namespace, key_policy(
        "rotation", rotationPeriod="30d", stagingPeriod="30s")))
    assert f"minStagingPeriod 1m of ClusterKeyPolicy {bounds!r}" in message
    # A namespace's admin cannot have keys rotated every few seconds: each rotation
    # keeps a key Secret and spends the controller's write budget, shared by all.
    message = denial(lambda: create_key_policy(custom, namespace, key_policy(
        "rotation", rotationPeriod="30m", stagingPeriod="5m")))
    assert (f"spec.rotationPeriod 30m is shorter than minRotationPeriod 1h of "
            f"ClusterKeyPolicy {bounds!r}") in message
    assert custom.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                "keypolicies")["items"] == []


def test_a_keypolicy_inside_the_bounds_is_stored_with_its_defaults(custom, selected):
    namespace, _ = selected
    poll(lambda: refusal_of(custom, namespace, key_policy("probe", rotationPeriod="180d")),
         what="keymount judging KeyPolicies")
    create_key_policy(custom, namespace, key_policy("rotation", rotationPeriod="30d"))
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "keypolicies",
                                                 "rotation")
    # The schema's defaults: a 2m staging period, no restart.
    assert stored["spec"] == {"rotationPeriod": "30d", "stagingPeriod": "2m",
                              "restart": "none"}


def test_a_second_keypolicy_in_a_namespace_is_refused_naming_the_first(custom, selected):
    namespace, _ = selected
    poll(lambda: refusal_of(custom, namespace, key_policy("probe", rotationPeriod="180d")),
         what="keymount judging KeyPolicies")
    create_key_policy(custom, namespace, key_policy("rotation", rotationPeriod="30d"))
    message = denial(lambda: create_key_policy(custom, namespace, key_policy(
        "another", rotationPeriod="7d")))
    assert (f"namespace {namespace!r} already has KeyPolicy 'rotation', and a namespace "
            f"has one KeyPolicy; change that one instead: kubectl edit "
            f"keypolicies.keymount.io rotation -n {namespace}") in message
    # The one there is can still be changed.
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "keypolicies",
                                          "rotation", {"spec": {"rotationPeriod": "7d"}})
    names = [item["metadata"]["name"] for item in custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, "keypolicies")["items"]]
    assert names == ["rotation"]


def test_a_keypolicy_in_a_namespace_no_clusterkeypolicy_selects_has_no_bounds(custom, api,
                                                                            selected):
    namespace, _ = selected
    poll(lambda: refusal_of(custom, namespace, key_policy("probe", rotationPeriod="180d")),
         what="keymount judging KeyPolicies")
    api.patch_namespace(namespace, {"metadata": {"labels": {"keymount-e2e/policy": None}}})
    # keymount reads the namespace's labels for every review: no cache to wait for.
    create_key_policy(custom, namespace, key_policy("rotation", rotationPeriod="180d"))


def test_a_clusterkeypolicy_whose_default_breaks_its_own_bound_is_refused(custom, selected):
    name = f"inconsistent-{uuid.uuid4().hex[:8]}"
    message = denial(lambda: custom.create_cluster_custom_object(
        GROUP, VERSION, "clusterkeypolicies", cluster_policy(
            name, {"matchLabels": {"keymount-e2e/policy": "none"}}, rotationPeriod="180d",
            maxRotationPeriod="90d")))
    assert f"ClusterKeyPolicy {name!r}: spec.rotationPeriod 180d is longer than its own " \
           f"spec.maxRotationPeriod 90d" in message


@pytest.mark.parametrize(("spec", "says"), [
    ({"rotationPeriod": "1y"}, "spec.rotationPeriod"),
    ({"restart": "always"}, "spec.restart"),
], ids=["duration-pattern", "restart-enum"])
def test_the_schema_refuses_what_it_can_express(custom, policy_crds, namespace, spec, says):
    with pytest.raises(ApiException) as info:
        create_key_policy(custom, namespace, key_policy("rotation", **spec))
    assert info.value.status == 422 and says in json.loads(info.value.body)["message"]


def test_kubectl_lists_keypolicies_with_their_columns(admin_kubeconfig, custom, selected):
    namespace, _ = selected
    poll(lambda: refusal_of(custom, namespace, key_policy("probe", rotationPeriod="180d")),
         what="keymount judging KeyPolicies")
    create_key_policy(custom, namespace, key_policy("rotation", rotationPeriod="30d"))
    # The controller writes status; here it is written by hand, through the subresource.
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "keypolicies", "rotation", {"status": {
            "activeKey": 3, "stagedKey": 4, "keys": 3, "nextRotation": "2027-01-01T00:00:00Z",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Rotating",
                            "lastTransitionTime": "2026-12-01T00:00:00Z"}]}})
    lines = kubectl(admin_kubeconfig, "get", "keypolicies", "-A").stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "ACTIVE", "STAGED", "KEYS",
                                "NEXT-ROTATION", "READY", "AGE"]
    row = next(line.split() for line in lines[1:] if line.startswith(namespace + " "))
    assert row[:7] == [namespace, "rotation", "3", "4", "3", "2027-01-01T00:00:00Z", "True"]
    short = kubectl(admin_kubeconfig, "get", "kpol", "-n", namespace).stdout
    assert "rotation" in short
    header = kubectl(admin_kubeconfig, "get", "ckpol").stdout.splitlines()[0].split()
    assert header == ["NAME", "ROTATION", "MAX-ROTATION", "MIN-STAGING", "READY", "AGE"]
