"""Test data for the spike experiment: a SQLite message table and a small file.

The data is generated once, deterministically, and cached under
``.cache/spike/`` at the repository root, so every run and every variant reads
exactly the same bytes. Generation writes to a temporary file and renames it
when complete, so an interrupted run never leaves a half-filled database that a
later run would mistake for a valid one.

Run ``python bench/spike/data.py`` to generate the data and time the query.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import sqlite3
import statistics
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("SPIKE_CACHE_DIR", REPO_ROOT / ".cache" / "spike"))

# Bump when the generated data changes, so stale caches are not reused.
DATA_VERSION = 1
SEED = 20240601

MESSAGE_COUNT = 1_000_000
USER_COUNT = 1_000
ROWS_PER_QUERY = 100
FILE_SIZE = 5_000
FILE_CHUNK_SIZE = 1_024

_VOCABULARY = (
    "hello world the quick brown fox jumps over lazy dog forum post reply thread "
    "user message content topic discussion community great awesome interesting "
    "thanks welcome please help question answer problem solution feature request "
    "update news event share idea feedback opinion review"
)
WORDS = tuple(_VOCABULARY.split())

# The query every /messages request runs: 100 random messages of one user
# since a date. Wrapping the column in date() is the textbook query that no
# index can serve - and there is none, on user_id either: each request scans
# all 1,000,000 rows and parses every timestamp, about 100 ms of CPU.
# Concurrent queries run in parallel on all cores, as on a database server;
# functions that allocate per row, such as lower() or strftime(), would
# serialise them on SQLite's global allocator instead. ORDER BY random() needs
# every matching row before the LIMIT.
MESSAGES_QUERY = (
    "SELECT message_id, user_id, message, created_at FROM messages "
    "WHERE date(created_at) >= ? AND user_id = ? "
    "ORDER BY random() LIMIT ?"
)
MESSAGES_SINCE = "2020-01-01"
"""Every generated message is from 2020: the date filter keeps all rows."""

_BATCH = 50_000


def database_path() -> Path:
    return CACHE_DIR / f"messages-v{DATA_VERSION}.sqlite3"


def file_path() -> Path:
    return CACHE_DIR / f"file-v{DATA_VERSION}.txt"


def _temporary(path: Path) -> Path:
    """A private name next to ``path``, so concurrent runs never share a half-written file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _generate_database(path: Path, progress: Callable[[str], None]) -> None:
    rng = random.Random(SEED)
    base = dt.datetime(2020, 1, 1)
    tmp = _temporary(path)
    with closing(sqlite3.connect(tmp)) as con:
        # Nothing needs to survive a crash here: the file is renamed into place
        # only when complete.
        con.execute("PRAGMA journal_mode = OFF")
        con.execute("PRAGMA synchronous = OFF")
        con.execute(
            "CREATE TABLE messages ("
            " message_id INTEGER PRIMARY KEY,"
            " user_id INTEGER NOT NULL,"
            " message TEXT NOT NULL,"
            " created_at TEXT NOT NULL)"
        )
        started = time.monotonic()
        for first in range(1, MESSAGE_COUNT + 1, _BATCH):
            rows = []
            for message_id in range(first, min(first + _BATCH, MESSAGE_COUNT + 1)):
                user_id = rng.randint(1, USER_COUNT)
                text = " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
                created = base + dt.timedelta(minutes=rng.randrange(525_600))
                rows.append((message_id, user_id, text, created.isoformat()))
            con.executemany("INSERT INTO messages VALUES (?, ?, ?, ?)", rows)
            done = first + len(rows) - 1
            if done % 200_000 == 0 or done == MESSAGE_COUNT:
                progress(
                    f"generating messages: {done:>9,}/{MESSAGE_COUNT:,} "
                    f"({100 * done // MESSAGE_COUNT:3d}%, {time.monotonic() - started:.1f} s)"
                )
        con.commit()
    tmp.replace(path)


def _generate_file(path: Path) -> None:
    rng = random.Random(SEED)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    tmp = _temporary(path)
    tmp.write_text("".join(rng.choices(alphabet, k=FILE_SIZE)), encoding="ascii")
    tmp.replace(path)


def ensure_data(progress: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Generate the database and the file unless cached; return their paths."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    db, file = database_path(), file_path()
    if not db.exists():
        progress(f"generating {db} (once; cached for later runs)")
        _generate_database(db, progress)
    if not file.exists():
        _generate_file(file)
    return db, file


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection that may be used from any one thread at a time."""
    return sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)


def query_messages(path: Path, user_id: int) -> list[dict[str, Any]]:
    """Run the /messages query for one user on a fresh read-only connection.

    Blocking: call it from a worker thread. A connection per call, as the
    original demo did, keeps the threads independent of each other.
    """
    with closing(connect_read_only(path)) as con:
        con.row_factory = sqlite3.Row
        rows = con.execute(MESSAGES_QUERY, (MESSAGES_SINCE, user_id, ROWS_PER_QUERY)).fetchall()
    return [dict(row) for row in rows]


def time_query(path: Path, samples: int = 7) -> float:
    """Median wall time of the /messages query in ms, without concurrent load."""
    rng = random.Random(SEED)
    durations = []
    for _ in range(samples):
        started = time.perf_counter()
        query_messages(path, rng.randint(1, USER_COUNT))
        durations.append((time.perf_counter() - started) * 1000)
    return statistics.median(durations)


if __name__ == "__main__":
    db_path, _ = ensure_data()
    print(f"/messages query: median {time_query(db_path):.1f} ms")
