"""A response whose body is produced while it is sent holds the route's
slots until it has been sent or the client has gone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fastapi
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from fastapi_concurrency_limiter import Limiter, Resource

from .conftest import eventually, serve

pytestmark = pytest.mark.anyio
FASTAPI_VERSION = tuple(int(p) for p in fastapi.__version__.split(".")[:2])
# FastAPI streams what a generator endpoint yields from 0.134 (JSON Lines);
# older versions refuse such a route when it is declared.
STREAMS_GENERATORS = FASTAPI_VERSION >= (0, 134)
needs_generator_endpoints = pytest.mark.skipif(
    not STREAMS_GENERATORS, reason="generator endpoints are streamed from FastAPI 0.134"
)


class StreamingApp:
    """Routes whose bodies stream until the test opens ``gate``."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.db = Resource(1, name="db", max_waiting=0)
        self.limiter = Limiter(timeout=30, resources=[self.db])
        self.gate = threading.Event()
        self.background_saw: list[int] = []

        async def chunks() -> AsyncIterator[bytes]:
            while not self.gate.is_set():
                yield b"chunk\n"
                await asyncio.sleep(0.01)
            yield b"end\n"

        @self.app.get("/stream")
        @self.limiter.resources([self.db])
        async def stream() -> StreamingResponse:
            return StreamingResponse(
                chunks(), background=BackgroundTask(self.saw_in_background)
            )

        if STREAMS_GENERATORS:
            self._generators()

        @self.app.get("/plain")
        @self.limiter.resources([self.db])
        async def plain() -> dict[str, int]:
            return {"ok": 1}

    async def saw_in_background(self) -> None:
        self.background_saw.append(self.db.in_use)

    def _generators(self) -> None:
        @self.app.get("/generator")
        @self.limiter.resources([self.db])
        async def generator() -> AsyncIterator[dict[str, int]]:
            i = 0
            while not self.gate.is_set():
                yield {"i": i}
                i += 1
                await asyncio.sleep(0.01)

        @self.app.get("/sync-generator")
        @self.limiter.resources([self.db])
        def sync_generator() -> Iterator[dict[str, int]]:
            i = 0
            while not self.gate.wait(0.01):
                yield {"i": i}
                i += 1


GENERATORS = [
    pytest.param("/generator", marks=needs_generator_endpoints),
    pytest.param("/sync-generator", marks=needs_generator_endpoints),
]


@pytest.mark.parametrize("path", ["/stream", *GENERATORS])
async def test_a_streaming_route_holds_its_slot_until_the_body_is_sent(path: str) -> None:
    s = StreamingApp()
    with serve(s.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("GET", path) as first:
                assert first.status_code == 200
                lines = first.aiter_lines()
                await lines.__anext__()  # streaming has begun
                # Still streaming: the slot is taken, the queue bound is 0.
                assert (await client.get("/plain")).status_code == 503
                assert s.db.in_use == 1
                s.gate.set()
                async for _ in lines:
                    pass
            await eventually(lambda: s.db.in_use == 0)
            assert (await client.get("/plain")).status_code == 200
    if path == "/stream":
        assert s.background_saw == [0]  # background tasks run without the slot


@pytest.mark.parametrize("path", ["/stream", GENERATORS[0]])
async def test_a_client_leaving_mid_stream_frees_the_slot(path: str) -> None:
    s = StreamingApp()
    with serve(s.app) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        await asyncio.wait_for(reader.readline(), timeout=10)  # a chunk arrived
        assert s.db.in_use == 1
        writer.close()
        await eventually(lambda: s.db.in_use == 0)
        s.gate.set()


async def test_file_response_holds_until_sent_and_complete_responses_release_on_return(
    tmp_path: Path,
) -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    path = tmp_path / "data.txt"
    path.write_bytes(b"file contents")

    @limiter.resources([db])
    async def file() -> FileResponse:
        return FileResponse(path)

    @limiter.resources([db])
    async def complete() -> JSONResponse:
        return JSONResponse({"ok": 1})

    response = await file()
    assert isinstance(response, FileResponse)
    assert db.in_use == 1  # the file is read while the response is sent
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "headers": [], "path": "/file"}
    await response(scope, receive, send)
    assert db.in_use == 0
    assert b"".join(m.get("body", b"") for m in sent) == b"file contents"

    assert isinstance(await complete(), JSONResponse)
    assert db.in_use == 0  # a complete body holds nothing while it is sent
