"""The exception a request gets when it cannot have its resources."""

from __future__ import annotations

from fastapi import HTTPException

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
)


class ServerBusy(HTTPException):
    """HTTP 503: a resource the route needs had no free slot in time.

    A subclass of FastAPI's ``HTTPException``, so without any setup the client
    gets status 503 and ``{"detail": "Server busy, please retry later"}``. To
    shape the response yourself, register a handler::

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
            resource, which had room for other keys, until the timeout), or
            ``"unavailable"``
            (a cluster-scoped resource's Redis could not be reached, see
            ``RedisScope``'s ``on_error``).
        retry_after: seconds sent in the ``Retry-After`` header, or ``None``.
    """

    def __init__(self, resource: str, reason: str, retry_after: int | None = None) -> None:
        headers = None if retry_after is None else {"Retry-After": str(retry_after)}
        super().__init__(status_code=503, detail=BUSY_DETAIL, headers=headers)
        self.resource = resource
        self.reason = reason
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"ServerBusy(resource={self.resource!r}, reason={self.reason!r})"
