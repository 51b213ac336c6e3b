"""Attacks on the webhook port, each reproduced against a real `keymount serve`: slow
clients, many connections, huge bodies, forged reviews, SIGTERM under load,
certificates swapped under load, and key material in the logs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections import Counter
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


# A request unanswered (and its connection not closed) this long after it was sent is
# hanging: the API server gives up at its 5 s webhook timeout and fails the Pod. A
# connection keymount closes instead is closed at once, or it was left waiting.
HANGING = 3.0
AT_ONCE = 1.0


def sigterm_under_load(server: Served, *, grace: float) -> tuple[Counter, list[str], int, float]:
    """Load `server` with keep-alive and new-connection clients, half of them sending
    each request in two parts, as a large Pod's review arrives in several segments;
    SIGTERM it, and count what became of every request sent: answered (with
    Connection: close, during the drain), refused (connection or handshake failed:
    nothing was sent), closed at once, or hanging (a failure)."""
    stop = threading.Event()
    counts: Counter = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    # ~40 KB: more than one TLS record, as a Pod with a large spec
    body = json.dumps(review(pod(annotations={"note": "x" * 40_000}),
                             namespace="default")).encode()
    request = (b"POST /mutate HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    signalled = [float("inf")]

    def count(what: str, failure: str | None = None) -> None:
        with lock:
            counts[what] += 1
            if failure is not None:
                failures.append(failure)

    def one_request(sock: ssl.SSLSocket, split: bool) -> bool:
        """True if answered on a connection that stays open."""
        sent = time.monotonic()
        try:
            if split:
                # Not synchronisation: the gap a network puts between two segments.
                sock.sendall(request[:len(request) // 2])
                time.sleep(0.01)
                sock.sendall(request[len(request) // 2:])
            else:
                sock.sendall(request)
            head, _, rest = read_until(sock, b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += recv(sock)
        except TimeoutError:
            count("hanging", f"no answer and no close within {HANGING}s of a request sent "
                             f"{sent - signalled[0]:+.2f}s after SIGTERM")
            return False
        except (ssl.SSLError, OSError) as exc:
            took = time.monotonic() - sent
            if took < AT_ONCE:
                count("closed")
            else:
                count("closed late", f"{exc!r} {took:.1f}s after the request was sent")
            return False
        count("answered")
        closing = b"connection: close" in head.lower()
        if closing:
            count("closing")
        return not closing

    def client(keep_alive: bool, split: bool) -> None:
        context = server.context()
        while not stop.is_set():
            try:
                raw = socket.create_connection(("127.0.0.1", server.port), timeout=HANGING)
            except OSError:
                count("refused")  # after the grace: nothing listens
                stop.wait(0.01)  # until the process is gone, without spinning a core
                continue
            try:
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            except (ssl.SSLError, OSError):
                count("refused")  # queued by the kernel, never taken: nothing was sent
                raw.close()
                continue
            with sock:
                while not stop.is_set() and one_request(sock, split) and keep_alive:
                    pass

    threads = [threading.Thread(target=client, args=(keep_alive, split))
               for keep_alive in (True, False) for split in (True, False)]
    for t in threads:
        t.start()
    try:
        poll(lambda: counts["answered"] >= 20, what="load running")
        signalled[0] = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(30)
        took = time.monotonic() - signalled[0]
    finally:
        stop.set()
        for t in threads:
            t.join(HANGING + 5)
    return counts, failures, code, took


def recv(sock: ssl.SSLSocket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionResetError("closed before the whole answer")
    return chunk


def read_until(sock: ssl.SSLSocket, separator: bytes) -> tuple[bytes, bytes, bytes]:
    data = b""
    while separator not in data:
        data += recv(sock)
    return data.partition(separator)


# Two workers would triple every start-up; their drain is each worker's own (the
# supervisor only passes SIGTERM on), which the other two runs cover.
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"], ids=["one-process", "asyncio-loop"])
def test_20_sigterms_under_load_leave_no_request_hanging(tmp_path, event_loop):
    grace, runs = 0.5, 20
    certs = tmp_path / "certs"
    write_certificates(certs, build_certificates(service="keymount", namespace="keymount",
                                                 ips=["127.0.0.1"]))

    def start(run: int) -> Served:
        return Served(tmp_path / f"s{run}", "--shutdown-grace", str(grace),
                      "--shutdown-timeout", "5", event_loop=event_loop, wait=False,
                      certs=certs)
    servers = [start(0)]
    totals: Counter = Counter()
    failures: list[str] = []
    try:
        for run in range(runs):
            server = servers[-1]
            server.wait_ready()
            if run + 1 < runs:  # the next one starts up while this one is loaded and drained
                servers.append(start(run + 1))
            counts, hanging, code, took = sigterm_under_load(server, grace=grace)
            totals += counts
            failures += [f"run {run}: {failure}" for failure in hanging]
            if code != 0 or took > grace + 5:
                failures.append(f"run {run}: exit {code} {took:.1f}s after SIGTERM")
    finally:
        for server in servers:
            server.stop()
    print(f"\n{runs} SIGTERMs under load: {dict(totals)}")
    assert failures == [], (dict(totals), failures)
    assert totals["closing"] > 0  # answers during the grace said Connection: close


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
            loaded_before = reloads("success")
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
            loaded_before = reloads("success")
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
        # Every process has loaded the new pair (each reloads on its own tick): only
        # then does any connection, to whichever worker, get the new certificate.
        poll(lambda: reloads("success") >= loaded_before + server.workers, timeout=20,
             what="the new pair loaded by every process")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    assert all(serial(server.port, new_ca) != first for _ in range(4 * server.workers))


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


@pytest.mark.parametrize("how", ["pipelined", "expect-100-continue"])
def test_a_request_whose_body_never_comes_is_dropped_at_the_deadline_after_any_write(
        served, how):
    # The deadline runs from a request's first byte until keymount writes its answer.
    # Two writes are not that answer: "100 Continue", and the answer to the request
    # before a pipelined one. A body that never comes after either must still meet the
    # deadline, not hold its connection and handler for ever (a slowloris past it).
    server = served("--request-timeout", "1")
    body = server.body()
    with socket.create_connection(("127.0.0.1", server.port)) as raw, \
            server.context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        head = (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n")
        if how == "pipelined":
            tls.sendall(head % len(body) + b"\r\n" + body + head % 100 + b"\r\n{")
        else:
            tls.sendall(head % 100 + b"Expect: 100-continue\r\n\r\n")
        tls.settimeout(8)
        received = b""
        started = time.monotonic()
        try:
            while chunk := tls.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        except (ConnectionError, ssl.SSLError):  # dropped: aborted, or closed uncleanly
            pass
        waited = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 ")  # the answer, or 100 Continue, came first
    assert waited < 4, f"the connection was still open after {waited:.1f} s"
