"""Waiting for slots on an asyncio event loop.

The queue, the order of service and the grant/timeout/cancel races all live
in the C++ engine (``_core.Acquisition``). This module only connects an
acquisition to the event loop: a future that the engine resolves (in C++,
on the future's own loop), one loop timer per loop that expires due
acquisitions (through the engine's ``DeadlineQueue``), and for HTTP requests
a watcher that cancels the wait when the client disconnects.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Protocol

from starlette.requests import HTTPConnection
from starlette.types import Message, Receive

from . import _core
from ._errors import Rejection, ServerBusy, retry_after_for
from ._logging import log_rejection

_GRANTED = _core.Outcome.granted
_PENDING = _core.Outcome.pending
_PREDICTED = _core.Outcome.predicted_timeout
_DISCONNECTED = _core.Outcome.disconnected
_DEADLINE = _core.Outcome.deadline
# Outcome.name is an enum property, slow enough to show in a profile of a
# spike's rejections.
_REASON = {outcome: outcome.name for outcome in _core.Outcome}

#: Bytes of its body that a waiting request may have read into memory (per
#: request): the watcher reads the body only to see a disconnect behind it,
#: and stops reading before another chunk as large as the largest so far
#: would pass this; the rest stays unread in the connection until the
#: handler reads it. About what the ASGI server itself buffers. A server's
#: chunk cannot be split: one larger than all before it (the first chunk, if
#: it alone is larger than this) can still take the buffer past the limit,
#: by at most that one chunk.
BODY_BUFFER_LIMIT = 64 * 1024
# asyncio runs a timer up to one clock tick early.
_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution


class _LoopTimer:
    """Per event loop: one loop timer for every acquisition waiting on the
    loop (instead of a timer each).

    Holds the loop only weakly and keeps no timer handle, so that a loop
    that is gone is not kept alive by its entry in ``_timers``. A timer that
    fires with nothing due just re-arms for the next deadline.
    """

    __slots__ = ("_loop", "queue", "_armed_at", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
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


class Cancellable(Protocol):
    """What the body watcher ends on a disconnect: an engine acquisition,
    or a cluster-scope wait."""

    def cancel(self, reason: _core.Outcome = ...) -> None: ...


class _Body:
    """The part of a waiting request's body that the disconnect watcher
    has read, handed back to the handler afterwards.

    A client disconnect shows as an ``http.disconnect`` message on the
    request's receive channel, behind any body not yet read; so watching for
    it while the request waits means reading the body, which must then not
    be lost for the handler. At most ``BODY_BUFFER_LIMIT`` bytes are read:
    beyond that the watcher stops (a disconnect is then noticed only when
    the wait ends) and the rest stays in the connection.
    """

    __slots__ = ("_receive", "_chunks", "_size", "_largest", "_complete", "_disconnected")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._chunks: list[bytes] = []
        self._size = 0
        self._largest = 0  # the largest chunk read, to guess the next one's size
        self._complete = False
        self._disconnected = False

    async def watch(self, acquisition: Cancellable) -> None:
        receive = self._receive
        while True:
            try:
                message = await receive()
            except Exception:
                # The server's channel failed (its own error, not a
                # disconnect): stop watching; the handler will see it too.
                return
            # Nothing is awaited from here on: once cancelled at the await
            # above, the watcher has recorded every message it took.
            kind = message["type"]
            if kind == "http.disconnect":
                self._disconnected = True
                acquisition.cancel(_DISCONNECTED)
                return
            if kind == "http.request" and not self._complete:
                chunk = message.get("body", b"")
                if chunk:
                    self._chunks.append(chunk)
                    self._size += len(chunk)
                    self._largest = max(self._largest, len(chunk))
                self._complete = not message.get("more_body", False)
                # Stop before the limit rather than after: a chunk read is
                # held whatever its size.
                if not self._complete and self._size + self._largest > BODY_BUFFER_LIMIT:
                    return

    def hand_back(self, request: HTTPConnection) -> None:
        """Serves what was read, then the rest of the channel, to whoever
        reads ``request`` next (the handler's ``await request.json()``...)."""
        if not self._chunks and not self._complete and not self._disconnected:
            return  # read nothing
        pending: list[Message] = []
        if self._chunks or self._complete:
            pending.append({
                "type": "http.request",
                "body": b"".join(self._chunks),
                "more_body": not self._complete,
            })
        if self._disconnected:
            pending.append({"type": "http.disconnect"})
        pending.reverse()
        rest = self._receive

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await rest()

        request._receive = replay  # type: ignore[attr-defined]


class _Socket:
    """The messages a waiting WebSocket connection's watcher has read,
    handed back to the endpoint afterwards: the ``websocket.connect`` that
    opens every connection, and a ``websocket.disconnect`` (the client gave
    up before it was accepted), which ends the wait."""

    __slots__ = ("_receive", "_read")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._read: list[Message] = []

    async def watch(self, acquisition: Cancellable) -> None:
        receive = self._receive
        while True:
            try:
                message = await receive()
            except Exception:
                return
            self._read.append(message)
            if message["type"] == "websocket.disconnect":
                acquisition.cancel(_DISCONNECTED)
                return

    def hand_back(self, connection: HTTPConnection) -> None:
        if not self._read:
            return
        pending = self._read[::-1]
        rest = self._receive

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await rest()

        connection._receive = replay  # type: ignore[attr-defined]


async def wait(
    acquisition: _core.Acquisition,
    timeout: float | None,
    retry_after: int | None,
    request: HTTPConnection | None = None,
    *,
    rejection: Rejection | None = None,
    deadline: float | None = None,
) -> None:
    """The slow path, after ``acquisition.try_acquire()`` found no free slot:
    queues in the engine and waits up to ``timeout`` seconds (``None``: no
    limit). Returns once granted (the caller then owns the slots and must
    ``release()``), or raises ServerBusy. If the calling task is cancelled,
    nothing is left held or queued.

    With a ``request`` (a Starlette ``Request`` or ``WebSocket``), a client
    that goes away while it waits ends the wait (reason ``disconnected``);
    nothing of it is read before the engine has queued it: a request turned
    away at once (a full queue, ``timeout=0``) is answered without reading
    its body. What the watcher read is handed back to ``request``.
    ``rejection``: the status and body of the ServerBusy (else the
    original's, with ``retry_after``). ``deadline``: seconds (> 0) the
    client still waits (its budget less the margin); when it ends before
    ``timeout`` it ends the wait with reason ``deadline``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    future: asyncio.Future[_core.Outcome] = loop.create_future()
    # The engine's early rejection predicts against whichever ends the wait
    # first: the timeout or the client's deadline.
    ends = timeout
    if deadline is not None and (timeout is None or deadline < timeout):
        ends = deadline
    if timeout is not None and timeout <= 0:
        # "Try once": never queued, so it can neither take a slot released
        # later nor push a waiter out of a full queue; rejected now.
        outcome = acquisition.try_once()
    else:
        outcome = acquisition.start(future, loop, ends)
    if outcome is _PENDING:
        timer = None
        gives_up = None
        if deadline is not None and (timeout is None or deadline < timeout):
            # The client gives up first: its own timer, so that the engine
            # counts the reason (the loop timer's expiry is a timeout).
            gives_up = loop.call_at(started + deadline, acquisition.cancel, _DEADLINE)
        elif timeout is not None:
            timer = _timer_for(loop)
            timer.add(loop, acquisition, started + timeout)
        body: _Body | _Socket | None = None
        watcher = None
        if request is not None and not future.done():
            receive = request._receive  # type: ignore[attr-defined]
            body = _Socket(receive) if request.scope["type"] == "websocket" else _Body(receive)
            watcher = loop.create_task(body.watch(acquisition))
        try:
            outcome = await future
        except BaseException:
            # Cancelled while waiting. The engine decides the race with a
            # grant under the resource's lock: cancel() takes a queued request
            # out, release() passes on a slot granted meanwhile (unused: it
            # teaches an adaptive limit nothing).
            acquisition.cancel()
            acquisition.release(_core.Completion.ignored)
            raise
        finally:
            if timer is not None:
                timer.queue.remove(acquisition)
            if gives_up is not None:
                gives_up.cancel()
            if watcher is not None:
                watcher.cancel()
                body.hand_back(request)  # type: ignore[union-attr, arg-type]
    if outcome is not _GRANTED:
        resource = acquisition.refused_by or ""
        reason = _REASON[outcome]
        log_rejection(resource, reason, loop.time() - started)
        predicted = acquisition.predicted_wait if outcome is _PREDICTED else None
        if rejection is not None:
            raise rejection.error(resource, reason, predicted, ends)
        raise ServerBusy(resource, reason, retry_after_for(retry_after, predicted, ends))
