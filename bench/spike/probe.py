"""Gauges shared by every process of a variant, sampled by the runner.

A gauge answers questions no single process can, such as "how many database
queries run right now across all worker processes". Each gauge is a small
file; any process (a uvicorn worker, a second app instance, a C++ server)
updates it, and ``run.py`` samples every gauge a few times per second into
``raw/<variant>-series.csv``, from which the report draws
``<variant>-series.png``.

File layout (native byte order, 16 bytes)::

    offset 0  int64  value  the gauge's current value
    offset 8  int64  peak   the highest value since the sampler last read it

Every update and every read-and-reset happens under an exclusive ``flock`` of
the whole file, so increments from different processes never get lost and the
sampler sees the true peak of each interval even when it is shorter than the
interval itself. Writers: ``add(delta)`` for counters (queries in flight),
``set(value)`` for levels that one process owns (a resource's ``limit``). A
C++ writer does the same with ``flock`` and ``pread``/``pwrite``.

The directory is passed to the servers in ``SPIKE_PROBE_DIR``; without it the
gauges do nothing, so the app also runs alone.

Only the standard library is used: the module is imported by the app in every
variant's interpreter, including the original package's virtualenv.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path

PROBE_DIR_ENV = "SPIKE_PROBE_DIR"
SUFFIX = ".gauge"
_LAYOUT = struct.Struct("=qq")

DB_IN_FLIGHT = "db_in_flight"
"""Database queries running right now, in all processes together."""
DB_LIMIT = "db_limit"
"""The database resource's limit in force (a resource whose limit can change)."""


class Gauge:
    """One shared gauge; safe to use from any thread and any process.

    The file is opened lazily, once per process: a worker forked from a
    parent that already opened it gets its own open file description (``flock``
    locks belong to the description, so a shared one would not exclude).
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._fd: int | None = None
        self._pid = 0
        self._lock = threading.Lock()  # flock does not exclude threads sharing one fd

    @classmethod
    def named(cls, name: str) -> Gauge:
        """The gauge ``name`` in ``$SPIKE_PROBE_DIR``, or a no-op gauge without it."""
        directory = os.environ.get(PROBE_DIR_ENV)
        return cls(Path(directory) / f"{name}{SUFFIX}" if directory else None)

    def _open(self) -> int:
        assert self._path is not None
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def _update(self, delta: int, absolute: bool) -> None:
        if self._path is None:
            return
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, _LAYOUT.size, 0)
                value, peak = _LAYOUT.unpack(raw) if len(raw) == _LAYOUT.size else (0, 0)
                value = delta if absolute else value + delta
                os.pwrite(fd, _LAYOUT.pack(value, max(peak, value)), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def add(self, delta: int) -> None:
        self._update(delta, absolute=False)

    def set(self, value: int) -> None:
        self._update(value, absolute=True)


def create(directory: Path, names: tuple[str, ...]) -> None:
    """Create zeroed gauge files (the runner does this before a server starts)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / f"{name}{SUFFIX}").write_bytes(_LAYOUT.pack(0, 0))


def sample(directory: Path) -> dict[str, tuple[int, int]]:
    """``{gauge: (value, peak since the last sample)}``; resets each peak to the value."""
    readings = {}
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, _LAYOUT.size, 0)
            if len(raw) != _LAYOUT.size:
                continue
            value, peak = _LAYOUT.unpack(raw)
            os.pwrite(fd, _LAYOUT.pack(value, value), 0)
            readings[path.name.removesuffix(SUFFIX)] = (value, peak)
        finally:
            os.close(fd)  # also releases the lock
    return readings
