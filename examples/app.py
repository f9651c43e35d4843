"""A FastAPI app a newcomer can run: one slow "database", one fast "file".

    pip install . uvicorn
    uvicorn app:app --app-dir examples

Then, in another terminal, overload the database endpoint and watch the file
endpoint stay fast and the limiter's metrics:

    for i in $(seq 40); do curl -s localhost:8000/messages & done; wait
    curl -s localhost:8000/file
    curl -s localhost:8000/stats
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI(title="fastapi-concurrency-limiter example")

# The database takes 5 queries at a time; under overload, serve the newest
# requests first and turn stale ones away early.
database = Resource(5, name="db", queue="adaptive", max_waiting=50)
files = Resource(10, name="file")
limiter = Limiter(timeout=2, resources=[database, files])
limiter.instrument(app)  # documents the 503 in /docs

try:  # Prometheus metrics, with the optional extra installed
    from fastapi_concurrency_limiter.prometheus import metrics_app

    app.mount("/metrics", metrics_app(limiter))
except ImportError:
    pass


@app.get("/messages")
@limiter.resources([database])
async def read_messages() -> dict[str, Any]:
    await asyncio.sleep(0.2)  # stands for a query
    return {"messages": []}


@app.get("/file")
@limiter.resources([files])
def read_file() -> dict[str, str]:  # a def endpoint: runs in the thread pool
    time.sleep(0.005)
    return {"file": "contents"}


@app.get("/messages-and-file")
@limiter.resources([database, files])  # always in registration order
async def read_both() -> dict[str, Any]:
    await asyncio.sleep(0.2)
    return {"messages": [], "file": "contents"}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return asdict(limiter.statistics())
