"""Shared fixtures: an in-process ASGI client and a real uvicorn server."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource


def pytest_unconfigure(config: pytest.Config) -> None:
    """Removes Hypothesis's garbage collector callback at the end of the run.

    Hypothesis (hypothesis.internal.conjecture.junkdrawer.gc_cumulative_time)
    adds a callback to gc.callbacks, which the interpreter empties only
    after its last collection at exit. Through the callback's module
    globals (whose ``__loader__`` is pytest's assertion-rewriting hook,
    since pytest rewrites the modules of the plugins it loads) it keeps
    pytest's config, session and every collected test alive past that
    collection: their parameters, the frames in the tracebacks that those
    hold, and so every Resource and Limiter that a test touched.
    nanobind then reports them all as leaked at exit. Nothing of this
    package is involved (a parametrized test with a plain Python object
    shows the same). The callback only times collections, which Hypothesis
    leaves out of its test cases' durations; no test case runs after this.
    """
    module = "hypothesis.internal.conjecture.junkdrawer"
    gc.callbacks[:] = [cb for cb in gc.callbacks if getattr(cb, "__module__", None) != module]
    junkdrawer = sys.modules.get(module)
    if junkdrawer is not None and hasattr(junkdrawer, "_gc_initialized"):
        # A later Hypothesis run in this process (pytest.main again) installs
        # its callback anew instead of timing collections no more.
        junkdrawer._gc_initialized = False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def asgi_client() -> Callable[[FastAPI], httpx.AsyncClient]:
    """httpx client that calls the app in-process through ASGI."""

    def make(app: FastAPI) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")

    return make


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: FastAPI, host: str = "127.0.0.1", **options: Any) -> Iterator[str]:
    """Runs ``app`` under a real uvicorn server on ``host`` (in a thread
    with its own event loop) and yields its base URL. ``options``: more
    ``uvicorn.Config`` settings (proxy headers...)."""
    config = uvicorn.Config(
        app, host=host, port=_free_port(host), log_level="warning", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{config.port}"
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


@pytest.fixture(params=["process", "host"])
def scope_and_name(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """Each scope; a host resource gets a fresh name, and its shared segment
    (which outlives the process) is removed afterwards."""
    if request.param == "process":
        yield "process", "db"
        return
    name = f"py{os.getpid()}-early-{time.monotonic_ns() % 10**9}"
    yield "host", name
    shm = Path(os.environ.get("FCL_HOST_DIR") or f"/dev/shm/fcl-host.{os.getuid()}") / name
    shm.unlink(missing_ok=True)
