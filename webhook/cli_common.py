"""What every keymount command shares: flags (each also KEYMOUNT_<FLAG>), settings,
key writers, input, and the one error type a command reports as a line.

`cli` (serve, inject, keys check, certs) and `cli_keys` (the key lifecycle, status,
audit) both build on this module; neither imports the other's commands.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
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


class FromEnv(str):
    """A flag's value read from KEYMOUNT_<FLAG>. argparse passes a string default
    through the flag's `type` exactly as it does a command-line value, so one validator
    checks both; this marker only lets the error name the variable it came from."""


def env_name(flag: str) -> str:
    return "KEYMOUNT_" + flag.lstrip("-").replace("-", "_").upper()


def checked(flag: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type whose refusal is one line and exit 2. It raises
    CommandError rather than argparse's errors, which print the usage too and could
    not say that the value came from the environment."""
    def check(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            where = (f"{env_name(flag)}={text} ({flag})" if isinstance(text, FromEnv)
                     else f"{flag} {text}")
            raise CommandError(f"{where}: {exc}", 2) from None
    check.__name__ = getattr(parse, "__name__", "value")
    return check


def add_flag(parser: argparse.ArgumentParser, flag: str, *, default: Any = None,
             help: str, type: Callable[[str], Any] | None = None,
             choices: Sequence[str] | None = None, **kwargs: Any) -> None:
    """A flag that KEYMOUNT_<FLAG> sets when it is not given, validated by `type`
    (or `choices`) the same way from either place."""
    if type is None and choices is not None:
        type = one_of(*choices)
    if type is not None:
        kwargs["type"] = checked(flag, type)
    value = os.environ.get(env_name(flag))
    parser.add_argument(flag, default=default if value is None else FromEnv(value),
                        choices=choices, help=f"{help} [env {env_name(flag)}; default "
                                              f"{default}]", **kwargs)


class _Switch(argparse.Action):
    """store_true whose default, when it comes from the environment, argparse passes
    through `type` like any other flag's (store_true itself takes no type)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)


def add_switch(parser: argparse.ArgumentParser, flag: str, *, help: str) -> None:
    """An on/off flag, off by default; KEYMOUNT_<FLAG> may turn it on (or say off)."""
    value = os.environ.get(env_name(flag))
    parser.add_argument(flag, action=_Switch, type=checked(flag, boolean),
                        default=False if value is None else FromEnv(value),
                        help=f"{help} [env {env_name(flag)}=true; default off]")


# --- value validators: each returns the value or raises ValueError saying what to use --

def boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise ValueError("use true or false (also 1/0, yes/no)")


def one_of(*choices: str) -> Callable[[str], str]:
    def choice(text: str) -> str:
        if text.lower() in choices:
            return text.lower()
        raise ValueError(f"use {', '.join(choices[:-1])} or {choices[-1]}")
    return choice


def whole(low: int, high: int | None = None, *,
          what: str = "a whole number") -> Callable[[str], int]:
    """A whole number from `low` (to `high`)."""
    wanted = f"{what}, " + (f"{low} or more" if high is None else f"{low} to {high}")
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"use {wanted}") from None
        if value < low or (high is not None and value > high):
            raise ValueError(f"use {wanted}")
        return value
    return number


port = whole(1, 65535, what="a port number")


def seconds(*, zero: bool, what: str = "a number of seconds",
            most: int | None = None) -> Callable[[str], float]:
    """A finite number, above 0 (or 0 too when `zero`), and at most `most`."""
    wanted = f"{what}, " + ("0 or more" if zero else "more than 0") + (
        "" if most is None else f" and at most {most}")
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"use {wanted}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or (
                most is not None and value > most):
            raise ValueError(f"use {wanted}")
        return value
    return number


# A rate's burst is twice it, as a whole number: past about 9e307 that overflowed (a
# traceback at start). No API server takes ten thousand reads or writes a second from
# one client; the defaults are 10 and 4.
per_second = seconds(zero=False, what="a rate", most=10_000)


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
    add_flag(parser, "--rotation-slots", default=DEFAULT_ROTATION_SLOTS, type=whole(0, 16),
             help="optional sources for the next key numbers in each backend Pod, so a "
                  "rotation reaches running Pods (0: new Pods only)")


def build_settings(args: argparse.Namespace) -> Settings:
    try:
        return Settings(
            pod_selector=parse_selector(args.pod_selector),
            key_selector=parse_selector(args.key_selector),
            key_field=args.key_field, mount_path=args.mount_path,
            invalid_keys=args.invalid_keys, key_encoding=args.key_encoding,
            max_key_age=args.max_key_age, rotation_slots=int(args.rotation_slots))
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


# Key material is 32 raw bytes or 44 of base64 (and a line end); more is no key, and an
# endless input (/dev/zero, a FIFO) must not be read until memory runs out.
MAX_KEY_INPUT = 4096


def read_input(name: str, *, limit: int | None = None) -> bytes:
    """The input's bytes; with `limit`, at most limit + 1 of them (more: too long)."""
    size = -1 if limit is None else limit + 1
    if name == "-":
        return sys.stdin.buffer.read(size)
    try:
        with open(name, "rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise CommandError(f"cannot read {name}: {exc.strerror}") from None


def too_long_for_a_key(value: bytes, subject: str) -> str:
    """Why key input read with limit MAX_KEY_INPUT is no key, or "" when it may be."""
    if len(value) <= MAX_KEY_INPUT:
        return ""
    return (f"{subject} holds more than {MAX_KEY_INPUT} bytes; need exactly 32 raw bytes "
            f"or base64 of 32 bytes")
