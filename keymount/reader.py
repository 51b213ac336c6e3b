"""Read the keys keymount mounts at /encryption-keys, by the rule of docs/contract.md,
"What an application does". Standard library only: no cryptography library is needed
to read keys (keymount/example.py shows one way to use them).

    from keymount.reader import KeyDirectory
    keys = KeyDirectory()                       # /encryption-keys
    number, key = keys.active()                 # encrypt with key; store number
    key = keys.get(number)                      # decrypt a record that stored number

The kubelet writes a projected volume atomically: the files live in a timestamped
directory (`..2026_12_02_13_00_00.123456789`), the symlink `..data` points at it, and
each visible name is a symlink through `..data`. An update writes a new timestamped
directory, renames a new `..data` over the old one, then deletes the old directory.
So every call here resolves `..data` once and reads everything from the directory it
named, then checks that `..data` still names it: a call sees one version of the
directory, never a mix of two, and never a version the kubelet was deleting. A
version's files never change, so what was read is kept until `..data` moves: a call
with nothing changed costs one readlink. A directory without `..data` (a copy, a
test) is read as it is, on every call.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from .keyrule import decode_key

DEFAULT_PATH = "/encryption-keys"
FILE_PREFIX = "encryption-key-"
STAGED_DIR = "staged"
DATA_LINK = "..data"

MAX_KEY_FILE_BYTES = 4096
"""A key file is 32 raw bytes or 44 characters of base64 and a newline; a file larger
than this is invalid without being read."""
MAX_KEY_FILES = 100_000
"""More key files than this in one directory is not a keymount volume; refusing it
bounds the work of one call. keymount sets no limit of its own on a namespace's keys,
so this one must be out of reach: each key adds at least 160 bytes to the Pod (its
source and its entry in keymount.io/status), and the API server takes no request body
over 3 MiB, so no Pod lists even 20,000 (tests/test_reader.py checks the arithmetic)."""
MAX_ATTEMPTS = 50
"""Reads of a directory that changed while it was read, before giving up. The kubelet
swaps a volume at most every sync period (about a minute), so a second attempt is
already rare."""

_KEY_NAME = re.compile(r"encryption-key-([1-9][0-9]{0,8})")
MAX_NUMBER = 999_999_999  # the nine digits of _KEY_NAME, as the webhook numbers keys
# A name that exists but cannot be opened as a file: reported as that name's reason,
# like any other file that is not a key. Anything else is raised and never kept: out of
# file descriptors or memory (the moment's problem), and EACCES/EPERM, which is the
# whole volume's (a non-root container without the Pod's fsGroup: PermissionError,
# as docs/contract.md says), not one file's.
_UNOPENABLE = frozenset({errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR,
                         errno.ENODEV})
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: a FIFO planted under a key's name must not hang the reader.
_FILE_FLAGS = _OPEN_FLAGS | getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = _OPEN_FLAGS | getattr(os, "O_DIRECTORY", 0)


class MissingKey(KeyError):
    """No file has that number, or the directory has no active key."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class InvalidKeyFile(ValueError):
    """A key file is not a valid key (docs/contract.md, "Valid keys"). The message
    names the file and the reason; it never holds the file's bytes."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DirectoryChanging(OSError):
    """The directory changed on every one of MAX_ATTEMPTS reads."""


@dataclass(frozen=True, slots=True)
class _Version:
    """One version of the directory: its key numbers and each key or why it is not one."""

    target: str | None  # what `..data` named; None for a directory without it
    numbers: tuple[int, ...]  # top level, ascending
    staged: tuple[int, ...]
    keys: Mapping[str, bytes] = field(repr=False)  # relative file name -> 32 bytes
    invalid: Mapping[str, str] = field(repr=False)  # relative file name -> reason


class KeyDirectory:
    """The key files under `path`, read as they are at each call.

    Safe to share between threads: a call reads a whole version or reuses the last one
    read, which is replaced in one assignment."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH) -> None:
        self.path = os.fspath(path)
        self._last: _Version | None = None

    def numbers(self) -> list[int]:
        """The numbers of the top-level key files, ascending (with gaps: never count
        files to find a number)."""
        return list(self._version().numbers)

    def active(self) -> tuple[int, bytes]:
        """The highest top-level number and its key: what new data is encrypted with.
        Raises MissingKey when there is none, InvalidKeyFile when that file is not a
        key (never falls back to an older key)."""
        version = self._version()
        if not version.numbers:
            raise MissingKey(f"no active key in {self.path}: it has no {FILE_PREFIX}<n> "
                             f"file at its top level (is the keymount volume mounted "
                             f"there? `kubectl describe pod` lists the Pod's volumes)")
        number = version.numbers[-1]
        return number, self._key(version, f"{FILE_PREFIX}{number}")

    def get(self, number: int) -> bytes:
        """The key numbered `number`: `encryption-key-<n>`, else
        `staged/encryption-key-<n>` (a key the kubelet delivered before any Pod
        encrypts with it). Raises MissingKey when neither exists."""
        if isinstance(number, bool) or not isinstance(number, int):
            raise TypeError(f"a key number is an int, not {type(number).__name__}")
        if not 1 <= number <= MAX_NUMBER:
            # Not formatted: an int of thousands of digits cannot be (and a number read
            # from a record may be anything).
            raise MissingKey(f"no key has that number in {self.path}: key numbers run "
                             f"from 1 to {MAX_NUMBER}")
        version = self._version()
        if number in version.numbers:
            return self._key(version, f"{FILE_PREFIX}{number}")
        if number in version.staged:
            return self._key(version, f"{STAGED_DIR}/{FILE_PREFIX}{number}")
        listed = ", ".join(map(str, version.numbers)) or "none"
        raise MissingKey(f"no key numbered {number} in {self.path} (neither "
                         f"{FILE_PREFIX}{number} nor {STAGED_DIR}/{FILE_PREFIX}{number}); "
                         f"its numbers: {listed}")

    def _key(self, version: _Version, name: str) -> bytes:
        if name in version.invalid:
            raise InvalidKeyFile(os.path.join(self.path, name), version.invalid[name])
        return version.keys[name]

    def _version(self) -> _Version:
        for _ in range(MAX_ATTEMPTS):
            target = _data_target(self.path)
            last = self._last
            if target is not None and last is not None and last.target == target:
                return last
            try:
                version = _read_version(self.path, target)
            except FileNotFoundError:
                if target is None or _data_target(self.path) == target:
                    raise  # no such directory, or `..data` names one that is not there
                continue  # the version was deleted after a newer one replaced it
            if target is not None:
                if _data_target(self.path) != target:
                    continue  # swapped while read: what was read may be incomplete
                self._last = version
            return version
        raise DirectoryChanging(errno.EAGAIN, f"{self.path} changed during each of "
                                              f"{MAX_ATTEMPTS} reads")


def _data_target(path: str) -> str | None:
    """Where `..data` points, or None when the directory has no `..data` symlink."""
    try:
        return os.readlink(os.path.join(path, DATA_LINK))
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.EINVAL:  # not a symlink: read the directory as it is
            return None
        raise


def _read_version(path: str, target: str | None) -> _Version:
    """Every key file of one version. Raises FileNotFoundError when the version's
    directory is not there (a swap may have deleted it)."""
    directory = path if target is None else os.path.join(path, target)
    keys: dict[str, bytes] = {}
    invalid: dict[str, str] = {}
    try:
        top_fd = os.open(directory, _DIR_FLAGS)
        try:
            numbers = _read_keys(top_fd, "", keys, invalid, shown=path)
            try:
                staged_fd = os.open(STAGED_DIR, _DIR_FLAGS, dir_fd=top_fd)
            except OSError as error:
                if error.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                staged: list[int] = []  # no staged/ directory (a file or a loop is none)
            else:
                try:
                    staged = _read_keys(staged_fd, f"{STAGED_DIR}/", keys, invalid,
                                        shown=path)
                finally:
                    os.close(staged_fd)
        finally:
            os.close(top_fd)
    except BaseException:
        # A traceback keeps every frame's locals, and error reporters (Sentry, pytest
        # --showlocals) print them: the keys read so far go before the error does.
        keys.clear()
        raise
    return _Version(target, tuple(numbers), tuple(staged), keys, invalid)


def _read_keys(dir_fd: int, prefix: str, keys: dict[str, bytes], invalid: dict[str, str],
               *, shown: str) -> list[int]:
    numbers = sorted(int(match.group(1)) for name in os.listdir(dir_fd)
                     if (match := _KEY_NAME.fullmatch(name)))
    if len(numbers) > MAX_KEY_FILES:
        raise InvalidKeyFile(os.path.join(shown, prefix),
                             f"holds {len(numbers)} key files, more than {MAX_KEY_FILES}: "
                             f"not a keymount volume")
    for number in numbers:
        _read_key(dir_fd, f"{FILE_PREFIX}{number}", prefix, keys, invalid)
    return numbers


def _read_key(dir_fd: int, name: str, prefix: str, keys: dict[str, bytes],
              invalid: dict[str, str]) -> None:
    """One file into `keys` or `invalid`; its bytes live only in this call's frame
    (see _read_version)."""
    value, reason = _read_file(dir_fd, name)
    if reason:
        invalid[prefix + name] = reason
        return
    decoded = decode_key(value, subject="the file")
    if decoded.valid:
        keys[prefix + name] = decoded.key
    else:
        invalid[prefix + name] = decoded.reason


def _read_file(dir_fd: int, name: str) -> tuple[bytes, str]:
    """(contents, "") or (b"", why it was not read), reading at most
    MAX_KEY_FILE_BYTES + 1 bytes.

    A file listed but gone by the time it is opened is reported, not raised: when a
    swap deleted it, the caller sees `..data` moved and reads the new version."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return b"", "the file is listed but cannot be opened (a dangling symlink?)"
    except OSError as error:
        if error.errno not in _UNOPENABLE:
            raise
        return b"", f"the file cannot be opened ({os.strerror(error.errno)})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return b"", "the file is not a regular file (a directory, FIFO or device)"
        if info.st_size > MAX_KEY_FILE_BYTES:
            return b"", (f"the file holds {info.st_size} bytes, more than a key file "
                         f"ever does ({MAX_KEY_FILE_BYTES}); need exactly 32 raw bytes or "
                         f"base64 of 32 bytes")
        chunks = []
        remaining = MAX_KEY_FILE_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        value = b"".join(chunks)
    finally:
        os.close(fd)
    if len(value) > MAX_KEY_FILE_BYTES:
        return b"", (f"the file holds more than {MAX_KEY_FILE_BYTES} bytes; need exactly "
                     f"32 raw bytes or base64 of 32 bytes")
    return value, ""
