import asyncio

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI()
database_resource = Resource(5, name="db", max_waiting=50)  # 5 queries at a time
file_resource = Resource(10, name="file")
limiter = Limiter(timeout=2, resources=[database_resource, file_resource])
limiter.instrument(app)  # the 503 in /docs, and a check of the routes at start-up


@app.get("/messages")
@limiter.resources([database_resource])  # under the route decorator
async def read_messages():
    await asyncio.sleep(0.1)  # stands for a query
    return {"messages": []}


@app.get("/messages-and-file")
@limiter.resources([database_resource, file_resource])  # in registration order
async def read_messages_and_file():
    return {"messages": [], "file": "contents"}
