"""examples/gateway.py under a real uvicorn, with concurrent clients."""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
from types import ModuleType

import httpx
import pytest
from websockets.asyncio.client import connect

from .conftest import eventually, serve

pytestmark = pytest.mark.anyio
EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "gateway.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gateway_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_gateway_limits_its_router_mount_and_websocket_per_key() -> None:
    gateway = load()
    gateway.limiter.timeout = 0.2  # reject quickly instead of after 2 s
    with serve(gateway.app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            greedy = [
                client.get("/api/report", headers={"x-api-key": "greedy"}) for _ in range(5)
            ]
            polite = client.get("/api/report", headers={"x-api-key": "polite"})
            files = [client.get(f"/static/{i}.txt") for i in range(3)]
            rs = await asyncio.gather(*greedy, polite, *files)
            async with connect(url.replace("http://", "ws://") + "/feed") as ws:
                await ws.send("hi")
                assert await ws.recv() == "echo: hi"
                assert gateway.feeds.in_use == 1
            stats = (await client.get("/stats")).json()
    greedy_codes = sorted(r.status_code for r in rs[:5])
    assert greedy_codes == [200, 200, 503, 503, 503]  # two per key
    assert all(r.json()["detail"] == "Server busy, please retry later" for r in rs[:5]
               if r.status_code == 503)
    assert rs[5].status_code == 200 and rs[5].json()["for"] == "polite"
    assert [r.text for r in rs[6:]] == [f"contents of {i}.txt\n" for i in range(3)]
    db = next(r for r in stats["resources"] if r["name"] == "db")
    assert db["rejected_total"]["key_limit"] == 3
    await eventually(lambda: (gateway.database.in_use, gateway.feeds.in_use) == (0, 0))
