"""AdaptiveLimit: the tuning of a resource whose limit finds itself."""

from __future__ import annotations

import asyncio
import builtins
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.websockets import WebSocketDisconnect

from . import _core
from ._validation import check_int, check_seconds

# BaseExceptionGroup: built in from Python 3.11; before, anyio's backport
# (the `exceptiongroup` package) where installed.
_Group: type[BaseException] | None = getattr(builtins, "BaseExceptionGroup", None)
if _Group is None:  # pragma: no cover
    try:
        _Group = importlib.import_module("exceptiongroup").BaseExceptionGroup
    except ImportError:
        _Group = None

SUCCESS = _core.Completion.success
_DROPPED = _core.Completion.dropped
_IGNORED = _core.Completion.ignored
# Ends of a request that are its client's doing: they say nothing about the
# downstream. A WebSocket session lasts as long as its client wants, normal
# close or not, so its length is no service time either.
_CLIENT_ENDS = (asyncio.CancelledError, ClientDisconnect, WebSocketDisconnect)


def completion_of(exc: BaseException | None) -> _core.Completion:
    """How a handler that held slots ended, for adaptive resources: an error
    or a timeout is ``dropped`` (a sign of overload); a client error the
    handler chose to raise (``HTTPException`` below 500) is a normal
    response; an end that is the client's doing tells nothing (``ignored``):
    a cancelled handler, Starlette's ``ClientDisconnect`` and
    ``WebSocketDisconnect`` (whatever the close code: a session lasts as long
    as its client wants). An exception group is a drop only if one of its
    exceptions is; one of client ends only is ignored; otherwise success."""
    if exc is None:
        return SUCCESS
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        return SUCCESS
    if isinstance(exc, _CLIENT_ENDS):
        return _IGNORED
    if _Group is not None and isinstance(exc, _Group):
        return _completion_of_group(exc)
    return _DROPPED


def _completion_of_group(group: BaseException) -> _core.Completion:
    ignored_only = True
    for inner in getattr(group, "exceptions", ()):
        completion = completion_of(inner)
        if completion == _DROPPED:
            return _DROPPED
        if completion != _IGNORED:
            ignored_only = False
    return _IGNORED if ignored_only else SUCCESS


# The algorithms AdaptiveLimit offers by name; the first is the default (the
# best on the grid of bench/limit_grid.cc; docs/adaptive.md).
ALGORITHMS = ("gradient2", "vegas", "aimd", "gradient")

# Each algorithm's tolerance when none is given (vegas and aimd have none).
_TOLERANCE = {"gradient2": 1.3, "gradient": 1.25}


@dataclass(frozen=True)
class AdaptiveLimit:
    """Tuning of ``Resource(capacity, adaptive=AdaptiveLimit(...))``.

    The resource's ``limit`` (the slots in force) moves by itself between
    ``min_limit`` and ``capacity`` from the service times of finished
    requests (grant to release; waiting is not counted) and from their
    outcome: a request whose handler raised or timed out counts as dropped.
    ``adaptive=True`` is ``AdaptiveLimit()``. See docs/adaptive.md.

    Args:
        algorithm: how the limit moves: ``"gradient2"`` (default: a latency
            gradient against the averaged no-load latency, after Netflix's
            Gradient2), ``"vegas"`` (keeps an estimated queue between two
            thresholds, after Netflix's VegasLimit), ``"aimd"`` (+1 while
            used, x ``backoff`` on drops; ignores latency) or ``"gradient"``
            (the algorithm of earlier versions: it collapses when service
            times vary widely).
        min_limit: the floor, an integer >= 1 and <= capacity.
        initial_limit: where the limit starts; ``None`` (default): 20, or
            ``capacity`` if lower (as Netflix's Gradient2). A limit less
            than half used learns nothing, so a start far above the load
            would stay there until a burst fills half of it.
        tolerance: a window's mean service time up to ``tolerance`` times
            the no-load service time is normal; above it the limit is cut.
            > 1; ``None`` (default): 1.3 for ``"gradient2"``, 1.25 for
            ``"gradient"``. Not used by ``"vegas"`` and ``"aimd"``.
        backoff: multiplier applied when more than ``drop_rate`` of a
            window's requests were dropped, in (0, 1).
        drop_rate: fraction of dropped requests tolerated per window, in
            [0, 1): errors unrelated to overload should not shrink the limit
            (``"aimd"`` cuts on any drop).
        window: shortest window of samples, in seconds.
        min_window_samples: fewest samples in a window, an integer >= 1.
    """

    min_limit: int = 1
    initial_limit: int | None = None
    tolerance: float | None = None
    backoff: float = 0.9
    drop_rate: float = 0.05
    window: float = 1.0
    min_window_samples: int = 10
    # Last, so that the fields before keep their positions.
    algorithm: str = "gradient2"

    def _algorithm(self, capacity: int) -> _core.LimitAlgorithm:
        """The engine's algorithm, after checking every field against
        ``capacity``; the messages name the field and what it accepts."""
        if not isinstance(self.algorithm, str) or self.algorithm not in ALGORITHMS:
            allowed = ", ".join(repr(a) for a in ALGORITHMS)
            raise ValueError(
                f"AdaptiveLimit.algorithm must be one of {allowed}, got {self.algorithm!r}"
            )
        check_int("AdaptiveLimit.min_limit", self.min_limit, minimum=1)
        if self.min_limit > capacity:
            raise ValueError(
                f"AdaptiveLimit.min_limit must be <= capacity ({capacity}), got {self.min_limit!r}"
            )
        check_int(
            "AdaptiveLimit.initial_limit", self.initial_limit, minimum=self.min_limit,
            allow_none=True,
        )
        if self.initial_limit is not None and self.initial_limit > capacity:
            raise ValueError(
                f"AdaptiveLimit.initial_limit must be <= capacity ({capacity}), "
                f"got {self.initial_limit!r}"
            )
        tolerance = 0.0
        if self.tolerance is not None or self.algorithm in _TOLERANCE:
            tolerance = _check_real(
                "AdaptiveLimit.tolerance",
                _TOLERANCE.get(self.algorithm, 1.3) if self.tolerance is None else self.tolerance,
                "> 1",
                lambda x: x > 1,
            )
        backoff = _check_real(
            "AdaptiveLimit.backoff", self.backoff, "in (0, 1)", lambda x: 0 < x < 1
        )
        drop_rate = _check_real(
            "AdaptiveLimit.drop_rate", self.drop_rate, "in [0, 1)", lambda x: 0 <= x < 1
        )
        window = check_seconds("AdaptiveLimit.window", self.window)
        check_int("AdaptiveLimit.min_window_samples", self.min_window_samples, minimum=1)
        initial = self.initial_limit or 0
        if self.algorithm == "gradient2":
            return _core.Gradient2Limit(
                self.min_limit, initial, tolerance, backoff, drop_rate, window,
                self.min_window_samples,
            )
        if self.algorithm == "vegas":
            return _core.VegasLimit(
                self.min_limit, initial, backoff, drop_rate, window, self.min_window_samples
            )
        if self.algorithm == "aimd":
            return _core.AimdLimit(
                self.min_limit, initial, backoff, window, self.min_window_samples
            )
        return _core.GradientLimit(
            self.min_limit, initial, tolerance, backoff, drop_rate, window,
            self.min_window_samples,
        )


def _check_real(name: str, value: object, allowed: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number {allowed}, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x) or not ok(x):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}")
    return x


def algorithm_for(adaptive: object, capacity: int) -> _core.LimitAlgorithm | None:
    """The limit algorithm for ``Resource(capacity, adaptive=...)``."""
    if adaptive is False:
        return None
    if adaptive is True:
        return AdaptiveLimit()._algorithm(capacity)
    if isinstance(adaptive, AdaptiveLimit):
        return adaptive._algorithm(capacity)
    raise TypeError(
        f"adaptive must be a bool or an AdaptiveLimit, got {type(adaptive).__name__} {adaptive!r}"
    )
