"""Resource(early_reject=True): a request predicted to time out gets its 503
at once, with reason ``predicted_timeout``, without running its handler."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy

from .conftest import eventually, held_elsewhere

pytestmark = pytest.mark.anyio


def _app(limiter: Limiter, db: Resource, runs: list[str]) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(ServerBusy)
    async def busy(request: object, exc: ServerBusy) -> JSONResponse:
        return JSONResponse({"reason": exc.reason}, status_code=exc.status_code)

    @app.get("/work")
    @limiter.resources([db])
    async def work() -> dict[str, int]:
        runs.append("work")
        await asyncio.sleep(0.02)  # every hold lasts at least 20 ms
        return {"ok": 1}

    @app.get("/patient")
    @limiter.resources([db], timeout=60)
    async def patient() -> dict[str, int]:
        runs.append("patient")
        return {"ok": 1}

    return app


async def test_predicted_timeout_is_refused_at_once_without_running(  # type: ignore[no-untyped-def]
    asgi_client, scope_and_name: tuple[str, str]
) -> None:
    # With scope="host" the waiters and the estimate are machine-wide.
    scope, name = scope_and_name
    db = Resource(1, name=name, scope=scope, early_reject=True)  # type: ignore[arg-type]
    limiter = Limiter(timeout=0.1, resources=[db])
    runs: list[str] = []
    async with asgi_client(_app(limiter, db, runs)) as client:
        # No estimate yet: nothing is refused early. This hold teaches it.
        assert db.statistics().service_seconds is None
        assert (await client.get("/work")).status_code == 200
        estimate = db.statistics().service_seconds
        assert estimate is not None and estimate >= 0.02
        async with held_elsewhere(limiter, [db]):
            # Ten requests that will wait a minute queue (10 x 20 ms < 60 s).
            waiting = [asyncio.create_task(client.get("/patient")) for _ in range(10)]
            await eventually(lambda: db.waiting == 10)
            # Behind them a 0.1 s request would wait >= 10 x 20 ms: refused
            # on arrival, never queued.
            r = await client.get("/work")
            assert (r.status_code, r.json()) == (503, {"reason": "predicted_timeout"})
            assert db.waiting == 10
        assert all(r.status_code == 200 for r in await asyncio.gather(*waiting))
    assert runs == ["work"] + ["patient"] * 10  # the refused handler never ran
    s = db.statistics()
    assert s.rejected_total["predicted_timeout"] == 1
    assert s.rejected_total["timeout"] == 0
    assert (s.in_use, s.waiting) == (0, 0)


def test_early_reject_is_validated() -> None:
    assert Resource(1).early_reject is False
    assert Resource(1, early_reject=True).early_reject is True
    with pytest.raises(TypeError, match=r"early_reject must be True or False, got 1"):
        Resource(1, early_reject=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"early_reject is not supported with per_key"):
        Resource(2, per_key=1, early_reject=True)
