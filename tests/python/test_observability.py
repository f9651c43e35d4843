"""Statistics, Prometheus metrics, OpenAPI documentation and logs."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import weakref
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Gauge
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
        "timeout": 1, "queue_full": 1, "shed": 0, "disconnected": 0, "cancelled": 0,
        "key_limit": 0,
        "unavailable": 0,
        "deadline": 0,
        "predicted_timeout": 0,
        "lower_priority": 0,
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
    assert samples[("concurrency_limiter_limit", db_label)] == 2
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


async def scrape(asgi_client: Client, metrics: object) -> str:
    app = FastAPI()
    app.mount("/metrics", metrics)  # type: ignore[arg-type]
    async with asgi_client(app) as client:
        return (await client.get("/metrics/")).text


def in_use_by_resource(text: str) -> dict[str, float]:
    return {
        s.labels["resource"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "concurrency_limiter_in_use"
        for s in family.samples
    }


# auto_describe=True is how prometheus_client's default REGISTRY checks a
# new collector's names.
@pytest.mark.parametrize("auto_describe", [True, False])
async def test_any_number_of_limiters_share_one_registry(
    asgi_client: Client, auto_describe: bool
) -> None:
    shared = Resource(3, name="prom-shared")
    db, files = Resource(2, name="prom-db"), Resource(4, name="prom-files")
    first = Limiter(timeout=1, resources=[shared, db])
    second = Limiter(timeout=1, resources=[shared, files])
    registry = CollectorRegistry(auto_describe=auto_describe)
    metrics_app(first, registry)
    app = metrics_app(second, registry)
    async with first.acquire([shared, db]), second.acquire([files]):
        text = await scrape(asgi_client, app)
    # One family per name, whatever the number of limiters, and a resource
    # shared by both limiters reported once.
    for name in ("in_use", "capacity", "acquired_total", "wait_seconds"):
        assert text.count(f"# TYPE concurrency_limiter_{name} ") == 1, name
    assert in_use_by_resource(text) == {"prom-shared": 1, "prom-db": 1, "prom-files": 1}
    assert text.count('concurrency_limiter_capacity{resource="prom-shared"}') == 1


async def test_metrics_of_two_limiters_in_the_default_registry(asgi_client: Client) -> None:
    # What an app with two limiters does: metrics_app() for each, no registry.
    one = Limiter(timeout=1, resources=[Resource(1, name="prom-default-one")])
    two = Limiter(timeout=1, resources=[Resource(1, name="prom-default-two")])
    metrics_app(one)
    metrics_app(two)
    text = await scrape(asgi_client, metrics_app(one))  # again: changes nothing
    assert {"prom-default-one", "prom-default-two"} <= in_use_by_resource(text).keys()
    assert text.count("# TYPE concurrency_limiter_in_use ") == 1
    assert text.count('concurrency_limiter_in_use{resource="prom-default-one"}') == 1


async def test_metrics_keep_no_limiter_alive(asgi_client: Client) -> None:
    registry = CollectorRegistry()
    kept = Limiter(timeout=1, resources=[Resource(1, name="prom-kept")])
    app = metrics_app(kept, registry)
    limiter = Limiter(timeout=1, resources=[Resource(1, name="prom-dropped")])
    metrics_app(limiter, registry)
    assert "prom-dropped" in in_use_by_resource(await scrape(asgi_client, app))
    gone = weakref.ref(limiter)
    del limiter
    gc.collect()
    assert gone() is None
    assert in_use_by_resource(await scrape(asgi_client, app)) == {"prom-kept": 0}
    # A limiter created later under the same name reports again.
    again = Limiter(timeout=1, resources=[Resource(2, name="prom-dropped")])
    metrics_app(again, registry)
    assert in_use_by_resource(await scrape(asgi_client, app)) == {
        "prom-kept": 0, "prom-dropped": 0
    }


def test_two_resources_reported_under_one_name_are_refused() -> None:
    registry = CollectorRegistry()
    first = Limiter(timeout=1, resources=[Resource(1, name="prom-twice")])
    metrics_app(first, registry)
    other = Limiter(timeout=1, resources=[Resource(1, name="prom-twice")])
    with pytest.raises(ValueError, match=r"'prom-twice' is already reported"):
        metrics_app(other, registry)
    del first
    gc.collect()
    metrics_app(other, registry)  # the name is free again


def test_the_registry_knows_the_metric_names_without_a_scrape() -> None:
    # The collector describes its families, so a registry that does not
    # collect to find names (the default for CollectorRegistry()) still
    # refuses a second collector producing the same names.
    registry = CollectorRegistry()
    limiter = Limiter(timeout=1, resources=[Resource(1, name="prom-describe")])
    metrics_app(limiter, registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Gauge("concurrency_limiter_in_use", "clash", registry=registry)


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
