"""Resource(early_reject=True): a request predicted to time out gets its 503
at once, with reason ``predicted_timeout``, without running its handler."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from fastapi_concurrency_limiter import Limiter, Priority, Resource, ServerBusy
from fastapi_concurrency_limiter._errors import RETRY_AFTER_CAP, Rejection

from .conftest import eventually, held_elsewhere

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["process", "host"])
def scope_and_name(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """Each scope; a host resource gets a fresh name, and its shared segment
    (which outlives the process) is removed afterwards."""
    if request.param == "process":
        yield "process", "db"
        return
    name = f"py{os.getpid()}-early-{time.monotonic_ns() % 10**9}"
    yield "host", name
    shm = Path(os.environ.get("FCL_HOST_DIR") or f"/dev/shm/fcl-host.{os.getuid()}") / name
    shm.unlink(missing_ok=True)


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


@pytest.mark.parametrize("retry_after", [1, 30, None])
async def test_an_early_refusal_asks_the_client_to_stay_away_as_long_as_it_would_have_waited(  # type: ignore[no-untyped-def]
    asgi_client, scope_and_name: tuple[str, str], retry_after: int | None
) -> None:
    # A client told to retry in 1 s would meet the same queue: it is told the
    # predicted wait plus the limiter's retry_after, and no header stays no
    # header.
    scope, name = scope_and_name
    db = Resource(1, name=name, scope=scope, early_reject=True)  # type: ignore[arg-type]
    limiter = Limiter(timeout=0.1, resources=[db], retry_after=retry_after)
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

    async with asgi_client(app) as client:
        # The first hold is the estimate: at least 0.3 s.
        assert (await client.get("/work", params={"hold": 0.3})).status_code == 200
        async with held_elsewhere(limiter, [db]):
            waiting = [asyncio.create_task(client.get("/patient")) for _ in range(10)]
            await eventually(lambda: db.waiting == 10)
            estimate = db.statistics().service_seconds
            assert estimate is not None and estimate >= 0.3
            r = await client.get("/work")
            assert r.status_code == 503
            assert r.json() == {"detail": "Server busy, please retry later"}
            predicted = math.ceil(10 * estimate)  # ten ahead on one slot: >= 3 s
            if retry_after is None:
                assert "retry-after" not in r.headers
            else:
                assert r.headers["retry-after"] == str(predicted + retry_after)
        assert all(r.status_code == 200 for r in await asyncio.gather(*waiting))
    s = db.statistics()
    assert s.rejected_total["predicted_timeout"] == 1
    assert (s.in_use, s.waiting) == (0, 0)


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


async def test_the_predicted_wait_counts_the_whole_queue_ahead_behind_a_lower_class(  # type: ignore[no-untyped-def]
    asgi_client, scope_and_name: tuple[str, str]
) -> None:
    # Ten CRITICAL requests wait on one slot, a SHEDDABLE one behind them; a
    # CRITICAL newcomer with 0.1 s to wait is told the ten's whole wait.
    scope, name = scope_and_name
    db = Resource(1, name=name, scope=scope, early_reject=True)  # type: ignore[arg-type]
    limiter = Limiter(timeout=0.1, resources=[db], retry_after=1)
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

    @app.get("/background")
    @limiter.resources([db], timeout=60, priority=Priority.SHEDDABLE)
    async def background() -> dict[str, int]:
        return {"ok": 1}

    async with asgi_client(app) as client:
        assert (await client.get("/work", params={"hold": 0.3})).status_code == 200
        async with held_elsewhere(limiter, [db]):
            waiting = [asyncio.create_task(client.get("/patient")) for _ in range(10)]
            await eventually(lambda: db.waiting == 10)
            waiting.append(asyncio.create_task(client.get("/background")))
            await eventually(lambda: db.waiting == 11)
            estimate = db.statistics().service_seconds
            assert estimate is not None and estimate >= 0.3
            r = await client.get("/work")
            assert r.status_code == 503
        assert all(w.status_code == 200 for w in await asyncio.gather(*waiting))
    assert db.statistics().rejected_total["predicted_timeout"] == 1
    assert r.headers["retry-after"] == str(math.ceil(10 * estimate) + 1)
