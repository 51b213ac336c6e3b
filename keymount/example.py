"""Encrypt and decrypt records with AES-256-GCM through keymount.reader.

    python -m keymount.example [--dir DIR] [--records FILE] [--text TEXT]

Each run encrypts one new record with the active key (the highest top-level
`encryption-key-<n>`), appends it to FILE (one base64 line a record), then decrypts every
record in FILE with the key whose number the record carries. Run it, rotate
(`keymount keys rotate -n NAMESPACE`), wait for the kubelet to update the volume, run it
again: the new record names the new key and the records written before still decrypt.
Without --records the record is only kept in memory.

A record: 1 byte format version (1), 4 bytes key number (big-endian), 12 bytes nonce,
then the AES-GCM ciphertext and tag; the first 5 bytes are authenticated too, so a
record cannot be made to name another key.

The reader needs no library beyond Python's own; this example needs `cryptography` for
AES-GCM (any AES-GCM implementation does), imported here and nowhere in the reader.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import struct
import sys
from pathlib import Path

from .reader import DEFAULT_PATH, InvalidKeyFile, KeyDirectory, MissingKey

FORMAT_VERSION = 1
HEADER = struct.Struct(">BI")  # format version, key number
NONCE_BYTES = 12
MAX_RECORD_LINE = 1 << 20  # a line longer than this is not one of our records


def encrypt(keys: KeyDirectory, plaintext: bytes) -> bytes:
    """A record of `plaintext` under the active key, which is read now (the kubelet may
    have swapped the directory since the last call)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    number, key = keys.active()
    header = HEADER.pack(FORMAT_VERSION, number)
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header)


def decrypt(keys: KeyDirectory, record: bytes) -> tuple[int, bytes]:
    """(key number, plaintext) of a record: the key it names, from the top level or
    staged/. Raises ValueError for a record that is not one or does not decrypt."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(record) < HEADER.size + NONCE_BYTES + 16:
        raise ValueError(f"a record of {len(record)} bytes is too short")
    version, number = HEADER.unpack_from(record)
    if version != FORMAT_VERSION:
        raise ValueError(f"record format {version} is not {FORMAT_VERSION}")
    nonce = record[HEADER.size:HEADER.size + NONCE_BYTES]
    try:
        plaintext = AESGCM(keys.get(number)).decrypt(
            nonce, record[HEADER.size + NONCE_BYTES:], record[:HEADER.size])
    except InvalidTag:
        raise ValueError(f"the record does not decrypt with key {number}: altered, or "
                         f"encrypted with another key of that number") from None
    return number, plaintext


def read_records(path: Path) -> list[bytes]:
    if not path.exists():
        return []
    records = []
    with path.open("rb") as lines:
        # readline with a limit: a file without newlines is not read whole to find out.
        for line_number, line in enumerate(iter(
                lambda: lines.readline(MAX_RECORD_LINE + 1), b""), 1):
            if len(line) > MAX_RECORD_LINE:
                raise ValueError(f"{path}:{line_number}: longer than {MAX_RECORD_LINE} bytes")
            try:
                records.append(base64.b64decode(line.strip(), validate=True))
            except binascii.Error:
                raise ValueError(f"{path}:{line_number}: not a base64 record") from None
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keymount.example",
        description="Encrypt a record with the active key, then decrypt every record.")
    parser.add_argument("--dir", default=DEFAULT_PATH,
                        help=f"the key directory (default {DEFAULT_PATH})")
    parser.add_argument("--records", type=Path,
                        help="a file of records: the new one is appended, all are decrypted")
    parser.add_argument("--text", default="", help="the new record's plaintext")
    args = parser.parse_args(argv)

    keys = KeyDirectory(args.dir)
    try:
        records = read_records(args.records) if args.records else []
        print(f"keys in {args.dir}: {', '.join(map(str, keys.numbers())) or 'none'}")
        text = args.text or f"record {len(records) + 1}"
        record = encrypt(keys, text.encode())
        records.append(record)
        if args.records:
            with args.records.open("ab") as out:
                out.write(base64.b64encode(record) + b"\n")
        print(f"wrote record {len(records)} with key {HEADER.unpack_from(record)[1]}")
        for index, stored in enumerate(records, 1):
            used, plaintext = decrypt(keys, stored)
            print(f"record {index}: key {used}: {plaintext.decode(errors='replace')}")
    except (MissingKey, InvalidKeyFile, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
