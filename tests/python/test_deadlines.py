"""Client deadlines: the budget a client sends in a header bounds its wait,
a spent one is refused at once, and the handler can read and pass on what
is left. Parsing in-process; the behaviour under a real uvicorn with a real
HTTP client (and WebSocket client)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, Request, WebSocket
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fastapi_concurrency_limiter import (
    Limiter,
    Resource,
    ServerBusy,
    deadline_headers,
    remaining_budget,
)
from fastapi_concurrency_limiter._deadline import format_budget, parse_budget
from fastapi_concurrency_limiter.redis import RedisScope

from .conftest import eventually, serve
from .redis_support import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, imported for the test below

pytestmark = pytest.mark.anyio
BUSY = {"detail": "Server busy, please retry later"}
GRPC = "grpc-timeout"
ENVOY = "x-envoy-expected-rq-timeout-ms"
OWN = "x-request-timeout"


@pytest.mark.parametrize(
    ("header", "value", "seconds"),
    [
        (GRPC, "2H", 7200.0),
        (GRPC, "3M", 180.0),
        (GRPC, "5S", 5.0),
        (GRPC, "250m", 0.25),
        (GRPC, "1500u", 0.0015),
        (GRPC, "7000000n", 0.007),
        (GRPC, "0m", 0.0),
        (GRPC, " 12S ", 12.0),
        (GRPC, "99999999S", 99999999.0),
        (GRPC, "99999999H", 1e9),  # huge: capped, the route timeout rules
        (ENVOY, "1500", 1.5),
        (ENVOY, "0", None),  # Envoy's "no timeout"
        (ENVOY, "99999999999999999999", 1e9),
        (OWN, "2", 2.0),
        (OWN, "0.25", 0.25),
        (OWN, ".5", 0.5),
        (OWN, "3.", 3.0),
        (OWN, "0", 0.0),
        (OWN, "1" + "0" * 40, 1e9),
    ],
)
def test_budgets_in_each_format(header: str, value: str, seconds: float | None) -> None:
    assert parse_budget(header, value) == pytest.approx(seconds)


def test_a_huge_envoy_budget_of_thousands_of_digits_is_capped_not_ignored() -> None:
    """More digits than int() reads (4300) are still a huge budget: capped
    as in the seconds format, not refused as unreadable."""
    huge = "9" * 5000
    assert parse_budget(OWN, huge) == 1e9
    assert parse_budget(ENVOY, huge) == 1e9
    assert parse_budget(ENVOY, "0" * 5000) is None  # still Envoy's "no timeout"


@pytest.mark.parametrize("text", ["1e-05", "5.0E-4", "1.0E7", "2e+1"])
def test_seconds_with_an_exponent_are_read(text: str) -> None:
    """What common float formatters write: Python's str(0.00001) is
    '1e-05', Java's Double.toString(0.0005) is '5.0E-4' and of 1e7 '1.0E7'."""
    assert parse_budget(OWN, text) == pytest.approx(float(text))
    assert parse_budget(OWN, "1e999") == 1e9  # huge: capped


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (GRPC, ""),
        (GRPC, "5"),  # no unit
        (GRPC, "5s"),  # units are case-sensitive: s is not S
        (GRPC, "-5S"),
        (GRPC, "1.5S"),
        (GRPC, "123456789S"),  # gRPC allows at most 8 digits
        (GRPC, "5X"),
        (ENVOY, ""),
        (ENVOY, "-100"),
        (ENVOY, "1.5"),
        (ENVOY, "abc"),
        (OWN, ""),
        (OWN, "-1"),
        (OWN, "1e"),  # an exponent needs digits
        (OWN, "-1e3"),
        (OWN, "1e-3.5"),
        (OWN, "inf"),
        (OWN, "nan"),
        (OWN, "2s"),
        (OWN, "1_000"),
    ],
)
def test_values_not_in_the_format_are_refused(header: str, value: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_budget(header, value)


@pytest.mark.parametrize(
    ("header", "seconds", "text"),
    [
        (GRPC, 0.25, "250000u"),  # the finest unit within 8 digits
        (GRPC, 1.0, "1000000u"),
        (GRPC, 5000.0, "5000000m"),
        (GRPC, 1e9, "16666666M"),
        (GRPC, 0.0, "0n"),
        (ENVOY, 1.5, "1500"),
        (ENVOY, 0.0, "1"),  # never 0, Envoy's "no timeout"
        (OWN, 2.5, "2.500"),
        (OWN, 0.0, "0.000"),
    ],
)
def test_budgets_are_written_back_in_each_format(header: str, seconds: float, text: str) -> None:
    assert format_budget(header, seconds) == text
    back = parse_budget(header, text)
    assert back is not None and back <= max(seconds, 0.001)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"deadline_header": 5}, TypeError, "deadline_header must be a str"),
        ({"deadline_header": b"grpc-timeout"}, TypeError, "deadline_header must be a str"),
        ({"deadline_header": ""}, ValueError, "deadline_header must name a request header"),
        ({"deadline_header": "x timeout"}, ValueError, "deadline_header must name"),
        ({"deadline_header": "x-t:"}, ValueError, "deadline_header must name"),
        ({"deadline_margin": -0.1}, ValueError, "deadline_margin must be"),
        ({"deadline_margin": float("nan")}, ValueError, "deadline_margin must be"),
        ({"deadline_margin": "0.1"}, TypeError, "deadline_margin must be"),
    ],
)
def test_limiter_validates_the_deadline_settings(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Limiter(timeout=1, resources=[Resource(1)], **kwargs)  # type: ignore[arg-type]


def test_deadline_headers_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="name must name a request header"):
        deadline_headers("bad name")
    with pytest.raises(TypeError, match="name must be a str"):
        deadline_headers(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin must be"):
        deadline_headers(margin=-1)
    assert deadline_headers("Grpc-Timeout") == {}  # outside a request: no budget


def test_deadline_settings_default_off_and_names_are_lower_case() -> None:
    assert Limiter(timeout=1, resources=[Resource(1)]).deadline_header is None
    limiter = Limiter(timeout=1, resources=[Resource(1)], deadline_header="X-Request-Timeout")
    assert limiter.deadline_header == OWN
    assert limiter.deadline_margin == 0.005


class App:
    """One limited route (decorator) whose handler holds its slot until the
    test sets ``gate``, or reports its remaining budget."""

    def __init__(self, header: str | None = GRPC, timeout: float = 30) -> None:
        self.app = FastAPI()
        self.db = Resource(1, name="db")
        self.other = Resource(1, name="downstream")
        self.limiter = Limiter(
            timeout=timeout, resources=[self.db, self.other], deadline_header=header
        )
        self.gate = threading.Event()
        self.started = 0

        @self.app.get("/work")
        @self.limiter.resources([self.db])
        async def work(hold: bool = False) -> dict[str, object]:
            self.started += 1
            while hold and not self.gate.is_set():
                await asyncio.sleep(0.005)
            return {"left": remaining_budget(), "headers": deadline_headers()}

        @self.app.get("/sync")
        @self.limiter.resources([self.db])
        def sync_work() -> dict[str, object]:
            return {"left": remaining_budget()}

        @self.app.get("/downstream")
        @self.limiter.resources([self.other])
        async def downstream() -> dict[str, object]:
            return {"left": remaining_budget()}

        @self.app.get("/upstream")
        @self.limiter.resources([self.db])
        async def upstream(request: Request) -> dict[str, object]:
            base = str(request.base_url)
            async with httpx.AsyncClient(base_url=base) as client:
                left = remaining_budget()
                r = await client.get("/downstream", headers=deadline_headers())
            return {"left": left, "downstream": r.json()["left"]}


async def _hold(a: App, client: httpx.AsyncClient) -> asyncio.Future[httpx.Response]:
    holder = asyncio.ensure_future(client.get("/work", params={"hold": True}))
    await eventually(lambda: a.db.in_use == 1)
    return holder


async def test_a_spent_budget_is_refused_at_once_without_running_or_queueing() -> None:
    a = App()
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            # A free slot: still refused, the client has given up.
            r = await client.get("/work", headers={GRPC: "0m"})
            assert r.status_code == 503 and r.json() == BUSY
            assert r.headers["retry-after"] == "1"
            r = await client.get("/work", headers={GRPC: "2m"})  # within the margin
            assert r.status_code == 503
            holder = await _hold(a, client)
            r = await client.get("/work", headers={GRPC: "0S"})  # would wait 30 s
            assert r.status_code == 503
            assert a.db.waiting == 0 and not holder.done()
            a.gate.set()
            assert (await holder).status_code == 200
    s = a.db.statistics()
    assert s.rejected_total["deadline"] == 3
    assert s.rejected_total["timeout"] == 0
    assert s.wait_seconds.count == 1  # only the holder was granted
    assert a.started == 1


async def test_a_short_budget_ends_the_wait_before_the_route_timeout() -> None:
    a = App()
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            holder = await _hold(a, client)
            waiting = asyncio.ensure_future(client.get("/work", headers={GRPC: "200m"}))
            await eventually(lambda: a.db.waiting == 1 or waiting.done())
            r = await waiting  # the route's timeout is 30 s
            assert r.status_code == 503 and r.json() == BUSY
            assert not holder.done()  # it gave up while the slot was still held
            a.gate.set()
            assert (await holder).status_code == 200
    s = a.db.statistics()
    assert (s.rejected_total["deadline"], s.rejected_total["timeout"]) == (1, 0)
    assert (a.db.in_use, a.db.waiting, a.started) == (0, 0, 1)


async def test_a_huge_budget_leaves_the_route_timeout_in_force() -> None:
    a = App(timeout=0.05)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            holder = await _hold(a, client)
            r = await client.get("/work", headers={GRPC: "99999999H"})
            assert r.status_code == 503
            a.gate.set()
            await holder
    s = a.db.statistics()
    assert (s.rejected_total["timeout"], s.rejected_total["deadline"]) == (1, 0)


@pytest.mark.parametrize("value", ["soon", "-1S", ""])
async def test_an_unreadable_budget_is_ignored_and_logged_once(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi_concurrency_limiter import _deadline

    _deadline._warned.discard(GRPC)
    a = App()
    with (
        caplog.at_level(logging.WARNING, logger="fastapi_concurrency_limiter"),
        serve(a.app) as url,
    ):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for _ in range(2):
                r = await client.get("/work", headers={GRPC: value})
                assert r.status_code == 200
                assert r.json() == {"left": None, "headers": {}}
    warnings = [rec for rec in caplog.records if "client deadline" in rec.getMessage()]
    assert len(warnings) == 1
    assert "'grpc-timeout'" in warnings[0].getMessage()
    assert a.db.statistics().rejected_total["deadline"] == 0


async def test_the_handler_reads_its_budget_and_passes_it_on_with_httpx() -> None:
    a = App(header=OWN)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.get("/work", headers={OWN: "30"})
            body = r.json()
            assert 0 < body["left"] <= 30
            sent = float(body["headers"][OWN])
            assert 0 < sent <= body["left"] + 0.001
            r = await client.get("/sync", headers={OWN: "30"})  # a def handler too
            assert 0 < r.json()["left"] <= 30
            r = await client.get("/upstream", headers={OWN: "30"})
            body = r.json()
            # The downstream got no more than what the upstream had left.
            assert 0 < body["downstream"] <= body["left"] <= 30
            r = await client.get("/work")  # no header: no budget
            assert r.json() == {"left": None, "headers": {}}


async def test_without_deadline_header_the_budget_header_is_not_read() -> None:
    a = App(header=None)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.get("/work", headers={GRPC: "0m"})
    assert r.status_code == 200 and r.json() == {"left": None, "headers": {}}


async def test_envoy_zero_means_no_deadline_and_milliseconds_otherwise() -> None:
    a = App(header=ENVOY)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.get("/work", headers={ENVOY: "0"})
            assert r.status_code == 200 and r.json()["left"] is None
            r = await client.get("/work", headers={ENVOY: "30000"})
            assert 0 < r.json()["left"] <= 30
            assert 0 < int(r.json()["headers"][ENVOY]) <= 30000
            r = await client.get("/work", headers={ENVOY: "1"})  # within the margin
            assert r.status_code == 503
    assert a.db.statistics().rejected_total["deadline"] == 1


async def test_dependency_asgi_wrapper_and_websocket_refuse_a_spent_budget() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db], deadline_header=OWN)
    app = FastAPI()
    ran: list[str] = []

    @app.get("/dep", dependencies=[Depends(limiter.dependency([db]))])
    async def dep() -> dict[str, object]:
        ran.append("dep")
        return {"left": remaining_budget()}

    async def plain(request: Request) -> JSONResponse:
        ran.append("asgi")
        return JSONResponse({"left": remaining_budget()})

    app.mount("/asgi", limiter.asgi([db])(Starlette(routes=[Route("/", plain)])))

    @app.websocket("/ws")
    @limiter.resources([db])
    async def ws(websocket: WebSocket) -> None:
        ran.append("ws")
        await websocket.accept()
        await websocket.send_text(str(remaining_budget()))
        await websocket.close()

    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for path in ("/dep", "/asgi/"):
                r = await client.get(path, headers={OWN: "0"})
                assert r.status_code == 503 and r.json() == BUSY, path
                r = await client.get(path, headers={OWN: "30"})
                assert 0 < r.json()["left"] <= 30, path
        ws_url = url.replace("http", "ws") + "/ws"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url, additional_headers={OWN: "0"}):
                pass
        assert refused.value.response.status_code == 503
        async with connect(ws_url, additional_headers={OWN: "30"}) as socket:
            assert 0 < float(await socket.recv()) <= 30
    assert ran == ["dep", "asgi", "ws"]
    assert db.statistics().rejected_total["deadline"] == 3


async def test_acquire_takes_a_deadline_in_seconds() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    with pytest.raises(ServerBusy) as spent:
        async with limiter.acquire([db], deadline=0):
            pass
    assert spent.value.reason == "deadline" and db.in_use == 0
    with pytest.raises(ValueError, match="deadline must be"):
        limiter.acquire([db], deadline=-1)
    with pytest.raises(TypeError, match="deadline must be"):
        limiter.acquire([db], deadline="1")  # type: ignore[arg-type]

    async def second() -> str:
        try:
            async with limiter.acquire([db], deadline=0.1):  # the timeout is 30 s
                return "granted"
        except ServerBusy as e:
            return e.reason

    async with limiter.acquire([db], deadline=5):
        assert await asyncio.create_task(second()) == "deadline"
    assert db.statistics().rejected_total["deadline"] == 2
    assert (db.in_use, db.waiting) == (0, 0)
    assert remaining_budget() is None and deadline_headers() == {}


async def test_cluster_scope_local_stage_refuses_and_the_budget_bounds_redis_s_queue(
    redis_server: RedisServer,
) -> None:
    scope = RedisScope(redis_server.url(), key_prefix="deadline")
    here = Resource(1, name="db", scope=scope)
    limiter = Limiter(timeout=30, resources=[here])
    # Another process's local stage of the same cluster resource.
    there = Resource(1, name="db", scope=RedisScope(redis_server.url(), key_prefix="deadline"))
    # No route timeout: only the budget can end its wait in Redis's queue.
    other = Limiter(timeout=None, resources=[there], deadline_header=OWN)
    app = FastAPI()

    @app.get("/x")
    @other.resources([there])
    async def x() -> dict[str, object]:
        return {}

    with pytest.raises(ServerBusy) as spent:
        async with limiter.acquire([here], deadline=0):
            pass
    assert spent.value.reason == "deadline"
    assert here.statistics().rejected_total["deadline"] == 1
    async with limiter.acquire([here]):
        # Its local stage is free; Redis's queue holds it until the budget
        # ends (refused as a timeout there: Redis knows no deadlines).
        # fail_after: a guard against hanging, not a timing assertion.
        with anyio.fail_after(10), pytest.raises(ServerBusy) as queued:
            async with other.acquire([there], deadline=0.2):
                pass
        assert queued.value.reason == "timeout"
        # It leaves Redis's queue too (withdrawn in the background).
        queue = redis_server.client()
        await eventually(lambda: queue.zcard("{deadline:db}:queue") == 0)
        # The same for a request's budget read from its header.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with anyio.fail_after(10):
                r = await client.get("/x", headers={OWN: "0.2"})
        assert r.status_code == 503 and r.json() == BUSY
        await eventually(lambda: queue.zcard("{deadline:db}:queue") == 0)
    assert (there.in_use, there.waiting) == (0, 0)
    await scope.aclose()
    await there._cluster.scope.aclose()  # type: ignore[union-attr]


class _Slow:
    """ASGI middleware that takes ``seconds`` before passing a request on."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(self.seconds)
        await self.app(scope, receive, send)


@pytest.mark.parametrize("slow", ["dependency", "middleware"])
async def test_with_instrument_the_budget_counts_from_the_request_s_arrival(slow: str) -> None:
    """A dependency before the decorated handler, or a middleware (added
    after instrument()), spends 0.1 s of a 0.05 s budget: the client has
    given up before the limiter is reached, so the request is refused
    (deadline) and the handler does not run."""
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db], deadline_header=OWN)
    app = FastAPI()
    limiter.instrument(app)
    ran: list[float | None] = []

    async def slow_auth() -> None:
        await asyncio.sleep(0.1)

    @app.get("/x", dependencies=[Depends(slow_auth)] if slow == "dependency" else [])
    @limiter.resources([db])
    async def x() -> dict[str, object]:
        ran.append(remaining_budget())
        return {"left": remaining_budget()}

    if slow == "middleware":
        app.add_middleware(_Slow, seconds=0.1)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/x", headers={OWN: "0.05"})
        assert r.status_code == 503 and r.json() == BUSY
        assert ran == []
        r = await client.get("/x", headers={OWN: "30"})  # enough left: it runs
        assert r.status_code == 200 and 0 < r.json()["left"] < 30
    assert db.statistics().rejected_total["deadline"] == 1


@pytest.mark.parametrize("entry", ["decorator", "streamed", "dependency", "asgi"])
async def test_the_budget_does_not_outlive_its_request_in_the_task(entry: str) -> None:
    """httpx.ASGITransport runs every request in the caller's task: after a
    limited request with a budget, a route of no limiter (and the test's
    own code) reads no budget, and deadline_headers() sends none on."""
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db], deadline_header=OWN)
    app = FastAPI()
    seen: list[float | None] = []

    if entry == "decorator":

        @app.get("/limited")
        @limiter.resources([db])
        async def limited() -> dict[str, object]:
            seen.append(remaining_budget())
            return {}

    elif entry == "streamed":

        @app.get("/limited")
        @limiter.resources([db])
        async def streamed() -> StreamingResponse:
            async def body() -> AsyncIterator[str]:
                seen.append(remaining_budget())  # while it is sent: still readable
                yield "x"

            return StreamingResponse(body())

    elif entry == "dependency":

        @app.get("/limited", dependencies=[Depends(limiter.dependency([db]))])
        async def by_dependency() -> dict[str, object]:
            seen.append(remaining_budget())
            return {}

    else:

        async def endpoint(request: Request) -> JSONResponse:
            seen.append(remaining_budget())
            return JSONResponse({})

        app.mount("/limited", limiter.asgi([db])(Starlette(routes=[Route("/", endpoint)])))

    @app.get("/plain")
    async def plain() -> dict[str, object]:
        return {"left": remaining_budget(), "headers": deadline_headers()}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/limited/" if entry == "asgi" else "/limited", headers={OWN: "30"})
        assert r.status_code == 200
        r = await client.get("/plain")  # no header, no limiter
        assert r.json() == {"left": None, "headers": {}}
        r = await client.get("/limited/" if entry == "asgi" else "/limited", headers={OWN: "0"})
        assert r.status_code == 503  # a refused one leaves nothing behind either
        r = await client.get("/plain")
        assert r.json() == {"left": None, "headers": {}}
    assert len(seen) == 1 and seen[0] is not None and 0 < seen[0] <= 30
    assert remaining_budget() is None and deadline_headers() == {}
