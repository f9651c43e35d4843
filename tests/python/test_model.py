"""Model-based test of the engine: random sequences of operations through the
binding, checked step by step against a plain Python model of the rules.

Hypothesis drives ``_core`` directly (Resource, ResourceSet from
Limiter.select, Acquisition, DeadlineQueue) with plain Python callbacks: no
event loop, so every grant, rejection and callback happens inside the call
that caused it, on this thread, in an order the model can predict. After
every step it checks that each resource's counters (``in_use``,
``waiting``, ``peak_in_use``, ``acquired_total``, ``rejected_total`` by
reason, the number of waits and holds observed) equal the model's, that
``in_use <= capacity``, that no slot sits free while a request waits for it,
that every acquisition's state, outcome and refusing resource are the
model's, and that the callbacks came in the model's order (which is the
order in which waiters were served). At the end, releasing everything must
leave every slot free.

The queue disciplines are modelled exactly:

- ``fifo`` and ``lifo``, with and without ``max_waiting`` (a full LIFO queue
  pushes its oldest waiter out).
- ``adaptive`` depends on how long waiters have waited, and the binding
  takes its time from the engine's own clock, so the test cannot drive it.
  Two configurations make its order independent of timing:
  * ``adaptive_target`` of a day: no waiter ever gets older than the target,
    so the queue never stands: FIFO, a full queue turns the newcomer away.
  * ``adaptive_target`` and ``adaptive_interval`` of 10 ns: every waiter
    queued by an earlier call is older than both (two calls into the engine
    are always more than 20 ns apart), so the queue stands exactly when more
    requests wait than the resource has slots, and then every waiter is
    shed before the next grant or enqueue. For that to hold, such a resource
    only ever comes first in its sets: a waiter then only ever joins its
    queue through ``start()``, never in the middle of another call.
  What these leave out is the window in which a standing queue serves its
  newest waiter first without shedding: it exists only while the oldest
  waiter's age lies between the target and target + interval, which only a
  clock the test could drive would make deterministic; the C++ suite
  (discipline_test.cc) covers it with real time.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fastapi_concurrency_limiter import _core

REASONS = (
    "timeout",
    "queue_full",
    "shed",
    "disconnected",
    "cancelled",
    "key_limit",
    "unavailable",
    "deadline",
    "predicted_timeout",
    "lower_priority",
)
DAY = 86400.0
TINY = 1e-8  # 10 ns
MAX_LIVE = 12  # acquisition objects alive at once

# The resource configurations: queue discipline, and the adaptive times.
KINDS = ("fifo", "lifo", "adaptive-never-standing", "adaptive-shedding")


# --- the reference model -----------------------------------------------------


@dataclass(eq=False)
class MResource:
    name: str
    kind: str
    capacity: int
    max_waiting: int | None
    in_use: int = 0
    queue: list[MAcquisition] = field(default_factory=list)  # oldest first
    peak_in_use: int = 0
    acquired: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    holds: int = 0  # slots given back (hold_seconds.count)
    hold_timed: bool = False  # a granted request gave a slot back

    def standing(self) -> bool:
        # See the module docstring: with a day-long target the queue never
        # stands; with 10 ns it stands as soon as it is longer than the
        # number of slots.
        return self.kind == "adaptive-shedding" and len(self.queue) > self.capacity


@dataclass(eq=False)
class MAcquisition:
    key: int
    resources: list[MResource]
    state: str = "idle"  # idle, pending, granted, rejected, released
    outcome: str = "pending"
    held: int = 0  # resources[:held] are held
    refused: int | None = None
    has_callback: bool = False

    @property
    def refused_by(self) -> str | None:
        if self.state in ("rejected", "idle") and self.refused is not None:
            return self.resources[self.refused].name
        return None


class Model:
    """The engine's rules, written plainly.

    Decisions taken under a resource's lock push "notices" (a waiter granted
    or turned away) that are handled in order once the call is done with its
    locks; handling one may push more. The callbacks of the acquisitions
    that finished are called after every notice, in the order they
    finished. cancel() calls its own callback last.
    """

    def __init__(self) -> None:
        self.notices: list[tuple[MAcquisition, int, str]] = []
        self.deferred: list[tuple[MAcquisition, str]] = []
        self.calls: list[tuple[int, str]] = []  # callbacks, in order

    # Each public operation of the engine, with the notices it fires.
    def _fire(self) -> None:
        while self.notices:
            acquisition, index, outcome = self.notices.pop(0)
            self._on_node_complete(acquisition, index, outcome)
        for acquisition, outcome in self.deferred:
            self.calls.append((acquisition.key, outcome))
        self.deferred.clear()

    def try_acquire(self, a: MAcquisition) -> bool:
        for i, r in enumerate(a.resources):
            if r.in_use >= r.capacity or r.queue:
                a.refused = i
                # Slots taken on the way are given back without a trace in
                # the counters, except the peak: they were held for an instant.
                for taken in a.resources[:i]:
                    taken.in_use -= 1
                return False
            r.in_use += 1
            r.peak_in_use = max(r.peak_in_use, r.in_use)
        for r in a.resources:
            r.acquired += 1
        a.held = len(a.resources)
        a.state, a.outcome, a.refused = "granted", "granted", None
        return True

    def start(self, a: MAcquisition) -> str:
        a.state = "pending"
        a.has_callback = True
        outcome = self._advance(a)
        if outcome != "pending":
            a.has_callback = False  # reported by the return value instead
        self._fire()
        return outcome

    def cancel(self, a: MAcquisition, reason: str) -> None:
        if a.state != "pending":
            return
        r = a.resources[a.held]
        r.queue.remove(a)
        r.rejected[reason] += 1
        self._reject(a, a.held, reason)
        own = a.has_callback
        a.has_callback = False
        self._fire()
        if own:
            self.calls.append((a.key, reason))

    def release(self, a: MAcquisition) -> None:
        if a.state != "granted":
            return
        self._release_held(a)
        a.state = "released"
        self._fire()

    def destroy(self, a: MAcquisition) -> None:
        """The Acquisition object goes away: a pending one is cancelled
        (counted, but nobody is called back), a granted one released."""
        if a.state == "pending":
            r = a.resources[a.held]
            r.queue.remove(a)
            r.rejected["cancelled"] += 1
            a.has_callback = False
            self._release_held(a)
            a.state, a.outcome = "rejected", "cancelled"
        elif a.state == "granted":
            self._release_held(a)
            a.state = "released"
        self._fire()

    # The rules under the locks.
    def _advance(self, a: MAcquisition) -> str:
        while a.held < len(a.resources):
            outcome = self._enqueue(a.resources[a.held], a)
            if outcome == "granted":
                a.held += 1
            elif outcome == "pending":
                return outcome
            else:
                self._reject(a, a.held, outcome)
                return outcome
        a.state = a.outcome = "granted"
        return "granted"

    def _enqueue(self, r: MResource, a: MAcquisition) -> str:
        if r.in_use < r.capacity and not r.queue:
            r.in_use += 1
            self._note_grant(r)
            return "granted"
        self._shed(r)
        if r.max_waiting is not None and len(r.queue) >= r.max_waiting:
            newest_first = r.kind == "lifo" or r.standing()
            if not newest_first or not r.queue:
                r.rejected["queue_full"] += 1
                return "queue_full"
            self._turn_away(r, r.queue[0], "queue_full")
        r.queue.append(a)
        return "pending"

    def _shed(self, r: MResource) -> None:
        if r.standing():
            while r.queue:  # every waiter is older than target + interval
                self._turn_away(r, r.queue[0], "shed")

    def _turn_away(self, r: MResource, waiter: MAcquisition, reason: str) -> None:
        r.queue.remove(waiter)
        r.rejected[reason] += 1
        self.notices.append((waiter, waiter.held, reason))

    def _note_grant(self, r: MResource) -> None:
        r.peak_in_use = max(r.peak_in_use, r.in_use)
        r.acquired += 1

    def _hand_over(self, r: MResource) -> None:
        if r.kind == "lifo":
            chosen = r.queue[-1] if r.queue else None
        else:
            self._shed(r)
            chosen = r.queue[0] if r.queue else None
        if chosen is None:
            r.in_use -= 1
            return
        r.queue.remove(chosen)
        self._note_grant(r)
        self.notices.append((chosen, chosen.held, "granted"))

    def _release_held(self, a: MAcquisition) -> None:
        while a.held > 0:  # last acquired first
            a.held -= 1
            r = a.resources[a.held]
            r.holds += 1
            # Only the holds of a granted request are timed (statistics.h).
            r.hold_timed = r.hold_timed or a.state == "granted"
            self._hand_over(r)

    def _reject(self, a: MAcquisition, index: int, reason: str) -> None:
        a.refused = index
        self._release_held(a)
        a.state, a.outcome = "rejected", reason

    def _on_node_complete(self, a: MAcquisition, index: int, outcome: str) -> None:
        if a.state != "pending" or index != a.held:
            return
        if outcome == "granted":
            a.held += 1
            final = self._advance(a)
            if final == "pending":
                return
        else:
            self._reject(a, index, outcome)
            final = outcome
        if a.has_callback:
            a.has_callback = False
            self.deferred.append((a, final))


# --- the state machine -------------------------------------------------------


resource_config = st.tuples(
    st.sampled_from(KINDS),
    st.integers(1, 3),  # capacity
    st.one_of(st.none(), st.integers(0, 3)),  # max_waiting
)


@dataclass(eq=False)
class Live:
    engine: Any  # _core.Acquisition
    model: MAcquisition


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.calls: list[tuple[int, str]] = []
        self.live: dict[int, Live] = {}
        self.keys = itertools.count()
        self.deadlines = _core.DeadlineQueue()
        self.deadline_of: dict[int, float] = {}  # the model's DeadlineQueue
        self.sequence = itertools.count()

    @initialize(configs=st.lists(resource_config, min_size=1, max_size=4))
    def create_resources(self, configs: list[tuple[str, int, int | None]]) -> None:
        self.resources: list[tuple[Any, MResource]] = []
        for i, (kind, capacity, max_waiting) in enumerate(configs):
            target = TINY if kind == "adaptive-shedding" else DAY
            queue = getattr(_core.QueueDiscipline, kind.split("-")[0])
            engine = _core.Resource(f"r{i}", capacity, max_waiting, queue, target, target)
            self.resources.append((engine, MResource(f"r{i}", kind, capacity, max_waiting)))
        limiter = _core.Limiter([engine for engine, _ in self.resources], 0.0)
        # Every non-empty subset, in registration order (the only order the
        # limiter accepts); a shedding adaptive resource only ever first.
        self.sets: list[tuple[Any, list[MResource]]] = []
        for size in range(1, len(self.resources) + 1):
            for chosen in itertools.combinations(self.resources, size):
                if any(m.kind == "adaptive-shedding" for _, m in chosen[1:]):
                    continue
                rset = limiter.select([engine for engine, _ in chosen])
                self.sets.append((rset, [m for _, m in chosen]))

    # Helpers.
    def _new(self, set_index: int) -> Live:
        if len(self.live) >= MAX_LIVE:  # forget the oldest finished one
            for old in self.live.values():
                if old.model.state in ("rejected", "released"):
                    self._drop(old)
                    break
        rset, resources = self.sets[set_index % len(self.sets)]
        key = next(self.keys)
        live = Live(_core.Acquisition(rset), MAcquisition(key, resources))
        self.live[key] = live
        return live

    def _callback(self, key: int) -> Callable[[Any], None]:
        calls = self.calls  # not self: the engine keeps the callback

        def callback(outcome: Any) -> None:
            calls.append((key, outcome.name))

        return callback

    def _pick(self, selector: int, *states: str) -> Live:
        lives = [v for v in self.live.values() if not states or v.model.state in states]
        return lives[selector % len(lives)]

    def _has(self, *states: str) -> bool:
        return any(v.model.state in states for v in self.live.values())

    def _room(self) -> bool:
        return len(self.live) < MAX_LIVE or self._has("rejected", "released")

    def _check_calls(self) -> None:
        assert self.calls == self.model.calls, "callbacks, in order"
        self.calls.clear()
        self.model.calls.clear()

    def _drop(self, live: Live) -> None:
        del self.live[live.model.key]
        self.deadline_of.pop(live.model.key, None)
        engine, live.engine = live.engine, None
        del engine  # the last reference: the C++ destructor runs here
        self.model.destroy(live.model)
        self._check_calls()

    # Rules: one call into the engine each (plus forgetting a finished
    # acquisition to make room).
    @precondition(_room)
    @rule(set_index=st.integers(0, 63))
    def start(self, set_index: int) -> None:
        live = self._new(set_index)
        outcome = live.engine.start(self._callback(live.model.key))
        assert outcome.name == self.model.start(live.model)
        self._check_calls()

    @precondition(_room)
    @rule(set_index=st.integers(0, 63))
    def try_acquire(self, set_index: int) -> None:
        live = self._new(set_index)
        assert live.engine.try_acquire() == self.model.try_acquire(live.model)
        self._check_calls()

    @precondition(lambda self: self._has("idle"))
    @rule(selector=st.integers(0, 63))
    def start_after_failed_try(self, selector: int) -> None:
        live = self._pick(selector, "idle")
        outcome = live.engine.start(self._callback(live.model.key))
        assert outcome.name == self.model.start(live.model)
        self._check_calls()

    @precondition(lambda self: self._has("pending"))
    @rule(selector=st.integers(0, 63), reason=st.sampled_from(["cancelled", "disconnected"]))
    def cancel(self, selector: int, reason: str) -> None:
        """A cancelled task, or a client that disconnected."""
        live = self._pick(selector, "pending")
        live.engine.cancel(getattr(_core.Outcome, reason))
        self.model.cancel(live.model, reason)
        self._check_calls()

    @precondition(lambda self: self._has("pending"))
    @rule(selector=st.integers(0, 63))
    def expire(self, selector: int) -> None:
        live = self._pick(selector, "pending")
        live.engine.expire()
        self.model.cancel(live.model, "timeout")
        self._check_calls()

    @precondition(lambda self: self._has("granted"))
    @rule(selector=st.integers(0, 63))
    def release(self, selector: int) -> None:
        live = self._pick(selector, "granted")
        live.engine.release()
        self.model.release(live.model)
        self._check_calls()

    @precondition(lambda self: self._has("idle", "rejected", "released"))
    @rule(selector=st.integers(0, 63), call=st.sampled_from(["cancel", "expire", "release"]))
    def call_when_not_waiting(self, selector: int, call: str) -> None:
        """cancel/expire of what no longer waits, release of what holds
        nothing (e.g. twice): no effect."""
        live = self._pick(selector, "idle", "rejected", "released")
        getattr(live.engine, call)()
        if call == "release":
            self.model.release(live.model)
        else:
            self.model.cancel(live.model, "timeout")
        self._check_calls()

    @precondition(lambda self: bool(self.live))
    @rule(selector=st.integers(0, 63))
    def drop(self, selector: int) -> None:
        """The Python object goes away, whatever its state (a pending one is
        cancelled without a callback, a granted one released)."""
        self._drop(self._pick(selector))

    @precondition(lambda self: bool(self.live))
    @rule(selector=st.integers(0, 63), at=st.integers(0, 20))
    def add_deadline(self, selector: int, at: int) -> None:
        live = self._pick(selector, "pending") if self._has("pending") else self._pick(selector)
        # Distinct deadlines: ties may expire in any order.
        deadline = at + next(self.sequence) * 1e-6
        earliest = self.deadlines.add(live.engine, deadline)
        self.deadline_of[live.model.key] = deadline
        assert earliest == (min(self.deadline_of.values()) == deadline)

    @precondition(lambda self: bool(self.deadline_of))
    @rule(selector=st.integers(0, 63))
    def remove_deadline(self, selector: int) -> None:
        key = sorted(self.deadline_of)[selector % len(self.deadline_of)]
        self.deadlines.remove(self.live[key].engine)
        del self.deadline_of[key]

    @precondition(lambda self: bool(self.deadline_of))
    @rule(now=st.integers(0, 20))
    def expire_due(self, now: int) -> None:
        following = self.deadlines.expire_due(float(now))
        due = sorted((d, key) for key, d in self.deadline_of.items() if d <= now)
        for _, key in due:
            del self.deadline_of[key]
            self.model.cancel(self.live[key].model, "timeout")
        assert following == min(self.deadline_of.values(), default=None)
        self._check_calls()

    # Checked after every step.
    @invariant()
    def counters_match_the_model(self) -> None:
        for engine, m in getattr(self, "resources", []):
            s = engine.statistics()
            assert (s.in_use, s.waiting) == (m.in_use, len(m.queue)), m.name
            assert (engine.in_use, engine.waiting) == (m.in_use, len(m.queue)), m.name
            assert s.in_use <= s.capacity
            # No slot lost: a slot is free only when nobody waits for it,
            # and each held slot belongs to a live acquisition.
            assert s.waiting == 0 or s.in_use == s.capacity, m.name
            holders = sum(
                1
                for v in self.live.values()
                if m in v.model.resources[: v.model.held]
            )
            assert s.in_use == holders, m.name
            assert s.peak_in_use == m.peak_in_use, m.name
            assert s.acquired_total == m.acquired, m.name
            assert dict(s.rejected_total) == {r: m.rejected[r] for r in REASONS}, m.name
            assert s.wait_seconds.count == m.acquired, m.name
            # statistics.h: hold_seconds.count is the number of slots given
            # back. The engine gets there once the resource has timed a hold;
            # before that it leaves out the slots given back by requests
            # that never held all their resources, so until then only "no
            # more than" is checked.
            if m.hold_timed:
                assert s.hold_seconds.count == m.holds, m.name
            else:
                assert s.hold_seconds.count <= m.holds, m.name

    @invariant()
    def acquisitions_match_the_model(self) -> None:
        for v in self.live.values():
            assert v.engine.state.name == v.model.state, v.model.key
            assert v.engine.outcome.name == v.model.outcome, v.model.key
            assert v.engine.refused_by == v.model.refused_by, v.model.key
        assert len(self.deadlines) == len(self.deadline_of)
        assert self.deadlines.next_deadline == min(self.deadline_of.values(), default=None)

    def teardown(self) -> None:
        # Whatever happened, giving everything back frees every slot.
        for live in list(self.live.values()):
            self._drop(live)
        for engine, m in getattr(self, "resources", []):
            assert (engine.in_use, engine.waiting) == (0, 0), m.name


# 1000 runs of up to 100 steps, some 60,000 calls into the engine: about 20 s
# of CPU. MODEL_EXAMPLES lowers it where the point is another interpreter
# rather than another search (make test-all-pythons).
EngineModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("MODEL_EXAMPLES", "1000")),
    stateful_step_count=100,
    deadline=None,  # a slow step on a busy machine is not a failure
    database=None,  # no .hypothesis/ in the tree; failures print a reproducer
    print_blob=True,
)
TestEngineModel = EngineModel.TestCase
