"""The local-directory key source (--keys-from): parsing, reload, bad files lose nothing."""

import asyncio
import base64
import json

import pytest
import yaml

from webhook.config import Settings
from webhook.localdir import DirectoryKeySource, ManifestError, parse_key_documents
from webhook.store import KeyStore

from builders import key_secret, random_key
from polling import wait_for

SETTINGS = Settings()
KEY = random_key()


def test_many_documents_per_file_and_lists_are_read():
    text = yaml.safe_dump_all([
        key_secret("a", random_key()),
        {"apiVersion": "v1", "kind": "List", "items": [key_secret("b", random_key())]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
        key_secret("unlabelled", random_key(), labels={}),
    ])
    records = parse_key_documents(text, settings=SETTINGS, source="f.yaml")
    assert [r.name for r in records] == ["a", "b"]


@pytest.mark.parametrize("text", [
    json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        key_secret("a", KEY), key_secret("b", KEY, labels={})]}),
    "# a comment makes it YAML\n" + json.dumps(key_secret("a", KEY)),
], ids=["json-list", "yaml-in-a-json-file"])
def test_a_json_file_reads_as_its_yaml_would(text):
    fast = parse_key_documents(text, settings=SETTINGS, source="keys.json")
    assert [r.name for r in fast] == ["a"]
    assert fast == parse_key_documents(text, settings=SETTINGS, source="keys.yaml")


def test_a_secret_without_namespace_belongs_to_default():
    secret = key_secret("a", random_key())
    del secret["metadata"]["namespace"]
    [record] = parse_key_documents(yaml.safe_dump(secret), settings=SETTINGS, source="f")
    assert record.namespace == "default"


def test_string_data_is_accepted_as_the_api_server_accepts_it():
    secret = key_secret("a", None)
    secret["stringData"] = {"encryption-key": base64.b64encode(random_key()).decode()}
    [record] = parse_key_documents(yaml.safe_dump(secret), settings=SETTINGS, source="f")
    assert record.valid


def test_a_yaml_error_names_file_and_line_but_never_quotes_content():
    secret_text = "kind: Secret\ndata:\n  encryption-key: c2VjcmV0c2VjcmV0: oops\n"
    with pytest.raises(ManifestError) as info:
        parse_key_documents(secret_text, settings=SETTINGS, source="keys.yaml")
    assert "keys.yaml" in str(info.value) and "line 3" in str(info.value)
    assert "c2VjcmV0" not in str(info.value)


def test_a_raw_key_that_is_not_utf8_never_reaches_the_error(tmp_path, caplog):
    key = bytes(range(0xE0, 0x100))  # 32 bytes, none of them valid UTF-8 alone
    (tmp_path / "raw.yaml").write_bytes(
        b"kind: Secret\nmetadata: {name: k, labels: {keymount.io/encryption-key: 'true'}}\n"
        b"stringData:\n  encryption-key: " + key + b"\n")
    source = DirectoryKeySource(tmp_path, settings=SETTINGS, store=KeyStore())
    assert source.scan() == []
    [message] = source.errors.values()
    assert "not valid UTF-8" in message and "raw.yaml" in message
    for spelling in (key.hex(), "\\xe0", "0xe0", repr(key[:1])):
        assert spelling not in message and spelling not in caplog.text


@pytest.fixture
def directory(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(key_secret("a", random_key())))
    return tmp_path


async def test_the_directory_is_reloaded_when_a_file_changes(directory):
    store = KeyStore()
    source = DirectoryKeySource(directory, settings=SETTINGS, store=store, poll_interval=0.05)
    await source.load()
    task = asyncio.create_task(source.run())
    try:
        (directory / "b.yaml").write_text(yaml.safe_dump(key_secret("b", random_key())))
        await wait_for(lambda: len(store.keyring("shop").keys) == 2)
        (directory / "a.yaml").unlink()
        await wait_for(lambda: [r.name for r in store.keyring("shop").keys] == ["b"])
    finally:
        task.cancel()


async def test_a_file_that_stops_parsing_keeps_its_previous_keys(directory, caplog):
    store = KeyStore()
    source = DirectoryKeySource(directory, settings=SETTINGS, store=store)
    await source.load()
    (directory / "a.yaml").write_text("kind: Secret\n  bad: [indent\n")
    await source.load()
    assert [r.name for r in store.keyring("shop").keys] == ["a"]
    assert str(directory / "a.yaml") in source.errors[directory / "a.yaml"]


async def test_hidden_entries_such_as_configmap_volume_links_are_skipped(directory):
    hidden = directory / "..2026_11_28"
    hidden.mkdir()
    (hidden / "a.yaml").write_text(yaml.safe_dump(key_secret("a", random_key())))
    (directory / ".b.yaml").write_text(yaml.safe_dump(key_secret("b", random_key())))
    store = KeyStore()
    await DirectoryKeySource(directory, settings=SETTINGS, store=store).load()
    assert [r.name for r in store.keyring("shop").keys] == ["a"]


async def test_the_store_becomes_ready_after_the_first_full_load(directory):
    store = KeyStore()
    assert not store.ready
    await DirectoryKeySource(directory, settings=SETTINGS, store=store).load()
    assert store.ready


async def test_an_unchanged_directory_does_not_rebuild_the_keyrings(directory):
    store = KeyStore()
    source = DirectoryKeySource(directory, settings=SETTINGS, store=store)
    await source.load()
    ring = store.keyring("shop")
    await source.load()
    assert store.keyring("shop") is ring
    (directory / "b.yaml").write_text(yaml.safe_dump(key_secret("b", random_key())))
    await source.load()
    assert store.keyring("shop") is not ring
