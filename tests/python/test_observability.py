"""Statistics, Prometheus metrics, OpenAPI documentation and logs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy
from fastapi_concurrency_limiter.prometheus import metrics_app

from .conftest import eventually, held_elsewhere

pytestmark = pytest.mark.anyio
Client = Callable[[FastAPI], httpx.AsyncClient]


async def scripted() -> tuple[Limiter, Resource, object]:
    """2 granted at once, 1 waits and is granted, 1 times out, 1 finds the
    queue full; all released but the waiter's slot (held by the returned
    object)."""
    db = Resource(2, name="db", max_waiting=1)
    limiter = Limiter(timeout=30, resources=[db])
    held = limiter.acquire([db])
    async with held_elsewhere(limiter, [db]):
        async with held_elsewhere(limiter, [db]):
            with pytest.raises(ServerBusy) as timed_out:
                async with limiter.acquire([db], timeout=0.001):
                    pass
            assert timed_out.value.reason == "timeout"
            waiter = asyncio.ensure_future(held.__aenter__())
            await eventually(lambda: db.waiting == 1)
            with pytest.raises(ServerBusy) as full:
                async with limiter.acquire([db]):
                    pass
            assert full.value.reason == "queue_full"
        # The inner holder's exit handed its slot to the waiter.
        await waiter
        assert db.in_use == 2
    return limiter, db, held


async def test_statistics_match_a_scripted_sequence() -> None:
    limiter, db, _held = await scripted()
    s = db.statistics()
    assert (s.name, s.capacity, s.in_use, s.waiting, s.peak_in_use) == ("db", 2, 1, 0, 2)
    assert s.max_waiting == 1 and s.queue == "fifo"
    assert s.acquired_total == 3
    assert dict(s.rejected_total) == {
        "timeout": 1, "queue_full": 1, "shed": 0, "disconnected": 0, "cancelled": 0
    }
    assert s.wait_seconds.count == 3 and s.wait_seconds.counts[0] >= 2  # two waited 0 s
    assert s.hold_seconds.count == 2  # the waiter still holds its slot
    assert sum(s.hold_seconds.counts) == 2
    assert limiter.statistics()["db"] == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.in_use = 5  # type: ignore[misc]
    # Plain data: serialisable as is, e.g. for a JSON status endpoint.
    assert dataclasses.asdict(limiter.statistics())["resources"][0]["acquired_total"] == 3


async def test_prometheus_exposition_parses_and_carries_the_counters(asgi_client: Client) -> None:
    limiter, db, _held = await scripted()
    registry = CollectorRegistry()
    app = FastAPI()
    app.mount("/metrics", metrics_app(limiter, registry))
    async with asgi_client(app) as client:
        text = (await client.get("/metrics/")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    db_label = (("resource", "db"),)
    assert samples[("concurrency_limiter_capacity", db_label)] == 2
    assert samples[("concurrency_limiter_in_use", db_label)] == 1
    assert samples[("concurrency_limiter_acquired_total", db_label)] == 3
    assert samples[("concurrency_limiter_rejected_total",
                    (("reason", "timeout"), ("resource", "db")))] == 1
    assert samples[("concurrency_limiter_rejected_total",
                    (("reason", "queue_full"), ("resource", "db")))] == 1
    assert samples[("concurrency_limiter_wait_seconds_count", db_label)] == 3
    assert samples[("concurrency_limiter_hold_seconds_count", db_label)] == 2
    inf = (("le", "+Inf"), ("resource", "db"))
    assert samples[("concurrency_limiter_wait_seconds_bucket", inf)] == 3
    buckets = [v for (name, labels), v in samples.items()
               if name == "concurrency_limiter_wait_seconds_bucket"]
    assert buckets == sorted(buckets)  # cumulative


@pytest.mark.parametrize("retry_after", [1, None])
async def test_openapi_documents_the_503_of_limited_routes_only(retry_after: int | None) -> None:
    app = FastAPI()
    db = Resource(1)
    limiter = Limiter(timeout=1, resources=[db], retry_after=retry_after)
    limiter.instrument(app)

    @app.get("/limited")
    @limiter.resources([db])
    async def limited() -> dict[str, str]:
        return {}

    @app.get("/free")
    async def free() -> dict[str, str]:
        return {}

    paths = app.openapi()["paths"]
    busy = paths["/limited"]["get"]["responses"]["503"]
    schema = busy["content"]["application/json"]["schema"]
    assert schema["properties"]["detail"]["type"] == "string"
    assert schema["required"] == ["detail"]
    assert ("headers" in busy) is (retry_after is not None)
    if retry_after is not None:
        assert busy["headers"]["Retry-After"]["schema"]["type"] == "integer"
    assert "200" in paths["/limited"]["get"]["responses"]
    assert "503" not in paths["/free"]["get"]["responses"]


async def test_a_burst_of_rejections_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Resource(1, name="burst-db", max_waiting=0)
    limiter = Limiter(timeout=1, resources=[db])
    caplog.set_level(logging.WARNING, logger="fastapi_concurrency_limiter")
    async with held_elsewhere(limiter, [db]):
        for _ in range(1000):
            with pytest.raises(ServerBusy):
                async with limiter.acquire([db]):
                    pass
    lines = [r for r in caplog.records if r.name == "fastapi_concurrency_limiter"]
    assert 1 <= len(lines) <= 3
    assert "burst-db" in lines[0].getMessage() and "queue_full" in lines[0].getMessage()
    assert db.statistics().rejected_total["queue_full"] == 1000
