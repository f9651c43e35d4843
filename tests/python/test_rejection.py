"""Limiter(status_code=, detail=, retry_after=): the limiter's own rejection."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy

from .conftest import held_elsewhere, serve

pytestmark = pytest.mark.anyio


def _app(limiter: Limiter, db: Resource) -> FastAPI:
    app = FastAPI()
    router = APIRouter(dependencies=[Depends(limiter.dependency([db]))])

    @app.get("/decorated")
    @limiter.resources([db])
    async def decorated() -> dict[str, int]:
        return {"ok": 1}

    @router.get("/router")
    async def routed() -> dict[str, int]:
        return {"ok": 1}

    app.include_router(router)
    return app


async def test_own_status_detail_and_retry_after_reach_concurrent_clients() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(
        timeout=0, resources=[db], status_code=429, detail={"error": "busy"}, retry_after=3
    )
    with serve(_app(limiter, db)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with held_elsewhere(limiter, [db]):
                rs = await asyncio.gather(
                    *[client.get(path) for path in ["/decorated", "/router"] * 3]
                )
            assert (await client.get("/decorated")).status_code == 200
    for r in rs:
        assert r.status_code == 429
        assert r.json() == {"detail": {"error": "busy"}}
        assert r.headers["retry-after"] == "3"


async def test_defaults_keep_the_original_response(asgi_client) -> None:  # type: ignore[no-untyped-def]
    db = Resource(1, name="db")
    limiter = Limiter(timeout=0, resources=[db])
    async with asgi_client(_app(limiter, db)) as client:
        async with held_elsewhere(limiter, [db]):
            r = await client.get("/decorated")
    assert r.status_code == 503
    assert r.content == b'{"detail":"Server busy, please retry later"}'
    assert r.headers["retry-after"] == "1"


async def test_exception_handler_gives_a_completely_custom_response(asgi_client) -> None:  # type: ignore[no-untyped-def]
    db = Resource(1, name="db")
    limiter = Limiter(timeout=0, resources=[db], status_code=429)
    app = _app(limiter, db)

    @app.exception_handler(ServerBusy)
    async def busy(request: object, exc: ServerBusy) -> JSONResponse:
        return JSONResponse(
            {"resource": exc.resource, "reason": exc.reason}, status_code=exc.status_code
        )

    async with asgi_client(app) as client:
        async with held_elsewhere(limiter, [db]):
            r = await client.get("/router")
    assert (r.status_code, r.json()) == (429, {"resource": "db", "reason": "timeout"})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"status_code": 200}, ValueError, r"status_code must be an int in 400\.\.599, got 200"),
        ({"status_code": 600}, ValueError, "status_code must be an int in 400..599"),
        ({"status_code": "429"}, TypeError, "status_code must be an int in 400..599"),
        ({"status_code": True}, TypeError, "status_code"),
        ({"detail": object()}, TypeError, "detail must be JSON-serialisable"),
        ({"detail": float("nan")}, TypeError, "detail must be JSON-serialisable"),
        ({"retry_after": -1}, ValueError, "retry_after"),
    ],
)
def test_bad_rejection_arguments_are_refused_at_construction(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Limiter(timeout=1, resources=[Resource(1)], **kwargs)  # type: ignore[arg-type]


async def test_acquire_raises_server_busy_with_the_limiters_status_and_detail() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=0, resources=[db], status_code=429, detail="later", retry_after=None)
    async with held_elsewhere(limiter, [db]):
        with pytest.raises(ServerBusy) as busy:
            async with limiter.acquire([db]):
                pass
    assert (busy.value.status_code, busy.value.detail, busy.value.headers) == (429, "later", None)
