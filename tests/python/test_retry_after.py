"""An early refusal (reason ``predicted_timeout``) tells its client to stay
away as long as the queue it would have joined needs, whichever entry point
refused it: ``Retry-After`` is the predicted wait, rounded up, plus the
limiter's ``retry_after``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, WebSocket

from fastapi_concurrency_limiter import Limiter, Priority, Resource, ServerBusy
from fastapi_concurrency_limiter._errors import RETRY_AFTER_CAP, Rejection

from .conftest import eventually, held_elsewhere

pytestmark = pytest.mark.anyio

TEN_AHEAD = 10


def _app(limiter: Limiter, db: Resource) -> FastAPI:
    app = FastAPI()

    @app.get("/work")
    @limiter.resources([db])
    async def work(hold: float = 0.0) -> dict[str, int]:
        await asyncio.sleep(hold)
        return {"ok": 1}

    @app.get("/patient")
    @limiter.resources([db], timeout=60)
    async def patient() -> dict[str, int]:
        return {"ok": 1}

    return app


async def _behind_a_queue(
    app: FastAPI,
    limiter: Limiter,
    db: Resource,
    probe: Callable[[httpx.AsyncClient], Awaitable[Any]],
    retry_after: int = 2,
) -> tuple[Any, int]:
    """Teaches ``db`` a service time of >= 0.3 s, queues ten patient
    requests behind a held slot, runs ``probe``; returns what it returned and
    the Retry-After expected with the limiter's ``retry_after``: the ten's
    predicted wait, rounded up, plus it."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        assert (await client.get("/work", params={"hold": 0.3})).status_code == 200
        async with held_elsewhere(limiter, [db]):
            waiting = [asyncio.create_task(client.get("/patient")) for _ in range(TEN_AHEAD)]
            await eventually(lambda: db.waiting == TEN_AHEAD)
            estimate = db.statistics().service_seconds
            assert estimate is not None and estimate >= 0.3
            result = await probe(client)
        assert all(w.status_code == 200 for w in await asyncio.gather(*waiting))
    assert db.statistics().rejected_total["predicted_timeout"] == 1
    assert (db.in_use, db.waiting) == (0, 0)
    return result, math.ceil(TEN_AHEAD * estimate) + retry_after


@pytest.mark.parametrize("entry", ["sync", "dependency", "router", "asgi", "status_429"])
async def test_every_http_entry_point_sends_the_predicted_wait(entry: str) -> None:
    db = Resource(1, name="db", early_reject=True)
    options: dict[str, Any] = (
        {"status_code": 429, "detail": "slow down"} if entry == "status_429" else {}
    )
    limiter = Limiter(timeout=0.1, resources=[db], retry_after=2, **options)
    app = _app(limiter, db)
    if entry in ("sync", "status_429"):

        @app.get("/probe")
        @limiter.resources([db])
        def probe_sync() -> dict[str, int]:
            return {"ok": 1}

    elif entry == "dependency":

        @app.get("/probe", dependencies=[Depends(limiter.dependency([db]))])
        async def probe_dependency() -> dict[str, int]:
            return {"ok": 1}

    elif entry == "router":
        router = APIRouter(dependencies=[Depends(limiter.dependency([db]))])

        @router.get("/probe")
        async def probe_router() -> dict[str, int]:
            return {"ok": 1}

        app.include_router(router)
    else:
        inner = FastAPI()

        @inner.get("/")
        async def probe_inner() -> dict[str, int]:
            return {"ok": 1}

        app.mount("/probe", limiter.asgi([db])(inner))
    path = "/probe/" if entry == "asgi" else "/probe"
    r, expected = await _behind_a_queue(app, limiter, db, lambda client: client.get(path))
    assert r.status_code == (429 if entry == "status_429" else 503)
    assert r.headers["retry-after"] == str(expected)


async def test_limiter_acquire_raises_it_on_server_busy() -> None:
    db = Resource(1, name="db", early_reject=True)
    limiter = Limiter(timeout=0.1, resources=[db], retry_after=2)

    async def probe(client: httpx.AsyncClient) -> ServerBusy:
        with pytest.raises(ServerBusy) as refused:
            async with limiter.acquire([db]):
                pass
        return refused.value

    busy, expected = await _behind_a_queue(_app(limiter, db), limiter, db, probe)
    assert (busy.reason, busy.retry_after) == ("predicted_timeout", expected)
    assert busy.headers == {"Retry-After": str(expected)}


async def test_a_websocket_refusal_sends_it_in_its_denial_response() -> None:
    db = Resource(1, name="db", early_reject=True)
    limiter = Limiter(timeout=0.1, resources=[db], retry_after=2)
    app = _app(limiter, db)

    @app.websocket("/ws")
    @limiter.resources([db])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    sent: list[dict[str, Any]] = []

    async def connect(client: httpx.AsyncClient) -> None:
        scope = {
            "type": "websocket",
            "path": "/ws",
            "raw_path": b"/ws",
            "root_path": "",
            "scheme": "ws",
            "query_string": b"",
            "headers": [(b"host", b"app")],
            "client": ("127.0.0.1", 1),
            "server": ("app", 80),
            "subprotocols": [],
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "extensions": {"websocket.http.response": {}},
        }
        messages = [{"type": "websocket.connect"}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            return {"type": "websocket.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)

    _, expected = await _behind_a_queue(app, limiter, db, connect)
    start = next(m for m in sent if m["type"] == "websocket.http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert (start["status"], headers["retry-after"]) == (503, str(expected))


async def test_a_later_resource_that_refuses_after_a_wait_sends_its_own_prediction() -> None:
    # The request waits for `first`, then `db` refuses it from its queue.
    first = Resource(1, name="first")
    db = Resource(1, name="db", early_reject=True)
    limiter = Limiter(timeout=1.0, resources=[first, db], retry_after=2)
    app = _app(limiter, db)

    @app.get("/probe")
    @limiter.resources([first, db])
    async def probe() -> dict[str, int]:
        return {"ok": 1}

    async def after_first(client: httpx.AsyncClient) -> httpx.Response:
        leave = asyncio.Event()

        async def hold_first() -> None:
            async with limiter.acquire([first]):
                await leave.wait()

        holder = asyncio.create_task(hold_first())
        await eventually(lambda: first.in_use == 1)
        request = asyncio.create_task(client.get("/probe"))
        await eventually(lambda: first.waiting == 1)
        leave.set()
        await holder
        return await request

    r, expected = await _behind_a_queue(app, limiter, db, after_first)
    assert r.status_code == 503
    assert r.headers["retry-after"] == str(expected)
    assert (first.in_use, first.waiting) == (0, 0)


@pytest.mark.parametrize("retry_after", [1, 30, None])
async def test_an_early_refusal_asks_the_client_to_stay_away_as_long_as_it_would_have_waited(
    scope_and_name: tuple[str, str], retry_after: int | None
) -> None:
    # A client told to retry in 1 s would meet the same queue: it is told the
    # predicted wait plus the limiter's retry_after, and no header stays no
    # header.
    scope, name = scope_and_name
    db = Resource(1, name=name, scope=scope, early_reject=True)  # type: ignore[arg-type]
    limiter = Limiter(timeout=0.1, resources=[db], retry_after=retry_after)
    r, expected = await _behind_a_queue(
        _app(limiter, db), limiter, db, lambda client: client.get("/work"), retry_after or 0
    )
    assert r.status_code == 503
    assert r.json() == {"detail": "Server busy, please retry later"}
    if retry_after is None:
        assert "retry-after" not in r.headers
    else:
        assert r.headers["retry-after"] == str(expected)


async def test_the_predicted_wait_counts_the_whole_queue_ahead_behind_a_lower_class(
    scope_and_name: tuple[str, str],
) -> None:
    # Ten CRITICAL requests wait on one slot, a SHEDDABLE one behind them; a
    # CRITICAL newcomer with 0.1 s to wait is told the ten's whole wait.
    scope, name = scope_and_name
    db = Resource(1, name=name, scope=scope, early_reject=True)  # type: ignore[arg-type]
    limiter = Limiter(timeout=0.1, resources=[db], retry_after=1)
    app = _app(limiter, db)

    @app.get("/background")
    @limiter.resources([db], timeout=60, priority=Priority.SHEDDABLE)
    async def background() -> dict[str, int]:
        return {"ok": 1}

    async def behind_a_lower_class(
        client: httpx.AsyncClient,
    ) -> tuple[asyncio.Task[httpx.Response], httpx.Response]:
        waits = asyncio.create_task(client.get("/background"))
        await eventually(lambda: db.waiting == TEN_AHEAD + 1)
        return waits, await client.get("/work")

    (waits, r), expected = await _behind_a_queue(app, limiter, db, behind_a_lower_class, 1)
    assert (await waits).status_code == 200
    assert r.status_code == 503
    assert r.headers["retry-after"] == str(expected)


def test_a_predicted_wait_asks_for_at_most_a_minute_and_never_less_than_retry_after() -> None:
    rejection = Rejection(5, 503, "busy")
    assert rejection.error("db", "predicted_timeout", 2.2).retry_after == 3 + 5
    assert rejection.error("db", "predicted_timeout", 7.0).headers == {"Retry-After": "12"}
    assert rejection.error("db", "timeout").retry_after == 5  # other reasons: as configured
    for long in (55.5, 1e9, float("inf"), float("nan")):  # nan: a damaged estimate
        assert rejection.error("db", "predicted_timeout", long).retry_after == RETRY_AFTER_CAP
    assert Rejection(120, 503, "busy").error("db", "predicted_timeout", 3.0).retry_after == 120
    assert Rejection(0, 503, "busy").error("db", "predicted_timeout", 2.5).retry_after == 3
    assert Rejection(None, 503, "busy").error("db", "predicted_timeout", 7.0).headers is None
    # A request with a long timeout is told at least what waiting it out would have cost.
    one = Rejection(1, 503, "busy")
    assert one.error("db", "predicted_timeout", 100.0, 89.5).retry_after == 90 + 1
    assert one.error("db", "predicted_timeout", float("inf"), 90.0).retry_after == 90 + 1
    assert one.error("db", "predicted_timeout", 100.0, 2.0).retry_after == RETRY_AFTER_CAP
