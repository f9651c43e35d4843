"""Admission is decided before a request's body is read, and a waiting
request reads at most a bounded part of it; real uvicorn, raw sockets."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
from fastapi import FastAPI, Request

from fastapi_concurrency_limiter import Limiter, Resource

from .conftest import eventually, held_elsewhere, serve

pytestmark = pytest.mark.anyio


def upload_app(**resource_kwargs: object) -> tuple[FastAPI, Limiter, Resource]:
    app = FastAPI()
    db = Resource(1, name="db", **resource_kwargs)  # type: ignore[arg-type]
    limiter = Limiter(timeout=30, resources=[db])

    @app.post("/upload")
    @limiter.resources([db])
    async def upload(request: Request) -> dict[str, object]:
        body = await request.body()
        return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    @app.post("/upload-now")
    @limiter.resources([db], timeout=0)
    async def upload_now(request: Request) -> int:
        return len(await request.body())

    return app, limiter, db


@pytest.mark.parametrize(
    ("path", "resource_kwargs"),
    [("/upload", {"max_waiting": 0}), ("/upload-now", {})],
    ids=["queue_full", "timeout=0"],
)
async def test_a_request_turned_away_at_once_gets_503_before_its_body_is_sent(
    path: str, resource_kwargs: dict[str, object]
) -> None:
    app, limiter, db = upload_app(**resource_kwargs)
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        async with held_elsewhere(limiter, [db]):
            reader, writer = await asyncio.open_connection(host, int(port))
            # Announces 50 MB, sends 1 KB of it, then stalls.
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/octet-stream\r\n"
                f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode() + b"x" * 1024
            )
            await writer.drain()
            # Hang guard: the server would otherwise wait for the 50 MB.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            assert head.startswith(b"HTTP/1.1 503 ")
            writer.close()
    assert db.statistics().rejected_total[
        "queue_full" if path == "/upload" else "timeout"
    ] == 1


async def test_a_request_queues_before_its_body_has_arrived() -> None:
    app, limiter, db = upload_app()
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        async with held_elsewhere(limiter, [db]):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"POST /upload HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode() + b"x" * 1024
            )
            await writer.drain()
            # In the queue while the client is stalled mid-body.
            await eventually(lambda: db.waiting == 1)
            writer.close()  # the client gives up; the waiter leaves the queue
            await eventually(lambda: db.waiting == 0)
    assert db.statistics().rejected_total["disconnected"] == 1


async def test_a_waiting_upload_larger_than_the_buffer_reaches_the_handler_whole() -> None:
    app, limiter, db = upload_app()
    body = bytes(range(256)) * 4096 * 3  # 3 MB, far beyond what a waiter buffers
    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with held_elsewhere(limiter, [db]):
                post = asyncio.ensure_future(client.post("/upload", content=body))
                await eventually(lambda: db.waiting == 1)
                await asyncio.sleep(0.05)  # let the watcher read what it may
            r = await post
    assert r.status_code == 200
    assert r.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


async def test_a_waiting_get_and_a_waiting_json_post_are_served() -> None:
    app = FastAPI()
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])

    @app.get("/item")
    @limiter.resources([db])
    async def item(q: int) -> int:
        return q

    @app.post("/echo")
    @limiter.resources([db])
    async def echo(request: Request) -> object:
        return await request.json()

    payload = {"message": "x" * 200_000}
    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with held_elsewhere(limiter, [db]):
                get = asyncio.ensure_future(client.get("/item", params={"q": 7}))
                post = asyncio.ensure_future(client.post("/echo", json=payload))
                await eventually(lambda: db.waiting == 2)
            assert (await get).json() == 7
            assert (await post).json() == payload
    assert (db.in_use, db.waiting) == (0, 0)
