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

from ._errors import ServerBusy
from ._logging import log_rejection

if TYPE_CHECKING:
    from ._cluster import ClusterPermit, ClusterStage


class _Releasable(Protocol):
    def release(self) -> None: ...


async def acquire_cluster(
    stages: Sequence[ClusterStage],
    started: float,
    timeout: float | None,
    retry_after: int | None,
) -> list[ClusterPermit]:
    """Takes one cluster slot of each of ``stages``; the deadline is
    ``started + timeout`` (loop time; ``None``: no limit). Raises ServerBusy
    (reason ``"timeout"`` or ``"unavailable"``) with nothing left held."""
    from ._cluster import ClusterRefused

    deadline = None if timeout is None else started + timeout
    permits: list[ClusterPermit] = []
    try:
        for stage in stages:
            permits.append(await stage.acquire(deadline))
    except ClusterRefused as e:
        release_all(permits)
        loop = asyncio.get_running_loop()
        log_rejection(e.resource, e.reason, loop.time() - started)
        raise ServerBusy(e.resource, e.reason, retry_after) from None
    except BaseException:
        release_all(permits)
        raise
    return permits


def release_all(permits: Sequence[_Releasable]) -> None:
    for permit in reversed(permits):
        permit.release()
