"""The variants of the spike experiment: one registry read by the runner, the report and the check.

A variant says which server to start and how: which app (a builder in
``app.py``) or which command, with which interpreter, how many uvicorn worker
processes, how many app instances on separate ports (the locust users are split
across them), what to prepare or start around it (a virtualenv, a Redis), and
which shared gauges (``probe.py``) its chart of series shows. ``bench/spike/README.md``
explains how to add one.

This module imports nothing heavy: ``check_report.py`` uses it without
matplotlib or locust installed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import probe

BASELINE = "original"
"""Every other variant is compared with this one, measured in the same run."""


@dataclass(frozen=True)
class Launch:
    """What a server command needs to know; given to :attr:`Variant.command`."""

    python: Path
    host: str
    port: int
    instance: int
    app_dir: Path


def uvicorn_command(variant: Variant, launch: Launch) -> list[str]:
    """The default server: the demo app under uvicorn."""
    command = [
        str(launch.python), "-m", "uvicorn", "app:app",
        "--app-dir", str(launch.app_dir),
        "--host", launch.host, "--port", str(launch.port),
        "--no-access-log", "--log-level", "warning",
        "--timeout-graceful-shutdown", "3",
    ]  # fmt: skip
    if variant.workers > 1:
        command += ["--workers", str(variant.workers)]
    return command


def _no_services(_variant: Variant) -> AbstractContextManager[dict[str, str]]:
    return contextlib.nullcontext({})


@contextlib.contextmanager
def _redis_server(_variant: Variant) -> Iterator[dict[str, str]]:
    """A redis-server for the run: a free port of 127.0.0.1, a temporary
    directory, no persistence; stopped afterwards. Yields ``SPIKE_REDIS_URL``."""
    server = shutil.which("redis-server")
    if server is None:
        raise OSError("redis-server is not installed (make system-deps installs it)")
    with tempfile.TemporaryDirectory(prefix="spike-redis-") as directory:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
                "--save", "", "--appendonly", "no"]  # fmt: skip
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise OSError("redis-server did not start") from None
                    time.sleep(0.02)
            yield {"SPIKE_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        finally:
            process.kill()
            process.wait()


HOST_RESOURCE = "spike-db"
"""The host-scoped database resource of ``fcl-host`` (``app.py``)."""


def _reset_host_resource() -> None:
    """Removes the host resource if it exists and no process uses it: a
    segment left by an earlier run, maybe by another version of the package
    (whose layout this one refuses), must not fail the variant."""
    subprocess.run(
        [sys.executable, "-m", "fastapi_concurrency_limiter", "reset", HOST_RESOURCE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,  # "no host resource named ...": nothing to remove
    )


@contextlib.contextmanager
def _fresh_host_resource(_variant: Variant) -> Iterator[dict[str, str]]:
    _reset_host_resource()
    try:
        yield {}
    finally:
        _reset_host_resource()


def _this_interpreter(_progress: Callable[[str], None]) -> Path:
    return Path(sys.executable)


def _original_interpreter(progress: Callable[[str], None]) -> Path:
    import original  # only when the variant runs: it may create a virtualenv

    return original.ensure_python(progress)


CPP_BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "spike-cpp"
"""Where the C++ variants' server (``examples/cpp/demo_server.cc``) is built."""


def _cpp_interpreter(progress: Callable[[str], None]) -> Path:
    """Builds the C++ demo server with CMake (a no-op when up to date); it runs no Python."""
    import shutil
    import subprocess

    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed (make system-deps installs it)")
    steps = []
    if not (CPP_BUILD_DIR / "CMakeCache.txt").exists():
        progress(f"building the C++ demo server in {CPP_BUILD_DIR} (once)")
        steps.append([
            "cmake", "-S", str(CPP_BUILD_DIR.parents[1]), "-B", str(CPP_BUILD_DIR),
            "-DCMAKE_BUILD_TYPE=Release", "-DCL_BUILD_TESTS=OFF", "-DCL_BUILD_BENCHMARKS=OFF",
        ])  # fmt: skip
    steps.append(["cmake", "--build", str(CPP_BUILD_DIR), "--target", "demo_server"])
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                "cannot build the C++ demo server (it needs Asio and SQLite: "
                "make system-deps):\n" + (result.stdout + result.stderr)[-1500:]
            )
    return Path(sys.executable)


def _cpp_command(_variant: Variant, launch: Launch) -> list[str]:
    """The C++ server; the database, the file, the variant's name and the gauges'
    directory come from the environment (``SPIKE_DB``, ``SPIKE_FILE``,
    ``SPIKE_VARIANT``, ``SPIKE_PROBE_DIR``), as for the Python app."""
    return [str(CPP_BUILD_DIR / "demo_server"), "--host", launch.host, "--port", str(launch.port)]


@dataclass(frozen=True)
class Variant:
    """One server configuration measured under the same load as the others."""

    name: str
    description: str
    """One line for the README's and ``--list``'s tables."""
    color: str
    """Its line in the comparison chart."""
    app: str | None = "package"
    """The builder in ``app.py`` (``SPIKE_APP``); ``None`` for a server that is not the demo app."""
    package: str | None = "fastapi-concurrency-limiter"
    """The distribution the app must report on ``/health`` (checked), or ``None``."""
    package_version: str | None = None
    """The version it must report, when it matters (the original)."""
    headline: bool = False
    """Run by a plain ``make demo``; the others with ``VARIANTS=all`` or by name."""
    workers: int = 1
    """uvicorn worker processes per instance (``--workers``)."""
    instances: int = 1
    """App processes on separate ports, standing for separate hosts; users are split across them."""
    db_capacity: int | None = 5
    """The database resource's configured capacity, drawn on the series chart."""
    db_shared: bool = False
    """The capacity is one limit shared by all processes (host or Redis scope), not one each."""
    series: tuple[str, ...] = (probe.DB_IN_FLIGHT,)
    """Gauges charted in ``<variant>-series.png``; ``probe.DB_LIMIT`` is drawn when recorded."""
    critical_users: int = 0
    """Of the ``/messages`` users, this many send their requests as ``critical``
    and the others as ``sheddable`` (``schedule.PRIORITY_HEADER``), throughout
    the run; the report then gives each class's outcomes apart
    (``<variant>-classes.png``) and the goals of priority classes. 0: no class
    is sent."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of the server processes."""
    interpreter: Callable[[Callable[[str], None]], Path] = _this_interpreter
    """Returns the Python that runs the server, preparing it if needed (raise to skip)."""
    command: Callable[[Variant, Launch], list[str]] = uvicorn_command
    """The server command of one instance."""
    services: Callable[[Variant], AbstractContextManager[dict[str, str]]] = _no_services
    """Started around the variant's run (e.g. a Redis); yields extra server environment."""

    @property
    def processes(self) -> int:
        """Server processes that run the app (workers times instances)."""
        return self.workers * self.instances


_REGISTRY: list[Variant] = [
    Variant(
        name="none",
        description="no limiting",
        color="#d62728",
        app="none",
        package=None,
        db_capacity=None,
        headline=True,
    ),
    Variant(
        name="original",
        description=(
            "the original `fastapi-concurrency-limiter==0.1.2` from the package index, in its own "
            "virtualenv: `Resource(5)`, `Resource(10)`, `Limiter(timeout=2)`"
        ),
        color="#ff7f0e",
        package_version="0.1.2",
        interpreter=_original_interpreter,
        headline=True,
    ),
    Variant(
        name="fcl",
        description="this package, configured as the original demo (same code as `original`)",
        color="#1f77b4",
        headline=True,
    ),
    Variant(
        name="fcl-tuned",
        description="this package with the recommended overload options (`FCL_TUNED_OPTIONS`)",
        color="#2ca02c",
        app="package-tuned",
        headline=True,
    ),
    Variant(
        name="adaptive",
        description=(
            "this package with `Resource(50, adaptive=True)` for the database: 50 is a "
            "deliberately bad ceiling, the limit finds itself (charted in `adaptive-series.png`)"
        ),
        color="#8c564b",
        app="package-adaptive",
        db_capacity=50,
    ),
    Variant(
        name="fcl-2workers",
        description=(
            "`fcl` under `uvicorn --workers 2`: `Resource(5)` in each process, "
            "so up to 10 queries at the database"
        ),
        color="#9467bd",
        workers=2,
    ),
    Variant(
        name="fcl-redis-2hosts",
        description=(
            "`fcl` on two app processes on two ports (two hosts) sharing the database's "
            "`Resource(5, scope=RedisScope(...))` through one Redis: at most 5 queries in flight "
            "across both"
        ),
        color="#8c564b",
        app="package-redis",
        instances=2,
        db_shared=True,
        services=_redis_server,
    ),
    Variant(
        name="cpp",
        description=(
            "the same service in C++ (`examples/cpp/demo_server.cc`: Asio coroutines, "
            "`async_acquire`, the query in a 40-thread pool): `Resource(5)`, `Resource(10)`, "
            "2 s timeout"
        ),
        color="#17becf",
        app=None,
        package=None,
        interpreter=_cpp_interpreter,
        command=_cpp_command,
    ),
    Variant(
        name="cpp-none",
        description="the C++ service without the limiter (`SPIKE_NO_LIMIT=1`)",
        color="#e377c2",
        app=None,
        package=None,
        db_capacity=None,
        env={"SPIKE_NO_LIMIT": "1"},
        interpreter=_cpp_interpreter,
        command=_cpp_command,
    ),
    Variant(
        name="fcl-host",
        description=(
            "`fcl` under `uvicorn --workers 2` with `Resource(5, name=\"spike-db\", "
            "scope=\"host\")`: one limit of 5 queries for both processes"
        ),
        color="#bcbd22",
        app="package-host",
        workers=2,
        db_shared=True,
        services=_fresh_host_resource,
    ),
    Variant(
        name="priorities",
        description=(
            "`fcl` with priority classes: `Resource(5, early_reject=True)` for the database, "
            "`/messages` takes its class from the `x-priority` header "
            "(`priority_from_header`); 3 `/messages` users send `critical`, the others "
            "`sheddable`"
        ),
        color="#393b79",
        app="package-priorities",
        critical_users=3,
    ),
]

VARIANTS: dict[str, Variant] = {v.name: v for v in _REGISTRY}
ALL = tuple(VARIANTS)
HEADLINE = tuple(v.name for v in _REGISTRY if v.headline)


def select(spec: str | None, quick: bool) -> list[Variant]:
    """Variants from ``--variants``: names, ``all``, or the default (headline; all when quick)."""
    if not spec:
        return [VARIANTS[name] for name in (ALL if quick else HEADLINE)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        names = list(ALL)
    elif names == ["headline"]:
        names = list(HEADLINE)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ALL)}, or all, or headline"
        )
    return [VARIANTS[n] for n in dict.fromkeys(names)]


def color(name: str) -> str | None:
    variant = VARIANTS.get(name)
    return variant.color if variant else None
