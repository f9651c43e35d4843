"""The cluster stage of a request: after the local engine has granted its
slots, a request whose resources include cluster-scoped ones takes their
cluster slots, in registration order, within what is left of its timeout.

Only requests the local stage has admitted get here, so a process talks to
Redis for at most ``capacity`` requests of a resource at once, however long
its local queue. Kept apart from the asyncio glue so that a process without
cluster-scoped resources never imports redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from . import _core
from ._errors import Rejection, ServerBusy
from ._logging import log_rejection

if TYPE_CHECKING:
    from starlette.requests import Request

    from ._cluster import ClusterPermit, ClusterStage
    from ._resource import Resource


class Releasable(Protocol):
    """What a granted request holds: an engine acquisition, or one with its
    cluster slots."""

    def release(self, completion: _core.Completion = ...) -> None: ...


def running_loop_time() -> float:
    return asyncio.get_running_loop().time()


class ClusteredAcquisition:
    """A local acquisition with its cluster slots; ``release()`` gives back
    both, once, from any thread of the loop's (the cluster's in the
    background)."""

    __slots__ = ("_acquisition", "_permits", "_held")

    def __init__(self, acquisition: _core.Acquisition, permits: list[ClusterPermit]) -> None:
        self._acquisition = acquisition
        self._permits: list[ClusterPermit] | None = permits
        self._held = tuple(permits)  # for token() after the release

    def token(self, resource: Resource) -> int:
        """The fencing token of this request's cluster slot of ``resource``
        (see ``fencing_token``); LookupError if it holds none."""
        stage = resource._cluster
        for permit in self._held:
            if stage is not None and permit._stage is stage:
                return permit.token
        raise LookupError(f"no cluster slot of {resource.name!r} is held here")

    def tokens(self) -> dict[ClusterStage, int]:
        """The fencing token of each cluster slot held, by stage."""
        return {permit._stage: permit.token for permit in self._held}

    def release(self, completion: _core.Completion | None = None) -> None:
        permits, self._permits = self._permits, None
        if permits is not None:
            for permit in reversed(permits):
                permit.release()
            # The outcome feeds an adaptive limit of the local stage.
            if completion is None:
                self._acquisition.release()
            else:
                self._acquisition.release(completion)


async def with_cluster(
    acquisition: _core.Acquisition,
    stages: Sequence[ClusterStage],
    started: float,
    timeout: float | None,
    retry_after: int | None,
    request: Request | None = None,
    *,
    rejection: Rejection | None = None,
) -> ClusteredAcquisition:
    """Takes one cluster slot of each of ``stages`` for a request that holds
    its local slots (``acquisition``); the deadline is ``started + timeout``
    (loop time; ``None``: no limit). Raises ServerBusy (reason ``"timeout"``,
    ``"unavailable"`` or ``"disconnected"``) with nothing left held, local
    slots included. With a ``request``, a client that leaves while its
    request waits in Redis's queue ends the wait, as in the local stage."""
    from ._cluster import ClusterRefused

    deadline = None if timeout is None else started + timeout
    permits: list[ClusterPermit] = []
    try:
        for stage in stages:
            permits.append(await stage.acquire(deadline, request))
    # A request that never ran teaches an adaptive local limit nothing: its
    # local slot goes back as "ignored", not as a success lasting its wait.
    except ClusterRefused as e:
        ClusteredAcquisition(acquisition, permits).release(_core.Completion.ignored)
        log_rejection(e.resource, e.reason, running_loop_time() - started)
        if rejection is not None:
            raise rejection.error(e.resource, e.reason) from None
        raise ServerBusy(e.resource, e.reason, retry_after) from None
    except BaseException:
        ClusteredAcquisition(acquisition, permits).release(_core.Completion.ignored)
        raise
    # The work starts now: waiting in Redis's queue is not service time for
    # an adaptive local limit.
    acquisition.restart_service_clock()
    return ClusteredAcquisition(acquisition, permits)
