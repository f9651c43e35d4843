"""Limited WebSocket endpoints (decorator and ASGI wrapper) under a real
uvicorn with real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi import Depends, FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy

from .conftest import eventually, serve

pytestmark = pytest.mark.anyio
BUSY = {"detail": "Server busy, please retry later"}


async def _echo(websocket: WebSocket, db: Resource) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{db.in_use}:{text}")
    except Exception:
        pass


def fastapi_app(db: Resource, limiter: Limiter) -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws")
    @limiter.resources([db])
    async def ws(websocket: WebSocket) -> None:
        await _echo(websocket, db)

    return app


def starlette_app(db: Resource, limiter: Limiter) -> Starlette:
    async def ws(websocket: WebSocket) -> None:
        await _echo(websocket, db)

    return Starlette(routes=[WebSocketRoute("/ws", limiter.asgi([db])(WebSocketRoute("/ws", ws)))])


def without_denial_extension(app: Any) -> Any:
    """The app as a server without the WebSocket denial response sees it."""

    async def shim(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope = {**scope, "extensions": {}}
        await app(scope, receive, send)

    return shim


class Offers:
    """Records whether the server offers the WebSocket denial response
    (recent uvicorn does; 0.23 does not)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.denial: bool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            self.denial = "websocket.http.response" in (scope.get("extensions") or {})
        await self.app(scope, receive, send)

    def require_denial(self) -> None:
        if not self.denial:
            pytest.skip("this uvicorn does not offer the WebSocket denial response")


async def _say(ws: ClientConnection, text: str) -> str:
    await ws.send(text)
    return str(await ws.recv())


@pytest.mark.parametrize("make", [fastapi_app, starlette_app], ids=["decorator", "asgi"])
async def test_connections_hold_slots_for_their_life_and_extra_ones_get_503(make) -> None:  # type: ignore[no-untyped-def]
    db = Resource(2, name="db")
    limiter = Limiter(timeout=0.1, resources=[db])
    app = Offers(make(db, limiter))
    with serve(app) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        first, second = await asyncio.gather(connect(ws_url), connect(ws_url))
        app.require_denial()
        assert await asyncio.gather(_say(first, "a"), _say(second, "b")) == ["2:a", "2:b"]
        refused = await asyncio.gather(
            *[connect(ws_url) for _ in range(3)], return_exceptions=True
        )
        for e in refused:
            assert isinstance(e, InvalidStatus), e
            assert e.response.status_code == 503
            assert json.loads(e.response.body) == BUSY
            assert e.response.headers["Retry-After"] == "1"
        await first.close()
        await eventually(lambda: db.in_use == 1)
        async with connect(ws_url) as third:  # the freed slot is usable
            assert await _say(third, "c") == "2:c"
        await second.close()
    await eventually(lambda: db.in_use == 0)
    assert db.statistics().rejected_total["timeout"] == 3


@pytest.mark.parametrize("make", [fastapi_app, starlette_app], ids=["decorator", "asgi"])
async def test_without_the_denial_extension_a_refused_connection_is_closed_with_1013(make) -> None:  # type: ignore[no-untyped-def]
    db = Resource(1, name="db")
    limiter = Limiter(timeout=0.05, resources=[db])
    with serve(without_denial_extension(make(db, limiter))) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as holder:
            assert await _say(holder, "a") == "1:a"
            async with connect(ws_url) as refused:
                with pytest.raises(ConnectionClosedError) as closed:
                    await refused.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert await _say(holder, "b") == "1:b"  # the holder is unaffected
    await eventually(lambda: db.in_use == 0)


async def test_waiting_connection_gets_the_slot_when_one_frees_up() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    with serve(fastapi_app(db, limiter)) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        holder = await connect(ws_url)
        waiter = asyncio.ensure_future(connect(ws_url))
        await eventually(lambda: db.waiting == 1)
        assert not waiter.done()  # not accepted while it waits
        await holder.close()
        async with await waiter as ws:
            assert await _say(ws, "x") == "1:x"
    await eventually(lambda: (db.in_use, db.waiting) == (0, 0))


@pytest.mark.parametrize("make", [fastapi_app, starlette_app], ids=["decorator", "asgi"])
async def test_websocket_refusal_is_the_apps_server_busy_handlers_response(make) -> None:  # type: ignore[no-untyped-def]
    db = Resource(1, name="db")
    limiter = Limiter(timeout=0, resources=[db])
    limited = make(db, limiter)

    async def busy(connection: object, exc: ServerBusy) -> JSONResponse:
        return JSONResponse({"custom": exc.reason}, status_code=429)

    limited.add_exception_handler(ServerBusy, busy)
    app = Offers(limited)
    with serve(app) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as first:
            app.require_denial()
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url)
            assert await _say(first, "x") == "1:x"
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body) == {"custom": "timeout"}
    await eventually(lambda: db.in_use == 0)


async def test_websocket_refusal_uses_the_limiters_status_and_detail() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=0, resources=[db], status_code=429, detail="slow down")
    app = Offers(fastapi_app(db, limiter))
    with serve(app) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url):
            app.require_denial()
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url)
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body) == {"detail": "slow down"}


@pytest.mark.parametrize("make", [fastapi_app, starlette_app], ids=["decorator", "asgi"])
async def test_client_that_leaves_while_waiting_leaves_the_queue(make) -> None:  # type: ignore[no-untyped-def]
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    with serve(make(db, limiter)) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as holder:
            waiter = asyncio.ensure_future(connect(ws_url))
            await eventually(lambda: db.waiting == 1)
            waiter.cancel()  # the client gives up during the handshake
            await eventually(lambda: db.waiting == 0)
            assert db.statistics().rejected_total["disconnected"] == 1
            assert await _say(holder, "a") == "1:a"
    await eventually(lambda: db.in_use == 0)


async def test_app_wide_dependency_limits_websocket_routes_too() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=0.05, resources=[db])
    app = FastAPI(dependencies=[Depends(limiter.dependency([db]))])

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await _echo(websocket, db)

    with serve(app) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as holder:
            assert await _say(holder, "a") == "1:a"  # held for the connection's life
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url)
            assert refused.value.response.status_code == 403
    await eventually(lambda: db.in_use == 0)
    assert db.statistics().rejected_total["timeout"] == 1
