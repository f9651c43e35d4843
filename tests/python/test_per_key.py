"""Per-key shares: ``Resource(capacity, per_key=N)`` with
``limiter.acquire(resources, key=...)``, on a real event loop and through a
real uvicorn server with concurrent HTTP clients of several keys."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy
from fastapi_concurrency_limiter._errors import REASONS
from fastapi_concurrency_limiter.prometheus import metrics_app
from fastapi_concurrency_limiter.redis import RedisScope

from .conftest import eventually, serve

pytestmark = pytest.mark.anyio


class Holder:
    """A task that holds slots for `key` until told to leave."""

    def __init__(self, limiter: Limiter, resources: list[Resource], key: str | None) -> None:
        self.entered = asyncio.Event()
        self.leave = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(limiter, resources, key))

    async def _run(self, limiter: Limiter, resources: list[Resource], key: str | None) -> None:
        async with limiter.acquire(resources, key=key):
            self.entered.set()
            await self.leave.wait()

    async def finish(self) -> None:
        self.leave.set()
        await self.task


def test_per_key_is_validated_at_construction() -> None:
    for bad in (0, 3, -1):
        with pytest.raises(ValueError, match=r"per_key must be an integer in \[1, capacity=2\]"):
            Resource(2, per_key=bad)
    with pytest.raises(TypeError, match="per_key"):
        Resource(2, per_key="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_key.*scope"):
        Resource(2, name="perkey-host", scope="host", per_key=1)
    with pytest.raises(ValueError, match="per_key.*scope"):
        Resource(2, name="perkey-redis", scope=RedisScope(), per_key=1)  # never connects
    assert Resource(2, per_key=2).per_key == 2
    assert Resource(2).per_key is None
    assert "key_limit" in REASONS


def test_key_must_be_a_str_or_none() -> None:
    db = Resource(2, per_key=1)
    limiter = Limiter(timeout=1, resources=[db])
    with pytest.raises(TypeError, match="key must be a str or None"):
        limiter.acquire([db], key=7)  # type: ignore[arg-type]


async def test_a_key_at_its_share_waits_while_other_keys_are_served() -> None:
    db = Resource(3, name="db", per_key=1)
    limiter = Limiter(timeout=30, resources=[db])
    a1 = Holder(limiter, [db], "a")
    await a1.entered.wait()
    a2 = Holder(limiter, [db], "a")
    await eventually(lambda: db.waiting == 1)
    b = Holder(limiter, [db], "b")  # two slots are free: "b" is not held up
    await b.entered.wait()
    assert (db.in_use, db.waiting, a2.entered.is_set()) == (2, 1, False)
    assert db.statistics().active_keys == 2
    await a1.finish()  # "a" is below its share again
    await a2.entered.wait()
    await a2.finish()
    await b.finish()
    s = db.statistics()
    assert (s.in_use, s.waiting, s.active_keys) == (0, 0, 0)


async def test_a_timeout_at_the_share_is_key_limit() -> None:
    db = Resource(3, name="db", per_key=1)
    limiter = Limiter(timeout=0.02, resources=[db])
    a1 = Holder(limiter, [db], "a")
    await a1.entered.wait()
    with pytest.raises(ServerBusy) as info:
        async with limiter.acquire([db], key="a"):
            pass
    assert (info.value.resource, info.value.reason) == ("db", "key_limit")
    assert info.value.status_code == 503
    async with limiter.acquire([db], key="b"):  # other keys still get in
        pass
    await a1.finish()
    s = db.statistics()
    assert s.rejected_total["key_limit"] == 1
    assert s.rejected_total["timeout"] == 0
    assert s.active_keys == 0


async def test_one_key_cannot_fill_the_queue() -> None:
    db = Resource(2, name="db", per_key=1, max_waiting=3)
    limiter = Limiter(timeout=30, resources=[db])
    holders = [Holder(limiter, [db], "a"), Holder(limiter, [db], "c")]
    await asyncio.gather(*(h.entered.wait() for h in holders))
    flood = [Holder(limiter, [db], "a") for _ in range(3)]
    await eventually(lambda: db.waiting == 3)  # "a" alone fills the queue
    b = Holder(limiter, [db], "b")  # below its share: it gets a place
    with pytest.raises(ServerBusy) as info:
        await flood[2].task  # the newest of "a" made room
    assert info.value.reason == "key_limit"
    assert db.waiting == 3
    with pytest.raises(ServerBusy) as info:  # "a" is at its share: refused
        async with limiter.acquire([db], key="a"):
            pass
    assert info.value.reason == "queue_full"
    await holders[1].finish()  # "c" leaves: the slot goes to "b", not "a"
    await b.entered.wait()
    assert not any(h.entered.is_set() for h in flood)
    await b.finish()
    await holders[0].finish()
    for h in flood[:2]:
        await h.entered.wait()
        await h.finish()
    s = db.statistics()
    assert (s.in_use, s.waiting, s.active_keys) == (0, 0, 0)
    assert (s.rejected_total["key_limit"], s.rejected_total["queue_full"]) == (1, 1)


async def test_no_key_is_exempt_from_the_share_but_counted_in_the_total() -> None:
    db = Resource(2, name="db", per_key=1)
    limiter = Limiter(timeout=0.02, resources=[db])
    n1 = Holder(limiter, [db], None)
    n2 = Holder(limiter, [db], None)
    await n1.entered.wait()
    await n2.entered.wait()  # two keyless holders: above the share of 1
    assert db.statistics().active_keys == 0
    for key in (None, "a"):  # the total is full for everyone
        with pytest.raises(ServerBusy) as info:
            async with limiter.acquire([db], key=key):
                pass
        assert info.value.reason == "timeout"
    await n1.finish()
    await n2.finish()


async def test_cancelled_and_timed_out_waiters_leave_no_key_state() -> None:
    db = Resource(4, name="db", per_key=1)
    limiter = Limiter(timeout=0.05, resources=[db])
    holders = [Holder(limiter, [db], f"k{i}") for i in range(4)]
    for h in holders:
        await h.entered.wait()

    async def visit(key: str) -> None:
        async with limiter.acquire([db], key=key):
            pass

    waiters = [asyncio.ensure_future(visit(f"w{i}")) for i in range(200)]
    await eventually(lambda: db.waiting == 200)
    assert db.statistics().active_keys == 204
    for w in waiters[::2]:
        w.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, (asyncio.CancelledError, ServerBusy)) for r in results)
    for h in holders:
        await h.finish()
    s = db.statistics()
    assert (s.in_use, s.waiting, s.active_keys) == (0, 0, 0)


async def test_many_keys_pass_through_and_nothing_is_kept() -> None:
    db = Resource(8, name="db", per_key=2)
    limiter = Limiter(timeout=30, resources=[db])
    most = 0

    async def visit(key: str) -> None:
        nonlocal most
        async with limiter.acquire([db], key=key):
            most = max(most, db.statistics().active_keys)
            await asyncio.sleep(0)

    for start in range(0, 5000, 100):
        await asyncio.gather(*(visit(f"client-{i}") for i in range(start, start + 100)))
    assert most <= 100
    s = db.statistics()
    assert (s.in_use, s.waiting, s.active_keys) == (0, 0, 0)
    assert s.acquired_total == 5000


async def test_active_keys_is_exported_to_prometheus() -> None:
    db = Resource(3, name="db", per_key=1)
    limiter = Limiter(timeout=1, resources=[db])
    a = Holder(limiter, [db], "a")
    b = Holder(limiter, [db], "b")
    await a.entered.wait()
    await b.entered.wait()
    registry = CollectorRegistry()
    app = FastAPI()
    app.mount("/metrics", metrics_app(limiter, registry))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        text = (await client.get("/metrics/")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("concurrency_limiter_active_keys", (("resource", "db"),))] == 2
    assert samples[("concurrency_limiter_rejected_total",
                    (("reason", "key_limit"), ("resource", "db")))] == 0
    await a.finish()
    await b.finish()


def test_uvicorn_one_key_over_its_share_is_refused_while_others_are_served() -> None:
    """Three API keys share a resource of 6 slots, at most 2 each. The
    greedy key sends 6 concurrent requests: 2 run, the rest get 503 with
    reason key_limit, while the 2 requests of each polite key are served."""
    app = FastAPI()
    db = Resource(6, name="db", per_key=2)
    limiter = Limiter(timeout=0.3, resources=[db])
    release = threading.Event()
    lock = threading.Lock()
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()

    @app.exception_handler(ServerBusy)
    async def busy(request: Request, exc: ServerBusy) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "reason": exc.reason}, status_code=503)

    @app.get("/work")
    async def work(request: Request) -> dict[str, str]:
        key = request.headers.get("x-api-key")
        async with limiter.acquire([db], key=key):
            with lock:
                running[key or ""] += 1
                peak[key or ""] = max(peak[key or ""], running[key or ""])
            try:
                # Held until the test lets go (or a hang guard passes).
                await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
            finally:
                with lock:
                    running[key or ""] -= 1
        return {"key": key or ""}

    async def scenario(url: str) -> tuple[list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as client:
            greedy = [
                asyncio.ensure_future(client.get("/work", headers={"x-api-key": "greedy"}))
                for _ in range(6)
            ]
            # Two run; the other four queue, held back by their key's share.
            await eventually(lambda: db.in_use == 2 and db.waiting == 4)
            polite = [
                asyncio.ensure_future(client.get("/work", headers={"x-api-key": key}))
                for key in ("alice", "alice", "bob", "bob")
            ]
            # The polite keys take the four free slots past the greedy
            # waiters, which are refused (key_limit) at their timeout.
            await eventually(
                lambda: db.in_use == 6 and db.statistics().rejected_total["key_limit"] == 4
            )
            release.set()
            return list(await asyncio.gather(*greedy)), list(await asyncio.gather(*polite))

    with serve(app) as url:
        greedy, polite = asyncio.run(scenario(url))

    greedy_codes = Counter(r.status_code for r in greedy)
    assert greedy_codes == {200: 2, 503: 4}
    assert all(r.json()["reason"] == "key_limit" for r in greedy if r.status_code == 503)
    assert [r.status_code for r in polite] == [200, 200, 200, 200]
    assert peak["greedy"] == 2
    s = db.statistics()
    assert (s.in_use, s.waiting, s.active_keys) == (0, 0, 0)
