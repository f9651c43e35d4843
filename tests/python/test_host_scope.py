"""Host scope: one limit for every worker process of the machine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from fastapi_concurrency_limiter import AdaptiveLimit, Limiter, Priority, Resource, ServerBusy

from .conftest import _free_port

pytestmark = pytest.mark.anyio
HERE = Path(__file__).parent


def unique(test: str) -> str:
    return f"py{os.getpid()}-{test}-{time.monotonic_ns() % 10**9}"


@pytest.fixture
def name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh host resource name, removed afterwards (its shared segment
    outlives the processes that used it)."""
    n = unique(request.node.name[:20].replace("[", "-").replace("]", ""))
    yield n
    shm = Path(os.environ.get("FCL_HOST_DIR") or f"/dev/shm/fcl-host.{os.getuid()}") / n
    shm.unlink(missing_ok=True)


def test_host_scope_needs_a_valid_name() -> None:
    with pytest.raises(ValueError, match="name must be 1 to 64 letters.*scope='host'"):
        Resource(1, scope="host")
    for bad in ["", "a/b", "x" * 65, "sp ace", ".", ".."]:
        with pytest.raises(ValueError, match="name must be"):
            Resource(1, name=bad, scope="host")
    with pytest.raises(ValueError, match="scope must be 'process', 'host' or a RedisScope"):
        Resource(1, name="x", scope="cluster")  # type: ignore[arg-type]


def test_the_limit_is_host_wide(name: str) -> None:
    """set_limit() in one process is the limit of every process."""
    db = Resource(4, name=name, scope="host")
    assert db.limit == 4
    db.set_limit(2)
    assert db.statistics().limit == 2
    code = (
        "from fastapi_concurrency_limiter import Resource\n"
        f"r = Resource(4, name={name!r}, scope='host')\n"
        "print(r.limit, r.statistics().limit, flush=True)\n"
        "r.set_limit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "2"]
    assert db.limit == 3
    with pytest.raises(ValueError, match="limit .* must be an integer in \\[1, capacity=4\\]"):
        db.set_limit(5)
    cmd = [sys.executable, "-m", "fastapi_concurrency_limiter", "status"]
    status = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True).stdout)
    mine = [r for r in status if r["name"] == name]
    assert (mine[0]["capacity"], mine[0]["limit"], mine[0]["adaptive"]) == (4, 3, False)
    text = subprocess.run(cmd, capture_output=True, text=True).stdout
    assert f"{name}: capacity 4, limit 3, in use 0" in text


# The AdaptiveLimit of the adaptive host tests: a window is every 2 requests
# (no minimum time), and a window with a drop halves the limit. Every
# process must use the same settings.
_ADAPTIVE = {
    "initial_limit": 8,
    "window": 0,
    "min_window_samples": 2,
    "backoff": 0.5,
    "drop_rate": 0,
}

# A worker process: on each line of stdin, "drop" makes one request that
# fails (a dropped sample), "stats" prints the limit its statistics show.
_ADAPTIVE_WORKER = """
import asyncio, sys
from fastapi_concurrency_limiter import AdaptiveLimit, Limiter, Resource
db = Resource(8, name=sys.argv[1], scope="host", adaptive=AdaptiveLimit(**ADAPTIVE))
limiter = Limiter(timeout=10, resources=[db])

async def drop():
    try:
        async with limiter.acquire([db]):
            raise RuntimeError("the database failed")
    except RuntimeError:
        pass

print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "drop":
        asyncio.run(drop())
    print(db.statistics().limit, flush=True)
""".replace("ADAPTIVE", repr(_ADAPTIVE))


def test_adaptive_host_resource_one_limit_fed_by_every_worker(name: str) -> None:
    """Two worker processes (spawned, as uvicorn --workers does) on one host
    adaptive resource: one algorithm learns from the requests of both, and
    both show the same limit."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _ADAPTIVE_WORKER, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]

    def ask(worker: subprocess.Popen[str], command: str) -> int:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(command + "\n")
        worker.stdin.flush()
        return int(worker.stdout.readline())

    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        a, b = workers
        # The algorithm leaves out the very first request (it started on an
        # idle downstream). Then one failed request in each worker: half a
        # window each. Only one algorithm fed by both closes a window, with
        # drops: 8 -> 4. (Separate ones would each still be at 8, the
        # second worker's having seen nothing but its own first request.)
        assert ask(a, "drop") == 8
        assert ask(a, "drop") == 8
        assert ask(b, "drop") == 4
        assert ask(a, "stats") == 4
        # Two more in the first worker: 4 -> 2, seen by the second.
        ask(a, "drop")
        assert ask(a, "drop") == 2
        assert ask(b, "stats") == 2
    finally:
        for w in workers:
            w.kill()
            w.wait()
    # This process opens it too, with the same settings, and sees the same.
    db = Resource(8, name=name, scope="host", adaptive=AdaptiveLimit(**_ADAPTIVE))
    assert db.adaptive
    assert db.limit == db.statistics().limit == 2


def test_the_newest_adaptive_settings_are_in_force(name: str) -> None:
    first = Resource(8, name=name, scope="host", adaptive=AdaptiveLimit(**_ADAPTIVE))
    first.set_limit(3)
    assert first.limit == 3
    Resource(8, name=name, scope="host")
    assert first.limit == 8  # a fixed limit now, for both


def test_the_newest_configuration_wins_and_says_so(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A redeploy or a reload with another configuration: the newest process's
    is in force for every process (logged once), held slots stay held."""
    old = Resource(2, name=name, scope="host")
    with caplog.at_level("INFO", logger="fastapi_concurrency_limiter"):
        new = Resource(3, name=name, scope="host", queue="lifo")
    assert old.capacity == new.capacity == 3
    assert old.queue == "lifo"
    records = [r for r in caplog.records if name in r.getMessage()]
    assert len(records) == 1
    assert "capacity=2" in records[0].getMessage() and "capacity=3" in records[0].getMessage()
    with pytest.raises(ValueError, match="limit .* must be an integer in \\[1, capacity=3\\]"):
        old.set_limit(4)


def _hold_in_subprocess(
    name: str, capacity: int, seconds: float, extra: str = ""
) -> subprocess.Popen[str]:
    code = (
        "import sys, time, asyncio\n"
        "from fastapi_concurrency_limiter import Resource\n"
        f"r = Resource({capacity}, name={name!r}, scope='host'{extra})\n"
        "async def main():\n"
        # One task per slot: a task may hold a resource only once.
        f"    await asyncio.gather(*[r.acquire() for _ in range({capacity})])\n"
        "    print('ready', flush=True)\n"
        f"    await asyncio.sleep({seconds})\n"
        f"    for _ in range({capacity}): r.release()\n"
        "asyncio.run(main())\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


async def test_a_release_in_another_process_grants_a_waiting_request(name: str) -> None:
    db = Resource(1, name=name, scope="host")
    limiter = Limiter(timeout=10, resources=[db])
    holder = _hold_in_subprocess(name, 1, 0.3)
    assert db.in_use == 1
    started = time.monotonic()
    async with limiter.acquire([db]):
        waited = time.monotonic() - started
        assert db.in_use == 1
    holder.wait()
    assert 0.1 < waited < 5
    assert db.in_use == 0
    s = db.statistics()
    assert (s.acquired_total, s.in_use, s.waiting) == (1, 0, 0)


async def test_timeouts_and_routes_work_for_host_resources(name: str) -> None:
    db = Resource(1, name=name, scope="host")
    limiter = Limiter(timeout=0.05, resources=[db])
    app = FastAPI()

    @app.get("/q")
    @limiter.resources([db])
    async def q() -> dict[str, int]:
        return {"ok": 1}

    holder = _hold_in_subprocess(name, 1, 1.0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        r = await client.get("/q")
        assert r.status_code == 503
        holder.wait()
        assert (await client.get("/q")).status_code == 200
    assert db.statistics().rejected_total["timeout"] == 1

    async def try_once() -> None:
        async with limiter.acquire([db], timeout=0):
            pass

    async with limiter.acquire([db]):
        with pytest.raises(ServerBusy):
            await asyncio.create_task(try_once())  # another task: no slot left


async def test_a_killed_holder_gives_its_slots_back(name: str) -> None:
    db = Resource(2, name=name, scope="host")
    limiter = Limiter(timeout=5, resources=[db])
    holder = _hold_in_subprocess(name, 2, 60)
    assert db.in_use == 2
    holder.kill()
    holder.wait()
    started = time.monotonic()
    async with limiter.acquire([db]):
        assert time.monotonic() - started < 1.0
    assert db.in_use == 0


def test_status_and_reset(name: str) -> None:
    db = Resource(3, name=name, scope="host", max_waiting=7)
    env = {**os.environ}
    cmd = [sys.executable, "-m", "fastapi_concurrency_limiter"]
    holder = _hold_in_subprocess(name, 3, 60, extra=", max_waiting=7")
    try:
        out = subprocess.run(cmd + ["status", "--json"], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        mine = [r for r in json.loads(out.stdout) if r["name"] == name]
        assert len(mine) == 1
        assert mine[0]["capacity"] == 3 and mine[0]["in_use"] == 3
        assert mine[0]["max_waiting"] == 7
        by_class = {"sheddable": 0, "sheddable_plus": 0, "critical": 3, "critical_plus": 0}
        held = {"pid": holder.pid, "held": 3, "held_by_class": by_class, "waiting": 0,
                "alive": True, "other_pid_namespace": False}
        assert held in mine[0]["processes"]
        # Registered at open, before any request: this process too.
        assert os.getpid() in [p["pid"] for p in mine[0]["processes"]]
        assert mine[0]["reserve"] == {}
        text = subprocess.run(cmd + ["status"], capture_output=True, text=True).stdout
        assert f"pid {holder.pid}: held 3, waiting 0" in text  # only critical: no breakdown
        refused = subprocess.run(cmd + ["reset", name], capture_output=True, text=True)
        assert refused.returncode == 1
        assert str(holder.pid) in refused.stderr
    finally:
        holder.kill()
        holder.wait()
    del db
    # This process still has it open: only a forced reset removes it.
    done = subprocess.run(cmd + ["reset", "--force", name], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # This process lives on with the resource open: it attaches to a new
    # segment (its background thread does, without waiting for a request),
    # where the dead holder is not.
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run(cmd + ["status", "--json"], capture_output=True, text=True)
        mine = [r for r in json.loads(out.stdout) if r["name"] == name]
        if mine and [p["pid"] for p in mine[0]["processes"]] == [os.getpid()]:
            break
        assert time.monotonic() < deadline, mine
        time.sleep(0.1)
    assert mine[0]["in_use"] == 0


def test_status_shows_the_reserves_and_what_each_class_holds(name: str) -> None:
    # An operator asks which worker holds the reserved slots.
    db = Resource(4, name=name, scope="host", reserve={Priority.CRITICAL_PLUS: 1})
    code = (
        "import asyncio, sys\n"
        "from fastapi_concurrency_limiter import Limiter, Priority, Resource\n"
        f"r = Resource(4, name={name!r}, scope='host', reserve={{Priority.CRITICAL_PLUS: 1}})\n"
        "limiter = Limiter(timeout=1, resources=[r])\n"
        "async def hold(priority, held, done):\n"
        "    async with limiter.acquire([r], priority=priority):\n"
        "        held.set()\n"
        "        await done.wait()\n"
        "async def main():\n"
        "    done = asyncio.Event()\n"
        "    held = [asyncio.Event() for _ in range(3)]\n"
        "    classes = [Priority.CRITICAL_PLUS, Priority.SHEDDABLE, Priority.SHEDDABLE]\n"
        "    tasks = [asyncio.create_task(hold(c, h, done)) for c, h in zip(classes, held)]\n"
        "    for h in held:\n"
        "        await h.wait()\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.to_thread(sys.stdin.readline)\n"
        "    done.set()\n"
        "    await asyncio.gather(*tasks)\n"
        "asyncio.run(main())\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert other.stdout is not None and other.stdin is not None
    cmd = [sys.executable, "-m", "fastapi_concurrency_limiter", "status"]
    try:
        assert other.stdout.readline().strip() == "ready"
        out = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        (mine,) = [r for r in json.loads(out.stdout) if r["name"] == name]
        assert mine["reserve"] == {"critical_plus": 1}
        (theirs,) = [p for p in mine["processes"] if p["pid"] == other.pid]
        assert theirs["held"] == 3
        assert theirs["held_by_class"] == {
            "sheddable": 2, "sheddable_plus": 0, "critical": 0, "critical_plus": 1
        }
        text = subprocess.run(cmd, capture_output=True, text=True).stdout
        assert f"{name}: capacity 4, reserve critical_plus 1, in use 3" in text
        assert f"pid {other.pid}: held 3 (critical_plus 1, sheddable 2), waiting 0" in text
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.wait(timeout=30) == 0
    finally:
        other.kill()
        other.wait()
    assert db.in_use == 0


# --- real multi-worker servers ---------------------------------------------------


@contextmanager
def server(argv: list[str], env: dict[str, str], port: int) -> Iterator[str]:
    proc = subprocess.Popen(argv, cwd=HERE, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/ready", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.05)
        time.sleep(0.5)  # let every worker come up
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _servers(port: int) -> dict[str, list[str]]:
    py = sys.executable
    gunicorn = [py, "-m", "gunicorn", "-w", "3", "-k", "uvicorn.workers.UvicornWorker"]
    bind = ["-b", f"127.0.0.1:{port}", "--log-level", "warning", "host_app:app"]
    return {
        "uvicorn": [py, "-m", "uvicorn", "host_app:app", "--workers", "3", "--host",
                    "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        "gunicorn": gunicorn + bind,
        "gunicorn-preload": gunicorn + ["--preload"] + bind,
    }


async def _hammer(url: str, requests: int) -> set[int]:
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        rs = await asyncio.gather(*[client.get("/work") for _ in range(requests)])
    assert [r.status_code for r in rs] == [200] * requests
    return {r.json()["pid"] for r in rs}


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn", "gunicorn-preload"])
@pytest.mark.parametrize("scope", ["host", "process"])
async def test_workers_share_one_limit(kind: str, scope: str, name: str, tmp_path: Path) -> None:
    capacity = 2
    counter = tmp_path / "counter"
    counter.write_bytes(struct.pack("qq", 0, 0))
    env = {
        **os.environ,
        "FCL_TEST_SCOPE": scope,
        "FCL_TEST_NAME": name,
        "FCL_TEST_CAPACITY": str(capacity),
        "FCL_TEST_COUNTER": str(counter),
    }
    port = _free_port()
    with server(_servers(port)[kind], env, port) as url:
        pids: set[int] = set()
        for _ in range(3):
            pids |= await _hammer(url, 60)
    running, peak = struct.unpack("qq", counter.read_bytes())
    assert running == 0
    assert len(pids) > 1, "the requests should have been served by several workers"
    if scope == "host":
        assert peak == capacity
    else:
        # Per process, each worker admits `capacity`: the reason host scope exists.
        assert peak > capacity


async def test_a_critical_plus_request_is_served_before_sheddable_ones_of_another_worker(
    name: str, tmp_path: Path
) -> None:
    """Two uvicorn processes share one host slot: SHEDDABLE requests queued
    in one, then a CRITICAL_PLUS request in the other; when the slot is
    freed it goes to CRITICAL_PLUS first, then to the SHEDDABLE ones in
    arrival order."""
    env = {**os.environ, "FCL_TEST_NAME": name, "FCL_TEST_DIR": str(tmp_path)}
    served = tmp_path / "served"

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "host_prio_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]  # fmt: skip

    async def until(what: str, done: Callable[[], Awaitable[bool]]) -> None:
        deadline = time.monotonic() + 20
        while not await done():
            assert time.monotonic() < deadline, f"never {what}"
            await asyncio.sleep(0.01)

    port_a, port_b = _free_port(), _free_port()
    with server(argv(port_a), env, port_a) as a, server(argv(port_b), env, port_b) as b:
        async with httpx.AsyncClient(timeout=30) as client:

            async def waiting(n: int) -> bool:
                return bool((await client.get(a + "/waiting")).json()["waiting"] == n)

            async def holding() -> bool:
                return served.exists() and "hold" in served.read_text().split()

            hold = asyncio.ensure_future(client.get(a + "/job/hold"))
            await until("held", holding)
            low = []
            for i in range(3):
                low.append(asyncio.ensure_future(
                    client.get(f"{b}/job/low{i}", headers={"x-priority": "sheddable"})
                ))  # fmt: skip
                await until(f"{i + 1} waiting", lambda n=i + 1: waiting(n))
            top = asyncio.ensure_future(
                client.get(a + "/job/top", headers={"x-priority": "critical-plus"})
            )
            await until("4 waiting", lambda: waiting(4))
            (tmp_path / "release").touch()
            responses = await asyncio.gather(hold, *low, top)
    assert [r.status_code for r in responses] == [200] * 5
    assert served.read_text().split() == ["hold", "top", "low0", "low1", "low2"]
    pids = [r.json()["pid"] for r in responses]
    assert pids[-1] != pids[1], "the critical_plus request ran in the other worker"


async def test_a_host_resource_keeps_a_reserve_and_counts_per_class(name: str) -> None:
    """A host resource takes a reserve (ValueError before): a critical
    request may not take the slot kept for critical_plus, a critical_plus
    one takes it at once; statistics().priorities splits the figures by
    class (across processes: tests/cpp/host_resource_test.cc)."""
    db = Resource(2, name=name, scope="host", reserve={Priority.CRITICAL_PLUS: 1})
    assert db.reserve == {Priority.CRITICAL_PLUS: 1}
    with pytest.raises(ValueError, match=r"reserve.*the same in every process"):
        Resource(2, name=name, scope="host", reserve={Priority.CRITICAL: 1})
    limiter = Limiter(timeout=0.05, resources=[db])
    done = asyncio.Event()

    async def hold(priority: str, held: asyncio.Event) -> None:
        async with limiter.acquire([db], priority=priority):
            held.set()
            await done.wait()

    low_held, top_held = asyncio.Event(), asyncio.Event()
    low = asyncio.ensure_future(hold("sheddable", low_held))
    await low_held.wait()
    with pytest.raises(ServerBusy):  # one slot free, but kept for critical_plus
        async with limiter.acquire([db], priority="critical"):
            pass
    top = asyncio.ensure_future(hold("critical_plus", top_held))
    await top_held.wait()
    s = db.statistics()
    assert s.in_use == 2
    assert s.priorities["sheddable"].in_use == 1
    assert s.priorities["critical_plus"].in_use == 1
    assert s.priorities["critical"].in_use == 0
    assert s.reserve == {"critical_plus": 1}
    done.set()
    await asyncio.gather(low, top)
    s = db.statistics()
    assert s.in_use == 0
    assert {label: c.acquired_total for label, c in s.priorities.items()} == {
        "sheddable": 1, "sheddable_plus": 0, "critical": 0, "critical_plus": 1,
    }  # fmt: skip
    assert s.priorities["critical"].rejected_total["timeout"] == 1
    assert s.rejected_total["timeout"] == 1


def test_per_class_series_stay_once_another_worker_used_a_class(name: str) -> None:
    # This worker never serves a sheddable request; another one holds a
    # sheddable slot for a while. The per-class series appear while it does
    # and stay after (a series that vanishes between scrapes reads as stale).
    from prometheus_client import CollectorRegistry, generate_latest

    from fastapi_concurrency_limiter import Limiter
    from fastapi_concurrency_limiter.prometheus import register

    db = Resource(2, name=name, scope="host")
    limiter = Limiter(timeout=1, resources=[db])
    registry = CollectorRegistry()
    register(limiter, registry)
    code = (
        "import asyncio, sys\n"
        "from fastapi_concurrency_limiter import Limiter, Priority, Resource\n"
        f"r = Resource(2, name={name!r}, scope='host')\n"
        "limiter = Limiter(timeout=1, resources=[r])\n"
        "async def main():\n"
        "    async with limiter.acquire([r], priority=Priority.SHEDDABLE):\n"
        "        print('ready', flush=True)\n"
        "        sys.stdin.readline()\n"
        "asyncio.run(main())\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert other.stdout is not None and other.stdin is not None

    def sheddable_in_use() -> str | None:
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("concurrency_limiter_priority_in_use{") and (
                f'resource="{name}"' in line and 'priority="sheddable"' in line
            ):
                return line.rsplit(" ", 1)[1]
        return None

    try:
        assert other.stdout.readline().strip() == "ready"
        assert sheddable_in_use() == "1.0"
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.wait(timeout=30) == 0
    finally:
        other.kill()
        other.wait()
    assert db.in_use == 0
    assert sheddable_in_use() == "0.0"
