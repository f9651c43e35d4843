"""Prometheus metrics of limiters (``pip install fastapi-concurrency-limiter[prometheus]``).

Expose them from the same FastAPI app with one line::

    from fastapi_concurrency_limiter.prometheus import metrics_app

    app.mount("/metrics", metrics_app(limiter))

Metrics (all labelled ``resource``; counters and histograms are totals since
the process started, as Prometheus expects):

    concurrency_limiter_capacity                   gauge
    concurrency_limiter_in_use                     gauge
    concurrency_limiter_waiting                    gauge
    concurrency_limiter_peak_in_use                gauge
    concurrency_limiter_max_waiting                gauge (absent when unbounded)
    concurrency_limiter_acquired_total             counter
    concurrency_limiter_rejected_total{reason}     counter (timeout, queue_full,
                                                   shed, disconnected, cancelled)
    concurrency_limiter_wait_seconds               histogram (granted requests)
    concurrency_limiter_hold_seconds               histogram

With ``scope=RedisScope(...)`` the metrics above are this process's local
stage, and these are added:

    concurrency_limiter_cluster_in_use             gauge (across all processes,
                                                   as of the last reply of Redis)
    concurrency_limiter_cluster_held               gauge (held by this process)
    concurrency_limiter_cluster_reachable          gauge (1 or 0)
    concurrency_limiter_cluster_unavailable_total  counter (503s: Redis unreachable)
    concurrency_limiter_cluster_unlimited_total    counter (admitted by on_error
                                                   without a cluster slot)

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
from ._statistics import HistogramSnapshot, ResourceStatistics

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
        clustered: list[ResourceStatistics] = []
        for limiter in self._limiters:
            for s in limiter.statistics().resources:
                if s.cluster is not None:
                    clustered.append(s)
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
        if clustered:
            yield from _cluster_families(clustered)


def _cluster_families(resources: list[ResourceStatistics]) -> Iterator[Metric]:
    in_use = GaugeMetricFamily(
        f"{PREFIX}_cluster_in_use",
        "Slots held across all processes (cluster scope), as of the last reply of Redis.",
        labels=["resource"],
    )
    held = GaugeMetricFamily(
        f"{PREFIX}_cluster_held", "Cluster slots held by this process.", labels=["resource"]
    )
    reachable = GaugeMetricFamily(
        f"{PREFIX}_cluster_reachable", "1 while Redis answers, else 0.", labels=["resource"]
    )
    unavailable = CounterMetricFamily(
        f"{PREFIX}_cluster_unavailable",
        "Requests answered 503 because Redis was unreachable.",
        labels=["resource"],
    )
    unlimited = CounterMetricFamily(
        f"{PREFIX}_cluster_unlimited",
        "Requests admitted without a cluster slot while Redis was unreachable (on_error).",
        labels=["resource"],
    )
    for s in resources:
        c = s.cluster
        assert c is not None
        in_use.add_metric([s.name], c.in_use)
        held.add_metric([s.name], c.held_here)
        reachable.add_metric([s.name], 1 if c.reachable else 0)
        unavailable.add_metric([s.name], c.unavailable_total)
        unlimited.add_metric([s.name], c.admitted_unlimited_total)
    yield from (in_use, held, reachable, unavailable, unlimited)


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
