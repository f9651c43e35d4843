"""The deadlock check finds the running task through the running event loop,
which the fast path remembers between requests (before Python 3.12, where
asyncio's own lookup costs a system call). A remembered loop must never be
taken for another: one of another thread, one that has stopped, or the
parent's in a forked child."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import warnings

import pytest

from fastapi_concurrency_limiter import Limiter, Resource
from fastapi_concurrency_limiter._holding import current_task, running_loop


def test_a_task_of_another_threads_loop_is_not_taken_for_the_holder() -> None:
    """Thread A's task holds db; thread B's task, on its own loop and
    holding nothing, takes db too (it is not refused as if it were A's task
    asking for db again), and each thread sees its own loop and task."""
    db = Resource(2, name="db")
    limiter = Limiter(timeout=5, resources=[db])
    a_holds, b_done = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    async def a() -> None:
        async with limiter.acquire([db]):
            seen["a"] = (running_loop(), current_task())
            a_holds.set()
            while not b_done.is_set():  # keeps this loop running meanwhile
                await asyncio.sleep(0.005)

    async def b() -> None:
        async with limiter.acquire([db]):
            seen["b"] = (running_loop(), current_task())
            seen["b in_use"] = db.in_use

    thread = threading.Thread(target=asyncio.run, args=(a(),))
    thread.start()
    try:
        assert a_holds.wait(10)
        asyncio.run(b())
    finally:
        b_done.set()
        thread.join(10)
    assert seen["b in_use"] == 2
    (a_loop, a_task), (b_loop, b_task) = seen["a"], seen["b"]  # type: ignore[misc]
    assert a_loop is not b_loop
    assert b_task is not None and b_task is not a_task
    assert db.in_use == 0


def test_a_later_loop_of_the_same_thread_is_found() -> None:
    """One asyncio.run() after another in one thread: the second's task is
    its own, not the first (stopped) loop's."""
    db = Resource(1, name="db")
    limiter = Limiter(timeout=5, resources=[db])
    loops = []

    async def hold_then_ask_again() -> None:
        loops.append(running_loop())
        assert running_loop() is asyncio.get_running_loop()
        async with limiter.acquire([db]):
            with pytest.raises(RuntimeError, match="already holds"):
                async with limiter.acquire([db]):
                    pass

    asyncio.run(hold_then_ask_again())
    asyncio.run(hold_then_ask_again())
    assert loops[0] is not loops[1]
    assert db.in_use == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_does_not_see_its_parents_loop() -> None:
    """As asyncio itself: in a child forked while a loop runs, no loop runs."""
    read_end, write_end = os.pipe()

    async def fork_here() -> int:
        running_loop()  # the parent's loop, remembered
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads
            pid = os.fork()
        if pid == 0:
            try:
                none = running_loop() is None and asyncio._get_running_loop() is None
                os.write(write_end, b"1" if none else b"0")
            finally:
                os._exit(0)
        return pid

    pid = asyncio.run(fork_here())
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"1"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the lookup is asyncio's own")
def test_a_loop_with_its_own_run_forever_is_not_remembered() -> None:
    """A loop class whose run_forever() is not asyncio's (nest_asyncio
    replaces it to run loops inside each other) is looked up every time."""
    from fastapi_concurrency_limiter import _holding

    class OwnLoop(asyncio.SelectorEventLoop):
        def run_forever(self) -> None:
            super().run_forever()

    async def find() -> None:
        assert running_loop() is asyncio.get_running_loop()
        assert _holding._last_loop() is not asyncio.get_running_loop()  # type: ignore[attr-defined]

    loop = OwnLoop()
    try:
        loop.run_until_complete(find())
    finally:
        loop.close()
