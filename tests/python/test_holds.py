"""Who holds what: a shared ``limiter.acquire()`` object releases exactly
each entry's own slots, and a nested acquisition that could deadlock fails
at once instead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import anyio
import httpx
import pytest
from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

from .conftest import eventually

pytestmark = pytest.mark.anyio
Client = Callable[[FastAPI], httpx.AsyncClient]


async def test_shared_object_entered_by_a_generator_finalised_elsewhere_loses_no_slot() -> None:
    """The issue's scenario: T1 and a generator (driven by this task) enter
    one object; a third task finalises the abandoned generator."""
    db = Resource(2, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    shared = limiter.acquire([db])
    inside, leave = asyncio.Event(), asyncio.Event()

    async def t1() -> None:
        async with shared:
            inside.set()
            await leave.wait()

    first = asyncio.ensure_future(t1())
    await inside.wait()

    async def stream() -> AsyncIterator[int]:
        async with shared:
            yield 1
            yield 2

    abandoned = stream()
    assert await abandoned.__anext__() == 1
    assert db.in_use == 2
    await asyncio.ensure_future(abandoned.aclose())  # a third task
    assert db.in_use == 1  # the generator's slot went; T1 still holds its own
    leave.set()
    await first
    assert (db.in_use, db.waiting) == (0, 0)


async def test_nested_entries_of_one_generator_driven_by_different_tasks() -> None:
    db = Resource(3, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    shared = limiter.acquire([db])

    async def stream() -> AsyncIterator[int]:
        async with shared:
            yield 1
            async with shared:
                yield 2

    gen = stream()
    assert await asyncio.ensure_future(gen.__anext__()) == 1  # task A enters
    assert await asyncio.ensure_future(gen.__anext__()) == 2  # task B, nested
    assert db.in_use == 2
    await asyncio.ensure_future(gen.aclose())  # task C exits both
    assert (db.in_use, db.waiting) == (0, 0)


async def test_concurrent_entries_exit_in_any_order() -> None:
    db = Resource(4, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    shared = limiter.acquire([db])
    gates = [asyncio.Event() for _ in range(4)]
    entered = 0

    async def user(gate: asyncio.Event) -> None:
        nonlocal entered
        async with shared:
            entered += 1
            await gate.wait()

    tasks = [asyncio.ensure_future(user(g)) for g in gates]
    await eventually(lambda: entered == 4)
    for i, k in enumerate((2, 0, 3, 1)):  # not the order of entry
        gates[k].set()
        await tasks[k]
        assert db.in_use == 3 - i
    assert db.waiting == 0


async def test_route_that_acquires_its_own_resource_again_fails_at_once(
    asgi_client: Client,
) -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=None, resources=[db])  # the original: wait forever
    app = FastAPI()

    @app.get("/nested")
    @limiter.resources([db])
    async def nested() -> int:
        async with limiter.acquire([db]):
            return 1

    async with asgi_client(app) as client:
        with anyio.fail_after(10):  # hang guard: a deadlock would never return
            with pytest.raises(RuntimeError, match="'db'.*'db' again"):
                await client.get("/nested")
    assert (db.in_use, db.waiting) == (0, 0)


async def test_asking_for_an_earlier_resource_while_holding_a_later_one_fails() -> None:
    db, file = Resource(1, name="db"), Resource(1, name="file")
    limiter = Limiter(timeout=None, resources=[db, file])
    async with limiter.acquire([db]):
        async with limiter.acquire([file]):  # registration order: allowed
            assert (db.in_use, file.in_use) == (1, 1)
    async with limiter.acquire([file]):
        with anyio.fail_after(10):
            with pytest.raises(RuntimeError, match="holds a slot of resource 'file'.*'db'"):
                async with limiter.acquire([db]):
                    pass
    assert (db.in_use, file.in_use) == (0, 0)


async def test_two_limiters_with_opposite_orders_cannot_deadlock() -> None:
    a, b = Resource(1, name="a"), Resource(1, name="b")
    forward = Limiter(timeout=None, resources=[a, b])
    backward = Limiter(timeout=None, resources=[b, a])
    async with forward.acquire([a]):
        with pytest.raises(RuntimeError, match="'a'.*'b'"):
            async with backward.acquire([b]):
                pass
    # Taking both in one acquisition, in an order the other limiter
    # contradicts, is refused when the route is declared.
    with pytest.raises(ValueError, match="another Limiter registers 'a' before 'b'"):
        backward.acquire([b, a])
    assert (a.in_use, b.in_use) == (0, 0)


async def test_nested_resource_acquire_fails_at_once() -> None:
    db = Resource(1, name="db")
    await db.acquire()
    with anyio.fail_after(10):
        with pytest.raises(RuntimeError, match="'db'.*'db' again"):
            await db.acquire()
    db.release()
    assert db.in_use == 0


async def test_a_task_spawned_by_a_holder_may_wait_for_the_holder() -> None:
    """Holds are per task: a task started by a route does not inherit them."""
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    order: list[str] = []

    async def later() -> None:
        async with limiter.acquire([db]):
            order.append("child")

    async with limiter.acquire([db]):
        child = asyncio.ensure_future(later())
        await eventually(lambda: db.waiting == 1)
        order.append("parent")
    await child
    assert order == ["parent", "child"]
    async with limiter.acquire([db]):  # released holds no longer count
        pass


async def test_entries_made_through_async_exit_stacks_release_their_own_slots() -> None:
    """An AsyncExitStack enters and exits from different frames: each exit
    falls back to the newest entry of the exiting task."""
    db = Resource(2, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    shared = limiter.acquire([db])
    leave = [asyncio.Event(), asyncio.Event()]
    inside = 0

    async def user(k: int) -> None:
        nonlocal inside
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(shared)
            inside += 1
            await leave[k].wait()

    tasks = [asyncio.ensure_future(user(k)) for k in (0, 1)]
    await eventually(lambda: inside == 2)
    leave[1].set()
    await tasks[1]
    assert db.in_use == 1
    leave[0].set()
    await tasks[0]
    assert (db.in_use, db.waiting) == (0, 0)
