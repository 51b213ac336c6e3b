"""A real kube-apiserver + etcd test bed for keymount's end-to-end tests.

Stdlib only.  The binaries come from ``bash scripts/prepare-control-plane.sh``, which
builds kube-apiserver 1.20.2 (with the reflect2 fix) and links Debian's etcd 3.4 into
``${KEYMOUNT_CONTROL_PLANE_DIR:-/var/cache/keymount/control-plane}``.

Usage::

    with ControlPlane() as cp:
        cp.write_kubeconfig(path)                 # admin (system:masters)
        cp.write_kubeconfig(path2, token=cp.keymount_token, namespace="ns")
        subprocess.run(["kubectl", "--kubeconfig", path, "get", "ns"], check=True)
        events = cp.audit_events(user="keymount")

Each API request appears once in ``audit_events()`` (the ``RequestReceived`` stage is
omitted by the audit policy; a watch additionally has a ``ResponseStarted`` event).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "STAMP_VERSION",
    "ControlPlane",
    "ControlPlaneError",
    "ControlPlaneUnavailable",
    "cache_dir",
    "check_binaries",
]

DEFAULT_CACHE_DIR = "/var/cache/keymount/control-plane"
STAMP_VERSION = "k8s-1.20.2+reflect2-1.0.2+node"
REFLECT2_SRC = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
PREPARE_HINT = "run `bash scripts/prepare-control-plane.sh` (as root) to build/install it"

KEYMOUNT_USER = "keymount"
ADMIN_USER = "keymount-e2e-admin"
# Other users of the test bed: (name, groups). mallory will get full Secret RBAC but is
# no key writer; bob is a key writer through his group.
OTHER_USERS = {"mallory": (), "bob": ("keymount:key-writers",),
               # The identity kube-controller-manager's namespace controller has in a real
               # cluster (--use-service-account-credentials); the test bed's controller
               # manager runs all its controllers as this user.
               "system:serviceaccount:kube-system:namespace-controller": ("system:masters",)}
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"

AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
  - RequestReceived
rules:
  - level: Metadata
"""


class ControlPlaneUnavailable(RuntimeError):
    """The binaries are missing or were built without the current fix (stale stamp)."""


class ControlPlaneError(RuntimeError):
    """etcd or kube-apiserver failed to start, died, or misbehaved."""


def cache_dir() -> Path:
    return Path(os.environ.get("KEYMOUNT_CONTROL_PLANE_DIR") or DEFAULT_CACHE_DIR)


_hash_cache: dict = {}


def _sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def _reflect2_fix_hash() -> str | None:
    """Same digest as prepare-control-plane.sh's reflect2_hash(), or None if absent."""
    if not REFLECT2_SRC.is_dir():
        return None
    names = sorted(
        "./" + p.name
        for p in REFLECT2_SRC.iterdir()
        if p.is_file() and p.suffix in (".go", ".s") and not p.name.endswith("_test.go")
    )
    lines = "".join(f"{_sha256_file(REFLECT2_SRC / n[2:])}  {n}\n" for n in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def check_binaries(directory: os.PathLike | None = None) -> dict:
    """Return {"kube-apiserver": Path, "etcd": Path} or raise ControlPlaneUnavailable."""
    d = Path(directory) if directory is not None else cache_dir()
    apiserver = d / "bin" / "kube-apiserver"
    etcd = d / "bin" / "etcd"
    stamp = d / "STAMP"
    for p in (apiserver, etcd):
        if not (p.exists() and os.access(p, os.X_OK)):
            raise ControlPlaneUnavailable(f"{p} is missing; {PREPARE_HINT}")
    if not stamp.is_file():
        raise ControlPlaneUnavailable(f"{stamp} is missing; {PREPARE_HINT}")
    fields = dict(
        line.split("=", 1) for line in stamp.read_text().splitlines() if "=" in line
    )
    if fields.get("version") != STAMP_VERSION:
        raise ControlPlaneUnavailable(
            f"stale control plane in {d} (stamp version {fields.get('version')!r}, "
            f"want {STAMP_VERSION!r}); {PREPARE_HINT}"
        )
    fix = _reflect2_fix_hash()
    if fix is not None and fields.get("reflect2_sha256") != fix:
        raise ControlPlaneUnavailable(
            f"stale control plane in {d} (built with another reflect2); {PREPARE_HINT}"
        )
    if fields.get("kube_apiserver_sha256") != _sha256_file(apiserver):  # the node's too
        raise ControlPlaneUnavailable(
            f"{apiserver} does not match its stamp; {PREPARE_HINT}"
        )
    return {"kube-apiserver": apiserver, "etcd": etcd}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except FileNotFoundError:
        return f"<{path} does not exist>"


def _terminate(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


_live: set[ControlPlane] = set()


@atexit.register
def _stop_leftovers() -> None:
    for cp in list(_live):
        try:
            cp.stop()
        except Exception:
            pass


class ControlPlane:
    """etcd + kube-apiserver on free loopback ports, in a temporary directory.

    Attributes after ``start()``: ``server`` (https URL), ``ca_file`` (the apiserver's
    self-signed serving cert bundle from --cert-dir, SANs include IP 127.0.0.1),
    ``admin_token`` (user ``keymount-e2e-admin`` in ``system:masters``),
    ``keymount_token`` (user ``keymount``, only ``system:authenticated``),
    ``etcd_url``, ``workdir``, ``apiserver_log``, ``audit_log``.
    """

    keymount_user = KEYMOUNT_USER
    admin_user = ADMIN_USER

    def __init__(
        self,
        directory: os.PathLike | None = None,
        *,
        startup_timeout: float = 90.0,
        extra_apiserver_args: Iterable[str] = (),
    ) -> None:
        self._bins = check_binaries(directory)
        self.startup_timeout = startup_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.admin_token = secrets.token_hex(16)
        self.keymount_token = secrets.token_hex(16)
        self.user_tokens = {name: secrets.token_hex(16) for name in OTHER_USERS}
        self.workdir: Path | None = None
        self.server: str | None = None
        self.ca_file: str | None = None
        self.etcd_url: str | None = None
        self.apiserver_port: int | None = None
        self.apiserver_log: Path | None = None
        self.etcd_log: Path | None = None
        self.audit_log: Path | None = None
        self._etcd: subprocess.Popen | None = None
        self._apiserver: subprocess.Popen | None = None
        self._ssl_ctx: ssl.SSLContext | None = None
        self.webhook_client_ca: Path | None = None
        self.webhook_client_cert: tuple[Path, Path] | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        if self.workdir is not None:
            raise ControlPlaneError("already started")
        self.workdir = Path(tempfile.mkdtemp(prefix="keymount-cp-"))
        _live.add(self)
        try:
            self._prepare_files()
            self._start_etcd()
            self.apiserver_port = _free_port()
            self.server = f"https://127.0.0.1:{self.apiserver_port}"
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _terminate(self._apiserver)
        _terminate(self._etcd)
        self._apiserver = self._etcd = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None
        _live.discard(self)

    def restart_apiserver(self) -> None:
        """Stop and start kube-apiserver only (same port, etcd, certs); wait ready."""
        self._require_started()
        _terminate(self._apiserver)
        self._apiserver = None
        self._start_apiserver()

    # ------------------------------------------------------------------ setup
    def _require_started(self) -> Path:
        if self.workdir is None:
            raise ControlPlaneError("control plane not started")
        return self.workdir

    def _prepare_files(self) -> None:
        w = self.workdir
        assert w is not None
        (w / "certs").mkdir()
        self.ca_file = str(w / "certs" / "apiserver.crt")
        sa_key, sa_pub = w / "sa.key", w / "sa.pub"
        if shutil.which("openssl"):
            subprocess.run(
                ["openssl", "genrsa", "-out", str(sa_key), "2048"],
                check=True, capture_output=True,
            )
            subprocess.run(
                ["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
                check=True, capture_output=True,
            )
        else:  # pragma: no cover - fallback when the openssl CLI is absent
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            sa_key.write_bytes(key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ))
            sa_pub.write_bytes(key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ))
        others = "".join(
            f'{self.user_tokens[name]},{name},{name}-uid,"{",".join(groups)}"\n' if groups
            else f"{self.user_tokens[name]},{name},{name}-uid\n"
            for name, groups in OTHER_USERS.items())
        (w / "tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},{ADMIN_USER}-uid,"system:masters"\n'
            f"{self.keymount_token},{KEYMOUNT_USER},{KEYMOUNT_USER}-uid\n" + others
        )
        os.chmod(w / "tokens.csv", 0o600)
        (w / "audit-policy.yaml").write_text(AUDIT_POLICY)
        self._prepare_webhook_client(w)
        self.audit_log = w / "audit.log"
        self.apiserver_log = w / "kube-apiserver.log"
        self.etcd_log = w / "etcd.log"

    def _prepare_webhook_client(self, w: Path) -> None:
        """The client certificate the API server presents to every admission webhook
        (--admission-control-config-file), as docs/operations.md tells users to set
        it up: keymount serves with --client-ca, so only the API server is answered."""
        out = w / "webhook-client"
        subprocess.run([sys.executable, "-m", "webhook", "certs", "--service", "keymount",
                        "--namespace", "keymount", "--out", str(out), "--ip", "127.0.0.1"],
                       check=True, capture_output=True, cwd=Path(__file__).resolve().parents[2])
        self.webhook_client_ca = out / "ca.crt"
        self.webhook_client_cert = (out / "client.crt", out / "client.key")
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config",
            # "*": every webhook this API server calls presents this certificate.
            "users": [{"name": "*", "user": {"client-certificate": str(out / "client.crt"),
                                             "client-key": str(out / "client.key")}}]}
        (w / "webhook-kubeconfig.json").write_text(json.dumps(kubeconfig))
        plugin = {"apiVersion": "apiserver.config.k8s.io/v1",
                  "kind": "WebhookAdmissionConfiguration",
                  "kubeConfigFile": str(w / "webhook-kubeconfig.json")}
        (w / "admission.json").write_text(json.dumps({
            "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
            "plugins": [{"name": name, "configuration": plugin} for name in
                        ("ValidatingAdmissionWebhook", "MutatingAdmissionWebhook")]}))

    def _start_etcd(self) -> None:
        w = self.workdir
        assert w is not None
        client_port, peer_port = _free_port(), _free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        args = [
            str(self._bins["etcd"]),
            "--name", "keymount-e2e",
            "--data-dir", str(w / "etcd-data"),
            "--listen-client-urls", self.etcd_url,
            "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"keymount-e2e={peer_url}",
            "--initial-cluster-state", "new",
        ]
        with open(self.etcd_log, "ab") as log:
            self._etcd = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            if self._etcd.poll() is not None:
                raise ControlPlaneError(
                    f"etcd exited with {self._etcd.returncode}:\n{_tail(self.etcd_log, 40)}"
                )
            try:
                with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                    body = json.loads(r.read() or b"{}")
                    if body.get("health") in ("true", True):
                        return
                    last = repr(body)
            except (OSError, ValueError) as e:
                last = repr(e)
            time.sleep(0.1)
        raise ControlPlaneError(
            f"etcd not healthy within {self.startup_timeout}s ({last}):\n"
            f"{_tail(self.etcd_log, 40)}"
        )

    def _apiserver_args(self) -> list:
        w = self.workdir
        assert w is not None
        return [
            str(self._bins["kube-apiserver"]),
            f"--etcd-servers={self.etcd_url}",
            f"--secure-port={self.apiserver_port}",
            "--bind-address=127.0.0.1",
            f"--cert-dir={w / 'certs'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            f"--admission-control-config-file={w / 'admission.json'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--audit-policy-file={w / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-mode=blocking",
            "--audit-log-maxbackup=0",
            "--audit-log-maxsize=0",
            # tests/e2e/node.py's kubelet registers as "localhost": logs/exec reach it
            # on loopback, never on the machine's own address (its InternalIP).
            "--kubelet-preferred-address-types=Hostname",
            *self.extra_apiserver_args,
        ]

    def _start_apiserver(self) -> None:
        assert self.apiserver_log is not None
        with open(self.apiserver_log, "ab") as log:
            log.write(f"\n===== starting kube-apiserver at {time.ctime()} =====\n".encode())
            log.flush()
            self._apiserver = subprocess.Popen(
                self._apiserver_args(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._wait_apiserver_ready()

    def _wait_apiserver_ready(self) -> None:
        assert self._apiserver is not None and self.ca_file is not None
        deadline = time.monotonic() + self.startup_timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            if self._apiserver.poll() is not None:
                raise ControlPlaneError(
                    f"kube-apiserver exited with {self._apiserver.returncode}:\n"
                    f"{self.apiserver_log_tail(60)}"
                )
            if os.path.exists(self.ca_file):
                try:
                    status, body = self.request("GET", "/readyz", timeout=5)
                    if status == 200:
                        return
                    last = f"HTTP {status}: {body[-500:]!r}"
                except (OSError, ssl.SSLError) as e:
                    last = repr(e)
                    self._ssl_ctx = None  # cert file may have been half-written
            time.sleep(0.2)
        raise ControlPlaneError(
            f"kube-apiserver not ready within {self.startup_timeout}s (last: {last}):\n"
            f"{self.apiserver_log_tail(60)}"
        )

    # ------------------------------------------------------------------ helpers
    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context that verifies the apiserver against ``ca_file``."""
        self._require_started()
        if self._ssl_ctx is None:
            self._ssl_ctx = ssl.create_default_context(cafile=self.ca_file)
        return self._ssl_ctx

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> tuple[int, str]:
        """Minimal API call: returns (HTTP status, response text); token defaults to admin."""
        self._require_started()
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            data = data.encode() if isinstance(data, str) else data
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def write_kubeconfig(
        self, path: os.PathLike, token: str | None = None, namespace: str | None = None
    ) -> str:
        """Write a kubeconfig (JSON, which kubectl and client libraries accept as YAML)
        for ``token`` (default: the admin token). Returns the path."""
        self._require_started()
        assert self.ca_file is not None
        ca_data = base64.b64encode(Path(self.ca_file).read_bytes()).decode()
        context: dict = {"cluster": "keymount-e2e", "user": "user"}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "keymount-e2e",
                "cluster": {"server": self.server, "certificate-authority-data": ca_data},
            }],
            "users": [{"name": "user", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "keymount-e2e", "context": context}],
            "current-context": "keymount-e2e",
            "preferences": {},
        }
        p = Path(path)
        p.write_text(json.dumps(config, indent=2) + "\n")
        os.chmod(p, 0o600)
        return str(p)

    def audit_events(self, user: str | None = None) -> list:
        """Parsed audit events (one per request, see module doc), optionally only
        those whose ``user.username`` is ``user``."""
        self._require_started()
        assert self.audit_log is not None
        events = []
        try:
            with open(self.audit_log, errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue  # a line being written right now
                    if user is None or ev.get("user", {}).get("username") == user:
                        events.append(ev)
        except FileNotFoundError:
            pass
        return events

    def apiserver_log_tail(self, lines: int = 50) -> str:
        if self.apiserver_log is None:
            return ""
        return _tail(self.apiserver_log, lines)

    def etcd_log_tail(self, lines: int = 50) -> str:
        if self.etcd_log is None:
            return ""
        return _tail(self.etcd_log, lines)

    def _etcd_post(self, path: str, body: dict) -> dict:
        assert self.etcd_url is not None
        req = urllib.request.Request(
            self.etcd_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            raise ControlPlaneError(f"etcd {path} -> HTTP {e.code}: {text}") from None

    def etcd_revision(self) -> int:
        """The current etcd revision (via the v3 JSON gateway)."""
        self._require_started()
        # range over one key ("\0"); the response header has the store revision
        resp = self._etcd_post("/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})
        return int(resp["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd (physically) to its current revision; returns that revision."""
        rev = self.etcd_revision()
        try:
            self._etcd_post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        except ControlPlaneError as e:
            if "compacted" not in str(e):  # already compacted to rev: nothing to do
                raise
        return rev

    def is_alive(self) -> bool:
        return (
            self._apiserver is not None and self._apiserver.poll() is None
            and self._etcd is not None and self._etcd.poll() is None
        )
