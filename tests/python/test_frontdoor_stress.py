"""Every entry point at once under random timeouts, cancellations, errors
and keys: nothing stays held or queued."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fastapi_concurrency_limiter import Limiter, Resource

from .conftest import eventually

pytestmark = pytest.mark.anyio


def header_key(request: Request) -> str | None:
    return request.headers.get("x-key")


async def test_random_timeouts_cancellations_and_errors_leave_nothing_held() -> None:
    rng = random.Random(2026)
    db = Resource(3, name="db", per_key=2)
    files = Resource(2, name="files", per_key=1)
    limiter = Limiter(timeout=0.02, resources=[db, files])

    async def work(fail: bool) -> None:
        await asyncio.sleep(rng.random() * 0.005)
        if fail:
            raise KeyError("boom")

    app = FastAPI()
    router = APIRouter(dependencies=[Depends(limiter.dependency([db], key=header_key))])

    @router.get("/router")
    async def routed(fail: bool = False) -> dict[str, int]:
        await work(fail)
        return {"ok": 1}

    @app.get("/decorated")
    @limiter.resources([db, files], key=header_key)
    async def decorated(fail: bool = False) -> dict[str, int]:
        await work(fail)
        return {"ok": 1}

    async def mounted(request: Request) -> Response:
        await work(request.query_params.get("fail") == "true")
        return PlainTextResponse("ok")

    app.include_router(router)
    app.mount(
        "/mount",
        limiter.asgi([files], key=lambda c: c.headers.get("x-key"))(
            Starlette(routes=[Route("/", mounted)])
        ),
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    codes: list[int] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:

        async def one() -> None:
            path = rng.choice(["/router", "/decorated", "/mount/"])
            headers = {"x-key": rng.choice("abc")} if rng.random() < 0.8 else {}
            params = {"fail": "true"} if rng.random() < 0.1 else {}
            try:
                r = await asyncio.wait_for(
                    client.get(path, headers=headers, params=params), rng.random() * 0.03
                )
                codes.append(r.status_code)
            except asyncio.TimeoutError:
                codes.append(0)

        await asyncio.gather(*[one() for _ in range(600)])
        assert set(codes) <= {0, 200, 500, 503}
        assert 0 in codes or 503 in codes
        # After the storm every entry point still serves (however slow the
        # machine was, which decides how many of the storm's requests got in).
        for path in ("/router", "/decorated", "/mount/"):
            assert (await client.get(path, headers={"x-key": "a"})).status_code == 200
    for resource in (db, files):
        await eventually(lambda r=resource: (r.in_use, r.waiting) == (0, 0))  # type: ignore[misc]
    assert db.statistics().active_keys == files.statistics().active_keys == 0
