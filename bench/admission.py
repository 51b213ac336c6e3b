"""Admission throughput and latency: keymount as it runs in production against a bare
aiohttp server answering the same AdmissionReview, in one run.

- keymount is `keymount serve` itself: TLS, JSON decision logs at info (to a file, as
  a container runtime takes stderr), metrics, the key cache.
- The floor is aiohttp parsing the review and answering a fixed response, on asyncio's
  loop (the goal is set against it) and on uvloop (the loop keymount serves on).
- Each server is pinned to CPU 0, the load generator to CPU 1 (`taskset`): one core
  each. Throughput: `wrk` (closed loop, keep-alive TLS) at 1, 16 and 64 connections.
  Latency: an open-loop client at 200 requests/s (p50, p99, p99.9).
- Rounds are interleaved (all servers up at once, each measured in turn), so machine
  drift hits each alike; the median round is reported with the spread (min-max).
- Scale: 10,000 namespaces x 5 keys in the cache (synthetic Secrets): throughput and
  p50 against the 1-namespace case, cache memory, time to ready after the list.

    make bench            # writes bench/results/results.md and bench/results/throughput.png
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from webhook.certs import build_certificates, write_certificates  # noqa: E402

SERVER_CPU, CLIENT_CPU = "0", "1"


def review_body() -> bytes:
    """A ~7.8 KB AdmissionReview: a backend Pod with 3 containers, as the API server
    sends it (defaults filled in, managed fields, resources, probes)."""
    def container(name: str) -> dict:
        return {"name": name, "image": f"registry.example.com/team/{name}:1.42.0",
                "imagePullPolicy": "IfNotPresent", "ports": [{"containerPort": 8080,
                                                              "protocol": "TCP"}],
                "env": [{"name": f"ENV_{i}", "value": f"value-{i}" * 3} for i in range(7)],
                "resources": {"limits": {"cpu": "500m", "memory": "256Mi"},
                              "requests": {"cpu": "100m", "memory": "128Mi"}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                  "periodSeconds": 10},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}]}
    def fields_of(value: object) -> object:
        """managedFields' fieldsV1: the field set of `value`, as the API server records it."""
        if isinstance(value, dict):
            return {f"f:{k}": fields_of(v) for k, v in value.items()}
        if isinstance(value, list):
            return {f'k:{{"name":"{v.get("name", i)}"}}' if isinstance(v, dict) else f"v:{v}":
                    fields_of(v) for i, v in enumerate(value)}
        return {}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "generateName": "api-7d9c5b8f6-", "namespace": "ns-0",
        "labels": {"app.kubernetes.io/component": "backend", "app": "api",
                   "pod-template-hash": "7d9c5b8f6"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                             "name": "api-7d9c5b8f6", "uid": "0" * 36, "controller": True}],
        "annotations": {f"example.com/note-{i}": "x" * 40 for i in range(6)}},
        "spec": {"containers": [container(n) for n in ("app", "proxy", "metrics")],
                 "volumes": [{"name": "config", "configMap": {"name": "api-config"}}],
                 "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
                 "serviceAccountName": "default", "securityContext": {"fsGroup": 1000},
                 "tolerations": [{"key": "node.kubernetes.io/not-ready",
                                  "operator": "Exists", "effect": "NoExecute",
                                  "tolerationSeconds": 300}]}}
    # The API server sets managedFields before admission: every review carries them.
    pod["metadata"]["managedFields"] = [{
        "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
        "time": "2026-11-29T00:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": fields_of({"generateName": 1, "labels": pod["metadata"][
            "labels"], "ownerReferences": 1}), "f:spec": fields_of(pod["spec"])}}]
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE", "namespace": "ns-0",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "uid": "1" * 36, "groups": ["system:serviceaccounts",
                                                 "system:serviceaccounts:kube-system",
                                                 "system:authenticated"]},
        "object": pod, "oldObject": None, "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}
    return json.dumps(review).encode()


BARE = '''
import json, ssl, sys
from aiohttp import web
mode = sys.argv[4] if len(sys.argv) > 4 else "asyncio"
if mode == "uvloop-orjson":
    import orjson
    async def mutate(request):
        review = orjson.loads(await request.read())
        return web.Response(body=orjson.dumps({
            "apiVersion": review["apiVersion"], "kind": "AdmissionReview",
            "response": {"uid": review["request"]["uid"], "allowed": True}}),
            content_type="application/json")
else:
    async def mutate(request):
        review = json.loads(await request.read())
        return web.json_response({"apiVersion": review["apiVersion"],
                                  "kind": "AdmissionReview",
                                  "response": {"uid": review["request"]["uid"],
                                               "allowed": True}})
app = web.Application(client_max_size=7 * 1024 * 1024)
app.router.add_post("/mutate", mutate)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2], sys.argv[3])
loop = None
if mode.startswith("uvloop"):
    import uvloop
    loop = uvloop.new_event_loop()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_context=context, print=None,
            access_log=None, loop=loop)
'''
# The reference (issue 21): the HTTP stack keymount runs on, uvloop, and the codec it
# ships, orjson, with nothing else: what is left over it is keymount's own work.
REFERENCE_NAME = "bare aiohttp, uvloop + orjson"
BARE_NAME = "bare aiohttp, asyncio + json"
BARE_UVLOOP_NAME = "bare aiohttp, uvloop + json"
KEYMOUNT_NAME = "keymount (production config)"

# A hostile client (issue 21): one keep-alive TLS connection sending a 7 MiB body,
# reading the answer, and sending the next, as fast as it can.
HOSTILE = '''
import signal, socket, ssl, sys, time
port, body = int(sys.argv[1]), open(sys.argv[2], "rb").read()
head = (f"POST /mutate HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Type: application/json"
        f"\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n").encode()
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
answered = 0
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    while True:
        try:
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as sock:
                replies = sock.makefile("rb")
                while True:
                    sock.sendall(head + body)
                    if not replies.readline():
                        break
                    length = 0
                    while (line := replies.readline()) not in (b"\\r\\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    replies.read(length)
                    answered += 1
        except OSError:
            time.sleep(0.01)
finally:
    print(answered, flush=True)
'''
MAX_BODY = 7 * 1024 * 1024  # keymount's limit (webhook/server.py)


def hostile_body() -> bytes:
    """A valid AdmissionReview just under the 7 MiB limit whose Pod's first container
    has ~95,000 environment variables: the most JSON objects (the costliest thing to
    decode) keymount accepts in one body (admission.MAX_CONTAINERS)."""
    review = json.loads(review_body())
    entry = {"name": "E000000", "value": "v" * 40}
    size = len(json.dumps(entry)) + 2
    count = min(95_000, (MAX_BODY - len(review_body()) - 4096) // size)
    review["request"]["object"]["spec"]["containers"][0]["env"] = [
        {"name": f"E{i:06d}", "value": "v" * 40} for i in range(count)]
    body = json.dumps(review).encode()
    assert len(body) < MAX_BODY, len(body)
    return body


class Hostile:
    """The hostile client against one server, on the load generator's core."""

    def __init__(self, server: Server, body_file: Path) -> None:
        self.proc = subprocess.Popen(["taskset", "-c", CLIENT_CPU, sys.executable, "-c",
                                      HOSTILE, str(server.port), str(body_file)],
                                     stdout=subprocess.PIPE, text=True)

    def stop(self) -> int:
        """Stops it; how many 7 MiB requests were answered."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return int(out.strip() or 0)


def loop_cpu(server: Server) -> list[float]:
    """keymount's keymount_admission_loop_cpu_seconds histogram for /mutate: the
    cumulative count of each bucket (the last is +Inf)."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{server.probe}/metrics",
                                timeout=10) as resp:
        text = resp.read().decode()
    counts: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith('keymount_admission_loop_cpu_seconds_bucket{') and \
                'webhook="mutate"' in line:
            bound = line.split('le="')[1].split('"')[0]
            counts[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return [counts[b] for b in sorted(counts)]


def loop_cpu_bounds() -> list[float]:
    from webhook.metrics import LOOP_CPU_BUCKETS
    return [*LOOP_CPU_BUCKETS, float("inf")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_keys(path: Path, namespaces: int, keys: int) -> None:
    """Key Secrets as one JSON List (YAML's superset; parsed with libyaml)."""
    items = [{"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": f"key-{i}", "namespace": f"ns-{n}",
        "labels": {"keymount.io/encryption-key": "true"},
        "annotations": {"keymount.io/key-index": str(i + 1),
                        "keymount.io/numbers-used": f"1-{i + 1}"}},
        "data": {"encryption-key": base64.b64encode(os.urandom(32)).decode()}}
        for n in range(namespaces) for i in range(keys)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "keys.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                                "items": items}))


class Server:
    """One server process, pinned to `cpus`; `probe` is its plain-HTTP probe port."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, *,
                 cpus: str = SERVER_CPU, probe: int | None = None) -> None:
        self.name, self.port, self.log, self.probe = name, port, log, probe
        self.url = f"https://127.0.0.1:{port}/mutate"
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["taskset", "-c", cpus, *argv], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT)

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server and its workers so far."""
        total = 0
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(pid) for pid in children.read_text().split()]
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def wait_ready(server: Server, context: ssl.SSLContext, body: bytes,
                     timeout: float = 300.0) -> float:
    """Seconds from start until the server admits the review (and, for keymount, until
    /readyz says every worker has its cache)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while time.monotonic() < deadline:
            try:
                if server.probe is not None:
                    async with session.get(f"http://127.0.0.1:{server.probe}/readyz") as resp:
                        ready = resp.status == 200
                else:
                    ready = True
                async with session.post(server.url, data=body, headers={
                        "Content-Type": "application/json"}) as resp:
                    if ready and (await resp.json())["response"]["allowed"]:
                        return time.monotonic() - server.started
            except (aiohttp.ClientError, OSError, KeyError, ValueError):
                pass
            assert server.proc.poll() is None, server.log.read_text()[-2000:]
            await asyncio.sleep(0.1)
    raise SystemExit(f"{server.name} not ready within {timeout}s")


def prepare(tmp: Path, body: bytes) -> tuple[Any, ssl.SSLContext]:
    """A bench's serving certificates and a client context trusting them, and the
    review in tmp/body.json."""
    certs = write_certificates(tmp / "certs", build_certificates(
        service="bench", namespace="bench", ips=["127.0.0.1"]))
    (tmp / "body.json").write_bytes(body)
    return certs, ssl.create_default_context(cafile=str(certs.ca_cert))


def wrk_script(body_file: Path) -> Path:
    """wrk's Lua script that POSTs `body_file` as JSON."""
    script = body_file.with_suffix(".lua")
    script.write_text(
        'wrapper = io.open("' + str(body_file) + '", "rb")\n'
        'wrk.method = "POST"\nwrk.body = wrapper:read("*a")\n'
        'wrk.headers["Content-Type"] = "application/json"\n')
    return script


def wrk(server: Server, body_file: Path, connections: int, seconds: int) -> tuple[float, float]:
    """Requests per second, and the server's CPU microseconds per request (CPU time
    is what a request costs, however much the machine's speed drifts)."""
    script = wrk_script(body_file)
    cpu = server.cpu_seconds()
    out = subprocess.run(["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "-s", str(script), server.url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    cpu = server.cpu_seconds() - cpu
    errors = [row for row in out.splitlines() if "Non-2xx" in row or "Socket errors" in row]
    assert not errors, out
    rate = float(next(row for row in out.splitlines()
                      if row.startswith("Requests/sec:")).split()[1])
    count = int(next(row for row in out.splitlines() if "requests in" in row).split()[0])
    return rate, cpu / count * 1e6


async def open_loop(url: str, context: ssl.SSLContext, body: bytes, *, rate: float,
                    seconds: float) -> list[float]:
    """Requests sent on a fixed schedule whatever the answers do; latency counts from the
    scheduled time, so a slow server cannot hide its queueing (no coordinated omission).
    The client's own garbage collector is off meanwhile: its pauses are not the server's."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(ssl=context, limit=64)
    gc.collect()
    gc.disable()
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.2

            async def one(at: float) -> None:
                await asyncio.sleep(max(0.0, at - loop.time()))
                async with session.post(url, data=body, headers={
                        "Content-Type": "application/json"}) as resp:
                    await resp.read()
                latencies.append(loop.time() - at)
            await asyncio.gather(*(one(start + i / rate) for i in range(int(rate * seconds))))
    finally:
        gc.enable()
    return latencies


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def cache_cost(namespaces: int, keys: int) -> tuple[float, float]:
    """MiB the key cache holds for this many keys, and seconds to build it from a list
    (records parsed as the watch parses them)."""
    from webhook.config import Settings
    from webhook.key_secrets import parse_key_secret
    from webhook.store import KeyStore
    settings = Settings()
    items = [{"metadata": {"name": f"key-{i}", "namespace": f"ns-{n}",
                           "creationTimestamp": "2026-11-29T00:00:00Z",
                           "labels": {"keymount.io/encryption-key": "true"},
                           "annotations": {"keymount.io/key-index": str(i + 1),
                                           "keymount.io/numbers-used": f"1-{i + 1}"}},
              "data": {"encryption-key": base64.b64encode(os.urandom(32)).decode()}}
             for n in range(namespaces) for i in range(keys)]
    started = time.perf_counter()  # timed without tracemalloc, which slows it 5x
    KeyStore().replace_all(parse_key_secret(item, settings=settings) for item in items)
    took = time.perf_counter() - started
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    store = KeyStore()
    store.replace_all(parse_key_secret(item, settings=settings) for item in items)
    del items
    after = tracemalloc.take_snapshot()
    size = sum(s.size_diff for s in after.compare_to(before, "filename"))
    tracemalloc.stop()
    assert store.keyring("ns-0").keys
    return size / 2**20, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Many short rounds rather than few long ones: the machine's speed drifts over
    # minutes, and each round's ratio compares servers measured seconds apart.
    parser.add_argument("--seconds", type=int, default=3, help="per wrk measurement")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--latency-seconds", type=int, default=6,
                        help="open-loop seconds per server per round")
    parser.add_argument("--namespaces", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2,
                        help="also measure keymount --workers N on both cores (reported, "
                             "not a goal: the client shares a core with it); 0 to skip")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt-get install wrk util-linux)")
    connections = [int(c) for c in args.connections.split(",")]
    body = review_body()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs, context = prepare(tmp, body)
        write_keys(tmp / "small", 1, args.keys)
        write_keys(tmp / "large", args.namespaces, args.keys)
        tls = [str(certs.tls_cert), str(certs.tls_key)]

        def keymount(keys: str, port: int, probe: int, *extra: str) -> list[str]:
            return [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1",
                    "--port", str(port), "--probe-port", str(probe), "--keys-from", keys,
                    "--tls-cert", tls[0], "--tls-key", tls[1], "--log-format", "json",
                    "--log-level", "info", "--shutdown-grace", "0", *extra]
        scale = f"keymount, {args.namespaces:,} namespaces x {args.keys} keys"
        plan: list[tuple[str, Any, str, bool]] = [  # name, argv(port, probe), cpus, probe
            # The reference, first: every ratio is against it.
            (REFERENCE_NAME, lambda p, q: [sys.executable, "-c", BARE, str(p), *tls,
                                           "uvloop-orjson"], SERVER_CPU, False),
            # Context: the same server decoding with the standard library.
            (BARE_NAME, lambda p, q: [sys.executable, "-c", BARE, str(p), *tls, "asyncio"],
             SERVER_CPU, False),
            (BARE_UVLOOP_NAME, lambda p, q: [sys.executable, "-c", BARE, str(p), *tls,
                                             "uvloop"], SERVER_CPU, False),
            (KEYMOUNT_NAME,
             lambda p, q: keymount(str(tmp / "small"), p, q), SERVER_CPU, True),
            (scale, lambda p, q: keymount(str(tmp / "large"), p, q), SERVER_CPU, True)]
        if args.workers > 1:
            plan.append((f"keymount --workers {args.workers}, both cores",
                         lambda p, q: keymount(str(tmp / "small"), p, q, "--workers",
                                               str(args.workers)),
                         f"{SERVER_CPU},{CLIENT_CPU}", True))
        servers: list[Server] = []
        ready: dict[str, float] = {}
        try:
            for name, argv, cpus, probed in plan:
                port, probe = free_port(), free_port()
                server = Server(name, argv(port, probe), port, tmp / f"{len(servers)}.log",
                                cpus=cpus, probe=probe if probed else None)
                servers.append(server)
                ready[name] = asyncio.run(wait_ready(server, context, body))
            rps: dict[tuple[str, int], list[float]] = {}
            cpu: dict[tuple[str, int], list[float]] = {}
            latency: dict[str, list[float]] = {}
            attacked: dict[str, list[float]] = {}
            hostile_answers: dict[str, int] = {}
            (tmp / "hostile.json").write_bytes(hostile_body())
            under_attack = [s for s in servers if s.name in (REFERENCE_NAME, KEYMOUNT_NAME)]
            keymount_server = next(s for s in servers if s.name == KEYMOUNT_NAME)
            cpu_attacked = [0.0] * len(loop_cpu_bounds())
            for _ in range(args.rounds):
                for c in connections:
                    for server in servers:
                        rate, micros = wrk(server, tmp / "body.json", c, args.seconds)
                        rps.setdefault((server.name, c), []).append(rate)
                        cpu.setdefault((server.name, c), []).append(micros)
                for server in servers:
                    latency.setdefault(server.name, []).extend(asyncio.run(open_loop(
                        server.url, context, body, rate=200, seconds=args.latency_seconds)))
                for server in under_attack:
                    before = loop_cpu(keymount_server)
                    hostile = Hostile(server, tmp / "hostile.json")
                    time.sleep(1)  # the attack under way before the first request
                    attacked.setdefault(server.name, []).extend(asyncio.run(open_loop(
                        server.url, context, body, rate=200, seconds=args.latency_seconds)))
                    hostile_answers[server.name] = hostile_answers.get(server.name, 0) + \
                        hostile.stop()
                    if server is keymount_server:
                        cpu_attacked = [a + b - c for a, b, c in
                                        zip(cpu_attacked, loop_cpu(server), before,
                                            strict=True)]
            # Everything but the attacks: the wrk rounds and the open loop.
            cpu_quiet = [a - b for a, b in zip(loop_cpu(keymount_server), cpu_attacked,
                                               strict=True)]
            log_lines = sum(1 for _ in open(keymount_server.log))
        finally:
            for server in servers:
                server.stop()
    cache_mib, cache_seconds = cache_cost(args.namespaces, args.keys)
    report(servers=[s.name for s in servers], connections=connections, rps=rps, cpu=cpu,
           latency=latency, ready=ready, cache=(cache_mib, cache_seconds), args=args,
           body=len(body), log_lines=log_lines, scale=scale, attacked=attacked,
           hostile_answers=hostile_answers, loop=(cpu_quiet, cpu_attacked))


def spread(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"{statistics.median(ordered):,.0f} ({ordered[0]:,.0f}-{ordered[-1]:,.0f})"


def over(histogram: list[float], bound: float) -> tuple[float, str]:
    """Of a cumulative histogram: the share of observations above `bound` (a bucket
    bound), and the bucket the 99.9th percentile falls in."""
    bounds = loop_cpu_bounds()
    total = histogram[-1] or 1.0
    above = 1 - histogram[bounds.index(bound)] / total
    rank = 0.999 * total
    index = next(i for i, count in enumerate(histogram) if count >= rank)
    low = bounds[index - 1] * 1000 if index else 0.0
    high = "inf" if bounds[index] == float("inf") else f"{bounds[index] * 1000:g}"
    return above, f"{low:g}-{high} ms"


def report(*, servers, connections, rps, cpu, latency, ready, cache, args, body, log_lines,
           scale, attacked, hostile_answers, loop) -> None:
    reference = servers[0]
    lines = [f"# keymount admission benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"{os.cpu_count()} cores; each server pinned to CPU {SERVER_CPU} (the workers "
             f"row: both), the load generator (wrk, 1 thread) to CPU {CLIENT_CPU}; TLS on "
             f"loopback; a {body:,}-byte AdmissionReview (backend Pod, 3 containers, "
             f"managedFields); keymount as in production: JSON decision logs at info "
             f"({log_lines:,} lines written in this run), metrics, the key cache. "
             f"{args.rounds} interleaved rounds of {args.seconds} s: median (min-max). "
             f"The reference is {reference}: the HTTP stack and codec keymount runs on, "
             f"with no work of its own; the other bare servers are context."]

    def table(title: str, names: list[str], cell: Any) -> None:
        """A table of one row per server and one column per connection count."""
        lines.extend(["", title, "",
                      "| server | " + " | ".join(f"{c} conn" for c in connections) + " |",
                      "|---|" + "---|" * len(connections)])
        lines.extend(f"| {name} | " + " | ".join(cell(name, c) for c in connections) + " |"
                     for name in names)

    def median_ratio(samples: dict, name: str, c: int, *, inverse: bool = False) -> float:
        ours = statistics.median(samples[(name, c)])
        theirs = statistics.median(samples[(reference, c)])
        return theirs / ours if inverse else ours / theirs

    def paired(name: str, c: int) -> str:
        pairs = sorted(k / b for k, b in zip(rps[(name, c)], rps[(reference, c)],
                                             strict=True))
        return f"**{statistics.median(pairs):.2f}x** ({pairs[0]:.2f}-{pairs[-1]:.2f})"

    table("Throughput, requests/s, and the ratio to the reference's median:", servers,
          lambda name, c: f"{spread(rps[(name, c)])} **{median_ratio(rps, name, c):.2f}x**")
    table("Paired ratios against the reference: each round's server/reference throughput "
          "(the rounds interleave the servers, so a drift of the machine's speed hits "
          "both sides of a pair alike), median (min-max). Goal: keymount >= 0.8x at 16 "
          "and 64 connections:", servers[1:], paired)
    table("Server CPU time per request, microseconds (steadier than requests/s on a machine "
          "whose speed drifts), and the ratio keymount / reference. Goal: <= 1.25x:",
          servers, lambda name, c: f"{spread(cpu[(name, c)])} "
                                   f"**{1 / median_ratio(cpu, name, c, inverse=True):.2f}x**")
    lines += ["", f"Open loop, 200 requests/s, {args.latency_seconds} s per server in each "
                  f"round, all rounds pooled (latency from the scheduled send); under "
                  f"attack, one more client sends {MAX_BODY // 2**20} MiB reviews (~95,000 "
                  f"JSON objects each) on one connection as fast as they are answered. "
                  f"Goal: keymount's p99.9 <= 1.5x the reference's, quiet and under attack:",
              "", "| server | | p50 ms | p99 ms | p99.9 ms | p99.9 vs reference | "
                  "7 MiB bodies answered |", "|---|---|---|---|---|---|---|"]
    for label, pool in (("quiet", latency), ("under attack", attacked)):
        base = percentile(pool[reference], 0.999)
        for name in servers:
            if name not in pool:
                continue
            values = pool[name]
            answered = str(hostile_answers.get(name, "")) if pool is attacked else ""
            lines.append(f"| {name} | {label} | {percentile(values, 0.5) * 1000:.2f} | "
                         f"{percentile(values, 0.99) * 1000:.2f} | "
                         f"{percentile(values, 0.999) * 1000:.2f} | "
                         f"{percentile(values, 0.999) / base:.2f}x | {answered} |")
    quiet, hostile = loop
    lines += ["", "The event loop's CPU per admission in keymount (its "
                  "keymount_admission_loop_cpu_seconds histogram: decoding, deciding, "
                  "logging and encoding, once the body is in). Goal: the 99.9th percentile "
                  "<= 1 ms:", "", "| requests | count | over 1 ms | p99.9 in bucket |",
              "|---|---|---|---|"]
    for label, histogram in (("wrk rounds and the quiet open loop", quiet),
                             ("under attack (the 7 MiB bodies included)", hostile)):
        share, bucket = over(histogram, 0.001)
        lines.append(f"| {label} | {histogram[-1]:,.0f} | {share * 100:.3f}% | {bucket} |")
    small, large = KEYMOUNT_NAME, scale
    loss = [1 - statistics.median(rps[(large, c)]) / statistics.median(rps[(small, c)])
            for c in connections]
    lines += ["", f"Scale, {args.namespaces:,} namespaces x {args.keys} keys against one "
                  f"namespace: throughput "
              + ", ".join(f"{-x * 100:+.0f}% at {c} conn"
                          for x, c in zip(loss, connections, strict=True))
              + f"; p50 {percentile(latency[large], 0.5) * 1000:.2f} vs "
                f"{percentile(latency[small], 0.5) * 1000:.2f} ms. The cache holds "
                f"{cache[0]:.1f} MiB and is built in {cache[1]:.2f} s from a full list; the "
                f"server was ready {ready[large]:.1f} s after start, reading and parsing "
                f"{args.namespaces * args.keys:,} Secrets from one file included.", ""]
    text = "\n".join(lines)
    (RESULTS / "results.md").write_text(text)
    print(text)
    plot(servers, connections, rps)


def plot(servers, connections, rps) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(servers)
    for i, name in enumerate(servers):
        medians = [statistics.median(rps[(name, c)]) for c in connections]
        ax.bar([x + i * width for x in range(len(connections))], medians, width, label=name)
    ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(connections))])
    ax.set_xticklabels([f"{c} connections" for c in connections])
    ax.set_ylabel("requests/s (median)")
    ax.set_title("keymount /mutate vs a bare aiohttp server")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=100)


if __name__ == "__main__":
    main()
