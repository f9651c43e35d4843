"""Client deadlines: the budget a client sends with its request (gRPC's
``grpc-timeout``, Envoy's ``x-envoy-expected-rq-timeout-ms``, or a header of
the application's own in seconds), how long that lets the request wait, and
the remaining budget for the handler to pass on to the calls it makes.

A request waits at most min(route timeout, remaining budget - margin); one
whose budget is already spent (at most the margin left) is refused at once,
without queueing and without running (reason ``deadline``). A header that
cannot be read is ignored (the request is limited as if it had none) and
logged once per header name at WARNING.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from typing import TYPE_CHECKING, NoReturn

from . import _core
from ._logging import log_rejection
from ._validation import MAX_SECONDS, check_seconds

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import HTTPConnection
    from starlette.types import ASGIApp, Receive, Scope, Send

    from ._errors import Rejection

logger = logging.getLogger("fastapi_concurrency_limiter")

#: gRPC's header: 1 to 8 digits and a unit (H, M, S, m, u, n).
GRPC_TIMEOUT = "grpc-timeout"
#: Envoy's header: whole milliseconds; 0 is Envoy's "no timeout".
ENVOY_TIMEOUT = "x-envoy-expected-rq-timeout-ms"
#: Default ``deadline_margin``: seconds kept back from the client's budget
#: for the response to reach it.
DEFAULT_MARGIN = 0.005

# Where the first entry point that reads a request's deadline leaves it, so
# that every other one of the same request (a dependency and the decorator)
# counts from the same arrival: {header name: monotonic deadline or None}.
SCOPE_DEADLINE = "fastapi_concurrency_limiter.deadline"
# Where limiter.instrument(app)'s outermost middleware stamps when the
# request reached the app (time.monotonic()), so that the budget counts from
# there rather than from the first entry point (after the body was read and
# the dependencies before it ran).
SCOPE_ARRIVED = "fastapi_concurrency_limiter.arrived"

_GRPC = re.compile(r"([0-9]{1,8})([HMSmun])")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_MILLISECONDS = re.compile(r"[0-9]+")
# Decimal seconds, with an exponent as common float formatters write them
# ("1e-05", "5.0E-4"); no sign, inf or nan.
_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Envoy milliseconds with more significant digits than this are capped
# without int(), which refuses numbers of more than 4300 digits.
_MAX_MS_DIGITS = 15
# RFC 9110 token characters: what a header name may be made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_DEADLINE = _core.Outcome.deadline

#: The running request's client deadline: (monotonic time the client gives
#: up, the header it came in). Set by the limiter's entry points.
_current: contextvars.ContextVar[tuple[float, str] | None] = contextvars.ContextVar(
    "fastapi_concurrency_limiter_deadline", default=None
)
# Header names whose unreadable values were logged already.
_warned: set[str] = set()


def check_header(header: object, name: str = "deadline_header") -> str:
    """A header name (the parameter ``name``), lower-cased; TypeError or
    ValueError naming the parameter."""
    if not isinstance(header, str):
        raise TypeError(
            f"{name} must be a str naming a request header (e.g. 'grpc-timeout', "
            f"'x-envoy-expected-rq-timeout-ms', 'x-request-timeout') or None, "
            f"got {type(header).__name__} {header!r}"
        )
    if not _TOKEN.fullmatch(header):
        raise ValueError(
            f"{name} must name a request header: letters, digits and "
            f"!#$%&'*+-.^_`|~ only, not empty (e.g. 'grpc-timeout'), got {header!r}"
        )
    return header.lower()


def parse_budget(header: str, value: str) -> float | None:
    """The client's budget in seconds from the value of ``header`` (its name
    in lower case), capped at ``MAX_SECONDS``; ``None`` for Envoy's ``0``
    (no timeout). ValueError, saying why, for a value not in the header's
    format: ``grpc-timeout`` 1-8 digits and a unit H, M, S, m, u or n;
    ``x-envoy-expected-rq-timeout-ms`` whole milliseconds; any other header
    decimal seconds (``2``, ``0.25``, also with an exponent: ``1e-05``,
    ``5.0E-4``). Signs, ``inf`` and ``nan`` are not in any of them; a huge
    value of any length is capped."""
    text = value.strip()
    if header == GRPC_TIMEOUT:
        match = _GRPC.fullmatch(text)
        if match is None:
            raise ValueError("expected 1 to 8 digits and a unit H, M, S, m, u or n")
        seconds = int(match[1]) * _GRPC_UNITS[match[2]]
    elif header == ENVOY_TIMEOUT:
        if _MILLISECONDS.fullmatch(text) is None:
            raise ValueError("expected whole milliseconds")
        digits = text.lstrip("0")
        if not digits:
            return None
        if len(digits) > _MAX_MS_DIGITS:
            return MAX_SECONDS
        seconds = int(digits) / 1000.0
    else:
        if _SECONDS.fullmatch(text) is None:
            raise ValueError("expected seconds as a decimal number (e.g. 2.5 or 1e-05)")
        seconds = float(text)  # a huge one is inf at most: capped below
    return min(seconds, MAX_SECONDS)


def deadline_of(connection: HTTPConnection, header: str) -> float | None:
    """The monotonic time at which the client of ``connection`` gives up
    (counted from its arrival at the app as stamped by ``StampArrival``,
    else from the first call for the request), or ``None`` if it sent no
    readable budget in ``header``."""
    scope = connection.scope
    known: dict[str, float | None] | None = scope.get(SCOPE_DEADLINE)
    if known is None:
        known = scope[SCOPE_DEADLINE] = {}
    elif header in known:
        return known[header]
    arrived: float | None = scope.get(SCOPE_ARRIVED)
    if arrived is None:
        arrived = time.monotonic()
    raw = header.encode("latin-1")
    deadline = None
    for name, value in scope.get("headers") or ():
        if name.lower() == raw:
            text = value.decode("latin-1")
            try:
                seconds = parse_budget(header, text)
            except ValueError as e:
                _warn_once(header, text, str(e))
            else:
                deadline = None if seconds is None else arrived + seconds
            break
    known[header] = deadline
    return deadline


def _warn_once(header: str, value: str, why: str) -> None:
    if header in _warned:
        return
    _warned.add(header)
    shown = value if len(value) <= 64 else value[:64] + "..."
    logger.warning(
        "ignoring the client deadline in header %r: %r is not a budget (%s); "
        "such requests are limited as if they sent none (logged once per header)",
        header,
        shown,
        why,
        extra={"header": header, "value": shown},
    )


class StampArrival:
    """Pure ASGI middleware, the outermost of an app (``stamp_arrivals()``):
    stamps in each HTTP request's and WebSocket connection's scope when it
    arrived, before any other middleware, the body or a dependency runs."""

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" and SCOPE_ARRIVED not in scope:
            scope[SCOPE_ARRIVED] = time.monotonic()
        await self.app(scope, receive, send)


def stamp_arrivals(app: Starlette) -> None:
    """Makes ``StampArrival`` the outermost layer of ``app`` (outside the
    middleware added before or after this call, and its error handler);
    once per app."""
    if getattr(app, "_stamps_arrivals", False):
        return
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        return StampArrival(build())

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    if app.middleware_stack is not None:  # already started: wrap what runs
        app.middleware_stack = StampArrival(app.middleware_stack)
    app._stamps_arrivals = True  # type: ignore[attr-defined]


def begin() -> contextvars.Token[tuple[float, str] | None]:
    """Where an entry point of a limiter with a ``deadline_header`` starts
    with a request: no deadline yet in the running context (an earlier
    request's of the same task is gone). ``end()`` the token when the
    request ends."""
    return _current.set(None)


def end(token: contextvars.Token[tuple[float, str] | None]) -> None:
    """Where that entry point is done with the request: ``remaining_budget()``
    reads what it read before ``begin()`` (``None`` outside any request), so
    that the request's budget does not outlive it in its task (an
    in-process test client runs every request in the caller's)."""
    try:
        _current.reset(token)
    except (ValueError, RuntimeError):
        # Ended in another context than begun (a thread): that context
        # never saw the budget; or ended twice.
        pass


def enter(deadline: float | None, header: str) -> None:
    """Makes the request's deadline (``None``: it has none) readable by
    ``remaining_budget()`` in the running context (the request's task: its
    handler, what it awaits), in place of an earlier request's that ran in
    the same task (an in-process test client's)."""
    _current.set(None if deadline is None else (deadline, header))


def refuse_spent(acquisition: _core.Acquisition, rejection: Rejection) -> NoReturn:
    """Turns away a request whose budget is spent, before it tries for a
    slot: counted by the engine (reason ``deadline``), logged, ServerBusy."""
    acquisition.refuse(_DEADLINE)
    resource = acquisition.refused_by or ""
    log_rejection(resource, "deadline", 0.0)
    raise rejection.error(resource, "deadline")


def remaining_budget() -> float | None:
    """Seconds left of the client's budget for the running request (0.0 once
    spent), or ``None`` when it sent none (no ``deadline_header`` on its
    limiter, or no readable value in it), or outside a limited request.

    Read it in the handler, or in anything it calls or awaits, to give the
    calls it makes no more time than its client will wait::

        left = remaining_budget()
        async with httpx.AsyncClient(timeout=10.0 if left is None else left) as client:
            await client.get(url)

    A ``def`` handler (run in the thread pool) sees it too. It is the
    client's budget minus the time since the request arrived, without the
    limiter's ``deadline_margin``.
    """
    current = _current.get()
    if current is None:
        return None
    return max(current[0] - time.monotonic(), 0.0)


def deadline_headers(name: str | None = None, *, margin: float = 0.0) -> dict[str, str]:
    """The running request's remaining budget (``remaining_budget()`` minus
    ``margin`` seconds) as a header to send on to a downstream service:
    ``{name: value}``, or ``{}`` when the request has no client deadline.

    ``name`` (default: the header the budget came in) picks the format:
    ``grpc-timeout`` in gRPC's (``"250m"``), ``x-envoy-expected-rq-timeout-ms``
    in whole milliseconds, any other in decimal seconds. A spent budget is
    sent as zero (as 1 ms in Envoy's header, whose 0 means "no timeout"),
    which a server doing the same refuses at once::

        async with httpx.AsyncClient() as client:
            await client.get(url, headers=deadline_headers())
    """
    if name is not None:
        name = check_header(name, "name")
    margin = check_seconds("margin", margin)
    current = _current.get()
    if current is None:
        return {}
    header = current[1] if name is None else name
    left = max(current[0] - time.monotonic() - margin, 0.0)
    return {header: format_budget(header, left)}


def format_budget(header: str, seconds: float) -> str:
    """``seconds`` (>= 0) in the format of ``header`` (lower case), rounded
    down so that the receiver never waits longer than the sender would."""
    if header == GRPC_TIMEOUT:
        # The finest unit whose count fits in 8 digits.
        for unit, size in (("n", 1e-9), ("u", 1e-6), ("m", 1e-3), ("S", 1.0), ("M", 60.0)):
            count = int(seconds / size)
            if count < 10**8:
                return f"{count}{unit}"
        return f"{min(int(seconds / 3600.0), 10**8 - 1)}H"
    if header == ENVOY_TIMEOUT:
        # 0 would mean "no timeout" to Envoy: a spent budget is 1 ms.
        return str(max(int(seconds * 1000.0), 1))
    return f"{int(seconds * 1000.0) / 1000.0:.3f}"
