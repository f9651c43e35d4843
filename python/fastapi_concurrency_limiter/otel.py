"""OpenTelemetry metrics of limiters (``pip install 'fastapi-concurrency-limiter[otel]'``).

Report a limiter's resources through the global ``MeterProvider`` (or one
given) with one line::

    from fastapi_concurrency_limiter import otel

    otel.instrument(limiter)

OpenTelemetry has no convention for concurrency limiters yet. The names are
in the package's own namespace, modelled on the closest stable ones:
ASP.NET Core's rate limiting (``aspnetcore.rate_limiting.*``) for requests,
queues and leases, and database connection pools
(``db.client.connection.*``) for slots. Every instrument carries the
attribute ``concurrency_limiter.resource`` (the resource's name):

    concurrency_limiter.slot.capacity           UpDownCounter {slot}
        (like db.client.connection.max)
    concurrency_limiter.slot.limit              UpDownCounter {slot}
        slots in force, <= capacity
    concurrency_limiter.slot.in_use             UpDownCounter {slot}
        (like aspnetcore.rate_limiting.active_request_leases)
    concurrency_limiter.queued_requests         UpDownCounter {request}
        (like aspnetcore.rate_limiting.queued_requests)
    concurrency_limiter.requests                Counter {request}
        attribute concurrency_limiter.result: "acquired", or the reason it
        was turned away (timeout, queue_full, shed, disconnected, cancelled,
        key_limit, unavailable, deadline, predicted_timeout, lower_priority) (like
        aspnetcore.rate_limiting.requests)
    concurrency_limiter.request.time_in_queue   Histogram s
        granted requests (like aspnetcore.rate_limiting.request.time_in_queue)
    concurrency_limiter.request_lease.duration  Histogram s
        from grant to release (like aspnetcore.rate_limiting.request_lease.duration)

The first five are observed from the engine's statistics when the metrics
are collected. OpenTelemetry has no observable histogram: at each
collection, the requests counted in the engine's histograms since the last
one are recorded into the two histograms, in the engine's buckets, each at
its bucket's midpoint (so the counts per bucket are exact, the sums close).
Nothing is added to the request path; a collection costs one record per
request since the previous one.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Histogram, Meter, MeterProvider, Observation
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "fastapi_concurrency_limiter.otel needs opentelemetry-api: "
        "pip install 'fastapi-concurrency-limiter[otel]'"
    ) from e

from . import _core
from ._limiter import Limiter
from ._resource import Resource
from ._statistics import HistogramSnapshot, ResourceStatistics

PREFIX = "concurrency_limiter"
#: The attribute naming the resource, on every instrument.
RESOURCE = f"{PREFIX}.resource"
#: The attribute of ``concurrency_limiter.requests``.
RESULT = f"{PREFIX}.result"

_BOUNDS: tuple[float, ...] = tuple(_core.Histogram.bounds)


def _midpoints(bounds: tuple[float, ...]) -> tuple[float, ...]:
    # The +Inf bucket has no midpoint: half again its lower bound.
    lower = (0.0, *bounds[:-1])
    return (*((lo + hi) / 2 for lo, hi in zip(lower, bounds, strict=True)), bounds[-1] * 1.5)


_MIDPOINTS = _midpoints(_BOUNDS)


class _Reporter:
    """The instruments of one meter provider, reporting every live limiter
    instrumented on it (held weakly); a resource shared by several limiters
    is reported once."""

    def __init__(self, meter: Meter) -> None:
        # Collections may run on an exporter's thread.
        self._lock = threading.Lock()
        self._limiters: weakref.WeakSet[Limiter] = weakref.WeakSet()
        # Histogram counts already recorded, per resource.
        self._recorded: weakref.WeakKeyDictionary[Resource, dict[str, tuple[int, ...]]] = (
            weakref.WeakKeyDictionary()
        )
        self._time_in_queue: Histogram = meter.create_histogram(
            f"{PREFIX}.request.time_in_queue",
            unit="s",
            description="Time granted requests waited for their slots.",
            explicit_bucket_boundaries_advisory=_BOUNDS,
        )
        self._lease_duration: Histogram = meter.create_histogram(
            f"{PREFIX}.request_lease.duration",
            unit="s",
            description="Time requests held their slots, from grant to release.",
            explicit_bucket_boundaries_advisory=_BOUNDS,
        )
        # The histograms are brought up to date in the first callback: every
        # callback of a collection runs before its measurements are read.
        meter.create_observable_counter(
            f"{PREFIX}.requests",
            callbacks=[self._requests],
            unit="{request}",
            description="Requests that acquired their slots, or were turned away (by reason).",
        )
        for name, unit, description, field in (
            ("slot.capacity", "{slot}", "Slots of the resource.", "capacity"),
            ("slot.limit", "{slot}", "Slots in force (<= capacity).", "limit"),
            ("slot.in_use", "{slot}", "Slots held right now.", "in_use"),
            ("queued_requests", "{request}", "Requests waiting for a slot.", "waiting"),
        ):
            meter.create_observable_up_down_counter(
                f"{PREFIX}.{name}",
                callbacks=[self._gauge(field)],
                unit=unit,
                description=description,
            )

    def add(self, limiter: Limiter) -> None:
        with self._lock:
            self._limiters.add(limiter)

    def _statistics(self) -> Iterator[tuple[Resource, ResourceStatistics]]:
        with self._lock:
            limiters = list(self._limiters)
        seen: set[int] = set()
        for limiter in limiters:
            for resource in limiter._resources:
                if id(resource) not in seen:
                    seen.add(id(resource))
                    yield resource, resource.statistics()

    def _gauge(self, field: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(getattr(s, field), {RESOURCE: s.name}) for _, s in self._statistics()
            ]

        return observe

    def _requests(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for resource, s in self._statistics():
            self._replay(resource, s)
            observations.append(
                Observation(s.acquired_total, {RESOURCE: s.name, RESULT: "acquired"})
            )
            for reason, count in s.rejected_total.items():
                observations.append(Observation(count, {RESOURCE: s.name, RESULT: reason}))
        return observations

    def _replay(self, resource: Resource, s: ResourceStatistics) -> None:
        with self._lock:
            recorded = self._recorded.setdefault(resource, {})
            for key, histogram, snapshot in (
                ("wait", self._time_in_queue, s.wait_seconds),
                ("hold", self._lease_duration, s.hold_seconds),
            ):
                before = recorded.get(key, (0,) * len(snapshot.counts))
                recorded[key] = snapshot.counts
                _record(histogram, snapshot, before, {RESOURCE: s.name})


def _record(
    histogram: Histogram,
    snapshot: HistogramSnapshot,
    before: tuple[int, ...],
    attributes: dict[str, str],
) -> None:
    for value, now, then in zip(_MIDPOINTS, snapshot.counts, before, strict=True):
        for _ in range(now - then):
            histogram.record(value, attributes)


_reporters: weakref.WeakKeyDictionary[Any, _Reporter] = weakref.WeakKeyDictionary()
_reporters_lock = threading.Lock()


def instrument(limiter: Limiter, meter_provider: MeterProvider | None = None) -> None:
    """Reports ``limiter``'s resources through ``meter_provider`` (``None``:
    the global one, ``opentelemetry.metrics.get_meter_provider()``). Call it
    for each limiter; calling it again for the same limiter changes nothing.
    The instruments are created once per provider and hold the limiters
    weakly."""
    if not isinstance(limiter, Limiter):
        raise TypeError(f"limiter must be a Limiter, got {type(limiter).__name__} {limiter!r}")
    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    with _reporters_lock:
        reporter = _reporters.get(provider)
        if reporter is None:
            from . import __version__

            meter = provider.get_meter("fastapi_concurrency_limiter", __version__)
            reporter = _reporters[provider] = _Reporter(meter)
    reporter.add(limiter)
