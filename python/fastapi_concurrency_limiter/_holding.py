"""Which slots each asyncio task holds, so that an acquisition that could
deadlock fails at once instead of waiting forever.

A task that holds a slot of ``db`` and asks for ``db`` again waits for
itself; a task that holds ``file`` and asks for ``db``, while another holds
``db`` and waits for ``file``, waits for the other. Both are refused with a
``RuntimeError`` before anything is queued. The order that decides the
second case is every ``Limiter``'s registration order: a resource may be
asked for while another is held only if no limiter registers it before the
held one.

Only the route decorator, ``limiter.dependency()``, ``limiter.asgi()``,
``limiter.acquire()`` and ``Resource.acquire()`` record holds, keyed by the
task that took them (a task spawned by a holder does not inherit its holds:
it may wait for the holder without deadlock). ``limiter.asgi()`` also
records its holds in the request's ASGI scope (``SCOPE_HOLDS``): an entry
point of the same request that runs in another task (the endpoint behind a
``BaseHTTPMiddleware`` runs in a task of its own) checks those too.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import _core
    from ._resource import Resource


class Selection:
    """One validated list of resources: the engine's set and, for the
    deadlock check, the Python resources in acquisition order; and the
    cluster stages of those with a cluster scope (most have none)."""

    __slots__ = ("rset", "resources", "clusters")

    def __init__(self, rset: _core.ResourceSet, resources: tuple[Resource, ...]) -> None:
        self.rset = rset
        self.resources = resources
        self.clusters = tuple(r._cluster for r in resources if r._cluster is not None)


Owner = object  # an asyncio.Task, or None outside of any task

#: ASGI scope key: the ``Holds`` of the ``limiter.asgi()`` wrappers the
#: request went through (a middleware that copies the scope copies the
#: reference, so a release is seen there too).
SCOPE_HOLDS = "fastapi_concurrency_limiter.holds"

running_loop: Callable[[], asyncio.AbstractEventLoop | None]
task_on: Callable[[asyncio.AbstractEventLoop | None], Owner]
"""``task_on(running_loop())``: the running task, through two C calls (on
the fast path, where ``asyncio.current_task()`` would add a Python frame
before 3.12)."""

if sys.version_info >= (3, 12):
    running_loop = asyncio._get_running_loop
    task_on = asyncio.current_task
else:
    import os
    import threading
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

    task_on = _current_tasks.get
    _get_ident = threading.get_ident
    _base_run_forever = asyncio.BaseEventLoop.run_forever
    def _no_loop() -> asyncio.AbstractEventLoop | None:
        return None

    # The loop running_loop() found last, if it is one whose _thread_id
    # tells where it runs: weakly, so that a loop that has finished can go.
    _last_loop: Callable[[], asyncio.AbstractEventLoop | None] = _no_loop

    def running_loop() -> asyncio.AbstractEventLoop | None:
        """``asyncio._get_running_loop()`` without its cost before 3.12: a
        getpid() system call on every call (so that a forked child does not
        see its parent's loop), about as much as the rest of the fast path's
        bookkeeping. The loop found last is returned again while its
        ``_thread_id`` is the calling thread's: asyncio's own
        ``run_forever()`` sets it for exactly as long as the loop runs, and
        refuses to run a loop inside another. Loops that run otherwise (a
        replaced ``run_forever``, as ``nest_asyncio`` installs; uvloop) are
        not remembered, and a forked child forgets the loop. The loop is
        remembered weakly: a finished one is not kept alive."""
        loop = _last_loop()
        if loop is not None and loop._thread_id == _get_ident():  # type: ignore[attr-defined]
            return loop
        return _find_running_loop()

    def _find_running_loop() -> asyncio.AbstractEventLoop | None:
        global _last_loop
        loop = asyncio._get_running_loop()
        if (
            loop is not None
            and getattr(type(loop), "run_forever", None) is _base_run_forever
            and getattr(loop, "_thread_id", None) == _get_ident()
        ):
            _last_loop = weakref.ref(loop)
        return loop

    def _forget_loop() -> None:
        global _last_loop
        _last_loop = _no_loop

    os.register_at_fork(after_in_child=_forget_loop)


def current_task() -> Owner:
    """The running task; only valid on a running event loop."""
    return task_on(running_loop())


def current_task_or_none() -> Owner:
    """The running task, or None outside of an event loop."""
    return None if asyncio._get_running_loop() is None else current_task()


class Holds(list["Selection"]):
    """What one task holds, oldest first. Kept, even empty, as long as its
    task lives (so that a task's later acquisitions find it without making
    a new one), and dropped when the task is garbage-collected (so that a
    task that ended without releasing, e.g. one that entered a generator
    never finalised, is not kept alive, nor its id taken for a later
    task's)."""

    __slots__ = ("watch",)
    watch: weakref.ref[object] | None


# Per task (by id), what it holds.
_held: dict[int, Holds] = {}


def _forget(key: int) -> Callable[[object], None]:
    def forget(_: object) -> None:
        _held.pop(key, None)

    return forget


def holds_of(owner: Owner) -> Holds:
    """``owner``'s record, made on first use."""
    key = id(owner)
    holds = _held.get(key)
    if holds is None:
        holds = _held[key] = Holds()
        holds.watch = None if owner is None else weakref.ref(owner, _forget(key))
    return holds


def check(holds: Holds, selection: Selection, holder: str = "this task") -> None:
    """RuntimeError if a task holding ``holds`` may not wait for
    ``selection`` (that could deadlock). ``holder``: who holds them, for
    the message."""
    for holding in holds:
        for have in holding.resources:
            for want in selection.resources:
                if want is have:
                    raise RuntimeError(
                        f"{holder} already holds a slot of resource {have.name!r} "
                        f"and asks for resource {want.name!r} again: it would wait "
                        "for itself (a deadlock once every slot is taken). Hold it "
                        "once, in the outermost place that needs it."
                    )
                if want in have._before:
                    raise RuntimeError(
                        f"{holder} holds a slot of resource {have.name!r} and asks "
                        f"for resource {want.name!r}, which a Limiter registers before "
                        f"{have.name!r}: another request holding {want.name!r} and "
                        f"waiting for {have.name!r} would deadlock with it. Acquire "
                        "both together in registration order, e.g. "
                        f"limiter.resources([{want.name!r}, {have.name!r}]) "
                        "(as Resource objects)."
                    )


REQUEST = (
    "this request (through limiter.asgi(), in another task: e.g. behind a "
    "BaseHTTPMiddleware)"
)


def check_scope(scope: dict[str, object], selection: Selection) -> None:
    """``check()`` against what ``limiter.asgi()`` wrappers hold for the
    request of ``scope``."""
    outer = scope.get(SCOPE_HOLDS)
    if outer:
        check(outer, selection, REQUEST)  # type: ignore[arg-type]


def leave(holds: Holds, selection: Selection) -> None:
    """Records that ``selection`` is released; no effect if it was not
    held (a second release)."""
    if holds and holds[-1] is selection:
        holds.pop()
    else:
        for i, s in enumerate(holds):
            if s is selection:
                del holds[i]
                break
