"""Cross-process handoff through a host-scoped resource, as an asyncio
request sees it: from the release in one process to the waiting coroutine
running in another (printed, not asserted).

Two processes ping-pong one slot: each takes it, waits until the other
waits, stamps the time in shared memory and releases; the other, woken by
its background thread and its event loop, reads the stamp when its
``await`` returns.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from multiprocessing.sharedctypes import Synchronized

from fastapi_concurrency_limiter import Resource

ROUNDS = 1000


async def side(name: str, stamp: Synchronized[int], out: list[int], last: bool) -> None:
    r = Resource(1, name=name, scope="host")
    for i in range(ROUNDS):
        await r.acquire()
        released = stamp.value
        if released:
            out.append(time.monotonic_ns() - released)
        if i + 1 == ROUNDS and last:
            r.release()
            break
        while r.waiting == 0 and i + 1 < ROUNDS:
            await asyncio.sleep(0)
        stamp.value = time.monotonic_ns()
        r.release()


def child(name: str, stamp: Synchronized[int], result: mp.Queue[list[int]]) -> None:
    out: list[int] = []
    asyncio.run(side(name, stamp, out, last=True))
    result.put(out)


def main() -> None:
    name = f"bench-py-{os.getpid()}"
    ctx = mp.get_context("spawn")
    stamp: Synchronized[int] = ctx.Value("q", 0, lock=False)  # type: ignore[assignment]
    result: mp.Queue[list[int]] = ctx.Queue()
    p = ctx.Process(target=child, args=(name, stamp, result))
    p.start()
    mine: list[int] = []
    asyncio.run(side(name, stamp, mine, last=False))
    theirs = result.get()
    p.join()
    samples = sorted(mine + theirs)
    p50 = statistics.median(samples) / 1e3
    p99 = samples[int(0.99 * (len(samples) - 1))] / 1e3
    print(
        "host scope, release in one process to the asyncio waiter running in another: "
        f"p50 {p50:.0f} us, p99 {p99:.0f} us ({len(samples)} handoffs)"
    )
    subprocess.run(
        [sys.executable, "-m", "fastapi_concurrency_limiter", "reset", "--force", name],
        check=True,
        capture_output=True,
    )


if __name__ == "__main__":
    main()
