"""Writing a file that may hold a secret (a private key, a backup): whole or not at all,
and never through a file or link someone planted at a name keymount would write to."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to a new file of a random name beside `path` (mkstemp: O_EXCL,
    O_NOFOLLOW, created 0600), give it `mode`, then rename it over `path`. Raises
    OSError; the temporary file is gone whatever fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
