"""Review of issue 17 (cluster scope under real faults; fencing tokens):
each test reproduces a defect found in review against a real redis-server,
and fails on the reviewed code."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from fastapi_concurrency_limiter import Limiter, Resource
from fastapi_concurrency_limiter.redis import RedisScope, fencing_token

from .redis_support import RedisServer, needs_redis, redis_server
from .test_redis_faults import _failing, _queue
from .test_redis_scope import _try, _try_many, _until, holders, run

pytestmark = needs_redis
__all__ = ["redis_server"]  # the fixture, imported for the tests below


class _LatencyProxy:
    """A TCP proxy to a redis-server on 127.0.0.1 that delays every reply by
    ``latency`` seconds: a healthy Redis far away (or busy), each command
    answered well within the scope's ``timeout``. Runs on an event loop of
    its own in a thread, so that the test's loop does not slow it down."""

    def __init__(self, port: int, latency: float) -> None:
        self.port = port
        self.latency = latency
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Any = None

    def start(self) -> int:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        return future.result(10)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await src.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
                up_writer.close()

        await asyncio.gather(pump(reader, up_writer, 0.0), pump(up_reader, writer, self.latency))

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# -- 1. A burst that outruns the connection pool is taken for an outage ---------


def test_review_a_burst_on_a_slow_but_healthy_redis_is_not_an_outage(
    redis_server: RedisServer,
) -> None:
    """Issue 17 defect 1: "Running out of connections is never an outage."
    Redis answers every command in 0.25 s (well within the 1 s ``timeout``),
    400 requests of capacity 400 arrive at once, each may wait 15 s. The
    64-connection pool (warm: its connections are open) serves them in
    about 1.6 s: every request fits in its deadline. But the wait for a
    pooled connection counts against the command's silence bound
    (min(timeout, half the deadline) = 1 s): past it the request is taken
    for an unreachable Redis, the confirmation probe (through the same
    exhausted pool) fails too, and Redis is declared down: 503
    "unavailable" though Redis answered every call."""
    proxy = _LatencyProxy(redis_server.port, 0.25)
    port = proxy.start()

    async def main() -> None:
        scope = RedisScope(proxy.url(port), key_prefix="test", lease=30, on_error="reject")
        db = Resource(400, name="db", scope=scope)
        limiter = Limiter(timeout=15, resources=[db])
        await scope.check()
        # Warm-up: requests without a deadline (no silence bound) fill the
        # pool with its 64 connections, so that only the wait for a
        # connection is measured below (not the connection handshakes).
        warm = Limiter(timeout=None, resources=[db])
        assert await _try_many(warm, db, 64) == ["ok"] * 64
        await _until(lambda: holders(redis_server) == [])
        await _until(lambda: len(client_pool(scope)._available_connections) == 64)
        outcomes = await _try_many(limiter, db, 400)
        stats = db.statistics().cluster
        assert stats is not None
        counts = {o: outcomes.count(o) for o in set(outcomes)}
        assert "unavailable" not in counts, counts
        assert stats.unavailable_total == 0, counts
        assert counts == {"ok": 400}, counts
        await scope.aclose()

    try:
        run(main)
    finally:
        proxy.close()


def client_pool(scope: RedisScope) -> Any:
    return scope._client()._pool


# -- 2. Heartbeats of many resources run one after another ---------------------


def test_review_a_live_holder_keeps_its_slot_with_several_resources_on_a_slow_redis(
    redis_server: RedisServer,
) -> None:
    """One process holds the only slot of one of its 10 cluster resources,
    alive and never paused; Redis answers every call in 0.2 s (within the
    1 s ``timeout``: not an outage). The heartbeat sleeps ``lease / 3`` and
    then renews the resources one after another, so a resource's lease is
    renewed every 0.5 + 10 x 0.2 = 2.5 s, longer than its 1.5 s lease: the
    lease runs out between renewals and another process is granted the slot
    while the holder still runs (never more than capacity held by live
    processes)."""
    proxy = _LatencyProxy(redis_server.port, 0.2)
    port = proxy.start()

    async def main() -> None:
        lost: list[tuple[str, int | None]] = []
        scope = RedisScope(
            proxy.url(port),
            key_prefix="test",
            lease=1.5,
            on_lease_lost=lambda name, token: lost.append((name, token)),
        )
        resources = [Resource(1, name=f"r{i}", scope=scope) for i in range(10)]
        await scope.check()  # registers the 10 resources: one heartbeat each
        target = resources[-1]
        await target.acquire()  # held until the end of the test
        other = RedisScope(redis_server.url(), key_prefix="test", lease=1.5)
        elsewhere = Resource(1, name="r9", scope=other)
        other_limiter = Limiter(timeout=8, resources=[elsewhere])
        outcome = await _try(other_limiter, elsewhere)
        assert (outcome, lost) == ("timeout", []), (
            f"another process got the slot ({outcome}) while its holder still runs; "
            f"leases lost: {lost}"
        )
        target.release()
        await scope.aclose()
        await other.aclose()

    try:
        run(main)
    finally:
        proxy.close()


# -- 3. A stale renewal is taken back silently ---------------------------------


def test_review_a_renewal_after_the_slot_was_granted_again_reports_the_lost_lease(
    redis_server: RedisServer,
) -> None:
    """Fencing rule: "A release or renewal with a stale token (lease expired
    and slot re-granted) changes nothing, and the process learns that its
    lease was lost." Capacity 1: A's lease runs out (its heartbeats fail), B
    is granted the slot (a larger token) and releases it; then A's heartbeat
    reaches Redis. Redis puts A's permit back (the renewal changes
    something) and A is never told: no counter, no callback, though its
    token is stale (B's is larger) and a fenced write with it is refused."""

    async def main() -> None:
        url = redis_server.url()
        lost: list[tuple[str, int | None]] = []
        scope = RedisScope(
            url, key_prefix="test", lease=1.2, on_lease_lost=lambda n, t: lost.append((n, t))
        )
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=10, resources=[db])
        other = RedisScope(url, key_prefix="test", lease=1.2)
        elsewhere = Resource(1, name="db", scope=other)
        other_limiter = Limiter(timeout=10, resources=[elsewhere])
        await scope.check()
        client = scope._client()
        stage = db._cluster
        assert stage is not None
        hold = limiter.acquire([db])
        permit = await hold.__aenter__()
        assert permit is not None
        mine = permit.token(db)
        _failing(client, "heartbeat", 1000)  # this process cannot renew
        theirs: list[int] = []
        async with other_limiter.acquire([elsewhere]) as granted:  # after A's lease ran out
            assert granted is not None
            theirs.append(granted.token(elsewhere))
        assert theirs[0] > mine  # A's token is stale
        await _until(lambda: holders(redis_server) == [])
        client._call = type(client)._call.__get__(client)  # reaches Redis again
        await client.heartbeat(stage)
        renewed = holders(redis_server)
        await hold.__aexit__(None, None, None)
        await asyncio.sleep(0.5)
        assert (renewed, lost, stage.leases_lost_total) == ([], [("db", mine)], 1), (
            f"stale permit put back in Redis: {renewed}; reported lost: {lost}"
        )
        await scope.aclose()
        await other.aclose()

    run(main)


# -- 4. aclose() leaves the requests waiting in Redis's queue hanging -----------


def test_review_aclose_ends_the_waits_in_redis_queue(redis_server: RedisServer) -> None:
    """A request without a deadline waits in Redis's queue when the scope
    is closed (a lifespan's shutdown, ``scope.aclose()``): the listener and
    the heartbeat stop, but the wait is not ended. When the slot frees up,
    Redis grants it (its notification goes to a list nobody reads any more)
    or drops it with its process: either way the request waits forever
    ("no request stuck forever")."""

    async def main() -> None:
        url = redis_server.url()
        other = RedisScope(url, key_prefix="test", lease=30)
        elsewhere = Resource(1, name="db", scope=other)
        await elsewhere.acquire()
        scope = RedisScope(url, key_prefix="test", lease=3)
        db = Resource(1, name="db", scope=scope)
        await scope.check()
        waiter = asyncio.create_task(db.acquire())
        await _until(lambda: len(_queue(redis_server)) == 1)
        await scope.aclose()
        elsewhere.release()
        done, _ = await asyncio.wait({waiter}, timeout=10)
        if not done:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        await other.aclose()
        assert done, "the request waiting in Redis's queue still waits 10 s after aclose()"

    run(main)


# -- 5. Redaction: a password with a raw '?' ------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cr?et@127.0.0.1:6379/0",
        "redis://user:s3cr?et@127.0.0.1:6379/0",
        "unix://:s3cr?et@/tmp/redis.sock",
    ],
)
def test_review_a_password_with_a_question_mark_never_shows(url: str) -> None:
    """Passwords are pasted as they are: one with a '?' (not
    percent-encoded) is split at the '?' by the redaction, which then
    shows both halves of it in the repr (and in every error that shows
    the URL)."""
    shown = repr(RedisScope(url))
    assert "s3cr" not in shown and "et@" not in shown, shown


# -- 6. A holder paused longer than a minute is put back silently ---------------


def test_review_a_holder_paused_past_a_minute_learns_its_lease_was_lost(
    redis_server: RedisServer,
) -> None:
    """Kleppmann's case, a long pause: capacity 1, A's lease runs out while
    it is paused (its heartbeats fail) and B holds the slot from then on.
    A comes back after 62 s: the reclaim mark of its permit is purged after
    ``config_ttl`` (60 s) and the fence key expires 60 s after B's grant, so
    Redis no longer knows A's token is stale: A's renewal puts its permit
    back next to B's (2 holders, capacity 1; logged as an on_error
    admission) and A is never told that its lease was lost."""

    async def main() -> None:
        url = redis_server.url()
        lost: list[tuple[str, int | None]] = []
        scope = RedisScope(
            url, key_prefix="test", lease=1.2, on_lease_lost=lambda n, t: lost.append((n, t))
        )
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=10, resources=[db])
        other = RedisScope(url, key_prefix="test", lease=1.2)
        elsewhere = Resource(1, name="db", scope=other)
        other_limiter = Limiter(timeout=10, resources=[elsewhere])
        await scope.check()
        client = scope._client()
        stage = db._cluster
        assert stage is not None
        hold = limiter.acquire([db])
        permit = await hold.__aenter__()
        assert permit is not None
        _failing(client, "heartbeat", 100000)  # paused: no renewal reaches Redis
        taken = asyncio.Event()
        done = asyncio.Event()

        async def b() -> None:
            async with other_limiter.acquire([elsewhere]):
                taken.set()
                await done.wait()

        task = asyncio.create_task(b())
        await asyncio.wait_for(taken.wait(), 8)
        await asyncio.sleep(62)
        client._call = type(client)._call.__get__(client)  # A is back
        await client.heartbeat(stage)
        now_held = holders(redis_server)
        done.set()
        await task
        await hold.__aexit__(None, None, None)
        await scope.aclose()
        await other.aclose()
        assert (len(now_held), len(lost)) == (1, 1), (
            f"holders after A's renewal: {now_held} (capacity 1); leases lost reported: {lost}"
        )

    asyncio.run(asyncio.wait_for(main(), 120))


# -- 7. Lost-lease detection: a stale release sent with the heartbeat -----------


def test_review_a_stale_release_sent_with_the_heartbeat_reports_the_lost_lease(
    redis_server: RedisServer,
) -> None:
    """Capacity 1: A's lease runs out (its heartbeats fail) and B is granted
    the slot and holds it. A's request ends; its release meets a network
    blip (all 3 attempts fail) and goes with the next heartbeat, which
    drops the reclaim mark without a word: A never learns that its lease
    was lost (the same release sent directly reports it)."""

    async def main() -> None:
        url = redis_server.url()
        lost: list[tuple[str, int | None]] = []
        scope = RedisScope(
            url, key_prefix="test", lease=1.2, on_lease_lost=lambda n, t: lost.append((n, t))
        )
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=10, resources=[db])
        other = RedisScope(url, key_prefix="test", lease=1.2)
        elsewhere = Resource(1, name="db", scope=other)
        other_limiter = Limiter(timeout=10, resources=[elsewhere])
        await scope.check()
        client = scope._client()
        stage = db._cluster
        assert stage is not None
        hold = limiter.acquire([db])
        permit = await hold.__aenter__()
        assert permit is not None
        mine = permit.token(db)
        real = client._call
        heartbeat_fails = [True]
        release_fails = [3]

        async def call(name: str, stage: Any, *args: Any) -> Any:
            if name == "heartbeat" and heartbeat_fails[0]:
                raise RedisConnectionError("paused")
            if name == "release" and release_fails[0] > 0:
                release_fails[0] -= 1
                raise RedisConnectionError("blip")
            return await real(name, stage, *args)

        client._call = call
        taken = asyncio.Event()
        done = asyncio.Event()

        async def b() -> None:
            async with other_limiter.acquire([elsewhere]):
                taken.set()
                await done.wait()

        task = asyncio.create_task(b())
        await asyncio.wait_for(taken.wait(), 8)  # A's lease ran out; B holds
        await hold.__aexit__(None, None, None)  # A's request ends: release lost
        await _until(lambda: release_fails[0] == 0 and stage in client.pending)
        await _until(lambda: bool(client.pending.get(stage)))
        heartbeat_fails[0] = False
        await client.heartbeat(stage)  # sends the release
        await asyncio.sleep(0.3)
        done.set()
        await task
        await scope.aclose()
        await other.aclose()
        assert (lost, stage.leases_lost_total) == ([("db", mine)], 1), lost

    run(main)


# -- 8. Lost-lease detection: a false report at the release ---------------------


def test_review_a_release_after_a_lapse_within_the_capacity_is_no_lost_lease(
    redis_server: RedisServer,
) -> None:
    """Capacity 2: A's lease lapses (its heartbeats fail) while one slot is
    free anyway; C takes a free slot. Never more than 2 ran at once. Found by
    A's heartbeat, this is no lost lease (the heartbeat checks the
    capacity: A's permit is put back); found by A's release, it is reported
    lost ("the request held it beyond its lease", on_lease_lost called): the
    same situation is judged two ways, and the release's report is false."""

    async def main() -> None:
        url = redis_server.url()
        lost: list[tuple[str, int | None]] = []
        scope = RedisScope(
            url, key_prefix="test", lease=1.2, on_lease_lost=lambda n, t: lost.append((n, t))
        )
        db = Resource(2, name="db", scope=scope)
        limiter = Limiter(timeout=10, resources=[db])
        other = RedisScope(url, key_prefix="test", lease=1.2)
        elsewhere = Resource(2, name="db", scope=other)
        await scope.check()
        client = scope._client()
        hold = limiter.acquire([db])
        permit = await hold.__aenter__()
        assert permit is not None
        _failing(client, "heartbeat", 1000)
        await asyncio.sleep(1.6)  # A's lease (1.2 s) has run out
        await elsewhere.acquire()  # C: reclaims A's slot and takes a slot
        assert len(holders(redis_server)) == 1  # C alone; A still runs: 2 of 2
        await hold.__aexit__(None, None, None)
        await asyncio.sleep(0.5)
        elsewhere.release()
        await scope.aclose()
        await other.aclose()
        assert lost == [], f"reported lost though never over the capacity: {lost}"

    run(main)


# -- 9. fencing_token(): a second gate hides the first one's slots --------------


def test_review_fencing_token_of_every_cluster_slot_a_request_holds(
    redis_server: RedisServer,
) -> None:
    """A route limited by a router dependency ([cache]) and by the decorator
    ([db]) holds a cluster slot of each. The request keeps one entry for its
    cluster slots in its state: the decorator's overwrites the
    dependency's, and fencing_token(request, cache) raises LookupError
    ("holds no cluster slot") for a slot the request does hold."""
    scope = RedisScope(redis_server.url(), key_prefix="test")
    cache = Resource(2, name="cache", scope=scope)
    db = Resource(2, name="db", scope=scope)
    limiter = Limiter(timeout=5, resources=[cache, db])
    app = FastAPI(lifespan=scope.lifespan)

    @app.get("/write", dependencies=[Depends(limiter.dependency([cache]))])
    @limiter.resources([db])
    async def write(request: Request) -> dict[str, Any]:
        tokens: dict[str, Any] = {}
        for resource in (cache, db):
            try:
                tokens[resource.name] = fencing_token(request, resource)
            except LookupError as e:
                tokens[resource.name] = f"LookupError: {e}"
        return tokens

    with TestClient(app) as http:
        answer = http.get("/write")
    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    assert all(isinstance(t, int) and t > 0 for t in tokens.values()), tokens


# -- 10. A stale token after a Redis restart ------------------------------------


def test_review_a_renewal_after_a_restart_and_a_new_grant_reports_the_lost_lease(
    redis_server: RedisServer,
) -> None:
    """Capacity 1: A holds the slot; Redis restarts (no persistence: every key
    is lost) and B is granted the slot, with a larger token (the fence
    restarts from Redis's clock). A's next heartbeat puts its permit back
    beside B's (2 holders of 1, logged as an on_error admission) and A is
    not told that its token is stale, though the token it holds is smaller
    than the fence: Redis can tell (the release and renewal could carry the
    token and compare it with the fence) but only looks for reclaim marks,
    which the restart lost."""

    async def main() -> None:
        url = redis_server.url()
        lost: list[tuple[str, int | None]] = []
        scope = RedisScope(
            url, key_prefix="test", lease=1.5, on_lease_lost=lambda n, t: lost.append((n, t))
        )
        db = Resource(1, name="db", scope=scope)
        limiter = Limiter(timeout=10, resources=[db])
        await scope.check()
        client = scope._client()
        stage = db._cluster
        assert stage is not None
        hold = limiter.acquire([db])
        permit = await hold.__aenter__()
        assert permit is not None
        mine = permit.token(db)
        _failing(client, "heartbeat", 1000)  # no renewal while Redis restarts
        redis_server.restart()
        other = RedisScope(url, key_prefix="test", lease=1.5)
        elsewhere = Resource(1, name="db", scope=other)
        other_limiter = Limiter(timeout=10, resources=[elsewhere])
        granted = await other_limiter.acquire([elsewhere]).__aenter__()
        assert granted is not None
        assert granted.token(elsewhere) > mine
        client._call = type(client)._call.__get__(client)
        for _ in range(3):  # the first call may meet a connection the restart closed
            try:
                await client.heartbeat(stage)
                break
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.2)
        now_held = holders(redis_server)
        await hold.__aexit__(None, None, None)
        await scope.aclose()
        await other.aclose()
        assert (len(now_held), lost) == (1, [("db", mine)]), (
            f"holders after A's renewal: {now_held} (capacity 1); leases lost: {lost}"
        )

    run(main)
