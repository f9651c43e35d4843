from fastapi import APIRouter, Depends, FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI()
db = Resource(5, name="db", max_waiting=50)
limiter = Limiter(timeout=5, resources=[db])

router = APIRouter(dependencies=[Depends(limiter.dependency([db]))])


@router.get("/messages")
async def read_messages():
    return {"messages": []}


app.include_router(router)
limiter.instrument(app)  # optional: 503 in /docs, and the start-up check below
