"""CPU per request of the limiter's Python layer, this package against the original.

The spike's rates move with whatever else runs on the machine; this measures
the limiter's own cost without a network, a load generator or a database. A
FastAPI app (the original API only: ``Resource``, ``Limiter``,
``@limiter.resources``) is called directly as an ASGI application on one event
loop, and the process CPU time (``time.process_time``) per request is taken in
each case, against the same route without the decorator:

``free``
    requests one at a time; a slot is always free (the fast path);
``granted``
    50 concurrent requests on ``Resource(1)``; each waits in the queue and
    is served (the waiting path, ending in a grant);
``rejected``
    50 concurrent requests on a ``Resource(1)`` held throughout, with
    ``Limiter(timeout=0.05)``: each waits, then is answered 503 (the
    rejection path: timeout, exception, 503 response).

The client stays connected until its response is complete (``receive``
blocks, as uvicorn's does), so a disconnect watcher, if the package has one,
runs as it does in a server.

``--no-watcher`` (this package only) patches the decorator so that it waits
without the request (no body read, no disconnect watcher), to show what that
part costs; the package is not changed.

Run it with each interpreter; ``run.py``'s ``original`` virtualenv has the
original package::

    .venv/bin/python bench/spike/glue_cost.py
    .cache/spike/original-0.1.2-py311/bin/python bench/spike/glue_cost.py
    python bench/spike/glue_cost.py --compare   # both, and the ratios

Prints µs of CPU per request (the least of several interleaved measurements,
as the least disturbed by other load); ``--json`` prints them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

CONCURRENCY = 50
BATCHES = 10
"""Concurrent cases run this many batches of CONCURRENCY requests per measurement."""
REPEATS = 9
"""Measurements per case, interleaved; the minimum is reported (the least disturbed)."""
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Message, Receive, Send], Awaitable[None]]


def build_app(timeout: float) -> tuple[FastAPI, asyncio.Event]:
    """Routes: /plain (no limiter), /free (Resource(10)), /one (Resource(1))."""
    app = FastAPI()
    wide, one = Resource(10), Resource(1)
    limiter = Limiter(timeout=timeout, resources=[wide, one])
    hold = asyncio.Event()

    @app.get("/plain")
    async def plain() -> dict[str, int]:
        await asyncio.sleep(0)
        return {"ok": 1}

    @app.get("/free")
    @limiter.resources([wide])
    async def free() -> dict[str, int]:
        await asyncio.sleep(0)
        return {"ok": 1}

    @app.get("/one")
    @limiter.resources([one])
    async def single() -> dict[str, int]:
        await asyncio.sleep(0)
        return {"ok": 1}

    @app.get("/hold")
    @limiter.resources([one])
    async def holder() -> dict[str, int]:
        await hold.wait()
        return {"ok": 1}

    return app, hold


async def request(app: App, path: str) -> int:
    """One GET through the ASGI app; returns the status."""
    scope: Message = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    done = asyncio.Event()
    body_sent = False
    status = 0

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()  # connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    return status


async def _cpu_per_request(
    run: Callable[[], Awaitable[list[int]]], expect: int, count: int
) -> float:
    started = time.process_time()
    statuses = await run()
    used = time.process_time() - started
    if statuses.count(expect) != len(statuses):
        raise RuntimeError(f"expected every status {expect}, got {sorted(set(statuses))}")
    return 1e6 * used / count


async def measure() -> dict[str, float]:
    app, _ = build_app(timeout=60)
    short, hold = build_app(timeout=0.05)
    n_free = 2000

    async def sequential(path: str) -> list[int]:
        return [await request(app, path) for _ in range(n_free)]

    async def concurrent(path: str, target: App = app) -> list[int]:
        statuses: list[int] = []
        for _ in range(BATCHES):
            batch = (request(target, path) for _ in range(CONCURRENCY))
            statuses += await asyncio.gather(*batch)
        return statuses

    async def rejected() -> list[int]:
        holder = asyncio.ensure_future(request(short, "/hold"))
        await asyncio.sleep(0.01)
        try:
            return await concurrent("/one", short)
        finally:
            hold.set()
            await holder
            hold.clear()

    cases: dict[str, tuple[Callable[[], Awaitable[list[int]]], int, int]] = {
        "plain, one at a time": (lambda: sequential("/plain"), 200, n_free),
        "free": (lambda: sequential("/free"), 200, n_free),
        "plain, 50 at once": (lambda: concurrent("/plain"), 200, CONCURRENCY * BATCHES),
        "granted": (lambda: concurrent("/one"), 200, CONCURRENCY * BATCHES),
        "rejected": (rejected, 503, CONCURRENCY * BATCHES),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(REPEATS):  # interleaved, so drifts of the machine hit every case alike
        for name, (run, expect, count) in cases.items():
            results[name].append(await _cpu_per_request(run, expect, count))
    return {name: min(values) for name, values in results.items()}


def _without_watcher() -> None:
    """Make the decorator wait as if it had no Request: no body read, no disconnect watcher."""
    from fastapi_concurrency_limiter import _limiter

    wait = _limiter.wait

    async def wait_without_request(
        acquisition: Any, timeout: float | None, retry_after: int | None, request: Any = None
    ) -> None:
        await wait(acquisition, timeout, retry_after, None)

    _limiter.wait = wait_without_request  # type: ignore[attr-defined]


def _run_in(python: str, *options: str) -> dict[str, Any]:
    out = subprocess.run(
        [python, __file__, "--json", *options],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--no-watcher",
        action="store_true",
        help="this package only: wait without the request (no body read, no disconnect watcher)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run this interpreter and the original's virtualenv, print both and the ratios",
    )
    args = parser.parse_args(argv)
    if args.compare:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import original

        runs = {
            "original": (str(original.ensure_python()),),
            "fcl": (sys.executable,),
            "fcl, no watcher": (sys.executable, "--no-watcher"),
        }
        best: dict[str, dict[str, float]] = {name: {} for name in runs}
        for _ in range(2):  # alternated; the minimum of each case
            for name, (python, *options) in runs.items():
                for case, us in _run_in(python, *options)["us_per_request"].items():
                    best[name][case] = min(us, best[name].get(case, us))
        print("CPU µs per request (fcl / original in parentheses)")
        print("| case | original | fcl | fcl, no watcher |")
        print("| --- | ---: | ---: | ---: |")
        for case, value in best["original"].items():
            cells = [f"{value:.1f}"]
            for name in ("fcl", "fcl, no watcher"):
                mine = best[name][case]
                cells.append(f"{mine:.1f} ({mine / value:.2f})")
            print(f"| {case} | {' | '.join(cells)} |")
        return 0
    if args.no_watcher:
        _without_watcher()
    results = asyncio.run(measure())
    report = {
        "package": importlib.metadata.version("fastapi-concurrency-limiter"),
        "python": sys.version.split()[0],
        "us_per_request": results,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"fastapi-concurrency-limiter {report['package']}, CPU µs per request:")
        for name, value in results.items():
            print(f"  {name:<22} {value:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
