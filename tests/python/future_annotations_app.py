"""An app written with ``from __future__ import annotations``: every
annotation is a string that must be resolved in this module."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from fastapi_concurrency_limiter import Limiter, Resource


class Message(BaseModel):
    text: str


app = FastAPI()
db = Resource(1)
limiter = Limiter(timeout=1, resources=[db])


@app.post("/echo/{item_id}")
@limiter.resources([db])
async def echo(item_id: int, message: Message) -> dict[str, object]:
    return {"id": item_id, "text": message.text}
