"""The completion that wakes a waiter runs on the waiter's loop, whichever
thread released the slot and whichever thread runs the loop now."""

from __future__ import annotations

import asyncio
import threading

from fastapi_concurrency_limiter import Limiter, Resource, _core


def test_a_loop_run_by_another_thread_than_before_is_woken_on_its_own_thread() -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=None, resources=[db])
    loop = asyncio.new_event_loop()
    holder = _core.Acquisition(_core.ResourceSet([db._core]))

    async def wait_once() -> None:
        async with limiter.acquire([db]):
            pass

    try:
        # First on this thread: the loop's waiting machinery is set up here.
        assert holder.try_acquire()
        first = loop.create_task(wait_once())
        loop.call_soon(holder.release)
        loop.run_until_complete(first)

        # Then the same loop runs on another thread, and this thread frees
        # the slot its waiter waits for.
        holder = _core.Acquisition(_core.ResourceSet([db._core]))
        assert holder.try_acquire()
        done = threading.Event()

        def run() -> None:
            loop.run_until_complete(wait_once())
            done.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while db.waiting == 0:
            assert thread.is_alive()
            threading.Event().wait(0.005)
        holder.release()  # off the loop's thread: must wake it
        # Hang guard: a result set from this thread would not wake the loop,
        # which would sleep forever (no timeout, nothing else to do).
        assert done.wait(timeout=10), "the waiter was never woken"
        thread.join(timeout=10)
    finally:
        if not loop.is_running():
            loop.close()
    assert (db.in_use, db.waiting) == (0, 0)
