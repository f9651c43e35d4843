"""Run the spike experiment end to end: data, every variant under load, report.

Usage, from the repository root::

    python bench/spike/run.py                 # full run, about 5.5 minutes
    python bench/spike/run.py --quick         # smoke test, about 1.5 minutes
    python bench/spike/run.py --variants none,asyncio --out /tmp/spike

For each variant a fresh uvicorn server (one worker, 127.0.0.1, a free port)
is started, warmed up and driven by locust in headless mode along the
schedule; then both are stopped and the next variant starts from a clean
process. Every step is bounded in time, so a hung server or load generator
fails the run instead of stalling it. Raw data and logs are kept under
``OUT/raw`` and ``OUT/logs``; ``report.py`` turns them into charts and a
summary.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import data
from app import VARIANTS
from report import RAW_DIR, RUN_FILE, build_report
from schedule import CLIENT_TIMEOUT_S, FULL, QUICK, Schedule

SPIKE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SPIKE_DIR.parents[1]
HOST = "127.0.0.1"  # the load never leaves this machine

SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 15.0
LOCUST_STOP_TIMEOUT_S = 10.0
LOCUST_EXTRA_S = 45.0
"""Locust may take this long beyond the schedule (start-up, shutdown) before it is stopped."""
USER_STOP_TIMEOUT_S = int(CLIENT_TIMEOUT_S) + 1
"""Users leaving at the drop finish the request in flight (answer or client timeout)."""
OVERHEAD_PER_VARIANT_S = 4.0
"""Rough server start, warm-up and shutdown time, for the remaining-time estimate."""

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Local requests must not be routed through a proxy from the environment."""


class VariantFailed(Exception):
    """A variant could not be measured; the run goes on with the others."""


@dataclass
class VariantResult:
    error: str | None = None
    load_generator_cpu_s: float | None = None
    server_cpu_s: float | None = None


def _log(message: str) -> None:
    print(message, flush=True)


def _children_cpu_s() -> float:
    """CPU seconds of all terminated, waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float) -> bytes:
    with _NO_PROXY.open(url, timeout=timeout) as response:
        return bytes(response.read())


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Ask a child to stop (SIGTERM), then kill it if it does not within ``timeout``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


@contextlib.contextmanager
def _server(
    variant: str, port: int, db: Path, file: Path, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A fresh uvicorn process serving ``variant``, ready when the block starts."""
    env = {**os.environ, "SPIKE_VARIANT": variant, "SPIKE_DB": str(db), "SPIKE_FILE": str(file)}
    command = [
        sys.executable, "-m", "uvicorn", "app:app",
        "--app-dir", str(SPIKE_DIR),
        "--host", HOST, "--port", str(port),
        "--no-access-log", "--log-level", "warning",
        "--timeout-graceful-shutdown", "3",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_ready(process, variant, port, log_path)
            yield process
        finally:
            _stop(process, SERVER_STOP_TIMEOUT_S)


def _wait_ready(process: subprocess.Popen[bytes], variant: str, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise VariantFailed(f"server exited with code {process.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            health = json.loads(_get(f"http://{HOST}:{port}/health", timeout=1.0))
            if health.get("variant") != variant:
                raise VariantFailed(f"port {port} answered as variant {health.get('variant')!r}")
            return
        time.sleep(0.2)
    raise VariantFailed(
        f"server did not answer within {SERVER_START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}"
    )


def _warm_up(port: int) -> None:
    """A few requests so the first second of the load does not measure cold caches."""
    for path, count in (("/messages", 3), ("/file", 10)):
        for _ in range(count):
            _get(f"http://{HOST}:{port}{path}", timeout=10.0)


class _LiveTail:
    """Reads the rows locust has appended to the events CSV since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""

    def new_rows(self) -> list[list[str]]:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return []
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        rows = [line.decode().rstrip("\r").split(",") for line in lines if line]
        return [row for row in rows if len(row) >= 4 and row[0] != "t_start"]


@dataclass
class _Progress:
    """Prints one status line every few seconds while a variant runs."""

    label: str
    schedule: Schedule
    remaining_after_s: float
    interval_s: float
    tail: _LiveTail
    _last: float = 0.0

    def maybe_print(self, t: float) -> None:
        """Print a line if ``interval_s`` has passed; ``t`` is seconds since the load started."""
        now = time.monotonic()
        elapsed = now - self._last if self._last else self.interval_s
        if elapsed < self.interval_s:
            return
        self._last = now
        counts: dict[tuple[str, str], int] = {}
        for row in self.tail.new_rows():
            counts[(row[2], row[3])] = counts.get((row[2], row[3]), 0) + 1

        def rate(endpoint: str, outcome: str) -> str:
            return f"{counts.get((endpoint, outcome), 0) / elapsed:6.1f}/s"

        failed = sum(
            n for (_, outcome), n in counts.items() if outcome in ("timeout", "error", "http_error")
        )
        s = self.schedule
        left = max(s.total_s - t, 0.0) + self.remaining_after_s
        users = s.messages_users_at(t)
        phase = s.phase_at(t) if t < s.total_s else "ending"
        _log(
            f"{self.label} {phase:<7} {min(t, s.total_s):4.0f}/{s.total_s:.0f} s "
            f"(~{int(left) // 60}:{int(left) % 60:02d} left) | users {users:3d}+{s.file_users} | "
            f"/messages ok {rate('/messages', 'ok')} 503 {rate('/messages', 'rejected')} | "
            f"/file ok {rate('/file', 'ok')} 503 {rate('/file', 'rejected')} | "
            f"timeouts+errors {failed}"
        )


def _run_locust(
    port: int, schedule: Schedule, raw_dir: Path, variant: str, log_path: Path, progress: _Progress
) -> None:
    files = {
        "SPIKE_EVENTS_CSV": raw_dir / f"{variant}-events.csv",
        "SPIKE_USERS_CSV": raw_dir / f"{variant}-users.csv",
        "SPIKE_META_JSON": raw_dir / f"{variant}-meta.json",
    }
    env = {
        **os.environ,
        "SPIKE_SCHEDULE": schedule.to_json(),
        **{k: str(v) for k, v in files.items()},
    }
    command = [
        sys.executable, "-m", "locust",
        "-f", str(SPIKE_DIR / "locustfile.py"),
        "--headless", "--host", f"http://{HOST}:{port}",
        "--only-summary", "--exit-code-on-error", "0",
        "--stop-timeout", str(USER_STOP_TIMEOUT_S),
    ]  # fmt: skip
    meta_path = files["SPIKE_META_JSON"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + schedule.total_s + LOCUST_EXTRA_S
            t0: float | None = None
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise VariantFailed(f"locust did not finish in time:\n{_tail(log_path)}")
                if t0 is None and meta_path.exists():
                    with contextlib.suppress(ValueError, KeyError):
                        t0 = float(json.loads(meta_path.read_text(encoding="utf-8"))["t0"])
                if t0 is not None:
                    progress.maybe_print(time.time() - t0)
                time.sleep(0.25)
        finally:
            _stop(process, LOCUST_STOP_TIMEOUT_S)
    if process.returncode != 0:
        raise VariantFailed(f"locust exited with code {process.returncode}:\n{_tail(log_path)}")
    if t0 is None:
        raise VariantFailed(f"locust never started the load:\n{_tail(log_path)}")


def run_variant(
    variant: str, schedule: Schedule, db: Path, file: Path, out_dir: Path, progress: _Progress
) -> VariantResult:
    """Measure one variant; failures are returned, not raised."""
    result = VariantResult()
    raw_dir, log_dir = out_dir / RAW_DIR, out_dir / "logs"
    try:
        if (
            variant.startswith("fcl")
            and importlib.util.find_spec("fastapi_concurrency_limiter") is None
        ):
            raise VariantFailed(
                f"fastapi_concurrency_limiter is not importable by {sys.executable}"
            )
        port = _free_port()
        with _server(variant, port, db, file, log_dir / f"{variant}-server.log"):
            _warm_up(port)
            before = _children_cpu_s()
            _run_locust(
                port, schedule, raw_dir, variant, log_dir / f"{variant}-locust.log", progress
            )
            result.load_generator_cpu_s = _children_cpu_s() - before
            before = _children_cpu_s()
        # The server's CPU includes its start-up and warm-up, a second or so.
        result.server_cpu_s = _children_cpu_s() - before
    except (VariantFailed, OSError) as e:
        result.error = str(e)
    return result


def _environment() -> dict[str, Any]:
    versions = {}
    for package in (
        "fastapi",
        "starlette",
        "uvicorn",
        "anyio",
        "locust",
        "fastapi-concurrency-limiter",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "packages": versions,
    }


def _clean(out_dir: Path) -> None:
    """Remove what an earlier run wrote, and nothing else."""
    for sub in (RAW_DIR, "logs"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    for pattern in (
        "*-throughput.png",
        "*-latency.png",
        "comparison.png",
        "summary.json",
        "summary.md",
    ):
        for path in out_dir.glob(pattern):
            path.unlink()
    (out_dir / RAW_DIR).mkdir(parents=True)
    (out_dir / "logs").mkdir()


def _raise_exit(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short phases: a smoke test, about 1.5 minutes"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report"), help="report directory (default: report)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    schedule = QUICK if args.quick else FULL
    out_dir: Path = args.out.resolve()

    # Stop the children cleanly when the run itself is terminated.
    signal.signal(signal.SIGTERM, _raise_exit)

    started = time.monotonic()
    environment = _environment()  # before the load, so the load average shows other work
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean(out_dir)
    db, file = data.ensure_data(_log)
    query_ms = data.time_query(db)
    per_variant = schedule.total_s + OVERHEAD_PER_VARIANT_S
    _log(
        f"spike experiment ({'quick' if args.quick else 'full'}): {len(variants)} variant(s) x "
        f"{schedule.total_s:.0f} s, about {len(variants) * per_variant / 60:.1f} min; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"idle /messages query {query_ms:.0f} ms"
    )

    results: dict[str, VariantResult] = {}
    for index, variant in enumerate(variants):
        label = f"[{index + 1}/{len(variants)} {variant}]"
        _log(f"{label} starting server and load")
        progress = _Progress(
            label=label,
            schedule=schedule,
            remaining_after_s=(len(variants) - index - 1) * per_variant,
            interval_s=3.0 if args.quick else 5.0,
            tail=_LiveTail(out_dir / RAW_DIR / f"{variant}-events.csv"),
        )
        result = results[variant] = run_variant(variant, schedule, db, file, out_dir, progress)
        if result.error:
            _log(f"{label} FAILED: {result.error}")
        else:
            _log(
                f"{label} done: locust used {result.load_generator_cpu_s:.1f} s of CPU, "
                f"the server {result.server_cpu_s:.1f} s"
            )

    run = {
        "mode": "quick" if args.quick else "full",
        "schedule": json.loads(schedule.to_json()),
        "variants": variants,
        "messages_query_ms": query_ms,
        "environment": environment,
        "results": {name: vars(result) for name, result in results.items()},
    }
    (out_dir / RAW_DIR / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    build_report(out_dir)
    table = (out_dir / "summary.md").read_text(encoding="utf-8").split("![comparison]")[0].rstrip()
    elapsed = int(time.monotonic() - started)
    _log(f"\n{table}\n\nreport written to {out_dir} in {elapsed // 60}:{elapsed % 60:02d}")
    failed = [name for name, result in results.items() if result.error]
    if failed:
        _log(f"failed variants: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
