"""``@limiter.resources`` above the route decorator: the route would run
unlimited; instrument() refuses it, and without instrument its first
request logs an ERROR."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

pytestmark = pytest.mark.anyio


def _misordered_app() -> tuple[FastAPI, Limiter]:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()

    @limiter.resources([db])  # wrong: above the route decorator
    @app.get("/report")
    async def report() -> dict[str, int]:
        return {"ok": 1}

    @app.get("/fine")
    @limiter.resources([db])
    async def fine() -> dict[str, int]:
        return {"ok": 1}

    return app, limiter


def test_instrument_refuses_a_decorator_above_the_route_decorator() -> None:
    app, limiter = _misordered_app()
    with pytest.raises(ValueError, match=r"'GET /report' \(.*report\) runs without any limit"):
        limiter.instrument(app)


async def test_instrument_refuses_at_start_up_a_misordered_route_declared_later() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()
    limiter.instrument(app)
    router = APIRouter()

    @limiter.resources([db])
    @router.post("/later")
    async def later() -> None: ...

    app.include_router(router)
    with pytest.raises(ValueError, match="'POST /later'.*under the route decorator"):
        async with app.router.lifespan_context(app):
            pass


async def test_without_instrument_the_first_request_logs_an_error_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = _misordered_app()
    caplog.set_level(logging.ERROR, logger="fastapi_concurrency_limiter")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for _ in range(3):
            assert (await client.get("/report")).status_code == 200
            assert (await client.get("/fine")).status_code == 200
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "'GET /report'" in errors[0].getMessage()
    assert "under the route decorator" in errors[0].getMessage()


def test_the_right_order_and_a_function_served_both_ways_pass_instrument() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()

    async def shared() -> None: ...

    app.get("/open")(shared)
    app.get("/limited")(limiter.resources([db])(shared))

    @app.get("/fine")
    @limiter.resources([db])
    async def fine() -> None: ...

    limiter.instrument(app)


async def test_a_function_served_both_ways_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()

    async def shared() -> None: ...

    app.get("/open")(shared)
    app.get("/limited")(limiter.resources([db])(shared))
    caplog.set_level(logging.ERROR, logger="fastapi_concurrency_limiter")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/open")).status_code == 200
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]


def test_a_misordered_route_of_a_router_logs_an_error_when_decorated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    router = APIRouter()
    caplog.set_level(logging.ERROR, logger="fastapi_concurrency_limiter")

    @limiter.resources([db])
    @router.get("/items")
    async def items() -> None: ...

    assert [r.getMessage() for r in caplog.records if "'GET /items'" in r.getMessage()]
