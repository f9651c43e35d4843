"""The load schedule of the spike experiment, shared by the load shape and the report.

One definition of the phases keeps the users that locust spawns, the phase
boundaries drawn on the charts and the windows the summary averages over in
agreement. All times are seconds since the load test started.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

CLIENT_TIMEOUT_S = 6.0
"""Clients give up after 6 s, as the original experiment's k6 clients did."""

PRIORITY_HEADER = "x-priority"
"""The header that carries a ``/messages`` request's class (``critical`` or
``sheddable``) in the ``priorities`` variant: set by the load generator, read
by the app with ``priority_from_header``, as a gateway in front of the service
would set it."""


@dataclass(frozen=True)
class Phase:
    """A named time window ``[start, end)`` of the load test."""

    name: str
    start: float
    end: float


@dataclass(frozen=True)
class Schedule:
    """Users over time: steady, ramp up, spike, drop, steady again.

    ``/file`` keeps ``file_users`` users for the whole run; only the
    ``/messages`` users follow the shape. ``warmup_s`` seconds at the start are
    excluded from the steady-state window so that connection set-up and cold
    caches do not count as the steady level.
    """

    steady_s: float = 25.0
    ramp_s: float = 5.0
    spike_s: float = 20.0
    drop_s: float = 1.0
    after_s: float = 25.0
    warmup_s: float = 5.0
    base_users: int = 10
    peak_users: int = 150
    file_users: int = 2

    @property
    def ramp_start(self) -> float:
        return self.steady_s

    @property
    def spike_start(self) -> float:
        return self.steady_s + self.ramp_s

    @property
    def drop_start(self) -> float:
        return self.spike_start + self.spike_s

    @property
    def after_start(self) -> float:
        return self.drop_start + self.drop_s

    @property
    def total_s(self) -> float:
        return self.after_start + self.after_s

    def shape_phases(self) -> list[Phase]:
        """The phases of the load shape, back to back, covering the whole run."""
        return [
            Phase("steady", 0.0, self.ramp_start),
            Phase("ramp-up", self.ramp_start, self.spike_start),
            Phase("spike", self.spike_start, self.drop_start),
            Phase("drop", self.drop_start, self.after_start),
            Phase("after", self.after_start, self.total_s),
        ]

    def summary_phases(self) -> list[Phase]:
        """The windows the summary reports: ``before``, ``spike`` and ``after``.

        ``before`` skips the warm-up; ``spike`` is the time at full load;
        ``after`` starts once the users are back at the base level and includes
        the recovery, which is also reported on its own.
        """
        return [
            Phase("before", min(self.warmup_s, self.ramp_start), self.ramp_start),
            Phase("spike", self.spike_start, self.drop_start),
            Phase("after", self.after_start, self.total_s),
        ]

    def phase_at(self, t: float) -> str:
        """Name of the shape phase at ``t`` seconds (``"done"`` past the end)."""
        for phase in self.shape_phases():
            if phase.start <= t < phase.end:
                return phase.name
        return "done" if t >= self.total_s else "steady"

    def messages_users_at(self, t: float) -> int:
        """Target number of ``/messages`` users at ``t`` seconds."""
        if t < self.ramp_start:
            return self.base_users
        if t < self.spike_start:
            fraction = (t - self.ramp_start) / self.ramp_s
            return round(self.base_users + fraction * (self.peak_users - self.base_users))
        if t < self.drop_start:
            return self.peak_users
        return self.base_users

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls(**json.loads(text))


FULL = Schedule()
"""About 76 s per variant: long enough for each phase to settle."""

QUICK = Schedule(steady_s=5.0, ramp_s=2.0, spike_s=4.0, drop_s=1.0, after_s=4.0, warmup_s=1.0)
"""About 16 s per variant: a smoke test of the whole pipeline, numbers are rough."""
