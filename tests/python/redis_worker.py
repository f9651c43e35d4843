"""A worker process for the cluster-scope tests: one event loop and one Redis
client of its own, driven by JSON lines on stdin, answering on stdout.

    python redis_worker.py URL CAPACITY [--lease S] [--scope redis|process]
                                        [--on-error MODE] [--prefix P]
                                        [--cluster] [--resources A,B]

Commands: {"op": "hold", "name": N, "timeout": S} takes a slot (of the
first resource) and keeps it until {"op": "release", "name": N};
{"op": "hammer", "tasks": T, "iterations": I, "hold": S, "timeout": S} runs
T tasks that each take and give back a slot I times (task i uses resource
i modulo their number), and reports the intervals in which they held it,
in all and by resource; {"op": "exit"}.
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
    # Redis's command timeout: a longer one keeps a machine too busy to
    # answer quickly from being taken for an outage.
    parser.add_argument("--redis-timeout", type=float, default=1.0)
    parser.add_argument("--prefix", default="test")
    parser.add_argument("--cluster", action="store_true")
    parser.add_argument("--resources", default="db")
    args = parser.parse_args()

    scope: Any = "process"
    if args.scope == "redis":
        scope = RedisScope(
            args.url,
            lease=args.lease,
            on_error=args.on_error,
            timeout=args.redis_timeout,
            key_prefix=args.prefix,
            cluster=args.cluster,
        )
    resources = [
        Resource(args.capacity, name=name, scope=scope) for name in args.resources.split(",")
    ]
    db = resources[0]
    limiter = Limiter(timeout=10, resources=resources)

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

    async def hammer(
        resource: Resource, iterations: int, hold_for: float, timeout: float
    ) -> list[Any]:
        intervals: list[Any] = []
        for _ in range(iterations):
            try:
                async with limiter.acquire([resource], timeout=timeout):
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
            used = [resources[i % len(resources)] for i in range(command["tasks"])]
            results = await asyncio.gather(
                *(
                    hammer(r, command["iterations"], command["hold"], command.get("timeout", 10))
                    for r in used
                )
            )
            intervals = [i for r in results for i in r if not isinstance(i, str)]
            refused = [i for r in results for i in r if isinstance(i, str)]
            by_resource: dict[str, list[Any]] = {r.name: [] for r in resources}
            for r, result in zip(used, results, strict=True):
                by_resource[r.name] += [i for i in result if not isinstance(i, str)]
            say("hammered", intervals=intervals, refused=refused, by_resource=by_resource)
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
