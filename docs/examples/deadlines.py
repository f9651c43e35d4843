import asyncio

import httpx
from fastapi import FastAPI, Request

from fastapi_concurrency_limiter import Limiter, Resource, deadline_headers, remaining_budget

app = FastAPI()
database = Resource(5, name="database")
reports = Resource(2, name="reports")
# Clients (or the gateway in front) send their budget in gRPC's header: "250m", "2S".
limiter = Limiter(timeout=2, resources=[reports, database], deadline_header="grpc-timeout")


@app.get("/messages")
@limiter.resources([database])
async def read_messages() -> dict[str, float | None]:
    # Seconds left of the client's budget; None when it sent none.
    return {"budget_left": remaining_budget()}


@app.get("/report")
@limiter.resources([reports])
async def report(request: Request) -> dict[str, object]:
    # The budget goes on to the service this request calls (here: this app
    # itself), so that it does not work for a client that has given up.
    async with httpx.AsyncClient(base_url=str(request.base_url)) as client:
        messages = await client.get("/messages", headers=deadline_headers())
    # limiter.acquire() takes the budget as deadline=, when it is given one.
    async with limiter.acquire([database], deadline=remaining_budget()):
        await asyncio.sleep(0.01)  # stands for a query
    return {"messages": messages.json(), "status": messages.status_code}
