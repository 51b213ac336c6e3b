"""The rule that decides whether some bytes are an AES-256 key (docs/contract.md,
"Valid keys").

One rule for both sides: the webhook judges a Secret's key field with it
(webhook/keys.py) and an application's reader judges a mounted file with it
(keymount/reader.py), so the two never disagree about a key. Standard library only,
because applications import it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Literal

KEY_BYTES = 32
KeyEncoding = Literal["auto", "raw", "base64"]

# Standard and URL-safe alphabets, padding optional (docs/contract.md, "Valid keys").
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/\-_]+={0,2}")
_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]+")


@dataclass(frozen=True, slots=True)
class DecodedKey:
    """The verdict on some bytes and, when they are a key, its 32 bytes.

    The key is left out of repr(), so printing a verdict never prints key material."""

    key: bytes = field(default=b"", repr=False)
    reason: str = ""
    encoding: Literal["raw", "base64", ""] = ""
    warning: str = ""

    @property
    def valid(self) -> bool:
        return bool(self.key)


def decode_base64_key(text: bytes) -> bytes | None:
    """Standard or URL-safe base64, padding optional; None when it is not base64."""
    if not _BASE64_TEXT.fullmatch(text):
        return None
    unpadded = text.rstrip(b"=")
    padded = unpadded + b"=" * (-len(unpadded) % 4)
    try:
        return base64.b64decode(padded.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_key(value: bytes | None, *, subject: str,
               encoding: KeyEncoding = "auto") -> DecodedKey:
    """The key that `value` holds: exactly 32 raw bytes as stored, or (after stripping
    trailing whitespace) base64 of exactly 32 bytes, and not all one byte value.

    `subject` names where the bytes came from in the reason ("field 'x'", "stdin").
    The reason gives lengths, never bytes."""
    if value is None:
        return DecodedKey(reason=f"{subject} is missing")
    if not value:
        return DecodedKey(reason=f"{subject} is empty (0 bytes); need 32 random bytes")
    if encoding != "base64" and len(value) == KEY_BYTES:
        return _judge(value, encoding="raw")
    if encoding != "raw":
        decoded = decode_base64_key(value.rstrip())
        if decoded is not None:
            if len(decoded) == KEY_BYTES:
                return _judge(decoded, encoding="base64")
            return DecodedKey(reason=f"{subject} is base64 of {len(decoded)} bytes; "
                                     f"need base64 of exactly {KEY_BYTES} bytes")
    wanted = {
        "auto": f"exactly {KEY_BYTES} raw bytes or base64 of {KEY_BYTES} bytes",
        "raw": f"exactly {KEY_BYTES} raw bytes (--key-encoding raw)",
        "base64": f"base64 of exactly {KEY_BYTES} bytes (--key-encoding base64)",
    }[encoding]
    return DecodedKey(reason=f"{subject} holds {len(value)} bytes; need {wanted}")


def _judge(key: bytes, *, encoding: Literal["raw", "base64"]) -> DecodedKey:
    if key.count(key[:1]) == len(key):
        return DecodedKey(reason=f"key is degenerate: all {KEY_BYTES} bytes are equal")
    warning = ""
    if encoding == "raw" and _PRINTABLE_ASCII.fullmatch(key):
        warning = ("key is 32 printable ASCII characters: it looks like a passphrase, "
                   "not random bytes; generate one with `keymount keys create --generate`")
    return DecodedKey(key, encoding=encoding, warning=warning)
