"""Every Python block of the README and of docs/**/*.md runs as shown.

A block is a complete program or is marked as a fragment (its first line
``# fragment: ...``); scripts/docs_blocks.py finds them, the files the site
includes in their place, and refuses a fence naming Python or C++ in a way
it does not take. A complete program that defines an ASGI ``app`` is served
by a real uvicorn on 127.0.0.1 (tests/python/docs_example_server.py): every
operation of its OpenAPI schema and every route the schema leaves out (but
FastAPI's own documentation routes) gets three concurrent requests (a
WebSocket route a connection and a message), and each must answer a success
or the limiter's 503, unless EXPECTED gives its status; a traceback or an
ERROR in the server's log, or a server that does not start within its
deadline, fails the test. Any other program runs with ``python`` and must
exit 0 without a traceback. An unmarked fragment fails, since it cannot run.
See docs/development.md, "The documentation and its examples".
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_concurrency_limiter._errors import BUSY_DETAIL, REASONS

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
# A status other than a success or the limiter's 503 that an example's route
# answers on purpose: {example: {"METHOD /path as declared": status}}.
EXPECTED: dict[str, dict[str, int]] = {}
_APP = re.compile(r"^app\s*[:=]", re.MULTILINE)
_BAD_LOG = re.compile(r"Traceback|^ERROR|\bERROR:|leaked (instance|type|function)", re.MULTILINE)


def test_the_documentation_has_examples_to_run() -> None:
    names = {block.name for block in PROGRAMS}
    assert any(block.page == "README.md" for block in PROGRAMS), names
    # The two that once failed as written (a 500 at the first rejection, and
    # at every request).
    assert {"docs/examples/busy_handler.py", "docs/examples/per_key.py"} <= names


def test_the_readme_s_examples_are_ones_the_manual_includes() -> None:
    """GitHub cannot include files into the README: its examples are copies
    of files of docs/examples/, each included by a page of the manual, so
    that they cannot drift apart. The first is the quickstart."""
    readme = [b for b in docs_blocks.blocks() if b.page == "README.md" and b.language == "python"]
    assert readme and readme[0].text == (ROOT / "docs/examples/quickstart.py").read_text()
    examples = {path.read_text(): path for path in (ROOT / "docs/examples").glob("*.py")}
    for block in readme:
        assert block.text in examples, f"README.md:{block.line} is no file of docs/examples/"
        path = (str(examples[block.text].relative_to(ROOT)),)
        manual = [b.page for b in docs_blocks.blocks() if b.included == path]
        assert manual, f"no page of docs/ includes {path[0]}"


def test_each_included_example_is_named_next_to_it() -> None:
    """On GitHub and in an editor an included block shows as ``--8<-- "path"``:
    the text just above it names the file."""
    unnamed = []
    for block in docs_blocks.blocks():
        if block.included:
            lines = (ROOT / block.page).read_text().splitlines()
            above = "\n".join(lines[max(0, block.line - 5) : block.line])
            unnamed += [f"{block.page}:{block.line}: {path}" for path in block.included
                        if path not in above]  # fmt: skip
    assert not unnamed


def test_the_readme_s_relative_links_lead_somewhere() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?:|#)([^)#]+)", readme)
    assert targets
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing


def test_make_docs_fails_on_a_broken_link_or_anchor(tmp_path: Path) -> None:
    """`make docs`'s command, on a copy of the site with a broken link and a
    broken anchor (mkdocs --quiet hides strict mode's warnings, and the
    build then passes)."""
    pytest.importorskip("mkdocs")
    recipe = re.search(r"^docs:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "no docs target in the Makefile"
    command = (
        recipe[1].replace("$(VENV)/bin/mkdocs", f"{sys.executable} -m mkdocs")
        .replace("$(BUILD)", str(tmp_path / "build"))
    )  # fmt: skip
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "examples", copy / "examples")
    usage = copy / "docs" / "usage.md"
    broken = "\nSee [a page](nowhere.md), [an anchor](#no-such-section).\n"
    usage.write_text(usage.read_text() + broken)
    done = subprocess.run(
        command, shell=True, cwd=copy, capture_output=True, text=True, timeout=120
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    assert "nowhere.md" in log and "no-such-section" in log, log


def test_every_python_or_cpp_fence_is_one_the_tests_take() -> None:
    assert not docs_blocks.unrecognized()


def test_fences_under_other_names_are_found(tmp_path: Path) -> None:
    (tmp_path / "docs" / "guide").mkdir(parents=True)
    (tmp_path / "README.md").write_text("```python3\nprint(1)\n```\n")
    (tmp_path / "docs" / "guide" / "page.md").write_text(
        "~~~python\nprint(2)\n~~~\n\n```{.python}\nprint(3)\n```\n\n"
        "```pycon\n>>> 1\n```\n\n```py3\nx\n```\n\n```cc\nint x;\n```\n\n"
        "```cxx\nint y;\n```\n\n~~~ { .cpp title='t' }\nint main() {}\n~~~\n"
    )
    found = [(b.page, b.language, b.text) for b in docs_blocks.blocks(tmp_path)]
    assert found == [
        ("docs/guide/page.md", "python", "print(2)\n"),
        ("docs/guide/page.md", "python", "print(3)\n"),
        ("docs/guide/page.md", "cpp", "int main() {}\n"),
    ]
    assert [line.rsplit(": ", 1)[1] for line in docs_blocks.unrecognized(tmp_path)] == [
        "python3", "pycon", "py3", "cc", "cxx"
    ]  # fmt: skip


def test_routes_of_included_routers_are_requested_and_fastapi_s_own_are_not() -> None:
    from fastapi import APIRouter, FastAPI, WebSocket

    from . import docs_example_server

    app, router = FastAPI(), APIRouter(prefix="/api")

    @router.get("/items/{item_id}")
    async def item(item_id: int, q: int) -> dict[str, int]:
        return {"item": item_id, "q": q}

    @router.websocket("/feed")
    async def feed(websocket: WebSocket) -> None: ...

    app.include_router(router)
    plan = docs_example_server.requests(app)
    assert plan["declared"] == ["GET /api/items/{item_id}"]
    assert [(r["kind"], r.get("method"), r["path"], r.get("query")) for r in plan["requests"]] == [
        ("http", "GET", "/api/items/1", {"q": 1}),
        ("websocket", None, "/api/feed", None),
    ]


def _app_example(tmp_path: Path, text: str) -> tuple[Path, dict[str, str]]:
    source = tmp_path / "example.py"
    source.write_text(text)
    return source, dict(os.environ, FCL_HOST_DIR=str(tmp_path), PYTHONUNBUFFERED="1")


def test_a_route_answering_4xx_fails_unless_expected(tmp_path: Path) -> None:
    source, env = _app_example(tmp_path, (
        "from fastapi import FastAPI, HTTPException\n"
        "app = FastAPI()\n"
        "@app.get('/items/{item_id}')\n"
        "async def item(item_id: int, q: int):\n"
        "    return {'item': item_id}\n"
        "@app.get('/gone')\n"
        "async def gone():\n"
        "    raise HTTPException(404)\n"
    ))  # fmt: skip
    with pytest.raises(AssertionError, match="GET /gone"):
        _serve_and_request(source, env, "scratch.py")
    EXPECTED["scratch.py"] = {"GET /gone": 404}  # the parameters are supplied: 2xx
    try:
        _serve_and_request(source, env, "scratch.py")
    finally:
        del EXPECTED["scratch.py"]


def test_an_example_that_blocks_at_import_fails_and_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    source, env = _app_example(tmp_path, (
        "import os, time\n"
        "from fastapi import FastAPI\n"
        "app = FastAPI()\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(3600)  # as uvicorn.run(app) would\n"
    ))  # fmt: skip
    with pytest.raises(AssertionError, match="did not start"):
        _serve_and_request(source, env, "scratch.py", start_timeout=3)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


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
        _serve_and_request(source, env, block.name)
    else:
        done = subprocess.run(
            [sys.executable, str(source)], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and not _BAD_LOG.search(done.stderr), done.stderr


def _serve_and_request(
    source: Path, env: dict[str, str], name: str, start_timeout: float = 60
) -> None:
    port = free_port()
    log_file = source.with_suffix(".log")
    with log_file.open("w") as log_out:
        server = subprocess.Popen(
            [sys.executable, str(SERVER), str(source), str(port)], env=env, cwd=source.parent,
            stdout=subprocess.PIPE, stderr=log_out, text=True, start_new_session=True,
        )  # fmt: skip
    try:
        plan = json.loads(_first_line(server, deadline=time.monotonic() + start_timeout) or "null")
        assert plan and plan["requests"], ("the example did not start", log_file.read_text())
        _wait_for(port, server)
        answers = asyncio.run(_request(f"127.0.0.1:{port}", plan["requests"]))
    finally:
        _stop(server)
    log = log_file.read_text()
    assert not _BAD_LOG.search(log), log
    never = [op for op in plan["declared"] if op not in answers]
    assert not never, ("routes the example declares were not requested", never)
    expected = EXPECTED.get(name, {})
    wrong = {
        what: (status, body)
        for what, (status, body) in answers.items()
        if not (200 <= status < 300 or _limiter_busy(status, body) or status == expected.get(what))
    }
    assert not wrong, (wrong, log)


def _limiter_busy(status: int, body: str) -> bool:
    """The limiter's 503: its ``detail``, or an example's ServerBusy handler's
    ``reason``."""
    if status != 503:
        return False
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and (
        answer.get("detail") == BUSY_DETAIL or answer.get("reason") in REASONS
    )


def _first_line(server: subprocess.Popen[str], deadline: float) -> str:
    """The server's first line of output, or "" if it exits or the deadline
    passes first (an example that blocks at import, as one calling
    uvicorn.run would)."""
    assert server.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([server.stdout], [], [], 0.2)
        if ready:
            return server.stdout.readline()
        if server.poll() is not None:
            return ""
    return ""


def _stop(server: subprocess.Popen[str]) -> None:
    """SIGINT (uvicorn's graceful shutdown: the lifespan ends), then SIGKILL to
    the server's whole process group if it has not exited within 30 s."""
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def _wait_for(port: int, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60  # a hang guard
    while time.monotonic() < deadline:
        assert server.poll() is None, "the example's server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the example's server did not listen")


async def _request(address: str, plan: list[dict[str, Any]]) -> dict[str, tuple[int, str]]:
    """Three concurrent requests per route and method (so that an example
    with few slots also answers its rejections); for each, keyed by method
    and path as declared, its worst answer other than a success, or a
    success: (status, body)."""
    answers: dict[str, tuple[int, str]] = {}
    async with httpx.AsyncClient(base_url=f"http://{address}", headers=HEADERS, timeout=30) as c:
        for route in plan:
            if route["kind"] == "websocket":
                answers[f"WS {route['path']}"] = await asyncio.to_thread(
                    _websocket, f"ws://{address}{route['path']}"
                )
                continue
            method = route["method"]
            extra: dict[str, Any] = {
                "params": route.get("query") or None,
                "headers": route.get("headers") or None,
            }
            if method in ("POST", "PUT", "PATCH"):
                extra["json"] = {}
            replies = await asyncio.gather(
                *(c.request(method, route["path"], **extra) for _ in range(3))
            )
            worst = max(replies, key=lambda r: (not 200 <= r.status_code < 300, r.status_code))
            key = f"{method} {route.get('declared', route['path'])}"
            answers[key] = (worst.status_code, worst.text)
    return answers


def _websocket(url: str) -> tuple[int, str]:
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
        response = refused.response
        return int(response.status_code), response.body.decode(errors="replace")
    return 200, ""
