import asyncio

from fastapi import FastAPI, Request

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI()
database_resource = Resource(10, name="db", per_key=3, max_waiting=100)   # no key holds more than 3
limiter = Limiter(timeout=2, resources=[database_resource])


async def build_report() -> dict[str, list[str]]:
    await asyncio.sleep(0.05)  # stands for the queries of a report
    return {"rows": []}


@app.get("/report")
async def report(request: Request):
    # The key must come from authenticated data; a header keeps the example short.
    async with limiter.acquire([database_resource], key=request.headers.get("x-api-key")):
        return await build_report()
