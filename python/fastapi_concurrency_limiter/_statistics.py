"""Statistics snapshots, as frozen dataclasses (like anyio's
``CapacityLimiter.statistics()``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from . import _core
from ._priority import LABELS


@dataclass(frozen=True)
class HistogramSnapshot:
    """Observed durations in fixed buckets.

    ``counts[i]`` is the number of observations ``<= bounds[i]`` and above the
    previous bound (not cumulative); the last count is the ``+Inf`` bucket.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float

    @classmethod
    def _from_core(cls, h: _core.Histogram) -> HistogramSnapshot:
        return cls(tuple(_core.Histogram.bounds), tuple(h.counts), h.count, h.sum)


@dataclass(frozen=True)
class ClusterStatistics:
    """The cluster side of one resource, as this process last saw it."""

    #: Slots held across all processes (from the last reply of Redis).
    in_use: int
    #: Of those, held by this process.
    held_here: int
    #: Requests of this process queued in Redis.
    waiting_here: int
    #: Processes that used the resource at the last heartbeat.
    processes: int
    #: False while Redis counts as unreachable.
    reachable: bool
    #: Requests admitted without a cluster slot (on_error "allow"/"local").
    admitted_unlimited_total: int
    #: Requests turned away because Redis was unreachable.
    unavailable_total: int
    #: Slots Redis took back because their lease ran out before this
    #: process renewed them (their requests held them beyond the limit).
    leases_lost_total: int = 0


@dataclass(frozen=True)
class PriorityStatistics:
    """One priority class of one resource (``ResourceStatistics.priorities``)."""

    #: Slots held by requests of the class right now.
    in_use: int
    #: Requests of the class waiting right now.
    waiting: int
    #: Slots granted to requests of the class.
    acquired_total: int
    #: Requests of the class turned away, by reason (as the resource's).
    rejected_total: Mapping[str, int]

    @classmethod
    def _from_core(cls, c: _core.ClassStatistics) -> PriorityStatistics:
        return cls(
            in_use=c.in_use,
            waiting=c.waiting,
            acquired_total=c.acquired_total,
            rejected_total=dict(c.rejected_total),
        )


@dataclass(frozen=True)
class ResourceStatistics:
    """A consistent snapshot of one resource."""

    name: str
    capacity: int
    #: Slots in force: ``capacity`` unless lowered by ``set_limit()`` or by
    #: an adaptive limit.
    limit: int
    in_use: int
    waiting: int
    #: With ``per_key``: keys holding or waiting for a slot right now (the
    #: per-key state the resource keeps); 0 otherwise.
    active_keys: int
    peak_in_use: int
    max_waiting: int | None
    queue: str
    acquired_total: int
    #: Requests turned away, by reason: timeout, queue_full, shed,
    #: disconnected, cancelled, key_limit, unavailable (a host resource
    #: whose shared lock was out of reach; a cluster resource's Redis
    #: outages are counted in ``cluster.unavailable_total``), deadline (the
    #: client's budget was spent), predicted_timeout (``early_reject``),
    #: lower_priority (pushed out of a full queue by a higher class).
    rejected_total: Mapping[str, int]
    #: Time from request to grant, of granted requests.
    wait_seconds: HistogramSnapshot
    #: Time from grant to release.
    hold_seconds: HistogramSnapshot
    #: The resource's moving estimate of service time (grant to release), in
    #: seconds, which ``early_reject`` predicts waits from; ``None`` until a
    #: timed hold was released. With ``scope="host"``: the machine's
    #: estimate, from the requests of every process.
    service_seconds: float | None
    #: The figures of each priority class, by its lower-case name
    #: (``"sheddable"``, ``"sheddable_plus"``, ``"critical"``,
    #: ``"critical_plus"``, lowest first): ``s.priorities["sheddable"].waiting``.
    #: A request that names no class counts as ``"critical"``. With
    #: ``scope="host"``, ``in_use`` and ``waiting`` are host-wide, the
    #: counters this process's, as the resource's own are.
    priorities: Mapping[str, PriorityStatistics] = field(default_factory=dict)
    #: Slots reserved per class (``Resource(reserve=...)``), by lower-case
    #: name; ``{}`` without reserves.
    reserve: Mapping[str, int] = field(default_factory=dict)
    #: With scope=RedisScope: the cluster side (``in_use`` across every
    #: process, as last seen); the fields above are this process's stage.
    cluster: ClusterStatistics | None = None

    @classmethod
    def _from_core(
        cls, s: _core.ResourceStatistics, reserve: Mapping[str, int]
    ) -> ResourceStatistics:
        return cls(
            name=s.name,
            capacity=s.capacity,
            limit=s.limit,
            in_use=s.in_use,
            waiting=s.waiting,
            active_keys=s.active_keys,
            peak_in_use=s.peak_in_use,
            max_waiting=s.max_waiting,
            queue=s.queue.name,
            acquired_total=s.acquired_total,
            rejected_total=dict(s.rejected_total),
            wait_seconds=HistogramSnapshot._from_core(s.wait_seconds),
            hold_seconds=HistogramSnapshot._from_core(s.hold_seconds),
            service_seconds=s.service_seconds,
            priorities={
                label: PriorityStatistics._from_core(c)
                for label, c in zip(LABELS, s.classes, strict=True)
            },
            reserve=reserve,
        )


@dataclass(frozen=True)
class LimiterStatistics:
    """Snapshots of every resource of a limiter, in registration order."""

    timeout: float | None
    resources: tuple[ResourceStatistics, ...]

    def __getitem__(self, name: str) -> ResourceStatistics:
        for r in self.resources:
            if r.name == name:
                return r
        raise KeyError(name)
