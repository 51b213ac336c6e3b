"""The `keymount` command as a user runs it: a real process, real files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builders import fixed_key, key_secret, random_key, slot_secret

GOLDEN = Path(__file__).parent / "golden" / "inject"
UPDATE = os.environ.get("KEYMOUNT_UPDATE_GOLDEN") == "1"


def keymount(*args: str, stdin: bytes | None = None, env: dict | None = None,
             timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "webhook", *args], input=stdin,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def keys_dir(tmp_path):
    directory = tmp_path / "keys"
    directory.mkdir()
    docs = [key_secret("shop-key-1", fixed_key("shop-1"), namespace="shop", index=1),
            key_secret("shop-key-2", fixed_key("shop-2"), namespace="shop", index=2),
            slot_secret(3, namespace="shop"), slot_secret(4, namespace="shop"),
            key_secret("default-key", fixed_key("default"), namespace="default")]
    (directory / "keys.yaml").write_text(yaml.safe_dump_all(docs))
    return directory


def test_inject_rewrites_backend_workloads_and_leaves_other_documents_alone(keys_dir):
    result = keymount("inject", "-f", str(GOLDEN / "workloads.in.yaml"),
                      "--keys-from", str(keys_dir))
    assert result.returncode == 0, result.stderr.decode()
    golden = GOLDEN / "workloads.out.yaml"
    if UPDATE:
        golden.write_bytes(result.stdout)
    assert result.stdout.decode() == golden.read_text()
    documents = list(yaml.safe_load_all(result.stdout))
    source = list(yaml.safe_load_all((GOLDEN / "workloads.in.yaml").read_text()))
    assert documents[3] == source[3]  # the ConfigMap, unchanged


def test_inject_reads_stdin_and_uses_dash_n_for_documents_without_namespace(keys_dir):
    pod = (GOLDEN / "workloads.in.yaml").read_text().split("---")[2]
    result = keymount("inject", "-f", "-", "-n", "shop", "--keys-from", str(keys_dir),
                      stdin=pod.encode())
    assert result.returncode == 0, result.stderr.decode()
    injected = yaml.safe_load(result.stdout)
    sources = injected["spec"]["volumes"][0]["projected"]["sources"]
    assert [s["secret"]["name"] for s in sources if not s["secret"]["optional"]] == [
        "shop-key-1", "shop-key-2"]


def test_inject_injecting_its_own_output_changes_nothing(keys_dir):
    once = keymount("inject", "-f", str(GOLDEN / "workloads.in.yaml"),
                    "--keys-from", str(keys_dir)).stdout
    twice = keymount("inject", "-f", "-", "--keys-from", str(keys_dir), stdin=once).stdout
    assert twice == once


def test_inject_exits_non_zero_with_the_deny_message_and_prints_nothing(keys_dir):
    result = keymount("inject", "-f", str(GOLDEN / "workloads.in.yaml"), "-n", "elsewhere",
                      "--keys-from", str(keys_dir))
    # The bare Pod has no namespace: with -n elsewhere it lands in a namespace with no keys.
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"denied: Pod elsewhere/debug" in result.stderr
    assert b"keymount keys create encryption-key-1 -n elsewhere --generate" in result.stderr


LEAKY = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"  # looks like a base64 key


@pytest.mark.parametrize("broken", [
    f"kind: Secret\ndata:\n  encryption-key: {LEAKY}: oops\n",
    f"kind: Secret\ndata:\n  encryption-key: !{LEAKY} x\n",
    "kind: Secret\nmetadata: 5\n",
], ids=["yaml-error", "unknown-tag", "not-a-secret"])
def test_inject_fails_naming_a_key_manifest_it_cannot_read(keys_dir, broken):
    (keys_dir / "more-keys.yaml").write_text(broken)
    result = keymount("inject", "-f", str(GOLDEN / "workloads.in.yaml"),
                      "--keys-from", str(keys_dir))
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert result.stdout == b""
    assert stderr.startswith(f"keymount: cannot read key manifests in --keys-from {keys_dir}: "
                             f"{keys_dir / 'more-keys.yaml'}: ")
    assert LEAKY not in stderr and "Traceback" not in stderr


def test_inject_skips_a_fifo_named_like_a_manifest_with_a_warning(keys_dir):
    fifo = keys_dir / "x.yaml"
    os.mkfifo(fifo)
    # A regression blocks opening the FIFO; the timeout kills the process then.
    result = keymount("inject", "-f", str(GOLDEN / "workloads.in.yaml"),
                      "--keys-from", str(keys_dir), timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    assert f"warning: skipping {fifo}: a FIFO, not a regular file" in result.stderr.decode()
    assert result.stdout == (GOLDEN / "workloads.out.yaml").read_bytes()


@pytest.mark.parametrize(("make", "code", "out"), [
    (lambda k: k, 0, b"valid: raw AES-256 key, fingerprint "),
    (lambda k: __import__("base64").b64encode(k) + b"\n", 0, b"valid: base64 AES-256 key"),
    (lambda k: k[:31], 1, b"invalid: stdin holds 31 bytes"),
    (lambda k: b"", 1, b"invalid: stdin is empty"),
], ids=["raw", "base64", "31-bytes", "empty"])
def test_keys_check_validates_key_material_from_stdin(make, code, out):
    key = random_key()
    result = keymount("keys", "check", stdin=make(key))
    assert result.returncode == code
    assert result.stdout.startswith(out)
    assert key.hex() not in (result.stdout + result.stderr).decode()


def test_keys_check_reads_a_file(tmp_path):
    path = tmp_path / "key.bin"
    path.write_bytes(random_key())
    assert keymount("keys", "check", str(path)).returncode == 0


def test_certs_writes_private_keys_0600_and_prints_the_ca_bundle(tmp_path):
    import base64

    from cryptography import x509
    result = keymount("certs", "--service", "keymount", "--namespace", "keymount-system",
                      "--out", str(tmp_path), "--ip", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    bundle = base64.b64decode(result.stdout.strip())
    assert bundle == (tmp_path / "ca.crt").read_bytes()
    for key in ("tls.key", "ca.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "keymount", "keymount.keymount-system", "keymount.keymount-system.svc",
        "keymount.keymount-system.svc.cluster.local"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_a_bad_flag_value_is_one_line_not_a_traceback(tmp_path):
    result = keymount("inject", "-f", "-", "--keys-from", str(tmp_path),
                      "--pod-selector", "a in b", stdin=b"")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("keymount: invalid label selector")
    assert b"Traceback" not in result.stderr


# --- keys create / import without a cluster ------------------------------------------------

def unreachable_kubeconfig(tmp_path) -> str:
    """A kubeconfig whose API server is a closed loopback port."""
    import json
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u",
                                               "namespace": "team"}}]}))
    return str(path)


def test_keys_create_refuses_an_invalid_key_before_touching_the_cluster(tmp_path):
    result = keymount("keys", "create", "k", "-n", "shop", "--kubeconfig",
                      unreachable_kubeconfig(tmp_path), stdin=b"too short")
    assert result.returncode == 1
    assert result.stderr.decode().strip() == \
        "keymount: refused, nothing created: stdin holds 9 bytes; need exactly 32 raw " \
        "bytes or base64 of 32 bytes"


def test_keys_create_dry_run_prints_a_manifest_in_the_contexts_namespace(tmp_path):
    result = keymount("keys", "create", "k", "--generate", "--dry-run", "--index", "3",
                      "--kubeconfig", unreachable_kubeconfig(tmp_path))
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    assert manifest["metadata"]["namespace"] == "team"
    assert manifest["metadata"]["annotations"]["keymount.io/key-index"] == "3"
    from webhook.config import Settings
    from webhook.key_secrets import parse_key_secret
    assert parse_key_secret(manifest, settings=Settings()).valid


@pytest.mark.parametrize("command", [
    ["keys", "list", "-n", "shop"], ["keys", "create", "k", "-n", "shop", "--generate"],
    ["keys", "rotate", "-n", "shop"], ["keys", "retire", "k", "-n", "shop", "--yes"],
    ["status", "-A"],
], ids=["list", "create", "rotate", "retire", "status"])
def test_an_unreachable_api_server_is_one_line_and_exit_1(tmp_path, command):
    result = keymount(*command, "--kubeconfig", unreachable_kubeconfig(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keymount: cannot reach the API server")


def helm_values(tmp_path, key: str | None) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"secrets": {"keysEncryption": {"userEncryptionKey": key}}}))
    return str(path)


def test_keys_import_turns_a_valid_chart_key_into_one_manifest(tmp_path):
    import base64
    key = base64.b64encode(random_key()).decode()
    result = keymount("keys", "import", "--helm-values", helm_values(tmp_path, key),
                      "-n", "shop")
    assert result.returncode == 0, result.stderr
    [manifest] = list(yaml.safe_load_all(result.stdout))
    assert manifest["metadata"]["namespace"] == "shop"
    assert manifest["metadata"]["annotations"] == {"keymount.io/key-index": "1",
                                                   "keymount.io/numbers-used": "1"}


@pytest.mark.parametrize("command", [
    ["keys", "create", "k", "-n", "shop", "--generate", "--index", "1", "--dry-run"],
    ["keys", "import", "-n", "shop", "--helm-values"],
], ids=["create-dry-run", "import"])
def test_a_manifest_holding_key_material_says_on_stderr_to_encrypt_it(tmp_path, command):
    """docs/contract.md: a manifest holding key material says on stderr to encrypt it
    before it goes anywhere near version control; `keys import` prints one too."""
    import base64
    if command[-1] == "--helm-values":
        command = [*command, helm_values(tmp_path, base64.b64encode(random_key()).decode())]
    result = keymount(*command)
    assert result.returncode == 0, result.stderr
    [manifest] = list(yaml.safe_load_all(result.stdout))
    assert manifest["data"]["encryption-key"]  # key material, on stdout
    assert "holds key material; encrypt it (SOPS, SealedSecrets)" in result.stderr.decode()


@pytest.mark.parametrize(("key", "code", "stderr"), [
    ("", 1, "generated a key at template time"),
    (__import__("base64").b64encode(b"\x01" + bytes(30)).decode(), 1, "base64 of 31 bytes"),
    ("correct horse battery staple 123", 0, "warning: key is 32 printable ASCII"),
], ids=["empty-explained", "31-bytes-refused", "passphrase-warned"])
def test_keys_import_explains_refuses_or_warns(tmp_path, key, code, stderr):
    result = keymount("keys", "import", "--helm-values", helm_values(tmp_path, key),
                      "-n", "shop")
    assert result.returncode == code
    assert stderr in result.stderr.decode()
    assert (result.stdout != b"") is (code == 0)


def test_certs_can_write_the_ca_bundle_as_a_kustomize_patch(tmp_path):
    patch = tmp_path / "ca-bundle.yaml"
    result = keymount("certs", "--service", "keymount", "--namespace", "keymount",
                      "--out", str(tmp_path / "certs"), "--kustomize-patch", str(patch))
    bundle = result.stdout.decode().strip()
    docs = list(yaml.safe_load_all(patch.read_text()))
    assert {h["clientConfig"]["caBundle"] for d in docs for h in d["webhooks"]} == {bundle}


def test_certs_never_write_a_private_key_into_a_file_or_link_planted_at_its_temporary_name(
        tmp_path):
    """`--out` in a directory another user can write (say they created /tmp/certs
    first): a link at `.ca.key.tmp` must not send the CA key elsewhere, and a file
    they made at `.tls.key.tmp` (and hold open) must not receive the serving key."""
    from webhook.certs import build_certificates, write_certificates
    out = tmp_path / "certs"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.pem"
    (out / ".ca.key.tmp").symlink_to(elsewhere)
    planted = out / ".tls.key.tmp"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    with planted.open("rb") as held:
        write_certificates(out, build_certificates(service="s", namespace="n"))
        assert b"PRIVATE KEY" not in held.read()
    assert not elsewhere.exists()
    for name in ("ca.key", "tls.key", "client.key"):
        path = out / name
        assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
        assert b"PRIVATE KEY" in path.read_bytes()


ALIASED_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: shop, labels: {app.kubernetes.io/component: backend}}
spec:
  containers:
  - name: a
    image: x
    volumeMounts: &mounts
    - {name: data, mountPath: /data}
  - name: b
    image: x
    volumeMounts: *mounts
  volumes: [{name: data, emptyDir: {}}]
"""


def test_inject_gives_a_pod_with_yaml_aliases_what_the_webhook_gives_it(keys_dir):
    """The webhook gets the Pod as JSON, aliases expanded (kubectl expands them): each
    container mounts the keys once. A list two containers share through an alias must
    not get both mounts."""
    import json
    expanded = json.dumps(yaml.safe_load(ALIASED_POD))  # JSON: no aliases, as sent
    aliased = keymount("inject", "-f", "-", "--keys-from", str(keys_dir),
                       stdin=ALIASED_POD.encode())
    plain = keymount("inject", "-f", "-", "--keys-from", str(keys_dir),
                     stdin=expanded.encode())
    assert aliased.returncode == 0 and plain.returncode == 0, aliased.stderr.decode()
    pod = yaml.safe_load(aliased.stdout)
    for container in pod["spec"]["containers"]:
        assert [m["name"] for m in container["volumeMounts"]] == [
            "data", "keymount-encryption-keys"]
    assert pod == yaml.safe_load(plain.stdout)


def test_inject_refuses_a_yaml_alias_bomb_in_one_line(keys_dir):
    lines = ["kind: Pod", "metadata: {name: p, namespace: shop, labels: "
             "{app.kubernetes.io/component: backend}}", "x:", "  l0: &a0 [lol, lol, lol]"]
    lines += [f"  l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    lines += ["spec: {containers: [{name: a, env: *a11}]}"]
    result = keymount("inject", "-f", "-", "--keys-from", str(keys_dir),
                      stdin="\n".join(lines).encode(), timeout=60)
    assert result.returncode == 1
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr and stderr.startswith("keymount: -: ") and \
        "aliases" in stderr


@pytest.mark.parametrize("flag", ["--passphrase-file", "--identity"])
def test_a_secret_file_that_is_not_utf8_is_one_line_quoting_none_of_its_bytes(tmp_path, flag):
    """A passphrase saved as Latin-1: UnicodeDecodeError's text shows the byte it
    stopped at, and a traceback is no error message."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"caf\xe9 au lait")
    backup = tmp_path / "keys.age"
    backup.write_bytes(b"age")
    for args in (["keys", "backup", "--verify", str(backup)], ["keys", "restore", str(backup)]):
        result = keymount(*args, flag, str(secret))
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert "Traceback" not in stderr and "0xe9" not in stderr and "caf" not in stderr
        assert stderr.startswith("keymount: ") and str(secret) in stderr


def test_keys_import_of_a_values_file_that_is_not_utf8_is_one_line(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_bytes(b"secrets:\n  keysEncryption:\n    userEncryptionKey: \xe9\xff\n")
    result = keymount("keys", "import", "--helm-values", str(values), "-n", "shop")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr and "0xe9" not in stderr
    assert stderr.startswith(f"keymount: {values}: ")


def test_certs_that_cannot_be_written_are_one_line_naming_the_path(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    for args in (["--out", str(taken)], ["--out", str(taken / "certs")],
                 ["--out", str(tmp_path / "certs"), "--kustomize-patch", str(tmp_path)]):
        result = keymount("certs", "--service", "keymount", "--namespace", "keymount", *args)
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert "Traceback" not in stderr
        assert stderr.splitlines()[-1].startswith("keymount: cannot write ")
        assert result.stdout == b""


def test_inject_of_a_deeply_nested_manifest_is_one_line_not_a_traceback(keys_dir):
    """libyaml reads up to about 1,000 levels; Python's copy and dump recurse deeper than
    its stack allows well before that."""
    depth = 600
    pod = ("kind: Pod\nmetadata: {name: p, namespace: shop, labels: "
           "{app.kubernetes.io/component: backend}}\nspec: {containers: [{name: a, env: "
           + "[" * depth + "]" * depth + "}]}\n")
    result = keymount("inject", "-f", "-", "--keys-from", str(keys_dir), stdin=pod.encode())
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr and stderr.startswith("keymount: -: ")
    assert result.stdout == b""


def test_keys_check_reads_no_more_of_an_endless_file_than_a_key_could_be():
    """A key is 32 raw bytes or 44 of base64 (a line end or two): /dev/zero given by
    mistake (or a FIFO, or a multi-gigabyte file) must not be read until memory runs
    out."""
    result = keymount("keys", "check", "/dev/zero", timeout=20)
    assert result.returncode == 1, result.stderr.decode()
    assert result.stdout.startswith(b"invalid: file /dev/zero holds more than ")
    result = keymount("keys", "create", "--dry-run", "--index", "1", "-n", "shop",
                      "--from-file", "/dev/zero", timeout=20)
    assert result.returncode == 1 and result.stdout == b""
    assert b"refused, nothing created: file /dev/zero holds more than " in result.stderr
