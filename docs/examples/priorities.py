import asyncio

from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Priority, Resource, priority_from_header

app = FastAPI()
# 10 queries at a time; 2 of the slots only CRITICAL_PLUS requests may take.
database = Resource(10, name="db", max_waiting=50, reserve={Priority.CRITICAL_PLUS: 2})
limiter = Limiter(timeout=2, resources=[database])
limiter.instrument(app)


@app.post("/checkout")
@limiter.resources([database], priority=Priority.CRITICAL_PLUS)  # served first
async def checkout() -> dict[str, str]:
    await asyncio.sleep(0.02)  # stands for a query
    return {"order": "placed"}


@app.get("/recommendations")
@limiter.resources([database], priority=Priority.SHEDDABLE)  # the first to go under load
async def recommendations() -> dict[str, list[str]]:
    await asyncio.sleep(0.02)
    return {"items": []}


# The gateway in front of the app sets x-priority on every request
# (overwriting what the client sent); honoured from 127.0.0.1 and ::1 only.
@app.get("/messages")
@limiter.resources([database], priority=priority_from_header("x-priority"))
async def read_messages() -> dict[str, list[str]]:
    await asyncio.sleep(0.02)
    return {"messages": []}


@app.get("/classes")
async def classes() -> dict[str, dict[str, int]]:
    # Per class: slots held, requests waiting, requests pushed out by a higher class.
    return {
        label: {
            "in_use": c.in_use,
            "waiting": c.waiting,
            "lower_priority": c.rejected_total["lower_priority"],
        }
        for label, c in database.statistics().priorities.items()
    }
