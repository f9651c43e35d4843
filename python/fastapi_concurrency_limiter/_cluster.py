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
best-effort in the background; a grant that arrives late is released. What
best-effort misses, the lease reclaims: only permits the process still holds
are renewed. When Redis is found unreachable, the requests waiting in its
queue get ``on_error`` at once.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from ._core import Outcome
from ._statistics import ClusterStatistics
from ._waiting import _Body
from .redis import RedisScopeError

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
# After a failure, requests go straight to on_error for this long (instead of
# each waiting for its own timeout); a successful heartbeat ends it earlier.
_DOWN_FOR = 1.0
# Seconds a request whose deadline has passed (a zero timeout: "try once")
# may still spend on its one acquire round trip.
_TRY_ONCE = 0.05
_GRANTED, _QUEUED, _NO_SLOT = 1, 0, -1


def _load_scripts() -> dict[str, str]:
    folder = resources.files(__package__).joinpath("_lua")
    common = folder.joinpath("common.lua").read_text()
    return {
        name: common + "\n" + folder.joinpath(f"{name}.lua").read_text()
        for name in ("acquire", "release", "cancel", "heartbeat")
    }


_SCRIPTS = _load_scripts()


class _Unserved(RedisConnectionError):
    """Redis answered with an error that says it cannot serve the call."""


class ClusterRefused(Exception):
    """The cluster stage turned a request away (the glue answers 503)."""

    def __init__(self, resource: str, reason: str) -> None:
        super().__init__(f"resource {resource!r}: {reason}")
        self.resource = resource
        self.reason = reason


class ClusterPermit:
    """One request's cluster slot; ``release()`` gives it back (in the
    background: the request does not wait for Redis)."""

    __slots__ = ("_stage", "_client", "_id", "__weakref__")

    def __init__(self, stage: ClusterStage, client: _Client, permit_id: str):
        self._stage = stage
        self._client: _Client | None = client
        self._id: str | None = permit_id

    def release(self) -> None:
        """From any thread. A permit that is never released (its holder
        dropped it) is no longer renewed once garbage-collected: its lease
        gives the slot back."""
        stage, client, permit_id = self._stage, self._client, self._id
        self._client = self._id = None
        if client is not None and permit_id is not None:
            client.release(stage, permit_id)


class ClusterStage:
    """One cluster-scoped resource in this process."""

    def __init__(self, scope: RedisScope, name: str, capacity: int) -> None:
        self.scope = scope
        self.name = name
        self.capacity = capacity
        tag = "{" + f"{scope.key_prefix}:{name}" + "}"
        self.keys = tuple(
            f"{tag}:{k}" for k in ("holders", "queue", "ticket", "wexp", "wmeta", "config", "procs")
        )
        self.notify_prefix = f"{tag}:notify:"
        self.in_use = 0  # cluster-wide, from the last reply
        self.processes = 0  # at the last heartbeat
        self.admitted_unlimited_total = 0
        self.unavailable_total = 0

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
        )


@dataclass
class _Waiter:
    stage: ClusterStage
    # True: granted; False: its deadline came or its client left; None:
    # Redis became unreachable (the request gets on_error).
    future: asyncio.Future[bool | None]
    deadline: float | None


class _Client:
    """This process's connection to one Redis on one event loop."""

    def __init__(self, scope: RedisScope, loop: asyncio.AbstractEventLoop) -> None:
        self.scope = scope
        self.loop = loop
        self.process = scope._process_id()
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": scope.timeout,
        }
        # BLPOP blocks for up to a heartbeat; its reply may take that long.
        self._block = max(0.1, scope.heartbeat)
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
        else:
            # Retries are ours: one, with the same waiter id (idempotent).
            options["retry"] = Retry(NoBackoff(), 0)
            self.redis = aioredis.Redis.from_url(scope.url, socket_timeout=scope.timeout, **options)
            self.listen_redis = aioredis.Redis.from_url(
                scope.url,
                socket_timeout=self._block + scope.timeout,
                single_connection_client=True,
                **options,
            )
        self.scripts = {name: self.redis.register_script(text) for name, text in _SCRIPTS.items()}
        self.waiters: dict[str, _Waiter] = {}
        # Held permits, weakly: one that its holder dropped without
        # releasing is not renewed (its lease then gives the slot back).
        # A plain dict, so that statistics() may copy it from another thread.
        self.held: dict[str, weakref.ref[ClusterPermit]] = {}
        # Held permits admitted by on_error that Redis does not know yet.
        self.unrecorded: set[str] = set()
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
        self._closed = False

    # -- calls ------------------------------------------------------------

    def _keys(self, stage: ClusterStage) -> list[str]:
        return [*stage.keys, stage.notify_prefix + self.process]

    async def _call(self, name: str, stage: ClusterStage, *args: Any) -> Any:
        lease_ms = int(self.scope.lease * 1000)
        try:
            reply = await self.scripts[name](
                keys=self._keys(stage), args=[stage.capacity, lease_ms, self.process, *args]
            )
            self._down.pop(self._group(stage), None)
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

    def _misconfigured(self, error: BaseException) -> RedisScopeError | None:
        """The error that ``error`` means, when it says the scope is
        misconfigured rather than Redis unreachable."""
        seen: BaseException | None = error
        while seen is not None:
            message = str(seen)
            if isinstance(seen, AuthenticationError) or "NOAUTH" in message or (
                "WRONGPASS" in message
            ):
                return RedisScopeError(f"Redis refused the credentials of {self.scope!r}: {seen}")
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
            self.spawn(self.redis.lpush(lists[0], ""), stage)

    def new_id(self) -> str:
        return f"{self.process}:{next(self._ids)}"

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
            status, in_use = await self._send_acquire(stage, waiter_id, deadline)
        except BaseException:
            # Unknown whether Redis took it: take it back, best-effort.
            self.waiters.pop(waiter_id, None)
            self.spawn(self._cancel(stage, waiter_id), stage)
            raise
        stage.in_use = in_use
        if status == _GRANTED:
            self.waiters.pop(waiter_id, None)
            return self._hold(stage, waiter_id)
        if status == _NO_SLOT:
            self.waiters.pop(waiter_id, None)
            raise ClusterRefused(stage.name, "timeout")
        return await self._wait(waiter, waiter_id, request)

    async def _send_acquire(
        self, stage: ClusterStage, waiter_id: str, deadline: float | None
    ) -> tuple[int, int]:
        for attempt in (0, 1):
            left = None if deadline is None else deadline - self.loop.time()
            wait_ms = -1 if left is None else max(0, int(left * 1000))
            call = self._call("acquire", stage, waiter_id, wait_ms)
            try:
                if left is not None and left < self.scope.timeout:
                    # The request's deadline comes before the command's. A
                    # deadline that has (almost) passed still gets one try.
                    reply = await asyncio.wait_for(call, max(left, _TRY_ONCE))
                else:
                    reply = await call
                return int(reply[0]), int(reply[1])
            except RedisConnectionError:
                # A blip: the script may have run without its reply reaching
                # us. Retrying with the same waiter id is safe.
                if attempt or (deadline is not None and deadline <= self.loop.time()):
                    raise
            except asyncio.TimeoutError:
                if deadline is not None and deadline <= self.loop.time():
                    raise ClusterRefused(stage.name, "timeout") from None
                raise
        raise AssertionError("unreachable")

    async def _wait(
        self, waiter: _Waiter, waiter_id: str, request: Request | None
    ) -> ClusterPermit:
        stage, future, deadline = waiter.stage, waiter.future, waiter.deadline
        timer = None
        if deadline is not None:
            timer = self.loop.call_at(deadline, _set_unless_done, future, False)
        body = watcher = None
        left = _Disconnect(future)
        if request is not None and not future.done():
            # As in the local stage: a client that leaves ends the wait.
            body = _Body(request.receive)
            watcher = self.loop.create_task(body.watch(left))
        try:
            granted = await future
        except BaseException:
            self._abandon(stage, waiter_id)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if watcher is not None and body is not None and request is not None:
                watcher.cancel()
                body.hand_back(request)
        if granted is None:
            self._abandon(stage, waiter_id)
            raise RedisConnectionError("Redis became unreachable while the request waited")
        if not granted:
            self._abandon(stage, waiter_id)
            raise ClusterRefused(stage.name, "disconnected" if left.happened else "timeout")
        return self._hold(stage, waiter_id)

    def _hold(self, stage: ClusterStage, permit_id: str) -> ClusterPermit:
        permit = ClusterPermit(stage, self, permit_id)
        self.held[permit_id] = weakref.ref(permit)
        return permit

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
        left = None if deadline is None else max(deadline - self.loop.time(), _TRY_ONCE)
        try:
            await asyncio.wait_for(asyncio.shield(task), left)
        except asyncio.TimeoutError:
            if task.done():  # the heartbeat's own timeout: unreachable
                raise
            raise ClusterRefused(stage.name, "timeout") from None

    def permits(self) -> list[ClusterPermit]:
        return [p for ref in list(self.held.values()) if (p := ref()) is not None]

    def _abandon(self, stage: ClusterStage, waiter_id: str) -> None:
        """A wait ended without its slot: leave the queue, or pass on a slot
        granted at that instant."""
        self.waiters.pop(waiter_id, None)
        self.spawn(self._cancel(stage, waiter_id), stage)

    async def _cancel(self, stage: ClusterStage, waiter_id: str) -> None:
        reply = await self._call("cancel", stage, waiter_id)
        stage.in_use = int(reply[1])

    def release(self, stage: ClusterStage, permit_id: str) -> None:
        if threading.get_ident() != self._thread:
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.release, stage, permit_id)
            return
        self.held.pop(permit_id, None)
        if permit_id in self.unrecorded:  # Redis never knew it
            self.unrecorded.discard(permit_id)
            return
        self.spawn(self._release(stage, permit_id), stage)

    async def _release(self, stage: ClusterStage, permit_id: str) -> None:
        reply = await self._call("release", stage, permit_id)
        stage.in_use = int(reply[1])

    # -- background -------------------------------------------------------

    def spawn(self, coroutine: Any, stage: ClusterStage) -> None:
        """Runs a best-effort call about ``stage`` in the background;
        failures are left to the lease (an unreachable Redis is marked
        down)."""
        if self._closed or self.loop.is_closed():
            coroutine.close()
            return
        self._track(self.loop.create_task(coroutine), stage)

    def _track(self, task: asyncio.Task[Any], stage: ClusterStage) -> None:
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, stage))

    def _done(self, stage: ClusterStage, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            if isinstance(e, _UNREACHABLE):
                self.mark_down(e, stage)
            else:
                logger.warning("Redis call failed: %r", e)

    def is_down(self, stage: ClusterStage) -> bool:
        """Whether requests for ``stage`` go straight to on_error."""
        return self._down.get(self._group(stage), 0.0) > self.loop.time()

    def mark_down(self, error: BaseException, stage: ClusterStage) -> None:
        self._mark_down(error, self._group(stage))

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
            lists = [s.notify_prefix + self.process for s in self.stages if self._group(s) == group]
            self._listening[group] = lists
            try:
                item = await self.listen_redis.blpop(lists, timeout=self._block)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - anything: retry after a pause
                if isinstance(e, _UNREACHABLE):
                    self._mark_down(e, group)
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
            waiter = self.waiters.pop(waiter_id, None)
            if waiter is not None and not waiter.future.done():
                waiter.future.set_result(True)
            else:
                # Granted after its wait ended: give it back.
                stage = next((s for s in self.stages if key.startswith(s.notify_prefix)), None)
                if stage is not None:
                    self.spawn(self._release(stage, waiter_id), stage)

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.scope.heartbeat)
            failed: set[int] = set()
            for stage in list(self.stages):
                if self._group(stage) in failed:
                    continue  # not twice the timeout on one Redis (node)
                try:
                    await self.heartbeat(stage)
                except asyncio.CancelledError:
                    raise
                except _UNREACHABLE as e:
                    self.mark_down(e, stage)
                    failed.add(self._group(stage))
                except Exception as e:  # noqa: BLE001 - keep beating
                    logger.warning("Redis heartbeat failed: %r", e)

    async def heartbeat(self, stage: ClusterStage) -> None:
        """Renews this process's leases and waiters of ``stage``; queues
        again the waiters Redis lost."""
        now = self.loop.time()
        held = []
        for permit_id, ref in list(self.held.items()):
            permit = ref()
            if permit is None:  # dropped without release: let its lease end
                del self.held[permit_id]
                self.unrecorded.discard(permit_id)
            elif permit._stage is stage:
                held.append(permit_id)
        waiting: list[Any] = []
        for waiter_id, w in self.waiters.items():
            if w.stage is stage:
                left = -1 if w.deadline is None else max(0, int((w.deadline - now) * 1000))
                waiting += [waiter_id, left]
        reply = await asyncio.wait_for(
            self._call("heartbeat", stage, len(held), *held, *waiting), self.scope.timeout
        )
        stage.processes, stage.in_use = int(reply[0]), int(reply[1])
        for permit_id in held:
            self.unrecorded.discard(permit_id)
        for permit_id in reply[2]:
            if permit_id not in self.held:
                # Released while the heartbeat was on its way, which put it
                # back: release it again.
                self.spawn(self._release(stage, permit_id), stage)
        if int(reply[4]):
            logger.warning(
                "resource %r: %d request(s) running here (admitted by on_error, or whose lease "
                "ran out while Redis was unreachable) put the cluster over its limit; no slot "
                "is granted until the requests in flight are below it",
                stage.name,
                int(reply[4]),
            )
        for waiter_id in reply[3]:
            waiter = self.waiters.get(waiter_id)
            if waiter is not None and not waiter.future.done():
                self.spawn(self._requeue(waiter, waiter_id), stage)

    async def _requeue(self, waiter: _Waiter, waiter_id: str) -> None:
        try:
            status, in_use = await self._send_acquire(waiter.stage, waiter_id, waiter.deadline)
        except ClusterRefused:
            return  # its deadline has come: the loop timer ends the wait
        waiter.stage.in_use = in_use
        if status == _GRANTED and self.waiters.pop(waiter_id, None) is waiter:
            if not waiter.future.done():
                waiter.future.set_result(True)
            else:
                self.spawn(self._release(waiter.stage, waiter_id), waiter.stage)

    async def check(self, stages: Sequence[ClusterStage]) -> None:
        try:
            await self.redis.ping()
            for script in self.scripts.values():
                await self.redis.script_load(script.script)
        except (AuthenticationError, ResponseError, RedisClusterException) as e:
            problem = self._misconfigured(e)
            if problem is not None:
                raise problem from e
            raise
        for stage in stages:
            self._register(stage)
            await self.heartbeat(stage)

    async def aclose(self) -> None:
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        listeners = list(self._listeners.values())
        wake = [lists[0] for lists in self._listening.values() if lists]
        if wake:
            # Wake the blocked BLPOPs rather than cancel them (a cancelled
            # blocking read may take redis-py a while to unwind).
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(self.redis.lpush(key, "") for key in wake)),
                    self.scope.timeout,
                )
                await asyncio.wait(listeners, timeout=self.scope.timeout)
            except Exception:  # noqa: BLE001,S110 - cancelled below
                pass
        for listener in listeners:
            listener.cancel()
        for permit_id, permit in [(i, r()) for i, r in list(self.held.items())]:
            if permit is None or permit_id in self.unrecorded:
                continue
            try:
                await asyncio.wait_for(self._release(permit._stage, permit_id), self.scope.timeout)
            except Exception:  # noqa: BLE001,S110 - the lease reclaims it
                pass
        self.held.clear()
        self.unrecorded.clear()
        pending = [t for t in (*listeners, self._heartbeat, *self._tasks) if t is not None]
        if pending:
            # Bounded: a call stuck on a hung Redis ends with its timeout.
            await asyncio.wait(pending, timeout=self.scope.timeout)
        await self.redis.aclose()
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


def _set_unless_done(future: asyncio.Future[bool | None], value: bool) -> None:
    if not future.done():
        future.set_result(value)
