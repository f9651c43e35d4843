"""A gateway that limits every way in: a router, a mounted Starlette app, a
WebSocket endpoint, with per-client shares of the database.

    pip install . uvicorn websockets
    uvicorn gateway:app --app-dir examples

    # one API key holds at most 2 of the database's 6 slots:
    for i in $(seq 10); do curl -s -H 'x-api-key: greedy' localhost:8000/api/report & done
    curl -s -H 'x-api-key: polite' localhost:8000/api/report   # still served
    curl -s localhost:8000/static/hello.txt                    # limited mount
    python -m websockets ws://localhost:8000/feed               # limited WebSocket
    curl -s localhost:8000/stats
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, WebSocket, WebSocketDisconnect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fastapi_concurrency_limiter import Limiter, Resource

# Six database slots, at most two per API key; requests without a key are
# exempt from the share (internal callers) but count toward the six.
database = Resource(6, name="db", per_key=2)
disk = Resource(4, name="disk")
feeds = Resource(100, name="feeds")
limiter = Limiter(timeout=2, resources=[database, disk, feeds], retry_after=2)

app = FastAPI(title="fastapi-concurrency-limiter gateway example")


async def api_key(x_api_key: str | None = Header(None)) -> str | None:
    """The client a request is for (a real app would look the key up)."""
    return x_api_key


# Every route of this router holds a database slot while it runs, at most
# two per API key.
api = APIRouter(
    prefix="/api",
    dependencies=[Depends(limiter.dependency([database], key=api_key))],
)


@api.get("/report")
async def report(x_api_key: str | None = Header(None)) -> dict[str, Any]:
    await asyncio.sleep(0.5)  # the query
    return {"for": x_api_key, "rows": 42}


@api.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


app.include_router(api)


# A plain Starlette app, limited as a whole where it is mounted: each
# request holds a disk slot until its response has been sent.
async def static_file(request: Request) -> PlainTextResponse:
    await asyncio.sleep(0.05)  # the read
    return PlainTextResponse(f"contents of {request.path_params['name']}\n")


static = Starlette(routes=[Route("/{name}", static_file)])
app.mount("/static", limiter.asgi([disk])(static))


# A WebSocket holds a feed slot for its whole life; one that cannot get a
# slot in time is refused before it is accepted (HTTP 503).
@app.websocket("/feed")
@limiter.resources([feeds])
async def feed(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive_text()
            await websocket.send_text(f"echo: {message}")
    except WebSocketDisconnect:
        pass


@app.get("/stats")
async def stats() -> dict[str, Any]:
    """What the limiter sees (not limited itself)."""
    return asdict(limiter.statistics())


limiter.instrument(app)  # the 503 in /docs; refuses routes limited twice at start-up

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
