"""Bad configuration fails at start-up with a message naming the parameter."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI, Request

from fastapi_concurrency_limiter import Limiter, Resource


@pytest.mark.parametrize("capacity", [0, -3])
def test_capacity_below_one_is_a_value_error(capacity: int) -> None:
    with pytest.raises(ValueError, match=r"capacity must be an integer >= 1"):
        Resource(capacity)


@pytest.mark.parametrize("capacity", [True, 2.0, "3", None])
def test_capacity_of_another_type_is_a_type_error(capacity: object) -> None:
    with pytest.raises(TypeError, match=r"capacity must be an integer >= 1"):
        Resource(capacity)  # type: ignore[arg-type]


def test_resource_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"max_waiting must be an integer >= 0 or None"):
        Resource(1, max_waiting=-1)
    with pytest.raises(ValueError, match=r"queue must be one of 'fifo', 'lifo', 'adaptive'"):
        Resource(1, queue="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"name must be a non-empty str"):
        Resource(1, name="")
    with pytest.raises(TypeError, match=r"name must be a non-empty str"):
        Resource(1, name=5)  # type: ignore[arg-type]
    too_long = r"timeout must be a finite number of seconds >= 0 and <= 1e\+09"
    with pytest.raises(ValueError, match=too_long):
        Limiter(timeout=1e12, resources=[Resource(1)])
    with pytest.raises(ValueError, match=r"adaptive_target must be a finite number of seconds > 0"):
        Resource(1, queue="adaptive", adaptive_target=0)


def test_names_are_generated_unique_and_readable() -> None:
    a, b = Resource(1), Resource(1)
    assert a.name != b.name
    assert Resource(1, name="db").name == "db"


@pytest.mark.parametrize("timeout", [-1, math.nan, math.inf, 2e9])
def test_limiter_timeout_must_be_finite_and_not_negative(timeout: float) -> None:
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds >= 0"):
        Limiter(timeout=timeout, resources=[Resource(1)])


def test_limiter_timeout_must_be_a_number() -> None:
    with pytest.raises(TypeError, match=r"timeout must be a finite number"):
        Limiter(timeout="5", resources=[Resource(1)])  # type: ignore[arg-type]


def test_limiter_rejects_duplicate_registration_and_non_resources() -> None:
    db = Resource(1)
    with pytest.raises(ValueError, match=r"registered twice"):
        Limiter(timeout=1, resources=[db, db])
    with pytest.raises(ValueError, match=r"two resources are named 'db'"):
        Limiter(timeout=1, resources=[Resource(1, name="db"), Resource(2, name="db")])
    with pytest.raises(TypeError, match=r"resources\[1\] must be a Resource"):
        Limiter(timeout=1, resources=[db, 5])  # type: ignore[list-item]


def test_decorator_rejects_bad_resource_lists_at_decoration_time() -> None:
    db, file, stray = Resource(1, name="db"), Resource(1, name="file"), Resource(1, name="stray")
    limiter = Limiter(timeout=1, resources=[db, file])
    out_of_order = r"registration order \['db', 'file'\].*got \['file', 'db'\]"
    with pytest.raises(ValueError, match=out_of_order):
        limiter.resources([file, db])
    with pytest.raises(ValueError, match=r"'stray' is not registered"):
        limiter.resources([stray])
    with pytest.raises(ValueError, match=r"'db' is listed twice"):
        limiter.resources([db, db])
    with pytest.raises(ValueError, match=r"at least one resource"):
        limiter.resources([])
    with pytest.raises(TypeError, match=r"resources\[0\] must be a Resource"):
        limiter.resources(["db"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"timeout must be"):
        limiter.resources([db], timeout=-1)
    with pytest.raises(ValueError, match=r"retry_after must be an integer >= 0 or None"):
        Limiter(timeout=1, resources=[db], retry_after=-1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Resource(2**63), r"capacity must be an integer >= 1 and <= 2147483647, got 922"),
        (lambda: Resource(2**31), r"capacity must be an integer >= 1 and <= 2147483647, got 214"),
        (
            lambda: Resource(1, max_waiting=2**63),
            r"max_waiting must be an integer >= 0 and <= 9223372036854775807 or None, got 922",
        ),
        (
            lambda: Resource(3, name="big").set_limit(2**63),
            r"limit of resource 'big' must be an integer in \[1, capacity=3\], got 922",
        ),
    ],
)
def test_integers_too_large_for_the_engine_get_the_usual_range_error(
    make: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.anyio
async def test_a_plain_with_on_acquire_says_to_use_async_with() -> None:
    db = Resource(1)
    limiter = Limiter(timeout=1, resources=[db])
    with pytest.raises(TypeError, match=r"'async with limiter.acquire\(\[\.\.\.\]\):'"):
        with limiter.acquire([db]):  # type: ignore[attr-defined]
            pass
    assert (db.in_use, db.waiting) == (0, 0)


def test_a_limiter_without_resources_is_allowed_and_limits_nothing() -> None:
    # As in the original package: e.g. a configuration that lists none yet.
    limiter = Limiter(timeout=1, resources=[])
    assert limiter.statistics().resources == ()
    with pytest.raises(ValueError, match="is not registered with this Limiter"):
        limiter.resources([Resource(1, name="elsewhere")])


def _keyed_app(key: Callable[..., object]) -> tuple[FastAPI, Resource]:
    db = Resource(2, name="db", per_key=1)
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()

    @app.get("/work")
    @limiter.resources([db], key=key)
    async def work() -> dict[str, int]:
        return {"active_keys": db.statistics().active_keys}

    return app, db


@pytest.mark.anyio
@pytest.mark.parametrize("value", [42, uuid.UUID(int=7)])
async def test_a_key_function_may_return_an_int_or_a_uuid(value: object) -> None:
    app, db = _keyed_app(lambda request: value)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        response = await client.get("/work")
    assert response.status_code == 200 and response.json() == {"active_keys": 1}
    assert (db.in_use, db.waiting) == (0, 0)


@pytest.mark.anyio
async def test_a_key_function_returning_another_type_is_refused_naming_key_and_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def tenant_of(request: Request) -> object:
        return ("acme", 1)

    app, db = _keyed_app(tenant_of)
    caplog.set_level(logging.ERROR, logger="fastapi_concurrency_limiter")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        refused = r"key: .*tenant_of returned a tuple; .* str, an int"
        for _ in range(3):
            with pytest.raises(TypeError, match=refused):
                await client.get("/work")
    assert len([r for r in caplog.records if "tenant_of returned a tuple" in r.getMessage()]) == 1
    assert (db.in_use, db.waiting) == (0, 0)
