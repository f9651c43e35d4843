"""Resource: a named pool of slots (a thin handle on the C++ engine's)."""

from __future__ import annotations

import re
from typing import Literal

from . import _core
from ._holding import Holds, Selection, check, current_task, current_task_or_none, holds_of, leave
from ._statistics import ResourceStatistics
from ._validation import check_int, check_seconds
from ._waiting import wait

QueueName = Literal["fifo", "lifo", "adaptive"]
_QUEUES: dict[str, _core.QueueDiscipline] = {
    "fifo": _core.QueueDiscipline.fifo,
    "lifo": _core.QueueDiscipline.lifo,
    "adaptive": _core.QueueDiscipline.adaptive,
}

ScopeName = Literal["process", "host"]
_SCOPES: dict[str, _core.Scope] = {"process": _core.Scope.process, "host": _core.Scope.host}
# Host resources are named after a shared-memory file: keep names portable.
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: Default ``adaptive_target``: see the README's "Overload control".
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
        scope: ``"process"`` (default): the slots belong to this process.
            ``"host"``: every process of this user on this machine that
            creates a host resource of the same ``name`` (for example the
            workers of ``uvicorn --workers 4`` or gunicorn) shares one pool
            of ``capacity`` slots and one queue. ``name`` is then required
            (letters, digits, ``_``, ``-``, ``.``, at most 64), and every
            process must use the same ``capacity``, ``queue`` and
            ``max_waiting`` (ValueError naming both otherwise). Statistics:
            ``capacity``, ``in_use``, ``waiting`` and ``peak_in_use`` are
            host-wide; the counters and histograms count this process's
            requests.
    """

    __slots__ = ("_core", "_selection", "_held", "_before", "__weakref__")

    def __init__(
        self,
        capacity: int,
        *,
        name: str | None = None,
        max_waiting: int | None = None,
        queue: QueueName = "fifo",
        adaptive_target: float = DEFAULT_ADAPTIVE_TARGET,
        adaptive_interval: float = DEFAULT_ADAPTIVE_INTERVAL,
        scope: ScopeName = "process",
    ) -> None:
        check_int("capacity", capacity, minimum=1)
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of 'process', 'host', got {scope!r}")
        if scope == "host":
            if not isinstance(name, str) or not _HOST_NAME.fullmatch(name):
                raise (ValueError if name is None or isinstance(name, str) else TypeError)(
                    "name must be 1 to 64 letters, digits, '_', '-' or '.' with "
                    f"scope='host' (it names the shared pool), got {name!r}"
                )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a non-empty str or None, got {name!r}")
        if name == "":
            raise ValueError("name must be a non-empty str or None, got ''")
        check_int("max_waiting", max_waiting, minimum=0, allow_none=True)
        if queue not in _QUEUES:
            raise ValueError(f"queue must be one of 'fifo', 'lifo', 'adaptive', got {queue!r}")
        target = check_seconds("adaptive_target", adaptive_target, positive=True)
        interval = check_seconds("adaptive_interval", adaptive_interval, positive=True)
        self._core = _core.Resource(
            name or "", capacity, max_waiting, _QUEUES[queue], target, interval, _SCOPES[scope]
        )
        self._selection = Selection(_core.ResourceSet([self._core]), (self,))
        # Slots taken by acquire(), and the task that took each.
        self._held: list[tuple[_core.Acquisition, Holds]] = []
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
    def scope(self) -> str:
        """``"process"`` or ``"host"``."""
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
        if not acquisition.try_acquire():
            await wait(acquisition, None, None)
        holds.append(selection)
        self._held.append((acquisition, holds))

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
        return ResourceStatistics._from_core(self._core.statistics())

    def __repr__(self) -> str:
        scope = ", scope='host'" if self.scope == "host" else ""
        return (
            f"Resource({self.capacity}, name={self.name!r}{scope}, "
            f"in_use={self.in_use}, waiting={self.waiting})"
        )
