"""The uncontended per-request path of the Python layer, piece by piece:
CPU ns of each step that ``limiter.acquire()`` and the route decorator take
for a request that gets a free slot at once, each timed alone in a loop on
a running event loop, beside the whole ``async with`` and
``asyncio.Semaphore``'s. Shows what the steps that only rare requests need
(deadlock bookkeeping, keys, cluster stages, adaptive samples) cost the
common request.

    python bench/python_pieces.py [--n 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
from typing import Any

# The pieces' statements name these (timeit runs them with this module's
# globals).
from fastapi_concurrency_limiter import Limiter, Resource, _core  # noqa: F401
from fastapi_concurrency_limiter._adaptive import SUCCESS, completion_of  # noqa: F401
from fastapi_concurrency_limiter._holding import (  # noqa: F401
    Holds,
    _held,
    check,
    leave,
    running_loop,
    task_on,
)
from fastapi_concurrency_limiter._streaming import STREAMED  # noqa: F401


class _Nothing:
    """An async context manager that does nothing: the cost of the
    ``async with`` protocol alone (two coroutine calls)."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def pieces() -> dict[str, tuple[str, str]]:
    """name -> (setup, statement), run with the globals of this module."""
    return {
        # -- the whole thing, for scale
        "async with asyncio.Semaphore (whole)": ("", "await_(sem_cycle())"),
        "async with limiter.acquire([db]) (whole)": ("", "await_(acquire_cycle())"),
        "async with <nothing> (protocol alone)": ("", "await_(nothing_cycle())"),
        "async with a kept limiter.acquire([db]) (whole)": ("", "await_(kept_cycle())"),
        "@limiter.resources([db]) endpoint call (whole)": ("", "await_(endpoint())"),
        "the same endpoint, unlimited (await of one coroutine)": ("", "await_(plain())"),
        # -- limiter.acquire() itself, before the async with
        "limiter.acquire([db]) (the call: select, _Hold)": ("", "LIMITER.acquire([DB])"),
        "  of it: limiter._select([db])": ("", "LIMITER._select([DB])"),
        # -- what every request does
        "sys._getframe(1)": ("", "sys._getframe(0)"),
        "task_on(running_loop())": ("", "task_on(running_loop())"),
        "Acquisition(rset)": ("", "_core.Acquisition(rset)"),
        "Acquisition(rset, None) (key=None passed)": ("", "_core.Acquisition(rset, None)"),
        "try_acquire() + release()": (
            "", "a = _core.Acquisition(rset); a.try_acquire(); a.release()"),
        "  of it: Acquisition(rset) alone": ("", "_core.Acquisition(rset)"),
        "release(SUCCESS) instead of release()": (
            "", "a = _core.Acquisition(rset); a.try_acquire(); a.release(SUCCESS)"),
        "adaptive resource: try_acquire() + release()": (
            "", "a = _core.Acquisition(adaptive_rset); a.try_acquire(); a.release()"),
        # -- deadlock bookkeeping, for a task that holds nothing
        "_held.get(id(task))": ("task = task_on(running_loop())", "_held.get(id(task))"),
        "holds.append(s); holds[-1] is s; holds.pop()": (
            "h = Holds(); s = selection", "h.append(s)\nif h and h[-1] is s: h.pop()"),
        "leave(holds, s) (instead of the inline pop)": (
            "h = Holds(); s = selection", "h.append(s); leave(h, s)"),
        "check(holds, s) with one other resource held": (
            "h = Holds(); h.append(other_selection)", "check(h, selection)"),
        # -- limiter.acquire()'s own bookkeeping (re-entrant _Hold)
        "entries[frame] = ...; entries.pop(frame)": (
            "e = {}; f = sys._getframe(0)", "e[f] = 1; e.pop(f, None)"),
        # -- cluster stages, none here
        "selection.clusters (empty tuple test)": ("", "if selection.clusters: pass"),
        # -- the decorator's own steps
        "kwargs.pop(_REQUEST_PARAM, None)": ("k = {}", "k.pop('_r', None)"),
        "isinstance(result, STREAMED)": ("r = {}", "isinstance(r, STREAMED)"),
        "completion_of(None)": ("", "completion_of(None)"),
    }


async def kept_cycle() -> None:
    async with HOLD:
        pass


async def sem_cycle() -> None:
    async with SEM:
        pass


async def acquire_cycle() -> None:
    async with LIMITER.acquire([DB]):
        pass


async def nothing_cycle() -> None:
    async with NOTHING:
        pass


def await_(coro: Any) -> None:
    """Runs a coroutine that never suspends, to its end, without the loop."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise RuntimeError("the coroutine suspended: a piece must not wait")


async def measure(n: int, rounds: int) -> dict[str, float]:
    best: dict[str, float] = {}
    env = globals()
    for _ in range(rounds):
        for name, (setup, stmt) in pieces().items():
            timer = timeit.Timer(stmt, setup or "pass", timer=time.process_time_ns, globals=env)
            ns = timer.timeit(n) / n
            best[name] = min(best.get(name, float("inf")), ns)
    # The empty loop of timeit itself.
    empty = min(
        timeit.Timer("pass", timer=time.process_time_ns).timeit(n) / n for _ in range(rounds)
    )
    return {k: v - empty for k, v in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    global SEM, HOLD, NOTHING, LIMITER, DB, endpoint, plain
    global rset, adaptive_rset, selection, other_selection
    db = Resource(5, name="db")
    other = Resource(5, name="other")
    adaptive = Resource(50, name="adaptive", adaptive=True)
    limiter = Limiter(timeout=5, resources=[other, db, adaptive])
    selection = limiter._select([db])
    other_selection = limiter._select([other])
    rset = selection.rset
    adaptive_rset = limiter._select([adaptive]).rset
    HOLD = limiter.acquire([db])
    LIMITER, DB = limiter, db

    @limiter.resources([db])
    async def limited() -> None:
        return None

    async def unlimited() -> None:
        return None

    endpoint, plain = limited, unlimited
    NOTHING = _Nothing()

    async def run() -> dict[str, float]:
        global SEM
        SEM = asyncio.Semaphore(5)
        return await measure(args.n, args.rounds)

    ns = asyncio.run(run())
    print(f"Python {sys.version.split()[0]}, CPU ns per piece (best of {args.rounds} rounds of "
          f"{args.n}, timeit's empty loop subtracted)")
    for name, value in ns.items():
        print(f"  {name:<52} {value:8.0f}")


SEM: asyncio.Semaphore
LIMITER: Limiter
DB: Resource
endpoint: Any
plain: Any
HOLD: Any
NOTHING: _Nothing
rset: Any
adaptive_rset: Any
selection: Any
other_selection: Any

if __name__ == "__main__":
    main()
