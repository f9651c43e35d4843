"""Host scope under real operations: redeploys, reloads, operators' resets,
processes out of descriptors, hostile neighbours, and all of it at once.

Every test runs real processes (agents driven over stdin, uvicorn and
gunicorn servers) and kills each of them when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import _free_port

pytestmark = pytest.mark.anyio
HERE = Path(__file__).parent
UID = os.getuid()
CLI = [sys.executable, "-m", "fastapi_concurrency_limiter"]
# Two other users for the hostile-neighbour tests (run as root only).
NOBODY = 65534
SQUATTER = 65533
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")

# The chaos test's load time, over both of its capacities; the whole test
# (start-ups and the restart included) stays under about 40 s.
CHAOS_LOAD_SECONDS = 20.0


def segment_dir(uid: int = UID) -> Path:
    """Where a user's host segments live unless FCL_HOST_DIR says otherwise."""
    return Path(f"/dev/shm/fcl-host.{uid}")


def flat_path(name: str, uid: int = UID) -> Path:
    """Where earlier versions kept a segment: directly in /dev/shm."""
    return Path(f"/dev/shm/fcl-host.{uid}.{name}")


def unique(test: str) -> str:
    return f"ops{os.getpid()}-{test}-{time.monotonic_ns() % 10**9}"


@pytest.fixture
def name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh host resource name, removed afterwards (its shared segment
    outlives the processes that used it)."""
    n = unique(request.node.name[:20].replace("[", "-").replace("]", ""))
    yield n
    (segment_dir() / n).unlink(missing_ok=True)
    flat_path(n).unlink(missing_ok=True)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A segment directory of this test's own, for FCL_HOST_DIR."""
    d = Path(tempfile.mkdtemp(prefix="fcl-ops-test-", dir="/dev/shm"))
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCL_")}
    env.update(extra)
    return env


# Prepended to the code of a `python -c` that runs as another user (argv[1]
# is the uid): it imports what it needs, then drops root. The interpreter
# itself may be one that other users may not run or read (a root-owned
# pyenv, say), so it starts as root; the library computes nothing before.
_AS_USER = r"""
import argparse, asyncio, contextlib, errno, json, logging, os, stat, sys, traceback
import fastapi_concurrency_limiter, fastapi_concurrency_limiter.__main__
uid = int(sys.argv.pop(1))
os.chdir("/")
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
"""


def python(code: str, *args: str, env: dict[str, str] | None = None,
           user: int | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a new interpreter, as `user` if given."""
    argv = [sys.executable, "-c", code, *args]
    if user is not None:
        argv = [sys.executable, "-c", _AS_USER + code, str(user), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=env if env is not None else base_env())


def cli(*args: str, env: dict[str, str] | None = None,
        user: int | None = None) -> subprocess.CompletedProcess[str]:
    if user is None:
        return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60,
                              env=env if env is not None else base_env())
    main = "sys.exit(fastapi_concurrency_limiter.__main__.main(sys.argv[1:]))\n"
    return python(main, *args, env=env, user=user)


def status_json(env: dict[str, str] | None = None, user: int | None = None) -> list[dict[str, Any]]:
    out = cli("status", "--json", env=env, user=user)
    assert out.returncode == 0, f"`status --json` failed: {out.stderr[-1500:]}"
    return json.loads(out.stdout)


def entry(resources: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in resources if r["name"] == name), None)


def process_of(resource: dict[str, Any], pid: int) -> dict[str, Any] | None:
    """What status says of process `pid`: pid, held, waiting, alive."""
    for p in resource["processes"]:
        if p["pid"] == pid:
            return {k: p[k] for k in ("pid", "held", "waiting", "alive")}
    return None


def status_in_process() -> list[dict[str, Any]]:
    """`status --json`, run in this process: sampling every 100 ms with a new
    interpreter each time would take a core of this 2-core budget."""
    from fastapi_concurrency_limiter.__main__ import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["status", "--json"])
    assert rc == 0
    return json.loads(buf.getvalue())


# --- agents: processes that hold a host resource open and obey commands -------

# argv: name capacity. Opens the resource, prints "ready", then one reply
# line per command on stdin:
#   acquire T  -> "granted" | "busy" (not within T seconds) | "error ..."
#   release    -> "released" (the latest slot acquired)
#   exhaust    -> "exhausted N": opens descriptors until EMFILE and keeps them
_AGENT = r"""
import asyncio, errno, os, resource, sys
from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy

name, capacity = sys.argv[1], int(sys.argv[2])
db = Resource(capacity, name=name, scope="host")
limiter = Limiter(timeout=None, resources=[db])
holds = []
fds = []

async def hold(timeout, granted, leave):
    try:
        async with limiter.acquire([db], timeout=timeout):
            granted.set_result(None)
            await leave.wait()
    except BaseException as e:
        if granted.done():
            raise
        granted.set_exception(e)

async def command(word, args):
    if word == "acquire":
        granted = asyncio.get_running_loop().create_future()
        leave = asyncio.Event()
        task = asyncio.create_task(hold(float(args[0]), granted, leave))
        await granted
        holds.append((task, leave))
        return "granted"
    if word == "release":
        task, leave = holds.pop()
        leave.set()
        await task
        return "released"
    if word == "exhaust":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        try:
            while True:
                fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
        return f"exhausted {len(fds)}"
    return f"error unknown command {word}"

async def main():
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        if not line.split():
            continue
        word, *args = line.split()
        try:
            reply = await command(word, args)
        except ServerBusy:
            reply = "busy"
        except Exception as e:
            reply = f"error {type(e).__name__}: {e}".replace("\n", " ")
        print(reply, flush=True)

asyncio.run(main())
"""


class Agent:
    def __init__(self, name: str, capacity: int, env: dict[str, str] | None = None) -> None:
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _AGENT, name, str(capacity)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
            env=env if env is not None else base_env(),
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next reply; None at end of output or after `timeout` s."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_ready(self, timeout: float = 30) -> None:
        line = self.next_line(timeout)
        assert line == "ready", f"agent {self.pid} did not start ({line!r}): {self.stderr()}"

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str, timeout: float = 30) -> str:
        self.send(command)
        line = self.next_line(timeout)
        assert line is not None, f"agent {self.pid}: no reply to {command!r}: {self.stderr()}"
        return line

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()[-2000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self._err.close()


@pytest.fixture
def agents() -> Iterator[Callable[..., Agent]]:
    """Starts agents (once they have opened the resource); kills them all at
    the end of the test."""
    started: list[Agent] = []

    def start(name: str, capacity: int, env: dict[str, str] | None = None) -> Agent:
        a = Agent(name, capacity, env)
        started.append(a)
        a.wait_ready()
        return a

    yield start
    for a in started:
        a.kill()


# Opens the resource once (argv: name capacity) and reports how that went.
_OPEN_ONCE = r"""
import sys
from fastapi_concurrency_limiter import Resource
try:
    Resource(int(sys.argv[2]), name=sys.argv[1], scope="host")
except Exception as e:
    print(f"refused {type(e).__name__}: {e}".replace("\n", " "), flush=True)
    sys.exit(1)
print("opened", flush=True)
"""


def open_once(name: str, capacity: int = 1, env: dict[str, str] | None = None,
              user: int | None = None) -> subprocess.CompletedProcess[str]:
    return python(_OPEN_ONCE, name, str(capacity), env=env, user=user)


# --- servers ------------------------------------------------------------------------


class Server:
    """A uvicorn or gunicorn master in its own process group, its output in a
    file (a pipe nobody reads could fill up and stall it)."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def failures(self) -> str:
        """The lines of its output that tell why a worker failed."""
        lines = [line for line in self.output().splitlines()
                 if re.search(r"Error|Traceback|failed|died", line)]
        return "\n".join(lines[-6:]) or self.output()[-1500:]

    def wait_ready(self, timeout: float = 40) -> bool:
        """True once it answers; False if it exits, or a worker fails (a
        supervisor may respawn failing workers for a long time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if "Traceback" in self.output():
                time.sleep(1)  # the rest of the report
                return False
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=25)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # Workers left behind by a master that died first.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def uvicorn_argv(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "host_ops_app:app", "--workers", str(workers),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]


def children(pid: int) -> set[int]:
    """The live child processes of `pid`."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            text = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and state not in "ZX":
            out.add(int(d))
    return out


async def worker_capacities(url: str, want: int | set[int],
                            timeout: float = 20) -> dict[int, int]:
    """pid -> capacity, from /info, until `want` workers (a count, or those
    pids) have answered or `timeout` s have passed."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout

    def done() -> bool:
        return len(seen) >= want if isinstance(want, int) else want <= seen.keys()

    async def info(client: httpx.AsyncClient, delay: float) -> httpx.Response:
        await asyncio.sleep(delay)
        return await client.get("/info")

    # New connections, staggered: each lands on a worker whose /info is not
    # blocking its event loop at that moment.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        while not done() and time.monotonic() < deadline:
            rs = await asyncio.gather(*[info(client, 0.04 * i) for i in range(8)],
                                      return_exceptions=True)
            for r in rs:
                if isinstance(r, httpx.Response) and r.status_code == 200:
                    seen[r.json()["pid"]] = r.json()["capacity"]
    return seen


def new_counter(tmp_path: Path) -> Path:
    counter = tmp_path / "counter"
    counter.write_bytes(struct.pack("qq", 0, 0))
    return counter


def restart_peak(counter: Path) -> None:
    """The peak counts from now on (as host_ops_app.bump, under the flock)."""
    with open(counter, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        running, _ = struct.unpack("qq", f.read(16))
        f.seek(0)
        f.write(struct.pack("qq", running, running))


def peak_of(counter: Path) -> int:
    return struct.unpack("qq", counter.read_bytes())[1]


class Load:
    """`clients` loops of GET `path`, each request on a new connection (a kept-
    alive one may be closed by a worker that a reload retires while the
    client reuses it: a race of HTTP itself, not of the limiter)."""

    def __init__(self, url: str, clients: int, path: str = "/work") -> None:
        self._client = httpx.AsyncClient(
            base_url=url, timeout=60,
            limits=httpx.Limits(max_connections=clients, max_keepalive_connections=0))
        self._clients = clients
        self._path = path
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.retried = 0
        self.slowest = 0.0

    async def _get(self) -> httpx.Response:
        try:
            return await self._client.get(self._path)
        except httpx.RemoteProtocolError as e:
            if "without sending a response" not in str(e):
                raise
        except httpx.ReadError:
            pass
        # A worker that a reload retires closes the connections it accepted
        # but has not read a request from yet (uvicorn's shutdown): the
        # client sees the connection end without a response, or reset
        # (ReadError, depending on the timing and the h11/httpx versions).
        # That request never ran, and a client retries it (an idempotent GET).
        self.retried += 1
        return await self._client.get(self._path)

    async def _loop(self) -> None:
        for _ in range(100_000):
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                r = await self._get()
            except httpx.HTTPError as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.05)
                continue
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.statuses[r.status_code] += 1
            if r.status_code not in (200, 503):
                self.failures.append(f"HTTP {r.status_code}: {r.text[:200]}")

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self._clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()


# --- where segments live ---------------------------------------------------------


def test_segments_live_in_a_private_per_user_directory(name: str, agents: Any) -> None:
    agents(name, 1)
    d = segment_dir()
    found = sorted(p.name for p in Path("/dev/shm").iterdir() if name in p.name)
    assert (d / name).is_file(), (
        f"the segment is not in the per-user directory {d}/ (found in /dev/shm: {found})")
    st = d.lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == UID
    assert stat.S_IMODE(st.st_mode) == 0o700, f"{d} has mode {oct(stat.S_IMODE(st.st_mode))}"
    assert not flat_path(name).exists()


def test_fcl_host_dir_overrides_the_directory(
    name: str, private_dir: Path, agents: Any
) -> None:
    env = base_env(FCL_HOST_DIR=str(private_dir))
    agents(name, 1, env=env)
    assert (private_dir / name).is_file(), (
        f"FCL_HOST_DIR={private_dir} is ignored: it holds {os.listdir(private_dir)}, "
        f"flat segment in /dev/shm: {flat_path(name).exists()}")
    assert not (segment_dir() / name).exists() and not flat_path(name).exists()
    assert entry(status_json(env), name) is not None
    assert entry(status_json(), name) is None


# --- redeploy with another configuration -------------------------------------------


async def _redeploy(name: str, tmp_path: Path, first: int, second: int) -> None:
    """Runs uvicorn --workers 2 with capacity `first`, stops it, then runs it
    with capacity `second` and checks it serves."""
    port = _free_port()

    def env(capacity: int) -> dict[str, str]:
        return base_env(FCL_TEST_NAME=name, FCL_TEST_CAPACITY=str(capacity))

    before = Server(uvicorn_argv(port, 2), env(first), port, tmp_path / "first.log")
    try:
        assert before.wait_ready(), f"the first deployment did not start: {before.failures()}"
        assert set((await worker_capacities(before.url, 2)).values()) == {first}
    finally:
        before.stop()

    after = Server(uvicorn_argv(port, 2), env(second), port, tmp_path / "second.log")
    try:
        assert after.wait_ready(), (
            f"redeployed with capacity {first} -> {second}, the workers do not start:\n"
            f"{after.failures()}")
        seen = await worker_capacities(after.url, 2)
        assert len(seen) == 2, f"only workers {seen} serve after the redeploy"
        assert set(seen.values()) == {second}, f"capacity per worker: {seen}"
        async with httpx.AsyncClient(base_url=after.url, timeout=30) as client:
            rs = await asyncio.gather(*[client.get("/work") for _ in range(20)])
        assert [r.status_code for r in rs] == [200] * 20
        seen.update(await worker_capacities(after.url, 2))
        # A worker that failed and was respawned would show up as a new pid.
        assert len(seen) == 2, f"workers were respawned: pids {sorted(seen)}"
        out = after.output()
        assert "ValueError" not in out and "died" not in out, after.failures()
        mine = entry(status_json(), name)
        assert mine is not None and mine["capacity"] == second
    finally:
        after.stop()


async def test_a_redeploy_with_another_capacity_replaces_the_unused_segment(
    name: str, tmp_path: Path
) -> None:
    await _redeploy(name, tmp_path, 3, 4)


# --- graceful reload (gunicorn HUP) with a changed capacity ------------------------


async def _reload_under_load(name: str, tmp_path: Path, steps: list[int]) -> None:
    """gunicorn -w 2 at capacity steps[0], then a HUP reload to each next
    capacity, under a continuous load of 8 clients."""
    capacity_file = tmp_path / "capacity"
    capacity_file.write_text(str(steps[0]))
    counter = new_counter(tmp_path)
    env = base_env(FCL_TEST_NAME=name, FCL_TEST_CAPACITY_FILE=str(capacity_file),
                   FCL_TEST_COUNTER=str(counter), FCL_TEST_TIMEOUT="10")
    port = _free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker",
            "-w", "2", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "20",
            "--log-level", "info", "host_ops_app:app"]
    server = Server(argv, env, port, tmp_path / "gunicorn.log")
    master = server.proc.pid

    async def settle(capacity: int, old: set[int]) -> set[int]:
        """Waits until the master's workers are 2 new ones that all report
        `capacity`; returns their pids."""
        deadline = time.monotonic() + 40
        reported: dict[int, int] = {}
        workers: set[int] = set()
        while time.monotonic() < deadline:
            out = server.output()
            assert "Worker failed to boot" not in out and "Traceback" not in out, (
                f"a worker failed to boot at capacity {capacity}:\n{server.failures()}")
            assert server.proc.poll() is None, f"gunicorn exited:\n{server.failures()}"
            workers = children(master)
            if len(workers) == 2 and not workers & old:
                reported = await worker_capacities(server.url, workers, timeout=5)
                if all(reported.get(p) == capacity for p in workers):
                    return workers
            await asyncio.sleep(0.2)
        raise AssertionError(f"no reload to capacity {capacity}: workers {workers} (before: "
                             f"{old}) report {reported}")

    try:
        assert server.wait_ready(), f"gunicorn did not start:\n{server.failures()}"
        workers = await settle(steps[0], set())
        load = Load(server.url, 8)
        load.start()
        try:
            for before, after in zip(steps, steps[1:], strict=False):
                capacity_file.write_text(str(after))
                os.kill(master, signal.SIGHUP)
                workers = await settle(after, workers)
                # Requests granted before the change end; from then on only
                # the new capacity may be in use.
                await asyncio.sleep(1.0)
                restart_peak(counter)
                await asyncio.sleep(2.0)
                peak = peak_of(counter)
                assert peak <= after, (
                    f"after the reload {before} -> {after}, {peak} requests ran at once")
                if after > before:
                    assert peak > before, (
                        f"after the reload {before} -> {after}, at most {peak} requests ran "
                        f"at once: the raised capacity is not in force")
        finally:
            await load.stop()
        assert not load.failures, (
            f"{len(load.failures)} failed requests during the reloads, e.g. "
            f"{load.failures[:3]} (statuses {dict(load.statuses)})")
        assert load.statuses[200] > 0
        assert "Worker failed to boot" not in server.output(), server.failures()
    finally:
        server.stop()


async def test_a_gunicorn_reload_changes_the_capacity_under_load(
    name: str, tmp_path: Path
) -> None:
    await _reload_under_load(name, tmp_path, [3, 5, 3])


# --- reset of a live idle process ---------------------------------------------------


def test_reset_refuses_while_an_idle_process_has_it_open_and_force_reattaches(
    name: str, agents: Any
) -> None:
    idle = agents(name, 2)  # opened, never acquired
    mine = entry(status_json(), name)
    assert mine is not None
    assert process_of(mine, idle.pid) == {"pid": idle.pid, "held": 0, "waiting": 0,
                                          "alive": True}, (
        f"status does not list pid {idle.pid}, which has the resource open: "
        f"{mine['processes']}")

    refused = cli("reset", name)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, f"reset removed a resource a live process has open: {said}"
    assert "in use" in said and str(idle.pid) in said, said

    segment = segment_dir() / name
    before = segment.stat().st_ino
    forced = cli("reset", "--force", name)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    # Removed: the live process attaches to a new one (its background
    # thread may already have made it), never to the removed file.
    assert not segment.exists() or segment.stat().st_ino != before

    reply = idle.ask("acquire 5")
    assert reply == "granted", f"after `reset --force`, the live process's acquire: {reply}"
    mine = entry(status_json(), name)
    assert mine is not None and mine["capacity"] == 2
    assert process_of(mine, idle.pid) == {"pid": idle.pid, "held": 1, "waiting": 0,
                                          "alive": True}, mine
    assert idle.ask("release") == "released"


# --- processes that other processes must not judge dead ------------------------------


def test_a_process_out_of_descriptors_declares_nobody_dead(name: str, agents: Any) -> None:
    a = agents(name, 1)
    assert a.ask("acquire 10") == "granted"
    b = agents(name, 1)
    # An attempt registers it (its sweeper runs from then on at the latest).
    assert b.ask("acquire 0") == "busy"
    assert b.ask("exhaust").startswith("exhausted"), b.stderr()
    time.sleep(1.5)  # several sweeps of b's background thread
    assert b.proc.poll() is None, b.stderr()
    c = agents(name, 1)
    reply = c.ask("acquire 0.2")
    assert reply == "busy", (
        f"a second slot of a capacity-1 resource was granted ({reply}) while pid {a.pid} "
        f"holds the only one: the process out of descriptors reclaimed it")
    assert a.ask("release") == "released"
    assert c.ask("acquire 10") == "granted"


# The slot is taken by a second thread; then the main thread exits alone
# (the thread-group leader shows as a zombie while the process lives on).
_MAIN_THREAD_EXITS = r"""
import asyncio, ctypes, sys, threading
from fastapi_concurrency_limiter import Limiter, Resource

held = threading.Event()
failure = []

def serve():
    async def main():
        db = Resource(1, name=sys.argv[1], scope="host")
        async with Limiter(timeout=10, resources=[db]).acquire([db]):
            held.set()
            await asyncio.sleep(3600)
    try:
        asyncio.run(main())
    except BaseException as e:
        failure.append(e)
        held.set()

threading.Thread(target=serve).start()
held.wait(60)
if failure:
    raise failure[0]
print("held", flush=True)
# ctypes lets go of the GIL before the call, so the other thread runs on.
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_exited_keeps_its_slot(name: str, agents: Any) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _MAIN_THREAD_EXITS, name],
                              stdout=subprocess.PIPE, text=True, env=base_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        deadline = time.monotonic() + 10
        while Path(f"/proc/{holder.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the main thread did not exit"
            time.sleep(0.05)
        time.sleep(1.5)  # several sweeps of its own background thread
        assert holder.poll() is None and len(os.listdir(f"/proc/{holder.pid}/task")) > 1
        c = agents(name, 1)
        reply = c.ask("acquire 0.2")
        assert reply == "busy", (
            f"a second slot of a capacity-1 resource was granted ({reply}) while pid "
            f"{holder.pid}, whose main thread exited, still holds the only one")
        mine = entry(status_json(), name)
        assert mine is not None
        assert process_of(mine, holder.pid) == {"pid": holder.pid, "held": 1, "waiting": 0,
                                                "alive": True}, mine
    finally:
        holder.kill()
        holder.wait()


# --- hostile neighbours ---------------------------------------------------------------

_FIX_HINT = re.compile(r"FCL_HOST_DIR|remove|rm |delete|chown", re.IGNORECASE)


@needs_root
def test_a_segment_directory_of_another_user_is_refused_naming_its_owner(
    name: str, private_dir: Path
) -> None:
    os.chown(private_dir, NOBODY, NOBODY)
    out = open_once(name, env=base_env(FCL_HOST_DIR=str(private_dir)))
    said = out.stdout + out.stderr
    assert out.returncode != 0, f"opened a resource in {private_dir}, owned by uid {NOBODY}"
    assert str(NOBODY) in said and str(private_dir) in said, said
    assert _FIX_HINT.search(said), f"no hint how to fix it: {said}"


@contextlib.contextmanager
def fresh_user_dir(uid: int, owner: int) -> Iterator[Path]:
    """/dev/shm/fcl-host.<uid>, made by `owner`; removed afterwards, with
    whatever `uid` left in /dev/shm under the flat layout of earlier versions."""
    d = segment_dir(uid)
    if d.exists() or d.is_symlink():
        pytest.skip(f"{d} exists already (not this test's to remove)")
    before = set(os.listdir(b"/dev/shm"))
    d.mkdir(mode=0o700)
    os.chown(d, owner, owner)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        flat = f"fcl-host.{uid}.".encode()
        for f in set(os.listdir(b"/dev/shm")) - before:
            if f.startswith(flat):
                os.unlink(b"/dev/shm/" + f)


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


def plant(path: bytes, owner: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.fchown(fd, owner, owner)
    os.close(fd)


@needs_root
def test_a_squatted_name_fails_naming_the_owner_and_reset_never_claims_removal(
    name: str,
) -> None:
    # The victim is NOBODY. Another user got there first, under the layout
    # of this version (the directory) and the flat one of earlier versions.
    with fresh_user_dir(NOBODY, owner=SQUATTER) as d:
        plant(bytes(d / name), SQUATTER)
        plant(bytes(flat_path(name, NOBODY)), SQUATTER)
        out = open_once(name, user=NOBODY)
        said = out.stdout + out.stderr
        assert out.returncode != 0
        assert str(SQUATTER) in said, f"the error does not name the squatter's uid: {said}"
        assert _FIX_HINT.search(said), f"no hint how to fix it: {said}"

        reset = cli("reset", name, user=NOBODY)
        said = reset.stdout + reset.stderr
        assert reset.returncode != 0 and "removed" not in reset.stdout, (
            f"reset claims success (exit {reset.returncode}: {said.strip()}) while the "
            f"files are still there")
        assert (d / name).exists() and flat_path(name, NOBODY).exists()


@needs_root
def test_status_lists_only_well_named_files_of_this_user(name: str) -> None:
    # Run as NOBODY, whose segment directory nobody else uses.
    with fresh_user_dir(NOBODY, owner=NOBODY) as d:
        out = open_once(name, user=NOBODY)
        assert out.returncode == 0, out.stdout + out.stderr
        token = name.encode()
        # Planted in the directory and, for a status that looks there, under
        # the flat layout of earlier versions.
        for where in [bytes(d) + b"/", f"/dev/shm/fcl-host.{NOBODY}.".encode()]:
            plant(where + b"undecodable\xff\xfe-" + token, NOBODY)
            plant(where + b"x\n  pid 1: held 9, waiting 0 planted-" + token, NOBODY)
            plant(where + token + b"-of-root", 0)
        text = cli("status", user=NOBODY)
        assert text.returncode == 0, f"`status` crashed: {last_line(text.stderr)}"
        js = cli("status", "--json", user=NOBODY)
        assert js.returncode == 0, f"`status --json` crashed: {last_line(js.stderr)}"
        assert [r["name"] for r in json.loads(js.stdout)] == [name]
        assert "planted" not in text.stdout and "of-root" not in text.stdout, text.stdout
        assert text.stdout.startswith(f"{name}: capacity 1"), text.stdout


def test_status_says_held_in_text_as_in_json(name: str, agents: Any) -> None:
    holder = agents(name, 2)
    assert holder.ask("acquire 10") == "granted"
    mine = entry(status_json(), name)
    assert mine is not None
    assert process_of(mine, holder.pid) == {"pid": holder.pid, "held": 1, "waiting": 0,
                                            "alive": True}, mine
    text = cli("status").stdout
    line = next((x for x in text.splitlines() if f"pid {holder.pid}:" in x), text)
    assert f"pid {holder.pid}: held 1, waiting 0" in text, f"status text says: {line.strip()}"


# --- everything at once ---------------------------------------------------------------


class Killer:
    """Starts agents one after another and SIGKILLs each at a random point:
    starting (maybe creating the segment), holding a slot, or waiting."""

    def __init__(self, name: str, capacity: int, rng: random.Random) -> None:
        self._name = name
        self._capacity = capacity
        self._rng = rng
        self._stop = threading.Event()
        self._current: Agent | None = None
        self.kills: Counter[str] = Counter()
        self.errors: list[str] = []  # of agents that failed on their own
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = self._rng
        while not self._stop.is_set():
            agent = self._current = Agent(self._name, self._capacity)
            try:
                if agent.next_line(rng.uniform(0.2, 1.5)) == "ready":
                    agent.send("acquire 5")
                    reply = agent.next_line(rng.uniform(0.0, 0.6))
                    if reply is not None and reply != "granted":
                        self.errors.append(reply)
                    self.kills["holding" if reply == "granted" else "waiting"] += 1
                else:
                    self.kills["starting"] += 1
                if agent.proc.poll() is not None:
                    self.errors.append(last_line(agent.stderr()))
            finally:
                agent.kill()
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._current is not None:
            self._current.kill()


async def test_chaos_restart_exhaustion_and_kills(
    name: str, tmp_path: Path, agents: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sampler runs `status` in this process: the default directory.
    monkeypatch.delenv("FCL_HOST_DIR", raising=False)
    await _chaos(name, tmp_path, agents, (3, 4), exhaust=True)


async def _chaos(name: str, tmp_path: Path, agents: Any, capacities: tuple[int, int],
                 exhaust: bool) -> None:
    """uvicorn --workers 3 under load at capacities[0], restarted at
    capacities[1], while agents are killed at random points and (if
    `exhaust`) one agent has run out of descriptors."""
    first, second = capacities
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    counter = new_counter(tmp_path)
    limiter_timeout = 2.0
    port = _free_port()

    def start(capacity: int) -> Server:
        env = base_env(FCL_TEST_NAME=name, FCL_TEST_CAPACITY=str(capacity),
                       FCL_TEST_COUNTER=str(counter), FCL_TEST_TIMEOUT=str(limiter_timeout))
        return Server(uvicorn_argv(port, 3), env, port, tmp_path / f"uvicorn-{capacity}.log")

    def check(capacity: int) -> None:
        mine = entry(status_in_process(), name)
        assert mine is not None, f"(seed {seed}) status does not list {name}"
        alive_held = sum(p["held"] for p in mine["processes"] if p["alive"])
        assert mine["capacity"] == capacity, f"(seed {seed}) capacity in force: {mine}"
        assert mine["in_use"] <= capacity and alive_held <= capacity, (
            f"(seed {seed}) more slots in use than capacity {capacity}: {mine}")

    async def phase(server: Server, capacity: int, seconds: float) -> None:
        killer = Killer(name, capacity, rng)
        load = Load(server.url, 6)
        restart_peak(counter)
        load.start()
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                check(capacity)
                await asyncio.sleep(0.1)
        finally:
            await load.stop()
            killer.stop()
        peak = peak_of(counter)
        assert peak <= capacity, (
            f"(seed {seed}) {peak} requests ran at once at capacity {capacity} "
            f"(agents killed: {dict(killer.kills)})")
        assert not load.failures, f"(seed {seed}) failed requests: {load.failures[:3]}"
        assert not killer.errors, f"(seed {seed}) agents failed: {killer.errors[:3]}"
        assert load.slowest <= limiter_timeout + 2, (
            f"(seed {seed}) a request took {load.slowest:.1f} s with a limiter timeout of "
            f"{limiter_timeout} s")
        assert load.statuses[200] > 0, dict(load.statuses)

    # Openers killed at random points of their start-up, the first of them
    # maybe while it creates the segment: what they leave must not stop
    # the workers from starting.
    for _ in range(3):
        openers = [Agent(name, first) for _ in range(2)]
        for opener in openers:
            time.sleep(rng.uniform(0.1, 0.4))
            opener.kill()

    server = start(first)
    try:
        assert server.wait_ready(), (
            f"(seed {seed}) uvicorn did not start after openers were killed:\n"
            f"{server.failures()}")
        bystander = agents(name, first)
        assert bystander.ask("acquire 10") == "granted"  # registered, sweeping
        assert bystander.ask("release") == "released"
        if exhaust:
            assert bystander.ask("exhaust").startswith("exhausted"), bystander.stderr()

        await phase(server, first, CHAOS_LOAD_SECONDS / 2)
        server.stop()
        server = start(second)
        assert server.wait_ready(), (
            f"(seed {seed}) restarted with capacity {first} -> {second} while a process "
            f"still has the resource open, the workers do not start:\n{server.failures()}")
        await phase(server, second, CHAOS_LOAD_SECONDS / 2)

        assert bystander.proc.poll() is None, bystander.stderr()
        deadline = time.monotonic() + 5
        while True:
            mine = entry(status_in_process(), name)
            assert mine is not None
            idle = mine["in_use"] == 0 and mine["waiting"] == 0 and all(
                p["held"] == 0 and p["waiting"] == 0 for p in mine["processes"])
            if idle:
                break
            assert time.monotonic() < deadline, (
                f"(seed {seed}) slots still held or waited for after every client stopped: "
                f"{mine}")
            await asyncio.sleep(0.1)
    finally:
        server.stop()
