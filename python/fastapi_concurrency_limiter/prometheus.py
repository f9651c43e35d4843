"""Prometheus metrics of limiters (``pip install fastapi-concurrency-limiter[prometheus]``).

Expose them from the same FastAPI app with one line::

    from fastapi_concurrency_limiter.prometheus import metrics_app

    app.mount("/metrics", metrics_app(limiter))

Metrics (all labelled ``resource``; counters and histograms are totals since
the process started, as Prometheus expects):

    concurrency_limiter_capacity                   gauge
    concurrency_limiter_limit                      gauge (slots in force, <= capacity)
    concurrency_limiter_in_use                     gauge
    concurrency_limiter_waiting                    gauge
    concurrency_limiter_peak_in_use                gauge
    concurrency_limiter_max_waiting                gauge (absent when unbounded)
    concurrency_limiter_acquired_total             counter
    concurrency_limiter_rejected_total{reason}     counter (timeout, queue_full,
                                                   shed, disconnected, cancelled)
    concurrency_limiter_wait_seconds               histogram (granted requests)
    concurrency_limiter_hold_seconds               histogram

The values are read from the engine's statistics at scrape time: nothing is
added to the request path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "fastapi_concurrency_limiter.prometheus needs prometheus-client: "
        "pip install 'fastapi-concurrency-limiter[prometheus]'"
    ) from e

from ._limiter import Limiter
from ._statistics import HistogramSnapshot

PREFIX = "concurrency_limiter"


def _buckets(h: HistogramSnapshot) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets and the sum."""
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(h.bounds, h.counts[:-1], strict=True):
        cumulative += count
        buckets.append((repr(bound), cumulative))
    buckets.append(("+Inf", h.count))
    return buckets, h.sum


class LimiterCollector(Collector):
    """Collects the statistics of ``limiters`` at each scrape."""

    def __init__(self, *limiters: Limiter) -> None:
        self._limiters = limiters

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "capacity": GaugeMetricFamily(
                f"{PREFIX}_capacity", "Slots of the resource.", labels=["resource"]
            ),
            "limit": GaugeMetricFamily(
                f"{PREFIX}_limit",
                "Slots in force right now (capacity unless lowered, e.g. by an adaptive limit).",
                labels=["resource"],
            ),
            "in_use": GaugeMetricFamily(
                f"{PREFIX}_in_use", "Slots held right now.", labels=["resource"]
            ),
            "waiting": GaugeMetricFamily(
                f"{PREFIX}_waiting", "Requests waiting for a slot right now.", labels=["resource"]
            ),
            "peak_in_use": GaugeMetricFamily(
                f"{PREFIX}_peak_in_use", "Most slots ever held at once.", labels=["resource"]
            ),
            "max_waiting": GaugeMetricFamily(
                f"{PREFIX}_max_waiting", "Longest queue allowed.", labels=["resource"]
            ),
        }
        acquired = CounterMetricFamily(
            f"{PREFIX}_acquired", "Slots granted.", labels=["resource"]
        )
        rejected = CounterMetricFamily(
            f"{PREFIX}_rejected", "Requests turned away, by reason.", labels=["resource", "reason"]
        )
        wait = HistogramMetricFamily(
            f"{PREFIX}_wait_seconds",
            "Time from request to grant, of granted requests.",
            labels=["resource"],
        )
        hold = HistogramMetricFamily(
            f"{PREFIX}_hold_seconds", "Time from grant to release.", labels=["resource"]
        )
        for limiter in self._limiters:
            for s in limiter.statistics().resources:
                for key, family in gauges.items():
                    value: Any = getattr(s, key)
                    if value is not None:
                        family.add_metric([s.name], value)
                acquired.add_metric([s.name], s.acquired_total)
                for reason, count in s.rejected_total.items():
                    rejected.add_metric([s.name, reason], count)
                wait.add_metric([s.name], *_buckets(s.wait_seconds))
                hold.add_metric([s.name], *_buckets(s.hold_seconds))
        yield from gauges.values()
        yield acquired
        yield rejected
        yield wait
        yield hold


_registered: dict[tuple[int, int], LimiterCollector] = {}


def register(limiter: Limiter, registry: CollectorRegistry = REGISTRY) -> LimiterCollector:
    """Registers ``limiter``'s metrics with ``registry`` (once)."""
    key = (id(limiter), id(registry))
    collector = _registered.get(key)
    if collector is None:
        collector = _registered[key] = LimiterCollector(limiter)
        registry.register(collector)
    return collector


def metrics_app(limiter: Limiter, registry: CollectorRegistry = REGISTRY) -> Any:
    """An ASGI app serving ``registry`` (with ``limiter``'s metrics) in the
    Prometheus text format: ``app.mount("/metrics", metrics_app(limiter))``."""
    register(limiter, registry)
    return make_asgi_app(registry=registry)
