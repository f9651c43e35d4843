"""Argument checks that run at start-up, with messages that name the
parameter and what it accepts."""

from __future__ import annotations

import math
from numbers import Real

#: Largest value of the engine's 64-bit integers (queue lengths).
INT64_MAX = 2**63 - 1


def check_int(
    name: str,
    value: object,
    *,
    minimum: int,
    maximum: int | None = None,
    allow_none: bool = False,
) -> None:
    """Raise TypeError unless ``value`` is an int (not a bool); ValueError if
    it is below ``minimum`` or above ``maximum``."""
    if value is None and allow_none:
        return
    none = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an integer >= {minimum}{none}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{none}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(
            f"{name} must be an integer >= {minimum} and <= {maximum}{none}, got {value!r}"
        )


#: Longest duration accepted (about 31 years): beyond it the engine's
#: nanosecond clock would overflow.
MAX_SECONDS = 1e9


def check_seconds(name: str, value: object, *, positive: bool = False) -> float:
    """Return ``value`` as float seconds; TypeError unless it is a real number
    (not a bool), ValueError unless finite and >= 0 (> 0 if ``positive``)."""
    bound = ("> 0" if positive else ">= 0") + f" and <= {MAX_SECONDS:g}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a finite number of seconds {bound}, "
            f"got {type(value).__name__} {value!r}"
        )
    seconds = float(value)
    if (
        not math.isfinite(seconds)
        or seconds < 0
        or (positive and seconds == 0)
        or seconds > MAX_SECONDS
    ):
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return seconds
