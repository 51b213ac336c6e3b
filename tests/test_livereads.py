"""Live reads: coalesced, reused, and limited so that nobody who reaches the port can
use up the reads a namespace keymount knows needs (webhook/livereads.py)."""

from __future__ import annotations

import asyncio

import pytest

from webhook.keys import Keyring
from webhook.livereads import LiveReads


class Reader:
    def __init__(self) -> None:
        self.reads: list[str] = []
        self.release = asyncio.Event()
        self.hold = False

    async def __call__(self, namespace: str) -> Keyring:
        self.reads.append(namespace)
        if self.hold:
            await self.release.wait()
        return Keyring(namespace)


def live(reader: Reader, clock: list[float], **kw) -> LiveReads:
    return LiveReads(reader, clock=lambda: clock[0], known=lambda ns: ns == "shop", **kw)


async def test_reviews_about_made_up_namespaces_cannot_use_up_a_known_namespaces_reads():
    reader, clock = Reader(), [0.0]
    reads = live(reader, clock, rate=0.0, burst=2)
    answers = [await reads.confirm(f"made-up-{i}") for i in range(50)]
    assert sum(a is not None for a in answers) == 2  # the shared bucket, then limited
    assert await reads.confirm("shop") is not None  # its own bucket is untouched


async def test_a_flood_about_a_known_namespace_costs_one_read_per_reuse_window():
    reader, clock = Reader(), [0.0]
    reads = live(reader, clock, namespace_rate=2.0, namespace_burst=4)
    for second in range(5):
        clock[0] = second * 1.01
        answers = [await reads.confirm("shop") for _ in range(100)]
        assert all(a is not None for a in answers)
    assert reader.reads == ["shop"] * 5


@pytest.mark.parametrize("earlier", ["in-flight", "finished"])
async def test_a_fresh_read_shares_nothing_with_an_earlier_one(earlier):
    reader, clock = Reader(), [0.0]
    reads = live(reader, clock)
    reader.hold = earlier == "in-flight"
    first = asyncio.create_task(reads.confirm("shop"))
    await asyncio.sleep(0)
    if earlier == "finished":
        await first
    reader.hold = False
    assert await reads.confirm("shop", fresh=True) is not None
    reader.release.set()
    await first
    assert reader.reads == ["shop", "shop"]


@pytest.mark.parametrize("namespace", ["shop", "new-namespace"],
                         ids=["known-namespace", "namespace-not-yet-cached"])
async def test_reads_judging_new_keys_never_use_up_the_reads_that_confirm_pods(namespace):
    # A key writer's restore costs one read per key: however many, a Pod's refusal in
    # that namespace (or in one the cache does not know yet) is still confirmed live.
    reader, clock = Reader(), [0.0]
    reads = live(reader, clock, rate=0.0, burst=3)
    keys = [await reads.confirm(namespace, fresh=True) for _ in range(10)]
    assert sum(k is not None for k in keys) == 3  # the key writers' budget, then limited
    assert await reads.confirm(namespace) is not None  # a Pod's budget is untouched
