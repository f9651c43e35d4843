from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource
from fastapi_concurrency_limiter.prometheus import metrics_app

app = FastAPI()
db = Resource(5, name="db", max_waiting=50)
limiter = Limiter(timeout=5, resources=[db])
app.add_route("/metrics", metrics_app(limiter))    # serves /metrics
app.mount("/metrics", metrics_app(limiter))        # and /metrics/ (optional)


@app.get("/messages")
@limiter.resources([db])
async def read_messages():
    return {"messages": []}
