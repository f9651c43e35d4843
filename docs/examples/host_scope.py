from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI()
# One pool of 5 slots for every worker process of this machine (uvicorn --workers 4).
database_resource = Resource(5, name="db", scope="host", max_waiting=100)
limiter = Limiter(timeout=5, resources=[database_resource])


@app.get("/messages")
@limiter.resources([database_resource])
async def read_messages():
    return {"messages": []}
