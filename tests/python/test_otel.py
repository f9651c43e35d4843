"""OpenTelemetry metrics, read with the SDK's in-memory reader."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy, otel  # noqa: E402

from .conftest import held_elsewhere  # noqa: E402

pytestmark = pytest.mark.anyio


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "fastapi_concurrency_limiter"
            for metric in sm.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def value(found: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    wanted = {f"concurrency_limiter.{k}": v for k, v in attributes.items()}
    (point,) = [p for p in found[name] if dict(p.attributes) == wanted]
    return point


async def test_instruments_report_slots_queue_requests_and_durations() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    db = Resource(2, name="otel-db", max_waiting=0)
    other = Resource(1, name="otel-files")
    limiter = Limiter(timeout=0, resources=[db])
    second = Limiter(timeout=0, resources=[other])
    otel.instrument(limiter, meter_provider=provider)
    otel.instrument(limiter, meter_provider=provider)  # again: changes nothing
    otel.instrument(second, meter_provider=provider)
    for _ in range(3):
        async with limiter.acquire([db]):
            pass
    async with held_elsewhere(limiter, [db]), held_elsewhere(limiter, [db]):
        with pytest.raises(ServerBusy):
            async with limiter.acquire([db]):
                pass
        found = points(reader)
        assert value(found, "concurrency_limiter.slot.in_use", resource="otel-db").value == 2
    assert value(found, "concurrency_limiter.slot.capacity", resource="otel-db").value == 2
    assert value(found, "concurrency_limiter.slot.limit", resource="otel-db").value == 2
    assert value(found, "concurrency_limiter.queued_requests", resource="otel-db").value == 0
    assert value(found, "concurrency_limiter.slot.capacity", resource="otel-files").value == 1
    requests = "concurrency_limiter.requests"
    assert value(found, requests, resource="otel-db", result="acquired").value == 5
    assert value(found, requests, resource="otel-db", result="queue_full").value == 1
    assert value(found, requests, resource="otel-db", result="timeout").value == 0
    wait = value(found, "concurrency_limiter.request.time_in_queue", resource="otel-db")
    assert wait.count == 5 and wait.bucket_counts[0] == 5
    hold = value(found, "concurrency_limiter.request_lease.duration", resource="otel-db")
    assert hold.count == 3  # the two holders still hold

    found = points(reader)  # a second collection counts nothing twice
    hold = value(found, "concurrency_limiter.request_lease.duration", resource="otel-db")
    assert hold.count == 5
    wait = value(found, "concurrency_limiter.request.time_in_queue", resource="otel-db")
    assert wait.count == 5
    assert value(found, "concurrency_limiter.slot.in_use", resource="otel-db").value == 0


def test_instrument_refuses_what_is_not_a_limiter() -> None:
    with pytest.raises(TypeError, match="limiter must be a Limiter"):
        otel.instrument(object())  # type: ignore[arg-type]
