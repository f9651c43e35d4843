"""Failure modes: threads, closed loops, misuse, disconnects mid-body, and
compatibility with the original package's low-level calls."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy, _core

from .conftest import eventually, held_elsewhere

pytestmark = pytest.mark.anyio
Client = Callable[[FastAPI], httpx.AsyncClient]


def test_two_event_loops_in_two_threads_share_a_resource() -> None:
    """Grants cross threads (call_soon_threadsafe); nothing hangs or leaks."""
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    done: list[int] = []

    def worker() -> None:
        async def main() -> None:
            for _ in range(300):
                async with limiter.acquire([db]):
                    await asyncio.sleep(0)
            done.append(1)

        asyncio.run(main())

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert len(done) == 3
    assert (db.in_use, db.waiting) == (0, 0)
    assert db.statistics().acquired_total == 900


def test_a_raising_completion_callback_is_reported_not_fatal() -> None:
    seen: list[BaseException | None] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda info: seen.append(info.exc_value)
    try:
        db = Resource(1)
        rset = _core.ResourceSet([db._core])
        holder = _core.Acquisition(rset)
        assert holder.try_acquire()
        waiter = _core.Acquisition(rset)
        assert waiter.start(lambda outcome: 1 / 0) is _core.Outcome.pending
        holder.release()  # grants the waiter, whose callback raises
    finally:
        sys.unraisablehook = old_hook
    assert isinstance(seen[0], ZeroDivisionError)
    assert db.in_use == 1  # the waiter holds its slot all the same
    waiter.release()
    assert db.in_use == 0


async def test_one_acquire_object_shared_by_concurrent_tasks_admits_capacity_only() -> None:
    db = Resource(2)
    limiter = Limiter(timeout=30, resources=[db])
    shared = limiter.acquire([db])  # e.g. kept in a module-level variable
    inside = 0
    peak = 0

    async def user() -> None:
        nonlocal inside, peak
        async with shared:
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(user() for _ in range(20)))
    assert peak == 2
    assert (db.in_use, db.waiting) == (0, 0)


async def test_event_loops_are_not_kept_alive() -> None:
    db = Resource(1)
    limiter = Limiter(timeout=5, resources=[db])

    def run_once() -> weakref.ref[asyncio.AbstractEventLoop]:
        loop = asyncio.new_event_loop()

        async def main() -> None:
            async with limiter.acquire([db]):
                other = asyncio.ensure_future(limiter.acquire([db]).__aenter__())
                await eventually(lambda: db.waiting == 1)
            await other  # waited, so this loop got a deadline timer
            other.result()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        return weakref.ref(loop)

    ref = await asyncio.to_thread(run_once)
    gc.collect()
    assert ref() is None


async def test_client_disconnecting_while_its_body_is_read_is_counted_not_an_error() -> None:
    app = FastAPI()
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    ran: list[int] = []

    @app.post("/upload")
    @limiter.resources([db])
    async def upload(request: Request) -> None:
        ran.append(1)

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}  # the client left mid-upload

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/upload", "raw_path": b"/upload",
        "query_string": b"", "root_path": "", "headers": [(b"content-length", b"10")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    async with held_elsewhere(limiter, [db]):  # the request has to wait
        await app(scope, receive, send)
    assert ran == []
    assert sent[0]["status"] == 503
    assert db.statistics().rejected_total["disconnected"] == 1
    assert (db.in_use, db.waiting) == (0, 0)


async def test_original_low_level_acquire_and_release_still_work() -> None:
    db = Resource(1)
    await db.acquire()
    assert db.in_use == 1
    waiter = asyncio.ensure_future(db.acquire())
    await eventually(lambda: db.waiting == 1)
    db.release()
    await waiter
    assert db.in_use == 1
    db.release()
    assert db.in_use == 0
    with pytest.raises(ValueError, match="without a matching acquire"):
        db.release()


async def test_limiter_timeout_is_assignable_and_none_waits_without_limit(
    asgi_client: Client,
) -> None:
    db = Resource(1)
    limiter = Limiter(timeout=None, resources=[db])
    app = FastAPI()

    @app.get("/q")
    @limiter.resources([db])
    async def q() -> int:
        return 1

    async with asgi_client(app) as client:
        async with held_elsewhere(limiter, [db]):
            waiting = asyncio.ensure_future(client.get("/q"))
            await eventually(lambda: db.waiting == 1)
            await asyncio.sleep(0.05)
            assert not waiting.done()  # no timeout: still waiting
        assert (await waiting).status_code == 200
        limiter.timeout = 0  # as in the original, routes read it per request
        async with held_elsewhere(limiter, [db]):
            assert (await client.get("/q")).status_code == 503
    with pytest.raises(ValueError, match="timeout"):
        limiter.timeout = -1


async def test_server_busy_carries_resource_and_reason_for_queue_full() -> None:
    db = Resource(1, name="db", max_waiting=0)
    limiter = Limiter(timeout=30, resources=[db])
    async with held_elsewhere(limiter, [db]):
        with pytest.raises(ServerBusy) as info:
            async with limiter.acquire([db]):
                pass
    assert (info.value.resource, info.value.reason) == ("db", "queue_full")
