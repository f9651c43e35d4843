"""The demo service of the spike experiment.

Two endpoints share one process, as in the original package's demo:

* ``/messages`` runs an unindexed SQLite query (about 100 ms of CPU) in a
  worker thread: the resource a spike of users overloads;
* ``/file`` reads a 5 KB file in 1 KB chunks, each read in a worker thread:
  cheap, and it must stay healthy while ``/messages`` is overloaded.

Without limiting, both endpoints share the same worker threads and the same
two cores, so a spike on ``/messages`` starves ``/file`` too. Every query
counts itself in the shared gauge ``db_in_flight`` (``probe.py``), so the
runner sees the queries in flight across all processes of a variant.

``SPIKE_APP`` chooses the app (:data:`APPS`); ``SPIKE_VARIANT`` is only the
name ``/health`` reports, so one app serves several variants (see
``variants.py``):

``none``
    no limiting;
``package``
    ``fastapi_concurrency_limiter`` with the original demo's configuration:
    ``Resource(5)``, ``Resource(10)``, ``Limiter(timeout=2)``. The same code
    runs this package (``fcl``) and, from its own virtualenv, the original
    package (``original``): it uses only the original API;
``package-tuned``
    this package with the recommended overload configuration
    (:data:`FCL_TUNED_OPTIONS`);
``package-priorities``
    ``package`` with priority classes: the database resource rejects early
    (``early_reject=True``) and ``/messages`` takes each request's class from
    the ``x-priority`` header (``priority_from_header``), which the load
    generator sets.

Run one by hand with, from the repository root::

    SPIKE_APP=package python -m uvicorn app:app --app-dir bench/spike
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

import data
import probe
from schedule import PRIORITY_HEADER

APPS = (
    "none",
    "package",
    "package-tuned",
    "package-redis",
    "package-adaptive",
    "package-host",
    "package-priorities",
)

# ---------------------------------------------------------------------------
# Recommended overload configuration, used by the "fcl-tuned" variant.
#
# Extra keyword arguments on top of the original configuration
# (Resource(5) for the database, Resource(10) for the file, Limiter(timeout=2)),
# e.g. "db": {"queue": "adaptive", "max_waiting": 20}. Empty dicts mean
# exactly the original configuration.
FCL_TUNED_OPTIONS: dict[str, dict[str, Any]] = {
    "limiter": {},  # Limiter(timeout=2, resources=[db, file], **this)
    "db": {"queue": "adaptive"},  # Resource(5, **this)
    "file": {},  # Resource(10, **this)
}
# ---------------------------------------------------------------------------

DB_PATH = Path(os.environ.get("SPIKE_DB", data.database_path()))
FILE_PATH = Path(os.environ.get("SPIKE_FILE", data.file_path()))


_db_in_flight = probe.Gauge.named(probe.DB_IN_FLIGHT)


def _counted_query(user_id: int) -> list[dict[str, Any]]:
    _db_in_flight.add(1)
    try:
        return data.query_messages(DB_PATH, user_id)
    finally:
        _db_in_flight.add(-1)


async def read_messages() -> list[dict[str, Any]]:
    """100 random messages of a random user, queried off the event loop."""
    user_id = random.randint(1, data.USER_COUNT)
    return await run_in_threadpool(_counted_query, user_id)


async def read_file() -> PlainTextResponse:
    """The whole file, read in 1 KB chunks; every read runs in a worker thread."""
    chunks: list[bytes] = []
    async with await anyio.open_file(FILE_PATH, "rb") as f:
        while chunk := await f.read(data.FILE_CHUNK_SIZE):
            chunks.append(chunk)
    return PlainTextResponse(b"".join(chunks))


def _package_version() -> str | None:
    try:
        return importlib.metadata.version("fastapi-concurrency-limiter")
    except importlib.metadata.PackageNotFoundError:
        return None


def _base_app(variant: str, lifespan: Any = None) -> FastAPI:
    app = FastAPI(title=f"spike demo ({variant})", lifespan=lifespan)
    package = _package_version()

    @app.get("/health")
    async def health() -> dict[str, str | int | None]:
        """Unlimited readiness probe: which variant, package and process answer."""
        return {"status": "ok", "variant": variant, "package": package, "pid": os.getpid()}

    return app


def _app_none(variant: str) -> FastAPI:
    app = _base_app(variant)

    @app.get("/messages")
    async def get_messages() -> list[dict[str, Any]]:
        return await read_messages()

    @app.get("/file", response_class=PlainTextResponse)
    async def get_file() -> PlainTextResponse:
        return await read_file()

    return app


def _limit_publisher(resource: Any) -> Any:
    """A lifespan that copies ``resource.limit`` into the ``db_limit`` gauge.

    Only for a resource whose limit can change at run time (it has a ``limit``
    attribute); for the others there is nothing to chart, and nothing runs.
    """
    if not hasattr(resource, "limit"):
        return None
    gauge = probe.Gauge.named(probe.DB_LIMIT)

    async def publish() -> None:
        while True:
            gauge.set(int(resource.limit))
            await asyncio.sleep(0.1)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(publish())
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    return lifespan


def _app_with_package(
    variant: str, options: dict[str, dict[str, Any]], db_capacity: int = 5
) -> FastAPI:
    """``fastapi_concurrency_limiter``: ``Resource(5)`` for the database,
    ``Resource(10)`` for the file, ``Limiter(timeout=2)``, plus ``options`` per
    object (``"messages"``: of the ``/messages`` route's decorator). With empty
    options only the original package's API is used."""
    from fastapi_concurrency_limiter import Limiter, Resource

    db = Resource(db_capacity, **options["db"])
    file = Resource(10, **options["file"])
    limiter = Limiter(timeout=2, resources=[db, file], **options["limiter"])
    app = _base_app(variant, lifespan=_limit_publisher(db))

    @app.get("/messages")
    @limiter.resources([db], **options.get("messages", {}))
    async def get_messages() -> list[dict[str, Any]]:
        return await read_messages()

    @app.get("/file", response_class=PlainTextResponse)
    @limiter.resources([file])
    async def get_file() -> PlainTextResponse:
        return await read_file()

    return app


def _app_package(variant: str) -> FastAPI:
    """The package, configured exactly as the original demo."""
    return _app_with_package(variant, {"limiter": {}, "db": {}, "file": {}})


def _app_package_tuned(variant: str) -> FastAPI:
    """This package with the recommended overload configuration."""
    return _app_with_package(variant, FCL_TUNED_OPTIONS)


def _app_package_redis(variant: str) -> FastAPI:
    """The package as the original demo, with the database resource shared
    through Redis (``SPIKE_REDIS_URL``) by every process of the variant."""
    from fastapi_concurrency_limiter.redis import RedisScope

    scope = RedisScope(os.environ["SPIKE_REDIS_URL"], key_prefix="spike")
    db_options = {"name": "db", "scope": scope}
    return _app_with_package(variant, {"limiter": {}, "db": db_options, "file": {}})


def _app_package_adaptive(variant: str) -> FastAPI:
    """This package with an adaptive database limit under a deliberately bad
    ceiling: ``Resource(50, adaptive=True)``."""
    return _app_with_package(
        variant, {"limiter": {}, "db": {"adaptive": True}, "file": {}}, db_capacity=50
    )


def _app_package_host(variant: str) -> FastAPI:
    """The package as the original demo, with the database resource shared
    by every worker process of the host: ``Resource(5, name=..., scope="host")``."""
    db = {"name": "spike-db", "scope": "host"}
    return _app_with_package(variant, {"limiter": {}, "db": db, "file": {}})


def _app_package_priorities(variant: str) -> FastAPI:
    """The package as the original demo, with priority classes on ``/messages``:
    each request's class comes from the ``x-priority`` header (``critical`` or
    ``sheddable``; the load generator on this machine's loopback, which the
    helper trusts by default, sets it), and the database resource refuses at
    arrival a request whose predicted wait exceeds the timeout
    (``early_reject=True``), so a sheddable request behind a queue of others
    gets its 503 at once instead of after 2 s."""
    from fastapi_concurrency_limiter import priority_from_header

    return _app_with_package(
        variant,
        {
            "limiter": {},
            "db": {"early_reject": True},
            "file": {},
            "messages": {"priority": priority_from_header(PRIORITY_HEADER)},
        },
    )


_BUILDERS: dict[str, Callable[[str], FastAPI]] = {
    "none": _app_none,
    "package": _app_package,
    "package-tuned": _app_package_tuned,
    "package-redis": _app_package_redis,
    "package-adaptive": _app_package_adaptive,
    "package-host": _app_package_host,
    "package-priorities": _app_package_priorities,
}


def create_app(name: str, variant: str | None = None) -> FastAPI:
    """Build the app ``name`` (one of :data:`APPS`), reporting ``variant`` on ``/health``."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown app {name!r}; expected one of {', '.join(APPS)}") from None
    return builder(variant or name)


app = create_app(os.environ.get("SPIKE_APP", "none"), os.environ.get("SPIKE_VARIANT"))
