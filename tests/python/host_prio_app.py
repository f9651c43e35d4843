"""The app of the host-scope priority test: one host resource of capacity 1
shared by every server process that imports it. Configured by environment
variables, since each process imports it: FCL_TEST_NAME (the resource),
FCL_TEST_DIR (a directory owned by the test: the file ``release`` ends the
holder's wait, and each request appends its name to ``served`` when its slot
is granted).

``/job/{name}`` takes the class from the ``x-priority`` header (loopback
clients are trusted); ``/job/hold...`` holds its slot until ``release``
exists; ``/waiting`` is the number of requests waiting host-wide.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource, priority_from_header

DIR = Path(os.environ["FCL_TEST_DIR"])
db = Resource(1, name=os.environ["FCL_TEST_NAME"], scope="host", max_waiting=8)
limiter = Limiter(timeout=30, resources=[db])
app = FastAPI()


@app.get("/ready")
async def ready() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/waiting")
async def waiting() -> dict[str, int]:
    return {"waiting": db.waiting}


@app.get("/job/{name}")
@limiter.resources([db], priority=priority_from_header("x-priority"))
async def job(name: str) -> dict[str, int]:
    with open(DIR / "served", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(name + "\n")
    while name.startswith("hold") and not (DIR / "release").exists():
        await asyncio.sleep(0.005)
    return {"pid": os.getpid()}
