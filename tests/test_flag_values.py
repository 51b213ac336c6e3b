"""Every `serve` flag's value is checked the same way whether it comes from the command
line or from KEYMOUNT_<FLAG>: a bad one is one line on stderr and exit 2, before
anything starts."""

import pytest

from webhook.cli import build_parser, main

# (flag, bad value, what the line says to use): every value the issue found accepted.
BAD = [
    ("--log-format", "yaml", "use json or text"),
    ("--event-loop", "foo", "use uvloop or asyncio"),
    ("--shutdown-grace", "-5", "use a number of seconds, 0 or more"),
    ("--max-connections", "0", "use a whole number, 1 or more"),
    ("--max-buffered-mib", "-1", "use a whole number, 1 or more"),
    ("--port", "0", "use a port number, 1 to 65535"),
    ("--port", "70000", "use a port number, 1 to 65535"),
    ("--request-timeout", "0", "use a number of seconds, more than 0"),
    # A finite rate whose burst (twice it) overflows a float took serve down with a
    # traceback (OverflowError) instead of a line.
    ("--live-reads-per-second", "1e308", "use a rate, more than 0 and at most 10000"),
    ("--controller-writes-per-second", "1e308",
     "use a rate, more than 0 and at most 10000"),
]
CASES = [
    *[pytest.param("env", *case, id=f"env-{case[0][2:]}={case[1]}") for case in BAD],
    *[pytest.param("flag", *case, id=f"flag-{case[0][2:]}={case[1]}") for case in BAD],
    # A switch takes no value on the command line: only the environment can be wrong.
    pytest.param("env", "--auto-generate", "maybe", "use true or false (also 1/0, yes/no)",
                 id="env-auto-generate=maybe"),
    pytest.param("env", "--controller", "maybe", "use true or false (also 1/0, yes/no)",
                 id="env-controller=maybe"),
]


def env_name(flag: str) -> str:
    return "KEYMOUNT_" + flag[2:].replace("-", "_").upper()


@pytest.fixture(autouse=True)
def no_keymount_environment(monkeypatch):
    import os
    for name in [n for n in os.environ if n.startswith("KEYMOUNT_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize(("source", "flag", "value", "use"), CASES)
def test_a_bad_value_from_flag_or_environment_is_one_line_and_exit_2(
        tmp_path, monkeypatch, capsys, source, flag, value, use):
    # Had the value passed, serve would stop at the missing TLS files with exit 1.
    argv = ["serve", "--keys-from", str(tmp_path), "--tls-cert", str(tmp_path / "no.crt"),
            "--tls-key", str(tmp_path / "no.key")]
    if source == "env":
        monkeypatch.setenv(env_name(flag), value)
        where = f"{env_name(flag)}={value} ({flag})"
    else:
        argv += [flag, value]
        where = f"{flag} {value}"
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"keymount: {where}: {use}"]
    assert captured.out == ""


def test_valid_values_from_the_environment_are_converted_like_flags(monkeypatch):
    for flag, value in [("--port", "9443"), ("--probe-port", "65535"),
                        ("--log-format", "TEXT"), ("--event-loop", "asyncio"),
                        ("--auto-generate", "Yes"), ("--shutdown-grace", "0"),
                        ("--max-connections", "1"), ("--max-buffered-mib", "8"),
                        ("--request-timeout", "2.5"), ("--workers", "3"),
                        ("--controller", "true"), ("--controller-namespace", "ops")]:
        monkeypatch.setenv(env_name(flag), value)
    args = build_parser().parse_args(["serve"])
    assert (args.port, args.probe_port, args.log_format, args.event_loop) == (
        9443, 65535, "text", "asyncio")
    assert args.auto_generate is True
    assert (args.controller, args.controller_namespace) == (True, "ops")
    assert (args.shutdown_grace, args.max_connections, args.max_buffered_mib,
            args.request_timeout, args.workers) == (0.0, 1, 8, 2.5, 3)


def test_a_flag_overrides_its_environment_variable_even_a_bad_one(monkeypatch):
    monkeypatch.setenv("KEYMOUNT_PORT", "70000")
    assert build_parser().parse_args(["serve", "--port", "9443"]).port == 9443


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("1", True), ("YES", True), ("False", False), ("0", False),
    ("no", False),
], ids=["true", "1", "YES", "False", "0", "no"])
def test_a_switch_from_the_environment_takes_true_false_1_0_yes_no(monkeypatch, value,
                                                                    expected):
    monkeypatch.setenv("KEYMOUNT_AUTO_GENERATE", value)
    assert build_parser().parse_args(["serve"]).auto_generate is expected
    # The flag itself still turns it on whatever the environment says.
    assert build_parser().parse_args(["serve", "--auto-generate"]).auto_generate is True


@pytest.mark.parametrize("value", ["on", "", "2"], ids=["on", "empty", "2"])
def test_a_switch_from_the_environment_refuses_anything_else(monkeypatch, capsys, value):
    monkeypatch.setenv("KEYMOUNT_AUTO_GENERATE", value)
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"keymount: KEYMOUNT_AUTO_GENERATE={value} (--auto-generate): use true or false "
        f"(also 1/0, yes/no)"]
