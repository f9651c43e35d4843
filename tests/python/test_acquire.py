"""``async with limiter.acquire(...)`` and the asyncio waiting glue under
cancellation."""

from __future__ import annotations

import asyncio
import random

import pytest

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy

from .conftest import eventually, held_elsewhere

pytestmark = pytest.mark.anyio


async def test_acquire_holds_for_the_block_and_times_out_with_server_busy() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=0.01, resources=[db])
    async with held_elsewhere(limiter, [db]):
        assert db.in_use == 1
        with pytest.raises(ServerBusy) as info:
            async with limiter.acquire([db]):
                pass
        assert (info.value.resource, info.value.reason) == ("db", "timeout")
        assert info.value.status_code == 503
    assert db.in_use == 0



async def test_zero_timeout_tries_once_and_never_pushes_a_waiter_out() -> None:
    """timeout=0 never joins the queue: with LIFO order and a full queue it
    must not push the real waiter out (it is rejected itself, at once)."""
    db = Resource(1, name="db", queue="lifo", max_waiting=1)
    limiter = Limiter(timeout=10, resources=[db])

    async def wait_for_a_slot() -> None:
        async with limiter.acquire([db]):
            pass

    async with held_elsewhere(limiter, [db]):
        waiter = asyncio.ensure_future(wait_for_a_slot())
        await eventually(lambda: db.waiting == 1)
        with pytest.raises(ServerBusy) as info:
            async with limiter.acquire([db], timeout=0):
                pass
        assert (info.value.resource, info.value.reason) == ("db", "timeout")
        assert db.waiting == 1
        assert not waiter.done()
    await waiter  # granted once the holder left, not pushed out

async def test_acquire_applies_the_order_rules() -> None:
    db, file = Resource(1), Resource(1)
    limiter = Limiter(timeout=1, resources=[db, file])
    with pytest.raises(ValueError, match="registration order"):
        limiter.acquire([file, db])


async def test_multi_resource_timeout_releases_what_was_taken() -> None:
    db, file = Resource(1, name="db"), Resource(1, name="file")
    limiter = Limiter(timeout=0.02, resources=[db, file])
    async with held_elsewhere(limiter, [file]):
        with pytest.raises(ServerBusy) as info:
            async with limiter.acquire([db, file]):
                pass
        assert info.value.resource == "file"
        assert db.in_use == 0  # taken on the way, given back
    assert (db.in_use, file.in_use, file.waiting) == (0, 0, 0)


async def test_granted_then_cancelled_waiter_passes_the_slot_on() -> None:
    """CPython gh-90155: a waiter woken by a release and cancelled before it
    runs must not take the slot with it."""
    db = Resource(1)
    limiter = Limiter(timeout=30, resources=[db])
    order: list[str] = []

    async def user(name: str) -> None:
        async with limiter.acquire([db]):
            order.append(name)

    holder = limiter.acquire([db])
    await holder.__aenter__()
    b = asyncio.ensure_future(user("b"))
    c = asyncio.ensure_future(user("c"))
    await eventually(lambda: db.waiting == 2)
    await holder.__aexit__(None, None, None)  # grants b...
    b.cancel()  # ...which is cancelled before it could run
    await asyncio.gather(b, return_exceptions=True)
    await c
    assert order == ["c"]
    assert (db.in_use, db.waiting) == (0, 0)


async def test_stress_random_cancellations_and_timeouts_leave_every_slot_free() -> None:
    rng = random.Random(1234)
    db = Resource(3, name="db")
    file = Resource(2, name="file", queue="lifo", max_waiting=20)
    cache = Resource(1, name="cache", queue="adaptive", adaptive_target=0.002,
                     adaptive_interval=0.002)
    limiter = Limiter(timeout=0.02, resources=[db, file, cache])
    combos = [[db], [file], [cache], [db, file], [db, cache], [file, cache], [db, file, cache]]
    holding = {r.name: 0 for r in (db, file, cache)}
    over_capacity: list[str] = []
    outcomes: dict[str, int] = {}

    async def user(resources: list[Resource]) -> None:
        try:
            async with limiter.acquire(resources, timeout=rng.choice([0, 0.001, 0.01, 0.05])):
                for r in resources:
                    holding[r.name] += 1
                    if holding[r.name] > r.capacity:
                        over_capacity.append(r.name)
                try:
                    await asyncio.sleep(rng.random() * 0.003)
                finally:
                    for r in resources:
                        holding[r.name] -= 1
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except ServerBusy as e:
            outcomes[e.reason] = outcomes.get(e.reason, 0) + 1

    tasks: list[asyncio.Task[None]] = []
    for _ in range(3000):
        tasks.append(asyncio.ensure_future(user(rng.choice(combos))))
        if rng.random() < 0.3:
            rng.choice(tasks).cancel()
        if rng.random() < 0.2:
            await asyncio.sleep(0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert not [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
    assert over_capacity == []
    assert outcomes.get("ok", 0) > 0 and outcomes.get("timeout", 0) > 0 and cancelled > 0
    for r in (db, file, cache):
        assert (r.in_use, r.waiting) == (0, 0), r
        s = r.statistics()
        assert s.peak_in_use <= s.capacity
        assert s.hold_seconds.count == s.acquired_total


async def test_waiting_tasks_nobody_refers_to_are_not_collected() -> None:
    # As with asyncio.Semaphore, a task waiting for a slot stays alive while
    # it waits, even when nothing but the limiter refers to it (a task made
    # with create_task and not kept): a garbage collection must not end the
    # wait, and every such task runs once the slot is free.
    import gc

    db = Resource(1, name="unreferenced-waiters")
    limiter = Limiter(timeout=None, resources=[db])
    ran: list[int] = []

    async def worker(i: int) -> None:
        async with limiter.acquire([db]):
            ran.append(i)

    async with limiter.acquire([db]):
        for i in range(50):
            asyncio.create_task(worker(i))  # noqa: RUF006 (the point of the test)
        await asyncio.sleep(0.01)
        gc.collect()
        assert db.waiting == 50
    for _ in range(200):
        if len(ran) == 50:
            break
        await asyncio.sleep(0.01)
    assert sorted(ran) == list(range(50))
    assert (db.in_use, db.waiting) == (0, 0)
