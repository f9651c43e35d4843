"""Limiter: the registry of resources and the route decorator."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any, TypeVar

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from . import _core
from ._adaptive import SUCCESS, completion_of
from ._clustered import Releasable, running_loop_time, with_cluster
from ._holding import Holds, Selection, check, current_task, holds_of, leave, running_loop, task_on
from ._holding import _held as _holds
from ._openapi import document_busy_responses, limited_endpoints
from ._resource import Resource
from ._statistics import LimiterStatistics
from ._streaming import STREAMED, Held, release_after_sending
from ._validation import check_int, check_seconds
from ._waiting import wait

F = TypeVar("F", bound=Callable[..., Any])

# Keyword under which the decorator asks FastAPI for the Request when the
# endpoint does not declare one itself.
_REQUEST_PARAM = "_concurrency_limiter_request"
# Keyword under which a generator endpoint gets its slots from the hidden
# dependency that waits for them.
_SLOTS_PARAM = "_concurrency_limiter_slots"


class Limiter:
    """Registers resources, fixes the order in which requests take them, and
    limits routes.

    Args:
        timeout: seconds a request may wait to acquire *all* the resources
            of its route together; then it gets HTTP 503. ``None``: no limit.
        resources: every resource routes may use, in the order in which they
            are always acquired (so no two requests can deadlock).
        retry_after: seconds to put in the ``Retry-After`` header of the
            503, or ``None`` to send none.
    """

    def __init__(
        self,
        timeout: float | None,
        resources: Sequence[Resource],
        *,
        retry_after: int | None = 1,
    ) -> None:
        self._timeout = _check_timeout(timeout)
        self._resources = _check_resources("resources", resources)
        check_int("retry_after", retry_after, minimum=0, allow_none=True)
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
    def retry_after(self) -> int | None:
        return self._retry_after

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
        self, resources: Sequence[Resource], *, timeout: float | None = None
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
        runs it), and for generator endpoints. An endpoint whose response
        body is produced while it is sent (a generator endpoint, a returned
        ``StreamingResponse`` or ``FileResponse``) holds the slots until the
        body has been sent or the client has gone. ``timeout`` overrides the
        limiter's for this route. While a request waits, a client
        disconnect takes it out of the queue.

        Raises ValueError at decoration time for an empty list, a resource
        that is not registered, one listed twice, resources out of
        registration order or in an order another Limiter contradicts;
        TypeError for items that are not Resources. A request whose task
        already holds a slot that makes waiting a possible deadlock gets
        RuntimeError (see the README's "Deadlocks").
        """
        selection = self._select(resources)
        own_timeout = None if timeout is None else check_seconds("timeout", timeout)

        def decorator(func: F) -> F:
            return _limit(func, self, selection, own_timeout)  # type: ignore[return-value]

        return decorator

    def acquire(
        self,
        resources: Sequence[Resource],
        *,
        timeout: float | None = None,
        key: str | None = None,
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
        counted in the total. Resources without ``per_key`` ignore it::

            async with limiter.acquire([db], key=request.headers.get("x-api-key")):
                ...
        """
        selection = self._select(resources)
        own_timeout = None if timeout is None else check_seconds("timeout", timeout)
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a str or None, got {type(key).__name__} {key!r}")
        return _Hold(self, selection, own_timeout, key)

    def instrument(self, app: FastAPI) -> None:
        """Documents the 503 response (body schema and ``Retry-After``) of
        every route this library limits in ``app``'s OpenAPI schema, so that
        generated clients know it can happen. Call once, e.g. right after
        creating the app; routes declared later are covered too."""
        document_busy_responses(app)

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

    __slots__ = ("_limiter", "_selection", "_timeout", "_key", "_entries", "_outer")

    def __init__(
        self,
        limiter: Limiter,
        selection: Selection,
        timeout: float | None,
        key: str | None = None,
    ) -> None:
        self._limiter = limiter
        self._selection = selection
        self._timeout = timeout
        self._key = key
        # The frame objects are kept while their entry lasts, so that no
        # other frame can reuse the key.
        self._entries: dict[FrameType, tuple[Releasable, Holds]] = {}
        self._outer: dict[FrameType, list[tuple[Releasable, Holds]]] | None = None

    async def __aenter__(self) -> None:
        frame = sys._getframe(1)
        selection = self._selection
        # What this task holds (inlined: this is the fast path).
        task = task_on(running_loop())
        holds = _holds.get(id(task))
        if holds is None:
            holds = holds_of(task)
        elif holds:
            check(holds, selection)
        acquisition = _core.Acquisition(selection.rset, self._key)
        granted: Releasable = acquisition
        if not acquisition.try_acquire():
            limiter = self._limiter
            timeout = limiter._timeout if self._timeout is None else self._timeout
            started = running_loop_time()
            await wait(acquisition, timeout, limiter._retry_after)
        elif selection.clusters:
            limiter = self._limiter
            timeout = limiter._timeout if self._timeout is None else self._timeout
            started = running_loop_time()
        if selection.clusters:
            granted = await with_cluster(
                acquisition, selection.clusters, started, timeout, limiter._retry_after
            )
        holds.append(selection)
        entries = self._entries
        outer = entries.get(frame)
        if outer is not None:  # nested in the same frame
            if self._outer is None:
                self._outer = {}
            self._outer.setdefault(frame, []).append(outer)
        entries[frame] = (granted, holds)

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


def _limit(
    func: Callable[..., Any],
    limiter: Limiter,
    selection: Selection,
    own_timeout: float | None,
) -> Callable[..., Any]:
    sig = _signature(func)
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        return _limit_generator(func, limiter, selection, own_timeout, sig)
    request_name = _request_parameter(sig)
    injected = request_name is None
    is_async = _is_async(func)
    rset = selection.rset
    clusters = selection.clusters
    Acquisition = _core.Acquisition

    @functools.wraps(func)
    async def endpoint(*args: Any, **kwargs: Any) -> Any:
        if injected:
            request = kwargs.pop(_REQUEST_PARAM, None)
        else:
            request = kwargs.get(request_name)  # type: ignore[arg-type]
        # What this task holds (inlined: this is the fast path).
        task = task_on(running_loop())
        holds = _holds.get(id(task))
        if holds is None:
            holds = holds_of(task)
        elif holds:
            check(holds, selection)
        acquisition = Acquisition(rset)
        granted: Releasable = acquisition
        if not acquisition.try_acquire():
            timeout = limiter._timeout if own_timeout is None else own_timeout
            started = running_loop_time()
            await wait(acquisition, timeout, limiter._retry_after, request)
            if clusters:
                granted = await with_cluster(
                    acquisition, clusters, started, timeout, limiter._retry_after, request
                )
        elif clusters:
            timeout = limiter._timeout if own_timeout is None else own_timeout
            granted = await with_cluster(
                acquisition, clusters, running_loop_time(), timeout, limiter._retry_after, request
            )
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

    # FastAPI reads parameters from __signature__: the user's own, plus the
    # Request the decorator needs to notice disconnects.
    endpoint.__signature__ = (  # type: ignore[attr-defined]
        _with_param(sig, _REQUEST_PARAM, Request) if injected else sig
    )
    limited_endpoints[endpoint] = limiter._retry_after
    return endpoint


def _limit_generator(
    func: Callable[..., Any],
    limiter: Limiter,
    selection: Selection,
    own_timeout: float | None,
    sig: inspect.Signature,
) -> Callable[..., Any]:
    """A generator endpoint (FastAPI streams what it yields) holds its
    slots until the stream ends. FastAPI calls a generator endpoint without
    awaiting anything, so the slots are taken by a hidden dependency, which
    runs before the response starts and so can still answer 503; the
    wrapper releases them when the generator is exhausted or closed, and
    the dependency's exit, after the response has been sent or the client
    has gone, in any case."""

    async def slots(request: Request) -> AsyncIterator[Held]:
        holds = holds_of(current_task())
        if holds:
            check(holds, selection)
        acquisition = _core.Acquisition(selection.rset)
        granted: Releasable = acquisition
        timeout = limiter._timeout if own_timeout is None else own_timeout
        started = running_loop_time()
        if not acquisition.try_acquire():
            await wait(acquisition, timeout, limiter._retry_after, request)
        if selection.clusters:
            granted = await with_cluster(
                acquisition, selection.clusters, started, timeout, limiter._retry_after, request
            )
        holds.append(selection)
        held = Held(granted, holds, selection)
        try:
            yield held
        finally:
            held.release()

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
    limited_endpoints[endpoint] = limiter._retry_after
    limited: Callable[..., Any] = endpoint
    return limited
