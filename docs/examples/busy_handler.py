import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy

app = FastAPI()
db = Resource(1, name="db", max_waiting=10)
limiter = Limiter(timeout=0.2, resources=[db])


@app.exception_handler(ServerBusy)
async def busy(request: Request, exc: ServerBusy) -> JSONResponse:
    return JSONResponse(
        {"busy": exc.resource, "reason": exc.reason},
        status_code=503,
        headers={"Retry-After": "2"},
    )


@app.get("/report")
@limiter.resources([db])
async def report():
    await asyncio.sleep(0.5)  # a slow query: a second request at once gets the 503 above
    return {"report": "..."}
