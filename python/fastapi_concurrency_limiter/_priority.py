"""Priority classes: which waiting request a freed slot goes to, and which
one a full queue gives up first."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

from . import _core
from ._logging import logger


class Priority(enum.IntEnum):
    """The class of a request, lowest to highest (the names of Google SRE's
    criticality). ``CRITICAL`` is the default: a request that says nothing
    is ``CRITICAL``, so an app that never uses priorities behaves as if
    there were none.

    A freed slot goes to the highest class with waiters; a full queue
    (``max_waiting``) pushes out the newest waiter of the lowest class to
    make room for a request of a higher class (503, reason
    ``"lower_priority"``). See docs/priorities.md.
    """

    SHEDDABLE = 0
    SHEDDABLE_PLUS = 1
    CRITICAL = 2
    CRITICAL_PLUS = 3

    @property
    def label(self) -> str:
        """The lower-case name (``"sheddable_plus"``): the key of the
        per-class statistics and the ``priority`` label of the metrics."""
        return _LABELS[self]

    @classmethod
    def parse(cls, value: object, *, name: str = "priority") -> Priority:
        """``value`` as a Priority: a Priority, an int 0..3, or a name in
        any case with ``-`` or ``_`` between the words (``"critical-plus"``).
        ValueError (TypeError for what is neither an int nor a str) naming
        ``name`` and the allowed values otherwise."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            found = _BY_NAME.get(value.strip().upper().replace("-", "_"))
            if found is not None:
                return found
        elif isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(_ALL):
                return _ALL[value]
        else:
            raise TypeError(f"{name} must be {_ALLOWED}, got {type(value).__name__} {value!r}")
        raise ValueError(f"{name} must be {_ALLOWED}, got {value!r}")


_ALL = tuple(Priority)
_BY_NAME = {p.name: p for p in _ALL}
_LABELS = {p: p.name.lower() for p in _ALL}
#: The lower-case names, lowest first.
LABELS = tuple(_LABELS[p] for p in _ALL)
_ALLOWED = (
    "a Priority, an int 0..3 or one of the names "
    + ", ".join(repr(p.name) for p in _ALL)
    + " (any case, '-' or '_')"
)
#: The engine's value of each class, indexed by Priority.
CORE: tuple[_core.Priority, ...] = (
    _core.Priority.sheddable,
    _core.Priority.sheddable_plus,
    _core.Priority.critical,
    _core.Priority.critical_plus,
)

# Priority functions already reported as returning something that is no
# class: the ERROR is logged once each, the ValueError raised on every
# request.
_reported: set[int] = set()


def priority_from(value: object, function: Callable[..., Any], where: str) -> _core.Priority:
    """What a ``priority=`` function returned, as the engine's class: a
    Priority, an int 0..3, a name, or ``None`` (the default, CRITICAL).
    Anything else raises ValueError (a 500 for the request) naming the
    function, the value and ``where`` (the request's path), logged at ERROR
    the first time for each function."""
    if value is None:
        return _core.Priority.critical
    try:
        return CORE[Priority.parse(value)]
    except (TypeError, ValueError) as e:
        function_name = getattr(function, "__qualname__", None) or repr(function)
        message = f"priority: {function_name} returned {value!r} for {where}: {e}"
        if id(function) not in _reported:
            _reported.add(id(function))
            logger.error(
                "%s",
                message,
                extra={"priority_function": function_name, "priority_value": repr(value)},
            )
        raise ValueError(message) from None


def check_reserve(reserve: object, capacity: int, per_key: int | None) -> list[int]:
    """``Resource(reserve=...)`` as the engine's list of 4 slot counts
    indexed by class; ValueError (TypeError for the wrong types) naming
    ``reserve`` and the allowed values."""
    counts = [0] * len(_ALL)
    if reserve is None:
        return counts
    if not isinstance(reserve, Mapping):
        raise TypeError(
            "reserve must be a dict {Priority: slots} (e.g. {Priority.CRITICAL_PLUS: 4}), "
            f"got {type(reserve).__name__} {reserve!r}"
        )
    for key, slots in reserve.items():
        priority = Priority.parse(key, name="reserve's keys")
        if priority is Priority.SHEDDABLE:
            raise ValueError(
                "reserve: a reserve for SHEDDABLE, the lowest class, would keep nothing from "
                "anyone; reserve's keys must be SHEDDABLE_PLUS, CRITICAL or CRITICAL_PLUS"
            )
        wanted = f"reserve[{priority.name}] must be an integer >= 0 (slots), got"
        if isinstance(slots, bool) or not isinstance(slots, int):
            raise TypeError(f"{wanted} {type(slots).__name__} {slots!r}")
        if slots < 0:
            raise ValueError(f"{wanted} {slots!r}")
        counts[priority] += slots
    if sum(counts) > capacity:
        raise ValueError(
            f"reserve: the reserves add up to {sum(counts)} slots, more than "
            f"capacity={capacity}; their sum must be <= capacity"
        )
    if any(counts):
        if per_key is not None:
            raise ValueError(
                "reserve is not supported with per_key (not built yet): "
                "leave one of them out"
            )
    return counts
