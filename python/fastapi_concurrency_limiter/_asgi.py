"""Limiting any ASGI app (``limiter.asgi([...])(app)``), and answering the
requests and WebSocket connections a limiter turns away. Plain ASGI and
Starlette only: this module must not need FastAPI."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from ._adaptive import completion_of
from ._deadline import begin, end
from ._errors import ServerBusy
from ._holding import SCOPE_HOLDS, Holds, leave
from ._keys import key_from
from ._priority import priority_from
from ._streaming import Held

if TYPE_CHECKING:
    from . import _core
    from ._admission import Gate

#: ``on_reject(connection, exc)``: the response for a request or WebSocket
#: connection turned away (sync or async).
OnReject = Callable[[HTTPConnection, ServerBusy], "Response | Awaitable[Response]"]
#: ``key(connection)``: the key of a request or WebSocket connection (sync or async).
KeyOf = Callable[[HTTPConnection], "str | None | Awaitable[str | None]"]
#: ``priority(connection)``: the class of a request or WebSocket connection
#: (a Priority, its name, or None for CRITICAL; sync or async).
PriorityOf = Callable[[HTTPConnection], Any]

# WebSocket close code 1013, "try again later" (RFC 6455 registry).
TRY_AGAIN_LATER = 1013
_DENIAL = "websocket.http.response"
# Messages after which a response has sent everything.
_LAST = ("http.response.body", "http.response.pathsend", "http.response.zerocopysend")


def busy_response(exc: ServerBusy) -> Response:
    """The response FastAPI's own handler sends for ``exc``: status, JSON
    ``{"detail": ...}`` and its headers (``Retry-After``)."""
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def app_handler(scope: Scope, status_code: int, app: object = None) -> OnReject | None:
    """The exception handler the app registered for ``ServerBusy``, as
    Starlette's ``ExceptionMiddleware`` would pick it for a ``ServerBusy``
    raised in an endpoint: one for its status code, else one for
    ``ServerBusy`` or a base class (``HTTPException``: FastAPI's default
    handler answers as ``busy_response``). Looked up on ``app`` (the app a
    ``limiter.asgi()`` wraps) if it is a Starlette app, then on the app the
    request came through (``scope["app"]``, set by Starlette). ``None``
    when neither has one. Handlers for 500 and ``Exception`` belong to the
    server-error middleware, which a rejection does not reach: skipped."""
    for candidate in (app, scope.get("app")):
        handlers = getattr(candidate, "exception_handlers", None)
        if not isinstance(handlers, dict) or not handlers:
            continue
        handler = None if status_code == 500 else handlers.get(status_code)
        if handler is not None:
            return handler  # type: ignore[no-any-return]
        for cls in ServerBusy.__mro__:
            if cls is Exception:
                break
            handler = handlers.get(cls)
            if handler is not None:
                return handler  # type: ignore[no-any-return]
    return None


async def refuse(
    connection: HTTPConnection,
    send: Send,
    exc: ServerBusy,
    on_reject: OnReject | None = None,
    app: object = None,
) -> None:
    """Answers a request or a not yet accepted WebSocket connection turned
    away with ``exc``: with ``on_reject``'s response, else with that of the
    app's exception handler for ``ServerBusy`` (``app_handler``), else with
    ``busy_response``. A WebSocket gets the response as the handshake's
    HTTP response where the server offers the denial extension
    (``websocket.http.response``), else the handshake completes and the
    connection is closed at once with code 1013 (ASGI has no other way to
    refuse a handshake than 403). An exception handler that returns
    ``None`` for a WebSocket has answered it itself (as Starlette's
    WebSocket handlers do)."""
    scope = connection.scope
    handler = on_reject if on_reject is not None else app_handler(scope, exc.status_code, app)
    response: Response | Awaitable[Response] | None
    if handler is None:
        response = busy_response(exc)
    else:
        response = handler(connection, exc)
        if inspect.isawaitable(response):
            response = await response
        if response is None:
            if scope["type"] == "websocket" and on_reject is None:
                return
            response = busy_response(exc)
    if scope["type"] == "http":
        # The request's own channel: a streamed rejection body watches it
        # for a client that leaves.
        await response(scope, connection._receive, send)  # type: ignore[attr-defined]
        return
    if _DENIAL in (scope.get("extensions") or {}):

        async def deny(message: Message) -> None:
            # Recent Starlette responses name the messages themselves in a
            # WebSocket scope; older ones send the HTTP ones.
            if not message["type"].startswith("websocket."):
                message = {**message, "type": "websocket." + message["type"]}
            await send(message)

        await response(scope, _nothing_to_read, deny)
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": TRY_AGAIN_LATER, "reason": "Server busy"})


async def _nothing_to_read() -> Message:
    # A denial response has no request body to read.
    return {"type": "http.disconnect"}


async def key_of(key: KeyOf, connection: HTTPConnection) -> str | None:
    value = key(connection)
    if inspect.isawaitable(value):
        value = await value
    return key_from(value, key)


async def priority_of(priority: PriorityOf, connection: HTTPConnection) -> _core.Priority:
    value = priority(connection)
    if inspect.isawaitable(value):
        value = await value
    return priority_from(value, priority, where(connection))


def where(connection: HTTPConnection) -> str:
    """The request, as an error names it: its route's path (as declared),
    else its own path."""
    scope = connection.scope
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "?")
    kind = scope.get("method", "WebSocket") if scope["type"] == "http" else "WebSocket"
    return f"{kind} {path}"


class LimitedApp:
    """An ASGI app whose HTTP requests and WebSocket connections each hold a
    slot of the limiter's resources: an HTTP request until its response has
    been sent completely or the app has returned or raised (a client that
    leaves once the app runs does not end it: see docs/entry-points.md), a
    WebSocket connection for its whole life. Other scopes (``lifespan``)
    pass through untouched."""

    def __init__(
        self,
        app: ASGIApp,
        gate: Gate,
        key: KeyOf | None = None,
        on_reject: OnReject | None = None,
        priority: PriorityOf | None = None,
    ) -> None:
        self.app = app
        self._gate = gate
        self._key = key
        self._on_reject = on_reject
        self._priority = priority

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        connection: HTTPConnection
        if kind == "http":
            connection = Request(scope, receive, send)
        else:
            connection = WebSocket(scope, receive, send)
        gate = self._gate
        # The request's client deadline (with a deadline_header) is
        # readable until it ends here, not after, in its task.
        token = begin() if gate.deadline_header is not None else None
        try:
            key = None if self._key is None else await key_of(self._key, connection)
            priority = (
                None if self._priority is None else await priority_of(self._priority, connection)
            )
            try:
                granted, holds = await gate.admit(connection, key, priority)
            except ServerBusy as exc:
                await refuse(connection, send, exc, self._on_reject, self.app)
                return
            selection = gate.selection
            held = Held(granted, holds, selection)
            # Also recorded in the scope, for entry points of this request that
            # run in another task (behind a BaseHTTPMiddleware): they must not
            # wait for these slots.
            in_scope = scope.get(SCOPE_HOLDS)
            if in_scope is None:
                in_scope = scope[SCOPE_HOLDS] = Holds()
            in_scope.append(selection)

            def release(completion: _core.Completion | None = None) -> None:
                held.release(completion)
                leave(in_scope, selection)

            # The watcher may have read messages while the request waited: they
            # are served again from the connection's receive.
            receive = connection._receive
            if kind == "http":

                async def send_then_release(message: Message) -> None:
                    await send(message)
                    if message["type"] in _LAST and not message.get("more_body", False):
                        release()

                sender: Send = send_then_release
            else:
                sender = send
            try:
                await self.app(scope, receive, sender)
            except BaseException as exc:
                release(completion_of(exc))
                raise
            finally:
                release()
        finally:
            if token is not None:
                end(token)

    def __getattr__(self, name: str) -> Any:
        # Starlette reads attributes of a mounted app (``routes``, for
        # url_path_for): show the wrapped app's.
        if name == "app":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.app, name)
