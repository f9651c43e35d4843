"""The exception a request gets when it cannot have its resources, and the
response a rejection sends where no exception handler runs."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import HTTPException as _HTTPException
else:
    try:
        from fastapi import HTTPException as _HTTPException
    except ImportError:
        # A plain Starlette app (the ASGI wrapper) needs no FastAPI. FastAPI's
        # HTTPException subclasses this one, and FastAPI's own handler for it
        # answers both alike.
        from starlette.exceptions import HTTPException as _HTTPException

from ._validation import check_int

#: The response body of every rejection, exactly as the original package.
BUSY_DETAIL = "Server busy, please retry later"

#: Why a request was turned away.
REASONS = (
    "timeout",
    "queue_full",
    "shed",
    "disconnected",
    "cancelled",
    "key_limit",
    "unavailable",
    "deadline",
    "predicted_timeout",
    "lower_priority",
)


class ServerBusy(_HTTPException):
    """HTTP 503 (or the limiter's ``status_code``): a resource the route needs
    had no free slot in time.

    A subclass of FastAPI's ``HTTPException`` (Starlette's where FastAPI is
    not installed), so without any setup the client gets status 503 and
    ``{"detail": "Server busy, please retry later"}``. To shape the response
    yourself, register a handler::

        @app.exception_handler(ServerBusy)
        async def busy(request, exc: ServerBusy):
            return JSONResponse({"busy": exc.resource}, status_code=503)

    Attributes:
        resource: name of the resource that turned the request away.
        reason: ``"timeout"`` (no slot within the timeout), ``"queue_full"``
            (the resource's queue was at ``max_waiting``), ``"shed"`` (the
            adaptive queue dropped it early), ``"disconnected"`` (the client
            left while it waited), ``"cancelled"``, ``"key_limit"`` (the
            request's key already held its ``per_key`` share of the
            resource, which had room for other keys, until the timeout; or,
            with the queue at ``max_waiting``, it was the newest waiter of
            such a key and gave its place to a request of a key below its
            share), or ``"unavailable"`` (a cluster-scoped resource's Redis
            could not be reached, see ``RedisScope``'s ``on_error``; or a
            host-scoped resource's shared lock was held by a process stopped
            inside it, or its segment is corrupt), or ``"deadline"`` (the
            client's own budget, read from the limiter's ``deadline_header``
            or given as ``acquire(deadline=...)``, was spent on arrival or
            ran out first while it waited), or ``"predicted_timeout"`` (a
            resource with ``early_reject=True`` predicted from its queue and
            its service-time estimate that the request would time out, and
            refused it at once), or ``"lower_priority"`` (it waited in a
            full queue, ``max_waiting``, as the newest request of the lowest
            priority class waiting, and gave its place to a request of a
            higher class).
        retry_after: seconds sent in the ``Retry-After`` header, or ``None``.
        status_code: the HTTP status (``Limiter(status_code=...)``, 503 by
            default).
        detail: the ``detail`` of the JSON body (``Limiter(detail=...)``).
    """

    def __init__(
        self,
        resource: str,
        reason: str,
        retry_after: int | None = None,
        *,
        status_code: int = 503,
        detail: object = BUSY_DETAIL,
    ) -> None:
        headers = None if retry_after is None else {"Retry-After": str(retry_after)}
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.resource = resource
        self.reason = reason
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"ServerBusy(resource={self.resource!r}, reason={self.reason!r})"


class Rejection:
    """What a limiter answers a request it turns away: status, ``detail`` and
    ``Retry-After``, validated once at construction."""

    __slots__ = ("retry_after", "status_code", "detail")

    def __init__(self, retry_after: int | None, status_code: int, detail: object) -> None:
        check_int("retry_after", retry_after, minimum=0, allow_none=True)
        if isinstance(status_code, bool) or not isinstance(status_code, int):
            raise TypeError(
                f"status_code must be an int in 400..599, "
                f"got {type(status_code).__name__} {status_code!r}"
            )
        if not 400 <= status_code <= 599:
            raise ValueError(f"status_code must be an int in 400..599, got {status_code!r}")
        try:  # as Starlette's JSONResponse will
            json.dumps({"detail": detail}, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"detail must be JSON-serialisable (str, number, bool, None, list, dict), "
                f"got {type(detail).__name__} {detail!r}: {e}"
            ) from None
        self.retry_after = retry_after
        self.status_code = status_code
        self.detail = detail

    def error(
        self,
        resource: str,
        reason: str,
        predicted_wait: float | None = None,
        timeout: float | None = None,
    ) -> ServerBusy:
        """The ServerBusy for a refusal of ``resource`` for ``reason``.
        ``predicted_wait``: for ``"predicted_timeout"``, the wait the engine
        predicted (seconds), and ``timeout`` the time the request had to
        wait; see ``retry_after_for()``."""
        return ServerBusy(
            resource,
            reason,
            retry_after_for(self.retry_after, predicted_wait, timeout),
            status_code=self.status_code,
            detail=self.detail,
        )


RETRY_AFTER_CAP = 60
"""The most seconds a ``Retry-After`` that counts a predicted wait asks for,
unless the request's own timeout plus ``retry_after`` is longer."""


def retry_after_for(
    retry_after: int | None, predicted_wait: float | None, timeout: float | None = None
) -> int | None:
    """The ``Retry-After`` of a refusal: the limiter's ``retry_after``; for a
    request refused by early rejection (``predicted_wait``: the wait the
    engine predicted for it, in seconds, longer than its ``timeout``), that
    wait rounded up to whole seconds plus ``retry_after``, at most
    ``RETRY_AFTER_CAP`` or, if longer, ``timeout`` (rounded up) plus
    ``retry_after``. So an early refusal asks its client to come back no
    sooner than one that had waited: a request that waits out its timeout
    is told ``retry_after`` after it, and this one would have waited longer.
    ``None`` (no header) stays ``None``."""
    if retry_after is None or predicted_wait is None:
        return retry_after
    cap = RETRY_AFTER_CAP
    if timeout is not None and timeout + retry_after > cap:
        cap = math.ceil(timeout) + retry_after
    cap = max(cap, retry_after)
    # Also caps what is not a number (a damaged shared-memory estimate).
    if not predicted_wait + retry_after < cap:
        return cap
    return min(math.ceil(predicted_wait) + retry_after, cap)
