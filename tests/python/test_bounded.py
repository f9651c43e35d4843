"""What an unkind client can make a waiting request cost: its body buffer
stops before the cap, and a long per_key key costs a bounded amount."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy, _core, _limiter, _waiting
from fastapi_concurrency_limiter._waiting import BODY_BUFFER_LIMIT

from .conftest import eventually, held_elsewhere, serve

pytestmark = pytest.mark.anyio
UPLOAD = 4 * 1024 * 1024


async def _upload_length(request: Request) -> JSONResponse:
    return JSONResponse({"length": len(await request.body())})


@pytest.mark.parametrize("chunk", [1000, 16 * 1024, 64_000, 64 * 1024])
async def test_a_waiting_upload_buffers_no_more_than_the_cap(chunk: int) -> None:
    db = Resource(1, name="uploads")
    limiter = Limiter(timeout=30, resources=[db])
    app = limiter.asgi([db])(Starlette(routes=[Route("/up", _upload_length, methods=["POST"])]))
    pulled = 0  # bytes the limiter took from the connection

    async def receive() -> Message:
        nonlocal pulled
        size = min(chunk, UPLOAD - pulled)
        pulled += size
        return {"type": "http.request", "body": b"x" * size, "more_body": pulled < UPLOAD}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/up", "headers": [], "query_string": b""}
    async with held_elsewhere(limiter, [db]):
        task = asyncio.ensure_future(app(scope, receive, send))
        await eventually(lambda: db.waiting == 1)
        for _ in range(20):  # the watcher has read all it will
            await asyncio.sleep(0)
        buffered_while_waiting = pulled
    await task
    assert 0 < buffered_while_waiting <= BODY_BUFFER_LIMIT
    assert sent[-1]["body"] == b'{"length":%d}' % UPLOAD  # nothing was lost


def test_waiting_uploads_over_a_real_server_buffer_the_cap_plus_at_most_one_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffered: list[tuple[int, int]] = []  # (bytes read, largest chunk)
    hand_back = _waiting._Body.hand_back

    def record(self: Any, request: Any) -> None:
        buffered.append((self._size, self._largest))
        hand_back(self, request)

    monkeypatch.setattr(_waiting._Body, "hand_back", record)
    db = Resource(1, name="real-uploads")
    limiter = Limiter(timeout=30, resources=[db])
    app = FastAPI()
    release = threading.Event()

    @app.post("/hold")
    @limiter.resources([db])
    def hold() -> None:
        release.wait(20)

    @app.post("/up")
    @limiter.resources([db])
    async def up(request: Request) -> dict[str, int]:
        return {"length": len(await request.body())}

    def chunks() -> Iterator[bytes]:
        for _ in range(UPLOAD // 64_000):
            yield b"x" * 64_000
        yield b"x" * (UPLOAD % 64_000)

    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        holder = threading.Thread(target=client.post, args=("/hold",))
        holder.start()
        results: list[int] = []
        uploaders = [
            threading.Thread(
                target=lambda: results.append(client.post("/up", content=chunks()).json()["length"])
            )
            for _ in range(3)
        ]
        for t in uploaders:
            t.start()
        deadline = 200
        while db.waiting < 3 and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        threading.Event().wait(0.3)
        release.set()
        for t in [holder, *uploaders]:
            t.join(30)
    assert results == [UPLOAD] * 3
    assert len(buffered) == 3
    for size, largest in buffered:
        assert size <= BODY_BUFFER_LIMIT + largest


def test_long_keys_are_hashed_before_they_reach_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str | None] = []

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(_core, name)

        @staticmethod
        def Acquisition(rset: Any, key: str | None = None) -> Any:  # noqa: N802
            seen.append(key)
            return _core.Acquisition(rset, key)

    monkeypatch.setattr(_limiter, "_core", Spy())
    db = Resource(4, name="long-keys", per_key=1)
    limiter = Limiter(timeout=0, resources=[db])

    async def main() -> None:
        prefix = "k" * 4096
        entered, leave = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with limiter.acquire([db], key=prefix + "a"):
                entered.set()
                await leave.wait()

        task = asyncio.ensure_future(holder())
        await entered.wait()
        # Another long key with the same first 4 KiB has a share of its own.
        async with limiter.acquire([db], key=prefix + "b"):
            pass
        # The same long key is at its share: turned away at once.
        with pytest.raises(ServerBusy) as busy:
            async with limiter.acquire([db], key=prefix + "a"):
                pass
        assert busy.value.reason == "key_limit"
        leave.set()
        await task
        async with limiter.acquire([db], key="short"):
            pass

    asyncio.run(main())
    assert all(k is not None and len(k.encode()) <= 256 for k in seen)
    assert seen[-1] == "short"
    assert seen[0] == seen[2] != seen[1]
