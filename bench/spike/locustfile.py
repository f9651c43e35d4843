"""Locust load of the spike experiment: steady, spike, steady again.

``run.py`` starts locust headless with this file and passes, through
environment variables, the schedule (``SPIKE_SCHEDULE``, JSON of
:class:`schedule.Schedule`) and where to record (``SPIKE_EVENTS_CSV``,
``SPIKE_USERS_CSV``, ``SPIKE_META_JSON``) and, for a variant with several app
instances on separate ports, their base URLs (``SPIKE_HOSTS``, comma-separated;
users are dealt to them in turn, per user class). Locust's own statistics aggregate
over the whole run; the experiment needs every request with its absolute time
to plot and summarise per second, so a request listener writes one CSV row per
request.

Two users request ``/file`` for the whole run (``fixed_count``); the
``/messages`` users follow the shape. Users never think: each one sends its
next request as soon as the previous one is answered, like clients that retry
immediately, which is what makes an overload snowball.

With ``SPIKE_CRITICAL_USERS=N`` (the ``priorities`` variant), N of the
``/messages`` users send their requests as ``critical`` for the whole run
(``fixed_count``) and the others as ``sheddable``, in the header
``schedule.PRIORITY_HEADER``; the shape's count of ``/messages`` users is
unchanged, the critical ones are part of it. Each request's class is recorded.

With ``SPIKE_HONOUR_RETRY_AFTER=1`` (``run.py --honour-retry-after``), every user
that gets a 503 waits the response's ``Retry-After`` (seconds; an HTTP date is
read as the time until then) before its next request, or
:data:`DEFAULT_RETRY_AFTER_S` when the 503 has none, like browsers, SDKs with a
retry policy or Envoy's retry back-off. Without it the closed-loop users resend
at once, so every fast 503 becomes a new request: a retry storm.
"""

from __future__ import annotations

import csv
import json
import os
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, ClassVar

import gevent
from gevent import Timeout as GeventTimeout
from locust import LoadTestShape, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment

from schedule import CLIENT_TIMEOUT_S, FULL, PRIORITY_HEADER, Schedule

USERS_SAMPLE_INTERVAL_S = 0.5

SCHEDULE = (
    Schedule.from_json(os.environ["SPIKE_SCHEDULE"]) if "SPIKE_SCHEDULE" in os.environ else FULL
)

EVENT_FIELDS = ("t_start", "t_end", "endpoint", "outcome", "status", "latency_ms", "priority")
"""Columns of the events CSV; times are Unix seconds; ``priority`` is the class
the request was sent as (``critical``, ``sheddable``), empty if none."""

USER_FIELDS = ("t", "messages_users", "file_users", "critical_users")
"""Columns of the users CSV: ``messages_users`` counts every ``/messages`` user,
``critical_users`` those of them that send ``critical``."""

CRITICAL_USERS = int(os.environ.get("SPIKE_CRITICAL_USERS", "0"))
"""``/messages`` users that send ``critical``; with any, the others send ``sheddable``."""

HONOUR_RETRY_AFTER = os.environ.get("SPIKE_HONOUR_RETRY_AFTER", "") == "1"
"""Whether users wait a 503's ``Retry-After`` before their next request."""

DEFAULT_RETRY_AFTER_S = 1.0
"""The wait after a 503 without a usable ``Retry-After`` (the original package
sends none), when users honour it; ``fastapi-concurrency-limiter`` sends 1 s by
default, so both are treated alike."""

MAX_RETRY_AFTER_S = CLIENT_TIMEOUT_S
"""A longer ``Retry-After`` is cut to this, so a user never idles out of a phase."""


def retry_after_s(value: str | None) -> float:
    """The wait a 503's ``Retry-After`` asks for: delta-seconds or an HTTP date
    (RFC 9110), :data:`DEFAULT_RETRY_AFTER_S` if missing or unreadable, at most
    :data:`MAX_RETRY_AFTER_S`."""
    if value is None or not value.strip():
        return DEFAULT_RETRY_AFTER_S
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return DEFAULT_RETRY_AFTER_S
    if seconds != seconds:  # NaN
        return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


HOSTS = [h for h in os.environ.get("SPIKE_HOSTS", "").split(",") if h]
"""Base URLs of the app instances; empty: locust's ``--host`` only."""


def _is_timeout(exception: BaseException | None) -> bool:
    """True for a client-side timeout, also when the HTTP client wrapped it."""
    # geventhttpclient reports failures as RetriesExceeded(original=<cause>).
    cause = getattr(exception, "original", None) or exception
    return isinstance(cause, (TimeoutError, GeventTimeout))


class _Recorder:
    """Writes one CSV row per finished request and samples the user counts."""

    def __init__(self) -> None:
        self._events_file: IO[str] | None = None
        self._events: Any = None
        self._users_file: IO[str] | None = None
        self._sampler: gevent.Greenlet | None = None

    def open(self) -> None:
        events_path = os.environ.get("SPIKE_EVENTS_CSV")
        users_path = os.environ.get("SPIKE_USERS_CSV")
        if events_path:
            self._events_file = open(events_path, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._events = csv.writer(self._events_file)
            self._events.writerow(EVENT_FIELDS)
        if users_path:
            self._users_file = open(users_path, "w", newline="", encoding="utf-8")  # noqa: SIM115
            csv.writer(self._users_file).writerow(USER_FIELDS)

    def record(
        self,
        name: str,
        start_time: float,
        response_time: float,
        response: Any,
        exception: Any,
        priority: str,
    ) -> None:
        if self._events is None:
            return
        status = int(getattr(response, "status_code", 0) or 0)
        if status:
            outcome = (
                "ok" if 200 <= status < 400 else ("rejected" if status == 503 else "http_error")
            )
        elif _is_timeout(exception):
            outcome = "timeout"
        else:
            outcome = "error"
        end = start_time + response_time / 1000.0
        self._events.writerow(
            (
                f"{start_time:.4f}",
                f"{end:.4f}",
                name,
                outcome,
                status,
                f"{response_time:.2f}",
                priority,
            )
        )

    def start_sampling(self) -> None:
        """Every half second: record the active users, flush the events for run.py's live view."""
        users_file, events_file = self._users_file, self._events_file
        if users_file is None or self._sampler is not None:
            return
        writer = csv.writer(users_file)

        def sample() -> None:
            while True:
                critical = len(CriticalMessagesUser.active)
                writer.writerow(
                    (
                        f"{time.time():.3f}",
                        len(MessagesUser.active) + critical,
                        len(FileUser.active),
                        critical,
                    )
                )
                users_file.flush()
                if events_file is not None:
                    events_file.flush()
                gevent.sleep(USERS_SAMPLE_INTERVAL_S)

        self._sampler = gevent.spawn(sample)

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.kill()
            self._sampler = None
        for f in (self._events_file, self._users_file):
            if f is not None and not f.closed:
                f.close()


_recorder = _Recorder()


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    _recorder.open()


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    _recorder.start_sampling()


@events.request.add_listener
def _on_request(
    name: str,
    start_time: float,
    response_time: float,
    response: Any = None,
    exception: Any = None,
    context: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    priority = str((context or {}).get("priority") or "")
    _recorder.record(name, start_time, response_time, response, exception, priority)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    _recorder.close()


class _SpikeUser(FastHttpUser):
    """A client that sends its next request as soon as it has an answer (or,
    with :data:`HONOUR_RETRY_AFTER`, after a 503's ``Retry-After``).

    The wait after a 503 is locust's ``wait_time``, not a sleep in the task, so
    a user that the shape removes while waiting stops at once.

    Stopping is graceful (``run.py`` passes ``--stop-timeout``): a user that
    the shape removes sends no new request but waits for the answer to the one
    in flight, as a real client would, so every request sent is recorded.
    ``active`` holds the users still sending, which is the load the charts
    show; locust's own count also includes the users finishing their last
    request.
    """

    abstract = True
    network_timeout = CLIENT_TIMEOUT_S
    connection_timeout = CLIENT_TIMEOUT_S
    max_retries = 0  # a retried request would hide the failure we want to see
    active: ClassVar[set[int]]
    _spawned: ClassVar[int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.active = set()
        cls._spawned = 0

    def __init__(self, environment: Environment) -> None:
        # Deal the users of each class to the instances in turn, so each
        # instance gets the same share of /messages and of /file users.
        if HOSTS:
            cls = type(self)
            self.host = HOSTS[cls._spawned % len(HOSTS)]
            cls._spawned += 1
        super().__init__(environment)

    def on_start(self) -> None:
        type(self).active.add(id(self))

    _retry_after_s = 0.0
    """The wait before the next request: set by :meth:`_get` after a 503."""

    def wait_time(self) -> float:
        wait, self._retry_after_s = self._retry_after_s, 0.0
        return wait

    def _get(self, path: str, **kwargs: Any) -> None:
        """GET ``path``; with :data:`HONOUR_RETRY_AFTER`, note the wait a 503 asks for."""
        response = self.client.get(path, name=path, **kwargs)
        if HONOUR_RETRY_AFTER and response.status_code == 503:
            value = response.headers.get("retry-after") if response.headers else None
            self._retry_after_s = retry_after_s(value if isinstance(value, str) else None)

    def on_stop(self) -> None:
        type(self).active.discard(id(self))

    def stop(self, force: bool = False) -> bool:
        type(self).active.discard(id(self))
        return bool(super().stop(force))


class MessagesUser(_SpikeUser):
    """Follows the spike: the users that overload the database endpoint.

    With critical users in the run, these are the sheddable ones.
    """

    priority: ClassVar[str | None] = "sheddable" if CRITICAL_USERS else None

    @task
    def messages(self) -> None:
        if self.priority is None:
            self._get("/messages")
        else:
            self._get(
                "/messages",
                headers={PRIORITY_HEADER: self.priority},
                context={"priority": self.priority},
            )


class CriticalMessagesUser(MessagesUser):
    """``/messages`` users that send ``critical``: exactly ``CRITICAL_USERS`` of
    them for the whole run, counted among the shape's ``/messages`` users (only
    a run with critical users has this class)."""

    abstract = CRITICAL_USERS == 0
    fixed_count = CRITICAL_USERS
    priority = "critical"


class FileUser(_SpikeUser):
    """The bystanders: exactly ``file_users`` of them for the whole run."""

    fixed_count = SCHEDULE.file_users

    @task
    def file(self) -> None:
        self._get("/file")


class SpikeShape(LoadTestShape):
    """Steady, ramp up, spike, drop within a second, steady again.

    The ramp runs at the spawn rate that reaches the peak at the end of the
    ramp phase; at the drop the extra users stop sending at once (see
    :class:`_SpikeUser`). The wall-clock start is written to
    ``SPIKE_META_JSON`` so the report can place every request on the
    schedule's time axis.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._t0: float | None = None

    def tick(self) -> tuple[int, float] | None:
        now = time.time()
        if self._t0 is None:
            self._t0 = now
            self._write_meta()
        t = now - self._t0
        s = SCHEDULE
        if t >= s.total_s:
            # Requests still in flight now would complete outside the measured
            # window: stop at once instead of waiting for them.
            if self.runner is not None:
                self.runner.environment.stop_timeout = 0
            return None
        instant = float(10 * (s.peak_users + s.file_users))
        if t < s.ramp_start:
            return s.base_users + s.file_users, instant
        if t < s.drop_start:
            ramp_rate = (s.peak_users - s.base_users) / max(s.ramp_s, 0.1)
            return s.peak_users + s.file_users, ramp_rate
        return s.base_users + s.file_users, instant

    def _write_meta(self) -> None:
        path = os.environ.get("SPIKE_META_JSON")
        if path:
            meta = {"t0": self._t0, "schedule": json.loads(SCHEDULE.to_json())}
            Path(path).write_text(json.dumps(meta, indent=2), encoding="utf-8")
