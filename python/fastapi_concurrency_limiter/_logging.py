"""Rate-limited log lines for rejected requests.

During a spike a limiter may turn away thousands of requests a second; one
line each would flood the log and cost CPU when it is scarcest. Per resource,
the first rejection of each one-second window is logged as it happens; the
others are counted and summed up in one line when the window ends (a timer
on the event loop writes it, so the summary of a spike's last window is not
left unwritten for want of a next rejection).

Each record carries its facts as attributes too (``extra``: ``resource``,
``reason``, ``waited``; a summary ``rejected``, ``reasons``, ``longest_wait``),
for structured log handlers. The package's logger has a ``NullHandler`` and
no handler of its own: where its lines go is the application's logging
configuration's choice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("fastapi_concurrency_limiter")

#: Seconds per resource between individual rejection lines.
WINDOW = 1.0


@dataclass
class _Window:
    start: float
    suppressed: Counter[str] = field(default_factory=Counter)
    max_waited: float = 0.0


_windows: dict[str, _Window] = {}


def log_rejection(resource: str, reason: str, waited: float) -> None:
    """Records one rejected request; logs at most two lines per resource per
    window (the first rejection, and a summary of the others)."""
    if not logger.isEnabledFor(logging.WARNING):
        return
    now = time.monotonic()
    window = _windows.get(resource)
    if window is not None and now - window.start < WINDOW:
        if not window.suppressed:
            _summarise_later(resource, window, window.start + WINDOW - now)
        window.suppressed[reason] += 1
        window.max_waited = max(window.max_waited, waited)
        return
    if window is not None:
        _summarise(resource, window)
    _windows[resource] = _Window(start=now)
    logger.warning(
        "resource %r turned a request away: reason=%s after waiting %.3f s",
        resource,
        reason,
        waited,
        extra={"resource": resource, "reason": reason, "waited": waited},
    )


def _summarise_later(resource: str, window: _Window, delay: float) -> None:
    loop = asyncio._get_running_loop()
    if loop is not None:  # else the next window's first rejection writes it
        loop.call_later(max(delay, 0.0), _summarise, resource, window)


def _summarise(resource: str, window: _Window) -> None:
    """Writes the window's summary, once (a timer and the next window's
    first rejection may both try)."""
    if not window.suppressed:
        return
    reasons = dict(sorted(window.suppressed.items()))
    rejected = sum(reasons.values())
    logger.warning(
        "resource %r turned away %d more requests in %.1f s (%s; longest wait %.3f s)",
        resource,
        rejected,
        min(time.monotonic() - window.start, WINDOW),
        ", ".join(f"{r}={n}" for r, n in reasons.items()),
        window.max_waited,
        extra={
            "resource": resource,
            "rejected": rejected,
            "reasons": reasons,
            "longest_wait": window.max_waited,
        },
    )
    window.suppressed.clear()
