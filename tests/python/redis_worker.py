"""A worker process for the cluster-scope tests: one event loop and one Redis
client of its own, driven by JSON lines on stdin, answering on stdout.

    python redis_worker.py URL CAPACITY [--lease S] [--scope redis|process]
                                        [--on-error MODE] [--prefix P]

Commands: {"op": "hold", "name": N, "timeout": S} takes a slot and keeps it
until {"op": "release", "name": N}; {"op": "hammer", "tasks": T,
"iterations": I, "hold": S, "timeout": S} runs T tasks that each take and
give back a slot I times, and reports the intervals in which they held it;
{"op": "exit"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy
from fastapi_concurrency_limiter.redis import RedisScope


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("capacity", type=int)
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--scope", default="redis")
    parser.add_argument("--on-error", default="reject")
    parser.add_argument("--prefix", default="test")
    args = parser.parse_args()

    scope: Any = "process"
    if args.scope == "redis":
        scope = RedisScope(
            args.url, lease=args.lease, on_error=args.on_error, key_prefix=args.prefix
        )
    db = Resource(args.capacity, name="db", scope=scope)
    limiter = Limiter(timeout=10, resources=[db])

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, {"op": "exit"})

    threading.Thread(target=read_stdin, daemon=True).start()
    releases: dict[str, asyncio.Event] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def hold(name: str, timeout: float) -> None:
        try:
            async with limiter.acquire([db], timeout=timeout):
                say("granted", name=name, t=time.monotonic())
                await releases[name].wait()
                say("releasing", name=name, t=time.monotonic())
        except ServerBusy as e:
            say("refused", name=name, reason=e.reason, t=time.monotonic())

    async def hammer(iterations: int, hold_for: float, timeout: float) -> list[Any]:
        intervals: list[Any] = []
        for _ in range(iterations):
            try:
                async with limiter.acquire([db], timeout=timeout):
                    start = time.monotonic()
                    await asyncio.sleep(hold_for)
                    intervals.append((start, time.monotonic()))
            except ServerBusy as e:
                intervals.append(e.reason)
        return intervals

    say("ready")
    while True:
        command = await commands.get()
        op = command["op"]
        if op == "hold":
            releases[command["name"]] = asyncio.Event()
            task = asyncio.create_task(hold(command["name"], command.get("timeout", 10)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif op == "release":
            releases[command["name"]].set()
        elif op == "hammer":
            results = await asyncio.gather(
                *(
                    hammer(command["iterations"], command["hold"], command.get("timeout", 10))
                    for _ in range(command["tasks"])
                )
            )
            intervals = [i for r in results for i in r if not isinstance(i, str)]
            refused = [i for r in results for i in r if isinstance(i, str)]
            say("hammered", intervals=intervals, refused=refused)
        elif op == "stats":
            say("stats", **_stats(db))
        elif op == "exit":
            break
    for event in releases.values():
        event.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    if isinstance(scope, RedisScope):
        await scope.aclose()


def _stats(db: Resource) -> dict[str, Any]:
    s = db.statistics()
    cluster = s.cluster
    return {
        "in_use": s.in_use,
        "cluster_in_use": None if cluster is None else cluster.in_use,
    }


if __name__ == "__main__":
    asyncio.run(main())
