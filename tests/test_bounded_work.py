"""keymount's work on a request is bounded by the request's size, never by what its
values spell (docs/architecture.md, "Bounded work"): a tenant who may only create
Secrets must not be able to stall the webhook that every backend Pod and key Secret
waits for."""

from __future__ import annotations

import json
import threading
import time

import pytest

from builders import key_secret, random_key, review
from served import Served

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

# 150 ranges of 100,000 numbers, ~2.5 KB: built as a set of ints, 15 million of them
# (2.3 GB and many seconds on the event loop in keymount 0.2).
HUGE_NUMBERS = ",".join(f"{i * 200_000 + 1}-{i * 200_000 + 100_000}" for i in range(150))


def hostile_secret_review() -> bytes:
    secret = key_secret("planted", random_key(), namespace="default", index=1,
                        annotations={"keymount.io/numbers-used": HUGE_NUMBERS})
    return json.dumps(review(secret, kind="Secret", namespace="default", dry_run=True,
                             username="tenant")).encode()


@pytest.fixture
def server(tmp_path):
    served = Served(tmp_path)
    yield served
    served.stop()


def test_a_key_secret_spelling_millions_of_numbers_is_answered_at_once_without_memory(
        server):
    baseline = server.memory_mib("VmRSS")
    hostile = hostile_secret_review()
    stop = threading.Event()
    bystander: list[float] = []

    def ordinary_reviews() -> None:
        conn = server.connection()
        while not stop.is_set():
            started = time.perf_counter()
            status, answer = server.post(conn)
            assert status == 200 and answer["response"]["allowed"] is True
            bystander.append(time.perf_counter() - started)
    thread = threading.Thread(target=ordinary_reviews)
    thread.start()
    try:
        conn = server.connection()
        hostile_latencies = []
        for path in ("/mutate", "/validate") * 5:
            started = time.perf_counter()
            status, answer = server.post(conn, hostile, path=path)
            hostile_latencies.append(time.perf_counter() - started)
            assert status == 200 and answer["response"]["uid"] == "0f6a2b1e-uid"
    finally:
        stop.set()
        thread.join(30)
    growth = server.memory_mib("VmHWM") - baseline
    print(f"\nhostile reviews: max {max(hostile_latencies) * 1000:.1f} ms; ordinary "
          f"reviews meanwhile: max {max(bystander) * 1000:.1f} ms over {len(bystander)}; "
          f"peak RSS growth {growth:.1f} MiB")
    assert max(hostile_latencies) < 1.0
    assert bystander and max(bystander) < 0.5
    assert growth < 100
