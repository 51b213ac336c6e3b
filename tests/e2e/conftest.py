"""The end-to-end test bed: a real kube-apiserver and etcd, keymount as a process.

Everything here runs on loopback. The control plane comes from
`bash scripts/prepare-control-plane.sh`; without it these tests skip with that hint,
except under KEYMOUNT_E2E=required (CI), where a missing control plane fails them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

import probes
from controlplane import ControlPlane, ControlPlaneError, ControlPlaneUnavailable
from node import Node, NodeError, NodeUnavailable
from polling import poll

ROOT = Path(__file__).resolve().parents[2]
# As manifests/base/deployment.yaml ships it (the admin is in system:masters).
KEY_WRITERS = "group:system:masters,group:keymount:key-writers"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def control_plane():
    try:
        plane = ControlPlane()
        plane.start()
    except ControlPlaneUnavailable as exc:
        if os.environ.get("KEYMOUNT_E2E") == "required":
            pytest.fail(f"KEYMOUNT_E2E=required but the control plane is missing: {exc}")
        pytest.skip(f"no real control plane: {exc} (or `make control-plane`)")
    except ControlPlaneError as exc:
        pytest.fail(f"control plane did not start: {exc}")
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def node(control_plane):
    """A real node (containerd, kubelet, kube-controller-manager) named `localhost`,
    joined to the control plane: hostNetwork Pods with `nodeName: localhost` run."""
    try:
        real = Node(control_plane)
    except NodeUnavailable as exc:
        if os.environ.get("KEYMOUNT_E2E") == "required":
            pytest.fail(f"KEYMOUNT_E2E=required but the node is missing: {exc}")
        pytest.skip(f"no real node: {exc}")
    started = time.monotonic()
    try:
        real.start()
        real.wait_ready()
    except NodeError as exc:
        real.stop()
        pytest.fail(f"node did not start: {exc}")
    real.timings["start_seconds"] = round(time.monotonic() - started, 2)
    yield real
    real.stop()


@pytest.fixture(scope="session")
def admin_kubeconfig(control_plane, tmp_path_factory) -> Path:
    return Path(control_plane.write_kubeconfig(tmp_path_factory.mktemp("kube") / "admin"))


@pytest.fixture(scope="session")
def api(admin_kubeconfig) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(config_file=str(admin_kubeconfig)))


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args],
                            input=stdin, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


@contextlib.contextmanager
def controller_rights(kubeconfig: Path, namespace: str, user: str) -> Iterator[None]:
    """manifests/components/controller's RBAC for the test bed's keymount `user`
    (apihelpers.component_rbac) while the block runs, and no longer: its
    ClusterRoleBinding lets that user write any Secret, which later tests of the same
    user (a 403 they expect) must not inherit."""
    from apihelpers import component_rbac
    kubectl(kubeconfig, "apply", "-f", "-", stdin=component_rbac(namespace, user))
    try:
        yield
    finally:
        kubectl(kubeconfig, "delete", "clusterrolebinding", "keymount-controller",
                "--ignore-not-found")


@contextlib.contextmanager
def controller_home(api, kubeconfig: Path, user: str) -> Iterator[str]:
    """keymount's own namespace for a controller under test (`--controller-namespace`):
    its Lease, and the controller component's RBAC while the block runs. The namespaces
    a controller rotates are others: it never rotates its own (webhook/controller.py)."""
    name = f"keymount-home-{uuid.uuid4().hex[:8]}"
    api.create_namespace({"metadata": {"name": name}})
    try:
        with controller_rights(kubeconfig, name, user):
            yield name
    finally:
        api.delete_namespace(name)


class Keymount:
    """`keymount serve` as a process, with the probe port for metrics."""

    def __init__(self, proc: subprocess.Popen, port: int, probe_port: int, log: Path,
                 ca_file: Path, client_cert: tuple[Path, Path]):
        self.proc, self.port, self.probe_port, self.log = proc, port, probe_port, log
        self.ca_file, self.client_cert = ca_file, client_cert

    def stop(self) -> int | None:
        """SIGTERM, as the kubelet sends it; the exit code, or None if it hung."""
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def review(self, body: dict, *, client_cert: bool = True) -> dict:
        """POST an AdmissionReview straight to /mutate, as the API server would,
        presenting the client certificate keymount's --client-ca trusts (without
        `client_cert`: as anyone else who reaches the port)."""
        import ssl
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            context.load_cert_chain(*self.client_cert)
        request = urllib.request.Request(
            f"https://127.0.0.1:{self.port}/mutate", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:
            return json.load(resp)["response"]

    def metric(self, name: str, labels: str = "") -> float:
        return probes.metric(self.probe_port, name, labels)

    def ready(self) -> bool:
        return probes.ready(self.probe_port)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()
                if line.startswith("{")]

    def log_text(self) -> str:
        """Everything logged up to now. Lines reach the file within the log sink's
        interval, in order: a marker decision is sent and awaited, so every line logged
        before it is in (a backend Pod of a namespace without keys: refused, at info)."""
        uid = f"log-marker-{uuid.uuid4()}"
        self.review({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"uid": uid, "operation": "CREATE",
                                 "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                 "namespace": "keymount-log-marker", "object": {
                                     "metadata": {"name": "marker", "labels": {
                                         "app.kubernetes.io/component": "backend"}},
                                     "spec": {"containers": [{"name": "c"}]}}}})
        return poll(lambda: uid in (text := self.log.read_text()) and text, timeout=10,
                    what="the marker decision in keymount's log")


# The verbs of manifests/base/rbac.yaml; mallory and bob may do anything with Secrets
# and Pods, as a namespace admin can: only --key-writers tells them apart.
RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: keymount-e2e}
rules:
- apiGroups: [""]
  resources: [secrets, pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [apps]
  resources: [replicasets, statefulsets, daemonsets]
  verbs: [get]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get]
- apiGroups: [""]
  resources: [replicationcontrollers]
  verbs: [get]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get]
- apiGroups: [keymount.io]
  resources: [keypolicies, clusterkeypolicies]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: keymount-e2e-secret-admin}
rules:
- apiGroups: [""]
  resources: [secrets, pods]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: keymount-e2e-secret-admins}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: keymount-e2e-secret-admin}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: mallory}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: keymount-e2e}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: keymount-e2e}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: keymount}
"""


def webhook_configurations(port: int, ca_bundle: str) -> str:
    """The registrations of manifests/, but dialled by URL on loopback."""
    def hook(name, path, rules, selector, namespace_selector=None):
        entry = {
            "name": name, "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun",
            "failurePolicy": "Fail", "timeoutSeconds": 10,
            "clientConfig": {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle},
            "rules": rules, "objectSelector": selector,
            "namespaceSelector": namespace_selector or {
                "matchExpressions": [{"key": "keymount-e2e/unguarded",
                                      "operator": "DoesNotExist"}]},
        }
        return entry
    pods = [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
             "resources": ["pods"]}]
    pod_updates = [{**pods[0], "operations": ["CREATE", "UPDATE"]}]
    secrets = [{"apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE", "DELETE"], "resources": ["secrets"]}]
    stamps = [{**secrets[0], "operations": ["CREATE", "UPDATE"]}]
    backend = {"matchLabels": {"app.kubernetes.io/component": "backend"}}
    keys = {"matchLabels": {"keymount.io/encryption-key": "true"}}
    mutating = {"apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration", "metadata": {"name": "keymount"},
                "webhooks": [{**hook("inject.keymount.io", "/mutate", pods, backend),
                              "reinvocationPolicy": "IfNeeded",
                              "namespaceSelector": {}},
                             {**hook("numbers.keymount.io", "/mutate", stamps, keys),
                              "reinvocationPolicy": "IfNeeded"}]}
    validating = {"apiVersion": "admissionregistration.k8s.io/v1",
                  "kind": "ValidatingWebhookConfiguration", "metadata": {"name": "keymount"},
                  "webhooks": [hook("pods.keymount.io", "/validate", pod_updates, backend, {}),
                               hook("secrets.keymount.io", "/validate", secrets, keys),
                               manifest_webhook("policies.keymount.io", port, ca_bundle)]}
    return yaml.safe_dump_all([mutating, validating])


def manifest_webhook(name: str, port: int, ca_bundle: str) -> dict:
    """One webhook exactly as manifests/base/validatingwebhook.yaml declares it, only its
    clientConfig replaced: dialled by URL on loopback."""
    path = ROOT / "manifests/base/validatingwebhook.yaml"
    hook = next(h for h in yaml.safe_load(path.read_text())["webhooks"] if h["name"] == name)
    hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}"
                                   f"{hook['clientConfig']['service']['path']}",
                            "caBundle": ca_bundle}
    return hook


def launch_keymount(control_plane, work: Path, *extra: str) -> Keymount:
    """`keymount serve` on free loopback ports as the least-privileged user keymount."""
    work.mkdir(parents=True, exist_ok=True)
    kubeconfig = control_plane.write_kubeconfig(work / "kubeconfig",
                                                token=control_plane.keymount_token)
    if not (work / "certs/tls.crt").exists():
        subprocess.run([sys.executable, "-m", "webhook", "certs", "--service", "keymount",
                        "--namespace", "keymount", "--out", str(work / "certs"),
                        "--ip", "127.0.0.1"], check=True, capture_output=True)
    # Like the API server in production (docs/operations.md, "Client certificates"),
    # the test bed's presents a client certificate to webhooks; a test may name its own
    # --client-ca to speak to keymount directly with the one `keymount certs` made.
    if "--client-ca" in extra:
        client_cert = (work / "certs/client.crt", work / "certs/client.key")
    else:
        extra = ("--client-ca", str(control_plane.webhook_client_ca), *extra)
        client_cert = control_plane.webhook_client_cert
    port, probe = free_port(), free_port()
    log = work / f"keymount-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--probe-port", str(probe), "--kubeconfig", str(kubeconfig),
             "--tls-cert", str(work / "certs/tls.crt"), "--tls-key", str(work / "certs/tls.key"),
             "--shutdown-grace", "0", "--own-user", control_plane.keymount_user,
             "--key-writers", KEY_WRITERS, *extra],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Keymount(proc, port, probe, log, work / "certs/ca.crt", client_cert)
    poll(lambda: server.ready() or proc.poll() is not None, timeout=60, what="keymount /readyz")
    if proc.poll() is not None:
        raise AssertionError(log.read_text()[-3000:])
    return server


@pytest.fixture(scope="session")
def keymount(control_plane, admin_kubeconfig, tmp_path_factory):
    kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=RBAC)
    server = launch_keymount(control_plane, tmp_path_factory.mktemp("keymount"))
    try:
        ca_bundle = base64.b64encode(server.ca_file.read_bytes()).decode()
        kubectl(admin_kubeconfig, "apply", "-f", "-",
                stdin=webhook_configurations(server.port, ca_bundle))
        yield server
    finally:
        code = server.stop()
    # With a watch blocked in a worker thread, SIGTERM must still end it cleanly.
    assert code == 0, f"keymount exited {code} on SIGTERM:\n{server.log.read_text()[-2000:]}"


@pytest.fixture(scope="session")
def user_kubeconfig(control_plane, tmp_path_factory):
    """A kubeconfig for one of the test bed's other users (mallory, bob)."""
    directory = tmp_path_factory.mktemp("users")

    def write(name: str) -> Path:
        return Path(control_plane.write_kubeconfig(directory / name,
                                                   token=control_plane.user_tokens[name]))
    return write


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def namespace(api, keymount, request) -> str:
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{next(_counter)}"
    api.create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture(scope="session")
def policy_crds(admin_kubeconfig):
    """The two CRDs of manifests/, applied and served."""
    assert shutil.which("kubectl"), "kubectl is needed to render manifests/"
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests")],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    crds = [d for d in yaml.safe_load_all(rendered)
            if d and d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 2
    kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(crds))
    for crd in crds:
        kubectl(admin_kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
                f"crd/{crd['metadata']['name']}")
    poll(lambda: kubectl(admin_kubeconfig, "get", "keypolicies,clusterkeypolicies", "-A",
                         check=False).returncode == 0, what="the policy kinds served")


@pytest.fixture
def age_identity(tmp_path):
    """An age identity file as age-keygen writes one (a comment, then the key; mode
    0600), and its recipient: what `keys backup --recipient` and `keys restore
    --identity` take."""
    from pyrage import x25519
    key = x25519.Identity.generate()
    path = tmp_path / "identity.txt"
    path.write_text(f"# keymount e2e\n{key}\n")
    os.chmod(path, 0o600)
    return path, str(key.to_public())
