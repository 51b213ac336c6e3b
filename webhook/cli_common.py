"""What every keymount command shares: flags (each also KEYMOUNT_<FLAG>), settings,
key writers, input, and the one error type a command reports as a line.

`cli` (serve, inject, keys check, certs) and `cli_keys` (the key lifecycle, status,
audit) both build on this module; neither imports the other's commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeAlias

from .config import (
    DEFAULT_KEY_FIELD,
    DEFAULT_KEY_SELECTOR,
    DEFAULT_MOUNT_PATH,
    DEFAULT_POD_SELECTOR,
    DEFAULT_ROTATION_SLOTS,
    Settings,
)
from .errors import UserFacingError
from .keyguard import KeyWriters, parse_key_writers
from .selectors import SelectorError, parse_selector

# Subscripted only for the type checker: argparse's class is not generic at run time.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CommandError(UserFacingError):
    """A command's own refusal (bad flags, bad input)."""


def env_default(flag: str, default: Any) -> Any:
    return os.environ.get("KEYMOUNT_" + flag.lstrip("-").replace("-", "_").upper(), default)


def env_flag(name: str) -> bool:
    return os.environ.get(f"KEYMOUNT_{name}", "").lower() in ("1", "true", "yes")


def add_flag(parser: argparse.ArgumentParser, flag: str, *, default: Any = None,
             help: str, **kwargs: Any) -> None:
    env = "KEYMOUNT_" + flag.lstrip("-").replace("-", "_").upper()
    parser.add_argument(flag, default=env_default(flag, default),
                        help=f"{help} [env {env}; default {default}]", **kwargs)


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `45s`, or combinations such as `1d12h`."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    total, number = 0, ""
    for char in text.strip():
        if char.isdigit():
            number += char
        elif char in units and number:
            total, number = total + int(number) * units[char], ""
        else:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}; use e.g. 90d, 12h, 1d12h")
    if number or total <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}; use e.g. 90d, 12h, 1d12h")
    return timedelta(seconds=total)


def add_key_writer_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--key-writers", default=None,
             help="who may create, retire or delete key Secrets: user:NAME, group:NAME, "
                  "serviceaccount:NS:NAME, comma-separated (unset: RBAC alone decides)")
    add_flag(parser, "--own-user", default=None,
             help="keymount's own API user, always a key writer (default: the in-cluster "
                  "ServiceAccount)")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--pod-selector", default=DEFAULT_POD_SELECTOR,
             help="label selector of backend Pods")
    add_flag(parser, "--key-selector", default=DEFAULT_KEY_SELECTOR,
             help="label selector of key Secrets")
    add_flag(parser, "--key-field", default=DEFAULT_KEY_FIELD,
             help="Secret data field holding the key")
    add_flag(parser, "--mount-path", default=DEFAULT_MOUNT_PATH, help="where keys are mounted")
    add_flag(parser, "--invalid-keys", default="deny", choices=("deny", "skip"),
             help="deny Pods while any key Secret of the namespace is invalid, or skip it")
    add_flag(parser, "--key-encoding", default="auto", choices=("auto", "raw", "base64"),
             help="which key encodings are accepted")
    add_flag(parser, "--max-key-age", default=None, type=parse_duration,
             help="flag namespaces whose newest key is older, e.g. 90d")
    add_flag(parser, "--rotation-slots", default=DEFAULT_ROTATION_SLOTS, type=int,
             help="optional sources for the next key numbers in each backend Pod, so a "
                  "rotation reaches running Pods (0: new Pods only)")


def build_settings(args: argparse.Namespace) -> Settings:
    try:
        max_age = args.max_key_age
        if isinstance(max_age, str):  # from the environment, not yet parsed
            max_age = parse_duration(max_age)
        return Settings(
            pod_selector=parse_selector(args.pod_selector),
            key_selector=parse_selector(args.key_selector),
            key_field=args.key_field, mount_path=args.mount_path,
            invalid_keys=args.invalid_keys, key_encoding=args.key_encoding,
            max_key_age=max_age, rotation_slots=int(args.rotation_slots))
    except (SelectorError, ValueError, argparse.ArgumentTypeError) as exc:
        raise CommandError(str(exc), 2) from None


def build_key_writers(args: argparse.Namespace) -> KeyWriters:
    """--key-writers, with keymount's own user (for --auto-generate) always allowed."""
    own = args.own_user
    if own is None:
        from .cluster import in_cluster_username
        own = in_cluster_username()
    try:
        return parse_key_writers(args.key_writers, own_user=own)
    except ValueError as exc:
        raise CommandError(str(exc), 2) from None


def read_input(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {name}: {exc.strerror}") from None
