"""`keymount keys create|rotate|list|retire|import` and `keymount status`.

Cluster commands behave like kubectl: `--kubeconfig`, `--context`, `-n` (default: the
context's namespace), `-A`, and `-o table|json|yaml`. Decisions come from
`lifecycle`; API calls go through `cluster.KeyClient`, whose errors are one line.
Key material is printed in one place only: the manifest of `create --dry-run`
and `import`, which the user asked for to seal or encrypt it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import yaml

from .cli_common import (
    MAX_KEY_INPUT,
    add_key_writer_flags,
    add_settings_flags,
    build_key_writers,
    build_settings,
    parse_duration,
    read_input,
    too_long_for_a_key,
)
from .config import Settings
from .errors import PolicyUnknown, UserFacingError
from .files import replace_file
from .key_secrets import ApiObject, SlotOutcome
from .keys import (
    KeyRecord,
    Keyring,
    build_keyring,
    check_key,
    describe_conflict,
    format_numbers,
    generate_key,
)
from .names import (
    INDEX_ANNOTATION,
    RETIRED_ANNOTATION,
    key_file_name,
    slot_secret_name,
    staged_field,
    staged_file_name,
)

if TYPE_CHECKING:  # the CLI imports the Kubernetes client only for cluster commands
    from .audit import Grant, Rbac
    from .backup import BackedUpKey


class KeyApi(Protocol):
    """What the key commands ask of the cluster: `cluster.KeyClient`, whose every
    failure is one `ClusterError` line; tests pass a fake of it."""

    def key_secrets(self, namespace: str | None) -> list[ApiObject]: ...
    def secret_names(self, namespaces: list[str]) -> dict[str, frozenset[str] | None]: ...
    def restore_secret(self, manifest: ApiObject) -> bool: ...
    def rbac(self, namespace: str | None) -> Rbac: ...
    def confirm(self, grants: list[Grant]) -> dict[Grant, bool]: ...
    def slot_named_secrets(self, namespace: str | None) -> list[ApiObject]: ...
    def key_records(self, namespace: str | None) -> list[KeyRecord]: ...
    def keyring(self, namespace: str) -> Keyring: ...
    def backend_pods(self, namespace: str | None) -> list[ApiObject]: ...
    def pods(self, namespace: str | None) -> list[ApiObject]: ...
    def create_secret(self, manifest: ApiObject) -> KeyRecord: ...
    def patch_secret(self, namespace: str, name: str, patch: ApiObject) -> None: ...
    def reserve_slot(self, namespace: str, number: int) -> SlotOutcome: ...
    def fill_slot(self, namespace: str, slot: KeyRecord, key: bytes) -> KeyRecord | None: ...
    def stage_slot(self, namespace: str, slot: KeyRecord, key: bytes) -> KeyRecord | None: ...
    def activate_staged(self, namespace: str, staged: KeyRecord) -> KeyRecord | None: ...
    def has_policy(self, namespace: str) -> bool: ...
    def restart_workload(self, namespace: str, kind: str, name: str, *, at: str,
                         resource_version: str | None = None) -> bool: ...
    def read_workload(self, namespace: str, kind: str, name: str) -> ApiObject: ...
    def controller_of(self, namespace: str, pod: ApiObject, *,
                      owners: dict[tuple[str, str], ApiObject | None] | None = None
                      ) -> tuple[str, str] | None: ...


def _settings(args: argparse.Namespace) -> Settings:
    return build_settings(args)


def _now() -> datetime:
    return datetime.now(UTC)


def add_cluster_flags(parser: argparse.ArgumentParser, *, all_namespaces: bool = False,
                      output: bool = False) -> None:
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("-n", "--namespace", default=None,
                        help="namespace (default: the context's namespace)")
    if all_namespaces:
        parser.add_argument("-A", "--all-namespaces", action="store_true",
                            help="every namespace")
    if output:
        parser.add_argument("-o", "--output", choices=("table", "json", "yaml"),
                            default="table", help="output format")


def connect(args: argparse.Namespace, settings: Settings) -> tuple[KeyApi, str | None]:
    from .cluster import KeyClient, current_namespace
    if getattr(args, "all_namespaces", False):
        namespace = None
    else:
        namespace = args.namespace or current_namespace(kubeconfig=args.kubeconfig,
                                                        context=args.context)
    return KeyClient.from_kubeconfig(kubeconfig=args.kubeconfig, context=args.context,
                                     settings=settings), namespace


def connect_namespace(args: argparse.Namespace, settings: Settings) -> tuple[KeyApi, str]:
    """A cluster client and the one namespace of a command that takes no -A."""
    keys, namespace = connect(args, settings)
    assert namespace is not None
    return keys, namespace


def emit(rows: list[dict[str, Any]], *, output: str, headers: list[str]) -> None:
    from .lifecycle import format_table
    if output == "json":
        print(json.dumps(rows, indent=2))
    elif output == "yaml":
        sys.stdout.write(yaml.safe_dump(rows, sort_keys=False))
    else:
        print(format_table(headers, ([str(r.get(h, "")) for h in headers] for r in rows)))


def read_key_material(args: argparse.Namespace, settings: Settings) -> bytes:
    """The key to store: generated, or read and validated; refused before any write."""
    if args.generate or (getattr(args, "default_generate", False) and not args.from_file):
        return generate_key()
    key = read_input(args.from_file or "-", limit=MAX_KEY_INPUT)
    subject = f"file {args.from_file}" if args.from_file else "stdin"
    if reason := too_long_for_a_key(key, subject):
        raise UserFacingError(f"refused, nothing created: {reason}")
    result = check_key(key, subject=subject, encoding=settings.key_encoding)
    if not result.valid:
        raise UserFacingError(f"refused, nothing created: {result.reason}")
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    return key


def print_manifest(manifest: dict[str, Any], output: str) -> None:
    sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False) if output == "yaml"
                     else json.dumps(manifest, indent=2) + "\n")


# --- create / rotate --------------------------------------------------------------------

def cluster_namespace(args: argparse.Namespace) -> str:
    from .cluster import current_namespace
    return args.namespace or current_namespace(kubeconfig=args.kubeconfig, context=args.context)


def cluster_keyring(args: argparse.Namespace, settings: Settings, namespace: str) -> Keyring:
    """The namespace's keys as the cluster has them now, for a manifest with the number
    keymount would give. Needs the cluster; offline, the user gives --index."""
    from .cluster import ClusterError, KeyClient
    try:
        keys = KeyClient.from_kubeconfig(kubeconfig=args.kubeconfig, context=args.context,
                                         settings=settings)
        return keys.keyring(namespace)
    except ClusterError as exc:
        raise UserFacingError(
            f"cannot compute the next key number of namespace {namespace} without the "
            f"cluster ({exc}); pass the number yourself with --index N") from None


def report_created(record: KeyRecord, namespace: str, fingerprint: str) -> None:
    if record.index_explicit:
        print(f"secret/{record.name} created in namespace {namespace}: number {record.index} "
              f"(file {key_file_name(record.index)}), fingerprint {fingerprint}")
    else:
        print(f"secret/{record.name} created in namespace {namespace} (fingerprint "
              f"{fingerprint}) without a number: keymount's webhook did not stamp "
              f"{INDEX_ANNOTATION}; is it installed? (kubectl get mutatingwebhookconfiguration "
              f"keymount)", file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    """A key under NAME (stamped with the next number by the webhook), or, without
    NAME, the next key filling the lowest empty slot as `keys rotate` does."""
    from .key_secrets import build_key_secret
    settings = _settings(args)
    if args.index is not None and args.index < 1:
        raise UserFacingError(f"--index {args.index}: must be a positive integer", 2)
    key = read_key_material(args, settings)
    if args.dry_run:
        namespace = cluster_namespace(args)
        if args.index is not None:  # offline: the user says which number
            name = args.name or slot_secret_name(args.index)
            manifest = build_key_secret(name, namespace=namespace, key=key,
                                        index=args.index, settings=settings)
        else:
            manifest = slot_manifest(cluster_keyring(args, settings, namespace), key=key,
                                     name=args.name, settings=settings)
        print_manifest(manifest, args.output)
        warn_manifest_holds_key()
        return 0
    keys, namespace = connect_namespace(args, settings)
    record = make_key(keys, namespace, key, name=args.name, index=args.index,
                      settings=settings)
    announce_key(keys, namespace, record, key, settings=settings)
    if args.name:
        print(f"Running backend Pods get {args.name!r} only by a restart (they list the "
              f"slots keymount-key-N); without a name, `keys create` fills the next slot.")
    return 0


def warn_manifest_holds_key() -> None:
    print("warning: this manifest holds key material; encrypt it (SOPS, SealedSecrets) "
          "before it goes anywhere near version control", file=sys.stderr)


# Attempts at filling a slot before giving up: each lost race (another writer filled
# the slot first) moves on to the next one, so this bounds a pathological loop only.
SLOT_ATTEMPTS = 32


def reserve_next(keys: KeyApi, keyring: Keyring) -> None:
    """Reserve the slot of the next number, or, when an unlabelled Secret already has
    that slot's name (no webhook sees it, and no Pod lists it), the first number above
    it whose name is free; say which Secret was in the way."""
    number = keyring.next_number
    # A key Secret from before keymount numbered keys may hold a slot's name and be
    # numbered otherwise (`keymount-key-2`, number 1): that number is skipped, as the
    # controller skips it (controller._free_number).
    while keyring.find(slot_secret_name(number)) is not None:
        number += 1
    for _ in range(SLOT_ATTEMPTS):
        outcome = keys.reserve_slot(keyring.namespace, number)
        if outcome != "taken":
            return
        print(f"warning: Secret {slot_secret_name(number)!r} in namespace "
              f"{keyring.namespace} is not a key Secret, so number {number} is skipped; "
              f"no backend Pod lists it. Delete it if nothing needs it: kubectl delete "
              f"secret {slot_secret_name(number)} -n {keyring.namespace}", file=sys.stderr)
        number += 1


def fill_next_slot(keys: KeyApi, namespace: str, key: bytes, *,
                   staged: bool = False) -> KeyRecord:
    """Make a key by filling the lowest empty slot above the active key (with `staged`,
    its staged field: a staged key), reserving one first when there is none (a
    namespace from before slots). The API server takes one write per resourceVersion,
    so concurrent writers end with distinct numbers."""
    keyring = keys.keyring(namespace)
    fill = keys.stage_slot if staged else keys.fill_slot
    for _ in range(SLOT_ATTEMPTS):
        refuse_beside_staged(keyring)
        free = keyring.free_slots
        if not free:
            reserve_next(keys, keyring)
        else:
            record = fill(namespace, free[0], key)
            if record is not None:
                return record
        keyring = keys.keyring(namespace)
    raise UserFacingError(f"could not fill a key slot of namespace {namespace} in "
                          f"{SLOT_ATTEMPTS} attempts: other writers kept taking them. "
                          f"Retry: keymount keys rotate -n {namespace}")


def keep_slots(keys: KeyApi, namespace: str, settings: Settings) -> None:
    """Reserve empty slots until `--rotation-slots` numbers wait above the active key
    (a staged key counts as one): the names new backend Pods list, so the next keys
    reach them without a restart. The key is made already: a failure here is a
    warning, never a reason to retry it."""
    try:
        keyring = keys.keyring(namespace)
        for _ in range(SLOT_ATTEMPTS):
            waiting = len(keyring.free_slots) + len(keyring.staged_keys)
            if waiting >= settings.rotation_slots:
                return
            reserve_next(keys, keyring)
            keyring = keys.keyring(namespace)
    except UserFacingError as exc:
        print(f"warning: the key is made, but keymount could not reserve the next slots "
              f"({exc}); running Pods get the next key live only through a slot. Reserve "
              f"them later: keymount keys create -n {namespace} --dry-run shows the next, "
              f"and the next keys rotate reserves them", file=sys.stderr)


def refuse_beside_staged(keyring: Keyring) -> None:
    """No key is added while one is staged: a key made now would take a number above
    it, and activating the staged key later would not make it the active one."""
    staged, ns = keyring.staged, keyring.namespace
    if staged is not None:
        raise UserFacingError(
            f"namespace {ns} has a staged key, {staged.name} (number {staged.index}); one "
            f"key is staged at a time and activated before the next is added. Activate it "
            f"(keymount keys activate -n {ns}) or cancel it (keymount keys retire "
            f"{staged.name} -n {ns}), then rotate again")


RotationMode = Literal["stage", "activate"]


def should_stage(*, stage: bool, activate_now: bool, has_policy: bool) -> bool:
    """`keys rotate` stages with --stage, or when the namespace has a policy unless
    --activate-now says otherwise (docs/contract.md, "Staged keys")."""
    return stage or (has_policy and not activate_now)


def rotation_mode(keys: KeyApi, namespace: str, *, stage: bool,
                  activate_now: bool) -> RotationMode:
    """How `keys rotate` adds its key; asks for the namespace's policy only when no flag
    says. A user who may not read policies gets the key active at once, as before
    policies existed, with a warning that says how to stage instead."""
    try:
        policy = not (stage or activate_now) and keys.has_policy(namespace)
    except PolicyUnknown as exc:
        print(f"warning: {exc}; the new key is active at once, as in a namespace without "
              f"one. To stage it: keymount keys rotate -n {namespace} --stage (or ask for "
              f"list on keypolicies.keymount.io)", file=sys.stderr)
        return "activate"
    if should_stage(stage=stage, activate_now=activate_now, has_policy=policy):
        return "stage"
    if activate_now:
        print(f"warning: --activate-now skips staging: applications in namespace "
              f"{namespace} encrypt with the new key at once, while running Pods that "
              f"have not received it yet (until the kubelet's next sync and Secret cache "
              f"refresh, about 2 minutes with kubelet defaults) cannot decrypt what it "
              f"encrypts. Stage instead: keymount keys rotate -n {namespace} --stage",
              file=sys.stderr)
    return "activate"


def refuse_staged_name(name: str | None, index: int | None) -> None:
    """A staged key is made only in the next slot: Pods list nothing else."""
    if name is not None or index is not None:
        raise UserFacingError(
            "a staged key lives in the next key slot (keymount-key-N): running Pods get "
            "it only there. Drop --name/--index, or add the key active at once with "
            "--activate-now", 2)


def make_key(keys: KeyApi, namespace: str, key: bytes, *, name: str | None,
             index: int | None, settings: Settings, staged: bool = False) -> KeyRecord:
    """A new key: under `name` (or at `index`), stamped by keymount's webhook from a
    fresh view, which running Pods get only by a restart; otherwise filling the next
    slot (with `staged`, as a staged key), which they get live."""
    from .key_secrets import build_key_secret
    if staged:
        refuse_staged_name(name, index)
    if name is None and index is None:
        return fill_next_slot(keys, namespace, key, staged=staged)
    return keys.create_secret(build_key_secret(
        name or slot_secret_name(index or 0), namespace=namespace, key=key, index=index,
        settings=settings))


def announce_key(keys: KeyApi, namespace: str, record: KeyRecord, key: bytes, *,
                 settings: Settings) -> None:
    """Say what was made, then keep the slots (the key exists whatever happens next)."""
    fingerprint = check_key(key, encoding=settings.key_encoding).fingerprint
    if record.state == "staged":
        print(f"secret/{record.name} staged in namespace {namespace}: number "
              f"{record.index} (file {staged_file_name(record.index)}), fingerprint "
              f"{fingerprint}")
    else:
        report_created(record, namespace, fingerprint)
    keep_slots(keys, namespace, settings)


def slot_manifest(keyring: Keyring, *, key: bytes, name: str | None,
                  settings: Settings, staged: bool = False) -> dict[str, Any]:
    """The manifest of the next key, for GitOps: it fills the lowest empty slot (so
    `kubectl apply` of it is an update of that slot, and running Pods get it), or makes
    the next number's slot name when the namespace has none. Under `name`, a key of
    the next number that running Pods get only by a restart. With `staged`, the key
    is in the staged field: a staged key. Without `name`, it is refused while a key is
    staged, as filling the slot would be (`fill_next_slot`)."""
    from .key_secrets import build_key_secret
    if name is None:
        refuse_beside_staged(keyring)
    free = keyring.free_slots
    if name is None and free:
        slot = free[0]
        manifest = build_key_secret(slot.name, namespace=keyring.namespace, key=key,
                                    index=slot.index, settings=settings,
                                    numbers_used=format_numbers(slot.numbers_used))
    else:
        number = keyring.next_number
        manifest = build_key_secret(name or slot_secret_name(number),
                                    namespace=keyring.namespace, key=key, index=number,
                                    settings=settings)
    if staged:
        data = manifest["data"]
        data[staged_field(settings.key_field)] = data.pop(settings.key_field)
    return manifest


def cmd_rotate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    keys, namespace = connect_namespace(args, settings)
    key = read_key_material(args, settings)
    keyring = keys.keyring(namespace)
    staged = rotation_mode(keys, namespace, stage=args.stage,
                           activate_now=args.activate_now) == "stage"
    if staged and args.restart:
        raise UserFacingError(
            "--restart rolls workloads after the new key is active; a staged key is not "
            "active yet. Restart after activating it: keymount keys activate -n "
            f"{namespace} --restart", 2)
    if args.dry_run:
        refuse_beside_staged(keyring)
        if staged:
            refuse_staged_name(args.name, None)
        print_manifest(slot_manifest(keyring, key=key, name=args.name, settings=settings,
                                     staged=staged), args.output)
        warn_manifest_holds_key()
        return 0
    record = make_key(keys, namespace, key, name=args.name, index=None, settings=settings,
                      staged=staged)
    announce_key(keys, namespace, record, key, settings=settings)
    if record.state == "staged":
        print(f"Backend Pods get it as {staged_file_name(record.index)}: applications "
              f"decrypt with it but do not encrypt with it yet. Once every running Pod has "
              f"it (the kubelet's sync period plus its Secret cache TTL, about 2 minutes "
              f"with kubelet defaults), activate it: keymount keys activate -n {namespace}")
        report_rollout(keys, namespace, record)
        return 0
    if record.index_explicit:
        print(f"New backend Pods get it as {key_file_name(record.index)}, the highest "
              f"number: applications encrypt with it from now on.")
    report_rollout(keys, namespace, record)
    if args.restart:
        restart_workloads(keys, namespace, record, wait=args.wait, timeout=args.timeout)
    return 0


def restart_workloads(keys: KeyApi, namespace: str, record: KeyRecord, *, wait: bool,
                      timeout: float) -> None:
    """Roll, one at a time, the workloads whose Pods started without the new key, as
    `kubectl rollout restart` does; with `wait`, each must finish before the next, and
    the first that does not stops the command."""
    import time

    from .lifecycle import restart_targets, rollout_state
    owners: dict[tuple[str, str], ApiObject | None] = {}  # each owner read once
    workloads, others = restart_targets(
        keys.backend_pods(namespace), record.name,
        controller_of=lambda pod: keys.controller_of(namespace, pod, owners=owners))
    for command in others:
        print(f"not a Deployment, StatefulSet or DaemonSet; restart it yourself: {command}")
    for position, (kind, name) in enumerate(workloads):
        keys.restart_workload(namespace, kind, name,
                              at=_now().strftime("%Y-%m-%dT%H:%M:%SZ"))
        print(f"{kind.lower()}/{name} restarted")
        if not wait:
            continue
        deadline = time.monotonic() + timeout
        while True:
            state, what = rollout_state(kind, keys.read_workload(namespace, kind, name))
            if state == "done":
                print(f"{kind.lower()}/{name} rolled out")
                break
            if state == "failed" or time.monotonic() >= deadline:
                left = ", ".join(f"{k.lower()}/{n}" for k, n in workloads[position + 1:])
                raise UserFacingError(
                    f"rollout of {kind.lower()}/{name} in namespace {namespace} did not "
                    f"finish ({what}{'' if state == 'failed' else f' after {timeout:g}s'}); "
                    f"stopped there{f', not restarted: {left}' if left else ''}. See "
                    f"kubectl rollout status {kind.lower()}/{name} -n {namespace}")
            time.sleep(1.0)


def report_rollout(keys: KeyApi, namespace: str, record: KeyRecord) -> None:
    """Which running Pods get the new key live (they list its name as a rotation slot)
    and which need a restart, by the workload to restart."""
    from .lifecycle import listed_slots, may_still_read, restart_command
    live, restart = [], set()
    owners: dict[tuple[str, str], ApiObject | None] = {}  # each owner read once
    for pod in keys.backend_pods(namespace):
        if not may_still_read(pod):
            continue
        if record.name in listed_slots(pod):
            live.append(pod["metadata"]["name"])
            continue
        restart.add(keys.controller_of(namespace, pod, owners=owners)
                    or ("Pod", pod["metadata"]["name"]))
    if live:
        print(f"{len(live)} running Pod(s) get it live, as a new file within the kubelet's "
              f"sync period (about a minute), no restart: {', '.join(sorted(live))}")
    if restart:
        print("These Pods cannot get it without a restart (started before keymount listed "
              "this key's name, or the key was added under another name):")
        for kind, name in sorted(restart):
            print(f"  {restart_command(kind, name, namespace)}")
    if not live and not restart:
        print("No backend Pods run here now; new ones get it.")


# --- activate ---------------------------------------------------------------------------

# How long every running Pod may take to receive a staged key with kubelet defaults
# (syncFrequency 1 minute plus the Secret cache TTL): activating sooner is allowed, with
# a warning.
DELIVERY_HINT_SECONDS = 120


def activation_warning(staged: KeyRecord, *, now: datetime) -> str:
    """A warning when the staged key is younger than the time Pods may need to receive
    it; "" otherwise (or when its staged-at is unknown)."""
    if staged.staged_at is None:
        return ""
    age = (now - staged.staged_at).total_seconds()
    if age >= DELIVERY_HINT_SECONDS:
        return ""
    return (f"warning: {staged.name} was staged {max(0, int(age))}s ago; running Pods "
            f"that have not received it under staged/ yet (up to the kubelet's sync period "
            f"plus its Secret cache TTL, about {DELIVERY_HINT_SECONDS}s with kubelet "
            f"defaults) cannot decrypt what the new key encrypts until they do")


def activate_staged_key(keys: KeyApi, namespace: str) -> KeyRecord:
    """Activate the namespace's staged key, reading it again when it changed under us."""
    for _ in range(SLOT_ATTEMPTS):
        staged = keys.keyring(namespace).staged
        if staged is None:
            raise UserFacingError(
                f"namespace {namespace} has no staged key to activate; `keymount keys list "
                f"-n {namespace}` shows its keys, and `keymount keys rotate -n {namespace} "
                f"--stage` stages one")
        record = keys.activate_staged(namespace, staged)
        if record is not None:
            return record
    raise UserFacingError(f"could not activate the staged key of namespace {namespace} in "
                          f"{SLOT_ATTEMPTS} attempts: it kept changing. Retry: keymount "
                          f"keys activate -n {namespace}")


def cmd_activate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    keys, namespace = connect_namespace(args, settings)
    staged = keys.keyring(namespace).staged
    warning = activation_warning(staged, now=_now()) if staged is not None else ""
    if warning:
        print(warning, file=sys.stderr)
    record = activate_staged_key(keys, namespace)
    print(f"secret/{record.name} activated in namespace {namespace}: number {record.index} "
          f"(file {key_file_name(record.index)}), fingerprint {record.fingerprint}. "
          f"Applications encrypt with it from now on; running Pods that list its slot get "
          f"the file within the kubelet's sync period, new Pods at once.")
    if args.restart:
        restart_workloads(keys, namespace, record, wait=args.wait, timeout=args.timeout)
    return 0


# --- list / status ----------------------------------------------------------------------

def cluster_keyrings(keys: KeyApi, namespace: str | None) -> dict[str, Keyring]:
    """Each namespace's keyring, built once from one list (with -n, that namespace's,
    empty or not)."""
    from .lifecycle import records_by_namespace
    grouped = records_by_namespace(keys.key_records(namespace))
    if namespace is not None:
        grouped.setdefault(namespace, [])
    return {ns: build_keyring(ns, records) for ns, records in sorted(grouped.items())}


def cmd_list(args: argparse.Namespace) -> int:
    from .lifecycle import build_key_rows
    settings = _settings(args)
    keys, namespace = connect(args, settings)
    keyrings = cluster_keyrings(keys, namespace)
    now, rows = _now(), []
    for ns, keyring in keyrings.items():
        rows += [{"namespace": ns, **row.as_dict()} for row in build_key_rows(keyring, now=now)]
    headers = ["file", "secret", "index", "state", "fingerprint", "age"]
    if namespace is None:
        headers.insert(0, "namespace")
    if rows or args.output != "table":
        emit(rows, output=args.output, headers=headers)
    else:
        print(f"no key Secrets in namespace {namespace}; create one: keymount keys create "
              f"encryption-key-1 -n {namespace} --generate", file=sys.stderr)
    warn_old_keys(keyrings, settings)
    warn_unlabelled_slots(keys, namespace, settings)
    return 0


def warn_unlabelled_slots(keys: KeyApi, namespace: str | None, settings: Settings) -> None:
    """A Secret under a key slot's name without the key label: backend Pods list that
    name as an optional key source, so what it holds would reach them unchecked."""
    from .audit import unlabelled_slots
    for ns, name in unlabelled_slots(keys.slot_named_secrets(namespace),
                                     key_selector=settings.key_selector):
        print(f"warning: Secret {name!r} in namespace {ns!r} has a key slot's name but not "
              f"the key label ({settings.key_selector}): backend Pods would mount what it "
              f"holds as a key; delete or rename it (kubectl delete secret {name} -n {ns})",
              file=sys.stderr)


def warn_old_keys(keyrings: dict[str, Keyring], settings: Settings) -> None:
    """--max-key-age: flag each namespace whose newest key is older."""
    from .lifecycle import newest_key_too_old
    now = _now()
    for ns, keyring in keyrings.items():
        if newest_key_too_old(keyring, max_age=settings.max_key_age, now=now):
            print(f"warning: the newest key of namespace {ns} is older than --max-key-age; "
                  f"rotate: keymount keys rotate -n {ns}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    from .lifecycle import build_pod_key_state, may_still_read
    settings = _settings(args)
    keys, namespace = connect(args, settings)
    keyrings = cluster_keyrings(keys, namespace)
    states = []
    for pod in keys.backend_pods(namespace):
        if not may_still_read(pod):  # terminating Pods still read their keys
            continue
        ns = pod["metadata"]["namespace"]
        state = build_pod_key_state(pod, keyrings.get(ns) or Keyring(ns))
        if state is not None:
            states.append(state.as_dict())
    warn_old_keys(keyrings, settings)
    warn_unlabelled_slots(keys, namespace, settings)
    behind = [s for s in states if s["state"] != "current"]
    if args.output == "table":
        if not behind:
            print(f"all {len(states)} backend Pods run with the current key set")
            return 0
        for row in behind:
            row["pod"] += " (terminating)" if row["terminating"] else ""
            row["gets it"] = "live (kubelet sync)" if row["state"] == "updating" \
                else "after a restart"
            for column in ("missing", "removed"):
                row[column] = ", ".join(row[column]) or "-"
    emit(behind if args.output == "table" else states, output=args.output,
         headers=["namespace", "pod", "state", "missing", "removed", "gets it"])
    return 0


# --- retire / pin ------------------------------------------------------------------------

def pin_legacy_keys(keys: KeyApi, keyring: Keyring) -> int:
    """Stamp each key made before keymount numbered keys at the number it has now."""
    from .lifecycle import legacy_pins
    pins = legacy_pins(keyring)
    from .keyguard import pin_annotations
    for name, number in pins:
        keys.patch_secret(keyring.namespace, name,
                          {"metadata": {"annotations": pin_annotations(keyring, number)}})
        print(f"secret/{name} pinned at number {number} ({key_file_name(number)})")
    return len(pins)


def cmd_pin(args: argparse.Namespace) -> int:
    settings = _settings(args)
    keys, namespace = connect_namespace(args, settings)
    keyring = keys.keyring(namespace)
    if keyring.conflict:
        raise UserFacingError(describe_conflict(keyring))
    if not pin_legacy_keys(keys, keyring):
        print(f"every key of namespace {namespace} already has its number")
    return 0


# Where client-side `kubectl apply` keeps the last manifest it applied, whole.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def cmd_retire(args: argparse.Namespace) -> int:
    from .lifecycle import pods_mounting
    settings = _settings(args)
    keys, namespace = connect_namespace(args, settings)
    keyring = keys.keyring(namespace)
    record: KeyRecord | None = keyring.find(args.name)
    if record is None:
        raise UserFacingError(f"no key Secret {args.name!r} in namespace {namespace}; "
                              f"`keymount keys list -n {namespace}` shows them")
    if record.state == "retired":
        print(f"secret/{args.name} is already retired (number {record.index} stays reserved)")
        return 0
    if record is keyring.newest:
        raise UserFacingError(
            f"{args.name} is the active key of namespace {namespace}: applications encrypt "
            f"new data with it. Add a new key first: keymount keys rotate -n {namespace}")
    number = keyring.number_of(args.name)
    if number is None and record.numbered:
        # An invalid key keymount numbered (a setting such as --key-encoding made it
        # invalid) keeps its number: the guard keeps it reserved (docs/contract.md).
        number = record.index
    # A staged key encrypted nothing yet: cancelling it takes staged/ away from the Pods
    # that hold it, and no data needs it.
    # Every Pod, not only those labelled backend now: a running Pod's labels can change,
    # its volumes cannot, and one that lost the label still reads the key.
    pods = [] if record.state == "staged" else pods_mounting(keys.pods(namespace), args.name)
    if record.state == "staged":
        print(f"{args.name} is staged (number {number}); retiring it cancels the staging")
    elif pods:
        print(f"{len(pods)} Pod(s) still mount {args.name} (number {number}, fingerprint "
              f"{record.fingerprint or '-'}):")
        for pod in pods:
            print(f"  {pod}")
        if not args.force:
            raise UserFacingError(
                f"not retired: Pods still mount {args.name}, and data they encrypted with "
                f"it needs it to be read. Re-encrypt that data and restart them, or retire "
                f"anyway with --force")
    else:
        print(f"no Pod mounts {args.name}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserFacingError("not retired: confirm with --yes (no terminal to ask on)")
        answer = input(f"Destroy the key material of secret {args.name} in {namespace}? "
                       f"[y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise UserFacingError("not retired")
    if record.state == "valid" and keyring.legacy:
        pin_legacy_keys(keys, keyring)
    # A merge patch: `null` deletes the key field (and the staged one, which a staged or
    # activated key has), and kubectl's copy of the whole manifest, key included, that
    # a client-side `kubectl apply` of a key manifest leaves in LAST_APPLIED (the
    # tombstone is kept for good); the label and number stay.
    keys.patch_secret(namespace, args.name, {
        "data": {settings.key_field: None, staged_field(settings.key_field): None},
        "metadata": {"annotations": {RETIRED_ANNOTATION: _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
                                     LAST_APPLIED: None}}})
    kept = f"number {number} stays reserved" if number is not None else "it had no number"
    after = ("It keeps its slot name for good: running Pods may list it"
             if slot_secret_name(number or 0) == args.name else
             f"The Secret may be deleted (kubectl delete secret {args.name} -n {namespace}) "
             f"once a newer key records its number; keeping it costs nothing")
    print(f"secret/{args.name} retired: its key material is destroyed and {kept}. {after}.")
    return 0


# --- backup / restore ----------------------------------------------------------------------

def read_secret_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text().strip("\r\n")
    except OSError as exc:
        raise UserFacingError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:  # its text names the offending byte: never shown
        raise UserFacingError(f"cannot read {what} {path}: not UTF-8 text") from None


def decrypt_backup(args: argparse.Namespace, path: str) -> list[BackedUpKey]:
    from .backup import decrypt_file, read_identities
    if args.passphrase_file:
        return decrypt_file(path, passphrase=read_secret_text(args.passphrase_file,
                                                              "passphrase file"))
    if not args.identity:
        raise UserFacingError("give --identity FILE (an age identity) or --passphrase-file F",
                              2)
    return decrypt_file(path, identities=read_identities(read_secret_text(
        args.identity, "identity file")))


def cmd_backup(args: argparse.Namespace) -> int:
    from .backup import collect, encode, encrypt
    from .key_secrets import parse_key_secret
    from .lifecycle import records_by_namespace
    if args.verify:
        keys = decrypt_backup(args, args.verify)
        for key in keys:
            print(f"{key.namespace}/{key.name}: number {key.number}, "
                  f"{'retired' if key.retired else 'fingerprint ' + key.fingerprint}: ok")
        print(f"{args.verify}: {len(keys)} key(s), every fingerprint matches")
        return 0
    if not args.output_file:
        raise UserFacingError("give -o FILE for the backup (or --verify FILE)", 2)
    settings = _settings(args)
    if not args.recipient and not args.passphrase_file:
        raise UserFacingError("give --recipient AGE_PUBLIC_KEY (repeatable) or "
                              "--passphrase-file F", 2)
    passphrase = read_secret_text(args.passphrase_file, "passphrase file") \
        if args.passphrase_file else None
    keys_client, namespace = connect(args, settings)
    secrets = keys_client.key_secrets(namespace)
    grouped = records_by_namespace(parse_key_secret(s, settings=settings) for s in secrets)
    keyrings = {ns: build_keyring(ns, records) for ns, records in grouped.items()}
    keys = collect(secrets, keyrings, settings=settings)
    ciphertext = encrypt(encode(keys), recipients=args.recipient or [], passphrase=passphrase)
    # Only ciphertext touches the disk: written beside the target, then renamed; a new
    # file of a random name (O_EXCL, O_NOFOLLOW), never a link planted at a fixed one.
    target = Path(args.output_file)
    try:
        replace_file(target, ciphertext)
    except OSError as exc:
        raise UserFacingError(f"cannot write {target}: {exc.strerror}; nothing was "
                              f"written") from None
    namespaces = sorted({k.namespace for k in keys})
    print(f"wrote {target}: {len(keys)} key Secret(s) of {len(namespaces)} namespace(s) "
          f"({', '.join(namespaces) or 'none'}), encrypted "
          f"{'with a passphrase' if passphrase else f'to {len(args.recipient)} recipient(s)'}"
          f". Check it: keymount keys backup --verify {target} "
          f"{'--passphrase-file F' if passphrase else '--identity F'}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .backup import restored_secret
    from .key_secrets import key_labels
    settings = _settings(args)
    keys = decrypt_backup(args, args.file)
    if args.namespace:
        keys = [k for k in keys if k.namespace == args.namespace]
        if not keys:
            raise UserFacingError(f"{args.file} holds no key of namespace {args.namespace}")
    if args.dry_run:
        labels = key_labels(settings)
        print_manifest({"apiVersion": "v1", "kind": "List", "items": [
            restored_secret(k, settings=settings, labels=labels) for k in keys]}, args.output)
        warn_manifest_holds_key()
        return 0
    from .cluster import KeyClient
    client = KeyClient.from_kubeconfig(kubeconfig=args.kubeconfig, context=args.context,
                                       settings=settings)
    return restore_keys(client, keys, settings=settings, source=args.file)


# How long a restore waits out keymount's refusals while it limits live reads (HTTP
# 429), per key: its budget refills within a second or two, so a longer wait means
# something else holds it, and the restore stops with what is left.
RESTORE_PATIENCE = 120.0


def restore_keys(client: KeyApi, keys: list[BackedUpKey], *, settings: Settings,
                 source: str, patience: float = RESTORE_PATIENCE,
                 sleep: Any = None, clock: Any = None) -> int:
    """Judge the whole file (against itself, then the cluster: `backup.plan_restore`)
    before writing anything; then write what is missing in namespace and number order.

    A write that fails half-way leaves only keys of the file, each with its backed-up
    name, number and bytes: the command names them and what is left, and the same
    command run again finishes it (keys already there are no-ops)."""
    import time

    from .backup import check_present, plan_restore, restored_secret
    from .key_secrets import key_labels
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    namespaces = sorted({k.namespace for k in keys})
    names = client.secret_names(namespaces)
    keyrings = cluster_keyrings(client, namespaces[0] if len(namespaces) == 1 else None)
    plan = plan_restore(keys, keyrings, secret_names=names)
    # Keys already there are compared by their bytes, before anything is written.
    check_present(plan.present, {ns: client.key_secrets(ns) for ns in
                                 sorted({k.namespace for k in plan.present})},
                  settings=settings)
    labels = key_labels(settings)
    for key in plan.present:
        print(f"{key.namespace}/{key.name}: number {key.number} already there, unchanged")
    for done, key in enumerate(plan.create):
        manifest = restored_secret(key, settings=settings, labels=labels)
        try:
            _create_patiently(client, manifest, patience=patience, sleep=sleep, clock=clock)
        except UserFacingError as exc:
            left = plan.create[done:]
            raise UserFacingError(
                f"restoring {key.namespace}/{key.name} (number {key.number}) failed: {exc}. "
                f"{done} of {len(plan.create)} key Secret(s) were written, each as in the "
                f"backup; {len(left)} are not: "
                f"{_summary(left)}. Fix the cause and run the same command again: the keys "
                f"already written are left as they are and the rest are written "
                f"(keymount keys restore {source} ...)") from None
        print(f"{key.namespace}/{key.name}: restored at number {key.number} "
              f"({'retired' if key.retired else 'fingerprint ' + key.fingerprint})")
    return 0


def _create_patiently(client: KeyApi, manifest: ApiObject, *, patience: float,
                      sleep: Any, clock: Any) -> None:
    """Create, waiting out keymount's 429s with backoff (0.05 s doubling to 1 s)."""
    deadline, delay = clock() + patience, 0.05
    while not client.restore_secret(manifest):
        if clock() + delay > deadline:
            raise UserFacingError(
                f"keymount kept refusing it for {patience:.0f} s because it limits live "
                f"reads of the API server (429); check its --live-reads-per-second and "
                f"the keymount_live_reads_total metric")
        sleep(delay)
        delay = min(delay * 2, 1.0)


def _summary(keys: tuple[BackedUpKey, ...]) -> str:
    shown = ", ".join(f"{k.namespace}/{k.name}" for k in keys[:10])
    return shown + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


# --- import ---------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> int:
    from .lifecycle import import_helm_values
    settings = _settings(args)
    try:
        values = yaml.safe_load(Path(args.helm_values).read_text())
    except OSError as exc:
        raise UserFacingError(f"cannot read {args.helm_values}: {exc.strerror}") from None
    except UnicodeDecodeError:  # its text names the offending byte, maybe the key's
        raise UserFacingError(f"{args.helm_values}: not UTF-8 text") from None
    except yaml.YAMLError:
        raise UserFacingError(f"{args.helm_values}: not valid YAML") from None
    namespace = args.namespace or "default"
    result = import_helm_values(values, name=args.name, namespace=namespace, settings=settings)
    if result.explanation:
        print(result.explanation, file=sys.stderr)
        return 1
    if result.refusal:
        raise UserFacingError(result.refusal)
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    assert result.manifest is not None  # neither explained nor refused
    print_manifest(result.manifest, args.output)
    # The chart's key, now in a manifest headed for a GitOps repository: the same
    # warning as every other manifest that holds key material.
    warn_manifest_holds_key()
    return 0


def parse_duration_seconds(text: str) -> float:
    return parse_duration(text).total_seconds()


def add_key_lifecycle_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    create = sub.add_parser("create", help="create a validated, labelled key Secret")
    create.add_argument("name", nargs="?", default=None,
                        help="Secret name (default: fill the next key slot, keymount-key-N, "
                             "which running Pods get without a restart)")
    material = create.add_mutually_exclusive_group()
    material.add_argument("--generate", action="store_true",
                          help="32 random bytes from the OS CSPRNG")
    material.add_argument("--from-file", metavar="FILE", help="key file (default: stdin)")
    create.add_argument("--index", type=int, default=None, help="keymount.io/key-index")
    create.add_argument("--dry-run", action="store_true",
                        help="print the Secret manifest instead of creating it (GitOps)")
    create.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                        help="manifest format with --dry-run")
    add_cluster_flags(create)
    add_settings_flags(create)
    create.set_defaults(func=cmd_create)

    rotate = sub.add_parser("rotate", help="add a new key at the next number (staged first "
                                           "when the namespace has a policy)")
    material = rotate.add_mutually_exclusive_group()
    material.add_argument("--generate", action="store_true", help="(the default)")
    material.add_argument("--from-file", metavar="FILE", help="key file")
    rotate.add_argument("--name", default=None,
                        help="Secret name (default keymount-key-N: running Pods get only a "
                             "key of that name without a restart)")
    rotate.add_argument("--dry-run", action="store_true",
                        help="print the new key's manifest, with the number keymount would "
                             "stamp, instead of creating it")
    rotate.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                        help="manifest format with --dry-run")
    staging = rotate.add_mutually_exclusive_group()
    staging.add_argument("--stage", action="store_true",
                         help="stage the key: Pods get it under staged/ first, and it is "
                              "used to encrypt only after `keys activate` (the default "
                              "when the namespace has a policy)")
    staging.add_argument("--activate-now", action="store_true",
                         help="make the key active at once, even with a KeyPolicy (Pods "
                              "that have not received it yet cannot decrypt what it "
                              "encrypts)")
    rotate.add_argument("--restart", action="store_true",
                        help="then roll, one at a time, the Deployments, StatefulSets and "
                             "DaemonSets whose Pods started without the new key (for "
                             "applications that read their keys only at start)")
    rotate.add_argument("--wait", action="store_true",
                        help="with --restart: wait for each rollout; stop at the first "
                             "that does not finish")
    rotate.add_argument("--timeout", type=parse_duration_seconds, default=300.0,
                        help="with --wait: how long one rollout may take (default 5m)")
    add_cluster_flags(rotate)
    add_settings_flags(rotate)
    rotate.set_defaults(func=cmd_rotate, default_generate=True)

    activate = sub.add_parser("activate", help="make the staged key the active one")
    activate.add_argument("--restart", action="store_true",
                          help="then roll the workloads whose Pods started without it, as "
                               "keys rotate --restart does")
    activate.add_argument("--wait", action="store_true",
                          help="with --restart: wait for each rollout")
    activate.add_argument("--timeout", type=parse_duration_seconds, default=300.0,
                          help="with --wait: how long one rollout may take (default 5m)")
    add_cluster_flags(activate)
    add_settings_flags(activate)
    activate.set_defaults(func=cmd_activate)

    listing = sub.add_parser("list", help="the keys a new backend Pod would get, and why not")
    add_cluster_flags(listing, all_namespaces=True, output=True)
    add_settings_flags(listing)
    listing.set_defaults(func=cmd_list)

    retire = sub.add_parser("retire", help="destroy a key's material; its number stays "
                                           "reserved")
    retire.add_argument("name", help="key Secret name")
    retire.add_argument("--yes", action="store_true", help="do not ask")
    retire.add_argument("--force", action="store_true",
                        help="retire even while Pods still mount the key")
    add_cluster_flags(retire)
    add_settings_flags(retire)
    retire.set_defaults(func=cmd_retire)

    backup = sub.add_parser("backup", help="every key Secret, encrypted (age format)")
    backup.add_argument("-o", "--output-file", metavar="FILE", help="the backup to write")
    backup.add_argument("--recipient", action="append", metavar="AGE_PUBLIC_KEY",
                        help="encrypt to this age public key (repeatable)")
    backup.add_argument("--passphrase-file", metavar="F",
                        help="encrypt (or, with --verify, decrypt) with this passphrase")
    backup.add_argument("--verify", metavar="FILE",
                        help="decrypt FILE and check every fingerprint; writes nothing")
    backup.add_argument("--identity", metavar="F", help="age identity file, with --verify")
    add_cluster_flags(backup, all_namespaces=True)
    add_settings_flags(backup)
    backup.set_defaults(func=cmd_backup)

    restore = sub.add_parser("restore", help="recreate key Secrets from a backup, all or "
                                             "nothing, with their numbers")
    restore.add_argument("file", help="the backup")
    restore.add_argument("--identity", metavar="F", help="age identity file")
    restore.add_argument("--passphrase-file", metavar="F", help="passphrase file")
    restore.add_argument("--dry-run", action="store_true",
                         help="print the Secrets instead of creating them (GitOps)")
    restore.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    restore.add_argument("--kubeconfig", default=None)
    restore.add_argument("--context", default=None)
    restore.add_argument("-n", "--namespace", default=None,
                         help="restore only this namespace of the backup")
    add_settings_flags(restore)
    restore.set_defaults(func=cmd_restore)

    pin = sub.add_parser("pin", help="stamp keys made before keymount numbered keys at the "
                                     "number they have now")
    add_cluster_flags(pin)
    add_settings_flags(pin)
    pin.set_defaults(func=cmd_pin)

    imports = sub.add_parser("import", help="the old Helm chart's key as a key Secret manifest")
    imports.add_argument("--helm-values", required=True, metavar="FILE", help="values.yaml")
    imports.add_argument("--name", default="encryption-key-1", help="Secret name")
    imports.add_argument("-n", "--namespace", default=None, help="namespace (default default)")
    imports.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    add_settings_flags(imports)
    imports.set_defaults(func=cmd_import)


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit, confirm, unlabelled_slots
    from .lifecycle import parse_pod_keys
    settings = _settings(args)
    keys, namespace = connect(args, settings)
    keyrings = cluster_keyrings(keys, namespace)
    pods = [parse_pod_keys(p) for p in keys.backend_pods(namespace)]
    unlabelled = unlabelled_slots(keys.slot_named_secrets(namespace),
                                  key_selector=settings.key_selector)
    rbac, writers, now = keys.rbac(namespace), build_key_writers(args), _now()
    findings = audit(keyrings, rbac=rbac, pods=pods, writers=writers,
                     max_age=settings.max_key_age, now=now, unlabelled=unlabelled)
    if any(f.kind == "reused-key" for f in findings):
        # One fingerprint (3 bytes) in two namespaces: the same key only if the bytes are.
        findings = audit(keyrings, rbac=rbac, pods=pods, writers=writers,
                         max_age=settings.max_key_age, now=now, unlabelled=unlabelled,
                         key_ids=key_ids(keys.key_secrets(namespace), settings))
    grants = [f.grant for f in findings if f.grant is not None]
    answers = keys.confirm(grants) if grants else {}
    if len(answers) < len(grants):
        print(f"warning: {len(grants) - len(answers)} RBAC path(s) not confirmed by a "
              f"SubjectAccessReview: your user needs create on "
              f"subjectaccessreviews.authorization.k8s.io (kubectl auth can-i create "
              f"subjectaccessreviews), and at most 500 are asked", file=sys.stderr)
    findings = confirm(findings, answers)
    rows = [f.as_dict() for f in findings]
    if args.output == "table" and not rows:
        print(f"no findings in {namespace or 'any namespace'} "
              f"({len(keyrings)} namespace(s) with keys)")
        return 0
    if args.output == "table":
        rows = [{**row, "detail": row["detail"] + _confirmation(row["confirmed"])}
                for row in rows]
    emit(rows, output=args.output, headers=["kind", "namespace", "subject", "detail"])
    return 1 if rows else 0


def key_ids(secrets: list[ApiObject], settings: Settings) -> dict[tuple[str, str], bytes]:
    """A digest of each valid key's bytes (raw or base64 alike) by (namespace, name)."""
    import hashlib

    from keymount.keyrule import decode_key

    from .key_secrets import read_key_field
    ids = {}
    for secret in secrets:
        meta = secret.get("metadata") or {}
        decoded = decode_key(read_key_field(secret, settings.key_field)[0], subject="key",
                             encoding=settings.key_encoding)
        if decoded.valid:
            ids[(str(meta.get("namespace")), str(meta.get("name")))] = \
                hashlib.sha256(decoded.key).digest()
    return ids


def _confirmation(confirmed: bool | None) -> str:
    if confirmed is None:
        return ""
    return " [API server: allowed]" if confirmed else " [API server: not allowed]"


def add_status_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="backend Pods running on a stale key set")
    add_cluster_flags(status, all_namespaces=True, output=True)
    add_settings_flags(status)
    status.set_defaults(func=cmd_status)

    audit_cmd = commands.add_parser(
        "audit", help="reused keys, who can read keys, overdue keys, stale Pods; exit 1 on "
                      "any finding")
    add_cluster_flags(audit_cmd, all_namespaces=True, output=True)
    add_settings_flags(audit_cmd)
    add_key_writer_flags(audit_cmd)
    audit_cmd.set_defaults(func=cmd_audit)
