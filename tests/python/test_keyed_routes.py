"""key= on the decorator, the dependency and the ASGI wrapper: per-client
shares of a per_key resource."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, Request, WebSocket
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from fastapi_concurrency_limiter import Limiter, Resource

from .conftest import eventually, serve

pytestmark = pytest.mark.anyio


class Gate:
    def __init__(self, db: Resource) -> None:
        self.db = db
        self.open = threading.Event()

    async def work(self) -> dict[str, int]:
        while not self.open.is_set():
            await asyncio.sleep(0.005)
        return {"in_use": self.db.in_use}


def decorated_app(gate: Gate, limiter: Limiter) -> FastAPI:
    app = FastAPI()

    @app.get("/work")
    @limiter.resources([gate.db], key=lambda request: request.headers.get("x-api-key"))
    async def work() -> dict[str, int]:
        return await gate.work()

    return app


def dependency_app(gate: Gate, limiter: Limiter) -> FastAPI:
    async def current_user(x_api_key: str | None = Header(None)) -> str | None:
        return None if x_api_key is None else f"user-{x_api_key}"

    async def user_key(user: str | None = Depends(current_user)) -> str | None:
        return user

    app = FastAPI()
    router = APIRouter(dependencies=[Depends(limiter.dependency([gate.db], key=user_key))])

    @router.get("/work")
    async def work() -> dict[str, int]:
        return await gate.work()

    app.include_router(router)
    return app


def asgi_app(gate: Gate, limiter: Limiter) -> Starlette:
    async def work(request: Request) -> Response:
        return JSONResponse(await gate.work())

    async def key(connection: HTTPConnection) -> str | None:
        return connection.headers.get("x-api-key")

    limited = limiter.asgi([gate.db], key=key)(Route("/work", work))
    return Starlette(routes=[Route("/work", limited)])


@pytest.mark.parametrize(
    "make", [decorated_app, dependency_app, asgi_app], ids=["decorator", "dependency", "asgi"]
)
async def test_one_key_cannot_take_every_slot_of_a_real_server(make: Callable[..., Any]) -> None:
    db = Resource(3, name="db", per_key=1)
    limiter = Limiter(timeout=0.2, resources=[db])
    gate = Gate(db)
    with serve(make(gate, limiter)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = asyncio.ensure_future(client.get("/work", headers={"x-api-key": "a"}))
            await eventually(lambda: db.in_use == 1)
            # Key a is at its share: its next requests are turned away...
            greedy = await asyncio.gather(
                *[client.get("/work", headers={"x-api-key": "a"}) for _ in range(3)]
            )
            # ...while other keys (and requests without a key) still get in.
            others = [
                asyncio.ensure_future(client.get("/work", headers=headers))
                for headers in ({"x-api-key": "b"}, {})
            ]
            await eventually(lambda: db.in_use == 3)
            gate.open.set()
            served = await asyncio.gather(first, *others)
    assert [r.status_code for r in greedy] == [503] * 3
    assert [r.status_code for r in served] == [200] * 3
    assert db.statistics().rejected_total["key_limit"] == 3
    assert (db.in_use, db.waiting, db.statistics().active_keys) == (0, 0, 0)


async def test_a_key_over_its_share_waits_and_gets_the_slot_its_key_frees(asgi_client) -> None:  # type: ignore[no-untyped-def]
    db = Resource(2, name="db", per_key=1)
    limiter = Limiter(timeout=30, resources=[db])
    gate = Gate(db)
    async with asgi_client(decorated_app(gate, limiter)) as client:
        first = asyncio.ensure_future(client.get("/work", headers={"x-api-key": "a"}))
        await eventually(lambda: db.in_use == 1)
        second = asyncio.ensure_future(client.get("/work", headers={"x-api-key": "a"}))
        await eventually(lambda: db.waiting == 1)
        assert db.in_use == 1  # a free slot, but not for key a
        gate.open.set()
        assert [(await r).status_code for r in (first, second)] == [200, 200]


def test_key_without_a_per_key_resource_is_refused_at_start_up() -> None:
    db = Resource(2, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    for make in (limiter.resources, limiter.dependency, limiter.asgi):
        with pytest.raises(ValueError, match=r"key: none of the resources \['db'\]"):
            make([db], key=lambda request: "k")  # type: ignore[operator]


def test_key_that_is_not_callable_is_refused_at_start_up() -> None:
    db = Resource(2, name="db", per_key=1)
    limiter = Limiter(timeout=1, resources=[db])
    for make in (limiter.resources, limiter.dependency, limiter.asgi):
        with pytest.raises(TypeError, match="key must be a callable"):
            make([db], key="x-api-key")  # type: ignore[operator]


async def test_websocket_connections_are_limited_per_key() -> None:
    db = Resource(3, name="db", per_key=1)
    limiter = Limiter(timeout=0.05, resources=[db])
    app = FastAPI()

    @app.websocket("/ws")
    @limiter.resources([db], key=lambda websocket: websocket.headers.get("x-api-key"))
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()

    with serve(app) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url, additional_headers={"x-api-key": "a"}):
            try:  # refused: 503 where the server offers the denial response, else 1013
                refused = await connect(ws_url, additional_headers={"x-api-key": "a"})
            except InvalidStatus as e:
                assert e.response.status_code == 503
            else:
                with pytest.raises(ConnectionClosedError) as closed:
                    await refused.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            async with connect(ws_url, additional_headers={"x-api-key": "b"}):
                await eventually(lambda: db.in_use == 2)
    assert db.statistics().rejected_total["key_limit"] == 1
    await eventually(lambda: db.in_use == 0)
