"""Per-request cost of acquire + release through the Python API, against
``asyncio.Semaphore`` (the original package's mechanism), measured in the
same run.

    uncontended: one task, a free slot every time
    contended:   many tasks on a capacity-1 resource; every acquisition
                 waits and is granted by a handoff from the releasing task

Prints CPU ns per acquire+release and the ratio ours / asyncio.Semaphore
(< 1.0: ours is cheaper). CPU time of the process rather than wall-clock
time, so that other work on a loaded machine does not count; best of
several rounds, to damp the rest of the noise.

    python bench/python_bench.py [--rounds 7] [--n 100000] [--json FILE]

--json writes the ratios to FILE as well (bench/ratios.py reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from fastapi_concurrency_limiter import Limiter, Resource

Bench = Callable[[int], Awaitable[None]]


def uncontended_semaphore() -> Bench:
    sem = asyncio.Semaphore(5)

    async def run(n: int) -> None:
        for _ in range(n):
            async with sem:
                pass

    return run


def uncontended_semaphore_with_timeout() -> Bench:
    sem = asyncio.Semaphore(5)

    async def run(n: int) -> None:
        for _ in range(n):
            async with asyncio.timeout(5):
                await sem.acquire()
            sem.release()

    return run


def uncontended_acquire() -> Bench:
    db = Resource(5)
    limiter = Limiter(timeout=5, resources=[db])

    async def run(n: int) -> None:
        for _ in range(n):
            async with limiter.acquire([db]):
                pass

    return run


def uncontended_decorator() -> Bench:
    db = Resource(5)
    limiter = Limiter(timeout=5, resources=[db])

    @limiter.resources([db])
    async def endpoint() -> None:
        return None

    async def run(n: int) -> None:
        for _ in range(n):
            await endpoint()

    return run


TASKS = 50


def contended(make_hold: Callable[[], Callable[[], object]]) -> Bench:
    async def run(n: int) -> None:
        hold = make_hold()

        async def worker(k: int) -> None:
            for _ in range(k):
                async with hold():  # type: ignore[attr-defined]
                    await asyncio.sleep(0)  # let the others queue up

        await asyncio.gather(*(worker(n // TASKS) for _ in range(TASKS)))

    return run


def contended_semaphore() -> Bench:
    def make() -> Callable[[], object]:
        sem = asyncio.Semaphore(1)
        return lambda: sem

    return contended(make)


def contended_acquire() -> Bench:
    def make() -> Callable[[], object]:
        db = Resource(1)
        limiter = Limiter(timeout=60, resources=[db])
        return lambda: limiter.acquire([db])

    return contended(make)


def contended_decorator() -> Bench:
    async def run(n: int) -> None:
        db = Resource(1)
        limiter = Limiter(timeout=60, resources=[db])

        @limiter.resources([db])
        async def endpoint() -> None:
            await asyncio.sleep(0)  # let the others queue up

        async def worker(k: int) -> None:
            for _ in range(k):
                await endpoint()

        await asyncio.gather(*(worker(n // TASKS) for _ in range(TASKS)))

    return run


def contended_sleep_only() -> Bench:
    """The cost of the benchmark's own task switching, to subtract."""

    class _Nothing:
        async def __aenter__(self) -> None:
            return None

        async def __aexit__(self, *exc: object) -> None:
            return None

    nothing = _Nothing()
    return contended(lambda: (lambda: nothing))


def measure(benches: dict[str, Bench], n: int, rounds: int) -> dict[str, float]:
    """Best CPU ns per operation of each bench over ``rounds``. The benches
    take turns within each round, so that a burst of load on the machine
    hits them all alike rather than one of them."""
    best = dict.fromkeys(benches, float("inf"))
    for _ in range(rounds):
        for name, bench in benches.items():
            t0 = time.process_time_ns()
            asyncio.run(bench(n))
            best[name] = min(best[name], (time.process_time_ns() - t0) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", help="also write the ratios to this file")
    args = parser.parse_args()

    ns = measure({
        "sem": uncontended_semaphore(),
        "sem+timeout": uncontended_semaphore_with_timeout(),
        "acquire": uncontended_acquire(),
        "decorator": uncontended_decorator(),
    }, args.n, args.rounds)
    base = ns["sem"]
    rows = [
        ("uncontended", "asyncio.Semaphore (async with)", base, base),
        ("uncontended", "asyncio.Semaphore + asyncio.timeout", ns["sem+timeout"], base),
        ("uncontended", "limiter.acquire([db]) (async with)", ns["acquire"], base),
        ("uncontended", "@limiter.resources([db]) endpoint call", ns["decorator"], base),
    ]
    ns = measure({
        "overhead": contended_sleep_only(),
        "sem": contended_semaphore(),
        "acquire": contended_acquire(),
        "decorator": contended_decorator(),
    }, args.n, args.rounds)
    sem, ours, decorated = (ns[k] - ns["overhead"] for k in ("sem", "acquire", "decorator"))
    rows += [
        ("contended", f"asyncio.Semaphore(1), {TASKS} tasks (handoff)", sem, sem),
        ("contended", f"limiter.acquire, Resource(1), {TASKS} tasks (handoff)", ours, sem),
        ("contended", f"@limiter.resources endpoint, {TASKS} tasks (handoff)", decorated, sem),
    ]
    print(f"{'case':<12} {'mechanism':<52} {'ns/op':>9} {'ratio':>7}")
    for case, name, ns_op, ref in rows:
        print(f"{case:<12} {name:<52} {ns_op:>9.0f} {ns_op / ref:>7.2f}")
    print("ratio = CPU ns/op divided by asyncio.Semaphore's in the same case "
          "(contended: task-switching cost of the harness subtracted)")
    if args.json:
        ratios = {
            f"python {case} {name} / asyncio.Semaphore": ns_op / ref
            for case, name, ns_op, ref in rows
            if ns_op is not ref
        }
        with open(args.json, "w") as f:
            json.dump(ratios, f, indent=2)


if __name__ == "__main__":
    main()
