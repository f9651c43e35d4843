"""Limiter: the registry of resources and the route decorator."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from . import _core
from ._clustered import acquire_cluster, release_all
from ._openapi import document_busy_responses, limited_endpoints
from ._resource import Resource
from ._statistics import LimiterStatistics
from ._validation import check_int, check_seconds
from ._waiting import wait

if TYPE_CHECKING:
    from ._cluster import ClusterPermit, ClusterStage

F = TypeVar("F", bound=Callable[..., Any])

# Keyword under which the decorator asks FastAPI for the Request when the
# endpoint does not declare one itself.
_REQUEST_PARAM = "_concurrency_limiter_request"


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
        self._sets: dict[tuple[Resource, ...], _core.ResourceSet] = {}
        # The cluster stages of each set (most sets have none).
        self._clusters: dict[int, tuple[ClusterStage, ...]] = {}

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

    def _select(self, resources: Sequence[Resource]) -> _core.ResourceSet:
        try:
            return self._sets[tuple(resources)]  # validated before
        except (KeyError, TypeError):
            pass
        key = tuple(_check_resources("resources", resources))
        # The engine validates: registered, no duplicates, registration
        # order, not empty. ValueError otherwise.
        rset = self._core.select([r._core for r in key])
        self._sets[key] = rset
        self._clusters[id(rset)] = tuple(r._cluster for r in key if r._cluster is not None)
        return rset

    def _cluster_stages(self, rset: _core.ResourceSet) -> tuple[ClusterStage, ...]:
        return self._clusters.get(id(rset), ())

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
        runs it). ``timeout`` overrides the limiter's for this route. While
        a request waits, a client disconnect takes it out of the queue.

        Raises ValueError at decoration time for an empty list, a resource
        that is not registered, one listed twice, or resources out of
        registration order; TypeError for items that are not Resources.
        """
        rset = self._select(resources)
        own_timeout = None if timeout is None else check_seconds("timeout", timeout)

        def decorator(func: F) -> F:
            return _limit(func, self, rset, own_timeout)  # type: ignore[return-value]

        return decorator

    def acquire(
        self, resources: Sequence[Resource], *, timeout: float | None = None
    ) -> _Hold:
        """Holds ``resources`` for the body of an ``async with`` block, for
        code that is not a route (background jobs, scripts)::

            async with limiter.acquire([database_resource]):
                await run_query()

        Same order rules and timeout as the decorator; raises ``ServerBusy``
        when the resources cannot be had in time.
        """
        rset = self._select(resources)
        own_timeout = None if timeout is None else check_seconds("timeout", timeout)
        return _Hold(self, rset, own_timeout)

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
    """``async with limiter.acquire([...])``. One object may be entered by
    several tasks at once (e.g. kept in a module-level variable): each entry
    holds its own slots, released by the same task's exit."""

    __slots__ = ("_limiter", "_rset", "_timeout", "_clusters", "_acquisition", "_others")

    def __init__(
        self, limiter: Limiter, rset: _core.ResourceSet, timeout: float | None
    ) -> None:
        self._limiter = limiter
        self._rset = rset
        self._timeout = timeout
        self._clusters = limiter._cluster_stages(rset)
        # The usual case, one entry at a time, lives in a slot; further
        # concurrent or nested entries go to a per-task stack. (The slot's
        # entry needs no owner: any task without a stacked entry owns it.
        # asyncio.current_task() costs more than the rest of an entry.)
        self._acquisition: _core.Acquisition | _Held | None = None
        self._others: dict[object, list[_core.Acquisition | _Held]] | None = None

    async def __aenter__(self) -> None:
        local = _core.Acquisition(self._rset)
        acquisition: _core.Acquisition | _Held = local
        limiter = self._limiter
        timeout = limiter._timeout if self._timeout is None else self._timeout
        started = asyncio.get_running_loop().time() if self._clusters else 0.0
        if not local.try_acquire():
            await wait(local, timeout, limiter._retry_after)
        if self._clusters:
            try:
                permits = await acquire_cluster(
                    self._clusters, started, timeout, limiter._retry_after
                )
            except BaseException:
                local.release()
                raise
            acquisition = _Held(local, permits)
        if self._acquisition is None:
            self._acquisition = acquisition
        else:
            if self._others is None:
                self._others = {}
            self._others.setdefault(asyncio.current_task(), []).append(acquisition)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        others = self._others
        task = asyncio.current_task() if others else None
        stack = others.get(task) if others else None
        acquisition: _core.Acquisition | _Held | None
        if stack:  # this task's latest entry, if it is not the first one
            acquisition = stack.pop()
            if not stack:
                del others[task]  # type: ignore[union-attr]
        else:
            acquisition, self._acquisition = self._acquisition, None
        if acquisition is not None:
            acquisition.release()


class _Held:
    """A local acquisition with its cluster slots, released together."""

    __slots__ = ("_acquisition", "_permits")

    def __init__(self, acquisition: _core.Acquisition, permits: list[ClusterPermit]) -> None:
        self._acquisition = acquisition
        self._permits = permits

    def release(self) -> None:
        release_all(self._permits)
        self._acquisition.release()


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


def _with_request(sig: inspect.Signature) -> inspect.Signature:
    params = list(sig.parameters.values())
    extra = inspect.Parameter(_REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
    at = next(
        (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
        len(params),
    )
    params.insert(at, extra)
    return sig.replace(parameters=params)


def _limit(
    func: Callable[..., Any],
    limiter: Limiter,
    rset: _core.ResourceSet,
    own_timeout: float | None,
) -> Callable[..., Awaitable[Any]]:
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(
            f"{func.__qualname__} is a generator (a streaming endpoint): "
            "@limiter.resources() does not support it, as the slot would be released "
            "before the response is streamed. Return a StreamingResponse instead, or "
            "hold the slot inside the generator with 'async with limiter.acquire([...])'"
        )
    sig = _signature(func)
    request_name = _request_parameter(sig)
    injected = request_name is None
    is_async = _is_async(func)
    Acquisition = _core.Acquisition
    clusters = limiter._cluster_stages(rset)

    @functools.wraps(func)
    async def endpoint(*args: Any, **kwargs: Any) -> Any:
        if injected:
            request = kwargs.pop(_REQUEST_PARAM, None)
        else:
            request = kwargs.get(request_name)  # type: ignore[arg-type]
        acquisition = Acquisition(rset)
        timeout = limiter._timeout if own_timeout is None else own_timeout
        started = asyncio.get_running_loop().time() if clusters else 0.0
        if not acquisition.try_acquire():
            await wait(acquisition, timeout, limiter._retry_after, request)
        permits: list[ClusterPermit] = []
        if clusters:
            try:
                permits = await acquire_cluster(clusters, started, timeout, limiter._retry_after)
            except BaseException:
                acquisition.release()
                raise
        try:
            if is_async:
                return await func(*args, **kwargs)
            return await run_in_threadpool(func, *args, **kwargs)
        finally:
            release_all(permits)
            acquisition.release()

    # FastAPI reads parameters from __signature__: the user's own, plus the
    # Request the decorator needs to notice disconnects.
    endpoint.__signature__ = _with_request(sig) if injected else sig  # type: ignore[attr-defined]
    limited_endpoints[endpoint] = limiter._retry_after
    return endpoint
