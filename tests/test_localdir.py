"""The local-directory key source (--keys-from): parsing, reload, bad files lose nothing."""

import asyncio
import base64
import json
import logging
import os
import socket
import threading

import pytest
import yaml

from webhook import localdir
from webhook.config import Settings
from webhook.localdir import (
    DirectoryKeySource,
    ManifestError,
    parse_key_documents,
    read_manifest,
)
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
    assert str(directory / "a.yaml") in caplog.text


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


async def test_a_manifest_unreadable_at_start_holds_readiness_back_until_it_reads(
        directory, caplog):
    # At start no file has previous keys to keep: a ready store without b.yaml's key
    # would inject backend Pods without it (keymount inject refuses to, for the same
    # reason). serve retries the first load, /readyz 503, until the file reads.
    (directory / "b.yaml").write_text("kind: Secret\n  bad: [indent\n")
    store = KeyStore()
    source = DirectoryKeySource(directory, settings=SETTINGS, store=store)
    with pytest.raises(ManifestError, match=r"b\.yaml"):
        await source.load()
    assert not store.ready and store.keyring("shop").keys == ()
    (directory / "b.yaml").write_text(yaml.safe_dump(key_secret("b", random_key())))
    await source.load()
    assert store.ready
    assert [r.name for r in store.keyring("shop").keys] == ["a", "b"]


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


# --- files that are not regular files, or cannot be read ----------------------------------

def finishes(call, *, timeout: float = 10.0):
    """`call()` in a daemon thread; its result, or a failure if it is still running at
    the deadline (blocked opening a FIFO, say) instead of hanging the test run."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def fifo(tmp_path, request):
    """A FIFO at tmp_path/x.yaml; teardown opens it for writing, which frees a reader
    still blocked in open() when the code under test regresses."""
    path = tmp_path / "x.yaml"
    os.mkfifo(path)
    request.addfinalizer(lambda: free_reader(path))
    return path


def free_reader(path):
    """Open a FIFO for writing, which lets a reader blocked in open() go on."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # not a FIFO, or no reader waiting: nothing to free


def make_socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays behind


def make_symlink_to_fifo(path):
    os.mkfifo(path.parent / "pipe")
    path.symlink_to(path.parent / "pipe")


@pytest.mark.parametrize("make, kind", [
    (os.mkfifo, "a FIFO"),
    (make_socket, "a socket"),
    (os.mkdir, "a directory"),
    (make_symlink_to_fifo, "a symlink to a FIFO"),
], ids=["fifo", "socket", "directory", "symlink-to-fifo"])
def test_an_entry_that_is_not_a_regular_file_is_skipped_with_a_warning_naming_it(
        directory, make, kind, request):
    special = directory / "x.yaml"
    make(special)
    request.addfinalizer(lambda: free_reader(special))
    source = DirectoryKeySource(directory, settings=SETTINGS, store=KeyStore())
    records = finishes(source.scan)
    assert [r.name for r in records] == ["a"]
    assert source.skipped == {special: f"skipping {special}: {kind}, not a regular file"}
    assert source.errors == {}


def test_a_directory_named_like_a_manifest_is_not_entered(directory):
    (directory / "more.yaml").mkdir()
    (directory / "more.yaml" / "b.yaml").write_text(
        yaml.safe_dump(key_secret("b", random_key())))
    source = DirectoryKeySource(directory, settings=SETTINGS, store=KeyStore())
    assert [r.name for r in source.scan()] == ["a"]
    assert list(source.skipped) == [directory / "more.yaml"]


async def test_a_fifo_does_not_hold_the_reload_and_is_logged_once(directory, fifo, caplog):
    store = KeyStore()
    source = DirectoryKeySource(directory, settings=SETTINGS, store=store)
    try:
        with caplog.at_level(logging.WARNING, logger="keymount.localdir"):
            await asyncio.wait_for(source.load(), timeout=10)
            await asyncio.wait_for(source.load(), timeout=10)
    finally:
        # Before the loop closes: closing waits for the thread that load() started.
        free_reader(fifo)
    assert [r.name for r in store.keyring("shop").keys] == ["a"]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping {fifo}: a FIFO, not a regular file"]


def test_reading_a_fifo_refuses_instead_of_waiting_for_a_writer(fifo):
    """The entry may become a FIFO between the scan's stat and its open."""
    with pytest.raises(ManifestError, match="a FIFO, not a regular file"):
        finishes(lambda: read_manifest(fifo))


def test_a_manifest_over_the_size_cap_is_refused_naming_file_and_cap(directory, monkeypatch):
    monkeypatch.setattr(localdir, "MAX_MANIFEST_BYTES", 1024 * 1024)
    big = directory / "big.yaml"
    big.write_text("# padding\n" * (1024 * 1024 // 10 + 1))
    source = DirectoryKeySource(directory, settings=SETTINGS, store=KeyStore())
    assert [r.name for r in source.scan()] == ["a"]
    assert source.errors == {big: f"{big}: larger than 1 MiB, the most keymount reads from "
                                  "one manifest; split the keys across files"}


def test_a_file_that_grows_past_the_cap_after_its_stat_is_not_read_whole(tmp_path):
    path = tmp_path / "grown.yaml"
    path.write_text("a: b\n" * 10)
    with pytest.raises(ManifestError, match=r"grown\.yaml: larger than"):
        read_manifest(path, limit=20)


LEAKY = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"  # looks like a base64 key


@pytest.mark.parametrize("loader", [localdir.SAFE_LOADER, yaml.SafeLoader],
                         ids=["libyaml", "pure-python"])
@pytest.mark.parametrize("text, line", [
    (f"kind: Secret\ndata:\n  encryption-key: {LEAKY}: oops\n", 3),
    (f"kind: Secret\ndata:\n  encryption-key: !{LEAKY} x\n", 3),
    (f"kind: Secret\ndata:\n  encryption-key: *{LEAKY}\n", 3),
    (f"kind: Secret\ndata: {{encryption-key: [{LEAKY}\n", 3),
], ids=["line-snippet", "unknown-tag", "undefined-alias", "unclosed-flow"])
async def test_a_broken_manifest_is_logged_naming_the_file_never_its_content(
        directory, monkeypatch, caplog, loader, text, line):
    monkeypatch.setattr(localdir, "SAFE_LOADER", loader)
    store = KeyStore()
    source = DirectoryKeySource(directory, settings=SETTINGS, store=store)
    await source.load()
    (directory / "a.yaml").write_text(text)
    with caplog.at_level(logging.ERROR, logger="keymount.localdir"):
        await source.load()
    [record] = caplog.records
    assert record.getMessage().startswith(f"{directory / 'a.yaml'}: not valid YAML at line ")
    assert record.getMessage().endswith("; keeping its previous keys")
    assert f"line {line}," in record.getMessage()
    assert LEAKY not in caplog.text and LEAKY[:8] not in caplog.text
    assert [r.name for r in store.keyring("shop").keys] == ["a"]


@pytest.mark.parametrize("text", [
    "kind: Secret\nmetadata: 5\n",
    "kind: List\nitems: 5\n",
    "kind: Secret\nmetadata: {labels: {keymount.io/encryption-key: 'true'}}\ndata: 5\n",
], ids=["metadata-not-a-mapping", "items-not-a-list", "data-not-a-mapping"])
def test_a_document_not_shaped_like_a_secret_is_an_error_naming_the_file(tmp_path, text):
    (tmp_path / "odd.yaml").write_text(text)
    source = DirectoryKeySource(tmp_path, settings=SETTINGS, store=KeyStore())
    assert source.scan() == []
    assert source.errors[tmp_path / "odd.yaml"].startswith(
        f"{tmp_path / 'odd.yaml'}: not a Secret manifest keymount can read")


@pytest.mark.parametrize("metadata", [
    "{name: [k], labels: {keymount.io/encryption-key: 'true'}}",
    "{name: 2026, labels: {keymount.io/encryption-key: 'true'}}",
    "{name: k, namespace: 1234, labels: {keymount.io/encryption-key: 'true'}}",
], ids=["name-a-list", "name-a-number", "namespace-a-number"])
async def test_a_document_whose_name_is_not_a_string_is_a_file_error_and_the_reload_goes_on(
        directory, metadata):
    # YAML reads `name: 2026` as a number; the API server would refuse such a manifest.
    # It must be one file's error (its keys kept, the file named), not an exception
    # that ends the reload task: that leaves /readyz green on a cache that never
    # changes again (a key added later is never mounted).
    store = KeyStore()
    source = DirectoryKeySource(directory, settings=SETTINGS, store=store, poll_interval=0.02)
    await source.load()
    task = asyncio.create_task(source.run())
    try:
        (directory / "odd.yaml").write_text(
            f"kind: Secret\nmetadata: {metadata}\n"
            f"data: {{encryption-key: {base64.b64encode(random_key()).decode()}}}\n"
            f"---\n" + yaml.safe_dump(key_secret("other", random_key())))
        (directory / "b.yaml").write_text(yaml.safe_dump(key_secret("b", random_key())))
        await wait_for(lambda: "b" in {r.name for r in store.keyring("shop").keys}
                       or task.done(), what="b.yaml loaded")
        assert not task.done(), task.exception()
        assert [r.name for r in store.keyring("shop").keys] == ["a", "b"]
        assert source.errors[directory / "odd.yaml"].startswith(
            f"{directory / 'odd.yaml'}: not a Secret manifest keymount can read")
        assert all(isinstance(ns, str) for ns in store.namespaces())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
