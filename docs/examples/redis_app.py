import os

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource
from fastapi_concurrency_limiter.redis import RedisScope

REDIS_URL = os.environ.get("REDIS_URL", "redis://:password@redis.internal:6379/0")

cluster = RedisScope(REDIS_URL, lease=10, on_error="reject")
db = Resource(20, name="db", scope=cluster, max_waiting=100)
limiter = Limiter(timeout=5, resources=[db])
app = FastAPI(lifespan=cluster.lifespan)   # checks Redis at start-up


@app.get("/messages")
@limiter.resources([db])   # at most 20 at a time across every process using this Redis
async def read_messages():
    return {"messages": []}
