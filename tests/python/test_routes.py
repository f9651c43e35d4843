"""The original package's contract, through FastAPI's request handling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy

from .conftest import eventually

pytestmark = pytest.mark.anyio
Client = Callable[[FastAPI], httpx.AsyncClient]
BUSY = {"detail": "Server busy, please retry later"}


async def test_original_usage_example_works_unchanged(asgi_client: Client) -> None:
    app = FastAPI()
    database_resource = Resource(5)
    file_resource = Resource(10)
    limiter = Limiter(timeout=5, resources=[database_resource, file_resource])

    @app.get("/messages")
    @limiter.resources([database_resource])
    async def read_messages() -> dict[str, str]:
        return {"messages": "ok"}

    @app.get("/messages-and-file")
    @limiter.resources([database_resource, file_resource])
    async def read_messages_and_file() -> dict[str, str]:
        return {"messages": "ok", "file": "ok"}

    async with asgi_client(app) as client:
        r1 = await client.get("/messages")
        r2 = await client.get("/messages-and-file")
    assert (r1.status_code, r1.json()) == (200, {"messages": "ok"})
    assert (r2.status_code, r2.json()) == (200, {"messages": "ok", "file": "ok"})
    assert database_resource.in_use == 0 and file_resource.in_use == 0


class Held:
    """A route that holds its slot until the test lets it go."""

    def __init__(self, capacity: int = 1, **limiter_kwargs: object) -> None:
        self.app = FastAPI()
        self.db = Resource(capacity, name="db")
        self.limiter = Limiter(timeout=0.05, resources=[self.db], **limiter_kwargs)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.entered = 0

        @self.app.get("/hold")
        @self.limiter.resources([self.db], timeout=30)
        async def hold() -> dict[str, int]:
            self.entered += 1
            await self.gate.wait()
            return {"held": 1}

        @self.app.get("/quick")
        @self.limiter.resources([self.db])
        async def quick() -> dict[str, int]:
            return {"quick": 1}


async def test_busy_resource_answers_503_with_the_original_body(asgi_client: Client) -> None:
    h = Held()
    async with asgi_client(h.app) as client:
        holder = asyncio.ensure_future(client.get("/hold"))
        await eventually(lambda: h.db.in_use == 1)
        busy = await client.get("/quick")
        assert busy.status_code == 503
        assert busy.json() == BUSY
        assert busy.headers["retry-after"] == "1"
        h.gate.set()
        assert (await holder).status_code == 200
        assert (await client.get("/quick")).status_code == 200
    assert h.db.in_use == 0 and h.db.waiting == 0


@pytest.mark.parametrize(("retry_after", "header"), [(None, None), (7, "7")])
async def test_retry_after_is_configurable(
    asgi_client: Client, retry_after: int | None, header: str | None
) -> None:
    h = Held(retry_after=retry_after)
    async with asgi_client(h.app) as client:
        holder = asyncio.ensure_future(client.get("/hold"))
        await eventually(lambda: h.db.in_use == 1)
        busy = await client.get("/quick")
        h.gate.set()
        await holder
    assert busy.status_code == 503
    assert busy.headers.get("retry-after") == header


async def test_waiting_request_gets_the_slot_when_it_frees(asgi_client: Client) -> None:
    h = Held()
    async with asgi_client(h.app) as client:
        first = asyncio.ensure_future(client.get("/hold"))
        await eventually(lambda: h.entered == 1)
        second = asyncio.ensure_future(client.get("/hold"))
        await eventually(lambda: h.db.waiting == 1)
        assert h.entered == 1  # the second handler has not started
        h.gate.set()
        assert [(await first).status_code, (await second).status_code] == [200, 200]
    assert h.entered == 2 and h.db.in_use == 0


async def test_slot_is_released_when_the_handler_raises(asgi_client: Client) -> None:
    app = FastAPI()
    db = Resource(1)
    limiter = Limiter(timeout=1, resources=[db])

    @app.get("/http-error")
    @limiter.resources([db])
    async def http_error() -> None:
        raise HTTPException(status_code=418, detail="teapot")

    @app.get("/crash")
    @limiter.resources([db])
    async def crash() -> None:
        raise RuntimeError("boom")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/http-error")).status_code == 418
        assert db.in_use == 0
        assert (await client.get("/crash")).status_code == 500
        assert db.in_use == 0
        assert (await client.get("/http-error")).status_code == 418  # still usable


async def test_per_route_timeout_overrides_the_limiter_timeout(asgi_client: Client) -> None:
    app = FastAPI()
    db = Resource(1)
    limiter = Limiter(timeout=30, resources=[db])
    gate = asyncio.Event()

    @app.get("/hold")
    @limiter.resources([db])
    async def hold() -> None:
        await gate.wait()

    @app.get("/impatient")
    @limiter.resources([db], timeout=0)
    async def impatient() -> None:
        return None

    async with asgi_client(app) as client:
        holder = asyncio.ensure_future(client.get("/hold"))
        await eventually(lambda: db.in_use == 1)
        # With the limiter's 30 s this would hang; the route's 0 s answers now.
        assert (await client.get("/impatient")).status_code == 503
        gate.set()
        await holder


async def test_server_busy_can_be_handled_by_the_app(asgi_client: Client) -> None:
    h = Held()
    seen: list[ServerBusy] = []

    @h.app.exception_handler(ServerBusy)
    async def busy(request: Request, exc: ServerBusy) -> JSONResponse:
        seen.append(exc)
        return JSONResponse({"busy": exc.resource, "why": exc.reason}, status_code=429)

    async with asgi_client(h.app) as client:
        holder = asyncio.ensure_future(client.get("/hold"))
        await eventually(lambda: h.db.in_use == 1)
        r = await client.get("/quick")
        h.gate.set()
        await holder
    assert (r.status_code, r.json()) == (429, {"busy": "db", "why": "timeout"})
    assert isinstance(seen[0], HTTPException) and seen[0].status_code == 503


class Item(BaseModel):
    name: str
    price: float


class ItemOut(BaseModel):
    name: str


def common(q: str | None = None) -> dict[str, str | None]:
    return {"q": q}


def make_routes(decorate: bool) -> FastAPI:
    app = FastAPI()
    db = Resource(2)
    limiter = Limiter(timeout=1, resources=[db])
    wrap = limiter.resources([db]) if decorate else (lambda f: f)

    @app.get("/items/{item_id}", response_model=ItemOut)
    @wrap
    async def read_item(
        item_id: int,
        request: Request,
        commons: Annotated[dict[str, str | None], Depends(common)],
        limit: int = 10,
    ) -> dict[str, object]:
        return {"name": f"{item_id}-{commons['q']}-{limit}-{request.url.path}", "secret": "x"}

    @app.post("/items")
    @wrap
    async def create_item(item: Item) -> Item:
        return item

    return app


async def test_signature_parameters_dependencies_and_response_model_survive(
    asgi_client: Client,
) -> None:
    plain, limited = make_routes(False), make_routes(True)
    async with asgi_client(limited) as client:
        r = await client.get("/items/3", params={"q": "z", "limit": 2})
        assert r.json() == {"name": "3-z-2-/items/3"}  # response_model filtered "secret"
        r = await client.post("/items", json={"name": "pen", "price": 1.5})
        assert r.json() == {"name": "pen", "price": 1.5}
        r = await client.get("/items/not-a-number")
        assert r.status_code == 422
    # OpenAPI sees exactly the user's parameters and body (the 503 response
    # is documented on top).
    for path, method in (("/items/{item_id}", "get"), ("/items", "post")):
        a = plain.openapi()["paths"][path][method]
        b = limited.openapi()["paths"][path][method]
        assert a.get("parameters") == b.get("parameters")
        assert a.get("requestBody") == b.get("requestBody")
        assert a["responses"]["200"] == b["responses"]["200"]


async def test_string_annotations_from_future_import_are_resolved(asgi_client: Client) -> None:
    from . import future_annotations_app

    async with asgi_client(future_annotations_app.app) as client:
        r = await client.post("/echo/4", json={"text": "hi"})
    assert r.status_code == 200
    assert r.json() == {"id": 4, "text": "hi"}


async def test_read_only_properties_reflect_state(asgi_client: Client) -> None:
    h = Held(capacity=2)
    assert (h.db.capacity, h.db.in_use, h.db.waiting) == (2, 0, 0)
    async with asgi_client(h.app) as client:
        holders = [asyncio.ensure_future(client.get("/hold")) for _ in range(3)]
        await eventually(lambda: h.db.in_use == 2 and h.db.waiting == 1)
        h.gate.set()
        await asyncio.gather(*holders)
    assert (h.db.in_use, h.db.waiting) == (0, 0)
