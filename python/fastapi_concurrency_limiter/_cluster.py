"""The Redis side of cluster scope: the protocol's client.

One ``_Client`` per process and event loop keeps a connection pool for the
scripts (one round trip each), one connection blocked on BLPOP of this
process's notify lists (0 round trips per waiter while waiting; in a Redis
Cluster one per hash slot, as a BLPOP's keys must share a slot), and a
heartbeat task that renews the process's leases and records the requests
admitted by ``on_error`` once Redis is back. A ``ClusterStage`` is one
resource's view: ``acquire()`` returns a ``ClusterPermit`` or raises
``ClusterRefused``.

Every wait keeps its local deadline even when Redis hangs: commands have a
timeout, the wait for a notification has the loop's timer. A wait that ends
without its slot (deadline, cancellation, Redis error) cancels in Redis
in the background; a grant that arrives late is released. Background
releases and cancellations are retried, and those that still fail go with
the next heartbeat; what never reaches Redis, the lease reclaims: only
permits the process still holds are renewed. When Redis is found
unreachable (a failure confirmed by a second one), the requests waiting in
its queue get ``on_error`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import itertools
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from ._core import Outcome
from ._statistics import ClusterStatistics
from ._waiting import _Body
from .redis import MINIMUM_REDIS_VERSION, RedisScopeError, RedisUnreachableError, _redact

try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.crc import key_slot
    from redis.exceptions import (
        AskError,
        AuthenticationError,
        ClusterDownError,
        MasterDownError,
        NoScriptError,
        RedisClusterException,
        ResponseError,
        SlotNotCoveredError,
        TryAgainError,
    )
    from redis.exceptions import (
        ConnectionError as RedisConnectionError,
    )
    from redis.exceptions import (
        TimeoutError as RedisTimeoutError,
    )
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise RedisScopeError(
        "scope=RedisScope(...) needs redis-py: pip install 'fastapi-concurrency-limiter[redis]'"
    ) from e

if TYPE_CHECKING:
    from starlette.requests import Request

    from .redis import RedisScope

logger = logging.getLogger("fastapi_concurrency_limiter.redis")
_T = TypeVar("_T")

# Redis is unreachable: refused, reset, timed out; in a Redis Cluster, the
# node of the resource's slot is down or no node can be reached.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
    ClusterDownError,
    MasterDownError,
    TryAgainError,
    SlotNotCoveredError,
    RedisClusterException,
)
# Once a failure is confirmed (a second call fails, or a check right after
# it), requests go straight to on_error for this long (instead of each
# waiting for its own timeout); a successful call ends it earlier.
_DOWN_FOR = 1.0
# Attempts of a background release or cancellation before it is left to the
# next heartbeat, and the pause before each retry.
_BACKGROUND_RETRIES = (0.0, 0.05, 0.2)
# Seconds a request whose deadline has passed (a zero timeout: "try once")
# may still spend on its one acquire round trip.
_TRY_ONCE = 0.05
_GRANTED, _QUEUED, _NO_SLOT = 1, 0, -1

# Connections of a process's pool for the requests' scripts (per event
# loop). More concurrent calls wait for a connection: each call takes one
# for a single round trip, so a healthy Redis turns the pool over quickly,
# and a slow one is not made slower by hundreds of connections. The wait
# for a connection is bounded by the request's deadline and is never taken
# for Redis's silence: the silence bound starts once a connection is held.
_POOL_SIZE = 64
# Headroom in that pool beyond the calls that hold a turn (a script load,
# the start-up checks), so that a call holding a turn never waits for one.
_POOL_SPARE = 4
# The heartbeats, probes and confirmations have a pool of their own, never
# starved by the requests: at most one call per resource (heartbeat, probe)
# and per listener group (confirmation) at a time.
_CONTROL_POOL_SIZE = 1000


def _load_scripts() -> dict[str, str]:
    folder = resources.files(__package__).joinpath("_lua")
    common = folder.joinpath("common.lua").read_text()
    scripts = {
        name: common + "\n" + folder.joinpath(f"{name}.lua").read_text()
        for name in ("acquire", "release", "cancel", "heartbeat")
    }
    scripts["notify"] = folder.joinpath("notify.lua").read_text()
    return scripts


_SCRIPTS = _load_scripts()


class _Unserved(RedisConnectionError):
    """Redis answered with an error that says it cannot serve the call."""


class _NoTurn(Exception):
    """No pooled connection came free within the call's wait: the process
    is busy, Redis is not silent."""


# A background release or cancellation that failed so is tried again.
_RETRIED: tuple[type[BaseException], ...] = (*_UNREACHABLE, _NoTurn)


class ClusterRefused(Exception):
    """The cluster stage turned a request away (the glue answers 503)."""

    def __init__(self, resource: str, reason: str) -> None:
        super().__init__(f"resource {resource!r}: {reason}")
        self.resource = resource
        self.reason = reason


class ClusterPermit:
    """One request's cluster slot; ``release()`` gives it back (in the
    background: the request does not wait for Redis)."""

    __slots__ = ("_stage", "_client", "_id", "token", "since", "epoch", "__weakref__")

    def __init__(
        self,
        stage: ClusterStage,
        client: _Client,
        permit_id: str,
        token: int = 0,
        epoch: str = "",
    ):
        self._stage = stage
        self._client: _Client | None = client
        self._id: str | None = permit_id
        #: The grant's fencing token: strictly increasing per resource (0
        #: for a request admitted by on_error, which Redis did not grant).
        self.token = token
        # When Redis last held it for sure (ms, Redis's clock: the token
        # starts from it), and the resource's epoch then: what a renewal or
        # a release sends for Redis to tell a stale one.
        self.since = token // 1000
        self.epoch = epoch

    def proof(self) -> _Proof:
        return (self.token, self.since, self.epoch)

    def release(self) -> None:
        """From any thread. A permit that is never released (its holder
        dropped it) is no longer renewed once garbage-collected: its lease
        gives the slot back."""
        stage, client, permit_id = self._stage, self._client, self._id
        self._client = self._id = None
        if client is not None and permit_id is not None:
            client.release(stage, permit_id, self.proof())


class ClusterStage:
    """One cluster-scoped resource in this process."""

    def __init__(self, scope: RedisScope, name: str, capacity: int) -> None:
        self.scope = scope
        self.name = name
        self.capacity = capacity
        tag = "{" + f"{scope.key_prefix}:{name}" + "}"
        self.keys = tuple(
            f"{tag}:{k}"
            for k in (
                "holders", "queue", "ticket", "wexp", "wmeta", "config", "procs",
                "fence", "tokens", "filled",
            )
        )  # fmt: skip
        self.notify_prefix = f"{tag}:notify:"
        self.in_use = 0  # cluster-wide, from the last reply
        self.processes = 0  # at the last heartbeat
        self.admitted_unlimited_total = 0
        self.unavailable_total = 0
        self.leases_lost_total = 0

    @property
    def local_share(self) -> int:
        """Slots this process may use under on_error="local"."""
        if self.processes <= 0:
            return 1
        return max(1, self.capacity // self.processes)

    async def acquire(
        self, deadline: float | None, request: Request | None = None
    ) -> ClusterPermit:
        """Takes a cluster slot, waiting until ``deadline`` (loop time;
        ``None``: no limit). Raises ClusterRefused (reason ``"timeout"``,
        ``"unavailable"``, or ``"disconnected"`` when ``request``'s client
        leaves while it waits), or RedisScopeError on misconfiguration."""
        client = self.scope._client()
        if client.is_down(self):
            return self._on_error(client)
        try:
            if client.has_unrecorded(self):
                # Back after an outage: the requests admitted by on_error
                # count before this one may take a slot.
                await client.record(self, deadline)
            return await client.acquire(self, deadline, request)
        except _UNREACHABLE as e:
            client.mark_down(e, self)
            return self._on_error(client)

    def _on_error(self, client: _Client) -> ClusterPermit:
        mode = self.scope.on_error
        if mode == "allow" or (mode == "local" and self._used_here() < self.local_share):
            self.admitted_unlimited_total += 1
            # Held as any permit, and recorded in Redis by the first
            # heartbeat that reaches it.
            return client.hold_unrecorded(self)
        self.unavailable_total += 1
        raise ClusterRefused(self.name, "unavailable")

    def _used_here(self) -> int:
        """Slots this process uses: cluster slots held, admissions by
        on_error included."""
        return sum(1 for c in self.scope._clients.values() for p in c.permits() if p._stage is self)

    def statistics(self) -> ClusterStatistics:
        clients = list(self.scope._clients.values())
        down = any(c.is_down(self) for c in clients if not c.loop.is_closed())
        return ClusterStatistics(
            in_use=self.in_use,
            held_here=sum(1 for c in clients for p in c.permits() if p._stage is self),
            waiting_here=sum(
                1 for c in clients for w in list(c.waiters.values()) if w.stage is self
            ),
            processes=self.processes,
            reachable=not down,
            admitted_unlimited_total=self.admitted_unlimited_total,
            unavailable_total=self.unavailable_total,
            leases_lost_total=self.leases_lost_total,
        )


@dataclass
class _Waiter:
    stage: ClusterStage
    # True: granted; False: its deadline came or its client left; None:
    # Redis became unreachable (the request gets on_error).
    future: asyncio.Future[bool | None]
    deadline: float | None
    # Redis answered that it queued this waiter: only such waiters are
    # renewed (and, when Redis lost them, queued again) by the heartbeat.
    queued: bool = False
    # The fencing token of its grant, and the resource's epoch then.
    token: int = 0
    epoch: str = ""


@dataclass
class _Beats:
    """The heartbeat loop's state: the resources whose renewal is on its
    way, those of them that sat a round out meanwhile, the rounds running."""

    on_way: set[ClusterStage] = field(default_factory=set)
    late: set[ClusterStage] = field(default_factory=set)
    rounds: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class _Beat:
    """A heartbeat's call: the permits it renews and the releases and
    cancellations it sends (id -> what tells a stale one: token, since,
    epoch; a cancellation's token is 0), and its arguments."""

    tokens: dict[str, _Proof]
    given_back: dict[str, _Proof]
    args: list[Any]


class _Client:
    """This process's connection to one Redis on one event loop."""

    def __init__(self, scope: RedisScope, loop: asyncio.AbstractEventLoop) -> None:
        self.scope = scope
        self.loop = loop
        self.process = scope._process_id()
        # This client's own id (a process has one client per event loop):
        # its notify list and the prefix of its waiter ids. A grant for a
        # waiter of this loop reaches this loop's listener only.
        self.id = f"{self.process}.{next(_CLIENT_IDS)}"
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": scope.timeout,
        }
        # BLPOP blocks for up to a heartbeat; its reply may take that long.
        self._block = max(0.1, scope.heartbeat)
        self._pool: Any = None
        self._control_pool: Any = None
        if scope.cluster:
            # Commands go to the node of their keys' slot. One retry (the
            # scripts are idempotent), for a redirection after a failover.
            options["retry"] = Retry(NoBackoff(), 1)
            self.redis: Any = RedisCluster.from_url(
                scope.url, socket_timeout=scope.timeout, **options
            )
            # One connection per blocked BLPOP, taken from its node's pool.
            self.listen_redis: Any = RedisCluster.from_url(
                scope.url, socket_timeout=self._block + scope.timeout, **options
            )
            # Its pools (one per node) do not make calls wait.
            self.control: Any = self.redis
        else:
            # Retries are ours: one, with the same waiter id (idempotent).
            options["retry"] = Retry(NoBackoff(), 0)
            # A burst of calls waits for its turn (``_turns``) rather than
            # failing (redis-py's default pool raises past its size, which
            # would look like an outage); each wait is bounded by the
            # request's deadline, and a call that has its turn finds a
            # connection at once.
            self._pool = aioredis.BlockingConnectionPool.from_url(
                scope.url,
                max_connections=_POOL_SIZE + _POOL_SPARE,
                timeout=None,
                socket_timeout=scope.timeout,
                **options,
            )
            self.redis = aioredis.Redis(connection_pool=self._pool)
            self._control_pool = aioredis.ConnectionPool.from_url(
                scope.url,
                max_connections=_CONTROL_POOL_SIZE,
                socket_timeout=scope.timeout,
                **options,
            )
            self.control = aioredis.Redis(connection_pool=self._control_pool)
            self.listen_redis = aioredis.Redis.from_url(
                scope.url,
                socket_timeout=self._block + scope.timeout,
                single_connection_client=True,
                **options,
            )
        # Turns for the requests' calls: one per pooled connection.
        self._turns = asyncio.Semaphore(_POOL_SIZE)
        self.shas = {name: _sha1(text) for name, text in _SCRIPTS.items()}
        # Scripts are loaded once (on every master of a Redis Cluster)
        # before the first call, and again after a NOSCRIPT reply.
        self._scripts_version = 0  # 0: not loaded yet
        self._loading: asyncio.Lock | None = None
        self.waiters: dict[str, _Waiter] = {}
        # Held permits, weakly: one that its holder dropped without
        # releasing is not renewed (its lease then gives the slot back).
        # A plain dict, so that statistics() may copy it from another thread.
        self.held: dict[str, weakref.ref[ClusterPermit]] = {}
        # Held permits admitted by on_error that Redis does not know yet.
        self.unrecorded: set[str] = set()
        # Ids granted to a waiter whose request has not taken its permit
        # yet (the listener must not give them back).
        self._granting: set[str] = set()
        # Releases (with their fencing token) and cancellations (token 0)
        # that did not reach Redis, by stage: sent with the next heartbeat.
        self.pending: dict[ClusterStage, dict[str, _Proof]] = {}
        # Failed calls in a row, by listener group; a success resets it.
        self._failures: dict[int, int] = {}
        self._confirming: dict[int, asyncio.Task[None]] = {}
        self._thread = threading.get_ident()
        self.stages: list[ClusterStage] = []
        # Loop time until which requests go straight to on_error, by listener
        # group: a single Redis is one; in a Redis Cluster a node that is
        # down affects only the resources whose slots it serves.
        self._down: dict[int, float] = {}
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        # One listener (a task with its blocked BLPOP) per group of notify
        # lists: one group with a single Redis; one per hash slot in a Redis
        # Cluster, where the keys of one BLPOP must share a slot.
        self._listeners: dict[int, asyncio.Task[None]] = {}
        self._listening: dict[int, list[str]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._recording: dict[ClusterStage, asyncio.Task[None]] = {}
        self._probes: dict[ClusterStage, asyncio.Task[None]] = {}
        self._closed = False

    # -- calls ------------------------------------------------------------

    def _keys(self, stage: ClusterStage) -> list[str]:
        return [*stage.keys[:7], stage.notify_prefix + self.id, *stage.keys[7:]]

    async def _load_scripts(self, seen: int = 0) -> None:
        """Loads the scripts unless they were loaded after version ``seen``
        (the one that was missing: a restarted Redis or a promoted replica
        may lack them). One load at a time per client."""
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            if self._scripts_version != seen:
                return  # loaded meanwhile
            for text in _SCRIPTS.values():
                # On every master in a Redis Cluster.
                await self.control.script_load(text)
            self._scripts_version = seen + 1

    async def _evalsha(
        self, name: str, keys: list[str], args: list[Any], control: bool = False
    ) -> Any:
        # ``control``: a renewal or a wake-up, on the connection that
        # ``_control_connection`` opened beforehand (never on a pooled one
        # that might have to be opened within the call's bound).
        redis = (_CONTROL.get() or self.control) if control else self.redis
        if self._scripts_version == 0:
            await self._load_scripts()
        version = self._scripts_version
        try:
            return await redis.evalsha(self.shas[name], len(keys), *keys, *args)
        except NoScriptError:
            await self._load_scripts(version)
            return await redis.evalsha(self.shas[name], len(keys), *keys, *args)

    async def _turn(self, until: float | None) -> bool:
        """Waits for a turn to use a pooled connection until ``until`` (loop
        time; ``None``: no limit); False when none came in time. Waiting
        for a turn is no sign of Redis's health."""
        if until is None:
            await self._turns.acquire()
            return True
        if not self._turns.locked():
            # A free turn is taken without waiting (nor a task for a timer).
            await self._turns.acquire()
            return True
        left = until - self.loop.time()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(self._turns.acquire(), left)
        except asyncio.TimeoutError:
            return False
        return True

    async def _run(
        self,
        name: str,
        stage: ClusterStage,
        *args: Any,
        bound: float | None,
        until: float | None = None,
    ) -> Any:
        """Runs script ``name`` through the requests' pool: waits for a
        turn until ``until`` (raises _NoTurn when none comes in time), then
        lets Redis answer within ``bound`` seconds (``None``: no limit)
        from the moment the call holds its connection."""
        if not await self._turn(until):
            raise _NoTurn()
        try:
            call = self._call(name, stage, *args)
            return await (call if bound is None else asyncio.wait_for(call, bound))
        finally:
            self._turns.release()

    def _args(self, stage: ClusterStage, *args: Any) -> list[Any]:
        return [stage.capacity, int(self.scope.lease * 1000), self.process, *args]

    async def _call(self, name: str, stage: ClusterStage, *args: Any, control: bool = False) -> Any:
        return await self._interpret(
            name, stage, self._evalsha(name, self._keys(stage), self._args(stage, *args), control)
        )

    async def _interpret(self, name: str, stage: ClusterStage, call: Any) -> Any:
        """The reply of script ``name`` about ``stage``: ``call`` is the call
        to await (or its reply, or the exception it raised); raises
        RedisScopeError on misconfiguration, one of _UNREACHABLE when Redis
        cannot serve it."""
        group = self._group(stage)
        try:
            if isinstance(call, BaseException):
                raise call
            reply = await call if asyncio.iscoroutine(call) else call
            self._down.pop(group, None)
            self._failures.pop(group, None)
            self._wake(stage, reply[-1])
            return reply
        except (AuthenticationError, ResponseError, RedisClusterException) as e:
            message = str(e)
            if "CAPACITY_MISMATCH" in message:
                raise RedisScopeError(
                    f"resource {stage.name!r}: {message.split('CAPACITY_MISMATCH', 1)[1].strip()}"
                    " (every process must use the same capacity for one name)"
                ) from e
            problem = self._misconfigured(e)
            if problem is not None:
                raise problem from e
            if isinstance(e, ResponseError):
                # Redis cannot serve the call (a replica after a failover:
                # READONLY; LOADING, BUSY, OOM, CLUSTERDOWN...): for
                # requests, as unreachable.
                raise _Unserved(message) from e
            raise
        except _UNREACHABLE:
            raise
        except Exception as e:  # noqa: BLE001 - an unexpected failure of the client
            # Not a misconfiguration we know of: for the request, as an
            # unreachable Redis (on_error applies), not a 500.
            logger.warning("Redis call %r failed unexpectedly", name, exc_info=True)
            raise _Unserved(f"{type(e).__name__}: {e}") from e

    def _wake(self, stage: ClusterStage, notices: Sequence[str]) -> None:
        """Delivers the grants a script made: to this client's own waiters
        at once, to other clients through their notify lists (in the
        background; a wake-up that fails is made up for by the waiter's
        heartbeat)."""
        own = stage.notify_prefix + self.id
        for i in range(0, len(notices) - 1, 2):
            key, grant = str(notices[i]), str(notices[i + 1])
            if key == own:
                self._deliver(stage, grant)
            else:
                self.spawn(self._notify(key, grant), stage)

    async def _notify(self, key: str, waiter_id: str) -> None:
        # On a control connection, opened beforehand: a wake-up is never
        # lost to a burst of requests or to the opening of a connection.
        ttl_ms = int(3 * self.scope.lease * 1000)
        async with self._control_connection() as redis:
            on = _CONTROL.set(redis)
            try:
                await asyncio.wait_for(
                    self._evalsha("notify", [key], [waiter_id, ttl_ms], control=True),
                    self.scope.timeout,
                )
            finally:
                _CONTROL.reset(on)

    def _deliver(self, stage: ClusterStage | None, grant: str) -> None:
        """A grant (``"waiter-id token epoch"``) for a waiter of this client: the
        waiter gets the slot; a grant that came after its wait ended is
        given back."""
        waiter_id, token, epoch = _grant_parts(grant)
        waiter = self.waiters.get(waiter_id)
        if waiter is not None and self._grant(waiter_id, waiter, token, epoch):
            return
        if waiter_id in self.held or waiter_id in self._granting:
            return  # the acquire's own reply granted it: in use
        if stage is not None:
            self.give_back(stage, waiter_id, "release", (token, token // 1000, epoch))

    def _misconfigured(self, error: BaseException) -> RedisScopeError | None:
        """The error that ``error`` means, when it says the scope is
        misconfigured rather than Redis unreachable."""
        seen: BaseException | None = error
        while seen is not None:
            message = str(seen)
            if "HELLO must be called with the client already authenticated" in message or (
                "NOAUTH" in message or "Authentication required" in message
            ):
                return RedisScopeError(
                    f"Redis at {_redact(self.scope.url)} requires a password, and the URL "
                    "gives none: redis://:PASSWORD@host:port/db (or redis://USER:PASSWORD@...)"
                )
            if isinstance(seen, AuthenticationError) or "WRONGPASS" in message:
                return RedisScopeError(
                    f"Redis refused the credentials of {self.scope!r}: {seen} "
                    "(check the user name and password in the URL)"
                )
            if "DB index is out of range" in message:
                return RedisScopeError(
                    f"Redis at {_redact(self.scope.url)} has no such database: the URL's /db "
                    "must be below the server's `databases` setting (16 by default)"
                )
            if isinstance(seen, AskError) and not self.scope.cluster:  # MOVED or ASK
                return RedisScopeError(
                    f"Redis at {self.scope!r} is a node of a Redis Cluster: "
                    "use RedisScope(..., cluster=True)"
                )
            if "Cluster mode is not enabled" in message:
                return RedisScopeError(
                    f"Redis at {self.scope!r} is not a Redis Cluster: "
                    "use RedisScope(...) without cluster=True"
                )
            seen = seen.__cause__ or seen.__context__
        return None

    def _group(self, stage: ClusterStage) -> int:
        """The listener that reads ``stage``'s notify list."""
        return key_slot(stage.notify_prefix.encode()) if self.scope.cluster else 0

    def _register(self, stage: ClusterStage) -> None:
        if stage in self.stages or self._closed:
            return
        self.stages.append(stage)
        if self._heartbeat is None:
            self._heartbeat = self.loop.create_task(self._heartbeat_loop())
        group = self._group(stage)
        if group not in self._listeners:
            self._listeners[group] = self.loop.create_task(self._listen_loop(group))
        elif lists := self._listening.get(group):
            # Wake the blocked BLPOP so that it listens to the new list too.
            self.spawn(self._notify(lists[0], ""), stage)

    def new_id(self) -> str:
        return f"{self.id}:{next(self._ids)}"

    async def acquire(
        self, stage: ClusterStage, deadline: float | None, request: Request | None
    ) -> ClusterPermit:
        self._register(stage)
        loop = self.loop
        waiter_id = self.new_id()
        future: asyncio.Future[bool | None] = loop.create_future()
        # Registered before the call: a grant may be notified before its reply.
        waiter = self.waiters[waiter_id] = _Waiter(stage, future, deadline)
        try:
            status, in_use, token, epoch = await self._send_acquire(stage, waiter_id, deadline)
        except BaseException:
            # Unknown whether Redis took it: take it back (retried).
            self.waiters.pop(waiter_id, None)
            self._granting.discard(waiter_id)
            self.give_back(stage, waiter_id, "cancel")
            raise
        stage.in_use = in_use
        if status == _GRANTED:
            self.waiters.pop(waiter_id, None)
            return self._hold(stage, waiter_id, token, epoch)
        if status == _NO_SLOT:
            self.waiters.pop(waiter_id, None)
            raise ClusterRefused(stage.name, "timeout")
        waiter.queued = True
        return await self._wait(waiter, waiter_id, request)

    async def _send_acquire(
        self, stage: ClusterStage, waiter_id: str, deadline: float | None
    ) -> tuple[int, int, int, str]:
        for attempt in (0, 1):
            # The wait for a pooled connection is bounded by the deadline
            # (a deadline that has passed: one try if one is free at once)
            # and answered "timeout": the process is busy, Redis is not
            # silent.
            if not await self._turn(deadline):
                raise ClusterRefused(stage.name, "timeout")
            try:
                left = None if deadline is None else deadline - self.loop.time()
                wait_ms = -1 if left is None else max(0, int(left * 1000))
                call = self._call("acquire", stage, waiter_id, wait_ms)
                # Counted from now, the connection held: never past the
                # request's deadline (a script reload included), and a
                # silent Redis is found with time to spare for on_error:
                # never a "timeout" because Redis said nothing. A deadline
                # that has (almost) passed still gets one try.
                bound = _silence_bound(left, self.scope.timeout)
                if bound is not None:
                    reply = await asyncio.wait_for(call, bound)
                else:
                    reply = await call
                epoch = str(reply[3]) if len(reply) > 4 else ""
                return int(reply[0]), int(reply[1]), _token(reply[2]), epoch
            except RedisConnectionError:
                # A blip: the script may have run without its reply reaching
                # us. Retrying with the same waiter id is safe.
                if attempt or (deadline is not None and deadline <= self.loop.time()):
                    raise
            except asyncio.TimeoutError:
                raise RedisTimeoutError(
                    f"no answer within {bound:.3f} s (part of the request's deadline)"
                ) from None
            finally:
                self._turns.release()
        raise AssertionError("unreachable")

    async def _wait(
        self, waiter: _Waiter, waiter_id: str, request: Request | None
    ) -> ClusterPermit:
        stage, future, deadline = waiter.stage, waiter.future, waiter.deadline
        timer = probing = None
        probe: list[asyncio.Task[None]] = []
        if deadline is not None:
            timer = self.loop.call_at(deadline, _expire, future, probe)
            # A little before the deadline, a probe: if Redis has not
            # answered it by the deadline, Redis is silent and the request
            # gets on_error rather than "timeout".
            lead = _silence_bound(deadline - self.loop.time(), self.scope.timeout, 0.25)
            if lead is not None and deadline - lead > self.loop.time():
                probing = self.loop.call_at(deadline - lead, self._probe, stage, probe)
        body = watcher = None
        left = _Disconnect(future)
        if request is not None and not future.done():
            # As in the local stage: a client that leaves ends the wait.
            body = _Body(request.receive)
            watcher = self.loop.create_task(body.watch(left))
        try:
            granted = await future
        except BaseException:
            self._granting.discard(waiter_id)
            self._abandon(stage, waiter_id)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if probing is not None:
                probing.cancel()
            if watcher is not None and body is not None and request is not None:
                watcher.cancel()
                body.hand_back(request)
        if granted is None:
            self._abandon(stage, waiter_id)
            raise RedisConnectionError("Redis became unreachable while the request waited")
        if not granted:
            self._abandon(stage, waiter_id)
            raise ClusterRefused(stage.name, "disconnected" if left.happened else "timeout")
        return self._hold(stage, waiter_id, waiter.token, waiter.epoch)

    def _probe(self, stage: ClusterStage, into: list[asyncio.Task[None]]) -> None:
        """Checks that Redis answers (the node of ``stage``'s slot), sharing
        a probe already on its way; ``into`` receives the probe's task."""
        task = self._probes.get(stage)
        if task is None or task.done():
            if self._closed:
                return
            task = self._probes[stage] = self.loop.create_task(self._run_probe(stage))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(_consume)
        into.append(task)

    async def _run_probe(self, stage: ClusterStage) -> None:
        try:
            async with self._control_connection() as redis:
                await asyncio.wait_for(redis.exists(stage.keys[5]), self.scope.timeout)
        except _UNREACHABLE as e:
            self._suspect(e, self._group(stage), stage)
            raise

    def _hold(
        self, stage: ClusterStage, permit_id: str, token: int = 0, epoch: str = ""
    ) -> ClusterPermit:
        permit = ClusterPermit(stage, self, permit_id, token, epoch)
        self.held[permit_id] = weakref.ref(permit)
        self._granting.discard(permit_id)
        return permit

    def _grant(self, waiter_id: str, waiter: _Waiter, token: int = 0, epoch: str = "") -> bool:
        """Ends ``waiter``'s wait with its slot, if it still waits."""
        if self.waiters.get(waiter_id) is not waiter or waiter.future.done():
            return False
        waiter.token = token
        waiter.epoch = epoch
        del self.waiters[waiter_id]
        self._granting.add(waiter_id)
        waiter.future.set_result(True)
        return True

    def hold_unrecorded(self, stage: ClusterStage) -> ClusterPermit:
        """A permit admitted by on_error: held here, recorded in Redis by
        the next heartbeat that reaches it."""
        self._register(stage)
        permit_id = self.new_id()
        self.unrecorded.add(permit_id)
        return self._hold(stage, permit_id)

    def has_unrecorded(self, stage: ClusterStage) -> bool:
        for permit_id in list(self.unrecorded):
            ref = self.held.get(permit_id)
            if ref is not None and (permit := ref()) is not None and permit._stage is stage:
                return True
        return False

    async def record(self, stage: ClusterStage, deadline: float | None) -> None:
        """Records the permits on_error admitted (a heartbeat, shared by the
        requests that arrive meanwhile), within ``deadline``."""
        task = self._recording.get(stage)
        if task is None or task.done():
            task = self._recording[stage] = self.loop.create_task(self.heartbeat(stage))
            self._track(task, stage)
        left = None if deadline is None else deadline - self.loop.time()
        bound = _silence_bound(left, self.scope.timeout)
        try:
            await asyncio.wait_for(asyncio.shield(task), bound)
        except asyncio.TimeoutError:
            if task.done():  # the heartbeat's own timeout: unreachable
                raise
            # Redis is silent: on_error, not "timeout".
            raise RedisTimeoutError(f"no answer within {bound} s") from None

    def permits(self) -> list[ClusterPermit]:
        return [p for ref in list(self.held.values()) if (p := ref()) is not None]

    def _abandon(self, stage: ClusterStage, waiter_id: str) -> None:
        """A wait ended without its slot: leave the queue, or pass on a slot
        granted at that instant."""
        self.waiters.pop(waiter_id, None)
        self.give_back(stage, waiter_id, "cancel")

    def give_back(
        self, stage: ClusterStage, permit_id: str, script: str, proof: _Proof | None = None
    ) -> None:
        """Releases a permit or cancels a wait (``script``) in the
        background: retried, then left to the next heartbeat. Both are
        idempotent by id; a failure here never fails other requests."""
        if self._closed or self.loop.is_closed():
            return
        self._track(self.loop.create_task(self._give_back(stage, permit_id, script, proof)), stage)

    async def _give_back(
        self, stage: ClusterStage, permit_id: str, script: str, proof: _Proof | None = None
    ) -> None:
        proof = proof if script == "release" and proof is not None else _NO_PROOF
        error: BaseException | None = None
        for pause in _BACKGROUND_RETRIES:
            if pause:
                await asyncio.sleep(pause)
            try:
                args = (permit_id, *proof) if script == "release" else (permit_id,)
                reply = await self._run(
                    script,
                    stage,
                    *args,
                    bound=self.scope.timeout,
                    until=self.loop.time() + self.scope.timeout,
                )
            except _RETRIED as e:
                error = e
                continue
            stage.in_use = int(reply[1])
            if script == "release" and int(reply[0]) == 2:
                self._lease_lost(stage, permit_id, proof[0])
            return
        logger.info(
            "resource %r: %s of %s did not reach Redis (%s); the next heartbeat sends it",
            stage.name,
            script,
            permit_id,
            str(error) or type(error).__name__,
        )
        self.pending.setdefault(stage, {})[permit_id] = proof

    def release(self, stage: ClusterStage, permit_id: str, proof: _Proof = (0, 0, "")) -> None:
        if threading.get_ident() != self._thread:
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.release, stage, permit_id, proof)
            return
        if self.held.pop(permit_id, None) is None:
            return  # its lease was lost (already reported): nothing to give back
        if permit_id in self.unrecorded:  # Redis never knew it
            self.unrecorded.discard(permit_id)
            return
        self.give_back(stage, permit_id, "release", proof)

    async def _release(
        self, stage: ClusterStage, permit_id: str, proof: _Proof = (0, 0, "")
    ) -> None:
        reply = await self._run("release", stage, permit_id, *proof, bound=None)
        stage.in_use = int(reply[1])
        if int(reply[0]) == 2:
            self._lease_lost(stage, permit_id, proof[0])

    async def _cancel(self, stage: ClusterStage, waiter_id: str) -> None:
        reply = await self._run("cancel", stage, waiter_id, bound=None)
        stage.in_use = int(reply[1])

    def _lease_lost(self, stage: ClusterStage, permit_id: str, token: int | None) -> None:
        """Redis took back ``permit_id``'s slot after its lease ran out (the
        process could not renew it in time) and granted it again: its
        request ran, or runs, over the cluster limit, and its fencing token
        (``token``) is stale."""
        stage.leases_lost_total += 1
        logger.warning(
            "resource %r: the lease of permit %s (fencing token %s) ran out before it was "
            "renewed and Redis took its slot back; the request held it beyond its lease",
            stage.name,
            permit_id,
            token,
        )
        callback = self.scope.on_lease_lost
        if callback is not None:
            try:
                callback(stage.name, token)
            except Exception:  # noqa: BLE001 - the user's callback
                logger.exception("on_lease_lost failed")

    # -- background -------------------------------------------------------

    def spawn(self, coroutine: Any, stage: ClusterStage) -> None:
        """Runs a best-effort call about ``stage`` in the background;
        failures are logged (and left to the lease)."""
        if self._closed or self.loop.is_closed():
            coroutine.close()
            return
        self._track(self.loop.create_task(coroutine), stage)

    def _track(self, task: asyncio.Task[Any], stage: ClusterStage) -> None:
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, stage))

    def _done(self, stage: ClusterStage, task: asyncio.Task[Any]) -> None:
        # A background call that failed affects no request: the requests
        # waiting in Redis's queue keep waiting.
        self._tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            logger.warning("Redis call failed: %r", e)

    def is_down(self, stage: ClusterStage) -> bool:
        """Whether requests for ``stage`` go straight to on_error."""
        return self._down.get(self._group(stage), 0.0) > self.loop.time()

    def mark_down(self, error: BaseException, stage: ClusterStage) -> None:
        """A call about ``stage`` failed: Redis is declared unreachable for
        the other requests once confirmed (a second failure in a row, or a
        check that fails too); one slow reply is not an outage."""
        self._suspect(error, self._group(stage), stage)

    def _suspect(self, error: BaseException, group: int, stage: ClusterStage | None) -> None:
        if self.is_down_group(group):
            self._down[group] = self.loop.time() + _DOWN_FOR
            return
        failures = self._failures[group] = self._failures.get(group, 0) + 1
        if failures >= 2:
            self._mark_down(error, group)
            return
        if stage is None:
            stage = next((s for s in self.stages if self._group(s) == group), None)
        task = self._confirming.get(group)
        if stage is not None and (task is None or task.done()) and not self._closed:
            task = self._confirming[group] = self.loop.create_task(
                self._confirm(error, group, stage)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _confirm(self, error: BaseException, group: int, stage: ClusterStage) -> None:
        """Checks Redis (the node of ``stage``'s slot) after a failure."""
        try:
            # A keyed command: in a Redis Cluster, it goes to the slot's node.
            async with self._control_connection() as redis:
                await asyncio.wait_for(redis.exists(stage.keys[5]), self.scope.timeout)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - confirmed
            if self._failures.get(group, 0) >= 1:
                self._mark_down(error, group)
            return
        self._failures.pop(group, None)

    def is_down_group(self, group: int) -> bool:
        return self._down.get(group, 0.0) > self.loop.time()

    def _mark_down(self, error: BaseException, group: int) -> None:
        now = self.loop.time()
        if self._down.get(group, 0.0) <= now:
            logger.warning(
                "Redis unreachable (%s): on_error=%r applies",
                str(error) or type(error).__name__,
                self.scope.on_error,
            )
        self._down[group] = now + _DOWN_FOR
        # The requests waiting in Redis's queue (or about to join it) get
        # on_error now rather than at their deadlines.
        for waiter in list(self.waiters.values()):
            if not waiter.future.done() and self._group(waiter.stage) == group:
                waiter.future.set_result(None)

    async def _listen_loop(self, group: int) -> None:
        backoff = 0.05
        while not self._closed:
            lists = [s.notify_prefix + self.id for s in self.stages if self._group(s) == group]
            self._listening[group] = lists
            try:
                item = await _detached(self.listen_redis.blpop(lists, timeout=self._block))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - anything: retry after a pause
                if isinstance(e, _UNREACHABLE):
                    self._suspect(e, group, None)
                else:
                    logger.warning("Redis listener failed: %r", e)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            if item is None:
                continue
            key, waiter_id = str(item[0]), str(item[1])
            if not waiter_id:  # a wake-up to listen to a new list
                continue
            stage = next((s for s in self.stages if key.startswith(s.notify_prefix)), None)
            self._deliver(stage, waiter_id)

    async def _heartbeat_loop(self) -> None:
        # Rounds start every ``heartbeat`` seconds from the start of the
        # previous one, whether or not it has ended, and a round renews
        # every resource at once: a resource's lease is renewed every
        # ``heartbeat`` seconds however many resources there are and however
        # slow Redis is. A resource whose renewal is still on its way (its
        # connection opened again within ``timeout``, then the call within
        # ``_heartbeat_timeout``) sits the round out, so that one slow
        # renewal delays neither the others nor the next round; it is
        # renewed again as soon as that renewal ends, so that a lease still
        # sees a second try before it runs out.
        beats = _Beats()
        start = self.loop.time()
        try:
            while not self._closed:
                start = max(start + self.scope.heartbeat, self.loop.time())
                await asyncio.sleep(start - self.loop.time())
                beats.late.update(s for s in self.stages if s in beats.on_way)
                stages = [s for s in self.stages if s not in beats.on_way]
                if stages:
                    self._start_round(stages, beats)
        finally:
            for task in list(beats.rounds):
                task.cancel()
                task.add_done_callback(_consume)

    def _start_round(self, stages: list[ClusterStage], beats: _Beats) -> None:
        beats.on_way.update(stages)
        task = self.loop.create_task(self._round(stages, beats))
        beats.rounds.add(task)
        task.add_done_callback(beats.rounds.discard)

    async def _round(self, stages: list[ClusterStage], beats: _Beats) -> None:
        """One heartbeat round over ``stages``; each leaves ``beats.on_way``
        as its own renewal ends, and one that sat a round out meanwhile is
        renewed again at once. A failure to reach Redis is reported once per
        Redis (node)."""

        async def renew(stage: ClusterStage) -> None:
            try:
                await self.heartbeat(stage)
            except asyncio.CancelledError:
                beats.late.discard(stage)  # the loop is ending: no new round
                raise
            finally:
                beats.on_way.discard(stage)
                if stage in beats.late:
                    beats.late.discard(stage)
                    if not self._closed:
                        self._start_round([stage], beats)

        results = await asyncio.gather(*(renew(s) for s in stages), return_exceptions=True)
        failed: set[int] = set()
        cancelled = None
        for stage, result in zip(stages, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                cancelled = result  # after the others' failures are reported
            elif isinstance(result, _UNREACHABLE):
                if self._group(stage) not in failed:  # one failure per Redis (node)
                    failed.add(self._group(stage))
                    self.mark_down(result, stage)
            elif isinstance(result, BaseException):
                logger.warning("Redis heartbeat failed: %r", result)
        if cancelled is not None:
            raise cancelled

    @property
    def _heartbeat_timeout(self) -> float:
        """How long a renewal may take: ``timeout``, at most 0.9 of one
        heartbeat period, so that a lease sees at least two rounds before it
        ends, and a renewal that times out has ended before the next round
        starts (else its resource would sit that round out)."""
        return min(self.scope.timeout, 0.9 * self.scope.heartbeat)

    async def heartbeat(self, stage: ClusterStage) -> None:
        """Renews this process's leases and waiters of ``stage``; queues
        again the waiters Redis lost."""
        async with self._control_connection() as redis:
            beat = self._heartbeat_args(stage)
            on = _CONTROL.set(redis)
            try:
                reply = await asyncio.wait_for(
                    self._call("heartbeat", stage, *beat.args, control=True),
                    self._heartbeat_timeout,
                )
            finally:
                _CONTROL.reset(on)
        self._heartbeat_reply(stage, beat, reply)

    def _heartbeat_args(self, stage: ClusterStage) -> _Beat:
        now = self.loop.time()
        renewals: dict[str, _Proof] = {}
        for permit_id, ref in list(self.held.items()):
            permit = ref()
            if permit is None:  # dropped without release: let its lease end
                del self.held[permit_id]
                self.unrecorded.discard(permit_id)
            elif permit._stage is stage:
                # With what tells a stale renewal, which changes nothing.
                renewals[permit_id] = permit.proof()
        waiting: list[Any] = []
        for waiter_id, w in self.waiters.items():
            # Not those whose acquire is on its way: Redis may not know them
            # yet, which is no loss.
            if w.stage is stage and w.queued and not w.future.done():
                left = -1 if w.deadline is None else max(0, int((w.deadline - now) * 1000))
                waiting += [waiter_id, left]
        given_back = dict(self.pending.get(stage, {}))
        args = [
            len(renewals),
            *(x for i, proof in renewals.items() for x in (i, *proof)),
            len(given_back),
            *(x for i, proof in given_back.items() for x in (i, *proof)),
            *waiting,
        ]
        return _Beat(renewals, given_back, args)

    @contextlib.asynccontextmanager
    async def _control_connection(self) -> AsyncIterator[Any]:
        """A client on one connection of the control pool, opened (within
        ``timeout``) before the call it serves: the bound of a renewal or a
        probe counts Redis's answer only, not the opening of a connection."""
        pool = self._control_pool
        if pool is None:  # a Redis Cluster: its node pools do not make calls wait
            yield self.control
            return
        try:
            connection = await asyncio.wait_for(pool.get_connection(), self.scope.timeout)
        except asyncio.TimeoutError:
            raise RedisTimeoutError("no connection to Redis within the timeout") from None
        client = aioredis.Redis(connection_pool=pool)
        client.connection = connection
        try:
            yield client
        finally:
            client.connection = None
            await pool.release(connection)

    def _heartbeat_reply(self, stage: ClusterStage, beat: _Beat, reply: Any) -> None:
        tokens, given_back = beat.tokens, beat.given_back
        held = list(tokens)
        pending = self.pending.get(stage)
        if pending is not None:
            for permit_id in given_back:
                pending.pop(permit_id, None)
            if not pending:
                del self.pending[stage]
        stage.processes, stage.in_use = int(reply[0]), int(reply[1])
        for permit_id in held:
            self.unrecorded.discard(permit_id)
        for permit_id in reply[2]:
            if permit_id not in self.held:
                # Released while the heartbeat was on its way, which put it
                # back: release it again.
                self.give_back(stage, permit_id, "release", tokens.get(permit_id))
        if int(reply[4]):
            logger.warning(
                "resource %r: %d request(s) running here (admitted by on_error, or whose lease "
                "ran out while Redis was unreachable) put the cluster over its limit; no slot "
                "is granted until the requests in flight are below it",
                stage.name,
                int(reply[4]),
            )
        for grant in reply[5]:
            # Granted in Redis, its notification not read: it may have been
            # lost with its BLPOP reply (a reset connection, a reply later
            # than the socket timeout). The grant is delivered here, within
            # a heartbeat, rather than never.
            waiter_id, token, epoch = _grant_parts(str(grant))
            waiter = self.waiters.get(waiter_id)
            if waiter is not None and waiter.stage is stage:
                self._grant(waiter_id, waiter, token, epoch)
        for permit_id in reply[6]:
            # A stale renewal or release: its slot is no longer this
            # process's (not renewed, not released again).
            self.held.pop(permit_id, None)
            if permit_id in tokens:
                self._lease_lost(stage, permit_id, tokens[permit_id][0])
            elif permit_id in given_back:
                self._lease_lost(stage, permit_id, given_back[permit_id][0] or None)
        if len(reply) > 9:
            # The permits renewed (or put back) were held at Redis's ``now``.
            epoch, now = str(reply[7]), int(reply[8])
            for permit_id in tokens:
                ref = self.held.get(permit_id)
                permit = ref() if ref is not None else None
                if permit is not None and permit_id not in reply[6]:
                    permit.since, permit.epoch = now, epoch
        for waiter_id in reply[3]:
            waiter = self.waiters.get(waiter_id)
            if waiter is not None and waiter.queued and not waiter.future.done():
                waiter.queued = False  # until Redis has queued it again
                self.spawn(self._requeue(waiter, waiter_id), stage)

    async def _requeue(self, waiter: _Waiter, waiter_id: str) -> None:
        """Queues again a waiter Redis lost, unless its wait has ended."""
        stage = waiter.stage
        if self.waiters.get(waiter_id) is not waiter or waiter.future.done():
            return
        try:
            status, in_use, token, epoch = await self._send_acquire(
                stage, waiter_id, waiter.deadline
            )
        except ClusterRefused:
            return  # its deadline has come: the loop timer ends the wait
        except _UNREACHABLE:
            # Its wait goes on (or ends at its deadline); whatever the acquire
            # did in Redis is taken back if the wait ends meanwhile.
            if self.waiters.get(waiter_id) is not waiter or waiter.future.done():
                self.give_back(stage, waiter_id, "cancel")
            return
        stage.in_use = in_use
        if waiter_id in self.held or waiter_id in self._granting:
            return  # granted meanwhile (through its notify list)
        if self.waiters.get(waiter_id) is not waiter or waiter.future.done():
            # Its wait ended while the acquire was on its way (its own
            # cancel may have reached Redis first): take back what it got.
            if status != _NO_SLOT:
                self.give_back(stage, waiter_id, "cancel")
            return
        if status == _GRANTED:
            self._grant(waiter_id, waiter, token, epoch)
        elif status == _QUEUED:
            waiter.queued = True

    async def check(self, stages: Sequence[ClusterStage]) -> None:
        """Checks the configuration against Redis: credentials, database,
        ``cluster=``, the server's version, each resource's capacity.
        Raises RedisScopeError when it is wrong, RedisUnreachableError when
        Redis cannot be reached (the resources are registered all the same:
        the heartbeat finds Redis when it answers)."""
        try:
            await self.redis.ping()
            await self._check_version()
            await self._load_scripts(self._scripts_version)
            for stage in stages:
                self._register(stage)
                await self.heartbeat(stage)
        except RedisScopeError:
            raise
        except Exception as e:
            problem = self._misconfigured(e)
            if problem is not None:
                raise problem from e
            if not isinstance(e, (*_UNREACHABLE, ResponseError)):
                raise
            for stage in stages:
                self._register(stage)  # the heartbeat finds Redis when it answers
            for group in {self._group(stage) for stage in stages}:
                self._mark_down(e, group)
            raise RedisUnreachableError(
                f"Redis at {_redact(self.scope.url)} cannot be reached "
                f"({str(e) or type(e).__name__}): check that redis-server runs there and "
                "that this host may connect to it (host, port, TLS, firewall)"
            ) from e

    async def _check_version(self) -> None:
        info = await self.redis.info("server")
        found: list[str] = []
        if isinstance(info, dict) and "redis_version" in info:
            found.append(str(info["redis_version"]))
        elif isinstance(info, dict):  # a Redis Cluster: by node
            found += [str(i["redis_version"]) for i in info.values() if "redis_version" in i]
        for version in found:
            if _version(version) < MINIMUM_REDIS_VERSION:
                raise RedisScopeError(
                    f"Redis at {_redact(self.scope.url)} is version {version}; the cluster "
                    f"scope needs Redis {'.'.join(map(str, MINIMUM_REDIS_VERSION))} or later"
                )

    async def aclose(self) -> None:
        """Gives back the permits still held and stops the listeners and
        the heartbeat, within about one ``timeout`` in total however many
        permits are held: the releases go concurrently under one deadline
        (what does not reach Redis, the lease reclaims)."""
        self._closed = True
        deadline = self.loop.time() + self.scope.timeout
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        listeners = list(self._listeners.values())
        wake = [lists[0] for lists in self._listening.values() if lists]
        releases = [
            self._release(permit._stage, permit_id, permit.proof())
            for permit_id, permit in [(i, r()) for i, r in list(self.held.items())]
            if permit is not None and permit_id not in self.unrecorded
        ]
        self.held.clear()
        self.unrecorded.clear()
        # The requests waiting in Redis's queue: nobody will read their
        # grants any more. Their waits end now (on_error, as for an
        # unreachable Redis) and their cancellations go with the releases.
        for waiter_id, waiter in list(self.waiters.items()):
            releases.append(self._cancel(waiter.stage, waiter_id))
            if not waiter.future.done():
                waiter.future.set_result(None)
        self.waiters.clear()
        # Wake the blocked BLPOPs rather than cancel them (a cancelled
        # blocking read may take redis-py a while to unwind).
        calls = [asyncio.ensure_future(c) for c in releases]
        calls += [asyncio.ensure_future(self._notify(key, "")) for key in wake]
        # Background releases and cancellations already on their way, too.
        background = [*self._tasks]
        if calls or background or listeners:
            await asyncio.wait([*calls, *background, *listeners], timeout=self.scope.timeout)
        # Whatever has not ended by now is left to the lease.
        for call in calls:
            call.cancel()
            call.add_done_callback(_consume)
        pending = [t for t in (*listeners, self._heartbeat, *self._tasks) if t is not None]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=max(0.05, deadline - self.loop.time()))
        await self.redis.aclose()
        if self._pool is not None:
            await self._pool.disconnect()
            await self.control.aclose()
            await self._control_pool.disconnect()
        await self.listen_redis.aclose()


class _Disconnect:
    """Ends a cluster wait when the local stage's body watcher sees the
    client leave (it calls ``cancel`` as it would on an engine acquisition)."""

    __slots__ = ("_future", "happened")

    def __init__(self, future: asyncio.Future[bool | None]) -> None:
        self._future = future
        self.happened = False

    def cancel(self, reason: Outcome = Outcome.cancelled) -> None:
        if not self._future.done():
            self.happened = True
            self._future.set_result(False)


async def _detached(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Awaits ``coroutine`` in a task of its own: cancelling the caller (a
    background loop, when the event loop shuts down) ends the caller at
    once. redis-py may turn the cancellation of a blocked read into a
    timeout, which a loop that retries would take for a failed call and go
    on, so that ``asyncio.run()`` never returned."""
    task = asyncio.ensure_future(coroutine)
    try:
        await asyncio.wait((task,))
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_consume)
        raise
    return task.result()


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


# What tells a stale renewal or release (see stale in common.lua): the
# permit's fencing token, when Redis last held it for sure (ms), its epoch.
_Proof = tuple[int, int, str]
_NO_PROOF: _Proof = (0, 0, "")


def _grant_parts(grant: str) -> tuple[str, int, str]:
    """A grant's ``"waiter-id token epoch"``."""
    parts = grant.split(" ")
    token = _token(parts[1]) if len(parts) > 1 else 0
    return parts[0], token, parts[2] if len(parts) > 2 else ""


def _token(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis's script id


_CLIENT_IDS = itertools.count()
# The control connection the heartbeat's script runs on (see
# ``_Client._control_connection``).
_CONTROL: contextvars.ContextVar[Any] = contextvars.ContextVar("control", default=None)


def _expire(future: asyncio.Future[bool | None], probe: list[asyncio.Task[None]]) -> None:
    """A wait's deadline: "timeout", or on_error (None) when the probe sent
    a little before has not been answered (Redis is silent) or failed."""
    if future.done():
        return
    silent = bool(probe) and (
        not probe[0].done() or probe[0].cancelled() or probe[0].exception() is not None
    )
    future.set_result(None if silent else False)


def _silence_bound(left: float | None, timeout: float, share: float = 0.5) -> float | None:
    """How long a request with ``left`` seconds (``None``: no deadline) lets
    Redis stay silent before it counts as unreachable: the command
    ``timeout``, and at most ``share`` of what is left, so that on_error
    still applies in time (at least one short try)."""
    if left is None:
        return None
    return max(_TRY_ONCE, min(timeout, left * share))
