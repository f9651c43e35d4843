"""Cost of cluster scope (RedisScope) against a local redis-server started
for the run (on a free port of 127.0.0.1, in a temporary directory).

    acquire+release   one task, a free slot every time, through
                      limiter.acquire(), in a tight loop; and of it, the time
                      until the slot is held (what a request waits; the
                      release is sent in the background). Baselines in the
                      same run: process scope, and one Redis PING round trip
    round trips       Redis commands per request, counted by the server
                      (INFO commandstats), so nothing is hidden by the client
    notification      a slot released in one process to the waiter running
                      in another: the release's round trip, the hand-off in
                      Lua, and the waiting process's BLPOP waking it
    Redis Cluster     acquire+release with RedisScope(cluster=True) on a
                      local cluster of three masters (started when
                      redis-cli is there), and the commands per request that
                      the node of the resource's slot receives

Prints medians and 99th percentiles (microseconds). Needs redis-server.

    python bench/redis_bench.py [--n 2000] [--handoffs 200] [--json FILE]

--json writes the ratios to a PING (medians) and the commands per request to
FILE as well (bench/ratios.py reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

import redis
import redis.asyncio
import redis.cluster

from fastapi_concurrency_limiter import Limiter, Resource
from fastapi_concurrency_limiter.redis import RedisScope

# What --json writes: name -> ratio (or count), filled in as measured.
RATIOS: dict[str, float] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (make system-deps installs it)")
    port = free_port()
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--save", "", "--appendonly", "no"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.01)
    raise SystemExit("redis-server did not start")


def percentiles(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {p50 * 1e6:8.1f} us   p99 {p99 * 1e6:8.1f} us"


# Commands a client sends (the server's statistics also count the commands
# scripts run inside, which cost no round trip).
_SENT = ("evalsha", "eval", "script|load", "blpop", "lpush", "hello", "client|setinfo", "select")


def commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in _SENT)


async def acquire_release(url: str, n: int, client: redis.Redis) -> None:
    local = Resource(5, name="local")
    local_limiter = Limiter(timeout=5, resources=[local])
    scope = RedisScope(url, key_prefix="bench")
    db = Resource(5, name="db", scope=scope)
    limiter = Limiter(timeout=5, resources=[db])
    await scope.check()

    entered: list[float] = []

    async def timed(lim: Limiter, res: Resource) -> list[float]:
        samples = []
        entered.clear()
        for _ in range(n):
            start = time.perf_counter()
            async with lim.acquire([res]):
                entered.append(time.perf_counter() - start)
            samples.append(time.perf_counter() - start)
        return samples

    aio = redis.asyncio.Redis.from_url(url)
    pings = []
    for _ in range(n):
        start = time.perf_counter()
        await aio.ping()
        pings.append(time.perf_counter() - start)
    await aio.aclose()
    process = await timed(local_limiter, local)
    await timed(limiter, db)  # warm-up
    await asyncio.sleep(0.1)  # let the warm-up's releases land
    before = commands(client)
    cluster = await timed(limiter, db)
    await asyncio.sleep(0.1)
    # The heartbeat's commands (one per lease / 3) are counted too.
    per_request = (commands(client) - before) / n
    to_slot = list(entered)
    # Requests spaced out (1 ms apart), so that each release has landed
    # before the next acquire: the wait for a free slot alone.
    spaced = []
    for _ in range(min(n, 500)):
        start = time.perf_counter()
        async with limiter.acquire([db]):
            spaced.append(time.perf_counter() - start)
        await asyncio.sleep(0.001)
    # The floor under any client: the acquire script alone, sent with the
    # scope's own connection pool and arguments (and released), no Python
    # around it. What Redis spends running it shows in INFO commandstats.
    raw = []
    cl = scope._client()
    stage = cl.stages[0]
    for _ in range(min(n, 500)):
        waiter_id = cl.new_id()
        start = time.perf_counter()
        granted = await cl._evalsha("acquire", cl._keys(stage), cl._args(stage, waiter_id, 5000))
        raw.append(time.perf_counter() - start)
        assert int(granted[0]) == 1, granted
        # Token 0: released without the fencing check.
        await cl._evalsha("release", cl._keys(stage), cl._args(stage, waiter_id, 0, 0, ""))
    # The same script timed by Redis itself (SLOWLOG with a threshold of 0
    # logs every command with its run time), and the commands it runs from
    # Lua (INFO commandstats counts them), one acquire at a time.
    inside, from_lua = await script_in_redis(client, cl, stage, min(n, 200))
    await scope.aclose()
    print(f"Redis PING round trip          {percentiles(pings)}")
    print(f"acquire script alone (EVALSHA) {percentiles(raw)}")
    print(
        f"  of which Redis runs it        {percentiles(inside)}  ({from_lua:.1f} commands from Lua)"
    )
    print(f"acquire+release, process scope {percentiles(process)}")
    print(f"acquire+release, RedisScope    {percentiles(cluster)}")
    print(f"  of which the wait for the slot {percentiles(to_slot)}")
    print(f"wait for a free slot, spaced   {percentiles(spaced)}")
    ping = statistics.median(pings)
    print(
        f"  (ratios to a PING: acquire+release {statistics.median(cluster) / ping:.2f}, "
        f"spaced wait for the slot {statistics.median(spaced) / ping:.2f}; in the tight loop "
        f"each request's background release delays the next one's acquire)"
    )
    print(
        f"  (ratios to a PING: acquire script alone {statistics.median(raw) / ping:.2f}, "
        f"wait for the slot in the tight loop {statistics.median(to_slot) / ping:.2f})"
    )
    print(f"Redis commands per request     {per_request:.3f}  (acquire 1 + release 1)")
    RATIOS.update({
        "redis acquire+release (tight loop) / PING": statistics.median(cluster) / ping,
        "redis wait for the slot (tight loop) / PING": statistics.median(to_slot) / ping,
        "redis wait for a free slot (spaced) / PING": statistics.median(spaced) / ping,
        "redis acquire script alone (EVALSHA) / PING": statistics.median(raw) / ping,
        "redis commands per request": per_request,
        "redis commands from Lua per free-slot acquire": from_lua,
    })


async def script_in_redis(
    client: redis.Redis, cl: Any, stage: Any, n: int
) -> tuple[list[float], float]:
    """Runs the acquire script ``n`` times for a free slot (each released
    at once): Redis's own timing of each run (seconds), and the commands
    each run makes from Lua."""
    slower_than = client.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    max_len = client.config_get("slowlog-max-len")["slowlog-max-len"]
    sha = cl.shas["acquire"]
    from_lua = 0
    try:
        client.config_set("slowlog-max-len", 2 * n + 10)
        client.config_set("slowlog-log-slower-than", 0)
        client.slowlog_reset()
        for _ in range(n):
            waiter_id = cl.new_id()
            before = _lua_calls(client)
            granted = await cl._evalsha(
                "acquire", cl._keys(stage), cl._args(stage, waiter_id, 5000)
            )
            from_lua += _lua_calls(client) - before
            assert int(granted[0]) == 1, granted
            await cl._evalsha(
                "release", cl._keys(stage), cl._args(stage, waiter_id, 0, 0, "")
            )
        log = client.slowlog_get(2 * n + 10)
    finally:
        client.config_set("slowlog-log-slower-than", slower_than)
        client.config_set("slowlog-max-len", max_len)
    # The command as bytes, also with decode_responses (redis-py 5-8).
    head = f"EVALSHA {sha} ".encode()
    runs = [
        int(entry["duration"]) / 1e6
        for entry in log
        if _as_bytes(entry["command"]).startswith(head)
    ]
    return runs, from_lua / n


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _lua_calls(client: redis.Redis) -> int:
    """Commands the server ran from Lua so far: all it counted but those a
    client sends and this bench's own look-ups."""
    stats = client.info("commandstats")
    own = {"info", "slowlog|get", "slowlog|reset", "config|get", "config|set", "ping"}
    return sum(
        int(v["calls"])
        for k, v in stats.items()
        if k.removeprefix("cmdstat_") not in own and k.removeprefix("cmdstat_") not in _SENT
    )


def start_cluster(directory: str, masters: int = 3) -> tuple[list[subprocess.Popen[bytes]], int]:
    """A Redis Cluster of ``masters`` nodes without replicas; returns the
    processes and the port of one node."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert server is not None and cli is not None
    ports = [free_port() for _ in range(masters)]
    procs = []
    for port in ports:
        node = os.path.join(directory, str(port))
        os.makedirs(node)
        args = [server, "--port", str(port), "--cluster-port", str(free_port()),
                "--bind", "127.0.0.1", "--dir", node, "--cluster-enabled", "yes",
                "--save", "", "--appendonly", "no"]  # fmt: skip
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
    for port in ports:
        client = redis.Redis(port=port)
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)
    subprocess.run(
        [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
         "--cluster-replicas", "0", "--cluster-yes"],  # fmt: skip
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for port in ports:
        client = redis.Redis(port=port, decode_responses=True)
        for _ in range(500):
            if "cluster_state:ok" in client.execute_command("CLUSTER INFO"):
                break
            time.sleep(0.02)
    return procs, ports[0]


async def cluster_acquire_release(url: str, n: int) -> None:
    scope = RedisScope(url, key_prefix="bench", cluster=True)
    db = Resource(5, name="db", scope=scope)
    limiter = Limiter(timeout=5, resources=[db])
    await scope.check()
    client = redis.cluster.RedisCluster.from_url(url)
    node = client.get_node_from_key("{bench:db}:holders")
    node_client = redis.Redis(host=node.host, port=int(node.port))

    async def timed() -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            async with limiter.acquire([db]):
                pass
            samples.append(time.perf_counter() - start)
        return samples

    aio = redis.asyncio.Redis(host=node.host, port=int(node.port))
    pings = []
    for _ in range(n):
        start = time.perf_counter()
        await aio.ping()
        pings.append(time.perf_counter() - start)
    await aio.aclose()
    await timed()  # warm-up
    await asyncio.sleep(0.1)
    before = commands(node_client)
    samples = await timed()
    await asyncio.sleep(0.1)
    per_request = (commands(node_client) - before) / n
    await scope.aclose()
    client.close()
    print(f"Redis Cluster (3 masters): PING to the slot's node {percentiles(pings)}")
    print(f"acquire+release, RedisScope(cluster=True) {percentiles(samples)}")
    print(
        f"  (ratio to a PING: {statistics.median(samples) / statistics.median(pings):.2f})"
    )
    print(f"Redis commands per request on the slot's node {per_request:.3f}")


def waiter_process(url: str, rounds: int, pipe: Connection) -> None:
    async def main() -> None:
        scope = RedisScope(url, key_prefix="bench")
        db = Resource(1, name="handoff", scope=scope)
        limiter = Limiter(timeout=10, resources=[db])
        await scope.check()
        loop = asyncio.get_running_loop()
        for _ in range(rounds):
            # The other process holds the slot: queue behind it. (Read the
            # pipe off the loop, which must go on running our releases.)
            await loop.run_in_executor(None, pipe.recv)
            async with limiter.acquire([db]):
                granted = time.monotonic()
            pipe.send(granted)
        await scope.aclose()

    asyncio.run(main())


async def handoff(url: str, rounds: int, client: redis.Redis) -> list[float]:
    scope = RedisScope(url, key_prefix="bench")
    db = Resource(1, name="handoff", scope=scope)
    limiter = Limiter(timeout=10, resources=[db])
    await scope.check()
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=waiter_process, args=(url, rounds, theirs)
    )
    child.start()
    loop = asyncio.get_running_loop()
    latencies = []
    for _ in range(rounds):
        async with limiter.acquire([db]):
            ours.send("go")
            while client.zcard("{bench:handoff}:queue") == 0:
                await asyncio.sleep(0.001)
            released = time.monotonic()
        granted = await loop.run_in_executor(None, ours.recv)
        latencies.append(granted - released)
        while client.zcard("{bench:handoff}:holders"):
            await asyncio.sleep(0.001)
    child.join(30)
    await scope.aclose()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--handoffs", type=int, default=200)
    parser.add_argument("--json", help="also write the ratios to this file")
    args = parser.parse_args()
    try:
        run(args)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(RATIOS, f, indent=2)


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as directory:
        proc, port = start_redis(directory)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis(port=port, decode_responses=True)
            asyncio.run(acquire_release(url, args.n, client))
            latencies = asyncio.run(handoff(url, args.handoffs, client))
            print(f"release -> waiter in another process runs {percentiles(latencies)}")
        finally:
            proc.kill()
            proc.wait()
        if shutil.which("redis-cli") is None:
            print("Redis Cluster: skipped (redis-cli is not installed)")
            return
        procs, port = start_cluster(directory)
        try:
            asyncio.run(cluster_acquire_release(f"redis://127.0.0.1:{port}/0", args.n))
        finally:
            for p in procs:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
