"""The app of the host-scope operations tests (redeploys, reloads, chaos).

Configured by environment variables, read at import, since each worker
process imports it (and a worker started by a reload imports it afresh):

FCL_TEST_NAME            the host resource's name
FCL_TEST_CAPACITY        its capacity, or
FCL_TEST_CAPACITY_FILE   a file holding it (a reload changes the file, then
                         the new workers read the new capacity)
FCL_TEST_TIMEOUT         the limiter's timeout in seconds (default 10)
FCL_TEST_WORK_SECONDS    how long /work holds its slot (default 0.05)
FCL_TEST_COUNTER         optional: a file owned by the test in which /work
                         counts how many requests run at once across all
                         processes (under an flock), and the highest count
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import time
from pathlib import Path

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource


def _capacity() -> int:
    path = os.environ.get("FCL_TEST_CAPACITY_FILE")
    if path:
        return int(Path(path).read_text().strip())
    return int(os.environ["FCL_TEST_CAPACITY"])


CAPACITY_AT_IMPORT = _capacity()
COUNTER = os.environ.get("FCL_TEST_COUNTER")
WORK_SECONDS = float(os.environ.get("FCL_TEST_WORK_SECONDS", "0.05"))

db = Resource(CAPACITY_AT_IMPORT, name=os.environ["FCL_TEST_NAME"], scope="host")
limiter = Limiter(timeout=float(os.environ.get("FCL_TEST_TIMEOUT", "10")), resources=[db])
app = FastAPI()


def bump(delta: int) -> None:
    if COUNTER is None:
        return
    with open(COUNTER, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        running, peak = struct.unpack("qq", f.read(16))
        running += delta
        f.seek(0)
        f.write(struct.pack("qq", running, max(peak, running)))


@app.get("/ready")
async def ready() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/info")
async def info() -> dict[str, int]:
    # Blocks this worker's event loop for a moment, deliberately: an idle
    # loop accepts every pending connection at once, so without it one
    # worker may answer all of them; while it sleeps here, the next
    # connection goes to another worker.
    time.sleep(0.1)
    return {
        "pid": os.getpid(),
        "capacity": db.capacity,
        "capacity_at_import": CAPACITY_AT_IMPORT,
    }


@app.get("/work")
@limiter.resources([db])
async def work() -> dict[str, int]:
    bump(1)
    try:
        await asyncio.sleep(WORK_SECONDS)
    finally:
        bump(-1)
    return {"pid": os.getpid()}
