"""Cluster scope: one limit shared by every process on every host, kept in
Redis (``pip install 'fastapi-concurrency-limiter[redis]'``)::

    from fastapi_concurrency_limiter import Limiter, Resource
    from fastapi_concurrency_limiter.redis import RedisScope

    cluster = RedisScope("redis://:password@redis.internal:6379/0")
    db = Resource(20, name="db", scope=cluster)
    limiter = Limiter(timeout=5, resources=[db])

Every process that uses the same Redis, ``key_prefix`` and resource name
shares one pool of 20 slots. In each process a request first passes the
local engine (queue discipline, ``max_waiting``, disconnects, statistics);
only requests at the head of the local queue talk to Redis.

The protocol (Lua scripts, one round trip each) is a fair FIFO semaphore
with direct hand-off: a request takes a free slot in one round trip or joins
the queue; a release hands the slot to the oldest waiter, whose process
learns it on its own notify list, read by one blocked connection per
process (no polling). Slots are leases renewed by a heartbeat: a crashed
process's slots come back within ``lease`` plus one heartbeat. See the
docs/operations.md, "One limit across hosts", for the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Literal

from ._validation import check_seconds

if TYPE_CHECKING:
    from ._cluster import ClusterStage, _Client
    from ._resource import Resource

logger = logging.getLogger("fastapi_concurrency_limiter.redis")

OnError = Literal["reject", "allow", "local"]
_ON_ERROR = ("reject", "allow", "local")

#: Default ``lease``, seconds.
DEFAULT_LEASE = 10.0
#: Default ``key_prefix``.
DEFAULT_KEY_PREFIX = "concurrency_limiter"


class RedisScopeError(RuntimeError):
    """The cluster scope is misconfigured: Redis refused the credentials, a
    resource's capacity differs from the one other processes use, ``cluster``
    does not match the server (a Redis Cluster or not), or the ``redis``
    package is missing. Not an outage: ``on_error`` does not apply."""


class RedisUnreachableError(RedisScopeError, ConnectionError):
    """``check()`` could not reach Redis (refused, reset, no answer within
    ``timeout``, or Redis cannot serve). An outage, not a misconfiguration:
    ``lifespan`` logs it and starts the app, and requests get ``on_error``
    until Redis answers."""


_NOT_IN_NAMES = frozenset("{}:")

#: The oldest Redis the cluster scope runs on (float ``BLPOP`` timeouts).
MINIMUM_REDIS_VERSION = (6, 0)


class RedisScope:
    """Where a cluster-scoped resource keeps its slots: a Redis server.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, or ``rediss://``
            for TLS (options such as ``?ssl_cert_reqs=none`` as redis-py
            reads them).
        lease: seconds a slot stays held without its process renewing it;
            how long a crashed (or paused) process's slots stay taken. The
            heartbeat renews every ``lease / 3``.
        on_error: what a request gets while Redis is unreachable:
            ``"reject"`` (default): 503 at once (reason ``"unavailable"``);
            ``"allow"``: admitted without the cluster limit (the local
            stage, with the resource's capacity, still limits it);
            ``"local"``: admitted while this process uses fewer slots
            (cluster slots it still holds included) than its share of the
            capacity, ``capacity // processes`` (at least 1), where
            ``processes`` is how many processes used the resource at the
            last successful heartbeat (before any: a share of 1); beyond
            the share, 503 (reason ``"unavailable"``).
        key_prefix: namespace of the keys in Redis; a resource's keys are
            ``{key_prefix:name}:...`` (one hash tag: one Redis Cluster slot).
        timeout: seconds one command may take before Redis counts as
            unreachable (then ``on_error`` applies; it is tried again after
            a second, or at the next successful heartbeat). A renewal's call
            may take at most ``min(timeout, 0.9 * lease / 3)``, whatever
            ``timeout`` is, once its connection is open (opening one again
            after a failure may take ``timeout`` more); a resource whose
            renewal outlasts a round is renewed again as soon as it ends, so
            that a lease sees at least two tries before it runs out.
        cluster: ``True`` for a Redis Cluster: ``url`` names any of its
            nodes, the others are discovered, and each command goes to the
            node of its resource's hash slot (``/db`` must be 0).
        on_lease_lost: called as ``on_lease_lost(resource_name, token)``
            when this process learns that Redis took back one of its slots
            because its lease ran out before it was renewed (a pause longer
            than the lease): the request held it beyond the cluster limit,
            and its fencing token (``None`` for a permit no longer held) is stale. Also
            logged (WARNING) and counted (``leases_lost_total``).

    Wrong credentials raise ``RedisScopeError``: at start-up with
    ``FastAPI(lifespan=scope.lifespan)`` (or ``await scope.check()`` in a
    lifespan of your own), else at the first request that needs Redis.
    """

    __slots__ = (
        "url",
        "lease",
        "on_error",
        "key_prefix",
        "timeout",
        "cluster",
        "on_lease_lost",
        "_stages",
        "_clients",
        "_pid",
        "_process",
        "__weakref__",
    )

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        lease: float = DEFAULT_LEASE,
        on_error: OnError = "reject",
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout: float = 1.0,
        cluster: bool = False,
        on_lease_lost: Callable[[str, int | None], object] | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            shown = _redact(url) if isinstance(url, str) else type(url).__name__
            raise ValueError(f"url must be a redis://, rediss:// or unix:// URL, got {shown!r}")
        if on_error not in _ON_ERROR:
            raise ValueError(
                f"on_error must be one of 'reject', 'allow', 'local', got {on_error!r}"
            )
        if not isinstance(key_prefix, str) or not key_prefix or set("{}") & set(key_prefix):
            raise ValueError(
                f"key_prefix must be a non-empty str without braces, got {key_prefix!r}"
            )
        self.url = url
        self.lease = check_seconds("lease", lease, positive=True)
        if self.lease < 0.3:
            raise ValueError(f"lease must be at least 0.3 seconds, got {lease!r}")
        self.on_error: OnError = on_error
        self.key_prefix = key_prefix
        self.timeout = check_seconds("timeout", timeout, positive=True)
        if not isinstance(cluster, bool):
            raise ValueError(f"cluster must be True or False, got {cluster!r}")
        if cluster:
            _check_cluster_url(url)
        self.cluster = cluster
        if on_lease_lost is not None and not callable(on_lease_lost):
            raise ValueError(f"on_lease_lost must be callable or None, got {on_lease_lost!r}")
        self.on_lease_lost = on_lease_lost
        self._stages: dict[str, ClusterStage] = {}
        # One client per event loop (a redis.asyncio connection belongs to
        # the loop that opened it), renewed in a forked child.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Client] = (
            weakref.WeakKeyDictionary()
        )
        self._pid = 0
        self._process = ""

    @property
    def heartbeat(self) -> float:
        """Seconds between two heartbeats."""
        return self.lease / 3

    def _bind(self, name: str, capacity: int) -> ClusterStage:
        """The cluster stage of the resource ``name`` (one per name)."""
        from ._cluster import ClusterStage

        if not name or any(c in _NOT_IN_NAMES or c.isspace() for c in name):
            # A ':' would let two (key_prefix, name) pairs share keys
            # ("app" + "billing:db" and "app:billing" + "db"); a brace would
            # end the hash tag early.
            raise ValueError(
                "the name of a resource with scope=RedisScope(...) is part of its Redis keys: "
                f"no '{{', '}}', ':' or whitespace, got {name!r}"
            )
        stage = self._stages.get(name)
        if stage is not None:
            raise ValueError(f"RedisScope already has a resource named {name!r}")
        stage = self._stages[name] = ClusterStage(self, name, capacity)
        return stage

    def _process_id(self) -> str:
        pid = os.getpid()
        if pid != self._pid:  # first use, or a forked child
            self._pid = pid
            self._process = uuid.uuid4().hex
            self._clients = weakref.WeakKeyDictionary()
        return self._process

    def _client(self) -> _Client:
        """This process's client on the running event loop."""
        from ._cluster import _Client

        self._process_id()
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = _Client(self, loop)
        return client

    async def check(self) -> None:
        """Connects, authenticates, checks the server's version (at least
        6.0) and every resource's capacity against the one in Redis; raises
        ``RedisScopeError`` on a misconfiguration (credentials, database,
        ``cluster``, version, capacity), ``RedisUnreachableError`` (also a
        ``ConnectionError``) when Redis cannot be reached. Call it in the
        app's lifespan to fail at start-up rather than at the first
        request."""
        await self._client().check(list(self._stages.values()))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """A FastAPI lifespan that checks Redis at start-up (``check()``: the
        app does not start with a misconfiguration such as wrong
        credentials; it does start when Redis is unreachable, with a
        warning, and ``on_error`` applies until Redis answers) and gives
        back this process's slots at shutdown::

            app = FastAPI(lifespan=cluster.lifespan)

        Inside a lifespan of your own: ``async with cluster.lifespan(app):``.
        """
        try:
            await self.check()
        except RedisUnreachableError as e:
            # Not a reason not to start: on_error applies until Redis answers.
            logger.warning(
                "%s; starting anyway: on_error=%r applies until it answers", e, self.on_error
            )
        try:
            yield
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stops this event loop's heartbeat and listener and closes its
        connections, giving back the slots it still holds. Optional: a
        process that just exits leaves its slots to expire with their lease."""
        self._process_id()
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return (
            f"RedisScope({_redact(self.url)!r}, lease={self.lease}, "
            f"on_error={self.on_error!r}, key_prefix={self.key_prefix!r}"
            + (", cluster=True)" if self.cluster else ")")
        )


def fencing_token(request: object, resource: Resource) -> int:
    """The fencing token of the cluster slot of ``resource`` that the
    request being served holds (an endpoint limited by the decorator or a
    dependency)::

        @app.post("/orders")
        @limiter.resources([db])
        async def create(request: Request):
            token = fencing_token(request, db)

    Tokens grow strictly per resource: a write that carries its token and is
    refused when the stored token is larger cannot come from a holder whose
    lease ran out (see docs/operations.md). 0 for a request admitted by ``on_error``
    without a slot. Raises LookupError when the request holds no cluster
    slot of ``resource``. In ``async with limiter.acquire([db]) as permit``:
    ``permit.token(db)``."""
    scope = getattr(request, "scope", None)
    held = scope.get("state", {}).get(_TOKENS) if isinstance(scope, dict) else None
    stage = resource._cluster
    if not isinstance(held, dict) or stage is None or stage not in held:
        raise LookupError(f"the request holds no cluster slot of {resource.name!r}")
    return int(held[stage])


# Where the gates keep a request's fencing tokens (its ``state``): one map,
# cluster stage -> token, that every gate of the request adds to.
_TOKENS = "fastapi_concurrency_limiter.cluster"


def _check_cluster_url(url: str) -> None:
    if url.startswith("unix://"):
        raise ValueError(
            f"url must be a redis:// or rediss:// URL with cluster=True, got {_redact(url)!r}"
        )
    path = url.partition("://")[2].partition("?")[0].partition("/")[2]
    if path not in ("", "0"):
        raise ValueError(
            f"url must name database 0 (or none) with cluster=True: a Redis Cluster has "
            f"one database, got {_redact(url)!r}"
        )


def _redact(url: str) -> str:
    """``url`` without its credentials: the user name and password of the
    user info, and the value of every query option that may carry one."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL at all: it may be anything, a password included
        return "***"
    # The user info ends at the last '@' of the authority (up to the first
    # '/'), looked for before the query is split off: a password pasted
    # as it is may hold a '?'. An '@' in a query with no path before it
    # hides more than needed, never less.
    authority = rest.partition("/")[0]
    at = authority.rfind("@")
    shown = f"{scheme}{sep}"
    if at >= 0:
        shown += "***@"
        rest = rest[at + 1 :]
    rest, qmark, query = rest.partition("?")
    shown += rest
    if qmark:
        options = []
        for option in query.split("&"):
            key, eq, value = option.partition("=")
            if eq and any(word in key.lower() for word in _SECRET_OPTIONS):
                value = "***"
            options.append(f"{key}{eq}{value}")
        shown += "?" + "&".join(options)
    return shown


_SECRET_OPTIONS = ("pass", "user", "auth", "token", "secret", "key")


__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LEASE",
    "MINIMUM_REDIS_VERSION",
    "OnError",
    "RedisScope",
    "RedisScopeError",
    "RedisUnreachableError",
    "fencing_token",
]
