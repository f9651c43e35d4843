"""The C++ demo server (examples/cpp/demo_server.cc) end to end, with real HTTP clients.

The binary is built with CMake (or taken from ``CL_DEMO_SERVER``); the tests
are skipped only when it cannot be built (no CMake, Asio or SQLite). They
serve a smaller database with the schema of ``bench/spike/data.py``, so a
query takes milliseconds instead of 100 ms.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[2]
BUSY = {"detail": "Server busy, please retry later"}
BUSY_BYTES = b'{"detail":"Server busy, please retry later"}'  # FastAPI's rendering
ROWS = 200_000
USERS = 1_000  # the server draws user ids from 1..1000, as bench/spike/app.py


def _build() -> Path:
    if binary := os.environ.get("CL_DEMO_SERVER"):
        return Path(binary)
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    # Reuse the tree `make cpp-test` builds when there is one.
    release = REPO_ROOT / "build" / "release"
    build = release if (release / "CMakeCache.txt").exists() else REPO_ROOT / "build" / "demo"
    if build is not release:
        configure = subprocess.run(
            [
                "cmake",
                "-S",
                str(REPO_ROOT),
                "-B",
                str(build),
                "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                "-DCL_BUILD_TESTS=OFF",
                "-DCL_BUILD_BENCHMARKS=OFF",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if configure.returncode != 0:
            pytest.skip(f"cannot configure the C++ build:\n{configure.stderr[-2000:]}")
    built = subprocess.run(
        ["cmake", "--build", str(build), "--target", "demo_server", "-j", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build demo_server (needs Asio and SQLite):\n{built.stdout[-2000:]}")
    return build / "demo_server"


@pytest.fixture(scope="module")
def binary() -> Path:
    return _build()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("demo-data")
    db, file = directory / "messages.sqlite3", directory / "file.txt"
    rng = random.Random(1)
    base = dt.datetime(2020, 1, 1)
    with closing(sqlite3.connect(db)) as con:
        con.execute(
            "CREATE TABLE messages (message_id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL,"
            " message TEXT NOT NULL, created_at TEXT NOT NULL)"
        )
        con.executemany(
            "INSERT INTO messages VALUES (?, ?, ?, ?)",
            (
                (
                    i,
                    rng.randint(1, USERS),
                    f'message "{i}"\n\\ fox',
                    (base + dt.timedelta(minutes=rng.randrange(525_600))).isoformat(),
                )
                for i in range(1, ROWS + 1)
            ),
        )
        con.commit()
    file.write_bytes(bytes(rng.randrange(32, 127) for _ in range(5_000)))
    return db, file


@contextmanager
def server(
    binary: Path, data: tuple[Path, Path], *args: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    db, file = data
    process = subprocess.Popen(
        [str(binary), "--db", str(db), "--file", str(file), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "listening on http://127.0.0.1:PORT"
        assert line.startswith("listening on "), line
        yield line.split()[2], process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def _hammer(url: str, path: str, clients: int, each: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def user() -> list[httpx.Response]:
            return [await client.get(path) for _ in range(each)]

        results = await asyncio.gather(*(user() for _ in range(clients)))
    return [r for rs in results for r in rs]


async def test_the_limit_holds_under_concurrent_clients(
    binary: Path, data: tuple[Path, Path]
) -> None:
    with server(binary, data, "--timeout", "30") as (url, _):
        responses = await _hammer(url, "/messages", clients=30, each=4)
        stats = httpx.get(f"{url}/stats").json()
    assert [r.status_code for r in responses] == [200] * 120
    rows = responses[0].json()
    assert len(rows) == 100 and set(rows[0]) == {"message_id", "user_id", "message", "created_at"}
    assert rows[0]["message"].startswith('message "')  # escaped and parsed back
    assert stats["queries_total"] == 120
    assert 1 <= stats["queries_peak"] <= 5
    assert 2 <= stats["db"]["peak_in_use"] <= 5  # the clients did compete
    assert (stats["db"]["in_use"], stats["db"]["waiting"]) == (0, 0)


async def test_without_the_limiter_every_client_queries_at_once(
    binary: Path, data: tuple[Path, Path]
) -> None:
    # The control for the test above: the gauge sees more than 5 when nothing limits.
    with server(binary, data, "--no-limit") as (url, _):
        assert httpx.get(f"{url}/health").json()["variant"] == "cpp-none"
        await _hammer(url, "/messages", clients=30, each=4)
        stats = httpx.get(f"{url}/stats").json()
    assert stats["queries_total"] == 120
    assert stats["queries_peak"] > 5
    assert stats["db"]["acquired"] == 0


async def test_busy_answers_503_with_the_original_body_and_retry_after(
    binary: Path, data: tuple[Path, Path]
) -> None:
    # A zero timeout: whoever finds the 5 slots taken is turned away at once
    # (one worker thread: the slots stay taken longer).
    with server(binary, data, "--timeout", "0", "--workers", "1") as (url, _):
        responses = await _hammer(url, "/messages", clients=30, each=4)
        stats = httpx.get(f"{url}/stats").json()
    busy = [r for r in responses if r.status_code == 503]
    assert busy, "no request was turned away"
    assert {r.status_code for r in responses} == {200, 503}
    for r in busy:
        assert r.content == BUSY_BYTES
        assert r.json() == BUSY
        assert r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/json"
    assert stats["db"]["timeout"] == len(busy)
    assert stats["queries_peak"] <= 5


def test_file_health_and_errors(binary: Path, data: tuple[Path, Path]) -> None:
    with server(binary, data) as (url, process), httpx.Client(base_url=url) as client:
        r = client.get("/file")
        assert r.status_code == 200 and r.content == data[1].read_bytes()
        assert r.headers["content-type"].startswith("text/plain")
        health = client.get("/health").json()
        assert (health["status"], health["variant"], health["pid"]) == ("ok", "cpp", process.pid)
        assert client.get("/nope").status_code == 404
        assert client.post("/messages", content=b"x").status_code == 405


def test_queries_count_in_the_shared_gauge(
    binary: Path, data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench/spike/probe.py's file: int64 value and peak, native byte order.
    gauge = tmp_path / "db_in_flight.gauge"
    gauge.write_bytes(struct.pack("=qq", 0, 0))
    monkeypatch.setenv("SPIKE_PROBE_DIR", str(tmp_path))
    with server(binary, data, "--timeout", "30") as (url, _):
        asyncio.run(_hammer(url, "/messages", clients=10, each=2))
    value, peak = struct.unpack("=qq", gauge.read_bytes())
    assert value == 0 and 1 <= peak <= 5


def test_clients_that_hang_up_while_waiting_leave_the_queue(
    binary: Path, data: tuple[Path, Path]
) -> None:
    # One worker thread: the queries run one at a time, so a queue forms.
    with server(binary, data, "--timeout", "30", "--workers", "1") as (url, _):
        host, port = url.removeprefix("http://").split(":")
        sockets = [socket.create_connection((host, int(port))) for _ in range(100)]
        for s in sockets:
            s.sendall(f"GET /messages HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/stats").json()["db"]["waiting"] < 10:
            assert time.monotonic() < deadline, "no queue formed"
            time.sleep(0.002)
        for s in sockets:
            s.close()  # every client gives up while many still wait
        while True:
            stats = httpx.get(f"{url}/stats").json()
            db = stats["db"]
            if db["acquired"] + db["cancelled"] == 100 and db["in_use"] == 0:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
    # The waiting ones never ran their query: they left the queue when their
    # client went. (A slot granted at the very moment its client hung up is
    # counted as acquired, given back at once, and runs no query either.)
    assert db["cancelled"] > 0 and stats["queries_total"] <= db["acquired"] < 100
    assert db["waiting"] == 0


def test_sigterm_finishes_the_requests_in_flight(binary: Path, data: tuple[Path, Path]) -> None:
    with server(binary, data) as (url, process), httpx.Client(base_url=url) as client:
        assert client.get("/health").status_code == 200  # an idle keep-alive connection
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
