"""Waiting for slots on an asyncio event loop.

The queue, the order of service and the grant/timeout/cancel races all live
in the C++ engine (``_core.Acquisition``). This module only connects an
acquisition to the event loop: a future that the engine's completion
callback resolves, one loop timer per loop that expires due acquisitions
(through the engine's ``DeadlineQueue``), and for HTTP requests a watcher
that cancels the wait when the client disconnects.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from functools import partial

from starlette.requests import ClientDisconnect, Request

from . import _core
from ._errors import ServerBusy
from ._logging import log_rejection

_GRANTED = _core.Outcome.granted
_PENDING = _core.Outcome.pending
_DISCONNECTED = _core.Outcome.disconnected
# asyncio runs a timer up to one clock tick early.
_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution


class _LoopTimer:
    """Per event loop: one loop timer for every acquisition waiting on the
    loop (instead of a timer each), and the completion callback that
    resolves their futures.

    Holds the loop only weakly and keeps no timer handle, so that a loop
    that is gone is not kept alive by its entry in ``_timers``. A timer that
    fires with nothing due just re-arms for the next deadline.
    """

    __slots__ = ("_loop", "_thread", "queue", "_armed_at", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._thread = threading.get_ident()  # created on the loop's thread
        self.queue = _core.DeadlineQueue()
        self._armed_at: float | None = None  # earliest timer not yet fired

    def add(
        self, loop: asyncio.AbstractEventLoop, acquisition: _core.Acquisition, deadline: float
    ) -> None:
        self.queue.add(acquisition, deadline)
        if self._armed_at is None or deadline < self._armed_at:
            self._armed_at = deadline
            loop.call_at(deadline, self._fire, deadline)

    def _fire(self, when: float) -> None:
        loop = self._loop()
        if when == self._armed_at:
            self._armed_at = None
        if loop is None:
            return
        try:
            self.queue.expire_due(loop.time() + _CLOCK_RESOLUTION)
        finally:
            # Re-arm even if expiring raised, or later waiters never expire.
            following = self.queue.next_deadline
            if following is not None and (self._armed_at is None or following < self._armed_at):
                self._armed_at = following
                loop.call_at(following, self._fire, following)

    def resolve(self, future: asyncio.Future[_core.Outcome], outcome: _core.Outcome) -> None:
        """The engine's completion callback, called on whichever thread
        decided the outcome."""
        if threading.get_ident() == self._thread:
            if not future.done():  # a cancelled waiter's future is done
                future.set_result(outcome)
        else:  # a resource shared with another thread's loop released it
            future.get_loop().call_soon_threadsafe(_set_unless_done, future, outcome)


_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopTimer] = (
    weakref.WeakKeyDictionary()
)
# The last loop's timer: almost every call comes from the same loop, and a
# WeakKeyDictionary lookup costs a weakref each time.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], _LoopTimer] | None = None


def _timer_for(loop: asyncio.AbstractEventLoop) -> _LoopTimer:
    global _last
    if _last is not None and _last[0]() is loop:
        return _last[1]
    timer = _timers.get(loop)
    if timer is None:
        timer = _timers[loop] = _LoopTimer(loop)
    _last = (weakref.ref(loop), timer)
    return timer


def _set_unless_done(future: asyncio.Future[_core.Outcome], outcome: _core.Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


async def _watch_disconnect(request: Request, acquisition: _core.Acquisition) -> None:
    # The body has been read (see _read_body), so the next message the
    # server sends is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            acquisition.cancel(_DISCONNECTED)
            return


async def _read_body(request: Request) -> bool:
    """Reads the request body into the Request's cache, so that watching the
    receive channel loses nothing: the handler's ``await request.body()`` /
    ``.json()`` / ``.stream()`` are served from that cache. Returns False if
    the client disconnected meanwhile."""
    try:
        await request.body()
    except ClientDisconnect:
        return False
    except RuntimeError:
        # FastAPI already consumed the stream (e.g. form data) for the
        # endpoint's parameters: nothing is left to lose.
        pass
    return True


async def wait(
    acquisition: _core.Acquisition,
    timeout: float | None,
    retry_after: int | None,
    request: Request | None = None,
) -> None:
    """The slow path, after ``acquisition.try_acquire()`` found no free slot:
    queues in the engine and waits up to ``timeout`` seconds (``None``: no
    limit). Returns once granted (the caller then owns the slots and must
    ``release()``), or raises ServerBusy. If the calling task is cancelled,
    nothing is left held or queued."""
    connected = True if request is None else await _read_body(request)
    loop = asyncio.get_running_loop()
    started = loop.time()
    timer = _timer_for(loop)
    future: asyncio.Future[_core.Outcome] = loop.create_future()
    outcome = acquisition.start(partial(timer.resolve, future))
    if outcome is _PENDING:
        if not connected:
            acquisition.cancel(_DISCONNECTED)  # counted; resolves the future
        elif timeout is not None:
            if timeout > 0:
                timer.add(loop, acquisition, started + timeout)
            else:  # "try once": rejected now, not after a turn of the loop
                acquisition.expire()
        watcher = None
        if request is not None and connected:
            watcher = loop.create_task(_watch_disconnect(request, acquisition))
        try:
            outcome = await future
        except BaseException:
            # Cancelled while waiting. The engine decides the race with a
            # grant under the resource's lock: cancel() takes a queued request
            # out, release() passes on a slot granted meanwhile.
            acquisition.cancel()
            acquisition.release()
            raise
        finally:
            timer.queue.remove(acquisition)
            if watcher is not None:
                watcher.cancel()
    if outcome is not _GRANTED:
        resource = acquisition.refused_by or ""
        log_rejection(resource, outcome.name, loop.time() - started)
        raise ServerBusy(resource, outcome.name, retry_after)
