"""Priority classes: ``Priority``, ``priority=`` on every entry point,
reserves, the trusted header, per-class statistics and metrics. Grant order,
shedding and reserves end to end, through a real uvicorn server with real
HTTP clients; the rest in-process."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request, WebSocket
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.asyncio.client import connect

from fastapi_concurrency_limiter import (
    BUSY_DETAIL,
    Limiter,
    Priority,
    Resource,
    ServerBusy,
    priority_from_header,
)
from fastapi_concurrency_limiter._errors import REASONS
from fastapi_concurrency_limiter.prometheus import register
from fastapi_concurrency_limiter.redis import RedisScope

from .conftest import eventually, serve
from .test_streaming import STREAMS_GENERATORS

pytestmark = pytest.mark.anyio
HEADER = "x-priority"


# --- the classes and their names ---------------------------------------------


def test_priority_is_parsed_from_its_value_or_its_name() -> None:
    assert [int(p) for p in Priority] == [0, 1, 2, 3]
    assert Priority.SHEDDABLE < Priority.SHEDDABLE_PLUS < Priority.CRITICAL < Priority.CRITICAL_PLUS
    for value in (Priority.CRITICAL_PLUS, 3, "CRITICAL_PLUS", "critical-plus", " Critical_Plus "):
        assert Priority.parse(value) is Priority.CRITICAL_PLUS
    assert Priority.SHEDDABLE_PLUS.label == "sheddable_plus"
    for bad in ("urgent", 4, -1, "", "critical plus"):
        with pytest.raises(ValueError, match=r"priority must be .*'SHEDDABLE'.*'CRITICAL_PLUS'"):
            Priority.parse(bad)
    for wrong in (None, 2.0, True, b"critical"):
        with pytest.raises(TypeError, match="priority must be"):
            Priority.parse(wrong)
    assert "lower_priority" in REASONS


def test_bad_priorities_and_reserves_are_refused_before_the_first_request() -> None:
    with pytest.raises(ValueError, match=r"reserve: .*SHEDDABLE"):
        Resource(4, reserve={Priority.SHEDDABLE: 1})
    with pytest.raises(ValueError, match=r"reserve\[CRITICAL\] must be an integer >= 0"):
        Resource(4, reserve={"critical": -1})
    with pytest.raises(TypeError, match=r"reserve\[CRITICAL_PLUS\] must be an integer"):
        Resource(4, reserve={Priority.CRITICAL_PLUS: 1.5})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"reserve: .* 5 slots, more than capacity=4"):
        Resource(4, reserve={Priority.CRITICAL_PLUS: 3, Priority.CRITICAL: 2})
    with pytest.raises(ValueError, match="reserve's keys must be"):
        Resource(4, reserve={"vip": 1})
    with pytest.raises(TypeError, match="reserve must be a dict"):
        Resource(4, reserve=[0, 0, 0, 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserve is not supported with per_key"):
        Resource(4, per_key=2, reserve={"critical_plus": 1})
    db = Resource(4, reserve={"critical-plus": 1, Priority.CRITICAL: 1})
    assert db.reserve == {Priority.CRITICAL: 1, Priority.CRITICAL_PLUS: 1}
    assert Resource(4).reserve == {}
    # A cluster resource's local stage takes reserves (Redis is never reached).
    assert Resource(4, name="prio-redis", scope=RedisScope(), reserve={"critical_plus": 1}).reserve

    keyed = Resource(4, per_key=2)
    limiter = Limiter(timeout=1, resources=[db, keyed])
    with pytest.raises(ValueError, match="priority must be"):
        limiter.resources([db], priority="urgent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"priority=.*per_key=2.*not supported"):
        limiter.resources([keyed], priority=Priority.SHEDDABLE)
    with pytest.raises(ValueError, match=r"priority=.*per_key=2.*not supported"):
        limiter.dependency([keyed], priority=priority_from_header(HEADER))
    with pytest.raises(ValueError, match=r"priority=.*per_key=2.*not supported"):
        limiter.asgi([keyed], priority="sheddable")
    with pytest.raises(ValueError, match=r"priority=.*per_key=2.*not supported"):
        limiter.acquire([keyed], priority="sheddable")
    with pytest.raises(TypeError, match="limiter.acquire.*no request"):
        limiter.acquire([db], priority=priority_from_header(HEADER))  # type: ignore[arg-type]
    limiter.resources([keyed], priority=Priority.CRITICAL)  # the default is fine anywhere
    with pytest.raises(ValueError, match="name must be an HTTP header name"):
        priority_from_header("x priority")
    with pytest.raises(ValueError, match="default must be"):
        priority_from_header(HEADER, default="low")
    with pytest.raises(ValueError, match="trusted must be addresses or networks"):
        priority_from_header(HEADER, trusted=["gateway.local"])
    with pytest.raises(TypeError, match="trusted must be"):
        priority_from_header(HEADER, trusted=None)  # type: ignore[arg-type]


def test_a_host_resource_takes_priorities() -> None:
    """Host scope keeps classes (the order across processes:
    test_host_scope.py); a per-key share still refuses them."""
    shared = Resource(2, name="prio-host-route", scope="host")
    limiter = Limiter(timeout=1, resources=[shared])
    limiter.resources([shared], priority=Priority.CRITICAL_PLUS)
    keyed = Resource(2, name="prio-keyed-route", per_key=1)
    keyed_limiter = Limiter(timeout=1, resources=[keyed])
    with pytest.raises(ValueError, match=r"per_key=1.*not supported"):
        keyed_limiter.resources([keyed], priority=Priority.CRITICAL_PLUS)


# --- end to end: a real server, real clients ----------------------------------


class App:
    """An app with one resource, whose route ``/job/{name}`` takes the
    class from the ``x-priority`` header (a loopback client is trusted) and
    notes the order in which requests start; ``/job/hold...`` holds its
    slot until ``release`` is set."""

    def __init__(self, db: Resource, *, trusted: Any = None) -> None:
        self.db = db
        self.limiter = Limiter(timeout=10, resources=[db])
        self.served: list[str] = []
        self.release = threading.Event()
        self.app = FastAPI()
        header = (
            priority_from_header(HEADER)
            if trusted is None
            else priority_from_header(HEADER, trusted=trusted)
        )

        @self.app.get("/job/{name}")
        @self.limiter.resources([db], priority=header)
        async def work(name: str) -> dict[str, str]:
            self.served.append(name)
            while name.startswith("hold") and not self.release.is_set():
                await asyncio.sleep(0.002)
            return {"name": name}

    @contextmanager
    def running(self) -> Iterator[str]:
        try:
            with serve(self.app) as url:
                yield url
        finally:
            self.release.set()


async def queue(
    client: httpx.AsyncClient, app: App, name: str, priority: str | None
) -> asyncio.Future[httpx.Response]:
    """Sends a request and waits until the resource has seen it: queued,
    granted or refused (a request pushed out of the queue for it counts)."""

    def seen() -> int:
        s = app.db.statistics()
        return s.waiting + s.acquired_total + sum(s.rejected_total.values())

    before = seen()
    headers = {} if priority is None else {HEADER: priority}
    response = asyncio.ensure_future(client.get(f"/job/{name}", headers=headers))
    await eventually(lambda: seen() > before)
    return response


async def test_a_freed_slot_goes_to_the_highest_class_waiting() -> None:
    app = App(Resource(1, name="db"))
    with app.running() as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            holder = await queue(client, app, "hold", None)
            low = await queue(client, app, "low", "sheddable")
            plain = await queue(client, app, "plain", None)  # no header: CRITICAL
            top = await queue(client, app, "top", "critical-plus")
            assert app.db.waiting == 3
            app.release.set()
            responses = await asyncio.gather(holder, low, plain, top)
    assert [r.status_code for r in responses] == [200] * 4
    assert app.served == ["hold", "top", "plain", "low"]
    classes = app.db.statistics().priorities
    assert {label: c.acquired_total for label, c in classes.items()} == {
        "sheddable": 1, "sheddable_plus": 0, "critical": 2, "critical_plus": 1,
    }  # fmt: skip


async def test_a_full_queue_pushes_out_the_newest_of_the_lowest_class() -> None:
    app = App(Resource(1, name="db", max_waiting=2))
    registry = CollectorRegistry()
    register(app.limiter, registry)
    with app.running() as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            holder = await queue(client, app, "hold", None)
            older = await queue(client, app, "older", "sheddable")
            newer = await queue(client, app, "newer", "sheddable")
            # The queue is full: a CRITICAL newcomer takes the newest
            # SHEDDABLE waiter's place.
            critical = await queue(client, app, "critical", None)
            pushed_out = await newer
            assert pushed_out.status_code == 503
            assert pushed_out.json() == {"detail": BUSY_DETAIL}  # the original 503
            assert pushed_out.headers["retry-after"] == "1"
            s = app.db.statistics()
            assert (s.waiting, s.rejected_total["lower_priority"]) == (2, 1)
            assert s.priorities["sheddable"].waiting == 1
            assert s.priorities["critical"].waiting == 1
            assert s.priorities["sheddable"].rejected_total["lower_priority"] == 1
            metrics = generate_latest(registry).decode()
            assert (
                'concurrency_limiter_priority_rejected_total{priority="sheddable",'
                'reason="lower_priority",resource="db"} 1.0'
            ) in metrics
            assert (
                'concurrency_limiter_priority_waiting{priority="critical",resource="db"} 1.0'
            ) in metrics
            # Existing series are unchanged: every class together.
            assert 'concurrency_limiter_waiting{resource="db"} 2.0' in metrics
            assert (
                'concurrency_limiter_rejected_total{reason="lower_priority",resource="db"} 1.0'
            ) in metrics
            # A SHEDDABLE newcomer to the full queue is turned away itself.
            refused = await client.get("/job/late", headers={HEADER: "sheddable"})
            assert refused.status_code == 503
            assert app.db.statistics().rejected_total["queue_full"] == 1
            app.release.set()
            assert [r.status_code for r in await asyncio.gather(holder, older, critical)] == [
                200
            ] * 3
    assert app.served == ["hold", "critical", "older"]


async def test_a_reserve_keeps_slots_for_its_class() -> None:
    app = App(Resource(2, name="db", reserve={Priority.CRITICAL_PLUS: 1}))
    with app.running() as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            holder = await queue(client, app, "hold", "critical")
            # One slot is free, but it is CRITICAL_PLUS's: CRITICAL waits.
            waiting = await queue(client, app, "waits", "critical")
            assert (app.db.in_use, app.db.waiting) == (1, 1)
            # CRITICAL_PLUS takes its reserved slot at once.
            top = await client.get("/job/top", headers={HEADER: "critical_plus"})
            assert top.status_code == 200 and not waiting.done()
            app.release.set()
            assert (await holder).status_code == (await waiting).status_code == 200
    assert app.served == ["hold", "top", "waits"]
    assert app.db.statistics().reserve == {"critical_plus": 1}


async def test_the_header_of_an_untrusted_peer_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    app = App(Resource(1, name="db"), trusted=["10.0.0.0/8"])  # the client is 127.0.0.1
    with caplog.at_level(logging.WARNING, "fastapi_concurrency_limiter"):
        with app.running() as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                for name in ("a", "b"):
                    r = await client.get(f"/job/{name}", headers={HEADER: "critical_plus"})
                    assert r.status_code == 200
    classes = app.db.statistics().priorities
    assert classes["critical"].acquired_total == 2 and classes["critical_plus"].acquired_total == 0
    ignored = [r for r in caplog.records if "not a trusted peer" in r.getMessage()]
    assert len(ignored) == 1, caplog.text  # once, not per request
    assert "'127.0.0.1'" in ignored[0].getMessage()


# --- in-process: every entry point, the header's rules, a bad function -------


def _scope(client: tuple[str, int] | None, value: str | None) -> dict[str, Any]:
    headers = [] if value is None else [(HEADER.encode(), value.encode())]
    return {"type": "http", "method": "GET", "path": "/", "headers": headers, "client": client}


def test_the_header_is_read_from_trusted_peers_only(caplog: pytest.LogCaptureFixture) -> None:
    of = priority_from_header(HEADER, default="sheddable", trusted="10.0.0.0/8, ::1")
    assert of(HTTPConnection(_scope(("10.1.2.3", 5), "Critical-Plus"))) is Priority.CRITICAL_PLUS
    assert of(HTTPConnection(_scope(("::1", 5), "0"))) is Priority.SHEDDABLE
    assert of(HTTPConnection(_scope(("::ffff:10.0.0.1", 5), "critical"))) is Priority.CRITICAL
    assert of(HTTPConnection(_scope(("10.1.2.3", 5), None))) is Priority.SHEDDABLE
    assert of(HTTPConnection(_scope(("192.0.2.1", 5), "critical"))) is Priority.SHEDDABLE
    assert of(HTTPConnection(_scope(None, "critical"))) is Priority.SHEDDABLE  # a Unix socket
    everyone = priority_from_header(HEADER, trusted="*")
    assert everyone(HTTPConnection(_scope(("192.0.2.1", 5), "sheddable"))) is Priority.SHEDDABLE
    loopback = priority_from_header(HEADER)
    assert loopback(HTTPConnection(_scope(("127.0.0.1", 5), "sheddable"))) is Priority.SHEDDABLE
    assert loopback(HTTPConnection(_scope(("192.0.2.1", 5), "sheddable"))) is Priority.CRITICAL
    with caplog.at_level(logging.WARNING, "fastapi_concurrency_limiter"):
        for value in ("urgent", "urgent", "low", "urgent"):
            assert of(HTTPConnection(_scope(("10.0.0.1", 5), value))) is Priority.SHEDDABLE
    unknown = [r.getMessage() for r in caplog.records if "unknown value" in r.getMessage()]
    assert len(unknown) == 2, unknown  # once per value
    assert "'urgent'" in unknown[0] and "'low'" in unknown[1]


async def test_every_entry_point_gives_its_requests_their_class() -> None:
    db = Resource(4, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()

    @app.get("/fixed")
    @limiter.resources([db], priority=Priority.SHEDDABLE_PLUS)
    async def fixed() -> None:
        return None

    def user_class(request: Request) -> str:
        return request.query_params.get("class", "critical")

    @app.get("/function")
    @limiter.resources([db], priority=user_class)
    def function() -> None:  # a def endpoint
        return None

    async def async_class(request: Request, level: str = Depends(lambda: "sheddable")) -> str:
        return level

    @app.get("/dependency", dependencies=[Depends(limiter.dependency([db], priority=async_class))])
    async def dependency() -> None:
        return None

    paths = [
        ("/fixed", "sheddable_plus"),
        ("/function?class=SHEDDABLE", "sheddable"),
        ("/function", "critical"),
        ("/dependency", "sheddable"),
        ("/asgi/", "sheddable"),
    ]
    if STREAMS_GENERATORS:

        @app.get("/stream")
        @limiter.resources([db], priority="critical_plus")
        async def stream() -> Any:
            yield b"x"

        paths.append(("/stream", "critical_plus"))

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    wrapped = limiter.asgi([db], priority=lambda connection: Priority.SHEDDABLE)
    app.mount("/asgi", wrapped(Starlette(routes=[Route("/", plain)])))

    @app.websocket("/socket")
    @limiter.resources([db], priority=Priority.CRITICAL_PLUS)
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    def acquired() -> dict[str, int]:
        return {label: c.acquired_total for label, c in db.statistics().priorities.items()}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for path, label in paths:
            before = acquired()
            assert (await client.get(path)).status_code == 200, path
            after = acquired()
            assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
                label: 1
            }, path
    with serve(app) as url:
        async with connect(url.replace("http", "ws") + "/socket") as ws:
            assert await ws.recv() == "hi"
    assert acquired()["critical_plus"] == 1 + STREAMS_GENERATORS
    async with limiter.acquire([db], priority="sheddable_plus"):
        assert db.statistics().priorities["sheddable_plus"].in_use == 1
    assert db.statistics().priorities["sheddable_plus"].acquired_total == 2
    assert db.in_use == 0


async def test_a_priority_function_returning_no_class_fails_its_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Resource(1, name="db")
    limiter = Limiter(timeout=1, resources=[db])
    app = FastAPI()

    def from_query(request: Request) -> object:
        return request.query_params.get("class")

    @app.get("/items/{item}")
    @limiter.resources([db], priority=from_query)
    async def item(item: str) -> None:
        return None

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with caplog.at_level(logging.ERROR, "fastapi_concurrency_limiter"):
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/items/1")).status_code == 200  # None: CRITICAL
            assert (await client.get("/items/1?class=urgent")).status_code == 500
            assert (await client.get("/items/2?class=urgent")).status_code == 500
    errors = [r.getMessage() for r in caplog.records if r.name == "fastapi_concurrency_limiter"]
    assert len(errors) == 1, errors  # logged once per function, not per request
    assert "from_query returned 'urgent' for GET /items/{item}" in errors[0]
    assert db.in_use == db.waiting == 0


async def test_a_waiter_pushed_out_by_a_higher_class_gets_server_busy() -> None:
    db = Resource(1, name="db", max_waiting=1)
    limiter = Limiter(timeout=10, resources=[db])
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.acquire([db]):
            await release.wait()

    async def wait(priority: Priority) -> None:
        async with limiter.acquire([db], priority=priority):
            pass

    holder = asyncio.ensure_future(hold())
    await eventually(lambda: db.in_use == 1)
    low = asyncio.ensure_future(wait(Priority.SHEDDABLE))
    await eventually(lambda: db.waiting == 1)
    high = asyncio.ensure_future(wait(Priority.CRITICAL_PLUS))
    with pytest.raises(ServerBusy) as pushed:
        await low
    assert (pushed.value.reason, pushed.value.resource) == ("lower_priority", "db")
    release.set()
    await asyncio.gather(holder, high)
    assert db.in_use == db.waiting == 0


async def test_an_app_without_priorities_reports_no_per_class_series() -> None:
    db = Resource(1, name="plain-db")
    limiter = Limiter(timeout=1, resources=[db])
    async with limiter.acquire([db]):
        pass
    registry = CollectorRegistry()
    register(limiter, registry)
    metrics = generate_latest(registry).decode()
    assert "concurrency_limiter_acquired_total" in metrics
    assert "concurrency_limiter_priority_" not in metrics and 'priority="' not in metrics
    assert db.statistics().priorities["critical"].acquired_total == 1


def _header_app(**options: Any) -> tuple[FastAPI, Resource]:
    """/messages with its class from the trusted header (``options``: more
    arguments of priority_from_header)."""
    db = Resource(4, name="db")
    limiter = Limiter(timeout=5, resources=[db])
    app = FastAPI()

    @app.get("/messages")
    @limiter.resources([db], priority=priority_from_header(HEADER, **options))
    async def read_messages() -> dict[str, list[str]]:
        return {"messages": []}

    return app, db


def _granted(db: Resource) -> dict[str, int]:
    return {label: c.acquired_total for label, c in db.statistics().priorities.items()}


def _non_loopback_address() -> str | None:
    """An address of this machine other than loopback, or None."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent
            address = str(s.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") else address


async def test_a_local_gateway_that_adds_x_forwarded_for_is_recognised_by_its_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under uvicorn's defaults (proxy headers on for a gateway on this
    machine) the peer of a gateway that adds X-Forwarded-For is the client:
    by address alone its header is ignored, and the warning does not tell
    the user to trust the client; with the gateway's secret it is honoured,
    and a request without the secret is not."""
    secret = ("x-gateway-secret", "s3cr3t-value")
    app, db = _header_app()
    signed_app, signed_db = _header_app(trusted="*", secret=secret)
    forwarded = {HEADER: "sheddable", "x-forwarded-for": "203.0.113.7"}
    with caplog.at_level(logging.WARNING, "fastapi_concurrency_limiter"):
        with serve(app) as url, serve(signed_app) as signed_url:  # uvicorn's defaults
            async with httpx.AsyncClient(timeout=10) as gateway:
                assert (await gateway.get(f"{url}/messages", headers=forwarded)).status_code == 200
                signed = {**forwarded, secret[0]: secret[1]}
                r = await gateway.get(f"{signed_url}/messages", headers=signed)
                assert r.status_code == 200
                for unsigned in ({**forwarded, secret[0]: "guess"}, forwarded):
                    r = await gateway.get(f"{signed_url}/messages", headers=unsigned)
                    assert r.status_code == 200
    assert _granted(db)["sheddable"] == 0  # by address: the client, not trusted
    assert _granted(signed_db)["sheddable"] == 1, _granted(signed_db)
    assert _granted(signed_db)["critical"] == 2, _granted(signed_db)
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert ignored and "never the client's address" in ignored[0], ignored
    assert any("secret" in m and "x-gateway-secret" in m for m in ignored), ignored
    assert not any(secret[1] in r.getMessage() for r in caplog.records)


async def test_behind_forwarded_allow_ips_star_only_the_secret_chooses_a_class() -> None:
    """With --forwarded-allow-ips='*', any client can claim to be
    127.0.0.1 (so address trust means nothing there, as documented); the
    secret still keeps it from choosing its class."""
    host = _non_loopback_address()
    if host is None:
        pytest.skip("no non-loopback address on this machine")
    app, db = _header_app(trusted="*", secret=("x-gateway-secret", "s3cr3t-value"))
    with serve(app, host=host, proxy_headers=True, forwarded_allow_ips="*") as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            forged = {HEADER: "critical_plus", "x-forwarded-for": "127.0.0.1"}
            assert (await client.get("/messages", headers=forged)).status_code == 200
    assert _granted(db)["critical_plus"] == 0, _granted(db)


def test_a_bad_secret_is_refused_at_start_up() -> None:
    for bad in [
        ("x-gateway-secret", ""),
        ("bad header", "v"),
        "just-a-string",
        ("a", "b", "c"),
        ("x-gateway-secret", "秘密の合言葉"),  # what a gateway sends would never match it
        ("x-gateway-secret", " padded"),  # servers strip spaces at the ends
    ]:
        with pytest.raises(ValueError, match="secret must be") as refused:
            priority_from_header(HEADER, secret=bad)  # type: ignore[arg-type]
        assert "秘密" not in str(refused.value) and "padded" not in str(refused.value)


def test_at_most_ten_unknown_values_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    of = priority_from_header(HEADER)
    with caplog.at_level(logging.WARNING, "fastapi_concurrency_limiter"):
        for i in range(50):
            scope = {
                "type": "http",
                "method": "GET",
                "path": "/",
                "headers": [(HEADER.encode(), f"level-{i}".encode())],
                "client": ("127.0.0.1", 5),
            }
            assert of(HTTPConnection(scope)) is Priority.CRITICAL
    unknown = [r.getMessage() for r in caplog.records if "unknown value" in r.getMessage()]
    assert len(unknown) == 10, unknown[-2:]
    assert "no more after 10 values" in unknown[-1]


async def test_a_limit_below_the_capacity_keeps_the_other_classes_a_slot() -> None:
    """Reserves are shares of the capacity: an adaptive resource (limit 20
    of 100 at start) with 30 reserved, or a limit set down to the reserve,
    still serves the other classes on an idle resource."""
    adaptive = Resource(100, name="db", adaptive=True, reserve={Priority.CRITICAL_PLUS: 30})
    lowered = Resource(10, name="db2", reserve={Priority.CRITICAL_PLUS: 4})
    lowered.set_limit(4)
    limiter = Limiter(timeout=0.2, resources=[adaptive, lowered])
    assert adaptive.limit == 20 and adaptive.in_use == 0
    for resource in (adaptive, lowered):
        async with limiter.acquire([resource]):  # CRITICAL, the default
            assert resource.in_use == 1
