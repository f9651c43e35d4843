"""``def`` endpoints: wait on the event loop, run in the thread pool."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

from .conftest import eventually

pytestmark = pytest.mark.anyio
Client = Callable[[FastAPI], httpx.AsyncClient]


async def test_sync_endpoint_runs_in_a_worker_thread_and_releases(asgi_client: Client) -> None:
    app = FastAPI()
    db = Resource(1)
    limiter = Limiter(timeout=1, resources=[db])
    loop_thread = threading.get_ident()

    @app.get("/sync/{n}")
    @limiter.resources([db])
    def sync(n: int, q: str = "x") -> dict[str, object]:
        return {"n": n, "q": q, "on_loop": threading.get_ident() == loop_thread,
                "in_use": db.in_use}

    async with asgi_client(app) as client:
        r = await client.get("/sync/5", params={"q": "y"})
    assert r.json() == {"n": 5, "q": "y", "on_loop": False, "in_use": 1}
    assert db.in_use == 0


async def test_waiting_sync_requests_hold_no_thread_pool_thread(asgi_client: Client) -> None:
    """With 3 worker threads, 1 busy sync handler and 6 queued requests, an
    unrelated sync endpoint still gets a thread: queued requests wait on the
    event loop, not in the pool."""
    limiter_tokens = anyio.to_thread.current_default_thread_limiter()
    saved = limiter_tokens.total_tokens
    limiter_tokens.total_tokens = 3
    app = FastAPI()
    db = Resource(1)
    limiter = Limiter(timeout=30, resources=[db])
    release = threading.Event()

    @app.get("/slow")
    @limiter.resources([db])
    def slow() -> str:
        release.wait(30)
        return "slow"

    @app.get("/other")
    def other() -> str:
        return "other"

    try:
        async with asgi_client(app) as client:
            queued = [asyncio.ensure_future(client.get("/slow")) for _ in range(7)]
            await eventually(lambda: db.in_use == 1 and db.waiting == 6)
            r = await asyncio.wait_for(client.get("/other"), 10)
            assert r.json() == "other"
            release.set()
            statuses = [(await q).status_code for q in queued]
        assert statuses == [200] * 7
        assert db.in_use == 0
    finally:
        release.set()
        limiter_tokens.total_tokens = saved
