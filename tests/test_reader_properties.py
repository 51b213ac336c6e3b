"""keymount.reader under the kubelet's swaps: whenever a swap happens, a call returns
what the directory held before it or what it holds after it, never a mix of the two.
And the reader judges a file exactly as the webhook judges a Secret's key field."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymount import reader
from keymount.reader import InvalidKeyFile, KeyDirectory, MissingKey
from webhook.keys import check_key, fingerprint_key

from atomicwriter import payload, swap, swap_steps


def key(n: int, tag: str) -> bytes:
    return hashlib.sha256(f"key {n} {tag}".encode()).digest()


NUMBERS = st.frozensets(st.integers(1, 9), max_size=4)
VERSIONS = st.tuples(NUMBERS, st.frozensets(st.integers(1, 9), max_size=2))
CALLS = st.one_of(st.just(("numbers", 0)), st.just(("active", 0)),
                  st.tuples(st.just("get"), st.integers(1, 10)))


def files_of(version, tag: str) -> dict[str, bytes]:
    top, staged = version
    return payload({n: key(n, tag) for n in top},
                   staged={n: key(n, f"{tag} staged") for n in staged})


def expected(version, tag: str, call) -> tuple[str, object]:
    """What a call returns on one version of the directory, by the rule itself."""
    top, staged = version
    kind, number = call
    if kind == "numbers":
        return "value", sorted(top)
    if kind == "active":
        return ("value", (max(top), key(max(top), tag))) if top else ("raise", "MissingKey")
    if number in top:
        return "value", key(number, tag)
    if number in staged:
        return "value", key(number, f"{tag} staged")
    return "raise", "MissingKey"


def outcome(keys: KeyDirectory, call) -> tuple[str, object]:
    kind, number = call
    try:
        if kind == "numbers":
            return "value", keys.numbers()
        return "value", keys.active() if kind == "active" else keys.get(number)
    except MissingKey:
        return "raise", "MissingKey"


class SwappingOs:
    """The `os` the reader sees: before its i-th filesystem call, the kubelet's swap
    advances `advances[i]` steps."""

    def __init__(self, steps, advances: list[int]) -> None:
        self.steps = steps
        self.advances = advances
        self.calls = 0

    def __getattr__(self, name: str):
        real = getattr(os, name)
        if name not in {"open", "listdir", "readlink", "fstat", "read", "close"}:
            return real

        def interleaved(*args, **kwargs):
            if self.calls < len(self.advances):
                for _ in range(self.advances[self.calls]):
                    next(self.steps, None)
            self.calls += 1
            return real(*args, **kwargs)
        return interleaved


def call_during_swap(root: Path, old, new, call, advances: list[int], *, warm: bool):
    swap(root, files_of(old, "old"))
    keys = KeyDirectory(root)
    if warm:
        keys.numbers()  # the version before the swap is cached
    steps = swap_steps(root, files_of(new, "new"))
    with mock.patch.object(reader, "os", SwappingOs(steps, advances)):
        result = outcome(keys, call)
    for _ in steps:
        pass
    return result, outcome(keys, call)


@settings(max_examples=400, deadline=None)
@given(old=VERSIONS, new=VERSIONS, call=CALLS, warm=st.booleans(),
       advances=st.lists(st.integers(0, 4), max_size=80))
def test_a_swap_at_any_step_of_a_call_gives_the_old_or_the_new_version(old, new, call, warm,
                                                                       advances):
    with tempfile.TemporaryDirectory() as root:
        during, after = call_during_swap(Path(root), old, new, call, advances, warm=warm)
    assert during in (expected(old, "old", call), expected(new, "new", call))
    assert after == expected(new, "new", call)  # and the next call sees the new one


def test_reading_through_the_visible_symlinks_would_mix_versions(tmp_path, monkeypatch):
    """What the property above rules out, shown on a reader that lists the visible
    names and opens each through `..data` again, as a naive reader does: the listing
    is the old version's, the bytes the new one's."""
    monkeypatch.setattr(reader, "_data_target", lambda path: None)
    old, new = (frozenset({1, 2}), frozenset()), (frozenset({1, 2, 3}), frozenset())
    # Calls: open the directory, list it, open staged/, then open encryption-key-1:
    # the whole swap happens just before that.
    during, _ = call_during_swap(tmp_path, old, new, ("active", 0), [0, 0, 0, 1000],
                                 warm=False)
    assert during == ("value", (2, key(2, "new")))
    assert during not in (expected(old, "old", ("active", 0)),
                          expected(new, "new", ("active", 0)))


def test_a_swap_racing_calls_in_another_thread_never_gives_a_mix(tmp_path):
    """A thread swaps {1, 2} and {1, 2, 3} (distinct bytes) as fast as it can while this
    one calls the reader; every answer belongs wholly to one of them."""
    a, b = (frozenset({1, 2}), frozenset()), (frozenset({1, 2, 3}), frozenset())
    calls = [("active", 0), ("numbers", 0), ("get", 1), ("get", 2), ("get", 3)]
    allowed = {call: {repr(expected(a, "a", call)), repr(expected(b, "b", call))}
               for call in calls}
    swap(tmp_path, files_of(a, "a"))
    stop = threading.Event()
    swaps = Counter()

    def swapper() -> None:
        while not stop.is_set():
            swap(tmp_path, files_of(b, "b") if swaps["done"] % 2 == 0 else files_of(a, "a"))
            swaps["done"] += 1

    keys = KeyDirectory(tmp_path)
    seen: Counter[int] = Counter()  # active() answers by number
    mixed = []
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while min(seen[2], seen[3], swaps["done"]) < 300:
            assert time.monotonic() < deadline, (seen, swaps)
            for call in calls:
                got = outcome(keys, call)
                if repr(got) not in allowed[call]:
                    mixed.append((call, got))
                if call[0] == "active" and got[0] == "value":
                    seen[got[1][0]] += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert mixed == []


KEY_CONTENT = st.one_of(
    st.binary(max_size=48),
    st.binary(min_size=32, max_size=32),
    st.builds(lambda raw, tail: base64.b64encode(raw) + tail,
              st.binary(min_size=28, max_size=36), st.sampled_from([b"", b"\n", b" \t\n", b"x"])),
    st.builds(lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"="),
              st.binary(min_size=32, max_size=32)),
)


@settings(max_examples=300, deadline=None)
@given(content=KEY_CONTENT)
def test_the_reader_judges_a_file_as_the_webhook_judges_a_key_field(content):
    verdict = check_key(content, subject="the file")
    with tempfile.TemporaryDirectory() as root:
        Path(root, "encryption-key-1").write_bytes(content)
        keys = KeyDirectory(root)
        if verdict.valid:
            assert fingerprint_key(keys.get(1)) == verdict.fingerprint
        else:
            with pytest.raises(InvalidKeyFile) as raised:
                keys.get(1)
            assert raised.value.reason == verdict.reason
