"""Prometheus metrics of limiters (``pip install fastapi-concurrency-limiter[prometheus]``).

Expose them from the same FastAPI app with one line::

    from fastapi_concurrency_limiter.prometheus import metrics_app

    app.add_route("/metrics", metrics_app(limiter))

(``add_route`` serves ``/metrics`` itself; ``app.mount("/metrics", ...)``
serves ``/metrics/`` and answers ``/metrics`` with a redirect.)

Metrics (all labelled ``resource``; counters and histograms are totals since
the process started, as Prometheus expects):

    concurrency_limiter_capacity                   gauge
    concurrency_limiter_limit                      gauge (slots in force, <= capacity)
    concurrency_limiter_in_use                     gauge
    concurrency_limiter_waiting                    gauge
    concurrency_limiter_active_keys                gauge (keys holding or waiting,
                                                   with per_key; else 0)
    concurrency_limiter_peak_in_use                gauge
    concurrency_limiter_max_waiting                gauge (absent when unbounded)
    concurrency_limiter_acquired_total             counter
    concurrency_limiter_rejected_total{reason}     counter (timeout, queue_full,
                                                   shed, disconnected, cancelled,
                                                   key_limit, unavailable: a host
                                                   resource's shared lock out
                                                   of reach; deadline: the
                                                   client's budget spent;
                                                   predicted_timeout;
                                                   lower_priority)
    concurrency_limiter_wait_seconds               histogram (granted requests)
    concurrency_limiter_hold_seconds               histogram

Per priority class, labelled ``resource`` and ``priority`` (``sheddable``,
``sheddable_plus``, ``critical``, ``critical_plus``), for each resource
that uses priorities (a ``reserve``, or a request of a class other than
``critical`` seen since the process started; a request that names no
class is ``critical``; with ``scope="host"``, also a class in use or
waiting in another worker), every class, in every scrape from the first
that saw it use them:

    concurrency_limiter_priority_in_use            gauge
    concurrency_limiter_priority_waiting           gauge
    concurrency_limiter_priority_reserved          gauge (Resource(reserve=...))
    concurrency_limiter_priority_acquired_total    counter
    concurrency_limiter_priority_rejected_total{reason}  counter

The series without ``priority`` count every class together, as before.

With ``scope=RedisScope(...)`` the metrics above are this process's local
stage, and these are added:

    concurrency_limiter_cluster_in_use             gauge (across all processes,
                                                   as of the last reply of Redis)
    concurrency_limiter_cluster_held               gauge (held by this process)
    concurrency_limiter_cluster_reachable          gauge (1 or 0)
    concurrency_limiter_cluster_unavailable_total  counter (503s: Redis unreachable)
    concurrency_limiter_cluster_unlimited_total    counter (admitted by on_error
                                                   without a cluster slot)
    concurrency_limiter_leases_lost_total          counter (cluster slots whose
                                                   lease ran out unrenewed)

The values are read from the engine's statistics at scrape time: nothing is
added to the request path. Any number of limiters may report to one
registry (each family appears once; a resource shared by several limiters is
reported once), and the metrics hold limiters only weakly.
"""

from __future__ import annotations

import threading
import weakref
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
from ._resource import Resource
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
    """Collects, at each scrape, the statistics of every live limiter added
    to it: one metric family per name whatever the number of limiters, and a
    resource shared by several limiters is reported once.

    Limiters are held weakly: a limiter that is garbage-collected simply
    drops out of the metrics. ``register()`` keeps one collector per
    registry; build one directly only to register it yourself.
    """

    def __init__(self, *limiters: Limiter) -> None:
        # Scrapes may run on another thread (prometheus_client's own HTTP
        # server) while limiters are added.
        self._lock = threading.Lock()
        self._limiters: list[weakref.ref[Limiter]] = []
        # Resources whose per-class series a scrape has reported: reported
        # from then on, so that they do not vanish between scrapes (a host
        # resource's classes may be in use in other workers only for a while).
        self._prioritized: set[str] = set()
        for limiter in limiters:
            self.add(limiter)

    def add(self, limiter: Limiter) -> None:
        """Adds ``limiter``'s resources (no effect if it is added already).

        Raises ValueError if one of them has the name of a different resource
        already reported here: their samples would be indistinguishable.
        """
        with self._lock:
            live = self._live_locked()
            if any(known is limiter for known in live):
                return
            reported = {r.name: r for r in _resources(live)}
            for r in limiter._resources:
                other = reported.get(r.name)
                if other is not None and other is not r:
                    raise ValueError(
                        f"resource name {r.name!r} is already reported by another limiter "
                        "in this Prometheus registry: give the resources different names"
                    )
            self._limiters.append(weakref.ref(limiter))

    def _live_locked(self) -> list[Limiter]:
        live = [limiter for ref in self._limiters if (limiter := ref()) is not None]
        if len(live) != len(self._limiters):
            self._limiters = [weakref.ref(limiter) for limiter in live]
        return live

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples: lets the registry check
        names at registration instead of running a collection."""
        return iter(_Families().all())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            resources = _resources(self._live_locked())
        families = _Families()
        for resource in resources:
            if families.add(resource.statistics(), resource.name in self._prioritized):
                self._prioritized.add(resource.name)
        return iter(families.all())


def _resources(limiters: list[Limiter]) -> list[Resource]:
    """Every resource of ``limiters`` once, in registration order."""
    seen: dict[int, Resource] = {}
    for limiter in limiters:
        for r in limiter._resources:
            seen.setdefault(id(r), r)
    return list(seen.values())


class _Families:
    """One family per metric name, filled with the samples of each resource."""

    def __init__(self) -> None:
        self.gauges = {
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
            "active_keys": GaugeMetricFamily(
                f"{PREFIX}_active_keys",
                "Keys holding or waiting for a slot right now (resources with per_key).",
                labels=["resource"],
            ),
            "peak_in_use": GaugeMetricFamily(
                f"{PREFIX}_peak_in_use", "Most slots ever held at once.", labels=["resource"]
            ),
            "max_waiting": GaugeMetricFamily(
                f"{PREFIX}_max_waiting", "Longest queue allowed.", labels=["resource"]
            ),
        }
        self.acquired = CounterMetricFamily(
            f"{PREFIX}_acquired", "Slots granted.", labels=["resource"]
        )
        self.rejected = CounterMetricFamily(
            f"{PREFIX}_rejected", "Requests turned away, by reason.", labels=["resource", "reason"]
        )
        self.wait = HistogramMetricFamily(
            f"{PREFIX}_wait_seconds",
            "Time from request to grant, of granted requests.",
            labels=["resource"],
        )
        self.hold = HistogramMetricFamily(
            f"{PREFIX}_hold_seconds", "Time from grant to release.", labels=["resource"]
        )

        self.cluster_gauges = {
            "in_use": GaugeMetricFamily(
                f"{PREFIX}_cluster_in_use",
                "Slots held across all processes (cluster scope), as of the last reply of Redis.",
                labels=["resource"],
            ),
            "held_here": GaugeMetricFamily(
                f"{PREFIX}_cluster_held", "Cluster slots held by this process.", labels=["resource"]
            ),
            "reachable": GaugeMetricFamily(
                f"{PREFIX}_cluster_reachable", "1 while Redis answers, else 0.", labels=["resource"]
            ),
        }
        self.cluster_counters = {
            "unavailable_total": CounterMetricFamily(
                f"{PREFIX}_cluster_unavailable",
                "Requests answered 503 because Redis was unreachable.",
                labels=["resource"],
            ),
            "admitted_unlimited_total": CounterMetricFamily(
                f"{PREFIX}_cluster_unlimited",
                "Requests admitted without a cluster slot while Redis was unreachable.",
                labels=["resource"],
            ),
            "leases_lost_total": CounterMetricFamily(
                f"{PREFIX}_leases_lost",
                "Cluster slots Redis took back because their lease ran out before this process "
                "renewed them.",
                labels=["resource"],
            ),
        }
        self.clustered = False  # the cluster families appear only when used

        classes = ["resource", "priority"]
        self.class_gauges = {
            "in_use": GaugeMetricFamily(
                f"{PREFIX}_priority_in_use",
                "Slots held right now by requests of the priority class.",
                labels=classes,
            ),
            "waiting": GaugeMetricFamily(
                f"{PREFIX}_priority_waiting",
                "Requests of the priority class waiting right now.",
                labels=classes,
            ),
        }
        self.class_reserved = GaugeMetricFamily(
            f"{PREFIX}_priority_reserved",
            "Slots reserved for the priority class and those above it.",
            labels=classes,
        )
        self.class_acquired = CounterMetricFamily(
            f"{PREFIX}_priority_acquired",
            "Slots granted to requests of the priority class.",
            labels=classes,
        )
        self.class_rejected = CounterMetricFamily(
            f"{PREFIX}_priority_rejected",
            "Requests of the priority class turned away, by reason.",
            labels=[*classes, "reason"],
        )
        self.prioritized = False  # the per-class families appear only when used

    def add(self, s: ResourceStatistics, prioritized: bool = False) -> bool:
        """Adds ``s``'s samples; its per-class series too if it uses
        priorities or ``prioritized`` (reported before). Returns whether it
        added them."""
        if s.cluster is not None:
            self.clustered = True
            for key, family in self.cluster_gauges.items():
                family.add_metric([s.name], int(getattr(s.cluster, key)))
            for key, counter in self.cluster_counters.items():
                counter.add_metric([s.name], getattr(s.cluster, key))
        for key, family in self.gauges.items():
            value: Any = getattr(s, key)
            if value is not None:
                family.add_metric([s.name], value)
        self.acquired.add_metric([s.name], s.acquired_total)
        for reason, count in s.rejected_total.items():
            self.rejected.add_metric([s.name, reason], count)
        self.wait.add_metric([s.name], *_buckets(s.wait_seconds))
        self.hold.add_metric([s.name], *_buckets(s.hold_seconds))
        if prioritized or _uses_priorities(s):
            self.prioritized = True
            for label, c in s.priorities.items():
                for key, family in self.class_gauges.items():
                    family.add_metric([s.name, label], getattr(c, key))
                self.class_reserved.add_metric([s.name, label], s.reserve.get(label, 0))
                self.class_acquired.add_metric([s.name, label], c.acquired_total)
                for reason, count in c.rejected_total.items():
                    self.class_rejected.add_metric([s.name, label, reason], count)
            return True
        return False

    def all(self) -> list[Metric]:
        families = [*self.gauges.values(), self.acquired, self.rejected, self.wait, self.hold]
        if self.prioritized:
            families += [
                *self.class_gauges.values(),
                self.class_reserved,
                self.class_acquired,
                self.class_rejected,
            ]
        if self.clustered:
            families += [*self.cluster_gauges.values(), *self.cluster_counters.values()]
        return families


def _uses_priorities(s: ResourceStatistics) -> bool:
    """Whether ``s``'s resource has reserves or has seen a request of a
    class other than CRITICAL (whose series would otherwise be all zero, for
    every resource of every app)."""
    if s.reserve:
        return True
    for label, c in s.priorities.items():
        if label != "critical" and (
            c.in_use or c.waiting or c.acquired_total or any(c.rejected_total.values())
        ):
            return True
    return False


# One collector per registry, so that any number of limiters share one
# family per metric name. Weak keys: a registry that goes away takes its
# entry with it (the collector holds no reference to its registry).
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, LimiterCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(limiter: Limiter, registry: CollectorRegistry = REGISTRY) -> LimiterCollector:
    """Adds ``limiter``'s metrics to ``registry``: the first call for a
    registry registers this module's collector with it, later calls (other
    limiters, or the same one again) add to that collector. Keeps no strong
    reference to ``limiter``.

    Raises ValueError if a resource of ``limiter`` has the name of a
    different resource already reported in ``registry``.
    """
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = LimiterCollector()
            registry.register(collector)
            _collectors[registry] = collector
    collector.add(limiter)
    return collector


class _MetricsApp:
    """prometheus_client's ASGI app, as an object: Starlette takes a plain
    function given to ``add_route`` for a request handler, an object with
    ``__call__`` for an ASGI app."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def metrics_app(limiter: Limiter, registry: CollectorRegistry = REGISTRY) -> Any:
    """An ASGI app serving ``registry`` (with ``limiter``'s metrics) in the
    Prometheus text format: ``app.add_route("/metrics", metrics_app(limiter))``
    (serves ``/metrics``; ``/metrics/`` is redirected there), or
    ``app.mount("/metrics", ...)`` (serves ``/metrics/``; ``/metrics`` is
    redirected there). Call it for as many limiters as needed; each call adds
    its limiter to the same registry's metrics."""
    register(limiter, registry)
    return _MetricsApp(make_asgi_app(registry=registry))
