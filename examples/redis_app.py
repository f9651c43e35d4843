"""One database limit shared by every worker process (and every host) through
Redis: start a Redis, then run several workers.

    pip install '.[redis]' uvicorn
    redis-server --port 6379 --save '' &
    uvicorn redis_app:app --app-dir examples --workers 4

(For a Redis Cluster: REDIS_URL=redis://node:port REDIS_CLUSTER=1.)

Each worker admits at most 5 queries itself; all of them together at most 5
(with process scope, 4 workers would admit 20). Overload it and watch the
cluster-wide count:

    for i in $(seq 40); do curl -s localhost:8000/messages & done; wait
    curl -s localhost:8000/stats
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource
from fastapi_concurrency_limiter.redis import RedisScope

cluster = RedisScope(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    lease=10,  # a crashed worker's slots come back within 10 s
    on_error="reject",  # Redis down: 503 rather than an unprotected database
    key_prefix="example",
    # REDIS_CLUSTER=1: REDIS_URL names a node of a Redis Cluster.
    cluster=os.environ.get("REDIS_CLUSTER") == "1",
)
database = Resource(5, name="db", scope=cluster, queue="adaptive", max_waiting=50)
limiter = Limiter(timeout=2, resources=[database])
# Checks Redis (and its credentials) before the app serves anything.
app = FastAPI(title="fastapi-concurrency-limiter on Redis", lifespan=cluster.lifespan)
limiter.instrument(app)


@app.get("/messages")
@limiter.resources([database])
async def messages() -> dict[str, Any]:
    await asyncio.sleep(0.2)  # a query
    return {"worker": os.getpid()}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    s = limiter.statistics()["db"]
    return {
        "worker": os.getpid(),
        "local": {"in_use": s.in_use, "waiting": s.waiting, "rejected": dict(s.rejected_total)},
        "cluster": None if s.cluster is None else asdict(s.cluster),
    }
