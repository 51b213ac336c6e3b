"""keymount.reader: what an application reads from the key directory
(docs/contract.md, "What an application does")."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import traceback
import tracemalloc
from pathlib import Path

import pytest

from keymount import reader
from keymount.reader import InvalidKeyFile, KeyDirectory, MissingKey
from webhook.keys import check_key
from webhook.names import FILE_PREFIX, key_file_name

from atomicwriter import payload, swap

ROOT = Path(__file__).resolve().parents[1]


def key(n: int, tag: str = "") -> bytes:
    """32 distinct, valid key bytes for number n (tag tells versions apart)."""
    return hashlib.sha256(f"key {n} {tag}".encode()).digest()


def lay_out(directory: Path, files: dict[str, bytes], layout: str) -> None:
    """`files` as the kubelet writes a projected volume, or as a plain directory."""
    if layout == "kubelet":
        swap(directory, files)
        return
    for relative, content in files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_bytes(content)


LAYOUTS = pytest.mark.parametrize("layout", ["kubelet", "plain"])


def test_the_kubelet_layout_is_the_one_the_reader_must_see_through(tmp_path):
    """The helper lays a volume out as the kubelet does: visible names are symlinks
    through ..data, which names a timestamped directory; the old one is gone after a
    swap."""
    swap(tmp_path, payload({1: key(1)}, staged={2: key(2)}))
    first = os.readlink(tmp_path / "..data")
    swap(tmp_path, payload({1: key(1), 2: key(2)}))
    assert first.startswith("..") and not (tmp_path / first).exists()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["..data", os.readlink(tmp_path / "..data"), "encryption-key-1", "encryption-key-2"])
    assert os.readlink(tmp_path / "encryption-key-2") == "..data/encryption-key-2"
    assert (tmp_path / "encryption-key-2").read_bytes() == key(2)


@LAYOUTS
def test_numbers_have_gaps_the_highest_is_active_and_staged_keys_are_found(tmp_path, layout):
    lay_out(tmp_path, payload({1: key(1), 3: key(3), 7: key(7)}, staged={8: key(8)}), layout)
    keys = KeyDirectory(tmp_path)
    assert keys.numbers() == [1, 3, 7]
    assert keys.active() == (7, key(7))
    assert keys.get(3) == key(3)
    assert keys.get(8) == key(8)


@LAYOUTS
def test_a_top_level_key_is_preferred_over_a_staged_file_of_its_number(tmp_path, layout):
    lay_out(tmp_path, payload({1: key(1), 2: key(2)}, staged={2: key(2, "staged")}), layout)
    assert KeyDirectory(tmp_path).get(2) == key(2)


@pytest.mark.parametrize(("content", "number"), [
    pytest.param(lambda k: k, 5, id="raw"),
    pytest.param(lambda k: base64.b64encode(k) + b"\n", 5, id="base64-newline"),
    pytest.param(lambda k: base64.urlsafe_b64encode(k).rstrip(b"="), 5, id="urlsafe-unpadded"),
])
def test_a_key_file_is_raw_or_base64_as_the_webhook_accepts(tmp_path, content, number):
    lay_out(tmp_path, payload({number: content(key(number))}), "kubelet")
    assert KeyDirectory(tmp_path).active() == (number, key(number))
    assert check_key(content(key(number))).valid


@pytest.mark.parametrize(("content", "reason"), [
    pytest.param(key(2)[:31], "the file holds 31 bytes; need exactly 32 raw bytes or base64 "
                              "of 32 bytes", id="31-raw-bytes"),
    pytest.param(key(2) + b"\x00", "the file holds 33 bytes", id="33-raw-bytes"),
    pytest.param(base64.b64encode(key(2)[:16]), "the file is base64 of 16 bytes; need base64 "
                                                "of exactly 32 bytes", id="base64-of-16"),
    pytest.param(base64.b64encode(key(2))[:-3] + b"!!!", "the file holds 44 bytes",
                 id="bad-base64"),
    pytest.param(b"", "the file is empty (0 bytes)", id="empty"),
    pytest.param(b"\x07" * 32, "key is degenerate: all 32 bytes are equal", id="degenerate"),
    pytest.param(base64.b64encode(key(2)) * 100, "more than a key file ever does (4096)",
                 id="oversize"),
])
def test_an_invalid_file_is_named_with_the_reason_and_never_its_bytes(tmp_path, content,
                                                                      reason):
    lay_out(tmp_path, payload({1: key(1), 2: content}), "kubelet")
    keys = KeyDirectory(tmp_path)
    with pytest.raises(InvalidKeyFile) as raised:
        keys.active()  # never falls back to key 1 for new data
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert message.startswith(f"{tmp_path}/encryption-key-2: ") and reason in message
    assert raised.value.path == f"{tmp_path}/encryption-key-2"
    for secret in (key(2), key(2)[:16], base64.b64encode(key(2))[:16]):
        assert secret.decode("latin-1") not in message and secret.hex() not in message
    assert keys.get(1) == key(1)  # one bad file spoils only its own number


def test_a_huge_key_file_is_refused_by_its_size_without_being_read(tmp_path):
    lay_out(tmp_path, payload({1: key(1)}), "plain")
    with (tmp_path / "encryption-key-2").open("wb") as huge:
        huge.truncate(1 << 40)  # sparse: reading it whole would take hours
    with pytest.raises(InvalidKeyFile, match=f"holds {1 << 40} bytes, more than"):
        KeyDirectory(tmp_path).active()


@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling-symlink"])
def test_a_key_name_that_is_no_regular_file_is_invalid_not_a_hang(tmp_path, kind):
    lay_out(tmp_path, payload({1: key(1)}), "plain")
    target = tmp_path / "encryption-key-2"
    {"directory": target.mkdir, "fifo": lambda: os.mkfifo(target),
     "dangling-symlink": lambda: target.symlink_to("nowhere")}[kind]()
    with pytest.raises(InvalidKeyFile, match="encryption-key-2: the file "):
        KeyDirectory(tmp_path).active()


@pytest.mark.parametrize("kind", ["symlink-loop", "socket"])
def test_a_key_name_that_cannot_be_opened_spoils_only_its_own_number(tmp_path, kind):
    # One entry the reader cannot open (ELOOP, ENXIO) used to raise a bare OSError from
    # every call, active() included; it is an invalid file like any other.
    lay_out(tmp_path, payload({1: key(1), 3: key(3)}), "plain")
    bad = tmp_path / "encryption-key-2"
    if kind == "symlink-loop":
        bad.symlink_to("encryption-key-2")
    else:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(bad))
    keys = KeyDirectory(tmp_path)
    assert keys.active() == (3, key(3))
    with pytest.raises(InvalidKeyFile, match="encryption-key-2: the file cannot be opened"):
        keys.get(2)


@pytest.mark.parametrize("error", [errno.EACCES, errno.EPERM], ids=["EACCES", "EPERM"])
def test_a_key_file_the_container_may_not_read_is_a_permission_error(tmp_path, monkeypatch,
                                                                     error):
    # A non-root container without the Pod's fsGroup: the kubelet's files are 0440
    # root:root. That is the whole volume's problem, not one key's: PermissionError as
    # docs/contract.md says (an InvalidKeyFile would call a good key invalid).
    lay_out(tmp_path, payload({1: key(1)}), "kubelet")
    real_open = os.open

    def not_permitted(name, *args, **kwargs):
        if str(name) == "encryption-key-1":
            raise OSError(error, os.strerror(error))
        return real_open(name, *args, **kwargs)
    monkeypatch.setattr(reader.os, "open", not_permitted)
    with pytest.raises(OSError) as raised:
        KeyDirectory(tmp_path).active()
    assert raised.value.errno == error and not isinstance(raised.value, InvalidKeyFile)


def test_a_staged_entry_that_loops_is_no_staged_directory(tmp_path):
    lay_out(tmp_path, payload({1: key(1)}), "plain")
    (tmp_path / "staged").symlink_to("staged")
    assert KeyDirectory(tmp_path).active() == (1, key(1))


def test_no_key_bytes_stay_in_the_locals_of_a_read_that_fails(tmp_path, monkeypatch):
    # Out of file descriptors while reading key 2: the traceback's frames (which error
    # reporters print with their locals) must not hold key 1, read a moment before.
    swap(tmp_path, payload({1: key(1), 2: key(2)}))
    real_open = os.open

    def out_of_fds(name, *args, **kwargs):
        if str(name) == "encryption-key-2":
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(name, *args, **kwargs)
    monkeypatch.setattr(reader.os, "open", out_of_fds)
    with pytest.raises(OSError) as raised:  # never kept: the next call reads again
        KeyDirectory(tmp_path).active()
    monkeypatch.undo()
    text = "".join(traceback.TracebackException.from_exception(
        raised.value, capture_locals=True).format())
    leaked = [line.strip().split(" = ")[0] for line in text.splitlines()
              if repr(key(1))[2:-1] in line or key(1).hex() in line]
    assert leaked == [], f"key bytes in the locals {leaked}"


def test_more_key_files_than_the_reader_reads_cannot_reach_a_pod():
    # keymount limits no namespace's number of keys (it warns above a few); the reader
    # refuses a directory with more than MAX_KEY_FILES. Each key adds its source and its
    # keymount.io/status entry to the Pod, and the API server takes no body over 3 MiB:
    # the reader's limit is past any Pod's, with the shortest Secret names.
    from webhook.config import Settings
    from webhook.injection import build_volume

    from builders import key_secret, keyring_of
    count = 50
    ring = keyring_of(*(key_secret(chr(ord("a") + n % 26) + str(n // 26) if n >= 26
                                   else chr(ord("a") + n), key(n), index=n)
                        for n in range(1, count + 1)))
    sources = build_volume(ring, settings=Settings())["projected"]["sources"]
    per_key = (len(json.dumps(sources, separators=(",", ":")))
               + len(ring.status)) / count
    assert per_key >= 160
    assert reader.MAX_KEY_FILES * 160 > 3 * 2**20 * 5  # five times past, at least


def test_a_volume_with_more_than_a_thousand_keys_is_read(tmp_path):
    # The limit used to be 1,024: an hourly rotation passes it in 43 days, and then no
    # key could be read at all.
    count = 1100
    lay_out(tmp_path, payload({n: key(n) for n in range(1, count + 1)}), "plain")
    keys = KeyDirectory(tmp_path)
    assert keys.active() == (count, key(count))
    assert keys.get(1) == key(1)


@pytest.mark.parametrize("number", [0, -1, 10**9, 10**5000], ids=["zero", "negative",
                                                                  "ten-digits", "huge"])
def test_a_number_no_key_can_have_is_a_missing_key(tmp_path, number):
    # A number decoded from a stored record may be anything; 10**5000 cannot even be
    # formatted (Python's int-to-str limit), which used to raise ValueError.
    lay_out(tmp_path, payload({1: key(1)}), "plain")
    with pytest.raises(MissingKey, match="key numbers run from 1 to 999999999"):
        KeyDirectory(tmp_path).get(number)


@LAYOUTS
def test_missing_key_is_a_key_error_that_lists_the_numbers(tmp_path, layout):
    lay_out(tmp_path, payload({1: key(1), 4: key(4)}), layout)
    with pytest.raises(KeyError) as raised:
        KeyDirectory(tmp_path).get(2)
    assert isinstance(raised.value, MissingKey)
    assert str(raised.value) == (f"no key numbered 2 in {tmp_path} (neither encryption-key-2 "
                                 f"nor staged/encryption-key-2); its numbers: 1, 4")


@pytest.mark.parametrize("files", [
    pytest.param({}, id="empty"),
    pytest.param(payload({}, staged={2: key(2)}), id="only-staged"),
])
def test_no_active_key_is_a_missing_key(tmp_path, files):
    (tmp_path / "keys").mkdir()
    lay_out(tmp_path / "keys", files, "kubelet" if files else "plain")
    with pytest.raises(MissingKey, match=r"no active key in .*: it has no encryption-key-<n>"):
        KeyDirectory(tmp_path / "keys").active()


def test_a_missing_directory_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        KeyDirectory(tmp_path / "absent").numbers()


def test_a_key_number_is_an_int(tmp_path):
    lay_out(tmp_path, payload({1: key(1)}), "plain")
    with pytest.raises(TypeError, match="not str"):
        KeyDirectory(tmp_path).get("1")  # type: ignore[arg-type]


@LAYOUTS
def test_names_that_are_not_key_files_are_ignored(tmp_path, layout):
    others = {name: b"x" for name in ("encryption-key-01", "encryption-key-0", "encryption-key-",
                                      "encryption-key-3.bak", "README", "staged/other",
                                      "ca.crt", "encryption-key-1234567890")}
    lay_out(tmp_path, payload({2: key(2), 3: key(3)}, **others), layout)
    keys = KeyDirectory(tmp_path)
    assert keys.numbers() == [2, 3]
    assert keys.active() == (3, key(3))


def test_a_swap_between_two_calls_is_seen_by_the_next_call(tmp_path):
    """The staged rotation as an application sees it, with one KeyDirectory and no
    restart: a new key arrives staged, becomes active, and an old one goes."""
    keys = KeyDirectory(tmp_path)
    swap(tmp_path, payload({1: key(1)}))
    assert keys.active() == (1, key(1))
    with pytest.raises(MissingKey):
        keys.get(2)
    swap(tmp_path, payload({1: key(1)}, staged={2: key(2)}))
    assert keys.active() == (1, key(1))  # staged: decrypts, does not encrypt
    assert keys.get(2) == key(2)
    swap(tmp_path, payload({1: key(1), 2: key(2)}))
    assert (keys.active(), keys.numbers()) == ((2, key(2)), [1, 2])
    swap(tmp_path, payload({2: key(2)}))
    assert keys.numbers() == [2]
    with pytest.raises(MissingKey):
        keys.get(1)


class CountingOs:
    """The `os` the reader sees, counting the calls that touch the filesystem."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name not in {"open", "listdir", "readlink", "fstat", "read"}:
            return real

        def counted(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)
        return counted


def test_an_unchanged_volume_costs_one_readlink_per_call(tmp_path, monkeypatch):
    swap(tmp_path, payload({n: key(n) for n in range(1, 11)}))
    keys = KeyDirectory(tmp_path)
    counting = CountingOs()
    monkeypatch.setattr(reader, "os", counting)
    keys.active()
    assert counting.calls.count("open") == 12  # the version, staged/ (absent), 10 keys
    counting.calls.clear()
    assert (keys.active(), keys.get(3)) == ((10, key(10)), key(3))
    assert counting.calls == ["readlink", "readlink"]
    swap(tmp_path, payload({n: key(n, "new") for n in range(1, 12)}))
    assert keys.active() == (11, key(11, "new"))


def test_a_plain_directory_is_read_afresh_on_every_call(tmp_path):
    lay_out(tmp_path, payload({1: key(1)}), "plain")
    keys = KeyDirectory(tmp_path)
    assert keys.active() == (1, key(1))
    (tmp_path / "encryption-key-2").write_bytes(key(2))
    assert keys.active() == (2, key(2))


def test_a_data_link_to_a_missing_directory_is_a_file_not_found_error(tmp_path):
    swap(tmp_path, payload({1: key(1)}))
    (tmp_path / "..data").unlink()
    (tmp_path / "..data").symlink_to("..2026_gone")
    with pytest.raises(FileNotFoundError):
        KeyDirectory(tmp_path).active()


def test_the_reader_names_files_as_the_webhook_mounts_them():
    assert reader.FILE_PREFIX == FILE_PREFIX
    assert key_file_name(12) == f"{reader.FILE_PREFIX}12"


@pytest.mark.parametrize("module", ["keymount", "keymount.reader", "keymount.keyrule"])
def test_importing_the_reader_loads_none_of_the_webhooks_dependencies(module):
    loaded = json.loads(subprocess.run(
        [sys.executable, "-c", f"import json, sys, {module}; print(json.dumps(list(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout)
    forbidden = {"aiohttp", "kubernetes", "cryptography", "yaml", "jsonpatch", "msgspec",
                 "orjson", "prometheus_client", "pyrage", "uvloop", "webhook"}
    assert module in loaded
    assert sorted({name.split(".")[0] for name in loaded} & forbidden) == []


def run_example(directory: Path, records: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keymount.example", "--dir", str(directory),
         "--records", str(records), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_example_keeps_decrypting_records_written_before_a_rotation(tmp_path):
    volume, records = tmp_path / "volume", tmp_path / "records"
    volume.mkdir()
    swap(volume, payload({1: key(1)}))
    first = run_example(volume, records, "--text", "before")
    assert (first.returncode, first.stderr) == (0, "")
    assert first.stdout.splitlines() == [f"keys in {volume}: 1", "wrote record 1 with key 1",
                                         "record 1: key 1: before"]
    swap(volume, payload({1: key(1)}, staged={3: key(3)}))
    swap(volume, payload({1: key(1), 3: key(3)}))
    second = run_example(volume, records, "--text", "after")
    assert (second.returncode, second.stderr) == (0, "")
    assert second.stdout.splitlines() == [f"keys in {volume}: 1, 3",
                                          "wrote record 2 with key 3",
                                          "record 1: key 1: before", "record 2: key 3: after"]
    header = base64.b64decode(records.read_text().splitlines()[1])[:5]
    assert header == b"\x01\x00\x00\x00\x03"  # format 1, key number 3, big-endian
    for secret in (key(1), key(3)):
        assert secret.hex() not in first.stdout + second.stdout


def test_the_example_bounds_a_record_line_before_reading_it(tmp_path):
    from keymount import example
    records = tmp_path / "records"
    records.write_bytes(b"A" * (16 * example.MAX_RECORD_LINE))  # 16 MiB, no newline
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"records:1: longer than "
                                             f"{example.MAX_RECORD_LINE} bytes"):
            example.read_records(records)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * example.MAX_RECORD_LINE, f"peak {peak} bytes"


@pytest.mark.parametrize(("change", "error"), [
    pytest.param("remove-key-1", "error: no key numbered 1 in ", id="key-gone"),
    pytest.param("replace-key-1", "error: the record does not decrypt with key 1", id="other-key"),
    pytest.param("empty-volume", "error: no active key in ", id="no-key"),
])
def test_the_example_fails_with_the_reason_and_exit_code_1(tmp_path, change, error):
    volume, records = tmp_path / "volume", tmp_path / "records"
    volume.mkdir()
    swap(volume, payload({1: key(1)}))
    assert run_example(volume, records).returncode == 0
    swap(volume, {"remove-key-1": payload({2: key(2)}),
                  "replace-key-1": payload({1: key(1, "other")}),
                  "empty-volume": {"README": b"no keys"}}[change])
    failed = run_example(volume, records)
    assert failed.returncode == 1 and failed.stderr.startswith(error), failed.stderr
