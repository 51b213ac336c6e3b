"""Key source: a local directory of Secret manifests (`--keys-from DIR`;
docs/contract.md, "Key sources").

The embedded default, for running keymount without a cluster and for
`keymount inject --keys-from`. Each file may hold many YAML documents; `data` and
`stringData` are read as the API server reads them. A file that stops parsing keeps the
keys it had (bad input loses nothing), and the error names the file and line only:
YAML error text quotes the offending line, which could be key material.
"""

from __future__ import annotations

import asyncio
import logging
import os
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


class ManifestError(ValueError):
    """A manifest file that cannot be read; the message never quotes its content."""


def parse_key_documents(text: str, *, settings: Settings, source: str) -> list[KeyRecord]:
    """Key Secrets of one YAML stream (pure; `source` names it in errors)."""
    records = []
    for document in load_documents(text, source=source):
        if document.get("kind") == "Secret" and is_key_secret(document, settings=settings):
            records.append(parse_key_secret(document, settings=settings))
        elif document.get("kind") == "List":
            items = [i for i in document.get("items") or [] if isinstance(i, dict)]
            records += [parse_key_secret(i, settings=settings) for i in items
                        if i.get("kind") == "Secret" and is_key_secret(i, settings=settings)]
    return records


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
        where = f" at line {mark.line + 1}" if mark else ""
        raise ManifestError(f"{source}: not valid YAML{where}") from None
    except yaml.YAMLError:
        raise ManifestError(f"{source}: not valid YAML") from None
    return [d for d in documents if isinstance(d, dict)]


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
    return f"{path}: {exc.strerror if isinstance(exc, OSError) else type(exc).__name__}"


def list_manifest_files(directory: Path) -> list[Path]:
    """Manifests below `directory`, skipping hidden entries (such as the `..data`
    links of a mounted ConfigMap or Secret volume, which would count files twice)."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.endswith(MANIFEST_SUFFIXES)]
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
        self.errors: dict[Path, str] = {}
        self._lock = asyncio.Lock()  # the poll loop and confirm() must not scan at once
        self.changed = False  # whether the last scan saw any file change

    def scan(self) -> list[KeyRecord]:
        """Re-read the files that changed; returns every key record (blocking I/O)."""
        if not self.directory.is_dir():
            raise ManifestError(f"--keys-from {self.directory}: no such directory")
        seen: dict[Path, _FileState] = {}
        for path in list_manifest_files(self.directory):
            try:
                stat = path.stat()
            except OSError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            previous = self._files.get(path)
            if previous and previous.stamp == stamp:
                seen[path] = previous
                continue
            try:
                text = path.read_text(encoding="utf-8")
                records = parse_key_documents(text, settings=self.settings, source=str(path))
            except (OSError, UnicodeDecodeError, ManifestError) as exc:
                message = describe_read_error(path, exc)
                if self.errors.get(path) != message:
                    log.error("cannot read key manifest; keeping its previous keys",
                              extra={"error": message})
                self.errors[path] = message
                seen[path] = _FileState(stamp, previous.records if previous else [])
                continue
            self.errors.pop(path, None)
            seen[path] = _FileState(stamp, records)
        self.changed = seen.keys() != self._files.keys() or any(
            state is not self._files.get(path) for path, state in seen.items())
        self._files = seen
        return [r for state in seen.values() for r in state.records]

    async def load(self) -> None:
        async with self._lock:
            records = await asyncio.to_thread(self.scan)
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

    async def confirm(self, namespace: str) -> Keyring:
        """Before a key-state refusal, re-scan the directory (docs/contract.md, "Refusals")."""
        await self.load()
        return self.store.keyring(namespace)
