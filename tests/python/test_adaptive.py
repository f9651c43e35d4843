"""The runtime limit (``limit``, ``set_limit``) and adaptive resources."""

from __future__ import annotations

import asyncio
import builtins
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from starlette.requests import ClientDisconnect
from starlette.websockets import WebSocketDisconnect

from fastapi_concurrency_limiter import AdaptiveLimit, Limiter, Resource

from .conftest import eventually

Client = Callable[[FastAPI], httpx.AsyncClient]

pytestmark = pytest.mark.anyio


def test_limit_is_the_capacity_unless_changed() -> None:
    db = Resource(3, name="db")
    assert (db.limit, db.adaptive) == (3, False)
    db.set_limit(2)
    assert (db.capacity, db.limit, db.statistics().limit) == (3, 2, 2)
    assert "limit=2" in repr(db)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (0, ValueError, "limit must be an integer >= 1"),
        (4, ValueError, r"limit of resource 'db' must be an integer in \[1, capacity=3\], got 4"),
        (1.5, TypeError, "limit must be an integer"),
        (True, TypeError, "limit must be an integer"),
    ],
)
def test_set_limit_rejects_values_outside_one_to_capacity(
    bad: object, error: type[Exception], match: str
) -> None:
    db = Resource(3, name="db")
    with pytest.raises(error, match=match):
        db.set_limit(bad)  # type: ignore[arg-type]
    assert db.limit == 3


async def test_raising_the_limit_grants_waiters_at_once_and_lowering_revokes_nothing() -> None:
    db = Resource(3, name="db")
    db.set_limit(1)
    limiter = Limiter(timeout=5, resources=[db])
    entered: list[int] = []
    release = asyncio.Event()

    async def user(i: int) -> None:
        async with limiter.acquire([db]):
            entered.append(i)
            await release.wait()

    tasks = [asyncio.create_task(user(i)) for i in range(3)]
    await eventually(lambda: db.waiting == 2)
    assert entered == [0]
    db.set_limit(3)
    await eventually(lambda: len(entered) == 3)
    db.set_limit(1)  # the three keep their slots
    assert db.in_use == 3
    release.set()
    await asyncio.gather(*tasks)
    assert (db.in_use, db.limit) == (0, 1)


def test_adaptive_true_starts_at_twenty_or_the_capacity() -> None:
    db = Resource(50, adaptive=True)
    assert (db.adaptive, db.limit, db.capacity) == (True, 20, 50)
    assert Resource(8, adaptive=True).limit == 8
    assert Resource(50, adaptive=AdaptiveLimit(initial_limit=5)).limit == 5


@pytest.mark.parametrize(
    ("adaptive", "error", "match"),
    [
        ("yes", TypeError, "adaptive must be a bool or an AdaptiveLimit, got str 'yes'"),
        (AdaptiveLimit(min_limit=0), ValueError, "min_limit must be an integer >= 1"),
        (AdaptiveLimit(min_limit=5), ValueError, r"min_limit must be <= capacity \(4\)"),
        (AdaptiveLimit(initial_limit=9), ValueError, "initial_limit must be <= capacity"),
        (
            AdaptiveLimit(min_limit=3, initial_limit=2),
            ValueError,
            r"AdaptiveLimit.initial_limit must be an integer >= 3",
        ),
        (AdaptiveLimit(tolerance=1), ValueError, r"AdaptiveLimit.tolerance must be a number > 1"),
        (AdaptiveLimit(backoff=1.5), ValueError, r"backoff must be a number in \(0, 1\)"),
        (AdaptiveLimit(drop_rate=1), ValueError, r"drop_rate must be a number in \[0, 1\)"),
        (AdaptiveLimit(window=-1), ValueError, "AdaptiveLimit.window must be a finite number"),
        (AdaptiveLimit(min_window_samples=0), ValueError, "AdaptiveLimit.min_window_samples"),
        (AdaptiveLimit(tolerance="x"), TypeError, "AdaptiveLimit.tolerance must be a number"),  # type: ignore[arg-type]
        (
            AdaptiveLimit(algorithm="netflix"),
            ValueError,
            r"AdaptiveLimit.algorithm must be one of 'gradient2', 'vegas', 'aimd', "
            r"'gradient', got 'netflix'",
        ),
        (AdaptiveLimit(algorithm=2), ValueError, "AdaptiveLimit.algorithm must be one of"),  # type: ignore[arg-type]
        (
            AdaptiveLimit(algorithm="vegas", tolerance=0.5),
            ValueError,
            r"AdaptiveLimit.tolerance must be a number > 1",
        ),
    ],
)
def test_adaptive_settings_are_validated_at_start_up(
    adaptive: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Resource(4, adaptive=adaptive)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["gradient2", "vegas", "aimd", "gradient"])
async def test_every_algorithm_starts_adapts_to_drops_and_shows_its_limit(algorithm: str) -> None:
    """Each algorithm by name: the limit starts where asked, a failed
    request cuts it (x backoff), and statistics show the limit in force."""
    db = Resource(
        10,
        adaptive=AdaptiveLimit(
            algorithm=algorithm, initial_limit=8, window=0, min_window_samples=1, drop_rate=0
        ),
    )
    assert db.limit == 8
    limiter = Limiter(timeout=1, resources=[db])
    async with limiter.acquire([db]):
        pass  # (the first release only marks the start)
    with pytest.raises(ValueError):
        async with limiter.acquire([db]):
            raise ValueError("query failed")
    assert db.limit == 7  # 8 x 0.9, rounded down
    assert db.statistics().limit == 7


def test_the_default_algorithm_is_gradient2() -> None:
    assert AdaptiveLimit().algorithm == "gradient2"


async def test_adaptive_limit_moves_when_service_time_grows_with_concurrency() -> None:
    """A downstream with a knee at 2: past it, each request takes longer in
    proportion to the number in flight. 20 busy clients against a limit
    starting at 20 make it move down (in real time on a loaded machine:
    only that it reacts; tests/cpp/limit_grid_test.cc checks where it settles, in
    simulated time)."""
    db = Resource(
        20, name="db", adaptive=AdaptiveLimit(window=0.05, min_window_samples=5)
    )
    limiter = Limiter(timeout=30, resources=[db])
    stop = time.monotonic() + 10.0
    lowest = db.limit

    async def client() -> None:
        nonlocal lowest
        while time.monotonic() < stop and lowest > 8:
            async with limiter.acquire([db]):
                await asyncio.sleep(0.01 * max(1.0, db.in_use / 2))
            lowest = min(lowest, db.limit)

    await asyncio.gather(*(client() for _ in range(20)))
    assert lowest <= 16
    assert db.statistics().limit == db.limit


async def test_handler_errors_count_as_drops_and_cut_the_limit(asgi_client: Client) -> None:
    db = Resource(20, name="db", adaptive=AdaptiveLimit(window=0, min_window_samples=5))
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()

    @app.get("/missing")
    @limiter.resources([db])
    async def missing() -> None:
        raise HTTPException(status_code=404)  # the handler's answer, not a failure

    @app.get("/broken")
    @limiter.resources([db])
    async def broken() -> None:
        raise RuntimeError("downstream failed")

    async with asgi_client(app) as client:
        for _ in range(20):
            assert (await client.get("/missing")).status_code == 404
        assert db.limit == 20
        for _ in range(20):
            with pytest.raises(RuntimeError):
                await client.get("/broken")
    assert db.limit < 20


async def test_errors_inside_limiter_acquire_count_as_drops() -> None:
    db = Resource(10, adaptive=AdaptiveLimit(window=0, min_window_samples=1))
    limiter = Limiter(timeout=1, resources=[db])
    # (The algorithm leaves out the requests granted before the first
    # release: they started on an idle downstream.)
    async with limiter.acquire([db]):
        pass
    with pytest.raises(ValueError):
        async with limiter.acquire([db]):
            raise ValueError("query failed")
    assert db.limit == 9  # x 0.9
    async with limiter.acquire([db]):
        pass
    assert db.limit == 9


async def test_set_limit_on_an_adaptive_resource_is_where_it_moves_on_from() -> None:
    """The limit set by hand stays in force: the algorithm moves on from it at
    its next decision instead of putting its own limit back at the next
    release."""
    db = Resource(50, adaptive=True)
    limiter = Limiter(timeout=None, resources=[db])
    assert db.limit == 20
    db.set_limit(5)
    for _ in range(3):
        async with limiter.acquire([db]):
            await asyncio.sleep(0.001)
        assert db.limit == 5
    assert db.statistics().limit == 5


# (BaseExceptionGroup, ExceptionGroup) from Python 3.11.
_GROUPS: tuple[Any, Any] = (
    getattr(builtins, "BaseExceptionGroup", None),
    getattr(builtins, "ExceptionGroup", None),
)


def _client_ends() -> list[BaseException]:
    ends: list[BaseException] = [ClientDisconnect(), WebSocketDisconnect(code=1000),
                                 WebSocketDisconnect(code=1006)]
    if sys.version_info >= (3, 11):
        ends += [
            _GROUPS[0]("tasks", [ClientDisconnect(), asyncio.CancelledError()]),
            _GROUPS[1]("tasks", [HTTPException(status_code=404)]),
        ]
    return ends


@pytest.mark.parametrize("end", _client_ends(), ids=repr)
async def test_ends_that_are_the_clients_doing_are_not_drops(end: BaseException) -> None:
    """A client that went away (a request body it stopped sending, a closed
    WebSocket), or a task group of nothing but such ends and handler answers,
    says nothing about the downstream: the limit is not cut."""
    db = Resource(10, adaptive=AdaptiveLimit(window=0, min_window_samples=1))
    limiter = Limiter(timeout=1, resources=[db])
    async with limiter.acquire([db]):
        pass  # (the first release only marks the start)
    for _ in range(5):
        with pytest.raises(type(end)):
            async with limiter.acquire([db]):
                raise end
    assert db.limit == 10


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are 3.11+")
async def test_a_task_group_with_a_failure_is_a_drop() -> None:
    db = Resource(10, adaptive=AdaptiveLimit(window=0, min_window_samples=1))
    limiter = Limiter(timeout=1, resources=[db])
    async with limiter.acquire([db]):
        pass
    group = _GROUPS[1]
    with pytest.raises(group):
        async with limiter.acquire([db]):
            raise group("tasks", [ClientDisconnect(), RuntimeError("query failed")])
    assert db.limit == 9  # x 0.9
