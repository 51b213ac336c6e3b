"""The injection: from a Pod (or pod template) and its namespace's keys, the patch.

One function, `inject_keys`, serves the mutating webhook and `keymount inject` alike
(as Istio's injector serves both its webhook and `istioctl kube-inject`). It returns
either `Injected`, whose JSONPatch is the single source of truth for the change, or
`Refused`, whose message tells the user what to do. It never raises on odd input:
the webhook fails closed, so anything it cannot read is a refusal.

Objects come from a JSON or YAML decoder, so type checks test for `dict`: the ABC
check `isinstance(x, Mapping)` was the largest single cost of an admission.
"""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import jsonpatch
import msgspec
import orjson

from .config import CONTAINERS_ANNOTATION, MANY_KEYS, STATUS_ANNOTATION, VOLUME_NAME, Settings
from .keys import KeyFile, Keyring, describe_conflict
from .lifecycle import newest_key_too_old
from .names import (
    as_dict,
    as_list,
    is_list_of_objects,
    key_file_name,
    staged_field,
    staged_file_name,
)

PatchOp = dict[str, Any]
RefusalReason = Literal["no-valid-key", "invalid-keys", "ambiguous-order", "mount-conflict",
                        "unknown-container", "malformed-pod"]
# Refusals that come from the namespace's key Secrets: a stale cache could cause them,
# so the webhook confirms them with a live read before answering (docs/contract.md, "Refusals").
KEY_STATE_REASONS: frozenset[str] = frozenset({"no-valid-key", "invalid-keys",
                                               "ambiguous-order"})
FILE_MODE = 0o440


class Injected(msgspec.Struct, frozen=True):
    patch: tuple[PatchOp, ...]
    files: tuple[KeyFile, ...]
    status: str  # the keymount.io/status annotation, also the audit annotation
    warnings: tuple[str, ...] = ()
    encoded: str = ""  # the patch as an AdmissionResponse carries it (base64 of its JSON)

    def apply(self, pod: Mapping[str, Any]) -> dict[str, Any]:
        # jsonpatch inserts copies of the values: the result shares nothing with the
        # keyring's volume (build_volume), which later admissions reuse.
        result: dict[str, Any] = jsonpatch.apply_patch(pod, list(self.patch))
        return result


class Refused(msgspec.Struct, frozen=True):
    reason: RefusalReason
    message: str

    @property
    def from_key_state(self) -> bool:
        return self.reason in KEY_STATE_REASONS


def needs_keys(pod: Mapping[str, Any], *, settings: Settings) -> bool:
    """A backend Pod is one whose labels match the pod selector (docs/contract.md, "Terms")."""
    meta = pod.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return settings.pod_selector.matches(labels if isinstance(labels, dict) else {})


def build_volume(keyring: Keyring, *, settings: Settings) -> dict[str, Any]:
    """One source per key; then, optional, the Secrets the next rotations will create.
    Built once per keyring and settings (shared: never modify the result).

    The kubelet never adds a source to a running Pod's projected volume, but it does
    fill in a listed `optional: true` source once its Secret (or the listed field of
    it) appears (kubelet projected volume plugin, at each sync), so a key that fills a
    slot reaches running Pods without a restart (docs/contract.md, "Rotation reaches
    running Pods: key slots").
    """
    volume: dict[str, Any] = keyring.derive(
        ("volume", settings.key_field, settings.rotation_slots),
        lambda: _build_volume(keyring, settings=settings))
    return volume


def _build_volume(keyring: Keyring, *, settings: Settings) -> dict[str, Any]:
    sources: list[dict[str, Any]] = [
        {"secret": {"name": key_file.secret,
                    "items": [{"key": settings.key_field, "path": key_file.file}],
                    "optional": False}}
        for key_file in keyring.files
    ]
    # Only slots that exist: a slot is a key Secret, so only a key writer can give it
    # material; a name no Secret holds yet could be created by anyone. A staged key is
    # listed as a slot: its staged field is there now, its key field comes with the
    # activation, and the kubelet skips an item of an optional source until it exists.
    sources += [
        {"secret": {"name": slot.name, "items": slot_items(slot.index, settings=settings),
                    "optional": True}}
        for slot in (*keyring.staged_keys, *keyring.free_slots[:settings.rotation_slots])
    ]
    return {"name": VOLUME_NAME, "projected": {"defaultMode": FILE_MODE, "sources": sources}}


def slot_items(number: int, *, settings: Settings) -> list[dict[str, str]]:
    """What a slot source projects: the key field as the key's file, and the staged
    field under staged/ (docs/contract.md, "Staged keys")."""
    return [{"key": settings.key_field, "path": key_file_name(number)},
            {"key": staged_field(settings.key_field), "path": staged_file_name(number)}]


def build_mount(*, settings: Settings) -> dict[str, Any]:
    return {"name": VOLUME_NAME, "mountPath": settings.mount_path, "readOnly": True}


def check_keyring(keyring: Keyring, *, settings: Settings) -> Refused | None:
    """The namespace-level refusals (docs/contract.md, "Refusals"), in the order a user
    should fix them."""
    ns = keyring.namespace
    if keyring.conflict:
        return Refused("ambiguous-order", describe_conflict(keyring))
    if keyring.invalid and settings.invalid_keys == "deny":
        listed = "; ".join(f"{r.name}: {r.check.reason}" for r in keyring.invalid)
        return Refused("invalid-keys", (
            f"namespace {ns!r} has invalid key Secrets ({listed}). Replace the key "
            f"(`keymount keys check FILE` validates one offline, `keymount keys create "
            f"NAME -n {ns} --generate` makes a good one), retire the bad Secret with "
            f"`keymount keys retire NAME -n {ns}`, or run the webhook with "
            f"--invalid-keys skip"))
    if not keyring.keys and keyring.staged is not None:
        staged = keyring.staged
        return Refused("no-valid-key", (
            f"namespace {ns!r} has no active encryption key, only the staged key "
            f"{staged.name!r} (number {staged.index}): a staged key is delivered but not "
            f"yet used to encrypt, and a Pod needs an active one. Activate it: keymount "
            f"keys activate -n {ns}"))
    if not keyring.keys:
        return Refused("no-valid-key", (
            f"namespace {ns!r} has no valid encryption key: keymount needs a Secret "
            f"labelled {settings.key_selector} whose data field {settings.key_field!r} holds "
            f"a 32-byte AES-256 key (raw or base64). Create one: keymount keys create "
            f"encryption-key-1 -n {ns} --generate"))
    return None


def build_key_warnings(keyring: Keyring, *, settings: Settings,
                       now: datetime | None) -> tuple[str, ...]:
    # What depends on the keyring alone, once per keyring.
    warnings: tuple[str, ...] | None = keyring.derived.get("key-warnings")
    if warnings is None:
        warnings = keyring.derived["key-warnings"] = tuple(_keyring_warnings(keyring))
    newest = keyring.newest
    if newest is None or not (
            now and newest_key_too_old(keyring, max_age=settings.max_key_age, now=now)):
        return warnings
    return (*warnings,
            f"newest key {newest.name!r} in namespace {keyring.namespace!r} is older "
            f"than --max-key-age; rotate: keymount keys rotate -n {keyring.namespace} "
            f"--generate")


def _keyring_warnings(keyring: Keyring) -> list[str]:
    warnings = [f"key Secret {r.name!r}: {r.check.warning}" for r in keyring.keys
                if r.check.warning]
    if keyring.invalid:
        warnings.append("invalid key Secrets skipped: " + "; ".join(
            f"{r.name}: {r.check.reason}" for r in keyring.invalid))
    if len(keyring.keys) > MANY_KEYS:
        warnings.append(
            f"namespace {keyring.namespace!r} has {len(keyring.keys)} keys (more than "
            f"{MANY_KEYS}); retire keys no data needs: keymount keys retire NAME "
            f"-n {keyring.namespace}")
    return warnings


def inject_keys(pod: Mapping[str, Any], *, keyring: Keyring, settings: Settings,
                now: datetime | None = None) -> Injected | Refused:
    """Decide on one backend Pod or pod template and build its JSONPatch (docs/contract.md,
    "Injection" and "Refusals")."""
    refusal = check_keyring(keyring, settings=settings)
    if refusal:
        return refusal
    spec = pod.get("spec")
    volume = build_volume(keyring, settings=settings)
    plain = plain_pod(spec, meta=pod.get("metadata"), volume=volume, settings=settings)
    if plain is not None:
        volume_step, chosen, mount_steps = plain
        return _injected(pod, (volume_step, mount_steps, _annotation_step(
            pod.get("metadata"), keyring.status)), chosen, keyring=keyring,
            settings=settings, now=now)
    if not isinstance(spec, dict) or not is_list_of_objects(spec.get("containers")):
        return Refused("malformed-pod", "the Pod has no spec.containers list; keymount "
                                        "cannot tell where to mount the keys")
    for name in ("initContainers", "volumes"):
        if spec.get(name) is not None and not is_list_of_objects(spec.get(name)):
            return Refused("malformed-pod", f"the Pod's spec.{name} is not a list of objects")

    ours = [v for v in spec.get("volumes") or [] if v.get("name") == VOLUME_NAME]
    if len(ours) > 1:
        # Only the first would be replaced: refuse rather than pass the rest along.
        return Refused("malformed-pod", (
            f"the Pod has {len(ours)} volumes named {VOLUME_NAME!r}; keymount adds that "
            f"volume itself, so remove them from the Pod spec"))
    every = all_containers(spec)
    targets = select_containers(pod, every=every)
    if isinstance(targets, Refused):
        return targets
    mount = build_mount(settings=settings)
    for path, container in (*every, *ephemeral_containers(spec)):
        mounts = container.get("volumeMounts")
        if mounts is not None and not is_list_of_objects(mounts):
            return Refused("malformed-pod", f"{path}/volumeMounts is not a list of objects")
    problem = find_mount_problem(spec, targets, settings=settings, injected=False, every=every)
    if problem:
        return Refused("mount-conflict", problem)

    shape: PatchShape = (
        _member_step(spec.get("volumes"), volume),
        tuple((path, _member_step(container.get("volumeMounts"), mount))
              for path, container in targets),
        _annotation_step(pod.get("metadata"), keyring.status))
    return _injected(pod, shape, targets, keyring=keyring, settings=settings, now=now)


def _injected(pod: Mapping[str, Any], shape: PatchShape, targets: list[Target], *,
              keyring: Keyring, settings: Settings, now: datetime | None) -> Injected:
    patch, encoded = build_patch(shape, keyring=keyring, settings=settings)
    warnings = build_key_warnings(keyring, settings=settings, now=now)
    pod_warnings = build_pod_warnings(pod, targets=targets)
    return Injected(patch, keyring.files, keyring.status,
                    (*warnings, *pod_warnings) if pod_warnings else warnings, encoded)


# JSON pointers of a Pod's first containers, made once.
_CONTAINER_PATHS = tuple(f"/spec/containers/{i}" for i in range(64))


def plain_pod(spec: Any, *, meta: Any, volume: dict[str, Any], settings: Settings,
              ) -> tuple[MemberStep, list[Target], tuple[tuple[str, MemberStep], ...]] | None:
    """The patch steps and target containers of the common Pod, in one pass: the rules
    below (`inject_keys`, `select_containers`, `find_mount_problem`) would pass it and
    select every container. Only what they would pass is answered here; anything else
    (init or ephemeral containers, the containers annotation, a mount at or under the
    mount path, a mount of keymount's volume other than as it adds it, two such volumes
    or mounts, any value of the wrong type) is None, and goes through the rules, which
    refuse it with the reason or decide it as well. Most Pods are plain: the rules'
    dozen calls and passes over the same containers cost an admission more than all of
    its other decisions (README, "Benchmark"); a property in tests/test_properties.py
    holds the two ways to the same answers."""
    if type(spec) is not dict or spec.get("initContainers") is not None \
            or spec.get("ephemeralContainers") is not None:
        return None
    if type(meta) is dict:
        annotations = meta.get("annotations")
        if type(annotations) is dict and CONTAINERS_ANNOTATION in annotations:
            return None
    containers = spec.get("containers")
    volumes = spec.get("volumes")
    if type(containers) is not list or not containers \
            or len(containers) > len(_CONTAINER_PATHS):
        return None
    volume_step: MemberStep = None
    if volumes is not None:
        if type(volumes) is not list:
            return None
        volume_step = "-"
        for i, item in enumerate(volumes):
            if type(item) is not dict:
                return None
            if item.get("name") == VOLUME_NAME:
                if volume_step != "-":
                    return None  # two: refused by the rules
                volume_step = "" if item == volume else i
    mount_path = settings.mount_path
    under = mount_path.rstrip("/") + "/"
    wanted = build_mount(settings=settings)
    targets: list[Target] = []
    steps: list[tuple[str, MemberStep]] = []
    for i, container in enumerate(containers):
        if type(container) is not dict:
            return None
        mounts = container.get("volumeMounts")
        step: MemberStep = None
        if mounts is not None:
            if type(mounts) is not list:
                return None
            step = "-"
            for j, mount in enumerate(mounts):
                if type(mount) is not dict:
                    return None
                if mount.get("name") == VOLUME_NAME:
                    if step != "-" or not _is_keymount_mount(mount, settings=settings):
                        return None
                    step = "" if mount == wanted else j
                    continue
                where = normalize_path(mount.get("mountPath"))
                if where == mount_path or where.startswith(under):
                    return None  # a mount conflict: refused by the rules
        path = _CONTAINER_PATHS[i]
        targets.append((path, container))
        steps.append((path, step))
    return volume_step, targets, tuple(steps)


# What a Pod's shape asks of one list of named objects (its volumes, a container's
# mounts) to hold keymount's member: None, the list is missing (add it with the
# member); "-", append the member; an index, replace the member there (one of that
# name that differs); "", nothing (the member is there as keymount would add it).
MemberStep = int | str | None
# And of its metadata: "metadata" or "annotations" (missing: add it with the status),
# "add" (set the status annotation), "" (it is there already).
PatchShape = tuple[MemberStep, tuple[tuple[str, MemberStep], ...], str]

MAX_PATCH_SHAPES = 32


def _member_step(items: list[Any] | None, wanted: dict[str, Any]) -> MemberStep:
    if items is None:
        return None
    name = wanted["name"]
    for i, item in enumerate(items):
        if item.get("name") == name:
            return "" if item == wanted else i
    return "-"


def _annotation_step(meta: Any, value: str) -> str:
    if not isinstance(meta, dict):
        return "metadata"
    annotations = meta.get("annotations")
    if not isinstance(annotations, dict):
        return "annotations"
    return "" if annotations.get(STATUS_ANNOTATION) == value else "add"


def build_patch(shape: PatchShape, *, keyring: Keyring,
                settings: Settings) -> tuple[tuple[PatchOp, ...], str]:
    """The JSONPatch for a Pod of this shape, and its encoding (base64 of its JSON).
    Every value in it comes from the keyring and the settings; only its operations and
    paths follow the Pod's shape, and the Pods of one workload share theirs. So both
    are kept in the keyring per shape, for at most MAX_PATCH_SHAPES shapes (a hostile
    client sending endless shapes grows nothing). Shared: never modify the patch."""
    key = ("patch", settings.key_field, settings.rotation_slots, settings.mount_path, shape)
    built: tuple[tuple[PatchOp, ...], str] | None = keyring.derived.get(key)
    if built is not None:
        return built
    volume_step, mount_steps, annotation_step = shape
    patch: list[PatchOp] = []
    _patch_list_member(patch, volume_step, "/spec/volumes", build_volume(keyring,
                                                                         settings=settings))
    mount = build_mount(settings=settings)
    for path, step in mount_steps:
        _patch_list_member(patch, step, f"{path}/volumeMounts", mount)
    if annotation_step == "metadata":
        patch.append({"op": "add", "path": "/metadata",
                      "value": {"annotations": {STATUS_ANNOTATION: keyring.status}}})
    elif annotation_step == "annotations":
        patch.append({"op": "add", "path": "/metadata/annotations",
                      "value": {STATUS_ANNOTATION: keyring.status}})
    elif annotation_step == "add":
        escaped = STATUS_ANNOTATION.replace("~", "~0").replace("/", "~1")
        patch.append({"op": "add", "path": f"/metadata/annotations/{escaped}",
                      "value": keyring.status})
    built = (tuple(patch), base64.b64encode(orjson.dumps(patch)).decode())
    shapes = keyring.derived.get("patch-shapes", 0)
    if shapes < MAX_PATCH_SHAPES:
        keyring.derived[key] = built
        keyring.derived["patch-shapes"] = shapes + 1
    return built


Target = tuple[str, Mapping[str, Any]]  # (JSON pointer, container)


def select_containers(pod: Mapping[str, Any], *,
                      every: list[Target] | None = None) -> list[Target] | Refused:
    """Every container by default; the annotation's names instead, init ones included.
    `every` is `all_containers` of the Pod's spec, if the caller has it already."""
    if every is None:
        every = all_containers(pod["spec"])
    containers = [t for t in every if t[0].startswith("/spec/containers/")]
    annotations = as_dict(as_dict(pod.get("metadata")).get("annotations"))
    wanted = annotations.get(CONTAINERS_ANNOTATION)
    if wanted is None:
        return containers
    inits = [t for t in every if t[0].startswith("/spec/initContainers/")]
    names = [n.strip() for n in str(wanted).split(",") if n.strip()]
    # A name is a string (the API server decodes a Pod before admission); one that is
    # not, from a direct client, names nothing rather than raising.
    by_name = {name: (path, c) for path, c in inits + containers
               if isinstance(name := c.get("name"), str)}
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        return Refused("unknown-container", (
            f"annotation {CONTAINERS_ANNOTATION}={wanted!r} names "
            f"{', '.join(repr(n) for n in unknown) or 'no container'}, not a container of "
            f"this Pod (containers: {_names(containers)}; initContainers: {_names(inits)}); "
            f"list existing container names, comma-separated"))
    return [by_name[n] for n in dict.fromkeys(names)]


def _names(targets: list[Target]) -> str:
    return ", ".join(str(c.get("name")) for _, c in targets) or "none"


def normalize_path(path: Any) -> str:
    """A mount path as the kubelet resolves it: `//encryption-keys/` and
    `/./encryption-keys` are `/encryption-keys` (POSIX normpath keeps a leading `//`)."""
    if (type(path) is str and path[:1] == "/" and path[1:2] != "/" and path[-1:] != "/"
            and "//" not in path and "/." not in path):
        return path  # already normal (the common case): normpath would change nothing
    return posixpath.normpath("/" + str(path or "/").lstrip("/"))


def all_containers(spec: Mapping[str, Any]) -> list[Target]:
    return [(f"/spec/{field}/{i}", c) for field in ("initContainers", "containers")
            for i, c in enumerate(as_list(spec.get(field))) if isinstance(c, dict)]


def ephemeral_containers(spec: Mapping[str, Any]) -> list[Target]:
    """Debug containers added to a running Pod (pods/ephemeralcontainers): never
    selected, so they may not mount keymount's volume."""
    containers = spec.get("ephemeralContainers")
    if not isinstance(containers, list):
        return []
    return [(f"/spec/ephemeralContainers/{i}", c)
            for i, c in enumerate(containers) if isinstance(c, dict)]


def find_mount_problem(spec: Mapping[str, Any], targets: list[Target], *,
                       settings: Settings, injected: bool,
                       every: list[Target] | None = None,
                       ephemeral_only: bool = False) -> str | None:
    """The mount rules (docs/contract.md, "Injection"): in a selected container no
    other volume at or under the mount path, and keymount's volume mounted exactly once
    (once `injected`), at the mount path, read-only, whole; in any other container,
    ephemeral ones included, keymount's volume not at all. Anything else could hand
    keys to a path or container the Pod's owner did not choose, or hide them under
    another volume. `ephemeral_only`: the ephemeral containers alone (a running Pod's
    update)."""
    chosen = {path for path, _ in targets}
    mount_path = settings.mount_path
    under = mount_path.rstrip("/") + "/"
    containers = [] if ephemeral_only else all_containers(spec) if every is None else every
    if isinstance(spec.get("ephemeralContainers"), list):
        containers = [*containers, *ephemeral_containers(spec)]
    for path, container in containers:
        name = container.get("name")
        selected = path in chosen
        ours = exact = 0
        mounts = container.get("volumeMounts")
        # Mounts that are no list are none (a direct client's; the API server decodes a
        # Pod before admission): a number would raise, a string's letters are no mounts.
        for mount in mounts if isinstance(mounts, list) else ():
            if not isinstance(mount, dict):
                continue
            if mount.get("name") == VOLUME_NAME:
                ours += 1
                exact += _is_keymount_mount(mount, settings=settings)
                continue
            if not selected:
                continue
            where = normalize_path(mount.get("mountPath"))
            if where == mount_path or where.startswith(under):
                return (f"container {name!r} mounts volume {mount.get('name')!r} at or "
                        f"under {mount_path}, where keymount mounts the encryption "
                        f"keys; move that mount elsewhere, or set --mount-path")
        if not selected:
            if ours:
                return (f"container {name!r} mounts keymount's volume {VOLUME_NAME!r}, but "
                        f"keymount mounts the keys only into the containers it selects "
                        f"(annotation keymount.io/containers); remove that mount")
            continue
        if ours > 1 or exact != ours or (injected and not exact):
            return (f"container {name!r} must mount keymount's volume {VOLUME_NAME!r} "
                    f"exactly once, read-only at {mount_path}, without subPath; "
                    f"it has {ours} mount(s) of it as given. Remove them: keymount "
                    f"adds the mount itself")
    return None


def _is_keymount_mount(mount: Mapping[str, Any], *, settings: Settings) -> bool:
    """Read-only, whole, at the mount path; the API server may have defaulted fields
    that change nothing (mountPropagation None)."""
    return (mount.get("mountPath") == settings.mount_path and mount.get("readOnly") is True
            and not mount.get("subPath") and not mount.get("subPathExpr")
            and mount.get("mountPropagation") in (None, "None"))


def _patch_list_member(patch: list[PatchOp], step: MemberStep, pointer: str,
                       wanted: dict[str, Any]) -> None:
    """The operation `step` (`_member_step`) takes on the list at `pointer`."""
    if step is None:
        patch.append({"op": "add", "path": pointer, "value": [wanted]})
    elif step == "-":
        patch.append({"op": "add", "path": f"{pointer}/-", "value": wanted})
    elif step != "":
        patch.append({"op": "replace", "path": f"{pointer}/{step}", "value": wanted})


def build_pod_warnings(pod: Mapping[str, Any], *, targets: list[Target]) -> list[str]:
    """0440 root-owned files are unreadable to a non-root user without a Pod fsGroup."""
    pod_sc = as_dict(pod["spec"].get("securityContext"))
    if pod_sc.get("fsGroup") is not None:
        return []
    for _, container in targets:
        sc = as_dict(container.get("securityContext"))
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if (user is not None and user != 0) or (user is None and non_root is True):
            return [f"container {container.get('name')!r} runs as non-root but the Pod sets "
                    f"no securityContext.fsGroup: the key files (mode 0440, owned by root) "
                    f"will be unreadable; set spec.securityContext.fsGroup"]
    return []
