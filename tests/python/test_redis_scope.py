"""Cluster scope in one process, against a real redis-server: the protocol's
order and hand-off, idempotent acquire, keys, credentials, and what requests
get while Redis is refused, paused or restarted (for each on_error)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy
from fastapi_concurrency_limiter.redis import RedisScope, RedisScopeError

from .redis_support import RedisServer, free_port, needs_redis, redis_server

pytestmark = needs_redis
__all__ = ["redis_server"]  # the fixture, imported for the tests below


def run(coroutine: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine(), 60))


def holders(server: RedisServer, prefix: str = "test", name: str = "db") -> list[str]:
    return list(server.client().zrange(f"{{{prefix}:{name}}}:holders", 0, -1))


def test_free_slot_in_one_round_trip_then_fifo_hand_off(redis_server: RedisServer) -> None:
    async def main() -> None:
        scope = RedisScope(redis_server.url(), key_prefix="test")
        db = Resource(2, name="db", scope=scope)
        limiter = Limiter(timeout=5, resources=[db])
        order: list[int] = []
        releases = [asyncio.Event(), asyncio.Event()]

        async def request(i: int) -> None:
            async with limiter.acquire([db]):
                order.append(i)
                await releases[i].wait()

        await scope.check()  # loads the scripts
        calls_before = _evalsha_calls(redis_server)
        holding = [asyncio.create_task(request(i)) for i in range(2)]
        await _until(lambda: len(order) == 2)
        assert _evalsha_calls(redis_server) - calls_before == 2  # one round trip each
        # Two more processes' worth of waiters would queue the same way; here
        # a second Resource with its own local stage stands for them.
        other = Resource(2, name="db", scope=RedisScope(redis_server.url(), key_prefix="test"))
        other_limiter = Limiter(timeout=5, resources=[other])
        later: list[int] = []

        async def queued(i: int) -> None:
            async with other_limiter.acquire([other]):
                later.append(i)

        waiting = []
        for i in range(2):
            waiting.append(asyncio.create_task(queued(i)))
            await _until(lambda n=i + 1: redis_server.client().zcard("{test:db}:queue") == n)
        # One slot at a time: the head of Redis's queue gets each.
        releases[0].set()
        await _until(lambda: len(later) >= 1)
        assert later[0] == 0
        releases[1].set()
        await asyncio.gather(*holding, *waiting)
        assert later == [0, 1]
        await _until(lambda: holders(redis_server) == [])
        await scope.aclose()
        await other._cluster.scope.aclose()  # type: ignore[union-attr]

    run(main)


def test_a_zero_timeout_tries_once(redis_server: RedisServer) -> None:
    async def main() -> None:
        scope = RedisScope(redis_server.url(), key_prefix="test")
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=0, resources=[db])
        await scope.check()
        assert await _try(limiter, db) == "ok"
        other = RedisScope(redis_server.url(), key_prefix="test")
        elsewhere = Resource(1, name="db", scope=other)
        await _until(lambda: holders(redis_server) == [])
        await elsewhere.acquire()
        assert await _try(limiter, db) == "timeout"
        assert redis_server.client().zcard("{test:db}:queue") == 0  # never queued
        elsewhere.release()
        await scope.aclose()
        await other.aclose()

    run(main)


def test_a_cluster_refusal_teaches_the_local_adaptive_limit_nothing(
    redis_server: RedisServer,
) -> None:
    """A request refused by the cluster stage never ran: its local slot goes
    back without a sample. Fed as a success, it would close the window below
    with one drop in two samples (over the 5% drop rate) and cut the limit."""

    async def main() -> None:
        from fastapi_concurrency_limiter import AdaptiveLimit

        scope = RedisScope(redis_server.url(), key_prefix="test")
        db = Resource(
            8, name="db", scope=scope, adaptive=AdaptiveLimit(window=0, min_window_samples=2)
        )
        limiter = Limiter(timeout=0.2, resources=[db])
        await scope.check()
        assert await _try(limiter, db) == "ok"  # the first release starts the algorithm
        other = RedisScope(redis_server.url(), key_prefix="test")
        elsewhere = Resource(8, name="db", scope=other)
        await _until(lambda: holders(redis_server) == [])
        await asyncio.gather(*(elsewhere.acquire() for _ in range(8)))
        assert await _try(limiter, db) == "timeout"  # refused by the cluster stage
        for _ in range(8):
            elsewhere.release()
        await _until(lambda: holders(redis_server) == [])
        with pytest.raises(ValueError):
            async with limiter.acquire([db]):
                raise ValueError("query failed")  # a drop: one sample of two
        assert db.limit == 8
        await scope.aclose()
        await other.aclose()

    run(main)


def test_waiting_in_the_cluster_queue_is_not_service_time(redis_server: RedisServer) -> None:
    """The hold of a clustered request (the adaptive limit's service time,
    and the hold time of the statistics) starts when its cluster slot is
    granted: a wait in Redis's queue is not the downstream being slow."""

    async def main() -> None:
        from fastapi_concurrency_limiter import AdaptiveLimit

        scope = RedisScope(redis_server.url(), key_prefix="test")
        db = Resource(1, name="db", scope=scope, adaptive=AdaptiveLimit())
        limiter = Limiter(timeout=10, resources=[db])
        await scope.check()
        other = RedisScope(redis_server.url(), key_prefix="test")
        elsewhere = Resource(1, name="db", scope=other)
        await elsewhere.acquire()
        request = asyncio.create_task(_try(limiter, db))
        await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 1)
        await asyncio.sleep(1.0)  # queued in Redis, holding the local slot
        elsewhere.release()
        assert await request == "ok"
        hold = db.statistics().hold_seconds
        assert hold.count == 1
        assert hold.sum < 0.5, hold.sum  # the work itself, not the 1 s wait
        await scope.aclose()
        await other.aclose()

    run(main)


def test_keys_use_the_prefix_and_the_database_of_the_url(redis_server: RedisServer) -> None:
    async def main() -> None:
        scope = RedisScope(redis_server.url(db=3), key_prefix="shop")
        db = Resource(1, name="orders-db", scope=scope)
        await db.acquire()
        keys = redis_server.client(db=3).keys("*")
        assert keys and all(k.startswith("{shop:orders-db}:") for k in keys), keys
        assert redis_server.client(db=0).keys("*") == []
        db.release()
        await scope.aclose()

    run(main)


def test_acquire_is_idempotent_per_waiter_id(redis_server: RedisServer) -> None:
    async def main() -> None:
        scope = RedisScope(redis_server.url(), key_prefix="test")
        db = Resource(1, name="db", scope=scope)
        stage = db._cluster
        assert stage is not None
        client = scope._client()
        # The same acquire sent twice (a retry after a lost reply): one slot.
        first = await client._send_acquire(stage, "w1", None)
        assert first[:2] == (1, 1) and first[2] > 0
        # The retry finds the grant, with its fencing token.
        assert await client._send_acquire(stage, "w1", None) == first
        # Queued twice: one place in the queue.
        assert (await client._send_acquire(stage, "w2", None))[0] == 0
        assert (await client._send_acquire(stage, "w2", None))[0] == 0
        assert redis_server.client().zcard("{test:db}:queue") == 1
        await client._release(stage, "w1")
        assert holders(redis_server) == ["w2"]
        await client._release(stage, "w2")
        await scope.aclose()

    run(main)


def test_a_free_slot_costs_redis_a_few_commands(redis_server: RedisServer) -> None:
    """Taking a free slot with nobody queued runs 14 commands inside Redis
    (the grant, its fencing token, the keys' time to live), not the purge
    and hand-off passes that would find nothing to do (24 before): the
    request's one round trip costs Redis less."""

    async def main() -> None:
        scope = RedisScope(redis_server.url(), key_prefix="test")
        db = Resource(2, name="db", scope=scope)
        stage = db._cluster
        assert stage is not None
        client = scope._client()
        r = redis_server.client()

        def from_lua() -> int:
            # Every command the server ran but those a client sent itself.
            sent = {"cmdstat_evalsha", "cmdstat_info", "cmdstat_script|load", "cmdstat_ping"}
            stats = r.info("commandstats")
            return sum(int(v["calls"]) for k, v in stats.items() if k not in sent)

        await client._send_acquire(stage, "warm", None)  # loads the scripts
        await client._release(stage, "warm")
        counts = []
        for i in range(3):  # the least of three: a heartbeat may run meanwhile
            before = from_lua()
            granted = await client._send_acquire(stage, f"w{i}", None)
            counts.append(from_lua() - before)
            assert granted[:2] == (1, 1) and granted[2] > 0
            await client._release(stage, f"w{i}")
        assert min(counts) <= 14, counts
        await scope.aclose()

    run(main)


def test_an_ended_lease_is_reclaimed_though_a_slot_is_free(redis_server: RedisServer) -> None:
    """A holder that crashed (its lease ended, never renewed) leaves no
    trace once another request takes a free slot: it no longer counts as in
    use, its fencing token is dropped, and when the slots fill the crashed
    one's slot is there."""

    async def main() -> None:
        url = redis_server.url()
        crashed = RedisScope(url, key_prefix="test", lease=0.3)
        gone = Resource(2, name="db", scope=crashed)
        assert gone._cluster is not None
        assert (await crashed._client()._send_acquire(gone._cluster, "crashed", None))[0] == 1
        await crashed.aclose()  # knows of no permit: "crashed" stays held
        assert holders(redis_server) == ["crashed"]
        await asyncio.sleep(0.4)  # its lease ends
        scope = RedisScope(url, key_prefix="test")
        db = Resource(2, name="db", scope=scope)
        stage = db._cluster
        assert stage is not None
        client = scope._client()
        first = await client._send_acquire(stage, "a", None)
        assert first[:2] == (1, 1)  # in use: "a" alone
        assert holders(redis_server) == ["a"]
        assert redis_server.client().hkeys("{test:db}:tokens") == ["a"]
        second = await client._send_acquire(stage, "b", None)
        assert second[:2] == (1, 2) and second[2] > first[2]
        assert (await client._send_acquire(stage, "c", 0.0))[0] == -1  # full now
        for permit_id in ("a", "b"):
            await client._release(stage, permit_id)
        await scope.aclose()

    run(main)


def test_keys_expire_a_lease_after_a_free_slot_grant(redis_server: RedisServer) -> None:
    """A slot taken without waiting gives every key it touches a time to
    live: the holders and their tokens one lease after that lease ends, the
    fence and the filled hash at least a minute (see docs/operations.md)."""

    async def main() -> None:
        lease = 0.5
        scope = RedisScope(redis_server.url(), key_prefix="test", lease=lease)
        db = Resource(1, name="db", scope=scope)
        stage = db._cluster
        assert stage is not None
        client = scope._client()
        assert (await client._send_acquire(stage, "a", None))[0] == 1
        r = redis_server.client()
        ttls = {key: r.pttl(key) for key in r.keys("{test:db}*")}
        for key in ("holders", "tokens"):
            assert lease * 1000 < ttls[f"{{test:db}}:{key}"] <= 2 * lease * 1000, ttls
        for key in ("fence", "filled", "config"):
            assert ttls[f"{{test:db}}:{key}"] > 50_000, ttls
        assert all(ttl > 0 for ttl in ttls.values()), ttls
        # Never renewed (no permit in this process): gone a lease after
        # its lease ended, with its tokens.
        await _until(lambda: not r.exists("{test:db}:holders", "{test:db}:tokens"), 3)
        await scope.aclose()

    run(main)


def test_a_lost_reply_neither_leaks_nor_doubles_the_slot(redis_server: RedisServer) -> None:
    """A proxy drops the connection after the acquire reached Redis and
    before its reply came back: the client retries with the same waiter id."""

    async def main() -> None:
        proxy = _ReplyDropper(redis_server.port)
        port = await proxy.start()
        scope = RedisScope(f"redis://127.0.0.1:{port}/0", key_prefix="test")
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=5, resources=[db])
        async with limiter.acquire([db]):  # opens the connection, loads scripts
            pass
        await _until(lambda: holders(redis_server) == [])
        proxy.drop_next_reply = True
        async with limiter.acquire([db]):
            assert proxy.dropped == 1
            assert len(holders(redis_server)) == 1
        await _until(lambda: holders(redis_server) == [])
        await scope.aclose()
        proxy.close()

    run(main)


def test_capacity_mismatch_is_a_clear_error(redis_server: RedisServer) -> None:
    async def main() -> None:
        a = RedisScope(redis_server.url(), key_prefix="test")
        await Resource(5, name="db", scope=a).acquire()
        b = RedisScope(redis_server.url(), key_prefix="test")
        Resource(6, name="db", scope=b)
        with pytest.raises(RedisScopeError, match="capacity 5 in Redis, this process says 6"):
            await b.check()
        await a.aclose()
        await b.aclose()

    run(main)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for a certificate")
def test_rediss_url_over_tls() -> None:
    """rediss:// with the server's CA: the scripts, the hand-off through the
    notify list and the release all go over TLS."""
    server = RedisServer(tls=True)
    server.start()

    async def main() -> None:
        scope = RedisScope(server.url(), key_prefix="test")
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=10, resources=[db])
        await scope.check()
        other = RedisScope(server.url(), key_prefix="test")
        elsewhere = Resource(1, name="db", scope=other)
        await elsewhere.acquire()
        waiter = asyncio.create_task(_try(limiter, db))
        await _until(lambda: server.client().zcard("{test:db}:queue") == 1)
        elsewhere.release()
        assert await waiter == "ok"
        await _until(lambda: holders(server) == [])
        await scope.aclose()
        await other.aclose()

    try:
        run(main)
    finally:
        server.close()


def test_wrong_credentials_fail_at_start_up() -> None:
    server = RedisServer(password="s3cret")
    server.start()
    try:

        async def main() -> None:
            good = RedisScope(server.url(), key_prefix="test")
            Resource(1, name="db", scope=good)
            await good.check()
            await good.aclose()
            wrong = RedisScope(f"redis://:nope@127.0.0.1:{server.port}/0", key_prefix="test")
            db = Resource(1, name="db", scope=wrong)
            with pytest.raises(RedisScopeError, match="refused the credentials"):
                await wrong.check()
            # Without the start-up check, the first use says the same.
            with pytest.raises(RedisScopeError, match="refused the credentials"):
                await db.acquire()
            assert "nope" not in repr(wrong)
            await wrong.aclose()

        run(main)
    finally:
        server.close()


def test_the_lifespan_refuses_to_start_with_wrong_credentials() -> None:
    server = RedisServer(password="s3cret")
    server.start()
    try:
        wrong = RedisScope(f"redis://:nope@127.0.0.1:{server.port}/0", key_prefix="test")
        Resource(1, name="db", scope=wrong)
        app = FastAPI(lifespan=wrong.lifespan)
        with pytest.raises(RedisScopeError, match="refused the credentials"):
            with TestClient(app):
                pass
        good = RedisScope(server.url(), key_prefix="test")
        db = Resource(1, name="db", scope=good)
        limiter = Limiter(timeout=1, resources=[db])
        app = FastAPI(lifespan=good.lifespan)

        @app.get("/q")
        @limiter.resources([db])
        async def q() -> dict[str, int]:
            return {"ok": 1}

        with TestClient(app) as http:
            assert http.get("/q").status_code == 200
        # Shut down: nothing left held.
        assert server.client().zcard("{test:db}:holders") == 0
    finally:
        server.close()


@pytest.mark.parametrize("on_error", ["allow", "reject"])
def test_the_app_starts_while_redis_is_down_and_uses_it_once_up(on_error: str) -> None:
    """Redis unreachable at start-up is an outage, not a misconfiguration:
    the app starts (a warning), requests get on_error, and once Redis runs
    they are limited by it again."""
    server = RedisServer()  # not started yet
    try:
        scope = RedisScope(
            server.url(),
            key_prefix="test",
            lease=1.5,
            timeout=0.3,
            on_error=on_error,  # type: ignore[arg-type]
        )
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=2, resources=[db])
        app = FastAPI(lifespan=scope.lifespan)

        @app.get("/q")
        @limiter.resources([db])
        async def q() -> dict[str, int]:
            return {"held": len(holders(server)) if server.proc is not None else -1}

        with TestClient(app) as http:
            first = http.get("/q")
            assert first.status_code == (200 if on_error == "allow" else 503)
            server.start()
            deadline = time.monotonic() + 15
            while True:
                response = http.get("/q")
                if response.status_code == 200 and response.json() == {"held": 1}:
                    break  # held in Redis: the cluster limit applies again
                assert time.monotonic() < deadline, response.text
                time.sleep(0.1)
        assert server.client().zcard("{test:db}:holders") == 0
    finally:
        server.close()


def test_start_up_errors_say_what_to_fix(redis_server: RedisServer) -> None:
    """Each start-up failure is a RedisScopeError that says what to fix."""
    from fastapi_concurrency_limiter.redis import RedisUnreachableError

    protected = RedisServer(password="s3cret")
    protected.start()

    async def check(url: str, **options: Any) -> None:
        scope = RedisScope(url, key_prefix="test", timeout=0.5, **options)
        Resource(1, name="db", scope=scope)
        try:
            await scope.check()
        finally:
            await scope.aclose()

    async def main() -> None:
        no_password = f"redis://127.0.0.1:{protected.port}/0"
        with pytest.raises(RedisScopeError, match="requires a password"):
            await check(no_password)
        with pytest.raises(RedisScopeError, match="no such database"):
            await check(redis_server.url(db=99))
        down = f"redis://:hush@127.0.0.1:{free_port()}/0"
        with pytest.raises(RedisUnreachableError, match="cannot be reached") as caught:
            await check(down)
        assert isinstance(caught.value, ConnectionError) and "hush" not in str(caught.value)

    try:
        run(main)
    finally:
        protected.close()


def test_a_redis_older_than_6_is_refused_at_start_up(redis_server: RedisServer) -> None:
    async def main() -> None:
        scope = RedisScope(redis_server.url(), key_prefix="test")
        Resource(1, name="db", scope=scope)
        client = scope._client()
        real = client.redis.info

        async def old_info(*args: Any, **kwargs: Any) -> Any:
            info = await real(*args, **kwargs)
            return {**info, "redis_version": "5.0.14"}

        client.redis.info = old_info
        with pytest.raises(RedisScopeError, match=r"version 5\.0\.14.*needs Redis 6\.0"):
            await scope.check()
        client.redis.info = real
        await scope.check()
        await scope.aclose()

    run(main)


@pytest.mark.parametrize("name", ["billing:db", "db}", "{db", "my db", "db\n"])
def test_cluster_resource_names_cannot_make_keys_collide(
    redis_server: RedisServer, name: str
) -> None:
    """key_prefix="app" with "billing:db" would share the keys of
    key_prefix="app:billing" with "db"; a brace would end the hash tag."""
    scope = RedisScope(redis_server.url(), key_prefix="app")
    with pytest.raises(ValueError, match="no '\\{', '\\}', ':' or whitespace"):
        Resource(1, name=name, scope=scope)

    async def main() -> None:
        # Names that pass share nothing across prefixes.
        team_a = RedisScope(redis_server.url(), key_prefix="app")
        team_b = RedisScope(redis_server.url(), key_prefix="app:billing")
        a = Resource(1, name="billing-db", scope=team_a)
        b = Resource(1, name="db", scope=team_b)
        await a.acquire()
        await asyncio.wait_for(b.acquire(), 5)  # not refused by team A's load
        a.release()
        b.release()
        await team_a.aclose()
        await team_b.aclose()

    run(main)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@127.0.0.1:{port}/0",
        "redis://admin:hunter2@127.0.0.1:{port}/0",
        "redis://127.0.0.1:{port}/0?password=hunter2",
        "redis://127.0.0.1:{port}/0?username=admin&password=hunter2",
    ],
)
def test_credentials_never_show(url: str) -> None:
    """Neither the password nor the user name appears in the scope's repr,
    in the start-up error for wrong credentials, or in the error for a
    mistyped scheme, whether given as user info or as query options."""
    server = RedisServer(password="s3cret")
    server.start()
    try:
        url = url.format(port=server.port)
        scope = RedisScope(url, key_prefix="test")
        Resource(1, name="db", scope=scope)
        assert "hunter2" not in repr(scope) and "admin" not in repr(scope)

        async def main() -> None:
            with pytest.raises(RedisScopeError) as caught:
                await scope.check()
            await scope.aclose()
            assert "hunter2" not in str(caught.value) and "admin" not in str(caught.value)

        run(main)
        with pytest.raises(ValueError) as mistyped:
            RedisScope("reddis" + url[len("redis") :])
        assert "hunter2" not in str(mistyped.value) and "admin" not in str(mistyped.value)
    finally:
        server.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cr?et@127.0.0.1:6379/0",
        "redis://user:s3cr?et@127.0.0.1:6379/0",
        "unix://:s3cr?et@/tmp/redis.sock",
    ],
)
def test_a_password_with_a_question_mark_never_shows(url: str) -> None:
    """Passwords are pasted as they are: one with a raw '?' (not
    percent-encoded) never shows in the repr (nor in any error that shows
    the URL): the user info is found before the query is split off."""
    shown = repr(RedisScope(url))
    assert "s3cr" not in shown and "et@" not in shown, shown


def test_a_route_answers_503_with_the_cluster_limit(redis_server: RedisServer) -> None:
    scope = RedisScope(redis_server.url(), key_prefix="test")
    db = Resource(1, name="db", scope=scope)
    limiter = Limiter(timeout=0.3, resources=[db])
    app = FastAPI()
    gate = asyncio.Event()

    @app.get("/q")
    @limiter.resources([db])
    async def q() -> dict[str, int]:
        await gate.wait()
        return {"ok": 1}

    async def main() -> None:
        # Another process holds the only slot.
        other = RedisScope(redis_server.url(), key_prefix="test")
        elsewhere = Resource(1, name="db", scope=other)
        await elsewhere.acquire()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            started = time.monotonic()
            response = await http.get("/q")
            assert response.status_code == 503
            assert 0.25 < time.monotonic() - started < 2
            stats = limiter.statistics()["db"]
            assert stats.cluster is not None and stats.cluster.in_use == 1
            metrics = _scrape(limiter)
            assert 'concurrency_limiter_cluster_in_use{resource="db"} 1.0' in metrics
            assert 'concurrency_limiter_cluster_reachable{resource="db"} 1.0' in metrics
            assert 'concurrency_limiter_in_use{resource="db"} 0.0' in metrics  # local stage
            elsewhere.release()
            gate.set()
            assert (await http.get("/q")).status_code == 200
        await other.aclose()
        await scope.aclose()

    run(main)


def test_a_streamed_response_holds_its_cluster_slot_until_sent(
    redis_server: RedisServer,
) -> None:
    scope = RedisScope(redis_server.url(), key_prefix="test")
    db = Resource(1, name="db", scope=scope)
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()
    seen: list[int] = []

    @app.get("/stream")
    @limiter.resources([db])
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(3):
                seen.append(len(holders(redis_server)))
                yield b"x"
                await asyncio.sleep(0.01)

        return StreamingResponse(body())

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            response = await http.get("/stream")
            assert response.status_code == 200 and response.content == b"xxx"
        assert seen == [1, 1, 1]
        await _until(lambda: holders(redis_server) == [])
        await scope.aclose()

    run(main)


def test_a_client_that_leaves_while_queued_in_redis_leaves_the_queue(
    redis_server: RedisServer,
) -> None:
    scope = RedisScope(redis_server.url(), key_prefix="test")
    db = Resource(1, name="db", scope=scope)
    limiter = Limiter(timeout=5, resources=[db])
    app = FastAPI()

    @app.post("/q")
    @limiter.resources([db])
    async def q() -> dict[str, int]:
        return {"ok": 1}

    async def main() -> None:
        other = RedisScope(redis_server.url(), key_prefix="test")
        elsewhere = Resource(1, name="db", scope=other)
        await elsewhere.acquire()  # the only slot, held by another process
        leave = asyncio.Event()
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await leave.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope_ = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/q", "raw_path": b"/q",
            "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
            "client": ("127.0.0.1", 1), "server": ("app", 80),
        }  # fmt: skip
        call = asyncio.create_task(app(scope_, receive, send))
        await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 1)
        started = time.monotonic()
        leave.set()
        await asyncio.wait_for(call, 2)
        assert time.monotonic() - started < 1  # not at the 5 s deadline
        await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 0)
        assert sent[0]["status"] == 503
        elsewhere.release()
        await scope.aclose()
        await other.aclose()

    run(main)


def test_a_body_read_after_a_cluster_wait_is_intact(redis_server: RedisServer) -> None:
    scope = RedisScope(redis_server.url(), key_prefix="test")
    db = Resource(1, name="db", scope=scope)
    limiter = Limiter(timeout=5, resources=[db])
    app = FastAPI()

    @app.post("/echo")
    @limiter.resources([db])
    async def echo(request: Request) -> Any:
        return await request.json()

    async def main() -> None:
        other = RedisScope(redis_server.url(), key_prefix="test")
        elsewhere = Resource(1, name="db", scope=other)
        await elsewhere.acquire()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            call = asyncio.create_task(http.post("/echo", json={"n": list(range(1000))}))
            await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 1)
            elsewhere.release()
            response = await call
        assert response.status_code == 200
        assert response.json() == {"n": list(range(1000))}
        await scope.aclose()
        await other.aclose()

    run(main)


def test_a_slot_dropped_without_release_comes_back_with_its_lease(
    redis_server: RedisServer,
) -> None:
    """A response that is never sent (dropped by a middleware) never
    releases: its cluster slot stops being renewed and its lease ends."""

    async def main() -> None:
        scope = RedisScope(redis_server.url(), key_prefix="test", lease=0.6)
        db = Resource(1, name="db", scope=scope)
        stage = db._cluster
        assert stage is not None
        permit = await stage.acquire(None)
        assert len(holders(redis_server)) == 1
        await asyncio.sleep(0.8)  # renewed meanwhile: still held
        assert len(holders(redis_server)) == 1
        del permit
        gc.collect()
        await _until(lambda: holders(redis_server) == [], timeout=0.6 + 0.2 + 0.5)
        await scope.aclose()

    run(main)


# -- Redis faults -------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["reject", "allow", "local"])
def test_connection_refused(on_error: str) -> None:
    async def main() -> None:
        scope = RedisScope(
            f"redis://127.0.0.1:{free_port()}/0",
            on_error=on_error,
            timeout=0.5,  # type: ignore[arg-type]
        )
        db = Resource(4, name="db", scope=scope)
        limiter = Limiter(timeout=2, resources=[db])
        outcomes = await _try_many(limiter, db, 3)
        expected = {
            "reject": ["unavailable"] * 3,
            "allow": ["ok"] * 3,
            "local": ["ok"] + ["unavailable"] * 2,
        }
        assert outcomes == expected[on_error]
        stats = db.statistics().cluster
        assert stats is not None and not stats.reachable
        await scope.aclose()

    started = time.monotonic()
    run(main)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("on_error", ["reject", "allow", "local"])
def test_redis_paused_longer_than_the_timeout(redis_server: RedisServer, on_error: str) -> None:
    async def main() -> None:
        url = redis_server.url()
        scope = RedisScope(url, on_error=on_error, key_prefix="test", lease=1.5, timeout=0.3)  # type: ignore[arg-type]
        db = Resource(4, name="db", scope=scope)
        limiter = Limiter(timeout=6, resources=[db])
        # Another process holds 3 of the 4 slots, this one holds the last;
        # then one more request of this process waits in Redis's queue.
        other = RedisScope(url, key_prefix="test", lease=1.5)
        elsewhere = Resource(4, name="db", scope=other)
        # (one task each: a task may not hold two slots of one resource)
        await asyncio.gather(*(asyncio.create_task(elsewhere.acquire()) for _ in range(3)))
        await other.check()
        await scope.check()  # 2 processes: the local share is 4 // 2 = 2
        holding = _Holder(limiter, db)
        await holding.started.wait()
        waiter = asyncio.create_task(_try(limiter, db))
        await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 1)

        redis_server.pause()
        try:
            started = time.monotonic()
            # The queued request gets the on_error behaviour once the
            # heartbeat (every 0.5 s) finds Redis unreachable, not at its
            # 6 s deadline; so do new ones; nothing hangs.
            waited = await waiter
            assert time.monotonic() - started < 4
            outcomes = await _try_many(limiter, db, 2)
            assert time.monotonic() - started < 5
        finally:
            redis_server.resume()
        # "local": the holder uses 1 of the share of 2 (the queued request
        # took the other and gave it back).
        assert waited == {"reject": "unavailable", "allow": "ok", "local": "ok"}[on_error]
        expected = {
            "reject": ["unavailable"] * 2,
            "allow": ["ok"] * 2,
            "local": ["ok", "unavailable"],
        }
        assert outcomes == expected[on_error]

        # Consistent again within a lease: once everybody has let go, nothing
        # is held, and the 4 slots are there again, no more.
        holding.release.set()
        await holding.task
        for _ in range(3):
            elsewhere.release()
        await _until(lambda: holders(redis_server) == [], timeout=3 * 1.5)
        assert await _try_many(limiter, db, 4) == ["ok"] * 4
        await _until(lambda: holders(redis_server) == [])
        await scope.aclose()
        await other.aclose()

    run(main)


@pytest.mark.parametrize("on_error", ["reject", "allow", "local"])
def test_redis_restarted(redis_server: RedisServer, on_error: str) -> None:
    """A restart without persistence loses every key: the heartbeat puts the
    running request's slot back, so the pool is consistent within a lease."""

    async def main() -> None:
        url = redis_server.url()
        scope = RedisScope(url, on_error=on_error, key_prefix="test", lease=0.9, timeout=0.3)  # type: ignore[arg-type]
        db = Resource(2, name="db", scope=scope)
        limiter = Limiter(timeout=0.5, resources=[db])
        holding = _Holder(limiter, db)
        await holding.started.wait()
        await scope.check()  # 1 process: the local share is 2
        assert len(holders(redis_server)) == 1
        redis_server.stop()
        outcomes = await _try_many(limiter, db, 1)
        assert outcomes == {"reject": ["unavailable"], "allow": ["ok"], "local": ["ok"]}[on_error]
        redis_server.start()
        # Within a heartbeat or so after Redis is back, the held slot is known again.
        await _until(lambda: len(holders(redis_server)) == 1, timeout=0.9 + 1.5)
        # Exactly one slot is free: another process's request fits, its
        # next one does not.
        other = RedisScope(url, key_prefix="test", lease=0.9)
        elsewhere = Resource(2, name="db", scope=other)
        other_limiter = Limiter(timeout=0.5, resources=[elsewhere])
        second = _Holder(other_limiter, elsewhere)
        await second.started.wait()
        assert await _try(other_limiter, elsewhere) == "timeout"
        holding.release.set()
        second.release.set()
        await asyncio.gather(holding.task, second.task)
        await _until(lambda: holders(redis_server) == [])
        await scope.aclose()
        await other.aclose()

    run(main)


@pytest.mark.parametrize("on_error", ["reject", "allow", "local"])
def test_a_waiter_queued_when_redis_is_killed_gets_on_error_at_once(
    redis_server: RedisServer, on_error: str
) -> None:
    """Redis goes away while a request waits in its queue: the request gets
    the on_error behaviour when the listener's connection breaks, not at
    its deadline."""

    async def main() -> None:
        url = redis_server.url()
        other = RedisScope(url, key_prefix="test", lease=3, timeout=0.3)
        elsewhere = Resource(2, name="db", scope=other)
        await asyncio.gather(*(asyncio.create_task(elsewhere.acquire()) for _ in range(2)))
        scope = RedisScope(url, on_error=on_error, key_prefix="test", lease=3, timeout=0.3)  # type: ignore[arg-type]
        db = Resource(2, name="db", scope=scope)
        limiter = Limiter(timeout=30, resources=[db])
        await scope.check()  # 2 processes: the local share is 2 // 2 = 1
        waiter = asyncio.create_task(_try(limiter, db, hold=True))
        await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 1)
        started = time.monotonic()
        redis_server.stop()
        assert await asyncio.wait_for(waiter, 10) == {
            "reject": "unavailable",
            "allow": "ok",
            "local": "ok",
        }[on_error]
        assert time.monotonic() - started < 10  # far from its 30 s deadline
        stats = db.statistics().cluster
        assert stats is not None and not stats.reachable and stats.waiting_here == 0
        assert stats.held_here == 0  # the admitted one has ended
        await scope.aclose()
        await other.aclose()

    run(main)


def test_a_waiter_lost_by_redis_is_queued_again(redis_server: RedisServer) -> None:
    """Redis loses its data without dropping the connections (a failover to
    a replica that had not received the latest writes; here FLUSHALL): the
    holder's heartbeat puts its slot back, the waiter's queues it again."""

    async def main() -> None:
        url = redis_server.url()
        other = RedisScope(url, key_prefix="test", lease=0.9, timeout=0.3)
        elsewhere = Resource(1, name="db", scope=other)
        await elsewhere.acquire()
        scope = RedisScope(url, key_prefix="test", lease=0.9, timeout=0.3)
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=8, resources=[db])
        waiter = asyncio.create_task(_try(limiter, db))
        await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 1)
        redis_server.client().flushall()
        await _until(lambda: len(holders(redis_server)) == 1, timeout=3)
        await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 1, timeout=3)
        assert not waiter.done()
        elsewhere.release()
        assert await waiter == "ok"
        await _until(lambda: holders(redis_server) == [])
        await scope.aclose()
        await other.aclose()

    run(main)


@pytest.mark.parametrize("fault", ["restart", "pause"])
@pytest.mark.parametrize("on_error", ["allow", "local"])
def test_requests_admitted_during_an_outage_count_after_it(
    redis_server: RedisServer, on_error: str, fault: str
) -> None:
    """Requests admitted by on_error while Redis is unreachable, and slots
    whose lease ran out meanwhile, are put back once Redis is reachable
    again, beyond the capacity if need be: no slot is granted until the
    requests really running are below it."""

    async def main() -> None:
        url = redis_server.url()
        lease = 0.9
        scope = RedisScope(url, on_error=on_error, key_prefix="test", lease=lease, timeout=0.3)  # type: ignore[arg-type]
        db = Resource(4, name="db", scope=scope)
        limiter = Limiter(timeout=5, resources=[db])
        other = RedisScope(url, key_prefix="test", lease=lease, timeout=0.3)
        elsewhere = Resource(4, name="db", scope=other)
        other_limiter = Limiter(timeout=0.6, resources=[elsewhere])
        # This process holds 1 slot, the other one 3: the cluster is full.
        a1 = _Holder(limiter, db)
        await a1.started.wait()
        others = [_Holder(other_limiter, elsewhere) for _ in range(3)]
        await asyncio.gather(*(h.started.wait() for h in others))
        await scope.check()  # 2 processes: the local share is 4 // 2 = 2
        assert len(holders(redis_server)) == 4

        if fault == "restart":
            redis_server.stop()  # comes back empty
        else:
            redis_server.pause()
        try:
            a2 = _Holder(limiter, db)  # admitted by on_error: 5 running
            await asyncio.wait_for(a2.started.wait(), 5)
            if fault == "pause":
                await asyncio.sleep(lease + 0.3)  # every lease runs out
        finally:
            if fault == "restart":
                redis_server.start()
            else:
                redis_server.resume()
        # The heartbeats put back all 5 running requests.
        await _until(lambda: len(holders(redis_server)) == 5, timeout=5)
        # The other process takes Redis for reachable again at its next
        # successful heartbeat (until then its requests get on_error).
        await _until(lambda: not other._client().is_down_group(0), timeout=5)
        assert await _try(other_limiter, elsewhere) == "timeout"
        a2.release.set()
        await a2.task
        await _until(lambda: len(holders(redis_server)) == 4)
        assert await _try(other_limiter, elsewhere) == "timeout"  # 4 running: still full
        a1.release.set()
        await a1.task
        await _until(lambda: len(holders(redis_server)) == 3)
        assert await _try(other_limiter, elsewhere) == "ok"
        for h in others:
            h.release.set()
        await asyncio.gather(*(h.task for h in others))
        await _until(lambda: holders(redis_server) == [])
        await scope.aclose()
        await other.aclose()

    run(main)


@pytest.mark.parametrize("on_error", ["reject", "allow", "local"])
def test_random_timeouts_cancellations_and_outages_leave_nothing_held(
    redis_server: RedisServer, on_error: str
) -> None:
    """Two processes' worth of requests with random timeouts, some cancelled
    at random moments, while Redis is paused and restarted: afterwards
    nothing is held or queued, in Redis or in either process, and the full
    capacity can be taken again."""
    import random

    rng = random.Random(7)

    async def main() -> None:
        url = redis_server.url()
        scopes = [
            RedisScope(url, on_error=on_error, key_prefix="test", lease=0.9, timeout=0.2)  # type: ignore[arg-type]
            for _ in range(2)
        ]
        dbs = [Resource(3, name="db", scope=scope) for scope in scopes]
        limiters = [Limiter(timeout=1, resources=[db]) for db in dbs]
        outcomes: list[str] = []

        async def request(i: int) -> None:
            limiter, db = limiters[i % 2], dbs[i % 2]
            try:
                async with limiter.acquire([db], timeout=rng.choice([0, 0.05, 0.3, 1])):
                    await asyncio.sleep(rng.random() * 0.05)
                outcomes.append("ok")
            except ServerBusy as e:
                outcomes.append(e.reason)

        async def load(seconds: float) -> None:
            tasks: list[asyncio.Task[None]] = []
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                tasks.append(asyncio.create_task(request(i)))
                i += 1
                await asyncio.sleep(rng.random() * 0.01)
                if rng.random() < 0.2:  # cancel a random one, at any stage
                    rng.choice(tasks).cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        await load(1)
        redis_server.pause()
        try:
            await load(1)
        finally:
            redis_server.resume()
        await load(0.5)
        redis_server.restart()
        await load(1)
        # Consistent within a lease or two: nothing held, nothing queued.
        await _until(lambda: holders(redis_server) == [], timeout=5)
        await _until(lambda: redis_server.client().zcard("{test:db}:queue") == 0, timeout=5)
        for db in dbs:
            stats = db.statistics()
            assert stats.in_use == 0 and stats.waiting == 0
            assert stats.cluster is not None
            assert stats.cluster.held_here == 0 and stats.cluster.waiting_here == 0
        assert "ok" in outcomes
        await asyncio.sleep(1.2)  # past the pause after the last failure
        # The whole capacity can be taken again: no slot was lost.
        assert await _try_many(limiters[0], dbs[0], 3) == ["ok"] * 3
        for scope in scopes:
            await scope.aclose()

    run(main)


def test_a_read_only_replica_counts_as_unavailable(redis_server: RedisServer) -> None:
    """After a failover a client may reach a replica: its READONLY errors
    get the on_error behaviour, not a 500."""

    async def main() -> None:
        scope = RedisScope(redis_server.url(), key_prefix="test", timeout=0.3)
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=1, resources=[db])
        assert await _try(limiter, db) == "ok"
        admin = redis_server.client()
        admin.replicaof("127.0.0.1", free_port())  # a primary that is not there
        try:
            assert await _try(limiter, db) == "unavailable"
        finally:
            admin.replicaof("NO", "ONE")
        await asyncio.sleep(1.1)  # past the pause after a failure
        assert await _try(limiter, db) == "ok"
        await scope.aclose()

    run(main)


# -- helpers ------------------------------------------------------------------


class _Holder:
    def __init__(self, limiter: Limiter, db: Resource) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._run(limiter, db))

    async def _run(self, limiter: Limiter, db: Resource) -> None:
        async with limiter.acquire([db]):
            self.started.set()
            await self.release.wait()


async def _try(limiter: Limiter, db: Resource, hold: bool = False) -> str:
    try:
        async with limiter.acquire([db]):
            if hold:
                await asyncio.sleep(0.05)
            return "ok"
    except ServerBusy as e:
        return e.reason


async def _try_many(limiter: Limiter, db: Resource, n: int) -> list[str]:
    """n requests at once; those admitted hold their slots until all n have
    an outcome. Returns the outcomes, "ok" first."""
    results: list[str] = []
    all_done = asyncio.Event()

    def record(outcome: str) -> None:
        results.append(outcome)
        if len(results) == n:
            all_done.set()

    async def one() -> None:
        try:
            async with limiter.acquire([db]):
                record("ok")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(all_done.wait(), 3)
        except ServerBusy as e:
            record(e.reason)

    await asyncio.gather(*(one() for _ in range(n)))
    return sorted(results, key=lambda r: r != "ok")


async def _until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _scrape(limiter: Limiter) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from fastapi_concurrency_limiter.prometheus import register

    registry = CollectorRegistry()
    register(limiter, registry)
    return generate_latest(registry).decode()


def _evalsha_calls(server: RedisServer) -> int:
    stats = server.client().info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


class _ReplyDropper:
    """A TCP proxy to Redis that, when told, closes the client's connection
    instead of passing on the next reply (after Redis has run the command)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.drop_next_reply = False
        self.dropped = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, reply: bool) -> None:
            try:
                while data := await src.read(65536):
                    if reply and self.drop_next_reply:
                        self.drop_next_reply = False
                        self.dropped += 1
                        writer.close()
                        up_writer.close()
                        return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
