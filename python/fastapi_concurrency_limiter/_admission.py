"""The one way in of every limited entry point (the decorator, the
dependency, the ASGI wrapper): the deadlock check, the engine's acquisition
with its fast path, the wait, the cluster stage; and the release."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.requests import Request

from . import _core
from ._clustered import Releasable, running_loop_time, with_cluster
from ._deadline import deadline_of, enter, refuse_spent
from ._errors import Rejection
from ._holding import (
    REQUEST,
    SCOPE_HOLDS,
    Holds,
    Selection,
    check,
    holds_of,
    leave,
    running_loop,
    task_on,
)
from ._holding import _held as _holds
from ._waiting import wait
from .redis import _TOKENS as _CLUSTER_SLOTS  # the request's cluster slots, in its state

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from ._limiter import Limiter


class Gate:
    """One limited entry point: its resources, its own timeout (``None``: the
    limiter's, read per request since it is assignable), the limiter's
    rejection and client deadline header (``None``: none read)."""

    __slots__ = (
        "_limiter",
        "selection",
        "_rset",
        "_clusters",
        "_timeout",
        "rejection",
        "deadline_header",
        "margin",
        "priority",
    )

    def __init__(self, limiter: Limiter, selection: Selection, timeout: float | None) -> None:
        self._limiter = limiter
        self.selection = selection
        self._rset = selection.rset
        self._clusters = selection.clusters
        self._timeout = timeout
        self.rejection: Rejection = limiter._rejection
        self.deadline_header: str | None = limiter._deadline_header
        self.margin: float = limiter._deadline_margin
        #: The entry point's fixed class; ``None``: CRITICAL (the engine's
        #: default) or a function's, given to ``admit()`` per request.
        self.priority: _core.Priority | None = None

    async def admit(
        self,
        connection: HTTPConnection | None,
        key: str | None = None,
        priority: _core.Priority | None = None,
    ) -> tuple[Releasable, Holds]:
        """Takes the slots for the running task, waiting up to the timeout;
        returns what to release and the task's holds (``release()``).
        While it waits, a client that leaves (``connection``'s receive
        channel, an HTTP request or a WebSocket) ends the wait. Raises
        ServerBusy, or RuntimeError when the task holds slots that make
        waiting a possible deadlock; nothing is held then. With the
        limiter's ``deadline_header``, the client's budget bounds the wait,
        and a spent one is refused before trying (reason ``deadline``).
        ``priority``: the request's class (``None``: the gate's own)."""
        selection = self.selection
        # What this task holds (inlined: this is the fast path).
        task = task_on(running_loop())
        holds = _holds.get(id(task))
        if holds is None:
            holds = holds_of(task)
        elif holds:
            check(holds, selection)
        if connection is not None:
            # What limiter.asgi() holds for this request, maybe in another task.
            outer = connection.scope.get(SCOPE_HOLDS)
            if outer:
                check(outer, selection, REQUEST)
        if priority is None:
            priority = self.priority
        if priority is not None:
            acquisition = _core.Acquisition(self._rset, key, priority)
        elif key is not None:
            acquisition = _core.Acquisition(self._rset, key)
        else:
            acquisition = _core.Acquisition(self._rset)
        deadline = None
        if self.deadline_header is not None and connection is not None:
            deadline = self.client_deadline(acquisition, connection)
        granted: Releasable = acquisition
        acquired = acquisition.try_acquire()
        if not acquired or self._clusters:
            granted = await self.settle(acquisition, acquired, connection, deadline)
        holds.append(selection)
        return granted, holds

    def client_deadline(
        self, acquisition: _core.Acquisition, connection: HTTPConnection
    ) -> float | None:
        """The monotonic time at which the client of ``connection`` gives up
        (``None``: it sent no budget), made readable by ``remaining_budget()``;
        refuses ``acquisition`` (ServerBusy, reason ``deadline``) if no more
        than the margin is left. Only with a ``deadline_header``."""
        header = self.deadline_header
        assert header is not None
        deadline = deadline_of(connection, header)
        enter(deadline, header)
        if deadline is not None and deadline - time.monotonic() <= self.margin:
            refuse_spent(acquisition, self.rejection)
        return deadline

    async def settle(
        self,
        acquisition: _core.Acquisition,
        acquired: bool,
        connection: HTTPConnection | None,
        deadline: float | None = None,
    ) -> Releasable:
        """The rest of ``admit()`` after ``acquisition.try_acquire()``
        (``acquired``: what it returned) for an acquisition that found no
        free slot or has a cluster stage: waits, takes the cluster slots.
        ``deadline``: the client's (monotonic, from ``client_deadline()``),
        which bounds both waits.
        The decorator inlines what comes before (its fast path)."""
        timeout = self._limiter._timeout if self._timeout is None else self._timeout
        started = running_loop_time()
        left = None
        if deadline is not None:
            left = deadline - time.monotonic() - self.margin
        if not acquired:
            rejection = self.rejection
            await wait(
                acquisition,
                timeout,
                rejection.retry_after,
                connection,
                rejection=rejection,
                deadline=left,
            )
        if self._clusters:
            if left is not None and (timeout is None or left < timeout):
                # The cluster stage ends with the client's budget too (its
                # refusal then says "timeout": Redis's queue knows no deadlines).
                timeout = max(left, 0.0)
            return await self._cluster(acquisition, started, timeout, connection)
        return acquisition

    async def _cluster(
        self,
        acquisition: _core.Acquisition,
        started: float,
        timeout: float | None,
        connection: HTTPConnection | None,
    ) -> Releasable:
        # The cluster stage watches HTTP requests' receive channels only.
        request = connection if isinstance(connection, Request) else None
        rejection = self.rejection
        granted = await with_cluster(
            acquisition,
            self._clusters,
            started,
            timeout,
            rejection.retry_after,
            request,
            rejection=rejection,
        )
        if connection is not None:
            # For fencing_token(request, resource): merged with the tokens
            # of the request's other gates (a dependency and the decorator).
            state = connection.scope.setdefault("state", {})
            state.setdefault(_CLUSTER_SLOTS, {}).update(granted.tokens())
        return granted

    def release(
        self, granted: Releasable, holds: Holds, completion: _core.Completion | None = None
    ) -> None:
        """Gives back what ``admit()`` returned."""
        if completion is None:
            granted.release()
        else:
            granted.release(completion)
        selection = self.selection
        if holds and holds[-1] is selection:
            holds.pop()
        else:
            leave(holds, selection)
