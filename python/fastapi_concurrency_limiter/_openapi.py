"""What ``limiter.instrument(app)`` adds to a FastAPI app: the rejection
response of every limited route in the OpenAPI schema, and the start-up
check of routes limited twice on one resource."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, routing

from ._asgi import LimitedApp
from ._errors import Rejection
from ._holding import Holds, check
from ._order import describe, misordered

if TYPE_CHECKING:
    from fastapi.dependencies.models import Dependant

    from ._admission import Gate

Gates = Mapping[Callable[..., Any], "Gate"]


def busy_response(rejection: Rejection) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": "Server busy: a resource this route needs had no free slot in time. "
        "Retry later.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"detail": {"example": rejection.detail}},
                    "required": ["detail"],
                },
                "example": {"detail": rejection.detail},
            }
        },
    }
    if isinstance(rejection.detail, str):
        response["content"]["application/json"]["schema"]["properties"]["detail"]["type"] = (
            "string"
        )
    if rejection.retry_after is not None:
        response["headers"] = {
            "Retry-After": {
                "description": (
                    "Seconds to wait before retrying (after an early rejection, "
                    "the predicted wait is added)."
                ),
                "schema": {"type": "integer", "example": rejection.retry_after},
            }
        }
    return response


def _route_gates(dependant: Dependant, gates: Gates) -> Iterator[Gate]:
    """The gates a request of the route passes, in the order FastAPI runs
    them: sub-dependencies first, the endpoint last."""
    for sub in dependant.dependencies:
        yield from _route_gates(sub, gates)
    call = dependant.call
    if call is not None:
        gate = gates.get(call)
        if gate is not None:
            yield gate


# Recent FastAPI keeps an included router's routes behind one entry, and
# gives each its effective dependencies through this.
_contexts: Callable[[Iterable[Any]], Iterable[Any]] = getattr(
    routing, "iter_route_contexts", lambda routes: routes
)


def _walk(routes: Iterable[Any], gates: Gates, outer: tuple[Gate, ...]) -> Iterator[
    tuple[Any, tuple[Gate, ...]]
]:
    for route in _contexts(routes):
        app = getattr(route, "app", None)
        inner = outer + ((app._gate,) if isinstance(app, LimitedApp) else ())
        dependant = getattr(route, "dependant", None)
        if dependant is not None:
            yield route, inner + tuple(_route_gates(dependant, gates))
        sub = getattr(route, "routes", None)
        if sub:
            yield from _walk(sub, gates, inner)


def document_busy_responses(app: FastAPI, gates: Gates) -> None:
    """Adds the rejection response to every limited route of ``app`` when
    its OpenAPI schema is generated (routes added later are covered too)."""
    if getattr(app.openapi, "_documents_busy_responses", False):
        return
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for route, route_gates in _walk(app.routes, gates, ()):
                if route_gates and isinstance(getattr(route, "responses", None), dict):
                    rejection = route_gates[-1].rejection
                    route.responses.setdefault(rejection.status_code, busy_response(rejection))
        return generate()

    openapi._documents_busy_responses = True  # type: ignore[attr-defined]
    app.openapi = openapi  # type: ignore[method-assign]


def check_order(app: FastAPI) -> None:
    """ValueError naming the first route of ``app`` whose endpoint was
    limited only after the route had registered it (the decorator above
    the route decorator): its requests would run unlimited."""
    routes = (
        (route, getattr(route.dependant, "call", None)) for route, _ in _walk(app.routes, {}, ())
    )
    for route, func in misordered(routes):
        raise ValueError(describe(route, func))


def check_routes(app: FastAPI, gates: Gates) -> None:
    """ValueError naming the route if a request of one of ``app``'s routes
    would ask for slots its own task already holds (a router's dependency
    and the decorator on one resource): each such request would fail with
    RuntimeError; or if its decorator is above the route decorator
    (``check_order``)."""
    check_order(app)
    for route, route_gates in _walk(app.routes, gates, ()):
        holds = Holds()
        for gate in route_gates:
            try:
                check(holds, gate.selection)
            except RuntimeError as e:
                path = getattr(route, "path", repr(route))
                raise ValueError(
                    f"route {path!r} is limited twice: its dependencies, a limited mount or "
                    f"its decorator take the same resources one after the other, so each of "
                    f"its requests would fail: {e}"
                ) from None
            holds.append(gate.selection)


def check_routes_at_startup(app: FastAPI, gates: Gates) -> None:
    """Runs ``check_routes`` when ``app`` starts (its lifespan), so that
    routes declared after ``instrument()`` are covered."""
    router = app.router
    if getattr(router.lifespan_context, "_checks_limited_routes", False):
        return
    original = router.lifespan_context

    @asynccontextmanager
    async def lifespan(started: Any) -> AsyncIterator[Any]:
        check_routes(app, gates)
        async with original(started) as state:
            yield state

    lifespan._checks_limited_routes = True  # type: ignore[attr-defined]
    router.lifespan_context = lifespan
