"""Every Python block of the README and of docs/*.md runs as shown.

A block is a complete program or is marked as a fragment (its first line
``# fragment: ...``); scripts/docs_blocks.py finds them, the files the site
includes in their place. A complete program that defines an ASGI ``app`` is
served by a real uvicorn on 127.0.0.1 (tests/python/docs_example_server.py)
and every one of its routes gets a few concurrent requests (a WebSocket
route a connection and a message): a 500 or any other 5xx but the limiter's
503, a traceback or an ERROR in the server's log, or an app that never
answers with a success fails the test. Any other program runs with
``python`` and must exit 0 without a traceback. An unmarked fragment fails,
since it cannot run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .redis_support import REDIS_SERVER, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("docs_example_server.py")

_spec = importlib.util.spec_from_file_location("docs_blocks", ROOT / "scripts" / "docs_blocks.py")
assert _spec is not None and _spec.loader is not None
docs_blocks = importlib.util.module_from_spec(_spec)
sys.modules["docs_blocks"] = docs_blocks
_spec.loader.exec_module(docs_blocks)

PROGRAMS = docs_blocks.complete("python")
# Headers a key function of the examples may read.
HEADERS = {"x-api-key": "client-1", "authorization": "user-1"}
_APP = re.compile(r"^app\s*[:=]", re.MULTILINE)
_BAD_LOG = re.compile(r"Traceback|^ERROR|\bERROR:|leaked (instance|type|function)", re.MULTILINE)


def test_the_documentation_has_examples_to_run() -> None:
    names = {block.name for block in PROGRAMS}
    assert any(block.page == "README.md" for block in PROGRAMS), names
    # The two that once failed as written (a 500 at the first rejection, and
    # at every request).
    assert {"docs/examples/busy_handler.py", "docs/examples/per_key.py"} <= names


def test_the_readme_example_is_the_one_the_manual_includes() -> None:
    readme = [b for b in docs_blocks.blocks() if b.page == "README.md" and b.language == "python"]
    assert [b.text for b in readme] == [(ROOT / "docs/examples/quickstart.py").read_text()]


def test_the_readme_s_relative_links_lead_somewhere() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?:|#)([^)#]+)", readme)
    assert targets
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing


@pytest.mark.parametrize("block", PROGRAMS, ids=[block.name for block in PROGRAMS])
def test_the_example_runs(block: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    source = tmp_path / "example.py"
    source.write_text(block.text)
    env = dict(os.environ, FCL_HOST_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    if "RedisScope(" in block.text:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (make system-deps installs it)")
        redis = RedisServer()
        redis.start()
        request.addfinalizer(redis.close)
        env["REDIS_URL"] = redis.url()
    if _APP.search(block.text):
        _serve_and_request(source, env)
    else:
        done = subprocess.run(
            [sys.executable, str(source)], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and not _BAD_LOG.search(done.stderr), done.stderr


def _serve_and_request(source: Path, env: dict[str, str]) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(SERVER), str(source), str(port)], env=env, cwd=source.parent,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        routes = json.loads(server.stdout.readline() or "null")
        assert routes, "the example did not start"
        _wait_for(port, server)
        statuses = asyncio.run(_request(f"127.0.0.1:{port}", routes))
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the lifespan ends
        try:
            _, log = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, log = server.communicate()
    failed = {what: status for what, status in statuses.items() if status >= 500 and status != 503}
    assert not failed, (failed, log)
    assert not _BAD_LOG.search(log), log
    assert any(200 <= status < 300 for status in statuses.values()), (statuses, log)


def _wait_for(port: int, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60  # a hang guard
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[1]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the example's server did not listen")


async def _request(address: str, routes: list[dict[str, Any]]) -> dict[str, int]:
    """Three concurrent requests per route and method (so that an example
    with few slots also answers its rejections); each route's worst status
    other than a success, or a success, keyed by method and path."""
    statuses: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=f"http://{address}", headers=HEADERS, timeout=30) as c:
        for route in routes:
            if route["kind"] == "websocket":
                statuses[f"WS {route['path']}"] = await asyncio.to_thread(
                    _websocket, f"ws://{address}{route['path']}"
                )
                continue
            for method in route["methods"]:
                body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
                answers = await asyncio.gather(
                    *(c.request(method, route["path"], **body) for _ in range(3))
                )
                codes = sorted({answer.status_code for answer in answers})
                worst = [code for code in codes if not 200 <= code < 300]
                statuses[f"{method} {route['path']}"] = max(worst) if worst else codes[0]
    return statuses


def _websocket(url: str) -> int:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, open_timeout=20, additional_headers=HEADERS) as websocket:
            websocket.send("hello")
            try:
                websocket.recv(timeout=5)
            except TimeoutError:
                pass  # an endpoint that does not answer is not an error
    except InvalidStatus as refused:
        return int(refused.response.status_code)
    return 200
