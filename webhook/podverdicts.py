"""Verdicts on backend Pods, remembered by everything they depend on.

Past its labels (`needs_keys`, asked on every admission), the verdict on a backend Pod's
CREATE is a pure function of:
- the namespace's keyring and the settings (both immutable: a change replaces them);
- whether the newest key is past --max-key-age (the one use of the clock);
- the Pod's spec, and of its metadata only the two annotations the rules read
  (`keymount.io/containers`, `keymount.io/status`), or that it has none.

The Pods of one workload share all of these, so the webhook answers the second and
every later Pod of a ReplicaSet from here. The rules behind the verdict (check_keyring,
plain_pod, select_containers, find_mount_problem, the patch and the warnings) took more
of an admission's loop time than anything but decoding the review (README, "Benchmark").

What is remembered is named by the exact JSON of those parts (orjson), never by `==`:
`==` holds True equal to 1 and 1.0, which the rules do not. The JSON names every value
uniquely only for values decoded from JSON (no NaN or infinity, no datetimes, no
subclasses), which is what the webhook's decoder produces; so only the webhook uses
this (decisions.View.pod_verdicts), never `keymount inject` on YAML. A part JSON cannot
encode (an integer past 64 bits) or longer than MAX_CONTENT is decided afresh.

Bounded: at most `size` verdicts, the oldest dropped first, each named by at most
MAX_CONTENT bytes and itself at most MAX_VERDICT characters of patch, status, message
and warnings (a verdict grows with the namespace's keys; a namespace with a hundred
keys or more is decided afresh every time, as before). A client sending endless
distinct Pods only makes them miss. An entry names its keyring weakly (a keyring can
be large, and the key cache replaces it at every change of the namespace's Secrets,
a live read makes one per read): a keyring collected makes its entries miss, even if
a new one takes its id, and is never kept alive here. With every entry as large as
allowed (a hundred keys, 16 KiB of Pod), the whole takes about 18 MiB.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import orjson

from .admission import Verdict
from .config import CONTAINERS_ANNOTATION, STATUS_ANNOTATION, Settings
from .keys import Keyring

MAX_CONTENT = 16 * 1024  # bytes of a Pod's spec and annotations, as JSON; more: not kept
MAX_VERDICT = 32 * 1024  # characters of a verdict's patch, status, message, warnings
SIZE = 256  # verdicts kept

Content = tuple[int, int, bool, bytes]  # id(keyring), id(settings), aged, the Pod's JSON


def pod_content(pod: Mapping[str, Any], *, keyring: Keyring, settings: Settings,
                aged: bool) -> Content | None:
    """What a backend Pod's verdict depends on, as one hashable name; None when it
    cannot be named exactly (then the verdict is not remembered)."""
    meta = pod.get("metadata")
    read: Any
    if type(meta) is not dict:
        read = 0
    elif type(annotations := meta.get("annotations")) is not dict:
        read = 1
    else:
        # Present-but-null and absent differ to plain_pod: both are named.
        read = (CONTAINERS_ANNOTATION in annotations, annotations.get(CONTAINERS_ANNOTATION),
                STATUS_ANNOTATION in annotations, annotations.get(STATUS_ANNOTATION))
    try:
        named = orjson.dumps((pod.get("spec"), read))
    except TypeError:  # orjson.JSONEncodeError: an integer past 64 bits, a surrogate
        return None
    if len(named) > MAX_CONTENT:
        return None
    return id(keyring), id(settings), aged, named


def verdict_size(verdict: Verdict) -> int:
    """What a verdict holds that grows with a namespace's keys or a Pod's names, in
    characters: its patch (one source per key), status (one entry per key, also its
    audit annotation and in `files`), message and warnings."""
    response = verdict.response
    size = len(response.get("patch", "")) + len(verdict.status) + len(verdict.message)
    for warning in response.get("warnings", ()):
        size += len(warning)
    return size


class PodVerdicts:
    """At most `size` verdicts on backend Pods, by `pod_content`."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self._kept: dict[Content, tuple[weakref.ref[Keyring], Settings, Verdict]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, content: Content, *, keyring: Keyring, settings: Settings) -> Verdict | None:
        kept = self._kept.get(content)
        if kept is None or kept[0]() is not keyring or kept[1] is not settings:
            return None
        return kept[2]

    def keep(self, content: Content, verdict: Verdict, *, keyring: Keyring,
             settings: Settings) -> None:
        if verdict_size(verdict) > MAX_VERDICT:
            return
        kept = self._kept
        if content not in kept and len(kept) >= self.size:
            del kept[next(iter(kept))]  # the oldest: dicts keep insertion order
        kept[content] = (weakref.ref(keyring), settings, verdict)
