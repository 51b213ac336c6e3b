"""offload.ReadAhead: room for the bodies of large reviews read before their turn at the
worker, bounded in all; first come, first served; a slow sender yields its room."""

import asyncio

from webhook.offload import ReadAhead

from polling import wait_for


def pending(coro) -> asyncio.Task:
    return asyncio.ensure_future(coro)


async def test_room_is_never_given_past_the_budget():
    room = ReadAhead(10, slow=60)
    first = await room.reserve(6, drop=lambda: None)
    room.done_reading(first)  # read, waiting for the worker: not a slow sender
    second = pending(room.reserve(6, drop=lambda: None))
    await asyncio.sleep(0.05)
    assert not second.done() and room.used == 6
    room.release(first)
    await asyncio.wait_for(second, timeout=1)
    assert room.used == 6


async def test_release_gives_the_room_back_once():
    room = ReadAhead(10, slow=60)
    token = await room.reserve(4, drop=lambda: None)
    room.release(token)
    room.release(token)
    assert room.used == 0


async def test_a_reader_still_reading_after_slow_seconds_is_dropped_for_a_waiter():
    room = ReadAhead(10, slow=0.3)
    dropped = []
    slow = await room.reserve(8, drop=lambda: dropped.append("slow"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiter = pending(room.reserve(8, drop=lambda: None))
    await wait_for(lambda: dropped, what="the slow reader dropped")
    assert loop.time() - started >= 0.25  # not before it had its time
    assert not waiter.done()  # its room is free only once its handler gives it back
    room.release(slow)
    await asyncio.wait_for(waiter, timeout=1)


async def test_a_reader_is_not_dropped_while_nobody_waits():
    room = ReadAhead(10, slow=0.05)
    dropped = []
    await room.reserve(8, drop=lambda: dropped.append(1))
    await asyncio.sleep(0.2)
    await room.reserve(2, drop=lambda: None)  # fits: nobody needs the slow one's room
    assert dropped == []


async def test_waiters_get_room_in_the_order_they_came():
    room = ReadAhead(10, slow=60)
    held = await room.reserve(8, drop=lambda: None)
    room.done_reading(held)
    order = []

    async def take(name, size):
        token = await room.reserve(size, drop=lambda: None)
        order.append(name)
        return token

    big = pending(take("big", 8))
    await asyncio.sleep(0.01)
    small = pending(take("small", 2))  # fits beside held, but comes after big
    await asyncio.sleep(0.05)
    assert order == []
    room.release(held)
    await asyncio.wait_for(asyncio.gather(big, small), timeout=1)
    assert order == ["big", "small"]
