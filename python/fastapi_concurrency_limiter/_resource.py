"""Resource: a named pool of slots (a thin handle on the C++ engine's)."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from . import _core
from ._adaptive import AdaptiveLimit, algorithm_for
from ._clustered import Releasable, running_loop_time, with_cluster
from ._holding import Holds, Selection, check, current_task, current_task_or_none, holds_of, leave
from ._logging import logger
from ._priority import LABELS, Priority, check_reserve
from ._statistics import ResourceStatistics
from ._validation import INT64_MAX, check_int, check_seconds
from ._waiting import wait

if TYPE_CHECKING:
    from ._cluster import ClusterStage
    from .redis import RedisScope

QueueName = Literal["fifo", "lifo", "adaptive"]
_QUEUES: dict[str, _core.QueueDiscipline] = {
    "fifo": _core.QueueDiscipline.fifo,
    "lifo": _core.QueueDiscipline.lifo,
    "adaptive": _core.QueueDiscipline.adaptive,
}

ScopeName = Literal["process", "host"]
_SCOPES: dict[str, _core.Scope] = {"process": _core.Scope.process, "host": _core.Scope.host}
# Host resources are named after a shared-memory file: keep names portable.
_HOST_NAME = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]{1,64}")

#: Most slots a resource may have (the engine's ``Resource::kMaxCapacity``).
MAX_CAPACITY = 2**31 - 1

#: Default ``adaptive_target``: see docs/overload.md.
DEFAULT_ADAPTIVE_TARGET = 0.5
#: Default ``adaptive_interval``.
DEFAULT_ADAPTIVE_INTERVAL = 1.5


class Resource:
    """Something that must not be overloaded, with ``capacity`` slots.

    Each request that needs the resource holds one slot while its handler
    runs; requests beyond ``capacity`` wait in the resource's queue.

    Args:
        capacity: number of slots, an integer >= 1.
        name: shown in errors, statistics and metrics; unique per limiter.
            Default: a generated ``"resource-N"``.
        max_waiting: longest queue allowed; a request arriving at a full
            queue is answered 503 at once (reason ``"queue_full"``).
            ``None`` (default): unbounded. ``0``: never wait.
        queue: which waiter a freed slot goes to: ``"fifo"`` (default, the
            oldest), ``"lifo"`` (the newest), or ``"adaptive"`` (FIFO while
            the queue drains; newest first, with early 503s for stale
            waiters, once a queue stands; keeps latency low under overload).
        adaptive_target: with ``queue="adaptive"``: the queueing delay
            considered normal, in seconds. The queue stands once more
            requests wait than there are slots and the oldest has waited
            longer than this without a break for ``adaptive_interval``.
        adaptive_interval: with ``queue="adaptive"``: see above. While the
            queue stands, waiters older than ``adaptive_target +
            adaptive_interval`` are answered 503 at once (reason ``"shed"``).
        scope: who shares the ``capacity`` slots. ``"process"`` (default):
            this process alone. ``"host"``: every process of this user on
            this machine that creates a host resource of the same ``name``
            (for example the workers of ``uvicorn --workers 4`` or gunicorn)
            shares one pool of ``capacity`` slots and one queue. ``name`` is
            then required (letters, digits, ``_``, ``-``, ``.``, at most 64,
            not dots only). The newest process's ``capacity``, ``queue``,
            ``max_waiting`` and ``adaptive`` are in force for every process
            (a redeploy or a gunicorn reload with another capacity takes
            effect everywhere, logged once; held slots are never revoked).
            The ``limit`` is host-wide too: ``set_limit()`` in
            one process sets it for all, and with ``adaptive`` one algorithm
            moves it, fed by the requests of every process. Statistics:
            ``capacity``, ``limit``, ``in_use``, ``waiting`` and
            ``peak_in_use`` are host-wide (so are each class's ``in_use``
            and ``waiting`` in ``priorities``); the counters and histograms
            count this process's requests. A ``RedisScope``: every process on every host using
            the same Redis and ``name`` (then required); the local stage
            above still runs first, in each process; see
            ``fastapi_concurrency_limiter.redis``.
        adaptive: ``True`` or an ``AdaptiveLimit``: the number of slots in
            force (``limit``) then moves by itself between
            ``AdaptiveLimit.min_limit`` and ``capacity``, from the measured
            service times and errors of the requests (with ``scope="host"``,
            of every process's requests). ``False`` (default):
            ``limit == capacity`` unless ``set_limit()`` changes it.
        per_key: most slots one key (a client, an API key, a tenant: the
            ``key=`` given where the resource is acquired) may hold, an
            integer in ``1..capacity``; ``None`` (default): no per-key share.
            All keys together still hold at most ``capacity`` (or ``limit``).
            A request whose key is at its share waits without holding up
            other keys' requests, and if its timeout passes while the
            resource had room for others it gets 503 with reason
            ``"key_limit"``. A key of ``None`` is exempt from the share but
            counts toward the total. The engine keeps per-key state only
            while a key holds or waits for a slot (``statistics().active_keys``).
            Not supported with ``scope="host"`` or a ``RedisScope`` (ValueError).
        early_reject: ``True``: a request that would have to wait is
            answered 503 at once (reason ``"predicted_timeout"``) when the
            wait predicted for it exceeds its timeout: the waiters ahead of
            it / ``limit`` x the resource's moving estimate of service time
            (``statistics().service_seconds``). Waiters ahead: every waiter with
            ``queue="fifo"``, none with ``"lifo"`` (so never refused early),
            with ``"adaptive"`` every waiter while the queue drains and none
            while it stands. Never before the first timed request has
            finished (no estimate yet), nor for a request without a timeout.
            ``False`` (default): every request waits up to its timeout, as
            the original package. Its 503's ``Retry-After`` is the
            predicted wait (rounded up) plus the limiter's ``retry_after``,
            at most 60 s or the request's timeout plus ``retry_after``. With
            ``scope="host"``: the waiters ahead are those of every process
            of the host, and the estimate is fed by every process's requests.
            Not supported with ``per_key`` (ValueError).
        reserve: slots kept for a priority class and those above it, e.g.
            ``{Priority.CRITICAL_PLUS: 4}``: 4 of the slots only
            ``CRITICAL_PLUS`` requests may take; the other classes borrow
            nothing from it, and ``CRITICAL_PLUS`` may still use every
            other slot. With several reserves, each class may use every
            slot not reserved for the classes above it. Keys: any class
            but ``SHEDDABLE`` (a Priority or its name); values: integers
            >= 0 adding up to at most ``capacity``. Counted against the
            ``limit`` in force. ``None`` (default): no reserve. With
            ``scope="host"``, every process using the name must pass the
            same reserves (ValueError naming both otherwise). Not supported
            with ``per_key`` (ValueError). See docs/priorities.md.
    """

    __slots__ = (
        "_core",
        "_selection",
        "_held",
        "_before",
        "_cluster",
        "_reserve",
        "__weakref__",
    )

    def __init__(
        self,
        capacity: int,
        *,
        name: str | None = None,
        max_waiting: int | None = None,
        queue: QueueName = "fifo",
        adaptive_target: float = DEFAULT_ADAPTIVE_TARGET,
        adaptive_interval: float = DEFAULT_ADAPTIVE_INTERVAL,
        scope: ScopeName | RedisScope = "process",
        adaptive: bool | AdaptiveLimit = False,
        per_key: int | None = None,
        early_reject: bool = False,
        reserve: Mapping[Priority | str, int] | None = None,
    ) -> None:
        check_int("capacity", capacity, minimum=1, maximum=MAX_CAPACITY)
        reserved = check_reserve(reserve, capacity, per_key)
        if per_key is not None:
            if isinstance(per_key, bool) or not isinstance(per_key, int):
                raise TypeError(
                    f"per_key must be an integer in [1, capacity={capacity}] or None, "
                    f"got {per_key!r}"
                )
            if not 1 <= per_key <= capacity:
                raise ValueError(
                    f"per_key must be an integer in [1, capacity={capacity}] or None, "
                    f"got {per_key!r}"
                )
            if scope != "process":
                raise ValueError(
                    "per_key is only supported with scope='process': per-key shares are "
                    f"kept by one process's engine; got scope={scope!r}"
                )
        if not isinstance(early_reject, bool):
            raise TypeError(f"early_reject must be True or False, got {early_reject!r}")
        if early_reject and per_key is not None:
            raise ValueError(
                "early_reject is not supported with per_key: a key at its share does "
                "not wait behind the whole queue, so its wait cannot be predicted from it"
            )
        if isinstance(scope, str) and scope not in _SCOPES:
            raise ValueError(
                f"scope must be 'process', 'host' or a RedisScope(...), got {scope!r}"
            )
        if scope == "host":
            if not isinstance(name, str) or not _HOST_NAME.fullmatch(name):
                raise (ValueError if name is None or isinstance(name, str) else TypeError)(
                    "name must be 1 to 64 letters, digits, '_', '-' or '.' (not dots only) with "
                    f"scope='host' (it names the shared pool), got {name!r}"
                )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a non-empty str or None, got {name!r}")
        if name == "":
            raise ValueError("name must be a non-empty str or None, got ''")
        check_int("max_waiting", max_waiting, minimum=0, maximum=INT64_MAX, allow_none=True)
        if queue not in _QUEUES:
            raise ValueError(f"queue must be one of 'fifo', 'lifo', 'adaptive', got {queue!r}")
        target = check_seconds("adaptive_target", adaptive_target, positive=True)
        interval = check_seconds("adaptive_interval", adaptive_interval, positive=True)
        algorithm = algorithm_for(adaptive, capacity)
        self._core = _core.Resource(
            name or "",
            capacity,
            max_waiting,
            _QUEUES[queue],
            target,
            interval,
            algorithm,
            _SCOPES[scope] if isinstance(scope, str) else _core.Scope.process,
            per_key or 0,
            early_reject,
            reserve=reserved,
        )
        if self._core.host_note:
            # A redeploy or reload with another configuration (newest wins),
            # or a corrupt segment replaced: said once, where operators look.
            logger.log(
                logging.WARNING if self._core.host_note_is_warning else logging.INFO,
                "%s",
                self._core.host_note,
                extra={"resource": name, "scope": "host"},
            )
        self._cluster: ClusterStage | None = _bind_scope(scope, name, capacity)
        # For the statistics: the reserves by class name.
        self._reserve = {LABELS[i]: n for i, n in enumerate(reserved) if n}
        self._selection = Selection(_core.ResourceSet([self._core]), (self,))
        # Slots taken by acquire(), and the task that took each.
        self._held: list[tuple[Releasable, Holds]] = []
        # Resources that some Limiter registers before this one: a task
        # holding this one must not ask for them (see _holding).
        self._before: set[Resource] = set()

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def capacity(self) -> int:
        return self._core.capacity

    @property
    def limit(self) -> int:
        """Slots in force right now, 1..capacity (``capacity`` unless changed
        by ``set_limit()`` or, with ``adaptive``, by the resource itself)."""
        return self._core.limit

    def set_limit(self, limit: int) -> None:
        """Puts ``limit`` slots in force, 1 <= limit <= capacity. Raising it
        grants waiting requests at once; lowering it revokes no slot: slots
        are retired as they are released until ``in_use <= limit``. On an
        adaptive resource the algorithm adopts it (within ``min_limit``),
        leaves out the requests granted before it, and moves the limit on
        from there at its next decision. With
        ``scope="host"`` it is the limit of every process on the host."""
        check_int("limit", limit, minimum=1)
        if limit > MAX_CAPACITY:  # more than any capacity; the engine's wording
            raise ValueError(
                f"limit of resource {self.name!r} must be an integer in "
                f"[1, capacity={self.capacity}], got {limit!r}"
            )
        self._core.set_limit(limit)

    @property
    def adaptive(self) -> bool:
        """True if the limit moves by itself."""
        return self._core.adaptive

    @property
    def in_use(self) -> int:
        """Slots held right now."""
        return self._core.in_use

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot right now."""
        return self._core.waiting

    @property
    def max_waiting(self) -> int | None:
        return self._core.max_waiting

    @property
    def queue(self) -> str:
        return self._core.queue.name

    @property
    def per_key(self) -> int | None:
        """Most slots one key may hold; ``None``: no per-key share."""
        return self._core.per_key or None

    @property
    def early_reject(self) -> bool:
        """Whether requests predicted to time out are refused at once."""
        return self._core.early_reject

    @property
    def reserve(self) -> dict[Priority, int]:
        """The slots reserved per class (``Resource(reserve=...)``), without
        the classes that have none; ``{}`` without reserves."""
        return {Priority(i): n for i, n in enumerate(self._core.reserve) if n}

    @property
    def scope(self) -> str:
        """``"process"``, ``"host"``, or ``"cluster"`` for a RedisScope."""
        if self._cluster is not None:
            return "cluster"
        return self._core.scope.name

    async def acquire(self) -> None:
        """Takes one slot, waiting as long as it takes (the original
        package's low-level call; routes use ``@limiter.resources``). Pair
        each call with ``release()``.

        RuntimeError, at once, if the calling task already holds a slot of
        this resource, or of one that a Limiter registers after it: waiting
        could then deadlock."""
        selection = self._selection
        holds = holds_of(current_task())
        if holds:
            check(holds, selection)
        acquisition = _core.Acquisition(selection.rset)
        started = running_loop_time() if selection.clusters else 0.0
        if not acquisition.try_acquire():
            await wait(acquisition, None, None)
        granted: Releasable = acquisition
        if selection.clusters:
            granted = await with_cluster(acquisition, selection.clusters, started, None, None)
        holds.append(selection)
        self._held.append((granted, holds))

    def release(self) -> None:
        """Gives back one slot taken by ``acquire()`` (the calling task's
        latest, else the latest of any task, as a semaphore would);
        ValueError if none is held."""
        held = self._held
        if not held:
            raise ValueError(f"release() of resource {self.name!r} without a matching acquire()")
        index = len(held) - 1
        owner = current_task_or_none()
        for i in range(index, -1, -1):
            watch = held[i][1].watch
            if watch is not None and watch() is owner:
                index = i
                break
        acquisition, holds = held.pop(index)
        acquisition.release()
        leave(holds, self._selection)

    def statistics(self) -> ResourceStatistics:
        """A consistent snapshot of the resource's counters."""
        return self._statistics(self._core.statistics())

    def _statistics(self, core: _core.ResourceStatistics) -> ResourceStatistics:
        s = ResourceStatistics._from_core(core, self._reserve)
        if self._cluster is not None:
            s = dataclasses.replace(s, cluster=self._cluster.statistics())
        return s

    def __repr__(self) -> str:
        scope = ", scope='host'" if self.scope == "host" else ""
        return (
            f"Resource({self.capacity}, name={self.name!r}{scope}, limit={self.limit}, "
            f"in_use={self.in_use}, waiting={self.waiting})"
        )


def _bind_scope(scope: object, name: str | None, capacity: int) -> ClusterStage | None:
    from .redis import RedisScope

    if scope in ("process", "host"):
        return None
    if isinstance(scope, RedisScope):
        if name is None:
            raise ValueError("a resource with scope=RedisScope(...) needs a name (its Redis key)")
        return scope._bind(name, capacity)
    raise ValueError(f"scope must be 'process', 'host' or a RedisScope(...), got {scope!r}")
