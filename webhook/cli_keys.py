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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .config import Settings
from .errors import UserFacingError
from .keys import ALLOW_DELETE_ANNOTATION, KeyRecord, build_keyring, check_key, generate_key


def _settings(args: argparse.Namespace) -> Settings:
    from .cli import build_settings
    return build_settings(args)


def _now() -> datetime:
    return datetime.now(timezone.utc)


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


def connect(args: argparse.Namespace, settings: Settings):
    from .cluster import KeyClient, current_namespace
    if getattr(args, "all_namespaces", False):
        namespace = None
    else:
        namespace = args.namespace or current_namespace(kubeconfig=args.kubeconfig,
                                                        context=args.context)
    return KeyClient.from_kubeconfig(kubeconfig=args.kubeconfig, context=args.context,
                                     settings=settings), namespace


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
    from .cli import read_input
    key = read_input(args.from_file or "-")
    subject = f"file {args.from_file}" if args.from_file else "stdin"
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

def cmd_create(args: argparse.Namespace) -> int:
    from .key_secrets import build_key_secret
    settings = _settings(args)
    if args.index is not None and args.index < 1:
        raise UserFacingError(f"--index {args.index}: must be a positive integer", 2)
    key = read_key_material(args, settings)
    if args.dry_run:
        from .cluster import current_namespace
        namespace = args.namespace or current_namespace(kubeconfig=args.kubeconfig,
                                                        context=args.context)
        print_manifest(build_key_secret(args.name, namespace=namespace, key=key,
                                        index=args.index, settings=settings), args.output)
        return 0
    keys, namespace = connect(args, settings)
    manifest = build_key_secret(args.name, namespace=namespace, key=key, index=args.index,
                                settings=settings)
    keys.create_secret(manifest)
    fingerprint = check_key(key, encoding=settings.key_encoding).fingerprint
    print(f"secret/{args.name} created in namespace {namespace} (fingerprint {fingerprint})")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from .key_secrets import build_key_secret
    from .lifecycle import next_key_index, next_key_name, owner_of, restart_command
    settings = _settings(args)
    keys, namespace = connect(args, settings)
    key = read_key_material(args, settings)
    keyring = keys.keyring(namespace)
    index = next_key_index(keyring)
    name = args.name or next_key_name(keyring, index)
    keys.create_secret(build_key_secret(name, namespace=namespace, key=key, index=index,
                                        settings=settings))
    fingerprint = check_key(key, encoding=settings.key_encoding).fingerprint
    files = len(keyring.keys) + 1
    print(f"secret/{name} created in namespace {namespace}: index {index}, fingerprint "
          f"{fingerprint}; new backend Pods get it as encryption-key-{files} (the newest).")
    owners = set()
    for pod in keys.backend_pods(namespace):
        owner = owner_of(pod)
        owners.add(keys.controller_of(namespace, *owner) if owner
                   else ("Pod", pod["metadata"]["name"]))
    if owners:
        print("Running Pods keep their keys until restarted. Restart these to pick it up:")
        for kind, owner in sorted(owners):
            print(f"  {restart_command(kind, owner, namespace)}")
    else:
        print("Running Pods keep their keys until restarted; no backend Pods run here now.")
    return 0


# --- list / status ----------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    from .lifecycle import build_key_rows, records_by_namespace
    settings = _settings(args)
    keys, namespace = connect(args, settings)
    grouped = records_by_namespace(keys.key_records(namespace))
    if namespace is not None:
        grouped.setdefault(namespace, [])
    now, rows = _now(), []
    for ns in sorted(grouped):
        keyring = build_keyring(ns, grouped[ns])
        rows += [{"namespace": ns, **row.as_dict()} for row in build_key_rows(keyring, now=now)]
    headers = ["file", "secret", "index", "state", "fingerprint", "age"]
    if namespace is None:
        headers.insert(0, "namespace")
    if rows or args.output != "table":
        emit(rows, output=args.output, headers=headers)
    else:
        print(f"no key Secrets in namespace {namespace}; create one: keymount keys create "
              f"encryption-key-1 -n {namespace} --generate", file=sys.stderr)
    warn_old_keys(grouped, settings)
    return 0


def warn_old_keys(grouped: dict[str, list[KeyRecord]], settings: Settings) -> None:
    """--max-key-age: flag each namespace whose newest key is older."""
    from .lifecycle import newest_key_too_old
    now = _now()
    for ns in sorted(grouped):
        if newest_key_too_old(build_keyring(ns, grouped[ns]), max_age=settings.max_key_age,
                              now=now):
            print(f"warning: the newest key of namespace {ns} is older than --max-key-age; "
                  f"rotate: keymount keys rotate -n {ns}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    from .lifecycle import build_pod_key_state, is_running, records_by_namespace
    settings = _settings(args)
    keys, namespace = connect(args, settings)
    grouped = records_by_namespace(keys.key_records(namespace))
    states = []
    for pod in keys.backend_pods(namespace):
        if not is_running(pod):
            continue
        ns = pod["metadata"]["namespace"]
        state = build_pod_key_state(pod, build_keyring(ns, grouped.get(ns, [])))
        if state is not None:
            states.append(state.as_dict())
    warn_old_keys(grouped, settings)
    stale = [s for s in states if s["state"] == "stale"]
    shown = states if args.output != "table" else stale
    for row in shown:
        row["missing"] = ", ".join(row["missing"]) if args.output == "table" else row["missing"]
        row["removed"] = ", ".join(row["removed"]) if args.output == "table" else row["removed"]
    if args.output == "table" and not stale:
        print(f"all {len(states)} backend Pods run with the current key set")
        return 0
    emit(shown, output=args.output, headers=["namespace", "pod", "state", "missing", "removed"])
    return 0


# --- retire ---------------------------------------------------------------------------

def cmd_retire(args: argparse.Namespace) -> int:
    from .lifecycle import pods_mounting
    settings = _settings(args)
    keys, namespace = connect(args, settings)
    record: KeyRecord | None = keys.keyring(namespace).find(args.name)
    if record is None:
        raise UserFacingError(f"no key Secret {args.name!r} in namespace {namespace}; "
                              f"`keymount keys list -n {namespace}` shows them")
    pods = pods_mounting(keys.backend_pods(namespace), args.name)
    if pods:
        print(f"{len(pods)} running Pod(s) still mount {args.name} "
              f"(fingerprint {record.fingerprint or '-'}):")
        for pod in pods:
            print(f"  {pod}")
        print("Data they encrypted with it needs this key to be read; re-encrypt it first.")
    else:
        print(f"no running Pod mounts {args.name}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserFacingError("not retired: confirm with --yes (no terminal to ask on)")
        answer = input(f"Allow deleting secret {args.name} in {namespace}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise UserFacingError("not retired")
    keys.annotate_secret(namespace, args.name, {ALLOW_DELETE_ANNOTATION: "true"})
    print(f"secret/{args.name} retired: it may now be deleted "
          f"(kubectl delete secret {args.name} -n {namespace})")
    return 0


# --- import ---------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> int:
    from .lifecycle import import_helm_values
    settings = _settings(args)
    try:
        values = yaml.safe_load(Path(args.helm_values).read_text())
    except OSError as exc:
        raise UserFacingError(f"cannot read {args.helm_values}: {exc.strerror}") from None
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
    print_manifest(result.manifest, args.output)
    return 0


def add_key_lifecycle_commands(sub: argparse._SubParsersAction) -> None:
    from .cli import add_settings_flags

    create = sub.add_parser("create", help="create a validated, labelled key Secret")
    create.add_argument("name", help="Secret name")
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

    rotate = sub.add_parser("rotate", help="add a new key at the next index")
    material = rotate.add_mutually_exclusive_group()
    material.add_argument("--generate", action="store_true", help="(the default)")
    material.add_argument("--from-file", metavar="FILE", help="key file")
    rotate.add_argument("--name", default=None, help="Secret name (default encryption-key-N)")
    add_cluster_flags(rotate)
    add_settings_flags(rotate)
    rotate.set_defaults(func=cmd_rotate, default_generate=True)

    listing = sub.add_parser("list", help="the keys a new backend Pod would get, and why not")
    add_cluster_flags(listing, all_namespaces=True, output=True)
    add_settings_flags(listing)
    listing.set_defaults(func=cmd_list)

    retire = sub.add_parser("retire", help="show who mounts a key, then allow deleting it")
    retire.add_argument("name", help="key Secret name")
    retire.add_argument("--yes", action="store_true", help="do not ask")
    add_cluster_flags(retire)
    add_settings_flags(retire)
    retire.set_defaults(func=cmd_retire)

    imports = sub.add_parser("import", help="the old Helm chart's key as a key Secret manifest")
    imports.add_argument("--helm-values", required=True, metavar="FILE", help="values.yaml")
    imports.add_argument("--name", default="encryption-key-1", help="Secret name")
    imports.add_argument("-n", "--namespace", default=None, help="namespace (default default)")
    imports.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    add_settings_flags(imports)
    imports.set_defaults(func=cmd_import)


def add_status_command(commands: argparse._SubParsersAction) -> None:
    from .cli import add_settings_flags
    status = commands.add_parser("status", help="backend Pods running on a stale key set")
    add_cluster_flags(status, all_namespaces=True, output=True)
    add_settings_flags(status)
    status.set_defaults(func=cmd_status)
