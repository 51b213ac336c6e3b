"""`keymount serve` as a process: readiness, SIGTERM drain, exit code."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml

from builders import key_secret, pod, random_key, review
from polling import poll


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(url: str, **kw) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2, **kw) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture(params=["1", "2"], ids=["one-process", "two-workers"])
def served(tmp_path, request):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k.yaml").write_text(yaml.safe_dump(key_secret("k", random_key(),
                                                           namespace="default")))
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "webhook", "certs", "--service", "keymount",
                    "--namespace", "keymount", "--out", str(certs), "--ip", "127.0.0.1"],
                   check=True, capture_output=True)
    port, probe = free_port(), free_port()
    env = {**os.environ, "KEYMOUNT_PORT": str(port), "KEYMOUNT_PROBE_PORT": str(probe),
           "KEYMOUNT_KEYS_FROM": str(keys), "KEYMOUNT_TLS_CERT": str(certs / "tls.crt"),
           "KEYMOUNT_TLS_KEY": str(certs / "tls.key"), "KEYMOUNT_SHUTDOWN_GRACE": "1.5",
           "KEYMOUNT_WORKERS": request.param}
    proc = subprocess.Popen([sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield proc, port, probe, certs
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def mutate(port: int, certs) -> dict:
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    body = json.dumps(review(pod(), namespace="default")).encode()
    request = urllib.request.Request(f"https://127.0.0.1:{port}/mutate", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=5) as resp:
        return json.load(resp)["response"]


def test_sigterm_fails_readyz_at_once_keeps_serving_for_the_grace_then_exits_0(served):
    proc, port, probe, certs = served
    readyz = f"http://127.0.0.1:{probe}/readyz"
    poll(lambda: get_status(readyz) == 200, what="readyz 200")
    assert mutate(port, certs)["allowed"] is True

    proc.send_signal(signal.SIGTERM)
    poll(lambda: get_status(readyz) == 503, timeout=1.0, what="readyz 503 after SIGTERM")
    # Still inside the grace period: a new connection is served.
    assert proc.poll() is None
    assert "patch" in mutate(port, certs)
    assert proc.wait(timeout=15) == 0
    logs = proc.stderr.read().decode()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    decisions = [line for line in lines if line["msg"] == "admission decision"]
    assert decisions and decisions[0]["result"] == "injected"
    assert {"uid", "namespace", "pod", "user", "files", "duration_ms"} <= decisions[0].keys()
    assert [set(f) for f in decisions[0]["files"]] == [{"file", "secret", "fingerprint"}]
    assert decisions[0]["files"][0]["file"] == "encryption-key-1"
    assert "patch" not in logs and "encryption-key\":" not in logs
    # No --key-writers in this configuration: serve says what that means at start.
    assert any("--key-writers is not set" in line["msg"] for line in lines
               if line["level"] == "warning")


@pytest.mark.parametrize("writers", ["admin", "role:x", "serviceaccount:ns-only"])
def test_a_malformed_key_writers_flag_is_one_line_and_exit_2(tmp_path, writers):
    result = subprocess.run(
        [sys.executable, "-m", "webhook", "serve", "--keys-from", str(tmp_path),
         "--key-writers", writers], capture_output=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        f"keymount: --key-writers entry {writers!r}: use user:NAME, group:NAME or "
        f"serviceaccount:NAMESPACE:NAME, comma-separated"]


def test_serve_without_tls_files_says_how_to_make_them(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "webhook", "serve", "--keys-from", str(tmp_path),
         "--tls-cert", str(tmp_path / "none.crt"), "--tls-key", str(tmp_path / "none.key")],
        capture_output=True, timeout=30)
    assert result.returncode == 1
    assert b"keymount certs" in result.stderr and b"Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_not_a_traceback(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "webhook", "certs", "--service", "k", "--namespace",
                    "k", "--out", str(certs)], check=True, capture_output=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--probe-port", str(free_port()), "--keys-from", str(tmp_path),
             "--tls-cert", str(certs / "tls.crt"), "--tls-key", str(certs / "tls.key")],
            capture_output=True, timeout=30)
    assert result.returncode == 1
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"keymount: cannot serve on 127.0.0.1:{port}")
    assert b"Traceback" not in result.stderr


def test_a_malformed_http_request_never_puts_its_bytes_in_the_log(tmp_path):
    """aiohttp's own error log quoted the raw request line or header (a key Secret
    review, key included); at debug level too, nothing of it may reach the log."""
    import base64
    key = random_key()
    spellings = [base64.b64encode(key).decode(), key.hex()]
    keys = tmp_path / "keys"
    keys.mkdir()
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "webhook", "certs", "--service", "k", "--namespace",
                    "k", "--out", str(certs), "--ip", "127.0.0.1"], check=True,
                   capture_output=True)
    port, probe = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--probe-port", str(probe), "--keys-from", str(keys), "--log-level", "debug",
         "--tls-cert", str(certs / "tls.crt"), "--tls-key", str(certs / "tls.key"),
         "--shutdown-grace", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        poll(lambda: get_status(f"http://127.0.0.1:{probe}/readyz") == 200, what="ready")
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        for request in (f"POST /mutate HTTP/1.1\r\nHost: x\r\nBad Header: {spellings[0]}\r\n"
                        f"\r\n", f"P\x00ST /{spellings[1]} HTTP/1.1\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port)) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(request.encode("latin-1"))
                assert tls.recv(100).startswith(b"HTTP/1.")  # answered 400, not hung
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    logs = proc.stderr.read().decode()
    assert "Error handling request" in logs  # the errors were logged...
    assert [s for s in spellings if s in logs] == []  # ...without the request's bytes


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_serve_runs_on_the_event_loop_it_is_given_and_says_which(tmp_path, event_loop):
    from served import Served

    server = Served(tmp_path, event_loop=event_loop)
    try:
        status, answer = server.post(server.connection())
        assert status == 200 and answer["response"]["patchType"] == "JSONPatch"
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.log.read_text().splitlines()
             if line.startswith("{")]
    assert [line["event_loop"] for line in lines if line["msg"] == "serving"] == [event_loop]


def test_without_uvloop_serve_says_to_install_it_or_use_asyncio(tmp_path):
    # uvloop made unimportable, as on a platform without a wheel for it.
    code = ("import sys; sys.modules['uvloop'] = None; from webhook.cli import main; "
            f"sys.exit(main(['serve', '--keys-from', {str(tmp_path)!r}, "
            f"'--tls-cert', {__file__!r}, '--tls-key', {__file__!r}, "
            f"'--event-loop', 'uvloop']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines()[-1] == (
        "keymount: --event-loop uvloop: uvloop is not installed here; install it "
        "(pip install uvloop) or pass --event-loop asyncio")
