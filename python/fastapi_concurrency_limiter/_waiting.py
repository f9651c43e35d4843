"""Waiting for slots on an asyncio event loop.

The queue, the order of service and the grant/timeout/cancel races all live
in the C++ engine (``_core.Acquisition``). This module only connects an
acquisition to the event loop: a future that the engine's completion
callback resolves, a loop timer that expires it, and (for HTTP requests) a
watcher that cancels it when the client disconnects.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from starlette.requests import Request

from . import _core
from ._errors import ServerBusy

_GRANTED = _core.Outcome.granted
_PENDING = _core.Outcome.pending
_DISCONNECTED = _core.Outcome.disconnected


def _set_unless_done(future: asyncio.Future[_core.Outcome], outcome: _core.Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _resolver(
    future: asyncio.Future[_core.Outcome], loop: asyncio.AbstractEventLoop
) -> Callable[[_core.Outcome], None]:
    """The completion callback: resolves ``future`` on its loop, from
    whichever thread the engine decided the outcome on."""
    loop_thread = threading.get_ident()

    def resolve(outcome: _core.Outcome) -> None:
        if threading.get_ident() == loop_thread:
            _set_unless_done(future, outcome)
        else:  # a resource shared with another thread's loop released it
            loop.call_soon_threadsafe(_set_unless_done, future, outcome)

    return resolve


async def _watch_disconnect(request: Request, acquisition: _core.Acquisition) -> None:
    # The body has been read (see _drain_body), so the next message the
    # server sends is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            acquisition.cancel(_DISCONNECTED)
            return


async def _drain_body(request: Request) -> None:
    """Reads the request body into the Request's cache, so that watching the
    receive channel loses nothing: the handler's ``await request.body()`` /
    ``.json()`` / ``.stream()`` are served from that cache."""
    try:
        await request.body()
    except RuntimeError:
        # FastAPI already consumed the stream (e.g. form data) for the
        # endpoint's parameters: nothing is left to lose.
        pass


async def acquire(
    resource_set: _core.ResourceSet,
    timeout: float,
    retry_after: int | None,
    request: Request | None = None,
) -> _core.Acquisition:
    """Takes a slot of every resource in ``resource_set``, in order, within
    ``timeout`` seconds. Returns the granted acquisition (call ``release()``
    on it), or raises ServerBusy. If the calling task is cancelled, nothing
    is left held or queued."""
    acquisition = _core.Acquisition(resource_set)
    if acquisition.try_acquire():
        return acquisition
    if request is not None:
        await _drain_body(request)
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_core.Outcome] = loop.create_future()
    outcome = acquisition.start(_resolver(future, loop))
    if outcome is _PENDING:
        outcome = await _wait(acquisition, future, loop, timeout, request)
    if outcome is _GRANTED:
        return acquisition
    raise ServerBusy(acquisition.refused_by or "", outcome.name, retry_after)


async def _wait(
    acquisition: _core.Acquisition,
    future: asyncio.Future[_core.Outcome],
    loop: asyncio.AbstractEventLoop,
    timeout: float,
    request: Request | None,
) -> _core.Outcome:
    timer = loop.call_later(timeout, acquisition.expire)
    watcher = None if request is None else loop.create_task(_watch_disconnect(request, acquisition))
    try:
        return await future
    except BaseException:
        # Cancelled (or interrupted) while waiting. The engine decides the
        # race with a grant under the resource's lock: cancel() removes a
        # queued request, release() passes on a slot granted meanwhile.
        acquisition.cancel()
        acquisition.release()
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
