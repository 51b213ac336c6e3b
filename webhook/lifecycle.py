"""Key lifecycle decisions for the CLI: rotation, listings, staleness, retirement, import.

Pure functions over keyrings and Pod objects; `cli.py` fetches them through
`cluster.KeyClient` and prints what comes back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .config import STATUS_ANNOTATION, VOLUME_NAME, Settings
from .key_secrets import build_key_secret
from .keys import KeyRecord, Keyring, check_key
from .names import as_dict, as_list, slot_secret_name, staged_file_name

GENERATED_KEY_NAME = slot_secret_name(1)  # --auto-generate's one and only name


# --- keys list ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyRow:
    file: str
    secret: str
    index: str
    state: str
    fingerprint: str
    age: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "secret": self.secret, "index": self.index,
                "state": self.state, "fingerprint": self.fingerprint, "age": self.age}


def format_age(created: datetime | None, now: datetime) -> str:
    """kubectl's style: 45s, 12m, 5h, 30d."""
    if created is None:
        return "<unknown>"
    seconds = max(0, int((now - created).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "d" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def key_state_label(record: KeyRecord, keyring: Keyring) -> str:
    """active (encrypts new data), older (decrypts), legacy (no index yet: `keys pin`),
    duplicate (shares its number: Pods are refused), retired, slot (reserved for a
    next key, empty), staged (delivered under staged/, not yet used to encrypt: `keys
    activate`), or invalid: reason."""
    if record.state == "invalid":
        return f"invalid: {record.check.reason}"
    if keyring.conflict and record in keyring.conflict:
        return "duplicate"
    if record.state in ("retired", "slot", "staged"):
        return record.state
    state = "active" if record is keyring.newest else "older"
    if not record.numbered:
        state += ", legacy"
    return state + (" (warning: passphrase-like)" if record.check.warning else "")


def build_key_rows(keyring: Keyring, *, now: datetime) -> list[KeyRow]:
    """Every key Secret by number (what a new backend Pod gets, the tombstones and
    the empty slots),
    then the invalid ones."""
    numbered = [(f.number, f.file, r) for f, r in zip(keyring.files, keyring.keys, strict=True)]
    numbered += [(r.index, "-", r) for r in (*keyring.retired, *keyring.slots)]
    numbered += [(r.index, staged_file_name(r.index), r) for r in keyring.staged_keys]
    numbered.sort(key=lambda row: (row[0], row[2].name))
    rows = [KeyRow(file, r.name, str(r.index) if r.index_explicit else "-",
                   key_state_label(r, keyring), r.fingerprint or "-",
                   format_age(r.created, now))
            for _, file, r in numbered]
    rows += [KeyRow("-", r.name, str(r.index) if r.index_explicit else "-",
                    key_state_label(r, keyring), "-", format_age(r.created, now))
             for r in keyring.invalid]
    return rows


def legacy_pins(keyring: Keyring) -> list[tuple[str, int]]:
    """(Secret, number) for each valid key without an index, at the number it has now:
    `keymount keys pin` stamps these, after which retiring any key moves no file."""
    numbers = {f.secret: f.number for f in keyring.files}
    return [(r.name, numbers[r.name]) for r in keyring.legacy]


def newest_key_too_old(keyring: Keyring, *, max_age: timedelta | None,
                       now: datetime) -> bool:
    newest = keyring.newest
    since = newest.active_since if newest else None
    return bool(max_age and since and now - since > max_age)


def format_table(headers: list[str], rows: Iterable[Iterable[str]]) -> str:
    table = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h)
              for i, h in enumerate(headers)]
    lines = ["   ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in table]
    return "\n".join(lines)


# --- status: which Pods run on a stale key set ------------------------------------------

@dataclass(frozen=True, slots=True)
class PodKeyState:
    namespace: str
    pod: str
    missing: tuple[str, ...]  # keys a new Pod would get that this one lacks
    removed: tuple[str, ...]  # keys this Pod has that are no longer valid key Secrets
    live: tuple[str, ...] = ()  # missing keys the kubelet adds to it (a listed slot)
    terminating: bool = False  # in its termination grace period: still reading keys

    @property
    def state(self) -> str:
        """current; updating (every missing key reaches it live, within the kubelet's
        sync period); or stale (it needs a restart)."""
        if not (self.missing or self.removed):
            return "current"
        return "updating" if set(self.missing) == set(self.live) else "stale"

    def as_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "pod": self.pod, "state": self.state,
                "missing": list(self.missing), "removed": list(self.removed),
                "live": list(self.live), "terminating": self.terminating}


def read_status_annotation(pod: Mapping[str, Any]) -> list[dict[str, str]] | None:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        status = json.loads(annotations[STATUS_ANNOTATION])
    except (KeyError, ValueError, TypeError):
        return None
    return status if isinstance(status, list) else None


def listed_slots(pod: Mapping[str, Any]) -> set[str]:
    """The optional sources (rotation slots) of a Pod's keymount volume."""
    spec = as_dict(pod.get("spec"))
    for volume in as_list(spec.get("volumes")):
        if isinstance(volume, Mapping) and volume.get("name") == VOLUME_NAME:
            projected = volume.get("projected")
            sources = projected.get("sources") if isinstance(projected, Mapping) else None
            return {str(s["secret"].get("name")) for s in as_list(sources)
                    if isinstance(s, Mapping) and isinstance(s.get("secret"), Mapping)
                    and s["secret"].get("optional") is True}
    return set()


@dataclass(frozen=True, slots=True)
class PodKeys:
    """What keymount keeps of a backend Pod: the keys it was given and its slots."""

    namespace: str
    name: str
    had: frozenset[tuple[str, str]] | None  # (Secret, fingerprint); None: not injected
    slots: frozenset[str] = frozenset()
    terminating: bool = False
    finished: bool = False  # Succeeded or Failed: reads nothing any more


def parse_pod_keys(pod: Mapping[str, Any]) -> PodKeys:
    meta = as_dict(pod.get("metadata"))
    status = read_status_annotation(pod)
    had = None if status is None else frozenset(
        (str(s.get("secret")), str(s.get("fingerprint"))) for s in status
        if isinstance(s, dict))
    return PodKeys(str(meta.get("namespace") or ""), str(meta.get("name") or ""), had,
                   frozenset(listed_slots(pod)), bool(meta.get("deletionTimestamp")),
                   not may_still_read(pod))


def build_pod_key_state(pod: Mapping[str, Any] | PodKeys,
                        keyring: Keyring) -> PodKeyState | None:
    """Compare the keys a Pod was given (its status annotation) with today's set, and
    tell which missing keys still reach it without a restart."""
    keys = pod if isinstance(pod, PodKeys) else parse_pod_keys(pod)
    if keys.had is None:
        return None
    now = {(f.secret, f.fingerprint) for f in keyring.files}
    missing = tuple(sorted(f"{s} ({fp})" for s, fp in now - keys.had))
    removed = tuple(sorted(f"{s} ({fp})" for s, fp in keys.had - now))
    # A source the kubelet cannot read (a key retired under it) stops every update of
    # the volume, so a Pod still holding a removed key gets nothing live.
    slots = keys.slots if not removed else frozenset()
    live = tuple(sorted(f"{s} ({fp})" for s, fp in now - keys.had if s in slots))
    return PodKeyState(keys.namespace, keys.name, missing, removed, live, keys.terminating)


def is_running(pod: Mapping[str, Any]) -> bool:
    """Pods that exist and have not finished (Pending ones will mount on start)."""
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and \
        not (pod.get("metadata") or {}).get("deletionTimestamp")


def may_still_read(pod: Mapping[str, Any]) -> bool:
    """Pending, running, or in its termination grace period: its processes may still
    read (or be about to read) the key files."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


# --- keys retire ----------------------------------------------------------------------

def pods_mounting(pods: Iterable[Mapping[str, Any]], secret: str) -> list[str]:
    """Names of Pods (Pending, running or terminating) whose keymount volume projects
    `secret`."""
    names = []
    for pod in pods:
        if not may_still_read(pod):
            continue
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            if volume.get("name") != VOLUME_NAME:
                continue
            sources = (volume.get("projected") or {}).get("sources") or []
            if any((s.get("secret") or {}).get("name") == secret for s in sources):
                names.append((pod.get("metadata") or {}).get("name", ""))
    return sorted(names)


def pods_listing(pods: Iterable[Mapping[str, Any]], secret: str) -> tuple[str, ...]:
    """Names of Pods (Pending, running or terminating) with any volume that names Secret
    `secret`: a Secret volume, or a Secret source of a projected volume, keymount's or
    not. The kubelet mounts whatever a Secret of that name holds into each; a Pod's
    volumes cannot change once it is created (its labels and annotations can)."""
    names = set()
    for pod in pods:
        if not may_still_read(pod):
            continue
        for volume in as_dict(pod.get("spec")).get("volumes") or []:
            if not isinstance(volume, dict):
                continue
            sources = as_dict(volume.get("projected")).get("sources") or []
            if as_dict(volume.get("secret")).get("secretName") == secret or any(
                    isinstance(s, dict) and as_dict(s.get("secret")).get("name") == secret
                    for s in sources):
                names.add(str(as_dict(pod.get("metadata")).get("name", "")))
    return tuple(sorted(names))


# --- restart targets after a rotation ----------------------------------------------------

def controller_ref(obj: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(kind, name, uid) of an object's controller reference, as its author wrote it."""
    for ref in as_dict(obj.get("metadata")).get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller"):
            return str(ref.get("kind", "")), str(ref.get("name", "")), str(ref.get("uid", ""))
    return None


def controls(owner: Mapping[str, Any], *, uid: str, pod: Mapping[str, Any]) -> bool:
    """Whether `owner`, as read from the API server, is the object a controller
    reference with `uid` names, and its selector selects `pod`. Whoever creates a Pod
    writes its ownerReferences, naming any workload of the namespace (uids are
    readable), so a reference alone proves nothing: this is the evidence Kubernetes'
    own controllers require before they treat a Pod as theirs (ControllerRefManager
    releases a Pod whose labels the selector does not match)."""
    from .policy import PolicyError, parse_namespace_selector
    if not uid or as_dict(owner.get("metadata")).get("uid") != uid:
        return False
    try:
        selector = parse_namespace_selector(as_dict(owner.get("spec")).get("selector"),
                                            field="spec.selector")
    except PolicyError:
        return False
    labels = as_dict(as_dict(pod.get("metadata")).get("labels"))
    return selector.matches({str(k): str(v) for k, v in labels.items()})


def restart_command(kind: str, name: str, namespace: str) -> str:
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        return f"kubectl rollout restart {kind.lower()}/{name} -n {namespace}"
    if kind == "Pod":
        return f"kubectl delete pod {name} -n {namespace}  # a bare Pod: recreate it"
    return f"restart {kind.lower()}/{name} -n {namespace}"


# --- keys import (the old Helm chart) ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class HelmImport:
    manifest: dict[str, Any] | None = None
    warning: str = ""
    explanation: str = ""  # why nothing was carried over (the old auto-generate)
    refusal: str = ""  # the value is present but not a usable key


def import_helm_values(values: Any, *, name: str, namespace: str,
                       settings: Settings) -> HelmImport:
    """`secrets.keysEncryption.userEncryptionKey` as a key Secret manifest, index 1."""
    node: Any = values
    for step in ("secrets", "keysEncryption"):
        node = node.get(step) if isinstance(node, Mapping) else None
    value = node.get("userEncryptionKey") if isinstance(node, Mapping) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return HelmImport(explanation=(
            "secrets.keysEncryption.userEncryptionKey is empty: the old chart then generated "
            "a key at template time, which changed on every render, so there is no key to "
            "carry over. Export the key your running release actually uses (kubectl get "
            f"secret <release-secret> -n {namespace} -o jsonpath=...) and import it with "
            f"`keymount keys create {name} -n {namespace} --from-file KEYFILE --index 1`, or, "
            f"for a new install, `keymount keys create {name} -n {namespace} --generate "
            f"--index 1`"))
    key = str(value).encode()
    result = check_key(key, subject="secrets.keysEncryption.userEncryptionKey",
                       encoding=settings.key_encoding)
    if not result.valid:
        return HelmImport(refusal=f"refused, nothing written: {result.reason}")
    return HelmImport(
        manifest=build_key_secret(name, namespace=namespace, key=key, index=1,
                                  settings=settings),
        warning=result.warning)


def records_by_namespace(records: Iterable[KeyRecord]) -> dict[str, list[KeyRecord]]:
    grouped: dict[str, list[KeyRecord]] = {}
    for record in records:
        grouped.setdefault(record.namespace, []).append(record)
    return grouped


# --- keys rotate --restart: rolling workloads, judged as `kubectl rollout status` does ---

RESTARTABLE = ("Deployment", "StatefulSet", "DaemonSet")
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # the annotation kubectl rollout restart sets

RolloutState = tuple[str, str]  # ("done" | "waiting" | "failed", what)


def rollout_state(kind: str, obj: Mapping[str, Any]) -> RolloutState:
    """Whether a rollout finished, as kubectl's rollout status viewers decide
    (k8s.io/kubectl pkg/polymorphichelpers/rollout_status.go)."""
    meta, spec, status = (obj.get(k) or {} for k in ("metadata", "spec", "status"))
    if (meta.get("generation") or 0) > (status.get("observedGeneration") or 0):
        return "waiting", "the controller has not seen the new spec yet"
    wanted = spec.get("replicas", 1)
    if kind == "Deployment":
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Progressing" and \
                    condition.get("reason") == "ProgressDeadlineExceeded":
                return "failed", f"exceeded its progress deadline: {condition.get('message')}"
        updated = status.get("updatedReplicas") or 0
        if updated < wanted:
            return "waiting", f"{updated} of {wanted} new replicas updated"
        if (status.get("replicas") or 0) > updated:
            return "waiting", "old replicas are pending termination"
        if (status.get("availableReplicas") or 0) < updated:
            return "waiting", f"{status.get('availableReplicas') or 0} of {updated} " \
                              f"updated replicas available"
        return "done", "rolled out"
    if kind == "StatefulSet":
        ready = status.get("readyReplicas") or 0
        if ready < wanted:
            return "waiting", f"{ready} of {wanted} Pods ready"
        if status.get("updateRevision") != status.get("currentRevision"):
            return "waiting", f"{status.get('updatedReplicas') or 0} Pods at the new revision"
        return "done", "rolled out"
    if kind == "DaemonSet":
        desired = status.get("desiredNumberScheduled") or 0
        updated = status.get("updatedNumberScheduled") or 0
        if updated < desired:
            return "waiting", f"{updated} of {desired} new Pods updated"
        if (status.get("numberAvailable") or 0) < desired:
            return "waiting", f"{status.get('numberAvailable') or 0} of {desired} available"
        return "done", "rolled out"
    return "failed", f"keymount cannot roll a {kind}"


def restart_targets(pods: Iterable[Mapping[str, Any]], new_key: str, *,
                    controller_of: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """The workloads whose Pods started without `new_key` (for applications that read
    their keys only at start), and the Pods keymount cannot roll (bare, other kinds, or
    whose controller reference does not check out). `controller_of(pod)` is the
    verified (kind, name) of the workload that controls a Pod, or None."""
    workloads: set[tuple[str, str]] = set()
    others: set[str] = set()
    for pod in pods:
        if not is_running(pod):
            continue
        status = read_status_annotation(pod) or []
        if any(isinstance(s, dict) and s.get("secret") == new_key for s in status):
            continue
        owner = controller_of(pod) if controller_ref(pod) else None
        kind, name = owner or ("Pod", pod["metadata"]["name"])
        if kind in RESTARTABLE:
            workloads.add((kind, name))
        else:
            others.add(restart_command(kind, name, (pod.get("metadata") or {}).get(
                "namespace", "")))
    return sorted(workloads), sorted(others)
