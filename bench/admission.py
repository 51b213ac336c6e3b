"""Admission throughput: keymount's /mutate against a bare aiohttp server, in one run.

SPEC §10: admission must cost about what the HTTP stack costs, and the same whatever
the cluster holds. Each server runs in its own process over TLS on loopback; one
client process sends the same AdmissionReview (a backend Pod) to each in turn with a
fixed concurrency and a fixed number of requests (bounded in count and time).

    make bench                      # defaults
    python bench/admission.py --requests 5000 --concurrency 32 --namespaces 2000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from webhook.certs import build_certificates, write_certificates  # noqa: E402

REVIEW = {
    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    "request": {
        "uid": "bench", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE", "namespace": "ns-0", "userInfo": {"username": "bench"},
        "object": {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "api", "labels": {"app.kubernetes.io/component": "backend"}},
                   "spec": {"containers": [{"name": "app", "image": "example.com/app:1"},
                                           {"name": "proxy", "image": "example.com/proxy:1"}]}},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_key_dir(directory: Path, namespaces: int, keys_per_namespace: int) -> None:
    """Key Secret manifests for many namespaces, one file per namespace."""
    for n in range(namespaces):
        docs = [{"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": f"key-{i}", "namespace": f"ns-{n}",
                              "labels": {"keymount.io/encryption-key": "true"},
                              "annotations": {"keymount.io/key-index": str(i + 1)}},
                 "data": {"encryption-key": base64.b64encode(os.urandom(32)).decode()}}
                for i in range(keys_per_namespace)]
        (directory / f"ns-{n}.yaml").write_text(yaml.safe_dump_all(docs))


def run_bare(port: int, cert: str, key: str) -> None:
    """The floor: aiohttp parsing the review and answering allowed, nothing else."""
    async def mutate(request: web.Request) -> web.Response:
        review = json.loads(await request.read())
        return web.json_response({"apiVersion": review["apiVersion"], "kind": "AdmissionReview",
                                  "response": {"uid": review["request"]["uid"],
                                               "allowed": True}})

    app = web.Application(client_max_size=7 * 1024 * 1024)
    app.router.add_post("/mutate", mutate)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=context, print=None,
                access_log=None)


def run_keymount(port: int, cert: str, key: str, keys_dir: str) -> None:
    import logging

    from webhook.config import Settings
    from webhook.localdir import DirectoryKeySource
    from webhook.metrics import Metrics
    from webhook.server import Runtime, ServeOptions, serve
    from webhook.store import KeyStore

    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    store = KeyStore()
    source = DirectoryKeySource(keys_dir, settings=settings, store=store, poll_interval=3600)
    runtime = Runtime(settings=settings, store=store, source=source, metrics=Metrics(store))
    asyncio.run(serve(runtime, ServeOptions(host="127.0.0.1", port=port, probe_port=free_port(),
                                            tls_cert=cert, tls_key=key, shutdown_grace=0)))


async def wait_ready(url: str, context: ssl.SSLContext, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    body = json.dumps(REVIEW).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while True:
            try:
                async with session.post(url, data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    answer = await resp.json()
                    if answer["response"]["allowed"]:
                        return
            except (aiohttp.ClientError, OSError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} not ready within {timeout}s")
            await asyncio.sleep(0.1)


async def load(url: str, context: ssl.SSLContext, *, requests: int, concurrency: int,
               max_seconds: float) -> dict[str, float]:
    body = json.dumps(REVIEW).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    remaining = iter(range(requests))
    started = time.perf_counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in remaining:
            if time.perf_counter() - started > max_seconds:
                return
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.json()
                assert answer["response"]["allowed"] is True
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--namespaces", type=int, default=2000,
                        help="namespaces of key Secrets in the large cache")
    parser.add_argument("--keys-per-namespace", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds per server (median reported)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop each round after this long")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        certs = write_certificates(Path(tmp) / "certs", build_certificates(
            service="bench", namespace="bench", ips=["127.0.0.1"]))
        small, large = Path(tmp) / "small", Path(tmp) / "large"
        small.mkdir(), large.mkdir()
        write_key_dir(small, 1, args.keys_per_namespace)
        write_key_dir(large, args.namespaces, args.keys_per_namespace)
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        servers = [
            ("bare aiohttp (floor)", run_bare, ()),
            ("keymount, 1 namespace", run_keymount, (str(small),)),
            (f"keymount, {args.namespaces} namespaces x {args.keys_per_namespace} keys",
             run_keymount, (str(large),)),
        ]
        spawn = multiprocessing.get_context("spawn")
        running = []
        try:
            for name, target, extra in servers:
                port = free_port()
                proc = spawn.Process(target=target, args=(port, str(certs.tls_cert),
                                                          str(certs.tls_key), *extra),
                                     daemon=True)
                proc.start()
                url = f"https://127.0.0.1:{port}/mutate"
                running.append((name, url, proc))
                asyncio.run(wait_ready(url, context))
            # Interleaved rounds, so drifting machine load hits every server alike;
            # each figure is the median round.
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in running}
            per_round = max(1, args.requests // args.rounds)
            for _ in range(args.rounds + 1):  # the first round warms up and is dropped
                for name, url, _ in running:
                    rounds[name].append(asyncio.run(load(
                        url, context, requests=per_round, concurrency=args.concurrency,
                        max_seconds=args.max_seconds)))
        finally:
            for _, _, proc in running:
                proc.terminate()
                proc.join(10)
        results = []
        for name, samples in rounds.items():
            samples = sorted(samples[1:], key=lambda r: r["rps"])
            median = samples[len(samples) // 2]
            results.append((name, {**median, "requests": sum(r["requests"] for r in samples)}))

    floor = results[0][1]["rps"]
    print(f"{'server':45} {'requests':>8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'vs floor':>8}")
    for name, r in results:
        print(f"{name:45} {r['requests']:8d} {r['rps']:8.0f} {r['p50_ms']:7.2f} "
              f"{r['p99_ms']:7.2f} {r['rps'] / floor:8.0%}")
    print(f"(median of {args.rounds} interleaved rounds, concurrency {args.concurrency}, TLS "
          f"on loopback, {os.cpu_count()} cores, client and server on the same machine)")


if __name__ == "__main__":
    main()
