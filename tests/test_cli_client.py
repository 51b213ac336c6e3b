"""The CLI holds its cluster client as `cli_keys.KeyApi`: keymount's `KeyClient` is
one, and the key commands work against a fake of it."""

from __future__ import annotations

import inspect
from typing import get_type_hints

import pytest

from webhook import audit, cli_keys
from webhook.cli_keys import KeyApi, cluster_keyrings, pin_legacy_keys, report_rollout
from webhook.cluster import KeyClient
from webhook.config import Settings
from webhook.key_secrets import parse_key_secret
from webhook.keys import KeyRecord

from builders import key_secret, keyring_of, random_key

SETTINGS = Settings()
API_METHODS = [name for name in vars(KeyApi) if not name.startswith("_")]


@pytest.mark.parametrize("name", API_METHODS, ids=API_METHODS)
def test_keymounts_client_has_each_key_api_method_with_its_signature_and_types(name):
    wanted, got = getattr(KeyApi, name), getattr(KeyClient, name)
    assert inspect.signature(got).parameters.keys() == \
        inspect.signature(wanted).parameters.keys()
    # KeyApi names Rbac for the type checker only (the CLI imports audit lazily).
    names = {**vars(cli_keys), "Rbac": audit.Rbac}
    assert get_type_hints(got) == get_type_hints(wanted, globalns=names)


class FakeKeys:
    """A KeyApi that records patches and serves fixed records and Pods."""

    def __init__(self, records: list[KeyRecord], pods: list[dict] | None = None) -> None:
        self.records, self.pods = records, pods or []
        self.patches: list[tuple[str, str, dict]] = []

    def key_records(self, namespace):
        return [r for r in self.records if namespace is None or r.namespace == namespace]

    def backend_pods(self, namespace):
        return self.pods

    def patch_secret(self, namespace, name, patch):
        self.patches.append((namespace, name, patch))

    def controller_of(self, namespace, kind, name):
        return ("Deployment", "api") if kind == "ReplicaSet" else (kind, name)


def records(*secrets) -> list[KeyRecord]:
    return [parse_key_secret(s, settings=SETTINGS) for s in secrets]


def test_cluster_keyrings_groups_the_listed_records_by_namespace():
    keys = FakeKeys(records(key_secret("a", random_key(), index=1),
                            key_secret("b", random_key(), index=1, namespace="web")))
    assert list(cluster_keyrings(keys, None)) == ["shop", "web"]
    assert [r.name for r in cluster_keyrings(keys, "quiet").get("quiet").keys] == []


def test_pin_legacy_keys_patches_each_legacy_key_at_its_current_number(capsys):
    keyring = keyring_of(key_secret("old", random_key(), created="2025-01-01T00:00:00Z"),
                         key_secret("new", random_key(), index=2))
    keys = FakeKeys([])
    assert pin_legacy_keys(keys, keyring) == 1
    [(namespace, name, patch)] = keys.patches
    assert (namespace, name) == ("shop", "old")
    assert patch["metadata"]["annotations"]["keymount.io/key-index"] == "1"
    assert "secret/old pinned at number 1" in capsys.readouterr().out


def test_report_rollout_names_the_controller_to_restart(capsys):
    pod = {"metadata": {"name": "api-7", "ownerReferences": [
        {"kind": "ReplicaSet", "name": "api-5d8", "controller": True}]}, "spec": {}}
    [record] = records(key_secret("keymount-key-3", random_key(), index=3))
    report_rollout(FakeKeys([], [pod]), "shop", record)
    assert "kubectl rollout restart deployment/api -n shop" in capsys.readouterr().out
