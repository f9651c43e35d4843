"""Nothing of the engine outlives the interpreter: at exit, nanobind reports
every bound object still alive ("nanobind: leaked N instances"), which a
user's test run would print too."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A waiter whose loop was closed while it waited, and which nobody refers
# to: its task, its future and its acquisition form a cycle through the
# engine's completion callback, which the garbage collector must see.
ABANDONED_WAITER = textwrap.dedent(
    """
    import asyncio
    import gc

    from fastapi_concurrency_limiter import Limiter, Resource, _core

    db = Resource(1, name="db")
    limiter = Limiter(timeout=None, resources=[db])
    holder = _core.Acquisition(_core.ResourceSet([db._core]))
    assert holder.try_acquire()

    async def wait() -> None:
        async with limiter.acquire([db]):
            pass

    loop = asyncio.new_event_loop()
    loop.create_task(wait())
    loop.run_until_complete(asyncio.sleep(0))
    assert db.waiting == 1
    loop.close()
    del loop
    gc.collect()
    assert db.waiting == 0, "the abandoned waiter is still queued"
    """
)

# The same cycle through a plain Python callback given to the engine.
CALLBACK_CYCLE = textwrap.dedent(
    """
    import gc

    from fastapi_concurrency_limiter import _core

    db = _core.Resource("db", 1, None, _core.QueueDiscipline.fifo, 0.005, 0.1)
    rset = _core.ResourceSet([db])
    holder = _core.Acquisition(rset)
    assert holder.try_acquire()

    class Waiter:
        def __init__(self) -> None:
            self.acquisition = _core.Acquisition(rset)
            assert self.acquisition.start(self.done) == _core.Outcome.pending

        def done(self, outcome: object) -> None:
            pass

    Waiter()
    gc.collect()
    assert db.waiting == 0, "the unreachable waiter is still queued"
    """
)


def run(program: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )


def test_an_abandoned_asyncio_waiter_is_collected_and_nothing_leaks_at_exit() -> None:
    result = run(ABANDONED_WAITER)
    assert result.returncode == 0, result.stderr
    assert "leaked" not in result.stderr, result.stderr


def test_a_waiter_whose_callback_refers_to_it_is_collected_and_nothing_leaks() -> None:
    result = run(CALLBACK_CYCLE)
    assert result.returncode == 0, result.stderr
    assert "leaked" not in result.stderr, result.stderr
