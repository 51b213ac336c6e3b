"""`keymount serve --controller` against the real API server: two replicas, one Lease.

Each replica runs as the least-privileged user keymount, with only the Lease calls that
manifests/components/controller grants, in a namespace of the test's own.
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from conftest import ROOT, kubectl, launch_keymount
from polling import poll

LEASE = "keymount-controller"


def lease_rbac(namespace: str, user: str) -> str:
    """The component's Role and RoleBinding as they ship, moved to `namespace` and bound
    to the test bed's keymount user instead of the ServiceAccount."""
    docs = list(yaml.safe_load_all(
        (ROOT / "manifests/components/controller/rbac.yaml").read_text()))
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "RoleBinding":
            doc["subjects"] = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                "name": user}]
    return yaml.safe_dump_all(docs)


@pytest.fixture
def leases(admin_kubeconfig) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(
        config.new_client_from_config(config_file=str(admin_kubeconfig)))


@pytest.fixture
def replicas(control_plane, admin_kubeconfig, namespace, tmp_path):
    """Start `serve --controller` replicas campaigning for the Lease in `namespace`."""
    kubectl(admin_kubeconfig, "apply", "-f", "-",
            stdin=lease_rbac(namespace, control_plane.keymount_user))
    started = []

    def start(count: int = 2):
        for _ in range(count):
            started.append(launch_keymount(control_plane, tmp_path / f"r{len(started)}",
                                           "--controller", "--controller-namespace",
                                           namespace))
        return started[-count:]
    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()


def identity(server) -> str:
    # No POD_NAME outside a Pod: host name and process id (webhook/leader.py).
    return f"{socket.gethostname()}_{server.proc.pid}"


def holder(leases, namespace: str) -> str | None:
    try:
        return leases.read_namespaced_lease(LEASE, namespace).spec.holder_identity
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def the_leader(servers, leases, namespace):
    """The one replica that reports keymount_leader 1 and holds the Lease, once there is
    exactly one; None until then."""
    alive = [s for s in servers if s.proc.poll() is None]
    leading = [s for s in alive if s.metric("keymount_leader") == 1]
    if len(leading) != 1 or holder(leases, namespace) != identity(leading[0]):
        return None
    return leading[0]


def test_of_two_replicas_exactly_one_leads_and_holds_the_lease_and_both_serve(
        replicas, leases, namespace):
    servers = replicas(2)
    leader = poll(lambda: the_leader(servers, leases, namespace), timeout=30,
                  what="one leader holding the Lease")
    follower = next(s for s in servers if s is not leader)
    lease = leases.read_namespaced_lease(LEASE, namespace)
    assert lease.spec.lease_duration_seconds == 15
    # The follower keeps following (no second leader appears over a few retry
    # periods) and both keep serving admission.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert follower.metric("keymount_leader") == 0
        assert holder(leases, namespace) == identity(leader)
        time.sleep(0.5)  # sampling over a window, not synchronisation
    for server in servers:
        assert server.ready()
        assert "keymount-log-marker" in server.log_text()


def test_when_the_leader_is_killed_the_other_replica_takes_the_lease_within_30s(
        replicas, leases, namespace, record_property):
    servers = replicas(2)
    leader = poll(lambda: the_leader(servers, leases, namespace), timeout=30,
                  what="one leader holding the Lease")
    follower = next(s for s in servers if s is not leader)
    transitions = leases.read_namespaced_lease(LEASE, namespace).spec.lease_transitions
    leader.proc.send_signal(signal.SIGKILL)  # no chance to release
    killed = time.monotonic()
    leader.proc.wait(10)
    poll(lambda: the_leader(servers, leases, namespace) is follower, timeout=30,
         what="the follower holding the Lease")
    took = time.monotonic() - killed
    record_property("takeover_after_sigkill_seconds", round(took, 2))
    print(f"takeover after SIGKILL: {took:.2f} s")
    # Not released: the follower waited out the lease (15 s from the last renewal it
    # saw, at most a retry period before the kill).
    assert 10 <= took < 30, took
    lease = leases.read_namespaced_lease(LEASE, namespace)
    assert lease.spec.lease_transitions == transitions + 1


def test_when_the_leader_stops_gracefully_it_releases_and_the_other_takes_over_at_once(
        replicas, leases, namespace, record_property):
    servers = replicas(2)
    leader = poll(lambda: the_leader(servers, leases, namespace), timeout=30,
                  what="one leader holding the Lease")
    follower = next(s for s in servers if s is not leader)
    stopped = time.monotonic()
    assert leader.stop() == 0  # SIGTERM, as the kubelet sends it
    poll(lambda: the_leader(servers, leases, namespace) is follower, timeout=15,
         what="the follower holding the Lease")
    took = time.monotonic() - stopped
    record_property("takeover_after_sigterm_seconds", round(took, 2))
    print(f"takeover after SIGTERM: {took:.2f} s")
    # Released on stop: taken at the follower's next attempt (a retry period, 2-2.4 s),
    # not after the 15 s lease.
    assert took < 5, took
    assert "released the controller Lease" in leader.log.read_text()


def test_a_replica_that_may_not_touch_the_lease_still_serves_admission(
        control_plane, namespace, tmp_path):
    # No Role in this namespace: every Lease call is refused (403).
    server = launch_keymount(control_plane, tmp_path, "--controller",
                             "--controller-namespace", namespace)
    try:
        log = poll(lambda: "cannot read or write the controller Lease" in (
            text := server.log_text()) and text, timeout=30, what="the Lease refusal logged")
        assert "403" in log
        assert server.ready() and server.metric("keymount_leader") == 0
    finally:
        assert server.stop() == 0


def test_with_workers_only_worker_0_campaigns(control_plane, admin_kubeconfig, namespace,
                                              leases, tmp_path):
    kubectl(admin_kubeconfig, "apply", "-f", "-",
            stdin=lease_rbac(namespace, control_plane.keymount_user))
    server = launch_keymount(control_plane, tmp_path, "--controller",
                             "--controller-namespace", namespace, "--workers", "2")
    try:
        held = poll(lambda: holder(leases, namespace), timeout=30, what="a Lease holder")
        pid = int(held.rsplit("_", 1)[1])
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        # The holder is a worker of this supervisor, the one told it is worker 0.
        assert Path(f"/proc/{pid}/stat").read_text().split()[3] == str(server.proc.pid)
        assert command[command.index(b"--worker-index") + 1] == b"0"

        def leader_samples() -> dict[str, float]:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.probe_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            return {line.split('worker="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines() if line.startswith("keymount_leader{")}
        assert poll(lambda: leader_samples() == {"0": 1.0, "1": 0.0}, timeout=10,
                    what="keymount_leader by worker")
        campaigns = poll(lambda: server.log.read_text().count(
            "campaigning for the controller Lease"), timeout=10, what="the campaign logged")
        assert campaigns == 1
    finally:
        assert server.stop() == 0
