"""Holding a route's slots until its response has been sent, for responses
whose body is produced while it is sent.

A ``StreamingResponse`` or ``FileResponse`` returned by an endpoint does its
work (reads the file, runs the generator) after the endpoint has returned:
releasing the slots then would leave that work unlimited. Such a response
takes the slots along instead and gives them back once its last body chunk
has been sent, or when sending ends otherwise (the client went away, an
error). Background tasks attached to the response run after that, without
the slots. A response whose body is complete (``Response``,
``JSONResponse``...) releases when the endpoint returns, so that a slow
client reading it holds nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from ._clustered import Releasable
from ._deadline import end
from ._holding import Holds, Selection, leave

if TYPE_CHECKING:
    from contextvars import Token

    from . import _core

#: Responses whose body is produced while they are sent.
STREAMED = (StreamingResponse, FileResponse)
# Messages after which a response has sent everything.
_LAST = ("http.response.body", "http.response.pathsend", "http.response.zerocopysend")


class Held:
    """Slots taken by one acquisition and who took them; ``release()`` gives
    them back once, from any thread. ``deadline``: the request's client
    deadline to end once its response has been sent (``end_after_sending()``)."""

    __slots__ = ("_acquisition", "_holds", "_selection", "deadline")

    def __init__(self, acquisition: Releasable, holds: Holds, selection: Selection) -> None:
        self._acquisition: Releasable | None = acquisition
        self._holds = holds
        self._selection = selection
        self.deadline: Token[tuple[float, str] | None] | None = None

    def release(self, completion: _core.Completion | None = None) -> None:
        acquisition, self._acquisition = self._acquisition, None
        if acquisition is not None:
            if completion is None:
                acquisition.release()
            else:
                acquisition.release(completion)
            leave(self._holds, self._selection)


# One subclass per response class, made on first use. Changing the class of
# the returned object (instead of wrapping it) keeps isinstance() checks,
# attributes and FastAPI's handling of background tasks as they were.
_holding_classes: dict[type[Response], type[Response]] = {}


def release_after_sending(response: Response, held: Held) -> None:
    """Makes ``response`` release ``held`` once it has been sent. Should it
    never be sent (dropped by a middleware), the engine releases the slots
    when the response is garbage-collected."""
    cls = type(response)
    holding = _holding_classes.get(cls)
    if holding is None:
        holding = _holding_classes[cls] = _holding_class(cls)
    response.__dict__["_concurrency_limiter_held"] = held
    response.__class__ = holding


def end_after_sending(response: Response, token: Token[tuple[float, str] | None]) -> None:
    """Makes ``response`` (given to ``release_after_sending()``) end the
    request's client deadline (``_deadline.begin()``'s ``token``) with its
    slots, so that its body, produced while it is sent, still reads it."""
    held: Held | None = response.__dict__.get("_concurrency_limiter_held")
    if held is None:
        end(token)
    else:
        held.deadline = token


def _holding_class(cls: type[Response]) -> type[Response]:
    async def __call__(self: Response, scope: Scope, receive: Receive, send: Send) -> None:
        held: Held | None = self.__dict__.pop("_concurrency_limiter_held", None)
        if held is None:  # sent a second time: holds nothing any more
            await cls.__call__(self, scope, receive, send)
            return
        release = held.release

        async def send_then_release(message: Message) -> None:
            await send(message)
            if message["type"] in _LAST and not message.get("more_body", False):
                release()

        try:
            await cls.__call__(self, scope, receive, send_then_release)
        finally:
            release()
            if held.deadline is not None:
                # Here, in the context it was begun in (the body may have
                # been sent from a task of its own).
                end(held.deadline)

    namespace: dict[str, Any] = {
        "__call__": __call__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), namespace)
