"""Limiter: the registry of resources and the route decorator."""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import WebSocketException
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp
from starlette.websockets import WebSocket

from . import _core
from ._adaptive import SUCCESS, completion_of
from ._admission import Gate
from ._asgi import TRY_AGAIN_LATER, KeyOf, LimitedApp, OnReject, PriorityOf, refuse, where
from ._clustered import ClusteredAcquisition, Releasable, running_loop_time, with_cluster
from ._deadline import DEFAULT_MARGIN, begin, check_header, end, refuse_spent, stamp_arrivals
from ._errors import BUSY_DETAIL, Rejection, ServerBusy
from ._holding import (
    REQUEST,
    SCOPE_HOLDS,
    Holds,
    Selection,
    check,
    current_task,
    holds_of,
    leave,
    running_loop,
    task_on,
)
from ._holding import _held as _holds
from ._keys import bounded, key_from
from ._order import catch_at_decoration, record
from ._priority import CORE, Priority, priority_from
from ._resource import Resource
from ._statistics import LimiterStatistics
from ._streaming import STREAMED, Held, end_after_sending, release_after_sending
from ._validation import check_seconds
from ._waiting import wait

if TYPE_CHECKING:
    from fastapi import FastAPI

F = TypeVar("F", bound=Callable[..., Any])

# Keyword under which the decorator asks FastAPI for the Request when the
# endpoint does not declare one itself.
_REQUEST_PARAM = "_concurrency_limiter_request"
# Keyword under which a generator endpoint gets its slots from the hidden
# dependency that waits for them.
_SLOTS_PARAM = "_concurrency_limiter_slots"
# Keyword under which an endpoint or dependency gets the result of its key
# function, resolved by FastAPI's dependency injection.
_KEY_PARAM = "_concurrency_limiter_key"
# Keyword under which an endpoint or dependency gets the result of its
# priority function, resolved by FastAPI's dependency injection.
_PRIORITY_PARAM = "_concurrency_limiter_priority"
_CRITICAL = Priority.CRITICAL
# Keyword under which a priority function's wrapper gets the connection (to
# name the route in its error).
_CONNECTION_PARAM = "_concurrency_limiter_connection"

#: Every limited endpoint and dependency function -> its gate (for the
#: OpenAPI 503 and the start-up check of routes limited twice).
gates: weakref.WeakKeyDictionary[Callable[..., Any], Gate] = weakref.WeakKeyDictionary()


class Limiter:
    """Registers resources, fixes the order in which requests take them, and
    limits routes.

    Args:
        timeout: seconds a request may wait to acquire *all* the resources
            of its route together; then it gets HTTP 503. ``None``: no limit.
        resources: every resource routes may use, in the order in which they
            are always acquired (so no two requests can deadlock).
        retry_after: seconds to put in the ``Retry-After`` header of the
            503, or ``None`` to send none. A request refused by early
            rejection (``Resource(early_reject=True)``, reason
            ``"predicted_timeout"``) is told the wait predicted for it
            (rounded up) plus ``retry_after``, at most 60 s (or its
            timeout plus ``retry_after``, if longer): coming back sooner,
            it would meet the same queue.
        status_code: the HTTP status of a rejection, an int in 400..599
            (e.g. 429).
        detail: the ``detail`` of a rejection's JSON body
            (``{"detail": detail}``); anything JSON-serialisable.
        deadline_header: the request header in which clients send their
            budget (how long they will wait for the response), or ``None``
            (default) to read none. ``"grpc-timeout"`` is read in gRPC's
            format (``"250m"``: 1-8 digits and a unit H, M, S, m, u, n),
            ``"x-envoy-expected-rq-timeout-ms"`` in whole milliseconds (0:
            no deadline), any other name in decimal seconds (``"2.5"``).
            A request then waits at most min(timeout, its remaining budget
            - ``deadline_margin``); one with no more than the margin left is
            refused at once, without queueing and without running its
            handler (reason ``"deadline"``). The budget counts from when the
            request reached the app with ``instrument(app)``, else from when
            the first entry point of this package sees it. A value not
            in the format (garbage, negative, empty) is ignored, logged once
            per header at WARNING; a huge one leaves the timeout in force.
            ``remaining_budget()`` reads what is left in the handler. See
            docs/deadlines.md.
        deadline_margin: seconds (>= 0) of the client's budget kept back
            for the response to reach it.
    """

    def __init__(
        self,
        timeout: float | None,
        resources: Sequence[Resource],
        *,
        retry_after: int | None = 1,
        status_code: int = 503,
        detail: Any = BUSY_DETAIL,
        deadline_header: str | None = None,
        deadline_margin: float = DEFAULT_MARGIN,
    ) -> None:
        self._timeout = _check_timeout(timeout)
        self._deadline_header = None if deadline_header is None else check_header(deadline_header)
        self._deadline_margin = check_seconds("deadline_margin", deadline_margin)
        self._resources = _check_resources("resources", resources)
        self._rejection = Rejection(retry_after, status_code, detail)
        self._retry_after = retry_after
        # The engine validates the registry (no resource or name twice); its
        # own timeout is unused here (the event loop keeps the deadlines).
        self._core = _core.Limiter([r._core for r in self._resources], 0.0)
        self._sets: dict[tuple[Resource, ...], Selection] = {}
        # The order the deadlock check enforces on nested acquisitions.
        for i, r in enumerate(self._resources):
            r._before.update(self._resources[:i])

    @property
    def timeout(self) -> float | None:
        """Seconds to acquire all of a route's resources; ``None``: no limit.
        Assignable (as in the original package): routes without a timeout of
        their own use the new value from their next request on."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = _check_timeout(value)

    @property
    def deadline_header(self) -> str | None:
        """The header clients' budgets are read from (lower case), or ``None``."""
        return self._deadline_header

    @property
    def deadline_margin(self) -> float:
        return self._deadline_margin

    @property
    def retry_after(self) -> int | None:
        return self._retry_after

    @property
    def status_code(self) -> int:
        return self._rejection.status_code

    @property
    def detail(self) -> Any:
        return self._rejection.detail

    def _select(self, resources: Sequence[Resource]) -> Selection:
        try:
            return self._sets[tuple(resources)]  # validated before
        except (KeyError, TypeError):
            pass
        key = tuple(_check_resources("resources", resources))
        # The engine validates: registered, no duplicates, registration
        # order, not empty. ValueError otherwise.
        rset = self._core.select([r._core for r in key])
        for i, first in enumerate(key):
            for later in key[i + 1 :]:
                if later in first._before:
                    raise ValueError(
                        f"resources: this Limiter takes {first.name!r} before {later.name!r}, "
                        f"but another Limiter registers {later.name!r} before {first.name!r}; "
                        "two requests taking them in opposite orders could deadlock. "
                        "Register shared resources in the same order in every Limiter"
                    )
        selection = self._sets[key] = Selection(rset, key)
        return selection

    def resources(
        self,
        resources: Sequence[Resource],
        *,
        timeout: float | None = None,
        key: Callable[..., Any] | None = None,
        priority: Priority | str | Callable[..., Any] = Priority.CRITICAL,
    ) -> Callable[[F], F]:
        """Route decorator: the endpoint runs only while it holds a slot of
        each of ``resources``, taken in registration order; a request that
        cannot get them within the timeout gets HTTP 503 (``ServerBusy``).

        Place it under the route decorator::

            @app.get("/messages")
            @limiter.resources([database_resource])
            async def read_messages(): ...

        Works for ``async def`` and ``def`` endpoints (a ``def`` endpoint
        waits on the event loop, then runs in the thread pool as FastAPI
        runs it), for generator endpoints, and for WebSocket endpoints
        (``@app.websocket``: the connection holds the slots for its whole
        life; one that cannot get them in time is refused before it is
        accepted, see docs/entry-points.md, "WebSockets"). An endpoint whose response
        body is produced while it is sent (a generator endpoint, a returned
        ``StreamingResponse`` or ``FileResponse``) holds the slots until the
        body has been sent or the client has gone. ``timeout`` overrides the
        limiter's for this route. While a request waits, a client
        disconnect takes it out of the queue.

        ``key``: a function giving the request's key for the ``per_key``
        share of the resources (``None``: no key), resolved by FastAPI's
        dependency injection, so it may take the ``Request`` and other
        dependencies (``Depends(current_user)``); sync or ``async``. A
        parameter without annotation gets the ``Request`` (or the
        ``WebSocket``): ``key=lambda request: request.headers.get("x-api-key")``.

        ``priority``: the class of the route's requests (``Priority``, or
        its name), or a function returning it (a ``Priority``, its name, or
        ``None`` for ``CRITICAL``), resolved as ``key`` is:
        ``priority=priority_from_header("x-priority")`` or ``priority=lambda
        request: ...``. A freed slot goes to the highest class waiting; a
        full queue pushes out the newest waiter of the lowest class for a
        higher one. Default ``CRITICAL``. A function returning anything else
        fails its request (500), logged at ERROR. See docs/priorities.md.

        Raises ValueError at decoration time for a ``priority`` that is no
        class, or is not ``CRITICAL`` on a resource with ``per_key`` (not
        supported there), for an empty list, a resource
        that is not registered, one listed twice, resources out of
        registration order or in an order another Limiter contradicts;
        TypeError for items that are not Resources. A request whose task
        already holds a slot that makes waiting a possible deadlock gets
        RuntimeError (see docs/usage.md, "Deadlocks").
        """
        gate = self._gate(resources, timeout, priority)
        key_dependency = _key_dependency(key, gate)
        priority_dependency = _priority_dependency(priority, gate)

        def decorator(func: F) -> F:
            limited = _limit(func, gate, key_dependency, priority_dependency)
            # Above the route decorator, the route has the original already.
            record(func)
            catch_at_decoration(func, sys._getframe(1))
            return limited  # type: ignore[return-value]

        return decorator

    def dependency(
        self,
        resources: Sequence[Resource],
        *,
        timeout: float | None = None,
        key: Callable[..., Any] | None = None,
        priority: Priority | str | Callable[..., Any] = Priority.CRITICAL,
    ) -> Callable[..., AsyncIterator[None]]:
        """A FastAPI dependency that holds a slot of each of ``resources``
        while the endpoint runs, to limit a whole router or app::

            router = APIRouter(dependencies=[Depends(limiter.dependency([db]))])

        Same order rules (ValueError here), timeout, 503, disconnect
        handling, deadlock check, ``key`` and ``priority`` as the decorator. When the slots
        are given back depends on FastAPI's handling of dependencies with
        ``yield``: see docs/entry-points.md, "Limiting a router" (from FastAPI 0.118,
        after the response's background tasks have run, unless it is used
        as ``Depends(..., scope="function")``). On a WebSocket
        route the connection holds the slots for its life; one turned away
        is closed before it is accepted (``WebSocketException`` 1013, which
        the server answers with HTTP 403): the decorator and ``asgi()``
        refuse with the limiter's status instead.
        """
        gate = self._gate(resources, timeout, priority)
        key_dependency = _key_dependency(key, gate)
        priority_dependency = _priority_dependency(priority, gate)
        deadlines = gate.deadline_header is not None

        async def limit(connection: HTTPConnection, **kwargs: Any) -> AsyncIterator[None]:
            token = begin() if deadlines else None
            try:
                try:
                    granted, holds = await gate.admit(
                        connection, kwargs.get(_KEY_PARAM), kwargs.get(_PRIORITY_PARAM)
                    )
                except ServerBusy as exc:
                    if connection.scope["type"] == "websocket":
                        # A dependency cannot answer the handshake itself: the
                        # close before accept is refused with HTTP 403.
                        raise WebSocketException(TRY_AGAIN_LATER, "Server busy") from exc
                    raise
                try:
                    yield
                except BaseException as exc:
                    gate.release(granted, holds, completion_of(exc))
                    raise
                gate.release(granted, holds)
            finally:
                if token is not None:
                    end(token)

        sig = inspect.Signature([
            inspect.Parameter(
                "connection", inspect.Parameter.KEYWORD_ONLY, annotation=HTTPConnection
            )
        ])
        if key_dependency is not None:
            sig = _with_param(sig, _KEY_PARAM, Any, key_dependency)
        if priority_dependency is not None:
            sig = _with_param(sig, _PRIORITY_PARAM, Any, priority_dependency)
        limit.__signature__ = sig  # type: ignore[attr-defined]
        limit.__qualname__ = limit.__name__ = "concurrency_limit"
        gates[limit] = gate
        return limit

    def asgi(
        self,
        resources: Sequence[Resource],
        *,
        timeout: float | None = None,
        key: KeyOf | None = None,
        on_reject: OnReject | None = None,
        priority: Priority | str | PriorityOf = Priority.CRITICAL,
    ) -> Callable[[ASGIApp], LimitedApp]:
        """Wraps any ASGI app so that each of its HTTP requests and WebSocket
        connections holds a slot of each of ``resources``: a Starlette
        ``Route`` endpoint, a ``Mount``ed sub-app, a whole app::

            app.mount("/files", limiter.asgi([disk])(files_app))

        An HTTP request holds its slots until its response has been sent
        completely or the app has returned or raised (a client that
        leaves once the app runs does not end the app, so its slots stay
        held until it returns); a WebSocket
        connection for its whole life. A request turned away gets the
        limiter's response (503 and ``{"detail": ...}``, ``Retry-After``);
        a WebSocket connection is refused before it is accepted. Lifespan
        and other scopes pass through. Needs no FastAPI.

        ``key``: ``key(connection)`` (sync or ``async``) gets the Starlette
        ``Request`` or ``WebSocket`` and returns its key (str) or ``None``.
        ``priority``: a ``Priority`` (or its name), or ``priority(connection)``
        (sync or ``async``) returning one (or ``None``: ``CRITICAL``), e.g.
        ``priority_from_header("x-priority")``; see the decorator.
        ``on_reject``: ``on_reject(connection, exc)`` (sync or ``async``)
        returns the Starlette ``Response`` to send instead of the limiter's
        (for a WebSocket: as the handshake's denial response where the
        server supports it). Without it, the app's exception handler for
        ``ServerBusy`` answers if there is one (on the wrapped app, else on
        ``scope["app"]``; see docs/entry-points.md, "Your own rejection"). Same
        order rules (ValueError here), timeout and deadlock check as the
        decorator; what the wrapper holds is recorded in the request's
        scope, so that a nested limit of the same request is refused with
        RuntimeError also from another task.
        """
        gate = self._gate(resources, timeout, priority)
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable (connection) -> str | None, got {key!r}")
        if key is not None:
            _check_keyed(gate)
        if on_reject is not None and not callable(on_reject):
            raise TypeError(
                f"on_reject must be a callable (connection, exc) -> Response, got {on_reject!r}"
            )

        def wrap(app: ASGIApp) -> LimitedApp:
            if not callable(app):
                raise TypeError(f"app must be an ASGI app, got {type(app).__name__} {app!r}")
            return LimitedApp(app, gate, key, on_reject, priority if callable(priority) else None)

        return wrap

    def _gate(
        self, resources: Sequence[Resource], timeout: float | None, priority: object
    ) -> Gate:
        selection = self._select(resources)
        own_timeout = None if timeout is None else check_seconds("timeout", timeout)
        gate = Gate(self, selection, own_timeout)
        if callable(priority):
            _check_prioritized(selection.resources, priority)
        else:
            gate.priority = _fixed_priority(selection.resources, priority)
        return gate

    def acquire(
        self,
        resources: Sequence[Resource],
        *,
        timeout: float | None = None,
        key: str | None = None,
        deadline: float | None = None,
        priority: Priority | str = Priority.CRITICAL,
    ) -> _Hold:
        """Holds ``resources`` for the body of an ``async with`` block, for
        code that is not a route (background jobs, scripts)::

            async with limiter.acquire([database_resource]):
                await run_query()

        Same order rules and timeout as the decorator; raises ``ServerBusy``
        when the resources cannot be had in time, RuntimeError at once when
        the calling task holds a slot that makes waiting a possible
        deadlock. The returned object may be kept and entered again, also
        concurrently.

        ``key`` names the client the slots are for (an API key, a user, a
        tenant): on resources created with ``per_key=N`` it holds at most
        ``N`` slots, waits without holding up other keys beyond that, and is
        refused with reason ``"key_limit"`` if it was held back by its share
        until the timeout. ``None`` (default): exempt from per-key shares,
        counted in the total. A key longer than 256 bytes (UTF-8) is replaced
        by its SHA-256, so that each waiter costs bounded memory. Keys must
        come from authenticated data: a client choosing a new one per request
        gets a new share each time. Resources without ``per_key`` ignore it::

            async with limiter.acquire([db], key=request.headers.get("x-api-key")):
                ...

        ``deadline``: seconds (>= 0) the caller will wait, counted from each
        entry, as a client's budget: the entry waits at most min(timeout,
        deadline - ``deadline_margin``) and one with no more than the margin
        is refused at once without queueing, reason ``"deadline"`` in either
        case. ``None`` (default): none. Inside a request, pass on its
        client's: ``limiter.acquire([db], deadline=remaining_budget())``
        (not implied, so that work the request leaves behind, such as a
        background task, is not cut short by its client's budget).

        ``priority``: the class of each entry (``Priority`` or its name;
        default ``CRITICAL``), as the decorator's: a background job can wait
        behind requests with ``priority=Priority.SHEDDABLE``.
        """
        selection = self._select(resources)
        fixed = None  # CRITICAL, the default: nothing to check
        if priority is not _CRITICAL:
            if callable(priority):
                raise TypeError(
                    "priority of limiter.acquire() must be a Priority or its name (there is "
                    f"no request to call a function with), got {priority!r}"
                )
            fixed = _fixed_priority(selection.resources, priority)
        own_timeout = None if timeout is None else check_seconds("timeout", timeout)
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a str or None, got {type(key).__name__} {key!r}")
        budget = None if deadline is None else check_seconds("deadline", deadline)
        return _Hold(
            self, selection, own_timeout, None if key is None else bounded(key), budget, fixed
        )

    def instrument(self, app: FastAPI) -> None:
        """Documents the rejection response (body schema and ``Retry-After``)
        of every route this library limits in ``app``'s OpenAPI schema, so
        that generated clients know it can happen; and, when the app starts,
        refuses with ValueError a route limited twice on one resource (a
        router's or route's ``dependency()`` and the decorator), which
        would otherwise fail each of its requests with RuntimeError, and a
        route whose ``@limiter.resources(...)`` is above the route decorator
        (which registered the function unlimited): now for the routes
        declared so far, and when the app starts for all. Call once, e.g.
        right after creating the app; routes declared later are covered
        too.

        With a ``deadline_header``, it also makes a tiny ASGI middleware the
        outermost layer of ``app`` (outside the other middleware, whenever
        added): it notes when each request arrives, and the client's budget
        counts from there instead of from the limiter's first entry point
        (after the request body was read and the dependencies before it ran).
        """
        from ._openapi import check_order, check_routes_at_startup, document_busy_responses

        check_order(app)
        document_busy_responses(app, gates)
        check_routes_at_startup(app, gates)
        if self._deadline_header is not None:
            stamp_arrivals(app)

    def statistics(self) -> LimiterStatistics:
        """Snapshots of every registered resource, in registration order."""
        return LimiterStatistics(
            timeout=self._timeout,
            resources=tuple(
                r._statistics(s)
                for r, s in zip(self._resources, self._core.statistics(), strict=True)
            ),
        )

    def __repr__(self) -> str:
        names = ", ".join(repr(r.name) for r in self._resources)
        return f"Limiter(timeout={self._timeout}, resources=[{names}])"


class _Hold:
    """``async with limiter.acquire([...])``. One object may be entered any
    number of times at once (e.g. kept in a module-level variable, entered
    by concurrent tasks, by an async generator that another task finalises):
    each entry holds its own slots, and each exit releases exactly the slots
    of its own entry, whichever task runs it.

    An ``async with`` statement runs ``__aenter__`` and ``__aexit__`` from
    the same frame (the coroutine's or async generator's that contains it),
    whichever task drives that frame; so entries are keyed by that frame,
    with a stack per frame for nested entries. An exit from another frame
    (an ``AsyncExitStack`` entered and exited in different functions) falls
    back to the newest entry made by the exiting task.
    """

    __slots__ = (
        "_limiter",
        "_selection",
        "_timeout",
        "_key",
        "_deadline",
        "_priority",
        "_entries",
        "_outer",
    )

    def __init__(
        self,
        limiter: Limiter,
        selection: Selection,
        timeout: float | None,
        key: str | None = None,
        deadline: float | None = None,
        priority: _core.Priority | None = None,
    ) -> None:
        self._limiter = limiter
        self._selection = selection
        self._timeout = timeout
        self._key = key
        self._deadline = deadline
        self._priority = priority  # None: CRITICAL, the engine's default
        # The frame objects are kept while their entry lasts, so that no
        # other frame can reuse the key.
        self._entries: dict[FrameType, tuple[Releasable, Holds]] = {}
        self._outer: dict[FrameType, list[tuple[Releasable, Holds]]] | None = None

    async def __aenter__(self) -> ClusteredAcquisition | None:
        """With cluster-scoped resources, returns what the entry holds:
        ``permit.token(resource)`` is the fencing token of its slot."""
        frame = sys._getframe(1)
        selection = self._selection
        # What this task holds (inlined: this is the fast path).
        task = task_on(running_loop())
        holds = _holds.get(id(task))
        if holds is None:
            holds = holds_of(task)
        elif holds:
            check(holds, selection)
        acquisition = (
            _core.Acquisition(selection.rset, self._key)
            if self._priority is None
            else _core.Acquisition(selection.rset, self._key, self._priority)
        )
        granted: Releasable = acquisition
        left = None
        if self._deadline is not None:
            left = self._deadline - self._limiter._deadline_margin
            if left <= 0:
                refuse_spent(acquisition, self._limiter._rejection)
        if not acquisition.try_acquire():
            limiter = self._limiter
            timeout = limiter._timeout if self._timeout is None else self._timeout
            started = running_loop_time()
            await wait(
                acquisition,
                timeout,
                limiter._retry_after,
                rejection=limiter._rejection,
                deadline=left,
            )
        elif selection.clusters:
            limiter = self._limiter
            timeout = limiter._timeout if self._timeout is None else self._timeout
            started = running_loop_time()
        if selection.clusters and left is not None and (timeout is None or left < timeout):
            # The cluster stage ends with the budget too ("timeout" then).
            timeout = left
        if selection.clusters:
            granted = await with_cluster(
                acquisition,
                selection.clusters,
                started,
                timeout,
                limiter._retry_after,
                rejection=limiter._rejection,
            )
        holds.append(selection)
        entries = self._entries
        outer = entries.get(frame)
        if outer is not None:  # nested in the same frame
            if self._outer is None:
                self._outer = {}
            self._outer.setdefault(frame, []).append(outer)
        entries[frame] = (granted, holds)
        return granted if selection.clusters else None  # type: ignore[return-value]

    def __enter__(self) -> NoReturn:
        # A plain ``with`` would otherwise fail with "does not support the
        # context manager protocol", which does not say what to write.
        raise TypeError(
            "limiter.acquire() holds its slots with 'async with limiter.acquire([...]):' "
            "(in an async function), not with a plain 'with'"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None  # never entered: __enter__ raises

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        frame = sys._getframe(1)
        entries = self._entries
        entry = entries.pop(frame, None)
        if entry is None:
            entry = self._unmatched_exit()
        elif self._outer:
            stack = self._outer.get(frame)
            if stack:
                entries[frame] = stack.pop()
                if not stack:
                    del self._outer[frame]
        acquisition, holds = entry
        acquisition.release(SUCCESS if exc is None else completion_of(exc))
        selection = self._selection
        if holds and holds[-1] is selection:
            holds.pop()
        else:
            leave(holds, selection)

    def _unmatched_exit(self) -> tuple[Releasable, Holds]:
        entries = self._entries
        owner = current_task()
        for frame, entry in reversed(entries.items()):
            watch = entry[1].watch
            if watch is not None and watch() is owner:
                del entries[frame]
                return entry
        if len(entries) == 1:
            return entries.popitem()[1]
        raise RuntimeError(
            "limiter.acquire(): __aexit__() without a matching __aenter__() "
            "(use 'async with', or enter and exit in the same task)"
        )


def _check_timeout(timeout: object) -> float | None:
    # None waits without a time limit, as asyncio.wait_for(timeout=None) did
    # in the original package.
    return None if timeout is None else check_seconds("timeout", timeout)


def _check_resources(name: str, resources: object) -> list[Resource]:
    if isinstance(resources, (str, bytes)) or not isinstance(resources, Sequence):
        raise TypeError(f"{name} must be a list of Resource, got {type(resources).__name__}")
    items = list(resources)
    for i, r in enumerate(items):
        if not isinstance(r, Resource):
            raise TypeError(f"{name}[{i}] must be a Resource, got {type(r).__name__} {r!r}")
    return items


def _is_async(func: Callable[..., Any]) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or (
        not inspect.isfunction(func)
        and inspect.iscoroutinefunction(getattr(func, "__call__", None))  # noqa: B004 (async __call__)
    )


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    # Evaluate string annotations (``from __future__ import annotations`` in
    # the user's module) here, against the endpoint's own globals: FastAPI
    # would otherwise resolve them against this module's.
    try:
        return inspect.signature(func, eval_str=True)
    except (NameError, TypeError):
        return inspect.signature(func)


def _request_parameter(sig: inspect.Signature) -> str | None:
    for p in sig.parameters.values():
        ann = p.annotation
        if isinstance(ann, type) and issubclass(ann, Request):
            return p.name
    return None


def _with_param(
    sig: inspect.Signature, name: str, annotation: Any, default: Any = inspect.Parameter.empty
) -> inspect.Signature:
    params = list(sig.parameters.values())
    extra = inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )
    at = next(
        (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
        len(params),
    )
    params.insert(at, extra)
    return sig.replace(parameters=params)


def _websocket_parameter(sig: inspect.Signature) -> str | None:
    for p in sig.parameters.values():
        ann = p.annotation
        if isinstance(ann, type) and issubclass(ann, WebSocket):
            return p.name
    return None


def _check_keyed(gate: Gate) -> None:
    resources = gate.selection.resources
    if not any(getattr(r, "per_key", None) for r in resources):
        names = ", ".join(repr(r.name) for r in resources)
        raise ValueError(
            f"key: none of the resources [{names}] has a per-key share, so a key would "
            "change nothing; give one of them Resource(capacity, per_key=N), or leave key out"
        )


def _check_prioritized(resources: Sequence[Resource], priority: object) -> None:
    """ValueError naming ``priority`` if one of ``resources`` cannot order
    its waiters by class (per-key shares: not built yet)."""
    for r in resources:
        if r.per_key is not None:
            what = f"per_key={r.per_key}"
            raise ValueError(
                f"priority={priority!r}: resource {r.name!r} has {what}, where priority "
                "classes are not supported (not built yet); every request of it is CRITICAL: "
                "leave priority out for routes that use it"
            )


def _fixed_priority(resources: Sequence[Resource], priority: object) -> _core.Priority | None:
    """A fixed ``priority=`` as the engine's class; ``None`` for CRITICAL
    (the engine's default, which costs nothing)."""
    p = Priority.parse(priority)
    if p is Priority.CRITICAL:
        return None
    _check_prioritized(resources, p)
    return CORE[p]


def _dependency_parameters(
    function: Callable[..., Any], what: str
) -> tuple[list[inspect.Parameter], list[str], inspect.Signature]:
    """The parameters of ``function`` as FastAPI should resolve them (all
    keyword-only; one without annotation or default gets the connection),
    and the names of its positional-only ones."""
    sig = _signature(function)
    params = []
    positional: list[str] = []
    for p in sig.parameters.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"{what}: {function!r} may not take *{p.name} or **{p.name}")
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(p.name)
        if p.annotation is inspect.Parameter.empty and p.default is inspect.Parameter.empty:
            p = p.replace(annotation=HTTPConnection)
        params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    return params, positional, sig


def _priority_dependency(priority: object, gate: Gate) -> Any:
    """``Depends(...)`` on a ``priority=`` function, resolved like ``key``
    (``_key_dependency``); ``None`` for a fixed priority (the gate's)."""
    if not callable(priority):
        return None
    function: Callable[..., Any] = priority
    from fastapi import Depends

    params, positional, sig = _dependency_parameters(function, "priority")
    # The connection, to name the route in an error: the function's own
    # parameter if it takes one (FastAPI fills one parameter per kind of
    # connection), else one of the wrapper's.
    connection_name = next(
        (
            p.name
            for p in params
            if isinstance(p.annotation, type) and issubclass(p.annotation, HTTPConnection)
        ),
        _CONNECTION_PARAM,
    )
    own = connection_name == _CONNECTION_PARAM
    if own:
        params.append(
            inspect.Parameter(
                _CONNECTION_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=HTTPConnection
            )
        )

    async def priority_of(**kwargs: Any) -> _core.Priority:
        connection = kwargs.pop(connection_name) if own else kwargs[connection_name]
        args = [kwargs.pop(name) for name in positional]
        value = function(*args, **kwargs)
        if inspect.isawaitable(value):
            value = await value
        return priority_from(value, function, where(connection))

    priority_of.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params, return_annotation=inspect.Signature.empty
    )
    return Depends(priority_of)


def _key_dependency(key: Callable[..., Any] | None, gate: Gate) -> Any:
    """``Depends(...)`` on ``key``, for the decorator and the dependency: a
    wrapper that FastAPI resolves like any dependency (so ``key`` may take
    the Request and other dependencies), calls ``key`` on the event loop
    (sync or async) and checks what it returns. Parameters of ``key``
    without annotation get the connection (Request or WebSocket)."""
    if key is None:
        return None
    if not callable(key):
        raise TypeError(f"key must be a callable returning str | None, got {key!r}")
    _check_keyed(gate)
    from fastapi import Depends

    params, positional, sig = _dependency_parameters(key, "key")

    async def key_of(**kwargs: Any) -> str | None:
        args = [kwargs.pop(name) for name in positional]
        value = key(*args, **kwargs)
        if inspect.isawaitable(value):
            value = await value
        return key_from(value, key)

    key_of.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params, return_annotation=inspect.Signature.empty
    )
    return Depends(key_of)


def _limit(
    func: Callable[..., Any],
    gate: Gate,
    key_dependency: Any,
    priority_dependency: Any,
) -> Callable[..., Any]:
    sig = _signature(func)
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        return _limit_generator(func, gate, key_dependency, priority_dependency, sig)
    socket_name = _websocket_parameter(sig)
    if socket_name is not None:
        return _limit_websocket(func, gate, key_dependency, priority_dependency, sig, socket_name)
    request_name = _request_parameter(sig)
    injected = request_name is None
    keyed = key_dependency is not None
    # The request's class, from its function, else the route's own (None:
    # CRITICAL, the engine's default).
    dynamic = priority_dependency is not None
    fixed = gate.priority
    classed = keyed or dynamic or fixed is not None
    if fixed is None:
        fixed = CORE[Priority.CRITICAL]
    is_async = _is_async(func)
    selection = gate.selection
    rset = selection.rset
    clusters = selection.clusters
    settle = gate.settle
    deadlines = gate.deadline_header is not None
    Acquisition = _core.Acquisition

    @functools.wraps(func)
    async def endpoint(*args: Any, **kwargs: Any) -> Any:
        if injected:
            request = kwargs.pop(_REQUEST_PARAM, None)
        else:
            request = kwargs.get(request_name)  # type: ignore[arg-type]
        # Gate.admit(), inlined up to the wait: this is the fast path.
        task = task_on(running_loop())
        holds = _holds.get(id(task))
        if holds is None:
            holds = holds_of(task)
        elif holds:
            check(holds, selection)
        # What limiter.asgi() holds for this request, maybe in another task
        # (behind a BaseHTTPMiddleware).
        if request is not None:
            outer = request.scope.get(SCOPE_HOLDS)
            if outer:
                check(outer, selection, REQUEST)
        if classed:
            acquisition = Acquisition(
                rset,
                kwargs.pop(_KEY_PARAM) if keyed else None,
                kwargs.pop(_PRIORITY_PARAM) if dynamic else fixed,
            )
        else:
            acquisition = Acquisition(rset)
        deadline = None
        if deadlines and request is not None:
            deadline = gate.client_deadline(acquisition, request)
        granted: Releasable = acquisition
        acquired = acquisition.try_acquire()
        if not acquired or clusters:
            granted = await settle(acquisition, acquired, request, deadline)
        holds.append(selection)
        try:
            if is_async:
                result = await func(*args, **kwargs)
            else:
                result = await run_in_threadpool(func, *args, **kwargs)
        except BaseException as exc:
            granted.release(completion_of(exc))
            leave(holds, selection)
            raise
        if isinstance(result, STREAMED):
            # Its body is produced while it is sent: the slots go with it.
            release_after_sending(result, Held(granted, holds, selection))
        else:
            granted.release()
            if holds and holds[-1] is selection:
                holds.pop()
            else:
                leave(holds, selection)
        return result

    if deadlines:
        # The request's budget is readable (remaining_budget()) until its
        # response has been sent, and not after, in its task.
        limited = endpoint

        @functools.wraps(func)
        async def endpoint(*args: Any, **kwargs: Any) -> Any:
            token = begin()
            try:
                result = await limited(*args, **kwargs)
            except BaseException:
                end(token)
                raise
            if isinstance(result, STREAMED):
                # Its body is produced while it is sent: the budget goes with it.
                end_after_sending(result, token)
            else:
                end(token)
            return result

    # FastAPI reads parameters from __signature__: the user's own, plus the
    # Request the decorator needs to notice disconnects, and the key.
    if injected:
        sig = _with_param(sig, _REQUEST_PARAM, Request)
    if keyed:
        sig = _with_param(sig, _KEY_PARAM, Any, key_dependency)
    if dynamic:
        sig = _with_param(sig, _PRIORITY_PARAM, Any, priority_dependency)
    endpoint.__signature__ = sig  # type: ignore[attr-defined]
    gates[endpoint] = gate
    return endpoint


def _limit_websocket(
    func: Callable[..., Any],
    gate: Gate,
    key_dependency: Any,
    priority_dependency: Any,
    sig: inspect.Signature,
    socket_name: str,
) -> Callable[..., Any]:
    """A WebSocket endpoint holds its slots while it runs, i.e. for the
    life of the connection. It waits before the endpoint accepts; a
    connection turned away is refused before it is accepted (see
    ``refuse``), and the endpoint does not run."""
    keyed = key_dependency is not None
    dynamic = priority_dependency is not None
    deadlines = gate.deadline_header is not None

    @functools.wraps(func)
    async def endpoint(*args: Any, **kwargs: Any) -> Any:
        websocket: WebSocket = kwargs[socket_name]
        token = begin() if deadlines else None
        try:
            try:
                granted, holds = await gate.admit(
                    websocket,
                    kwargs.pop(_KEY_PARAM) if keyed else None,
                    kwargs.pop(_PRIORITY_PARAM) if dynamic else None,
                )
            except ServerBusy as exc:
                # The raw channel: Starlette's WebSocket.send() of some
                # supported versions refuses the denial messages.
                await refuse(websocket, websocket._send, exc)  # the app's handler if any
                return None
            try:
                result = await func(*args, **kwargs)
            except BaseException as exc:
                gate.release(granted, holds, completion_of(exc))
                raise
            gate.release(granted, holds)
            return result
        finally:
            if token is not None:
                end(token)

    if keyed:
        sig = _with_param(sig, _KEY_PARAM, Any, key_dependency)
    if dynamic:
        sig = _with_param(sig, _PRIORITY_PARAM, Any, priority_dependency)
    endpoint.__signature__ = sig  # type: ignore[attr-defined]
    gates[endpoint] = gate
    return endpoint


def _limit_generator(
    func: Callable[..., Any],
    gate: Gate,
    key_dependency: Any,
    priority_dependency: Any,
    sig: inspect.Signature,
) -> Callable[..., Any]:
    """A generator endpoint (FastAPI streams what it yields) holds its
    slots until the stream ends. FastAPI calls a generator endpoint without
    awaiting anything, so the slots are taken by a hidden dependency, which
    runs before the response starts and so can still answer 503; the
    wrapper releases them when the generator is exhausted or closed, and
    the dependency's exit, after the response has been sent or the client
    has gone, in any case."""
    from fastapi import Depends

    deadlines = gate.deadline_header is not None

    async def slots(request: Request, **kwargs: Any) -> AsyncIterator[Held]:
        token = begin() if deadlines else None
        try:
            granted, holds = await gate.admit(
                request, kwargs.get(_KEY_PARAM), kwargs.get(_PRIORITY_PARAM)
            )
            held = Held(granted, holds, gate.selection)
            try:
                yield held
            finally:
                held.release()
        finally:
            if token is not None:
                end(token)

    slots_sig = inspect.Signature([
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)
    ])
    if key_dependency is not None:
        slots_sig = _with_param(slots_sig, _KEY_PARAM, Any, key_dependency)
    if priority_dependency is not None:
        slots_sig = _with_param(slots_sig, _PRIORITY_PARAM, Any, priority_dependency)
    slots.__signature__ = slots_sig  # type: ignore[attr-defined]

    endpoint: Any
    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        async def async_endpoint(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            held: Held = kwargs.pop(_SLOTS_PARAM)
            try:
                async for item in func(*args, **kwargs):
                    yield item
            finally:
                held.release()

        endpoint = async_endpoint
    else:

        @functools.wraps(func)
        def sync_endpoint(*args: Any, **kwargs: Any) -> Iterator[Any]:
            held: Held = kwargs.pop(_SLOTS_PARAM)
            try:
                yield from func(*args, **kwargs)
            finally:
                held.release()

        endpoint = sync_endpoint

    endpoint.__signature__ = _with_param(sig, _SLOTS_PARAM, Any, Depends(slots))
    gates[endpoint] = gate
    limited: Callable[..., Any] = endpoint
    return limited
