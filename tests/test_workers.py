"""`keymount serve --workers N`: the supervisor's readiness, metrics, drain and failure
handling (docs/operations.md, "Workers")."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from webhook.workers import merge_metrics, worker_argv

from polling import poll
from served import Served

WORKER_A = """# HELP keymount_admission_requests_total Admission requests by webhook and result
# TYPE keymount_admission_requests_total counter
keymount_admission_requests_total{result="injected",webhook="mutate"} 3.0
# HELP keymount_cache_ready 1 once the first full list of key Secrets is in
# TYPE keymount_cache_ready gauge
keymount_cache_ready 1.0
# HELP keymount_admission_duration_seconds Time to answer
# TYPE keymount_admission_duration_seconds histogram
keymount_admission_duration_seconds_bucket{le="0.001",webhook="mutate"} 2.0
keymount_admission_duration_seconds_bucket{le="+Inf",webhook="mutate"} 3.0
keymount_admission_duration_seconds_count{webhook="mutate"} 3.0
keymount_admission_duration_seconds_sum{webhook="mutate"} 0.004
"""
WORKER_B = """# HELP keymount_admission_requests_total Admission requests by webhook and result
# TYPE keymount_admission_requests_total counter
keymount_admission_requests_total{result="injected",webhook="mutate"} 5.0
# HELP keymount_newest_key_age_seconds Age of the newest valid key
# TYPE keymount_newest_key_age_seconds gauge
keymount_newest_key_age_seconds{namespace="a\\"b"} 7.0
"""


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_merged_metrics_keep_every_sample_labelled_with_its_worker():
    merged = merge_metrics([WORKER_A, WORKER_B]).decode()
    got = samples(merged)
    assert got[("keymount_admission_requests_total",
                (("result", "injected"), ("webhook", "mutate"), ("worker", "0")))] == 3.0
    assert got[("keymount_admission_requests_total",
                (("result", "injected"), ("webhook", "mutate"), ("worker", "1")))] == 5.0
    assert got[("keymount_cache_ready", (("worker", "0"),))] == 1.0
    assert got[("keymount_admission_duration_seconds_bucket",
                (("le", "+Inf"), ("webhook", "mutate"), ("worker", "0")))] == 3.0
    assert got[("keymount_newest_key_age_seconds",
                (("namespace", 'a"b'), ("worker", "1")))] == 7.0
    # Each family is declared once, however many workers report it.
    assert merged.count("# TYPE keymount_admission_requests_total counter") == 1
    assert len(got) == len(samples(WORKER_A)) + len(samples(WORKER_B))


def test_a_worker_that_did_not_answer_the_scrape_adds_nothing():
    assert samples(merge_metrics(["", WORKER_B]).decode()) == {
        (name, tuple(sorted({**dict(labels), "worker": "1"}.items()))): value
        for (name, labels), value in samples(WORKER_B).items()}


def test_a_worker_runs_serve_with_the_supervisors_flags_and_the_last_word_on_its_own():
    argv = worker_argv(["serve", "--port", "9443", "--workers", "4"], report_fd=7, index=2,
                       supervisor=4242)
    assert argv[:3] == [sys.executable, "-m", "webhook"]
    assert argv[3:] == ["serve", "--port", "9443", "--workers", "4", "--workers", "1",
                        "--worker-report-fd", "7", "--worker-index", "2",
                        "--worker-supervisor", "4242"]


# --- the supervisor as a process ----------------------------------------------------

def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.fixture
def two_workers(tmp_path):
    servers: list[Served] = []

    def start(wait: bool = True) -> Served:
        server = Served(tmp_path / f"s{len(servers)}", "--shutdown-grace", "1", workers=2,
                        wait=wait)
        servers.append(server)
        return server
    yield start
    for server in servers:
        workers = server.pids()[1:] if server.proc.poll() is None else []
        server.stop()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def worker_pids(server: Served, count: int = 2) -> list[int]:
    """The workers' pids, once each runs the worker's command line. A child caught
    between fork and exec is not a worker yet: stopped there, it would hold up the
    supervisor's spawn (libuv waits for the exec), not the worker's start."""
    def workers() -> list[int] | None:
        pids = server.pids()[1:]
        if len(pids) != count:
            return None
        try:
            if all(b"--worker-report-fd" in Path(f"/proc/{pid}/cmdline").read_bytes()
                   for pid in pids):
                return pids
        except OSError:
            pass
        return None
    return poll(workers, timeout=10, what=f"{count} workers started")


def test_both_workers_answer_and_each_reports_its_own_metrics(two_workers):
    server = two_workers()
    for _ in range(40):  # new connections: the kernel spreads them over the workers
        conn = server.connection()
        status, answer = server.post(conn)
        assert status == 200 and answer["response"]["allowed"] is True
        conn.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.probe}/metrics", timeout=10) as resp:
        per_worker = {labels: value for (name, labels), value in
                      samples(resp.read().decode()).items()
                      if name == "keymount_admission_requests_total"}
    assert {dict(labels)["worker"] for labels in per_worker} == {"0", "1"}
    assert sum(per_worker.values()) == 40


def test_readyz_waits_until_every_worker_has_listed_its_keys(two_workers):
    server = two_workers(wait=False)
    held = worker_pids(server)[1]
    # Held before it can list its keys (starting Python takes it about a second).
    os.kill(held, signal.SIGSTOP)
    try:
        poll(lambda: '"msg":"worker ready"' in server.logs(), timeout=20,
             what="the other worker ready")
        if server.ready():
            pytest.skip("the held worker was ready before SIGSTOP reached it")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert not server.ready(), "ready while a worker has not listed its keys"
            time.sleep(0.1)
    finally:
        os.kill(held, signal.SIGCONT)
    poll(server.ready, timeout=20, what="ready once both workers are")


def test_sigterm_drains_every_worker_and_exits_0(two_workers):
    server = two_workers()
    workers = worker_pids(server)
    assert server.stop() == 0
    assert not any(alive(pid) for pid in workers)
    assert server.logs().count('"msg":"stopped"') == 2  # each worker drained and stopped


def test_a_worker_that_dies_takes_the_others_down_and_the_supervisor_exits_1(two_workers):
    server = two_workers()
    first, second = worker_pids(server)
    os.kill(first, signal.SIGKILL)
    assert server.proc.wait(30) == 1
    assert not alive(second)
    assert "a worker exited on its own" in server.logs()


def test_workers_stop_when_the_supervisor_is_killed(two_workers):
    # SIGKILL (the OOM killer, `kill -9`, a test harness's last resort) gives the
    # supervisor no chance to pass SIGTERM on. Outside a container's PID namespace its
    # workers lived on, still answering on the shared port with SO_REUSEPORT beside
    # whatever started next, and a test run left them behind.
    server = two_workers()
    workers = worker_pids(server)
    server.proc.kill()
    server.proc.wait(10)
    poll(lambda: not any(alive(pid) for pid in workers), timeout=30,
         what="the workers gone after their supervisor was killed")


def test_the_review_worker_ends_when_the_server_is_killed(tmp_path):
    # The review worker (webhook/offload.py, spawned at start) used to outlive a server
    # killed with SIGKILL, holding its memory, with multiprocessing's resource tracker.
    server = Served(tmp_path)

    def children() -> list[int] | None:
        pids = server.pids()[1:]
        return pids if any(b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
                           for pid in pids) else None
    spawned = poll(children, timeout=20, what="the review worker started")
    try:
        server.proc.kill()
        server.proc.wait(10)
        poll(lambda: not any(alive(pid) for pid in spawned), timeout=30,
             what="the review worker and resource tracker gone after the server was killed")
    finally:
        server.stop()
        for pid in spawned:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
