"""Cluster scope across processes (tests/python/redis_worker.py), each with
its own event loop and its own connection to a real redis-server: the limit
holds across them, waiters are served in the order they queued, and the
slots of a SIGKILLed process come back within lease plus one heartbeat."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .redis_support import RedisServer, Worker, needs_redis, redis_server

pytestmark = needs_redis
__all__ = ["redis_server"]  # the fixture, imported for the tests below


@contextmanager
def workers(n: int, *args: str) -> Iterator[list[Worker]]:
    started = [Worker(*args) for _ in range(n)]
    try:
        for w in started:
            w.expect("ready")
        yield started
    finally:
        for w in started:
            w.close()


def max_overlap(intervals: list[Any]) -> int:
    """Most intervals open at once (an end and a start at the same instant
    do not overlap)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def hammer(server: RedisServer, scope: str) -> tuple[int, int]:
    capacity = 3
    with workers(3, server.url(), str(capacity), "--scope", scope) as procs:
        for w in procs:
            w.send(op="hammer", tasks=5, iterations=6, hold=0.01, timeout=20)
        reports = [w.expect("hammered", timeout=60) for w in procs]
    intervals = [i for r in reports for i in r["intervals"]]
    refused = sum(len(r["refused"]) for r in reports)
    assert refused == 0
    assert len(intervals) == 3 * 5 * 6
    return max_overlap(intervals), capacity


def test_the_limit_holds_across_processes(redis_server: RedisServer) -> None:
    peak, capacity = hammer(redis_server, "redis")
    assert peak == capacity
    assert redis_server.client().zcard("{test:db}:holders") == 0


def test_process_scope_does_not(redis_server: RedisServer) -> None:
    peak, capacity = hammer(redis_server, "process")
    assert peak > capacity


def test_waiters_are_granted_in_the_order_they_queued(redis_server: RedisServer) -> None:
    url = redis_server.url()
    queue = redis_server.client()
    with workers(3, url, "2") as (holder, a, b):
        for name in ("h1", "h2"):
            holder.send(op="hold", name=name, timeout=20)
            holder.expect("granted")
        order = [(a, "a1"), (b, "b1"), (a, "a2"), (b, "b2")]
        for n, (w, name) in enumerate(order, 1):
            w.send(op="hold", name=name, timeout=20)
            _until(lambda n=n: queue.zcard("{test:db}:queue") == n)
        # Free one slot at a time: each goes to the oldest waiter (a grant
        # to anyone else would leave the expected one waiting).
        for releaser, released, (w, name) in zip(
            [holder, holder, a, b], ["h1", "h2", "a1", "b1"], order, strict=True
        ):
            releaser.send(op="release", name=released)
            assert w.expect("granted", timeout=5)["name"] == name
        for w, name in order[2:]:
            w.send(op="release", name=name)
            w.expect("releasing")
    _until(lambda: queue.zcard("{test:db}:holders") == 0)


def test_slots_of_killed_processes_come_back(redis_server: RedisServer) -> None:
    lease = 1.0
    heartbeat = lease / 3
    url = redis_server.url()
    queue = redis_server.client()
    args = (url, "2", "--lease", str(lease))
    with workers(1, *args) as (waiter,):
        for round_ in range(3):
            victim = Worker(*args)
            try:
                victim.expect("ready")
                for name in ("k1", "k2"):
                    victim.send(op="hold", name=name, timeout=20)
                    victim.expect("granted")
                name = f"w{round_}"
                waiter.send(op="hold", name=name, timeout=20)
                _until(lambda: queue.zcard("{test:db}:queue") == 1)
                killed = time.monotonic()
                victim.kill()
                granted = waiter.expect("granted")
                assert granted["name"] == name
                recovered = granted["t"] - killed
                # Slack for a loaded machine and the notification.
                assert recovered <= lease + heartbeat + 0.5, recovered
                print(f"slots of a killed process recovered after {recovered:.3f} s")
                waiter.send(op="release", name=name)
                waiter.expect("releasing")
            finally:
                victim.kill()
        _until(lambda: queue.zcard("{test:db}:holders") == 0, timeout=3)


def _until(condition: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_a_burst_in_two_processes_stays_within_the_capacity(redis_server: RedisServer) -> None:
    """Two processes, capacity 200, each with 200 tasks at once (more Redis
    calls than a default connection pool holds), on_error="allow": running
    out of connections is not an outage, so no request is admitted without
    the cluster limit and never more than 200 run at once."""
    capacity = 200
    # A generous command timeout: on a loaded machine a slow reply must not
    # count as an outage (which "allow" would then admit past the limit).
    args = (redis_server.url(), str(capacity), "--on-error", "allow", "--redis-timeout", "10")
    with workers(2, *args) as procs:
        for w in procs:
            w.send(op="hammer", tasks=capacity, iterations=3, hold=0.05, timeout=20)
        reports = [w.expect("hammered", timeout=60) for w in procs]
    intervals = [i for r in reports for i in r["intervals"]]
    assert sum(len(r["refused"]) for r in reports) == 0
    assert len(intervals) == 2 * capacity * 3
    assert max_overlap(intervals) <= capacity
