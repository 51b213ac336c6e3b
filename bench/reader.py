"""keymount.reader's cost per call on a volume of 10 keys laid out as the kubelet lays
it out: with nothing changed (one readlink), and right after each swap (a whole
version read), and on a plain directory (read at every call).

    python bench/reader.py          # prints the medians in microseconds
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keymount.reader import KeyDirectory

KEYS = 10
ROUNDS = 20_000


def write_version(root: Path, serial: int) -> None:
    """One kubelet swap: a new timestamped directory, `..data` renamed onto it, the
    visible symlinks, the old directory removed."""
    new = root / f"..2026_12_02_13_00_00.{serial:09d}"
    new.mkdir()
    for n in range(1, KEYS + 1):
        (new / f"encryption-key-{n}").write_bytes(os.urandom(32))
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    os.symlink(new.name, root / "..data_tmp")
    os.rename(root / "..data_tmp", root / "..data")
    for n in range(1, KEYS + 1):
        if not (root / f"encryption-key-{n}").is_symlink():
            os.symlink(f"..data/encryption-key-{n}", root / f"encryption-key-{n}")
    if old:
        for name in os.listdir(root / old):
            os.unlink(root / old / name)
        os.rmdir(root / old)


def median_us(call, rounds: int, before=None) -> float:
    times = []
    for i in range(rounds):
        if before:
            before(i)
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as kubelet, tempfile.TemporaryDirectory() as plain:
        root = Path(kubelet)
        write_version(root, 0)
        keys = KeyDirectory(root)
        keys.active()
        unchanged = median_us(keys.active, ROUNDS)
        swapped = median_us(keys.active, 2_000,
                            before=lambda i: write_version(root, i + 1))
        for n in range(1, KEYS + 1):
            Path(plain, f"encryption-key-{n}").write_bytes(os.urandom(32))
        fresh = median_us(KeyDirectory(plain).active, 5_000)
    print(f"active() on {KEYS} keys, median: {unchanged:.1f} µs unchanged, "
          f"{swapped:.1f} µs after a swap, {fresh:.1f} µs on a plain directory")


if __name__ == "__main__":
    main()
