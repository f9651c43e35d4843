"""What a ``key=`` function may return: the key of a request for the
``per_key`` shares of its resources."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any

from ._logging import logger

#: Longest key kept as it is, in UTF-8 bytes; a longer one is replaced by
#: its SHA-256 (``"sha256:"`` and 64 hex digits), so that every waiter's key
#: costs the engine a bounded amount of memory however long the client's
#: header. Collision-resistant: two long keys still get shares of their own.
MAX_KEY_BYTES = 256

# Key functions already reported as returning something that is no key:
# the ERROR is logged once each, the TypeError raised on every request.
_reported: set[int] = set()


def key_from(value: object, key: Callable[..., Any]) -> str | None:
    """``value`` (what ``key`` returned) as a key: a str or ``None`` as it
    is, an int or a UUID as its text; TypeError naming ``key`` and the type
    for anything else (a tuple, bytes, a user object...), which would only
    be guessed at."""
    if value is None:
        return None
    if isinstance(value, str):
        return bounded(str(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, uuid.UUID):
        return str(value)
    name = getattr(key, "__qualname__", None) or repr(key)
    message = (
        f"key: {name} returned a {type(value).__name__}; a key function must return a "
        "str, an int, a UUID or None (convert it yourself, e.g. return str(user.id))"
    )
    if id(key) not in _reported:
        _reported.add(id(key))
        logger.error("%s", message, extra={"key_function": name, "key_type": type(value).__name__})
    raise TypeError(message)


def bounded(key: str) -> str:
    """``key`` as it is if at most ``MAX_KEY_BYTES`` long in UTF-8, else its
    SHA-256 in hex."""
    # A str of n characters is at most 4n bytes in UTF-8: short ones are
    # not encoded at all.
    if len(key) * 4 <= MAX_KEY_BYTES:
        return key
    data = key.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_KEY_BYTES:
        return key
    return "sha256:" + hashlib.sha256(data).hexdigest()
