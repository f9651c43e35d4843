"""The app the multi-worker tests serve (uvicorn --workers, gunicorn).

Configured by environment variables, since each worker process imports it:
FCL_TEST_SCOPE, FCL_TEST_NAME, FCL_TEST_CAPACITY, and FCL_TEST_COUNTER, a
file owned by the test in which the handlers count how many of them run at
once across all processes (under an flock), and the highest count seen.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

COUNTER = os.environ["FCL_TEST_COUNTER"]
db = Resource(
    int(os.environ["FCL_TEST_CAPACITY"]),
    name=os.environ["FCL_TEST_NAME"],
    scope=os.environ["FCL_TEST_SCOPE"],  # type: ignore[arg-type]
)
limiter = Limiter(timeout=30, resources=[db])
app = FastAPI()


def bump(delta: int) -> None:
    with open(COUNTER, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        running, peak = struct.unpack("qq", f.read(16))
        running += delta
        f.seek(0)
        f.write(struct.pack("qq", running, max(peak, running)))


@app.get("/ready")
async def ready() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/work")
@limiter.resources([db])
async def work() -> dict[str, int]:
    bump(1)
    try:
        await asyncio.sleep(0.03)
    finally:
        bump(-1)
    return {"pid": os.getpid()}
