"""Catching a limiting decorator placed above the route decorator.

``@app.get(...)`` registers the function it is given. With
``@limiter.resources([...])`` above it, that is the original function, not
the limited one: every request of the route runs unlimited, and nothing
else would say so. The decorator records each function it wraps; a route
whose endpoint is one of them, while the limited wrapper is on no route of
the same app, is in that trap. ``limiter.instrument(app)`` refuses such
routes; without it, a route found where the decoration happens (the
routers and apps among the caller's variables) logs an ERROR at its first
request.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from ._logging import logger

#: Every function the route decorator has wrapped (held weakly: the wrapper
#: keeps it alive as long as it matters).
wrapped: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def record(func: Callable[..., Any]) -> None:
    try:
        wrapped.add(func)
    except TypeError:  # not weakly referenceable: cannot be told apart later
        pass


def describe(route: Any, func: Callable[..., Any]) -> str:
    methods = sorted(getattr(route, "methods", None) or ())
    where = f"{' '.join(methods)} {route.path}" if methods else route.path
    name = getattr(func, "__qualname__", repr(func))
    return (
        f"route {where!r} ({name}) runs without any limit: @limiter.resources(...) is "
        "above the route decorator, which registered the function before it was limited; "
        "put @limiter.resources(...) under the route decorator"
    )


def misordered(
    routes: Iterable[tuple[Any, Callable[..., Any] | None]],
) -> Iterator[tuple[Any, Callable[..., Any]]]:
    """The (route, function) pairs among ``routes`` (route, endpoint) whose
    endpoint was limited after the route registered it; not a function that
    the app also serves limited elsewhere (registered both ways on purpose)."""
    pairs = [(route, call) for route, call in routes if call is not None]
    limited = {getattr(call, "__wrapped__", None) for _, call in pairs}
    for route, call in pairs:
        if call in wrapped and call not in limited:
            yield route, call


def catch_at_decoration(func: Callable[..., Any], frame: FrameType | None) -> None:
    """Looks for ``func`` on the routes of the apps and routers in ``frame``
    (where the decorator is applied): found there, it was registered
    before being limited. Such a route of an app logs an ERROR at its first
    request; one of a router, now (an app that includes the router later
    serves copies of its routes)."""
    if frame is None:
        return
    namespaces = [frame.f_locals]
    if frame.f_globals is not frame.f_locals:
        namespaces.append(frame.f_globals)
    for namespace in namespaces:
        for value in list(namespace.values()):
            try:
                kind = type(value)  # not isinstance(): proxies may raise on __class__
            except Exception:  # pragma: no cover - defensive
                continue
            if issubclass(kind, Starlette):
                for route in value.router.routes:
                    if getattr(route, "endpoint", None) is func:
                        _error_on_first_request(route, func)
            elif issubclass(kind, Router):
                for route in value.routes:
                    if getattr(route, "endpoint", None) is func:
                        logger.error(
                            "%s",
                            describe(route, func),
                            extra={"route": getattr(route, "path", None)},
                        )


def _error_on_first_request(route: Any, func: Callable[..., Any]) -> None:
    inner = route.app
    if getattr(inner, "_reports_misorder", False):
        return

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        route.app = inner  # once: later requests go straight through
        # Not if the app also serves the limited function (both on purpose).
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
        if any(
            r is route for r, _ in misordered((r, getattr(r, "endpoint", None)) for r in routes)
        ):
            logger.error("%s", describe(route, func), extra={"route": getattr(route, "path", None)})
        await inner(scope, receive, send)

    app._reports_misorder = True  # type: ignore[attr-defined]
    route.app = app
