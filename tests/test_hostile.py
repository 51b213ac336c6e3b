"""Attacks on the webhook port, each reproduced against a real `keymount serve`: slow
clients, many connections, huge bodies, forged reviews, SIGTERM under load,
certificates swapped under load, and key material in the logs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from webhook.certs import build_certificates, write_certificates

from builders import key_secret, pod, random_key, review
from polling import poll
from served import Served

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(params=[(1, "uvloop"), (2, "uvloop"), (1, "asyncio")],
                ids=["one-process", "two-workers", "asyncio-loop"])
def served(tmp_path, request):
    """`keymount serve` as one process, as `--workers 2`, and on the standard library's
    event loop (`--event-loop asyncio`): every attack here holds for each; the two loops
    have separate TLS and transport code."""
    servers = []
    workers, event_loop = request.param

    def start(*args: str, **kw) -> Served:
        server = Served(tmp_path / f"s{len(servers)}", *args, workers=workers,
                        event_loop=event_loop, **kw)
        servers.append(server)
        return server
    start.workers = workers
    yield start
    for server in servers:
        server.stop()


async def slow_clients(server: Served, count: int, *, stop: asyncio.Event) -> list:
    """`count` TLS connections that send a request's headers one byte every second."""
    context = server.context()
    connections = []
    for _ in range(count):
        try:
            connections.append(await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=context, server_hostname="127.0.0.1"))
        except (OSError, ssl.SSLError):
            pass

    async def trickle(writer):
        try:
            for byte in b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n":
                if stop.is_set():
                    return
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1)
        except (OSError, ssl.SSLError, ConnectionError):
            return
    tasks = [asyncio.create_task(trickle(w)) for _, w in connections]
    return tasks


def timed_review(server: Served, conn) -> float:
    started = time.perf_counter()
    status, answer = server.post(conn)
    assert status == 200 and answer["response"]["allowed"] is True
    return time.perf_counter() - started


async def test_500_slow_clients_neither_starve_reviews_nor_grow_memory(served):
    # --max-connections is per worker: 256 open connections in all either way.
    server = served("--request-timeout", "4", "--max-connections",
                    str(256 // served.workers))
    conn = server.connection()
    await asyncio.to_thread(timed_review, server, conn)  # a keep-alive API server
    stop = asyncio.Event()
    tasks = await slow_clients(server, 500, stop=stop)
    try:
        latencies = [await asyncio.to_thread(timed_review, server, conn) for _ in range(20)]
        fresh = server.connection()  # a new connection gets a slot: a slow one is evicted
        latencies += [await asyncio.to_thread(timed_review, server, fresh) for _ in range(5)]
        print(f"\nreview latency under 500 slow clients: max {max(latencies) * 1000:.1f} ms")
        # Starved, a review would wait for the slow clients' 4 s deadline. With two
        # workers, three busy processes (the workers and this client) share two cores:
        # the scheduler's time slices alone reach ~100 ms (seen in CI: 118 ms, once).
        assert max(latencies) < (0.050 if server.workers == 1 else 0.400)
        assert server.memory_mib("VmHWM") < server.memory_limit_mib
        await asyncio.to_thread(poll, lambda: server.metric(
            "keymount_connections_dropped_total", 'reason="expired"') >= 200,
            timeout=15, what="slow clients cut off at the request deadline")
        assert server.metric("keymount_connections_dropped_total", 'reason="evicted"') >= 200
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert await asyncio.to_thread(timed_review, server, server.connection()) < 0.050


def huge_body(size: int) -> bytes:
    """A body that decodes into millions of objects: the costliest JSON per byte."""
    return b"[" + b"{}," * (size // 3 - 1) + b"{}]"


def test_concurrent_7_mib_bodies_stay_within_the_memory_limit(served):
    server = served("--request-timeout", "20")
    body = huge_body(7 * 1024 * 1024 - 16)
    results: list[int] = []

    def send() -> None:
        conn = server.connection(timeout=60)
        conn.request("POST", "/mutate", body=body, headers={"Content-Type": "application/json"})
        results.append(conn.getresponse().status)
    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    latencies = [timed_review(server, server.connection()) for _ in range(5)]
    for t in threads:
        t.join(90)
    assert results == [400] * 4
    peak = server.memory_mib("VmHWM")
    print(f"\npeak RSS with 4 concurrent 7 MiB bodies: {peak:.0f} MiB; "
          f"reviews meanwhile: max {max(latencies) * 1000:.0f} ms")
    assert peak < server.memory_limit_mib


def test_forged_reviews_for_keyless_namespaces_do_not_turn_into_a_flood_of_reads(served):
    server = served("--live-reads-per-second", "5")
    conn = server.connection()
    answers = [server.post(conn, Served.body(namespace=f"nokeys-{i}"))[1]["response"]
               for i in range(200)]
    assert all(a["allowed"] is False for a in answers)  # every one still refused
    reads = server.metric("keymount_live_reads_total", 'result="read"')
    limited = server.metric("keymount_live_reads_total", 'result="limited"')
    # One keep-alive connection reaches one worker: the limit holds as for one process.
    assert reads <= 10 + 5 * 5 and limited >= 150, (reads, limited)


def test_sigterm_under_load_leaves_no_accepted_request_unanswered(served):
    server = served("--shutdown-grace", "2")
    stop = threading.Event()
    counts = {"answered": 0, "unanswered": 0, "refused": 0, "closing": 0}
    lock = threading.Lock()

    def count(what: str) -> None:
        with lock:
            counts[what] += 1

    def one_request(sock) -> bool:
        """Send a review on `sock`; True if it was answered and the connection may be
        reused, False if the server said Connection: close."""
        body = Served.body()
        sock.sendall(b"POST /mutate HTTP/1.1\r\nHost: k\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed before an answer")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed in the middle of an answer")
            rest += chunk
        count("answered")
        closing = b"connection: close" in head.lower()
        if closing:
            count("closing")
        return not closing

    def client(keep_alive: bool) -> None:
        context = server.context()
        while not stop.is_set():
            try:
                raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            except OSError:
                count("refused")  # after the grace: nothing listens; not accepted
                time.sleep(0.01)
                continue
            try:
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            except (ssl.SSLError, ConnectionError, OSError):
                # The kernel queued the connection but keymount never accepted it (its
                # listener closed): the client may retry, nothing was sent.
                count("refused")
                raw.close()
                continue
            try:
                with sock:
                    while not stop.is_set() and one_request(sock) and keep_alive:
                        pass
            except (ssl.SSLError, ConnectionError, OSError):
                # Accepted, request sent, no answer: the failure the API server would
                # turn into a refused Pod.
                count("unanswered")

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    poll(lambda: counts["answered"] > 50, what="load running")
    started = time.monotonic()
    server.proc.send_signal(15)
    code = server.proc.wait(30)
    took = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(10)
    print(f"\nSIGTERM under load: {counts}, exit {code} after {took:.1f}s")
    assert code == 0 and took < 2 + 10  # grace + shutdown timeout, inside 30 s
    assert counts["closing"] > 0  # answers during the grace said Connection: close
    assert counts["unanswered"] == 0, counts


def serial(port: int, cafile: Path) -> int:
    from cryptography import x509
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


@pytest.mark.parametrize("swap", ["cert-first", "key-first", "symlink"])
def test_certificates_swapped_under_load_fail_no_handshake_once_the_pair_is_complete(
        served, tmp_path, swap):
    server = served()
    live = server.certs
    old_ca = tmp_path / "old-ca.crt"
    old_ca.write_bytes((live / "ca.crt").read_bytes())
    renewed = build_certificates(service="keymount", namespace="keymount",
                                 ips=["127.0.0.1"])
    new_ca = tmp_path / "new-ca.crt"
    new_ca.write_bytes(renewed["ca.crt"])
    trust = tmp_path / "both.crt"  # clients trust both CAs, as during a CA rollover
    trust.write_bytes(old_ca.read_bytes() + new_ca.read_bytes())
    complete = threading.Event()
    stop = threading.Event()
    # Every handshake from the first to the last is recorded, with the phase it was
    # in: the old pair must serve while the files are half-written, as much as the
    # new one after.
    phase = ["before"]
    failures: list[tuple[str, str]] = []
    served_in: dict[str, int] = {}
    seen_new: list[float] = []
    first = serial(server.port, old_ca)

    def load() -> None:
        while not stop.is_set():
            now = phase[0]
            try:
                number = serial(server.port, trust)
            except (OSError, ssl.SSLError) as exc:
                failures.append((now, repr(exc)))
                continue
            served_in[now] = served_in.get(now, 0) + 1
            if complete.is_set() and number != first and not seen_new:
                seen_new.append(time.monotonic())

    def handshakes_in(name: str, count: int = 20) -> None:
        """Wait until `count` handshakes succeeded (or any failed) in this phase."""
        poll(lambda: failures or served_in.get(name, 0) >= count, timeout=20,
             what=f"{count} handshakes while {name}")

    def reloads(result: str) -> float:
        return server.metric("keymount_tls_reloads_total", f'result="{result}"')
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        handshakes_in("before")
        if swap == "symlink":
            # As the kubelet updates a Secret volume: files are links into ..data.
            old = tmp_path / "..v1"
            write_certificates(old, {k: (live / k).read_bytes() for k in ("tls.crt", "tls.key")})
            write_certificates(tmp_path / "..v2", renewed)
            (tmp_path / "..data").symlink_to(old.name)
            phase[0] = "linking"
            for name in ("tls.crt", "tls.key"):
                (live / name).unlink()
                (live / name).symlink_to(tmp_path / "..data" / name)
            # The links are new files holding the same pair: each process reloads it
            # once; only then is the ..data swap the kubelet's one atomic change.
            poll(lambda: reloads("success") >= server.workers, timeout=20,
                 what="the linked pair reloaded by every process")
            handshakes_in("linking")
            (tmp_path / "..data.tmp").symlink_to("..v2")
            os.replace(tmp_path / "..data.tmp", tmp_path / "..data")
        else:
            order = ("tls.crt", "tls.key") if swap == "cert-first" else ("tls.key", "tls.crt")
            phase[0] = "half-written"
            (live / order[0]).write_bytes(renewed[order[0]])
            # Each process has tried the half pair (and kept the old one): handshakes
            # must go on, in this phase, not only once the pair is complete.
            poll(lambda: reloads("error") >= server.workers, timeout=20,
                 what="a reload tick over half a pair in every process")
            handshakes_in("half-written")
            (live / order[1]).write_bytes(renewed[order[1]])
        phase[0] = "complete"
        complete.set()
        done = time.monotonic()
        poll(lambda: seen_new or failures, timeout=10, what="the new certificate served")
        if seen_new:
            print(f"\n{swap}: new certificate served {seen_new[0] - done:.1f}s after the "
                  f"pair was complete")
        phase[0] = "renewed"
        handshakes_in("renewed")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    assert serial(server.port, new_ca) != first


def test_no_key_byte_reaches_the_log_at_debug_level(served):
    server = served("--log-level", "debug")
    keys = [*server.key_bytes, random_key()]
    conn = server.connection()
    server.post(conn)  # an injection: files and fingerprints
    # A Pod that is no backend: its decision ("skipped") is logged at debug level.
    server.post(conn, json.dumps(review(pod(labels={"app": "web"}))).encode())
    secret = key_secret("k9", keys[-1], namespace="default", index=9)
    for operation, old in (("CREATE", None), ("UPDATE", secret), ("DELETE", secret)):
        body = review(None if operation == "DELETE" else secret, kind="Secret",
                      operation=operation, old=old, namespace="default")
        server.post(conn, json.dumps(body).encode(), path="/validate")
    broken = json.dumps(review(secret, kind="Secret")).encode()[:-5]  # invalid JSON
    server.post(server.connection(), broken, path="/validate")
    with socket.create_connection(("127.0.0.1", server.port)) as raw, \
            server.context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /validate HTTP/1.1\r\nX: " + base64.b64encode(keys[-1]) +
                    b"\r\nBad header\r\n\r\n")
        tls.recv(100)
    assert server.stop() == 0
    logs = server.logs()
    assert '"result":"injected"' in logs
    assert any('"level":"debug"' in line and '"result":"skipped"' in line
               for line in logs.splitlines())
    spellings = [s for key in keys for s in
                 (key.hex(), base64.b64encode(key).decode(), key.decode("latin-1"),
                  base64.urlsafe_b64encode(key).decode())]
    assert [s for s in spellings if s in logs] == []
