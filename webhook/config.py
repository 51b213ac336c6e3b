"""What keymount decides with: one frozen Settings object shared by every path."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from .keys import KeyEncoding
from .names import CONTAINERS_ANNOTATION, KEY_LABEL, STATUS_ANNOTATION, VOLUME_NAME
from .selectors import Selector, parse_selector

__all__ = ["CONTAINERS_ANNOTATION", "STATUS_ANNOTATION", "VOLUME_NAME", "Settings"]

DEFAULT_POD_SELECTOR = "app.kubernetes.io/component=backend"
DEFAULT_KEY_SELECTOR = f"{KEY_LABEL}=true"
DEFAULT_KEY_FIELD = "encryption-key"
DEFAULT_MOUNT_PATH = "/encryption-keys"
MANY_KEYS = 10  # more than this earns a warning (docs/contract.md, "Injection")
DEFAULT_ROTATION_SLOTS = 2

InvalidKeys = Literal["deny", "skip"]


@dataclass(frozen=True, slots=True)
class Settings:
    pod_selector: Selector = field(default_factory=lambda: parse_selector(DEFAULT_POD_SELECTOR))
    key_selector: Selector = field(default_factory=lambda: parse_selector(DEFAULT_KEY_SELECTOR))
    key_field: str = DEFAULT_KEY_FIELD
    mount_path: str = DEFAULT_MOUNT_PATH
    invalid_keys: InvalidKeys = "deny"
    key_encoding: KeyEncoding = "auto"
    max_key_age: timedelta | None = None
    # Optional sources for the next key numbers in every backend Pod, so a rotation
    # reaches running Pods; 0 turns that off (rotations then reach new Pods only).
    rotation_slots: int = DEFAULT_ROTATION_SLOTS

    def __post_init__(self) -> None:
        if not self.mount_path.startswith("/"):
            raise ValueError(f"--mount-path {self.mount_path!r} must be an absolute path")
        # As injection.normalize_path reads Pods' mount paths: normpath keeps a leading
        # `//` (POSIX leaves it to the system), which the kubelet does not.
        normal = posixpath.normpath("/" + self.mount_path.lstrip("/"))
        if normal == "/":
            raise ValueError(f"--mount-path {self.mount_path!r} is the container's root "
                             f"directory; use a directory of its own (the default is "
                             f"{DEFAULT_MOUNT_PATH})")
        object.__setattr__(self, "mount_path", normal)
        if self.invalid_keys not in ("deny", "skip"):
            raise ValueError(f"--invalid-keys must be deny or skip, not {self.invalid_keys!r}")
        if self.key_encoding not in ("auto", "raw", "base64"):
            raise ValueError(
                f"--key-encoding must be auto, raw or base64, not {self.key_encoding!r}")
        if not 0 <= self.rotation_slots <= 16:
            raise ValueError(f"--rotation-slots must be 0 to 16, not {self.rotation_slots}")
        if not self.key_field:
            raise ValueError("--key-field must not be empty")
