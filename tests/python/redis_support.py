"""A real redis-server for the cluster-scope tests: started on a free port in
a temporary directory, without persistence, stopped afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
WORKER = Path(__file__).with_name("redis_worker.py")

needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (make system-deps installs the Debian package)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process, restartable on the same port."""

    def __init__(self, password: str | None = None, tls: bool = False) -> None:
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.cert = os.path.join(self.dir, "cert.pem")
        if tls:
            # A self-signed certificate for 127.0.0.1, its own CA.
            subprocess.run(
                [
                    "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", os.path.join(self.dir, "key.pem"), "-out", self.cert,
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_ca_certs={self.cert}"
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += [
                "--tls-cert-file", self.cert,
                "--tls-key-file", os.path.join(self.dir, "key.pem"),
                "--tls-ca-cert-file", self.cert,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self._ping():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as raw:
            s = raw
            if self.tls:
                context = ssl.create_default_context(cafile=self.cert)
                s = context.wrap_socket(raw, server_hostname="127.0.0.1")
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it is paused
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Loses every key (no persistence), as a restart without AOF does."""
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis.from_url(self.url(db), decode_responses=True, socket_timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make system-deps installs the Debian package)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


class RedisClusterServers:
    """A Redis Cluster of three masters (no replicas): three redis-server
    processes with cluster mode on, joined by ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="redis-cluster-test-")
        self.ports = [free_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None and REDIS_CLI is not None
        for port in self.ports:
            node_dir = os.path.join(self.dir, str(port))
            os.mkdir(node_dir)
            args = [
                REDIS_SERVER,
                "--port", str(port),
                "--cluster-port", str(free_port()),
                "--bind", "127.0.0.1",
                "--dir", node_dir,
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", os.path.join(node_dir, "redis.log"),
            ]  # fmt: skip
            self.procs.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.ports:
            _wait_for_ping(port, self.procs[0])
        subprocess.run(
            [
                REDIS_CLI, "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas", "0", "--cluster-yes",
            ],  # fmt: skip
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        deadline = time.monotonic() + 20
        while not all("cluster_state:ok" in self.cluster_info(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not come up")
            time.sleep(0.1)

    def cluster_info(self, port: int) -> str:
        assert REDIS_CLI is not None
        return subprocess.run(
            [REDIS_CLI, "-p", str(port), "cluster", "info"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout

    def kill(self, port: int) -> None:
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait(10)

    def client(self) -> Any:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(self.url(), decode_responses=True, socket_timeout=5)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_for_ping(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.02)


def _cluster() -> Iterator[RedisClusterServers]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server is not installed (make system-deps installs the Debian package)")
    servers = RedisClusterServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster shared by a module's tests."""
    yield from _cluster()


@pytest.fixture
def own_redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster for one test (that may break it)."""
    yield from _cluster()


class Worker:
    """A worker process (tests/python/redis_worker.py) with its own event
    loop and its own connection, driven by JSON lines on stdin/stdout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: Queue[dict[str, Any]] = Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._lines.put(json.loads(line))

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                raise AssertionError(f"worker sent no {event!r} within {timeout} s") from None
            if message.get("event") == event:
                return message
            if message.get("event") == "error":
                raise AssertionError(f"worker failed: {message}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="exit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


class RedisProxy:
    """A TCP proxy to a redis-server on 127.0.0.1, run on the test's event
    loop, that injects network faults: ``drop_next_grant`` loses the next
    notification a blocked ``BLPOP`` receives (Redis has popped it; the
    proxy closes the client's connection instead of passing the reply on),
    ``reset()`` closes every open connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.drop_next_grant = False
        self.dropped = 0
        self.resets = 0
        self._server: Any = None
        self._writers: set[Any] = set()

    async def start(self) -> int:
        import asyncio

        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, port: int, db: int = 0) -> str:
        return f"redis://127.0.0.1:{port}/{db}"

    async def _serve(self, reader: Any, writer: Any) -> None:
        import asyncio

        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        blocked = [False]  # this connection's last command was a BLPOP

        def close() -> None:
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)

        async def requests() -> None:
            try:
                while data := await reader.read(65536):
                    blocked[0] = b"BLPOP" in data.upper()
                    up_writer.write(data)
                    await up_writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                close()

        async def replies() -> None:
            try:
                while data := await up_reader.read(65536):
                    if blocked[0] and self.drop_next_grant and data.startswith(b"*2"):
                        self.drop_next_grant = False
                        self.dropped += 1
                        return
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                close()

        await asyncio.gather(requests(), replies())

    def reset(self) -> None:
        """Closes every connection through the proxy (clients see a reset)."""
        self.resets += 1
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def close(self) -> None:
        self.reset()
        if self._server is not None:
            self._server.close()


class LatencyProxy:
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
