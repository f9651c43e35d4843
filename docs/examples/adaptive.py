from fastapi import FastAPI

from fastapi_concurrency_limiter import AdaptiveLimit, Limiter, Resource

app = FastAPI()
database_resource = Resource(50, name="db", adaptive=True, max_waiting=200)  # 50: a ceiling
search_resource = Resource(50, name="search", max_waiting=200,
                           adaptive=AdaptiveLimit(min_limit=2, initial_limit=10))
limiter = Limiter(timeout=5, resources=[database_resource, search_resource])


@app.get("/messages")
@limiter.resources([database_resource])
async def read_messages():
    return {"messages": [], "limit": database_resource.limit}
