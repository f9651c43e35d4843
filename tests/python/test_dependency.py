"""limiter.dependency(): a whole router limited through Depends()."""

from __future__ import annotations

import asyncio
import inspect
import threading

import fastapi
import httpx
import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from fastapi_concurrency_limiter import Limiter, Resource

from .conftest import eventually, held_elsewhere, serve

pytestmark = pytest.mark.anyio
BUSY = {"detail": "Server busy, please retry later"}
FASTAPI_VERSION = tuple(int(p) for p in fastapi.__version__.split(".")[:2])
# From FastAPI 0.118 the exit code of a dependency with yield runs after the
# response has been sent (before: as soon as the endpoint returned).
EXIT_AFTER_RESPONSE = FASTAPI_VERSION >= (0, 118)
HAS_DEPENDENCY_SCOPE = "scope" in inspect.signature(Depends).parameters


class App:
    """A FastAPI app whose router is limited by a dependency on ``db``."""

    def __init__(self, capacity: int, timeout: float) -> None:
        self.db = Resource(capacity, name="db")
        self.limiter = Limiter(timeout=timeout, resources=[self.db])
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = self.peak = self.started = 0
        router = APIRouter(dependencies=[Depends(self.limiter.dependency([self.db]))])

        @router.get("/work")
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

        @router.get("/fail")
        async def fail() -> None:
            raise KeyError("boom")

        self.app = FastAPI()
        self.app.include_router(router)

        @self.app.get("/free")
        async def free() -> dict[str, int]:
            return {"free": 1}


async def test_router_dependency_limits_concurrent_clients_of_a_real_server() -> None:
    a = App(capacity=2, timeout=30)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            rs = await asyncio.gather(
                *[client.get("/work", params={"hold": 0.03}) for _ in range(12)]
            )
    assert [r.status_code for r in rs] == [200] * 12
    assert a.peak == 2
    assert (a.db.in_use, a.db.waiting) == (0, 0)


async def test_router_dependency_answers_503_with_retry_after_and_spares_other_routes() -> None:
    a = App(capacity=1, timeout=0.05)
    with serve(a.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            holder = asyncio.ensure_future(client.get("/work"))
            await eventually(lambda: a.db.in_use == 1)
            rs = await asyncio.gather(*[client.get("/work") for _ in range(4)])
            free = await client.get("/free")
            a.gate.set()
            assert (await holder).status_code == 200
    assert [r.status_code for r in rs] == [503] * 4
    assert all(r.json() == BUSY and r.headers["retry-after"] == "1" for r in rs)
    assert free.status_code == 200
    assert a.started == 1
    assert a.db.statistics().rejected_total["timeout"] == 4


async def test_dependency_releases_when_the_endpoint_raises(asgi_client) -> None:  # type: ignore[no-untyped-def]
    a = App(capacity=1, timeout=1)
    transport = httpx.ASGITransport(app=a.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for _ in range(3):
            assert (await client.get("/fail")).status_code == 500
    assert (a.db.in_use, a.db.waiting) == (0, 0)
    assert a.db.statistics().acquired_total == 3


async def test_client_that_disconnects_while_waiting_leaves_the_queue() -> None:
    a = App(capacity=1, timeout=30)
    async with held_elsewhere(a.limiter, [a.db]):
        sent: list[dict[str, object]] = []
        disconnect = asyncio.Event()

        async def receive() -> dict[str, object]:
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": "/work", "raw_path": b"/work", "root_path": "",
            "query_string": b"", "headers": [], "server": ("app", 80), "client": ("c", 1),
        }
        request = asyncio.ensure_future(a.app(scope, receive, send))  # type: ignore[arg-type]
        await eventually(lambda: a.db.waiting == 1)
        disconnect.set()
        await request
    assert a.started == 0
    assert a.db.statistics().rejected_total["disconnected"] == 1
    assert (a.db.in_use, a.db.waiting) == (0, 0)


def test_resources_out_of_order_are_refused_when_the_dependency_is_made() -> None:
    db, files = Resource(1, name="db"), Resource(1, name="files")
    limiter = Limiter(timeout=1, resources=[db, files])
    with pytest.raises(ValueError, match="order"):
        limiter.dependency([files, db])
    with pytest.raises(TypeError, match="timeout"):
        limiter.dependency([db], timeout="1")  # type: ignore[arg-type]


async def _in_use_while_sending(app: FastAPI, db: Resource, path: str) -> tuple[int, int]:
    """``db.in_use`` when the response starts and when its body is sent."""
    seen: list[int] = []

    async def recorder(scope, receive, send):  # type: ignore[no-untyped-def]
        async def record(message):  # type: ignore[no-untyped-def]
            if message["type"] in ("http.response.start", "http.response.body"):
                seen.append(db.in_use)
            await send(message)

        await app(scope, receive, record)

    transport = httpx.ASGITransport(app=recorder)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get(path)).status_code == 200
    assert db.in_use == 0
    return seen[0], seen[1]


async def test_when_the_slots_are_released_relative_to_sending_the_response() -> None:
    db = Resource(2, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(limiter.dependency([db]))])

    @router.get("/json")
    async def json_endpoint() -> dict[str, int]:
        return {"in_use": db.in_use}

    @router.get("/stream")
    async def stream() -> StreamingResponse:
        async def body():  # type: ignore[no-untyped-def]
            yield str(db.in_use).encode()

        return StreamingResponse(body())

    app.include_router(router)
    held = 1 if EXIT_AFTER_RESPONSE else 0
    assert await _in_use_while_sending(app, db, "/json") == (held, held)
    assert await _in_use_while_sending(app, db, "/stream") == (held, held)


@pytest.mark.skipif(not HAS_DEPENDENCY_SCOPE, reason="Depends(scope=) is FastAPI >= 0.121")
async def test_function_scope_releases_when_the_endpoint_returns() -> None:
    db = Resource(2, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()
    seen: list[int] = []

    @app.get("/stream", dependencies=[Depends(limiter.dependency([db]), scope="function")])  # type: ignore[call-arg]
    async def stream() -> StreamingResponse:
        seen.append(db.in_use)

        async def body():  # type: ignore[no-untyped-def]
            yield b"x"

        return StreamingResponse(body())

    assert await _in_use_while_sending(app, db, "/stream") == (0, 0)
    assert seen == [1]


def _twice_limited() -> tuple[FastAPI, Limiter, Resource]:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(limiter.dependency([db]))])

    @router.get("/twice")
    @limiter.resources([db])
    async def twice() -> dict[str, int]:
        return {"ok": 1}

    @router.get("/once")
    async def once() -> dict[str, int]:
        return {"ok": 1}

    app.include_router(router)
    return app, limiter, db


async def test_route_limited_twice_fails_at_start_up_with_instrument() -> None:
    app, limiter, db = _twice_limited()
    limiter.instrument(app)
    with pytest.raises(ValueError, match="'/twice' is limited twice.*'db'"):
        async with app.router.lifespan_context(app):
            pass


async def test_route_limited_twice_without_instrument_fails_each_request_not_deadlocks() -> None:
    app, limiter, db = _twice_limited()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        with pytest.raises(RuntimeError, match="already holds a slot of resource 'db'"):
            await client.get("/twice")
        assert (await client.get("/once")).status_code == 200
    assert (db.in_use, db.waiting) == (0, 0)


async def test_instrument_documents_the_503_of_a_router_limited_by_a_dependency() -> None:
    a = App(capacity=1, timeout=1)
    a.limiter.instrument(a.app)
    paths = a.app.openapi()["paths"]
    assert "503" in paths["/work"]["get"]["responses"]
    assert "503" not in paths["/free"]["get"]["responses"]


async def test_limited_mount_over_a_route_limited_again_fails_at_start_up() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    inner = FastAPI()

    @inner.get("/again")
    @limiter.resources([db])
    async def again() -> dict[str, int]:
        return {"ok": 1}

    app = FastAPI()
    app.mount("/inner", limiter.asgi([db])(inner))
    limiter.instrument(app)
    with pytest.raises(ValueError, match="'/again' is limited twice"):
        async with app.router.lifespan_context(app):
            pass


async def test_body_read_while_waiting_reaches_the_endpoint_on_a_real_server() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=30, resources=[db])
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(limiter.dependency([db]))])

    @router.post("/echo")
    async def echo(request: Request) -> object:
        return await request.json()

    app.include_router(router)
    payload = {"message": "x" * 70_000}  # several body chunks
    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with held_elsewhere(limiter, [db]):
                post = asyncio.ensure_future(client.post("/echo", json=payload))
                await eventually(lambda: db.waiting == 1)
            r = await post
    assert r.status_code == 200 and r.json() == payload


async def test_background_tasks_run_with_the_dependencys_slots_from_fastapi_0_118() -> None:
    # What a background task sees of the slots, on a real server: the
    # decorator has given them back; the default dependency still holds
    # them on FastAPI >= 0.118 (its exit code runs after the response,
    # background tasks included); Depends(..., scope="function") does not.
    db = Resource(2, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()
    seen: dict[str, int] = {}

    def job(path: str) -> None:
        seen[path] = db.in_use

    @app.get("/dependency", dependencies=[Depends(limiter.dependency([db]))])
    async def dependency(tasks: BackgroundTasks) -> dict[str, int]:
        tasks.add_task(job, "/dependency")
        return {"ok": 1}

    @app.get("/decorator")
    @limiter.resources([db])
    async def decorator(tasks: BackgroundTasks) -> dict[str, int]:
        tasks.add_task(job, "/decorator")
        return {"ok": 1}

    paths = ["/dependency", "/decorator"]
    if HAS_DEPENDENCY_SCOPE:
        paths.append("/function")

        @app.get(
            "/function",
            dependencies=[Depends(limiter.dependency([db]), scope="function")],  # type: ignore[call-arg]
        )
        async def function(tasks: BackgroundTasks) -> dict[str, int]:
            tasks.add_task(job, "/function")
            return {"ok": 1}

    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            for path in paths:
                assert (await client.get(path)).status_code == 200
                await eventually(lambda path=path: path in seen)  # type: ignore[misc]
                await eventually(lambda: db.in_use == 0)
    assert seen.pop("/dependency") == (1 if EXIT_AFTER_RESPONSE else 0)
    assert set(seen.values()) == {0}
