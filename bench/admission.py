"""Admission throughput and latency: keymount as it runs in production against a bare
aiohttp server answering the same AdmissionReview, in one run.

- keymount is `keymount serve` itself: TLS, JSON decision logs at info (to a file, as
  a container runtime takes stderr), metrics, the key cache.
- The floor is aiohttp parsing the review and answering a fixed response.
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
                "env": [{"name": f"ENV_{i}", "value": f"value-{i}" * 3} for i in range(8)],
                "resources": {"limits": {"cpu": "500m", "memory": "256Mi"},
                              "requests": {"cpu": "100m", "memory": "128Mi"}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                  "periodSeconds": 10},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}]}
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
async def mutate(request):
    review = json.loads(await request.read())
    return web.json_response({"apiVersion": review["apiVersion"], "kind": "AdmissionReview",
                              "response": {"uid": review["request"]["uid"], "allowed": True}})
app = web.Application(client_max_size=7 * 1024 * 1024)
app.router.add_post("/mutate", mutate)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2], sys.argv[3])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_context=context, print=None,
            access_log=None)
'''


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
    def __init__(self, name: str, argv: list[str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        self.url = f"https://127.0.0.1:{port}/mutate"
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *argv], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def wait_ready(server: Server, context: ssl.SSLContext, body: bytes,
                     timeout: float = 300.0) -> float:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(server.url, data=body, headers={
                        "Content-Type": "application/json"}) as resp:
                    if (await resp.json())["response"]["allowed"]:
                        return time.monotonic() - server.started
            except (aiohttp.ClientError, OSError, KeyError, ValueError):
                pass
            assert server.proc.poll() is None, server.log.read_text()[-2000:]
            await asyncio.sleep(0.1)
    raise SystemExit(f"{server.name} not ready within {timeout}s")


def wrk(url: str, body_file: Path, connections: int, seconds: int) -> float:
    script = body_file.with_suffix(".lua")
    script.write_text(
        'wrapper = io.open("' + str(body_file) + '", "rb")\n'
        'wrk.method = "POST"\nwrk.body = wrapper:read("*a")\n'
        'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    line = next(row for row in out.splitlines() if row.startswith("Requests/sec:"))
    errors = [row for row in out.splitlines() if "Non-2xx" in row or "Socket errors" in row]
    assert not errors, out
    return float(line.split()[1])


async def open_loop(url: str, context: ssl.SSLContext, body: bytes, *, rate: float,
                    seconds: float) -> list[float]:
    """Requests sent on a fixed schedule whatever the answers do; latency counts from the
    scheduled time, so a slow server cannot hide its queueing (no coordinated omission)."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(ssl=context, limit=64)
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
    return sorted(latencies)


def percentile(values: list[float], q: float) -> float:
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
    parser.add_argument("--seconds", type=int, default=5, help="per wrk measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--namespaces", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0,
                        help="also measure keymount --workers N (reported, not a goal)")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt-get install wrk util-linux)")
    connections = [int(c) for c in args.connections.split(",")]
    body = review_body()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs = write_certificates(tmp / "certs", build_certificates(
            service="bench", namespace="bench", ips=["127.0.0.1"]))
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        (tmp / "body.json").write_bytes(body)
        write_keys(tmp / "small", 1, args.keys)
        write_keys(tmp / "large", args.namespaces, args.keys)
        tls = [str(certs.tls_cert), str(certs.tls_key)]

        def keymount(keys: str, *extra: str) -> list[str]:
            return [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1",
                    "--probe-port", "0", "--keys-from", keys, "--tls-cert", tls[0],
                    "--tls-key", tls[1], "--log-format", "json", "--log-level", "info",
                    "--shutdown-grace", "0", *extra]
        plan = [("bare aiohttp", lambda p: [sys.executable, "-c", BARE, str(p), *tls]),
                ("keymount (production config)",
                 lambda p: keymount(str(tmp / "small"), "--port", str(p))),
                (f"keymount, {args.namespaces:,} namespaces x {args.keys} keys",
                 lambda p: keymount(str(tmp / "large"), "--port", str(p)))]
        if args.workers:
            plan.append((f"keymount --workers {args.workers}", lambda p: keymount(
                str(tmp / "small"), "--port", str(p), "--workers", str(args.workers))))
        servers, ready = [], {}
        try:
            for name, argv in plan:
                port = free_port()
                server = Server(name, argv(port), port, tmp / f"{len(servers)}.log")
                servers.append(server)
                ready[name] = asyncio.run(wait_ready(server, context, body))
            rps: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.rounds):
                for c in connections:
                    for server in servers:
                        rps.setdefault((server.name, c), []).append(
                            wrk(server.url, tmp / "body.json", c, args.seconds))
            latency = {server.name: asyncio.run(open_loop(
                server.url, context, body, rate=200, seconds=10)) for server in servers}
            log_lines = sum(1 for _ in open(servers[1].log))
        finally:
            for server in servers:
                server.stop()
    cache_mib, cache_seconds = cache_cost(args.namespaces, args.keys)
    report(servers=[s.name for s in servers], connections=connections, rps=rps,
           latency=latency, ready=ready, cache=(cache_mib, cache_seconds), args=args,
           body=len(body), log_lines=log_lines)


def report(*, servers, connections, rps, latency, ready, cache, args, body, log_lines) -> None:
    bare = servers[0]
    lines = [f"# keymount admission benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"{os.cpu_count()} cores; server pinned to CPU {SERVER_CPU}, load generator "
             f"(wrk, 1 thread) to CPU {CLIENT_CPU}; TLS on loopback; a {body:,}-byte "
             f"AdmissionReview (backend Pod, 3 containers); keymount with JSON decision "
             f"logs at info ({log_lines:,} lines written in this run); median of "
             f"{args.rounds} interleaved rounds of {args.seconds} s, spread min-max.", "",
             "| server | " + " | ".join(f"{c} conn req/s" for c in connections) +
             " | vs bare (16 conn) |", "|---|" + "---|" * (len(connections) + 1)]
    for name in servers:
        cells = []
        for c in connections:
            samples = sorted(rps[(name, c)])
            cells.append(f"{statistics.median(samples):,.0f} ({samples[0]:,.0f}-"
                         f"{samples[-1]:,.0f})")
        ratio = statistics.median(rps[(name, 16)]) / statistics.median(rps[(bare, 16)]) \
            if 16 in connections else float("nan")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    lines += ["", "Open loop, 200 requests/s for 10 s (latency from the scheduled send):", "",
              "| server | p50 ms | p99 ms | p99.9 ms | p99 vs bare |", "|---|---|---|---|---|"]
    bare_p99 = percentile(latency[bare], 0.99)
    for name in servers:
        values = latency[name]
        lines.append(f"| {name} | {percentile(values, 0.5) * 1000:.2f} | "
                     f"{percentile(values, 0.99) * 1000:.2f} | "
                     f"{percentile(values, 0.999) * 1000:.2f} | "
                     f"{percentile(values, 0.99) / bare_p99:.2f}x |")
    lines += ["", f"Scale: {args.namespaces:,} namespaces x {args.keys} keys: the cache holds "
              f"{cache[0]:.1f} MiB and is built in {cache[1]:.2f} s from a full list; the "
              f"server with it was ready {ready[servers[2]]:.1f} s after start (reading and "
              f"parsing {args.namespaces * args.keys:,} Secrets from a file included).", ""]
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
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(servers)
    for i, name in enumerate(servers):
        medians = [statistics.median(rps[(name, c)]) for c in connections]
        ax.bar([x + i * width for x in range(len(connections))], medians, width, label=name)
    ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(connections))])
    ax.set_xticklabels([f"{c} connections" for c in connections])
    ax.set_ylabel("requests/s (median)")
    ax.set_title("keymount /mutate vs a bare aiohttp server, one core each")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=100)


if __name__ == "__main__":
    main()
