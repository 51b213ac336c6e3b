"""Key source: a local directory of Secret manifests (`--keys-from DIR`;
docs/contract.md, "Key sources").

The embedded default, for running keymount without a cluster and for
`keymount inject --keys-from`. Each file may hold many YAML documents; `data` and
`stringData` are read as the API server reads them. A file that stops parsing keeps the
keys it had (bad input loses nothing), and the error names the file and line only:
YAML error text quotes the offending line, which could be key material. Only regular
files are read: a FIFO, socket or device named `*.yaml` is skipped with a warning, as
opening a FIFO for reading waits for a writer that may never come.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from .config import Settings
from .key_secrets import is_key_secret, parse_key_secret
from .keys import KeyRecord, Keyring
from .store import KeyStore

log = logging.getLogger("keymount.localdir")
# libyaml's safe loader when PyYAML has it (Debian's and PyPI's wheels do): parsing
# 50,000 Secrets takes seconds instead of most of a minute.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# A key Secret is some 330 bytes of YAML, so 64 MiB holds about 200,000 keys in one
# file: four times the largest set benchmarked (50,000 in one file, 16 MiB). A bigger
# file is not a key manifest (a log, a disk image with a .yaml name), and reading it
# whole, then parsing it into objects several times its size, would put the webhook's
# memory at risk. A larger key set can be split across files.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


class ManifestError(ValueError):
    """A manifest file that cannot be read; the message never quotes its content."""


def parse_key_documents(text: str, *, settings: Settings, source: str) -> list[KeyRecord]:
    """Key Secrets of one YAML stream (pure; `source` names it in errors)."""
    records = []
    for document in load_documents(text, source=source):
        if document.get("kind") == "Secret" and is_key_secret(document, settings=settings):
            records.append(_parse_named(document, settings=settings))
        elif document.get("kind") == "List":
            items = [i for i in document.get("items") or [] if isinstance(i, dict)]
            records += [_parse_named(i, settings=settings) for i in items
                        if i.get("kind") == "Secret" and is_key_secret(i, settings=settings)]
    return records


def _parse_named(document: dict[str, Any], *, settings: Settings) -> KeyRecord:
    """parse_key_secret, for a document whose name and namespace are strings, as the API
    server requires (YAML reads `name: 2026` as a number): anything else would reach the
    store as a dict key or a projected source's name. TypeError: the file's error."""
    record = parse_key_secret(document, settings=settings)
    if not isinstance(record.name, str) or not isinstance(record.namespace, str):
        raise TypeError("metadata.name and metadata.namespace must be strings")
    return record


def load_documents(text: str, *, source: str) -> list[dict[str, Any]]:
    if source.endswith(".json"):
        # JSON is YAML too, but orjson reads a list of 50,000 Secrets in well under a
        # second where libyaml takes many; what orjson refuses gets the YAML reading.
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        else:
            return [document] if isinstance(document, dict) else []
    try:
        documents = list(yaml.load_all(text, Loader=SAFE_LOADER))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = safe_problem(exc.problem)
        raise ManifestError(f"{source}: not valid YAML{where}"
                            + (f" ({problem})" if problem else "")) from None
    except yaml.YAMLError:
        raise ManifestError(f"{source}: not valid YAML") from None
    return [d for d in documents if isinstance(d, dict)]


# A quoted repr in a YAML problem, escapes included, and the quoted parts shown as they
# are: one character, or a token name such as <stream end>.
_QUOTED = re.compile(r"('(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*")')
_PARSER_WORD = re.compile(r"<[a-z ]+>|\\?.")


def safe_problem(problem: str | None) -> str:
    """A YAML error's problem without the input it quotes. The parsers quote what they
    found as a repr ("could not determine a constructor for the tag '!…'", "found
    undefined alias '…'"), and a tag or alias may be a pasted key: a quoted part stays
    only if it is one character or a token name ("expected ',' or ']', but got
    '<stream end>'"), else it becomes '…'; an unbalanced quote ends the text. The
    error's snippet (the offending line) is never used."""
    shown = []
    # re.split with a group alternates: unquoted text, a quoted part, unquoted text, ...
    for index, part in enumerate(_QUOTED.split(problem or "")):
        if index % 2:
            shown.append(part if _PARSER_WORD.fullmatch(part[1:-1]) else "'…'")
        elif "'" in part or '"' in part:
            shown.append(re.split("['\"]", part, maxsplit=1)[0])
            break
        else:
            shown.append(part)
    return "".join(shown).strip()


def describe_file_kind(mode: int) -> str | None:
    """What a directory entry is when it is not a regular file (pure; None if it is)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _FILE_KINDS if test(mode)), "a special file")


def describe_skipped(path: Path, kind: str, *, link: bool) -> str:
    """The warning for a manifest-named entry that is not a regular file."""
    return f"skipping {path}: {'a symlink to ' if link else ''}{kind}, not a regular file"


def read_manifest(path: Path, *, limit: int = MAX_MANIFEST_BYTES) -> str:
    """A regular file's text, at most `limit` bytes (blocking). Opened non-blocking and
    checked again on the open descriptor: an entry swapped for a FIFO after the scan's
    stat must not hold the read (and with it every reload) forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with open(fd, "rb") as file:
        info = os.fstat(file.fileno())
        kind = describe_file_kind(info.st_mode)
        if kind is not None:
            raise ManifestError(f"{path}: {kind}, not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise too_large(path, limit)
    return data.decode("utf-8")


def too_large(path: Path, limit: int) -> ManifestError:
    return ManifestError(f"{path}: larger than {limit // (1024 * 1024)} MiB, the most "
                         "keymount reads from one manifest; split the keys across files")


@dataclass
class _FileState:
    stamp: tuple[int, int]
    records: list[KeyRecord] = field(default_factory=list)


def describe_read_error(path: Path, exc: Exception) -> str:
    """One line about an unreadable manifest that quotes none of its content: a
    UnicodeDecodeError's own message shows the offending byte, which may be key
    material (a raw key pasted into stringData)."""
    if isinstance(exc, ManifestError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"{path}: not valid UTF-8 (at byte offset {exc.start}); write keys as base64"
    if isinstance(exc, OSError):
        return f"{path}: {exc.strerror or type(exc).__name__}"
    # parse_key_secret on a document whose metadata, labels or data is not a mapping;
    # the exception's text names Python types only, but its type is all that helps.
    return f"{path}: not a Secret manifest keymount can read ({type(exc).__name__})"


def is_manifest_name(name: str) -> bool:
    return not name.startswith(".") and name.endswith(MANIFEST_SUFFIXES)


def list_manifest_files(directory: Path) -> list[Path]:
    """Manifests below `directory`, skipping hidden entries (such as the `..data`
    links of a mounted ConfigMap or Secret volume, which would count files twice).
    A directory named like a manifest is listed, not entered, so the scan warns of it."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        found += [Path(root, name) for name in sorted(dirs + files) if is_manifest_name(name)]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not is_manifest_name(d))
    return found


class DirectoryKeySource:
    """Fills a KeyStore from a directory and keeps it in step by polling mtimes."""

    def __init__(self, directory: str | os.PathLike[str], *, settings: Settings,
                 store: KeyStore, poll_interval: float = 1.0) -> None:
        self.directory = Path(directory)
        self.settings = settings
        self.store = store
        self.poll_interval = poll_interval
        self._files: dict[Path, _FileState] = {}
        self.errors: dict[Path, str] = {}  # manifests that cannot be read, and why
        self.skipped: dict[Path, str] = {}  # manifest-named entries that are not files
        # What the last scan found that the one before had not, as (level, file, message):
        # load() logs it, so a bad file is reported once, not on every poll.
        self.news: list[tuple[int, Path, str]] = []
        self._lock = asyncio.Lock()  # the poll loop and confirm() must not scan at once
        self.changed = False  # whether the last scan saw any file change

    def scan(self) -> list[KeyRecord]:
        """Re-read the files that changed; returns every key record (blocking I/O)."""
        if not self.directory.is_dir():
            raise ManifestError(f"--keys-from {self.directory}: no such directory")
        seen: dict[Path, _FileState] = {}
        errors: dict[Path, str] = {}
        skipped: dict[Path, str] = {}
        for path in list_manifest_files(self.directory):
            previous = self._files.get(path)
            try:
                # stat, not open: opening a FIFO for reading blocks until a writer comes.
                info = path.stat()
            except FileNotFoundError:
                continue  # gone since the listing, or a dangling link of a volume update
            except OSError as exc:
                errors[path] = describe_read_error(path, exc)
                seen[path] = _FileState((0, 0), previous.records if previous else [])
                continue
            if (kind := describe_file_kind(info.st_mode)) is not None:
                skipped[path] = describe_skipped(path, kind, link=path.is_symlink())
                continue
            stamp = (info.st_mtime_ns, info.st_size)
            if previous and previous.stamp == stamp:
                seen[path] = previous
                if path in self.errors:  # unchanged and still unreadable: not re-read
                    errors[path] = self.errors[path]
                continue
            try:
                if info.st_size > MAX_MANIFEST_BYTES:
                    raise too_large(path, MAX_MANIFEST_BYTES)
                records = parse_key_documents(read_manifest(path), settings=self.settings,
                                              source=str(path))
            except (OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:
                # Unreadable: keep what the file gave before (bad input loses nothing).
                errors[path] = describe_read_error(path, exc)
                records = previous.records if previous else []
            seen[path] = _FileState(stamp, records)
        self.news = (
            [(logging.ERROR, path, f"{message}; keeping its previous keys")
             for path, message in errors.items() if self.errors.get(path) != message]
            + [(logging.WARNING, path, message) for path, message in skipped.items()
               if self.skipped.get(path) != message])
        self.errors, self.skipped = errors, skipped
        self.changed = seen.keys() != self._files.keys() or any(
            state is not self._files.get(path) for path, state in seen.items())
        self._files = seen
        return [r for state in seen.values() for r in state.records]

    async def load(self) -> None:
        async with self._lock:
            # In a thread: files are read whole and parsed, which takes seconds at scale.
            records = await asyncio.to_thread(self.scan)
            for level, path, message in self.news:
                log.log(level, message, extra={"file": str(path)})
            if self.errors and not self.store.ready:
                # At start an unreadable file has no previous keys to keep: serving now
                # would inject backend Pods without its keys (keymount inject refuses
                # to). The first load is retried, /readyz 503, until every file reads.
                raise ManifestError(
                    f"cannot read key manifests in --keys-from {self.directory}: "
                    + "; ".join(self.errors.values())
                    + "; fix these files or move them out of the directory")
            # Rebuild the keyrings only when a file changed: the poll runs every second.
            if self.changed or not self.store.ready:
                self.store.replace_all(records)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.load()
            except ManifestError as exc:
                log.error("key directory unreadable; keeping the cache",
                          extra={"error": str(exc)})
            except Exception as exc:  # never end the reload: the cache would freeze
                log.error("reloading the key directory failed; keeping the cache",
                          extra={"error": type(exc).__name__})

    async def confirm(self, namespace: str) -> Keyring:
        """Before a key-state refusal, re-scan the directory (docs/contract.md, "Refusals")."""
        await self.load()
        return self.store.keyring(namespace)

    async def pods_listing(self, namespace: str, secret: str) -> tuple[str, ...] | None:
        return None  # no Pods to read here: a tombstone stays
