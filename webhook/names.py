"""Every `keymount.io/` name in one place: labels, annotations, the volume, the API
group of keymount's policies.

What each means is in docs/contract.md; code imports the names from here only.
"""

from __future__ import annotations

import re
from typing import Any

PREFIX = "keymount.io/"

# On key Secrets.
KEY_LABEL = PREFIX + "encryption-key"  # the default key selector: keymount.io/encryption-key=true
INDEX_ANNOTATION = PREFIX + "key-index"  # the key's number: its file is encryption-key-<n>
# Every number used in the namespace when this key was created ("1-3,5"): the
# namespace's memory of retired numbers, so a deleted tombstone's number is never reused.
NUMBERS_USED_ANNOTATION = PREFIX + "numbers-used"
RETIRED_ANNOTATION = PREFIX + "retired"  # set by `keys retire`: the key material is gone
GENERATED_ANNOTATION = PREFIX + "generated"  # made by --auto-generate
# Stamped by keymount's mutating webhook with its own clock (RFC 3339, UTC), then
# unchangeable: when a slot became a staged key, and when a key got its key field (a
# new key, a filled slot, an activated staged key). Key age counts from activated-at.
STAGED_AT_ANNOTATION = PREFIX + "staged-at"
ACTIVATED_AT_ANNOTATION = PREFIX + "activated-at"

# On Pods.
STATUS_ANNOTATION = PREFIX + "status"  # files, Secrets and fingerprints injected
CONTAINERS_ANNOTATION = PREFIX + "containers"  # which containers mount the keys

# The policies (docs/contract.md, "Policies"): custom resources of keymount's own API group.
POLICY_GROUP = "keymount.io"
POLICY_VERSION = "v1alpha1"
POLICY_API_VERSION = f"{POLICY_GROUP}/{POLICY_VERSION}"
KEYPOLICY_KIND = "KeyPolicy"  # namespaced: one namespace's rotation
KEYPOLICY_PLURAL = "keypolicies"
CLUSTERKEYPOLICY_KIND = "ClusterKeyPolicy"  # cluster-scoped: defaults and bounds
CLUSTERKEYPOLICY_PLURAL = "clusterkeypolicies"

VOLUME_NAME = "keymount-encryption-keys"
# The coordination.k8s.io/v1 Lease in keymount's own namespace whose holder runs the
# controller (`serve --controller`; docs/operations.md, "The controller").
CONTROLLER_LEASE = "keymount-controller"
FILE_PREFIX = "encryption-key-"
# The Secret name of key number n when keymount makes it: the key slot reserved in
# advance (`keys create`/`keys rotate`), then filled, or --auto-generate's key 1.
# Backend Pods list the empty slots as optional sources, so the kubelet adds a key that
# fills one to running Pods (docs/contract.md, "Rotation reaches running Pods: key
# slots").
SLOT_PREFIX = "keymount-key-"
_SLOT_NAME = re.compile(r"keymount-key-([1-9][0-9]{0,8})")


# A staged key: a slot whose key bytes are in the field `staged-<key field>` and not
# yet in the key field. Pods list that field at STAGED_DIR/encryption-key-<n>, so every
# running Pod holds the key before any Pod encrypts with it (docs/contract.md, "Staged
# keys").
STAGED_FIELD_PREFIX = "staged-"
STAGED_DIR = "staged"


def staged_field(key_field: str) -> str:
    """The data field of a staged key's bytes: `staged-encryption-key` by default."""
    return STAGED_FIELD_PREFIX + key_field


def staged_file_name(number: int) -> str:
    """The path, in the key volume, of staged key number n."""
    return f"{STAGED_DIR}/{key_file_name(number)}"


def key_file_name(number: int) -> str:
    """The file a key is mounted as; the number never changes while the key exists."""
    return f"{FILE_PREFIX}{number}"


def slot_secret_name(number: int) -> str:
    return f"{SLOT_PREFIX}{number}"


def slot_number(secret_name: str) -> int | None:
    """The number a reserved Secret name stands for, or None for any other name."""
    match = _SLOT_NAME.fullmatch(secret_name)
    return int(match.group(1)) if match else None


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one: objects come from decoders."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """`value` if it is a JSON array, else an empty one. Only a direct client can send
    a Pod whose lists are something else: the API server decodes a Pod before
    admission."""
    return value if isinstance(value, list) else []


def is_list_of_objects(value: Any) -> bool:
    return isinstance(value, list) and not [v for v in value if not isinstance(v, dict)]
