"""Cluster scope on a Redis Cluster (``RedisScope(..., cluster=True)``): three
masters started by the fixture, worker processes
(tests/python/redis_worker.py) with their own event loops and connections.
Two resources whose keys live on different nodes keep their limits across
processes, and waiters are granted in the order they queued."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.crc import key_slot

from fastapi_concurrency_limiter import Limiter, Resource
from fastapi_concurrency_limiter.redis import RedisScope, RedisScopeError

from .redis_support import (
    RedisClusterServers,
    RedisServer,
    Worker,
    needs_redis,
    own_redis_cluster,
    redis_cluster,
    redis_server,
)
from .test_redis_processes import max_overlap, workers
from .test_redis_scope import _try
from .test_redis_scope import _until as _until_async

pytestmark = needs_redis
# The fixtures, imported for the tests below.
__all__ = ["own_redis_cluster", "redis_cluster", "redis_server"]


def _node_of(cluster: Any, name: str, prefix: str = "test") -> str:
    node = cluster.get_node_from_key(f"{{{prefix}:{name}}}:holders")
    return f"{node.host}:{node.port}"


def _names_on_two_nodes(servers: RedisClusterServers, prefix: str = "test") -> tuple[str, str]:
    client = servers.client()
    try:
        first = "db"
        for other in ("cache", "search", "files", "mail", "queue", "index", "auth"):
            if _node_of(client, other, prefix) != _node_of(client, first, prefix):
                return first, other
    finally:
        client.close()
    raise AssertionError("no two names on two nodes")


def test_the_limits_hold_across_processes(redis_cluster: RedisClusterServers) -> None:
    a, b = _names_on_two_nodes(redis_cluster)
    assert key_slot(f"{{test:{a}}}".encode()) != key_slot(f"{{test:{b}}}".encode())
    capacity = 3
    args = (redis_cluster.url(), str(capacity), "--cluster", "--resources", f"{a},{b}")
    with workers(2, *args) as procs:
        for w in procs:
            w.send(op="hammer", tasks=10, iterations=5, hold=0.01, timeout=30)
        reports = [w.expect("hammered", timeout=90) for w in procs]
    assert sum(len(r["refused"]) for r in reports) == 0
    for name in (a, b):
        intervals = [i for r in reports for i in r["by_resource"][name]]
        assert len(intervals) == 2 * 5 * 5
        assert max_overlap(intervals) == capacity, name
    client = redis_cluster.client()
    try:
        for name in (a, b):
            _until(lambda name=name: client.zcard(f"{{test:{name}}}:holders") == 0)
    finally:
        client.close()


def test_waiters_are_granted_in_the_order_they_queued(
    redis_cluster: RedisClusterServers,
) -> None:
    client = redis_cluster.client()
    queue = "{test:fifo}:queue"
    args = (redis_cluster.url(), "2", "--cluster", "--resources", "fifo")
    try:
        with workers(3, *args) as (holder, a, b):
            for name in ("h1", "h2"):
                holder.send(op="hold", name=name, timeout=30)
                holder.expect("granted")
            order: list[tuple[Worker, str]] = [(a, "a1"), (b, "b1"), (a, "a2"), (b, "b2")]
            for n, (w, name) in enumerate(order, 1):
                w.send(op="hold", name=name, timeout=30)
                _until(lambda n=n: client.zcard(queue) == n)
            # One slot at a time: each goes to the oldest waiter, whose
            # process hears of it on its notify list (BLPOP on that node).
            for releaser, released, (w, name) in zip(
                [holder, holder, a, b], ["h1", "h2", "a1", "b1"], order, strict=True
            ):
                releaser.send(op="release", name=released)
                assert w.expect("granted", timeout=10)["name"] == name
            for w, name in order[2:]:
                w.send(op="release", name=name)
                w.expect("releasing")
        _until(lambda: client.zcard("{test:fifo}:holders") == 0)
    finally:
        client.close()


def test_one_process_with_resources_on_every_node(redis_cluster: RedisClusterServers) -> None:
    """One listener per hash slot: waiters of resources on different nodes
    are all woken, in one process."""

    async def main() -> None:
        scope = RedisScope(redis_cluster.url(), key_prefix="one", cluster=True, timeout=2)
        other = RedisScope(redis_cluster.url(), key_prefix="one", cluster=True, timeout=2)
        names = ["db", "cache", "search", "files", "mail"]
        here = [Resource(1, name=n, scope=scope) for n in names]
        there = [Resource(1, name=n, scope=other) for n in names]
        limiter = Limiter(timeout=20, resources=here)
        holding = [asyncio.create_task(r.acquire()) for r in there]
        await asyncio.gather(*holding)
        granted: list[str] = []

        async def wait(resource: Resource) -> None:
            async with limiter.acquire([resource]):
                granted.append(resource.name)

        waiting = [asyncio.create_task(wait(r)) for r in here]
        await asyncio.sleep(0.3)
        assert granted == []
        for r in there:
            r.release()
        await asyncio.wait_for(asyncio.gather(*waiting), 20)
        assert sorted(granted) == sorted(names)
        await scope.aclose()
        await other.aclose()

    asyncio.run(main())


def test_round_trips_per_request_are_those_of_a_single_redis(
    redis_cluster: RedisClusterServers,
) -> None:
    """1 script to take a free slot, 1 to release, on the node of the
    resource's slot."""

    async def main() -> None:
        scope = RedisScope(redis_cluster.url(), key_prefix="trips", cluster=True)
        db = Resource(2, name="db", scope=scope)
        limiter = Limiter(timeout=5, resources=[db])
        await scope.check()
        client = redis_cluster.client()
        node = client.get_node_from_key("{trips:db}:holders")

        def evalsha_calls() -> int:
            stats = client.info("commandstats", target_nodes=node)
            return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

        before = evalsha_calls()
        for _ in range(10):
            async with limiter.acquire([db]):
                pass
        await _until_async(lambda: client.zcard("{trips:db}:holders") == 0)
        calls = evalsha_calls() - before
        # Heartbeats (every 3.3 s) may add one or two.
        assert 20 <= calls <= 22, calls
        client.close()
        await scope.aclose()

    asyncio.run(main())


def test_cluster_mode_against_a_single_redis_is_a_clear_error(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        scope = RedisScope(redis_server.url(), key_prefix="test", cluster=True)
        Resource(1, name="db", scope=scope)
        with pytest.raises(RedisScopeError, match="not a Redis Cluster"):
            await scope.check()
        await scope.aclose()

    asyncio.run(main())


def test_a_single_redis_client_against_a_cluster_is_a_clear_error(
    redis_cluster: RedisClusterServers,
) -> None:
    async def main() -> None:
        client = redis_cluster.client()
        here = f"127.0.0.1:{redis_cluster.ports[0]}"
        name = next(n for n in ("db", "cache", "search", "files") if _node_of(client, n) != here)
        client.close()
        scope = RedisScope(redis_cluster.url(), key_prefix="test")
        Resource(1, name=name, scope=scope)
        with pytest.raises(RedisScopeError, match="cluster=True"):
            await scope.check()
        await scope.aclose()

    asyncio.run(main())


def test_a_master_killed_while_a_request_waits(
    own_redis_cluster: RedisClusterServers,
) -> None:
    """The master of a resource's slot dies (no replica takes over): its
    waiter gets on_error at once, its new requests too; nothing hangs. A
    resource on another node goes on as before: its waiter stays queued and
    is granted."""
    redis_cluster = own_redis_cluster

    async def main() -> None:
        url = redis_cluster.url()
        client = redis_cluster.client()
        a, b = _names_on_two_nodes(redis_cluster, "kill")
        other = RedisScope(url, key_prefix="kill", cluster=True, timeout=0.5, lease=3)
        there = [Resource(1, name=n, scope=other) for n in (a, b)]
        for r in there:
            await r.acquire()
        scope = RedisScope(url, key_prefix="kill", cluster=True, timeout=0.5, lease=3)
        here = [Resource(1, name=n, scope=scope) for n in (a, b)]
        limiter = Limiter(timeout=30, resources=here)
        await scope.check()
        node = client.get_node_from_key(f"{{kill:{a}}}:holders")
        waiters = [asyncio.create_task(_try(limiter, r)) for r in here]
        for n in (a, b):
            await _until_async(lambda n=n: client.zcard(f"{{kill:{n}}}:queue") == 1)
        started = time.monotonic()
        redis_cluster.kill(int(node.port))
        assert await asyncio.wait_for(waiters[0], 10) == "unavailable"
        assert await asyncio.wait_for(_try(limiter, here[0]), 10) == "unavailable"
        assert time.monotonic() - started < 10  # far from the 30 s deadline
        assert not waiters[1].done()
        stats = here[1].statistics().cluster
        assert stats is not None and stats.reachable and stats.waiting_here == 1
        there[1].release()
        assert await asyncio.wait_for(waiters[1], 10) == "ok"
        assert await asyncio.wait_for(_try(limiter, here[1]), 10) == "ok"
        client.close()
        await asyncio.wait_for(scope.aclose(), 10)
        await asyncio.wait_for(other.aclose(), 10)

    asyncio.run(main())


def test_cluster_mode_takes_database_0_only() -> None:
    with pytest.raises(ValueError, match="database 0"):
        RedisScope("redis://127.0.0.1:7000/2", cluster=True)
    with pytest.raises(ValueError, match="cluster must be True or False"):
        RedisScope("redis://127.0.0.1:7000/0", cluster="yes")  # type: ignore[arg-type]
    assert "cluster=True" in repr(RedisScope("redis://127.0.0.1:7000", cluster=True))


def _until(condition: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
