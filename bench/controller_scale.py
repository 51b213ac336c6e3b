"""The controller at scale: N namespaces under one ClusterKeyPolicy, every key due at
the same instant, against a real kube-apiserver + etcd on loopback
(tests/e2e/controlplane.py).

- N namespaces (default 10,000), each labelled for one ClusterKeyPolicy, each with key 1
  active and slots 2 and 3, as `keymount keys create` leaves a namespace. They are
  written by the admin straight to the API server, before keymount's webhooks are
  registered (40,000 objects through the webhook would take most of the run): the
  annotations are the ones keymount's webhook stamps, and every key 1 carries the same
  `keymount.io/activated-at`, so every namespace comes due in the same second.
- One `keymount serve --controller` as the least-privileged user keymount, with the
  test bed's reader RBAC and manifests/components/controller's, keymount's webhooks
  then registered as tests/e2e/conftest.py registers them (the controller's own writes
  go through them), pinned to CPU 0; the API server, etcd and wrk share CPU 1.
- Measured: the controller's writes per second and per minute (from the API server's
  audit log: creates and patches by user keymount), the process's RSS (sampled every
  second), its CPU time in a quiet window between due times, its start (the live reads
  of the first pass), and admission throughput (`wrk`, the bench's Pod review against
  /mutate in one of the N namespaces) quiet and during the wave.

    make bench-scale                                   # 10,000 namespaces
    .venv/bin/python bench/controller_scale.py --namespaces 2000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e"),
                str(ROOT / "bench")]

from admission import review_body  # noqa: E402

from webhook.policy import parse_duration  # noqa: E402

from apihelpers import component_rbac  # noqa: E402
from controlplane import ControlPlane  # noqa: E402

KEY_WRITERS = "group:system:masters,group:keymount:key-writers"
LABEL = "keymount-bench/scale"
SERVER_CPU, OTHER_CPU = "0", "1"
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def key_secrets(namespace: str, activated: str) -> list[dict[str, Any]]:
    """Key 1 active, slots 2 and 3: a namespace after `keymount keys create`, as
    keymount's webhook stamps it."""
    def secret(number: int, key: bool) -> dict[str, Any]:
        notes = {"keymount.io/key-index": str(number),
                 "keymount.io/numbers-used": "1" if number == 1 else f"1-{number}"}
        if key:
            notes["keymount.io/activated-at"] = activated
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {
            "name": f"keymount-key-{number}", "namespace": namespace,
            "labels": {"keymount.io/encryption-key": "true"}, "annotations": notes},
            "data": {"encryption-key": base64.b64encode(secrets.token_bytes(32)).decode()}
            if key else {}}
    return [secret(1, True), secret(2, False), secret(3, False)]


async def populate(plane: ControlPlane, names: list[str], activated: str,
                   concurrency: int) -> None:
    headers = {"Authorization": f"Bearer {plane.admin_token}",
               "Content-Type": "application/json"}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for name in names:
        queue.put_nowait(name)
    done = 0
    started = time.monotonic()

    async def post(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> None:
        for attempt in range(5):
            async with session.post(f"{plane.server}{path}", json=body,
                                    headers=headers) as resp:
                if resp.status in (201, 409):
                    return
                text = await resp.text()
            await asyncio.sleep(0.5 * (attempt + 1))
        raise SystemExit(f"POST {path}: {resp.status} {text[:300]}")

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while not queue.empty():
            name = queue.get_nowait()
            await post(session, "/api/v1/namespaces", {
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {LABEL: "true"}}})
            for secret in key_secrets(name, activated):
                await post(session, f"/api/v1/namespaces/{name}/secrets", secret)
            done += 1
            if done % 1000 == 0:
                print(f"  {done:,} namespaces ({done / (time.monotonic() - started):.0f}/s)",
                      flush=True)

    connector = aiohttp.TCPConnector(ssl=plane.ssl_context(), limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def load_e2e_conftest() -> Any:
    """tests/e2e/conftest.py (tests/conftest.py has the same module name)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("e2e_conftest",
                                                  ROOT / "tests/e2e/conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], input=stdin,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {result.stderr}")
    return result.stdout


class Process:
    """A sampled process: RSS and CPU time every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, float]] = []  # monotonic, RSS MiB, CPU s
        self.stopped = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK

    def rss(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.samples.append((time.monotonic(), self.rss(), self.cpu()))
            except (FileNotFoundError, ProcessLookupError):
                return


def wrk(url: str, body_file: Path, connections: int, seconds: int,
        server: Process) -> tuple[float, float]:
    """Requests/s, and keymount's CPU microseconds per request over the run."""
    script = body_file.with_suffix(".lua")
    script.write_text(f'f = io.open("{body_file}", "rb")\nwrk.method = "POST"\n'
                      'wrk.body = f:read("*a")\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    cpu = server.cpu()
    out = subprocess.run(["taskset", "-c", OTHER_CPU, "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    cpu = server.cpu() - cpu
    assert not [r for r in out.splitlines() if "Non-2xx" in r or "Socket errors" in r], out
    rate = float(next(r for r in out.splitlines() if r.startswith("Requests/sec:")).split()[1])
    count = int(next(r for r in out.splitlines() if "requests in" in r).split()[0])
    return rate, cpu / max(1, count) * 1e6


def audit_counts(path: Path, user: str) -> tuple[collections.Counter[int],
                                                  collections.Counter[int]]:
    """Per second (unix time): the writes (create, patch, update of secrets and
    keypolicies) and the reads of secrets `user` made, as the API server logged them."""
    writes: collections.Counter[int] = collections.Counter()
    reads: collections.Counter[int] = collections.Counter()
    needle = f'"username":"{user}"'
    with open(path) as log:
        for line in log:
            if needle not in line:
                continue
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete":
                continue
            resource = (event.get("objectRef") or {}).get("resource")
            verb = event.get("verb")
            second = int(datetime.fromisoformat(
                event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp())
            if resource in ("secrets", "keypolicies") and verb in ("create", "patch",
                                                                    "update"):
                writes[second] += 1
            elif resource == "secrets" and verb in ("get", "list"):
                reads[second] += 1
    return writes, reads


def controller_state_mib(count: int) -> float:
    """MiB the controller's own state holds for `count` managed namespaces (tracemalloc):
    the policy store's namespaces, the due-time queue, the key-age gauge's times."""
    import tracemalloc

    from webhook.controller import Queue
    from webhook.policystore import (
        PolicyStore,
        parse_stored_clusterkeypolicy,
        parse_stored_namespace,
    )
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    policies = PolicyStore()
    policies.clusterkeypolicies.put(parse_stored_clusterkeypolicy({
        "apiVersion": "keymount.io/v1alpha1", "kind": "ClusterKeyPolicy",
        "metadata": {"name": "scale", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"namespaceSelector": {"matchLabels": {LABEL: "true"}},
                 "rotationPeriod": "30d"}}))
    policies.namespaces.replace_all([parse_stored_namespace({"metadata": {
        "name": f"scale-{i:05d}", "labels": {LABEL: "true",
                                             "kubernetes.io/metadata.name": f"scale-{i:05d}"}}})
        for i in range(count)])
    queue, activations, now = Queue(), {}, datetime.now(UTC)
    for name in policies.managed():
        queue.set(name, now + timedelta(days=30))
        activations[name] = now
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(queue) == count
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / 2**20


def wait_until(deadline: float, what: str, check: Any, interval: float = 1.0) -> None:
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=10_000)
    parser.add_argument("--writes-per-second", type=float, default=4.0,
                        help="keymount --controller-writes-per-second (4: its default)")
    parser.add_argument("--staging-period", default="2m")
    parser.add_argument("--quiet-seconds", type=int, default=60,
                        help="the CPU window after the first pass, before the wave")
    parser.add_argument("--wave-seconds", type=int, default=300,
                        help="how long the wave is watched (it lasts about "
                             "3 N / writes-per-second)")
    parser.add_argument("--start-allowance", type=int, default=0,
                        help="seconds allowed for keymount's start and first pass "
                             "(default: N / 50 + 60)")
    parser.add_argument("--rounds", type=int, default=6, help="wrk rounds, quiet and wave")
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--create-concurrency", type=int, default=32)
    args = parser.parse_args()
    for tool in ("wrk", "taskset", "kubectl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt-get install wrk util-linux; kubectl)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plane = ControlPlane(extra_apiserver_args=["--max-requests-inflight=800"])
    plane.start()
    keymount: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            keymount = run(plane, Path(tmp_name), args)
    finally:
        if keymount is not None and keymount.poll() is None:
            keymount.terminate()
            try:
                keymount.wait(30)
            except subprocess.TimeoutExpired:
                keymount.kill()
        plane.stop()


def run(plane: ControlPlane, tmp: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    admin = str(plane.write_kubeconfig(tmp / "admin"))
    for pid in (plane._apiserver.pid, plane._etcd.pid):  # type: ignore[union-attr]
        subprocess.run(["taskset", "-a", "-p", "-c", OTHER_CPU, str(pid)],
                       check=True, capture_output=True)
    names = [f"scale-{i:05d}" for i in range(args.namespaces)]
    activated_at = datetime.now(UTC).replace(microsecond=0)
    print(f"creating {args.namespaces:,} namespaces x 3 key Secrets ...", flush=True)
    started = time.monotonic()
    asyncio.run(populate(plane, names, stamp(activated_at), args.create_concurrency))
    created_in = time.monotonic() - started
    print(f"  created in {created_in:.0f} s", flush=True)

    # RBAC: the webhook's reads (tests/e2e/conftest.py), the controller component's.
    e2e = load_e2e_conftest()
    RBAC, webhook_configurations = e2e.RBAC, e2e.webhook_configurations
    kubectl(admin, "create", "namespace", "keymount")
    kubectl(admin, "apply", "-f", "-", stdin=RBAC)
    kubectl(admin, "apply", "-f", "-", stdin=component_rbac("keymount",
                                                               plane.keymount_user))
    rendered = kubectl(admin, "kustomize", str(ROOT / "manifests"))
    crds = [d for d in yaml.safe_load_all(rendered)
            if d and d["kind"] == "CustomResourceDefinition"]
    kubectl(admin, "apply", "-f", "-", stdin=yaml.safe_dump_all(crds))
    for crd in crds:
        kubectl(admin, "wait", "--for=condition=Established", "--timeout=60s",
                f"crd/{crd['metadata']['name']}")

    # One period for every namespace, chosen so the wave comes after keymount's start
    # and the quiet measurements: all keys were activated at `activated_at`.
    allowance = args.start_allowance or args.namespaces // 50 + 60
    quiet_needs = args.quiet_seconds + args.rounds * (args.wrk_seconds + 2) + 30
    # A successor is staged one staging period before the rotation period ends.
    staging = parse_duration(args.staging_period, field="--staging-period")
    due = datetime.now(UTC) + timedelta(seconds=allowance + quiet_needs)
    period = int((due - activated_at + staging).total_seconds()) + 1
    policy = {"apiVersion": "keymount.io/v1alpha1", "kind": "ClusterKeyPolicy",
              "metadata": {"name": "scale"},
              "spec": {"namespaceSelector": {"matchLabels": {LABEL: "true"}},
                       "rotationPeriod": f"{period}s",
                       "stagingPeriod": args.staging_period}}
    # kubectl retries until the CRD is served.
    wait_until(time.monotonic() + 60, "the ClusterKeyPolicy kind", lambda: subprocess.run(
        ["kubectl", "--kubeconfig", admin, "apply", "-f", "-"], input=json.dumps(policy),
        capture_output=True, text=True).returncode == 0)
    due_at = activated_at + timedelta(seconds=period) - staging
    due_mono = time.monotonic() + (due_at - datetime.now(UTC)).total_seconds()
    print(f"rotationPeriod {period}s: every namespace stages a key at {stamp(due_at)}",
          flush=True)

    # keymount serve --controller, as the keymount user, on CPU 0.
    subprocess.run([sys.executable, "-m", "webhook", "certs", "--service", "keymount",
                    "--namespace", "keymount", "--out", str(tmp / "certs"), "--ip",
                    "127.0.0.1"], check=True, capture_output=True, cwd=ROOT)
    kubeconfig = plane.write_kubeconfig(tmp / "keymount", token=plane.keymount_token)
    port, probe = free_port(), free_port()
    log_path = RESULTS / "controller_scale-keymount.log"
    log = open(log_path, "wb")
    launched = time.monotonic()

    def serve(port: int, probe: int, *extra: str) -> list[str]:
        return ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "webhook", "serve",
                "--host", "127.0.0.1", "--port", str(port), "--probe-port", str(probe),
                "--kubeconfig", str(kubeconfig), "--tls-cert", str(tmp / "certs/tls.crt"),
                "--tls-key", str(tmp / "certs/tls.key"), "--shutdown-grace", "0",
                "--own-user", plane.keymount_user, "--key-writers", KEY_WRITERS,
                "--log-format", "json", "--log-level", "info", *extra]
    proc = subprocess.Popen(
        serve(port, probe, "--controller", "--controller-namespace", "keymount",
              "--controller-writes-per-second", str(args.writes_per_second)),
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    sampler = Process(proc.pid)
    import probes
    wait_until(time.monotonic() + 600, "keymount /readyz",
               lambda: probes.ready(probe) or proc.poll() is not None)
    assert proc.poll() is None, log_path.read_text()[-3000:]
    ready_in = time.monotonic() - launched
    ready_rss = sampler.rss()
    ca_bundle = base64.b64encode((tmp / "certs/ca.crt").read_bytes()).decode()
    kubectl(admin, "apply", "-f", "-", stdin=webhook_configurations(port, ca_bundle))

    # The first pass: every managed namespace read live once. It is over when the
    # process stops using CPU (5 s under 50 ms).
    def settled() -> bool:
        window = [s for s in sampler.samples if s[0] >= time.monotonic() - 5.5]
        return len(window) >= 5 and window[-1][2] - window[0][2] < 0.05 and \
            '"msg":"controller started' in log_path.read_text()
    wait_until(due_mono, "the controller's first pass", settled)
    first_pass_end = time.monotonic()
    print(f"ready in {ready_in:.1f} s; first pass over {first_pass_end - launched:.0f} s "
          f"after start; {due_mono - first_pass_end:.0f} s before the wave", flush=True)

    quiet_cpu0, quiet_t0 = sampler.cpu(), time.monotonic()
    quiet_window = min(args.quiet_seconds,
                       due_mono - quiet_t0 - args.rounds * (args.wrk_seconds + 2) - 10)
    time.sleep(max(0.0, quiet_window))
    quiet_cpu = sampler.cpu() - quiet_cpu0
    quiet_span = time.monotonic() - quiet_t0
    print(f"quiet: {quiet_cpu:.2f} CPU s in {quiet_span:.0f} s", flush=True)

    body = review_body().replace(b'"ns-0"', f'"{names[0]}"'.encode())
    (tmp / "body.json").write_bytes(body)
    url = f"https://127.0.0.1:{port}/mutate"
    quiet: list[tuple[float, float]] = []
    for _ in range(args.rounds):
        if time.monotonic() + args.wrk_seconds + 2 > due_mono:
            break
        quiet.append(wrk(url, tmp / "body.json", args.connections, args.wrk_seconds,
                         sampler))
    print(f"quiet admission: {[round(r) for r, _ in quiet]} req/s", flush=True)

    time.sleep(max(0.0, due_mono - time.monotonic() + 5))
    wave_end = due_mono + args.wave_seconds
    wave: list[tuple[float, float]] = []
    gap = max(0.0, (args.wave_seconds - 10) / max(1, args.rounds) - args.wrk_seconds)
    idle: list[tuple[float, float, float]] = []  # start, end (unix), keymount CPU s
    while len(wave) < args.rounds and time.monotonic() + args.wrk_seconds < wave_end:
        wave.append(wrk(url, tmp / "body.json", args.connections, args.wrk_seconds,
                        sampler))
        # Between rounds, no admission load: what the controller alone costs.
        cpu0, t0 = sampler.cpu(), time.time()
        time.sleep(gap)
        idle.append((t0, time.time(), sampler.cpu() - cpu0))
    print(f"wave admission: {[round(r) for r, _ in wave]} req/s", flush=True)
    time.sleep(max(0.0, wave_end - time.monotonic()))
    sampler.stopped.set()
    assert proc.poll() is None, log_path.read_text()[-3000:]
    rotations = probes.metric(probe, "keymount_rotations_total")
    # The same server without --controller, on the same cluster: what the key cache
    # and the rest of admission hold, apart from the controller.
    plain_port, plain_probe = free_port(), free_port()
    with open(tmp / "plain.log", "wb") as plain_log:
        plain = subprocess.Popen(serve(plain_port, plain_probe), stdout=plain_log,
                                 stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(time.monotonic() + 600, "keymount /readyz (without --controller)",
                   lambda: probes.ready(plain_probe) or plain.poll() is not None)
        plain_sampler = Process(plain.pid)
        time.sleep(20)
        plain_sampler.stopped.set()
        plain_rss = max(r for _, r, _ in plain_sampler.samples)
    finally:
        plain.terminate()
        plain.wait(30)
    report(args=args, plane=plane, sampler=sampler, created_in=created_in,
           ready_in=ready_in, first_pass=first_pass_end - launched, launched=launched,
           quiet_cpu=quiet_cpu, quiet_span=quiet_span, quiet=quiet, wave=wave,
           due_at=due_at, due_mono=due_mono, period=period, rotations=rotations,
           idle=idle, ready_rss=ready_rss, plain_rss=plain_rss)
    return proc


def report(*, args: argparse.Namespace, plane: ControlPlane, sampler: Process,
           created_in: float, ready_in: float, first_pass: float, launched: float,
           quiet_cpu: float, quiet_span: float, quiet: list[tuple[float, float]],
           wave: list[tuple[float, float]], due_at: datetime, due_mono: float,
           period: int, rotations: float, idle: list[tuple[float, float, float]],
           ready_rss: float, plain_rss: float) -> None:
    assert plane.audit_log is not None
    writes, reads = audit_counts(Path(plane.audit_log), plane.keymount_user)
    due = int(due_at.timestamp())
    start_wall = due - (due_mono - launched)
    first_reads = sum(n for s, n in reads.items() if s < due)
    wave_writes = {s - due: n for s, n in writes.items() if s >= due - 5}
    seconds = [wave_writes.get(s, 0) for s in range(0, args.wave_seconds)]
    per_minute = [sum(seconds[m:m + 60]) for m in range(0, len(seconds) - 59, 60)]
    sliding = max((sum(seconds[m:m + 60]) for m in range(0, max(1, len(seconds) - 59))),
                  default=0)
    before = sum(n for s, n in writes.items() if start_wall <= s < due)
    peak_rss = max(r for _, r, _ in sampler.samples)
    rss_at = {label: max((r for t, r, _ in sampler.samples if lo <= t < hi), default=0.0)
              for label, lo, hi in (("start", launched, launched + first_pass),
                                    ("quiet", launched + first_pass, due_mono),
                                    ("wave", due_mono, due_mono + args.wave_seconds))}
    wave_cpu = [c for t, _, c in sampler.samples if due_mono <= t <= due_mono +
                args.wave_seconds]
    q_rate = statistics.median(r for r, _ in quiet)
    w_rate = statistics.median(r for r, _ in wave)
    q_cpu = statistics.median(c for _, c in quiet)
    w_cpu = statistics.median(c for _, c in wave)
    n = args.namespaces
    idle_cpu = sum(c for _, _, c in idle)
    idle_span = sum(b - a for a, b, _ in idle)
    idle_writes = sum(count for s, count in writes.items()
                      if any(a <= s < int(b) for a, b, _ in idle))
    full_wave = 3 * n / args.writes_per_second
    lines = [
        f"# keymount controller at scale ({time.strftime('%Y-%m-%d')})", "",
        f"{n:,} namespaces under one ClusterKeyPolicy (rotationPeriod {period}s, "
        f"stagingPeriod {args.staging_period}), key 1 active and slots 2, 3 in each, every "
        f"key 1 activated in the same second; one `keymount serve --controller "
        f"--controller-writes-per-second {args.writes_per_second:g}` as user keymount "
        f"(controller RBAC, webhooks registered), on CPU 0; kube-apiserver 1.20, etcd "
        f"and wrk on CPU 1 ({os.cpu_count()} cores, shared with other work). The "
        f"{3 * n:,} key Secrets were written by the admin before keymount's webhooks were "
        f"registered ({created_in:.0f} s), with keymount's annotations.", "",
        f"- Start: /readyz after {ready_in:.1f} s (key cache listed); the first pass "
        f"(every managed namespace read live once: {first_reads:,} Secret reads) over "
        f"{first_pass:.0f} s after start; {before} writes before the wave.",
        f"- Writes when the wave came due, watched for {args.wave_seconds} s: at most "
        f"{max(seconds, default=0)} in one second, per minute "
        f"{', '.join(str(m) for m in per_minute)} (any 60 s window at most {sliding}; the "
        f"budget allows {args.writes_per_second * 60:.0f} + a burst of "
        f"{max(1, int(2 * args.writes_per_second))}). At this rate the whole wave (stage, "
        f"then activate and reserve a slot: 3 writes a namespace) takes "
        f"{full_wave / 60:.0f} min.",
        f"- RSS: peak {peak_rss:.1f} MiB (at /readyz, before the controller's first pass "
        f"{ready_rss:.1f}; start {rss_at['start']:.1f}, quiet "
        f"{rss_at['quiet']:.1f}, wave {rss_at['wave']:.1f}); the same `serve` without "
        f"--controller on the same cluster, 20 s after /readyz: {plain_rss:.1f} MiB.",
        f"- CPU between due times: {quiet_cpu:.2f} s in a quiet {quiet_span:.0f} s window "
        f"({quiet_cpu / max(1.0, quiet_span) * 100:.2f}% of a core: the Lease renewals and "
        f"watches); during the wave "
        f"{(wave_cpu[-1] - wave_cpu[0]) if len(wave_cpu) > 1 else 0:.1f} s in "
        f"{args.wave_seconds} s, admission load included; between the wrk rounds (no "
        f"admission load) {idle_cpu:.1f} s in {idle_span:.0f} s "
        f"({idle_cpu / max(1.0, idle_span) * 100:.1f}% of a core) for {idle_writes} writes: "
        f"{idle_cpu / max(1, idle_writes) * 1000:.1f} ms of CPU a write.",
        f"- Admission (wrk, {args.connections} connections, {args.wrk_seconds} s rounds, "
        f"median (min-max)): quiet {q_rate:,.0f} ({min(r for r, _ in quiet):,.0f}-"
        f"{max(r for r, _ in quiet):,.0f}) req/s, {q_cpu:.0f} us CPU/request; during the "
        f"wave {w_rate:,.0f} ({min(r for r, _ in wave):,.0f}-{max(r for r, _ in wave):,.0f})"
        f" req/s, {w_cpu:.0f} us CPU/request: **{(w_rate / q_rate - 1) * 100:+.1f}%** "
        f"throughput, {(w_cpu / q_cpu - 1) * 100:+.1f}% CPU per request.",
        f"- keymount_rotations_total at the end: {rotations:.0f}; the controller's own "
        f"state (tracemalloc, this process): {controller_state_mib(n):.1f} MiB.", ""]
    text = "\n".join(lines)
    (RESULTS / "controller_scale.md").write_text(text)
    (RESULTS / "controller_scale-writes.json").write_text(json.dumps(
        {"per_second_from_due": seconds, "reads_per_second": sorted(reads.items())}))
    print(text)


if __name__ == "__main__":
    main()
