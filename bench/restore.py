"""`keys restore`'s peak memory on large backups: a ~100 MB backup and one of 200,000
keys, each restored by a fresh process (decrypt, parse, judge the whole file, build and
send every Secret) against a cluster client that accepts every write, so what is
measured is the restore's own memory, not the API server's. The figure is the process's
peak resident set (VmHWM), against the target of twice the backup's size plus 100 MB.

    python bench/restore.py          # prints one line per backup
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1024 * 1024


def make_backup(path: Path, keys: int, recipient: str, *, namespaces: int = 1000) -> int:
    from webhook.backup import BackedUpKey, encode, encrypt
    from webhook.keys import check_key
    entries = []
    per = max(1, keys // namespaces)
    for i in range(keys):
        value = os.urandom(32)
        number = i % per + 1
        stamp = f"2026-12-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z"
        entries.append(BackedUpKey(
            f"tenant-{i // per:05d}", f"keymount-key-{number}", number, stamp,
            check_key(value).fingerprint,
            f"1-{number}" if number > 1 else "1", False, value,
            activated_at=1_796_256_000 + i))  # filled after it was made: its own time
    path.write_bytes(encrypt(encode(entries), recipients=[recipient]))
    return path.stat().st_size


class AcceptingCluster:
    """A cluster with every namespace, no key Secret yet, that takes every write."""

    def __init__(self) -> None:
        self.written = 0

    def secret_names(self, namespaces: list[str]) -> dict[str, frozenset[str] | None]:
        return {ns: frozenset() for ns in namespaces}

    def key_records(self, namespace: str | None) -> list[object]:
        return []

    def restore_secret(self, manifest: dict[str, object]) -> bool:
        self.written += 1
        return True


def child(backup: str, identity: str) -> None:
    import webhook.cluster  # noqa: F401  (the real command loads the Kubernetes client)
    from webhook.backup import decrypt_file, read_identities
    from webhook.cli_keys import restore_keys
    from webhook.config import Settings
    keys = decrypt_file(backup, identities=read_identities(Path(identity).read_text()))
    cluster = AcceptingCluster()
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # one line per key
    restore_keys(cluster, keys, settings=Settings(), source=backup)  # type: ignore[arg-type]
    sys.stdout = stdout
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text()
                .splitlines() if line.startswith("VmHWM:"))
    print(f"{cluster.written} {peak * 1024}")


def main() -> None:
    from pyrage import x25519
    identity = x25519.Identity.generate()
    with tempfile.TemporaryDirectory() as tmp:
        identity_file = Path(tmp) / "identity.txt"
        identity_file.write_text(f"{identity}\n")
        for label, keys in (("200,000 keys", 200_000), ("~100 MB", 330_000)):
            backup = Path(tmp) / "backup.age"
            size = make_backup(backup, keys, str(identity.to_public()))
            out = subprocess.run([sys.executable, __file__, "--child", str(backup),
                                  str(identity_file)], capture_output=True, text=True,
                                 check=True).stdout.split()
            written, peak = int(out[0]), int(out[1])
            target = 2 * size + 100 * MB
            print(f"{label}: backup {size / MB:.0f} MB, {written} keys restored, peak RSS "
                  f"{peak / MB:.0f} MB (target {target / MB:.0f} MB: "
                  f"{'ok' if peak <= target else 'OVER'})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
