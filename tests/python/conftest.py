"""Shared fixtures: an in-process ASGI client and a real uvicorn server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def asgi_client() -> Callable[[FastAPI], httpx.AsyncClient]:
    """httpx client that calls the app in-process through ASGI."""

    def make(app: FastAPI) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Runs ``app`` under a real uvicorn server on 127.0.0.1 (in a thread
    with its own event loop) and yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Waits until ``predicate()`` holds (a hang guard, not a timing test)."""
    import anyio

    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


@asynccontextmanager
async def held_elsewhere(
    limiter: Limiter, resources: Sequence[Resource], timeout: float | None = None
) -> AsyncIterator[None]:
    """Holds slots of ``resources`` from another task for the body of the
    block (a task holding a slot may not itself wait for the same resource:
    that would be a deadlock, refused with RuntimeError)."""
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def holder() -> None:
        async with limiter.acquire(resources, timeout=timeout):
            entered.set()
            await leave.wait()

    task = asyncio.ensure_future(holder())
    await asyncio.wait([task, asyncio.ensure_future(entered.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what the holder raised
    try:
        yield
    finally:
        leave.set()
        await task
