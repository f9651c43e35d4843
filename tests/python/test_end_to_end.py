"""A real uvicorn server on 127.0.0.1 and real HTTP clients."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from fastapi import FastAPI, Request

from fastapi_concurrency_limiter import Limiter, Resource

from .conftest import eventually, serve

pytestmark = pytest.mark.anyio
BUSY = {"detail": "Server busy, please retry later"}


class App:
    def __init__(self, capacity: int, timeout: float, **resource_kwargs: object) -> None:
        self.app = FastAPI()
        self.db = Resource(capacity, name="db", **resource_kwargs)  # type: ignore[arg-type]
        self.limiter = Limiter(timeout=timeout, resources=[self.db])
        self.gate = threading.Event()  # set by the test: held handlers return
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.started = 0

        @self.app.get("/work")
        @self.limiter.resources([self.db])
        async def work(hold: float = 0.0) -> dict[str, int]:
            with self.lock:
                self.started += 1
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                if hold:
                    await asyncio.sleep(hold)
                else:
                    while not self.gate.is_set():
                        await asyncio.sleep(0.005)
            finally:
                with self.lock:
                    self.running -= 1
            return {"ok": 1}

        @self.app.post("/echo")
        @self.limiter.resources([self.db])
        async def echo(request: Request) -> object:
            return await request.json()


async def test_concurrent_clients_never_exceed_capacity() -> None:
    a = App(capacity=2, timeout=30)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            requests = [client.get("/work", params={"hold": 0.03}) for _ in range(12)]
            rs = await asyncio.gather(*requests)
    assert [r.status_code for r in rs] == [200] * 12
    assert a.peak == 2
    assert (a.db.in_use, a.db.waiting) == (0, 0)


async def test_clients_beyond_the_timeout_get_503_with_the_original_body() -> None:
    a = App(capacity=1, timeout=0.05)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            holder = asyncio.ensure_future(client.get("/work"))
            await eventually(lambda: a.db.in_use == 1)
            rs = await asyncio.gather(*[client.get("/work") for _ in range(5)])
            a.gate.set()
            assert (await holder).status_code == 200
    assert [r.status_code for r in rs] == [503] * 5
    assert all(r.json() == BUSY and r.headers["retry-after"] == "1" for r in rs)
    assert a.db.statistics().rejected_total["timeout"] == 5
    assert a.started == 1


async def test_full_queue_answers_at_once_while_the_slot_is_still_held() -> None:
    a = App(capacity=1, timeout=30, max_waiting=0)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            holder = asyncio.ensure_future(client.get("/work"))
            await eventually(lambda: a.db.in_use == 1)
            r = await client.get("/work")  # would wait 30 s without the bound
            assert r.status_code == 503 and r.json() == BUSY
            assert a.db.in_use == 1 and not holder.done()  # the holder still holds
            a.gate.set()
            await holder
    assert a.db.statistics().rejected_total["queue_full"] == 1


async def test_client_that_disconnects_while_waiting_leaves_the_queue() -> None:
    a = App(capacity=1, timeout=30)
    with serve(a.app) as url:
        host, port = url.removeprefix("http://").split(":")
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            holder = asyncio.ensure_future(client.get("/work"))
            await eventually(lambda: a.db.in_use == 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET /work HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            await eventually(lambda: a.db.waiting == 1)
            writer.close()  # the client gives up
            # It leaves the queue now, not when the slot frees up.
            await eventually(lambda: a.db.waiting == 0)
            assert a.db.in_use == 1
            assert a.db.statistics().rejected_total["disconnected"] == 1
            a.gate.set()
            assert (await holder).status_code == 200
    assert a.started == 1  # the disconnected request's handler never ran
    assert (a.db.in_use, a.db.waiting) == (0, 0)


async def test_post_whose_handler_reads_the_body_works_after_waiting() -> None:
    a = App(capacity=1, timeout=30)
    payload = {"message": "x" * 70_000, "n": [1, 2, 3]}  # several body chunks
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            holder = asyncio.ensure_future(client.get("/work"))
            await eventually(lambda: a.db.in_use == 1)
            post = asyncio.ensure_future(client.post("/echo", json=payload))
            await eventually(lambda: a.db.waiting == 1)
            a.gate.set()
            r = await post
            await holder
    assert r.status_code == 200
    assert r.json() == payload
