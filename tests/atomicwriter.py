"""A directory written the way the kubelet writes a projected volume
(kubernetes pkg/volume/util/atomic_writer.go, AtomicWriter.Write), one filesystem
operation per step, so tests can stop a swap between any two of them:

1. a new timestamped directory `..2026_12_02_13_00_00.<random>` beside the old one;
2. the payload written into it (subdirectories such as `staged/` included);
3. a symlink `..data_tmp` -> the new directory;
4. `..data_tmp` renamed over `..data` (the atomic switch);
5. a symlink `name -> ..data/name` for each new top-level name;
6. the symlinks of top-level names no longer in the payload removed;
7. the old timestamped directory removed, entry by entry.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

DATA = "..data"


def swap_steps(root: Path, payload: Mapping[str, bytes]) -> Iterator[str]:
    """Replace the volume at `root` by `payload` (relative path -> bytes), yielding
    after each filesystem operation the name of the operation just done."""
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    new = Path(tempfile.mkdtemp(prefix=stamp, dir=root))
    yield "mkdir timestamped"
    for relative, content in payload.items():
        target = new / relative
        if not target.parent.exists():
            target.parent.mkdir(parents=True)
            yield f"mkdir {relative}"
        target.write_bytes(content)
        target.chmod(0o644)
        yield f"write {relative}"
    old = os.readlink(root / DATA) if (root / DATA).is_symlink() else None
    os.symlink(new.name, root / f"{DATA}_tmp")
    yield "symlink ..data_tmp"
    os.rename(root / f"{DATA}_tmp", root / DATA)
    yield "rename ..data"
    visible = {relative.split("/", 1)[0] for relative in payload}
    for name in sorted(visible):
        if not os.path.lexists(root / name):
            os.symlink(f"{DATA}/{name}", root / name)
            yield f"symlink {name}"
    for entry in sorted(os.listdir(root)):
        if not entry.startswith("..") and entry not in visible:
            os.unlink(root / entry)
            yield f"unlink {entry}"
    if old is not None:
        for directory, subdirectories, files in os.walk(root / old, topdown=False):
            for name in files:
                os.unlink(Path(directory) / name)
                yield f"unlink {old}/{name}"
            for name in subdirectories:
                os.rmdir(Path(directory) / name)
                yield f"rmdir {old}/{name}"
        os.rmdir(root / old)
        yield f"rmdir {old}"


def swap(root: Path, payload: Mapping[str, bytes]) -> None:
    """The whole swap at once (or the first write of the volume)."""
    for _ in swap_steps(root, payload):
        pass


def payload(keys: Mapping[int, bytes], staged: Mapping[int, bytes] | None = None,
            **others: bytes) -> dict[str, bytes]:
    """A keymount volume's files: `encryption-key-<n>`, `staged/encryption-key-<n>`."""
    files = {f"encryption-key-{n}": key for n, key in keys.items()}
    files.update({f"staged/encryption-key-{n}": key for n, key in (staged or {}).items()})
    files.update(others)
    return files
