import asyncio

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI()
# A request that would wait longer than its 2 s timeout is answered 503 at once.
database_resource = Resource(10, name="db", early_reject=True)
limiter = Limiter(timeout=2, resources=[database_resource])


@app.get("/report")
@limiter.resources([database_resource])
async def report() -> dict[str, list[str]]:
    await asyncio.sleep(0.05)  # stands for the queries of a report
    return {"rows": []}


@app.get("/estimate")
async def estimate() -> dict[str, float | None]:
    # The moving estimate of service time the prediction uses (None at first).
    return {"service_seconds": database_resource.statistics().service_seconds}
