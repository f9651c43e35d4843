"""The demo service of the spike experiment, in four variants.

Two endpoints share one process, as in the original package's demo:

* ``/messages`` runs an unindexed SQLite query (about 100 ms of CPU) in a
  worker thread: the resource a spike of users overloads;
* ``/file`` reads a 5 KB file in 1 KB chunks, each read in a worker thread:
  cheap, and it must stay healthy while ``/messages`` is overloaded.

Without limiting, both endpoints share the same worker threads and the same
two cores, so a spike on ``/messages`` starves ``/file`` too. The variant is
chosen with the ``SPIKE_VARIANT`` environment variable:

``none``
    no limiting;
``asyncio``
    the original package's mechanism, written out in a few lines:
    ``asyncio.Semaphore`` per resource, acquired under one 2 s timeout;
``fcl``
    this package with the original demo's configuration;
``fcl-tuned``
    this package with the recommended overload configuration
    (:data:`FCL_TUNED_OPTIONS`).

Run one variant by hand with, from the repository root::

    SPIKE_VARIANT=asyncio python -m uvicorn app:app --app-dir bench/spike
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

import data

VARIANTS = ("none", "asyncio", "fcl", "fcl-tuned")

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

BUSY_DETAIL = "Server busy, please retry later"

DB_PATH = Path(os.environ.get("SPIKE_DB", data.database_path()))
FILE_PATH = Path(os.environ.get("SPIKE_FILE", data.file_path()))


async def read_messages() -> list[dict[str, Any]]:
    """100 random messages of a random user, queried off the event loop."""
    user_id = random.randint(1, data.USER_COUNT)
    return await run_in_threadpool(data.query_messages, DB_PATH, user_id)


async def read_file() -> PlainTextResponse:
    """The whole file, read in 1 KB chunks; every read runs in a worker thread."""
    chunks: list[bytes] = []
    async with await anyio.open_file(FILE_PATH, "rb") as f:
        while chunk := await f.read(data.FILE_CHUNK_SIZE):
            chunks.append(chunk)
    return PlainTextResponse(b"".join(chunks))


def _base_app(variant: str) -> FastAPI:
    app = FastAPI(title=f"spike demo ({variant})")

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Unlimited readiness probe; tells the runner which variant answers."""
        return {"status": "ok", "variant": variant}

    return app


def _app_none() -> FastAPI:
    app = _base_app("none")

    @app.get("/messages")
    async def get_messages() -> list[dict[str, Any]]:
        return await read_messages()

    @app.get("/file", response_class=PlainTextResponse)
    async def get_file() -> PlainTextResponse:
        return await read_file()

    return app


def _app_asyncio() -> FastAPI:
    """The original package's mechanism without the package.

    One semaphore per resource; all of a request's semaphores must be acquired
    within one 2 s timeout, otherwise the request is answered with 503.
    """
    app = _base_app("asyncio")
    db = asyncio.Semaphore(5)
    file = asyncio.Semaphore(10)

    @asynccontextmanager
    async def limited(*semaphores: asyncio.Semaphore) -> AsyncIterator[None]:
        acquired: list[asyncio.Semaphore] = []
        try:
            try:
                async with asyncio.timeout(2):
                    for semaphore in semaphores:
                        await semaphore.acquire()
                        acquired.append(semaphore)
            except TimeoutError:
                raise HTTPException(status_code=503, detail=BUSY_DETAIL) from None
            yield
        finally:
            for semaphore in reversed(acquired):
                semaphore.release()

    @app.get("/messages")
    async def get_messages() -> list[dict[str, Any]]:
        async with limited(db):
            return await read_messages()

    @app.get("/file", response_class=PlainTextResponse)
    async def get_file() -> PlainTextResponse:
        async with limited(file):
            return await read_file()

    return app


def _app_with_package(variant: str, options: dict[str, dict[str, Any]]) -> FastAPI:
    """This package: ``Resource(5)`` for the database, ``Resource(10)`` for
    the file, ``Limiter(timeout=2)``, plus ``options`` per object."""
    from fastapi_concurrency_limiter import Limiter, Resource

    app = _base_app(variant)
    db = Resource(5, **options["db"])
    file = Resource(10, **options["file"])
    limiter = Limiter(timeout=2, resources=[db, file], **options["limiter"])

    @app.get("/messages")
    @limiter.resources([db])
    async def get_messages() -> list[dict[str, Any]]:
        return await read_messages()

    @app.get("/file", response_class=PlainTextResponse)
    @limiter.resources([file])
    async def get_file() -> PlainTextResponse:
        return await read_file()

    return app


def _app_fcl() -> FastAPI:
    """This package, configured exactly as the original demo."""
    return _app_with_package("fcl", {"limiter": {}, "db": {}, "file": {}})


def _app_fcl_tuned() -> FastAPI:
    """This package with the recommended overload configuration."""
    return _app_with_package("fcl-tuned", FCL_TUNED_OPTIONS)


_BUILDERS: dict[str, Callable[[], FastAPI]] = {
    "none": _app_none,
    "asyncio": _app_asyncio,
    "fcl": _app_fcl,
    "fcl-tuned": _app_fcl_tuned,
}


def create_app(variant: str) -> FastAPI:
    """Build the demo app for ``variant`` (one of :data:`VARIANTS`)."""
    try:
        builder = _BUILDERS[variant]
    except KeyError:
        raise ValueError(
            f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}"
        ) from None
    return builder()


app = create_app(os.environ.get("SPIKE_VARIANT", "none"))
