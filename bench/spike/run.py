"""Run the spike experiment end to end: data, the variants under load, report.

Usage, from the repository root::

    python bench/spike/run.py                  # headline variants, about 6 minutes
    python bench/spike/run.py --variants all   # every variant
    python bench/spike/run.py --quick          # smoke test of every variant
    python bench/spike/run.py --variants original,fcl --out /tmp/spike
    python bench/spike/run.py --list           # the variants
    python bench/spike/run.py --honour-retry-after  # clients wait a 503's Retry-After

For each variant (``variants.py``) fresh server processes are started on
127.0.0.1 (free ports), warmed up and driven by locust in headless mode along
the schedule, while the shared gauges of ``probe.py`` are sampled; then
everything is stopped and the next variant starts from clean processes. Every
step is bounded in time, so a hung server or load generator fails the run
instead of stalling it. Raw data and logs are kept under ``OUT/raw`` and
``OUT/logs``; ``report.py`` turns them into charts and a summary.
``--profile`` records the servers with py-spy during the spike
(``OUT/profiles``; see ``profile_summary.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import data
import probe
import variants
from report import (
    CLIENT_IMMEDIATE,
    CLIENT_RETRY_AFTER,
    CPU_FIELDS,
    RAW_DIR,
    RUN_FILE,
    SERIES_FIELDS,
    build_report,
)
from schedule import CLIENT_TIMEOUT_S, FULL, QUICK, Schedule
from variants import Launch, Variant

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
OVERHEAD_PER_VARIANT_S = 6.0
"""Rough server start, warm-up and shutdown time, for the remaining-time estimate."""
SAMPLE_INTERVAL_S = 0.1
"""The shared gauges are read this often; each reading also has the peak since the last."""
PROFILE_RATE_HZ = 1000
"""py-spy samples per second (``--gil``: of the thread running Python code)."""
PROFILE_FINISH_TIMEOUT_S = 15.0
REPORTED_PACKAGES = (
    "fastapi-concurrency-limiter",
    "fastapi",
    "starlette",
    "pydantic",
    "anyio",
    "uvicorn",
    "uvloop",
    "httptools",
)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Local requests must not be routed through a proxy from the environment."""


class VariantFailed(Exception):
    """A variant could not be measured; the run goes on with the others."""


@dataclass
class VariantResult:
    error: str | None = None
    load_generator_cpu_s: float | None = None
    server_cpu_s: float | None = None
    profiler_cpu_s: float | None = None
    config: dict[str, Any] = field(default_factory=dict)


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


def _child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (uvicorn's worker processes under ``--workers``)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text(encoding="ascii")
            children += [int(c) for c in text.split()]
    return children


@dataclass
class _Instance:
    """One server process (with its workers) of a variant, listening on ``port``."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def app_pids(self, workers: int) -> list[int]:
        """The processes that run the app: the workers, or the server itself."""
        return _child_pids(self.process.pid) if workers > 1 else [self.process.pid]


@contextlib.contextmanager
def _servers(
    variant: Variant, python: Path, env: dict[str, str], log_dir: Path
) -> Iterator[list[_Instance]]:
    """The variant's server instances, each ready (all workers answering) when the block starts."""
    instances: list[_Instance] = []
    try:
        for index in range(variant.instances):
            port = _free_port()
            launch = Launch(python=python, host=HOST, port=port, instance=index, app_dir=SPIKE_DIR)
            suffix = f"-{index + 1}" if variant.instances > 1 else ""
            log_path = log_dir / f"{variant.name}-server{suffix}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    variant.command(variant, launch),
                    cwd=REPO_ROOT,
                    env={**env, "SPIKE_INSTANCE": str(index)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            instances.append(_Instance(process, port, log_path))
        for instance in instances:
            _wait_ready(instance, variant)
        yield instances
    finally:
        for instance in instances:
            _stop(instance.process, SERVER_STOP_TIMEOUT_S)


def _check_health(health: dict[str, Any], variant: Variant, port: int) -> None:
    if health.get("variant") != variant.name:
        raise VariantFailed(f"port {port} answered as variant {health.get('variant')!r}")
    if variant.package is None:
        return
    version = health.get("package")
    if version is None:
        raise VariantFailed(f"{variant.package} is not importable by the server")
    if variant.package_version is not None and version != variant.package_version:
        raise VariantFailed(
            f"the server runs {variant.package} {version}, expected {variant.package_version}"
        )


def _wait_ready(instance: _Instance, variant: Variant) -> None:
    """Until every worker process has answered ``/health`` (each connection goes to one)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    seen: set[int] = set()
    while time.monotonic() < deadline:
        if instance.process.poll() is not None:
            raise VariantFailed(
                f"server exited with code {instance.process.returncode}:\n"
                f"{_tail(instance.log_path)}"
            )
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            health = json.loads(_get(f"{instance.url}/health", timeout=1.0))
            _check_health(health, variant, instance.port)
            seen.add(int(health.get("pid") or 0))
            if len(seen) >= variant.workers:
                return
            continue
        time.sleep(0.2)
    if seen:
        _log(f"warning: {len(seen)} of {variant.workers} workers answered; going on")
        return
    raise VariantFailed(
        f"server did not answer within {SERVER_START_TIMEOUT_S:.0f} s:\n{_tail(instance.log_path)}"
    )


def _warm_up(instances: list[_Instance], workers: int) -> None:
    """A few requests per process so the first second of the load does not measure cold caches."""
    for instance in instances:
        for path, count in (("/messages", 3 * workers), ("/file", 10 * workers)):
            for _ in range(count):
                _get(f"{instance.url}{path}", timeout=10.0)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(stat_path: str) -> float:
    """utime + stime of a process or thread, from its ``stat`` file (0 once it is gone)."""
    try:
        with open(stat_path, encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # Fields 14 and 15 of proc(5); fields[0] is field 3 (the state).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class _Sampler:
    """Every ``SAMPLE_INTERVAL_S``: the shared gauges into ``<variant>-series.csv``, and
    the CPU time of the app processes into ``<variant>-cpu.csv``.

    The CPU time is the sum over the app processes of the whole process and of
    its main thread, which runs the event loop: the HTTP protocol, routing,
    the limiter and the endpoints' own code, but not the queries and file
    reads, which run in worker threads. It is CPU time, not wall time, so it
    is less sensitive to other load on the machine than the rates are.
    """

    def __init__(self, probe_dir: Path, raw_dir: Path, variant: str, pids: list[int]) -> None:
        self._probe_dir = probe_dir
        self._series_path = raw_dir / f"{variant}-series.csv"
        self._cpu_path = raw_dir / f"{variant}-cpu.csv"
        self._pids = pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with (
            self._series_path.open("w", newline="", encoding="utf-8") as series_file,
            self._cpu_path.open("w", newline="", encoding="utf-8") as cpu_file,
        ):
            series = csv.writer(series_file)
            series.writerow(SERIES_FIELDS)
            cpu = csv.writer(cpu_file)
            cpu.writerow(CPU_FIELDS)
            next_at = time.monotonic()
            while not self._stop.is_set():
                now = time.time()
                for name, (value, peak) in probe.sample(self._probe_dir).items():
                    series.writerow((f"{now:.3f}", name, value, peak))
                loop = sum(_cpu_s(f"/proc/{pid}/task/{pid}/stat") for pid in self._pids)
                process = sum(_cpu_s(f"/proc/{pid}/stat") for pid in self._pids)
                cpu.writerow((f"{now:.3f}", f"{loop:.2f}", f"{process:.2f}"))
                next_at += SAMPLE_INTERVAL_S
                self._stop.wait(max(next_at - time.monotonic(), 0.0))


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class _Profiler:
    """py-spy on every app process during the spike, collapsed stacks in ``OUT/profiles``."""

    def __init__(self, variant: Variant, instances: list[_Instance], out_dir: Path) -> None:
        self._variant = variant
        self._instances = instances
        self._out_dir = out_dir
        self._processes: list[subprocess.Popen[bytes]] = []
        self.cpu_s = 0.0

    def start(self, duration_s: float) -> None:
        py_spy = _py_spy()
        if py_spy is None:
            raise VariantFailed("--profile needs py-spy (pip install py-spy)")
        self._out_dir.mkdir(exist_ok=True)
        (self._out_dir / "meta.json").write_text(
            json.dumps({"rate_hz": PROFILE_RATE_HZ, "gil": True}) + "\n", encoding="utf-8"
        )
        pids = [p for i in self._instances for p in i.app_pids(self._variant.workers)]
        for pid in pids:
            out = self._out_dir / f"{self._variant.name}-{pid}.txt"
            command = [
                py_spy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE_HZ),
                "--duration", str(max(int(duration_s), 1)), "--format", "raw",
                "--nonblocking", "--gil", "--output", str(out),
            ]  # fmt: skip
            self._processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )

    def finish(self) -> None:
        """Wait for the recordings (they end with the spike); their CPU is counted apart."""
        before = _children_cpu_s()
        for process in self._processes:
            try:
                process.wait(PROFILE_FINISH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                _stop(process, PROFILE_FINISH_TIMEOUT_S)
        self.cpu_s = _children_cpu_s() - before


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
        critical: dict[str, int] = {}  # /messages outcomes sent as critical
        for row in self.tail.new_rows():
            counts[(row[2], row[3])] = counts.get((row[2], row[3]), 0) + 1
            if len(row) > 6 and row[6] == "critical":
                critical[row[3]] = critical.get(row[3], 0) + 1

        def rate(endpoint: str, outcome: str) -> str:
            return f"{counts.get((endpoint, outcome), 0) / elapsed:6.1f}/s"

        classes = ""
        if critical:
            ok, sent = critical.get("ok", 0), sum(critical.values())
            classes = f" (critical {ok}/{sent} ok)"

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
            f"/messages ok {rate('/messages', 'ok')} 503 {rate('/messages', 'rejected')}"
            f"{classes} | "
            f"/file ok {rate('/file', 'ok')} 503 {rate('/file', 'rejected')} | "
            f"timeouts+errors {failed}"
        )


def _run_locust(
    hosts: list[str],
    schedule: Schedule,
    raw_dir: Path,
    variant: str,
    log_path: Path,
    progress: _Progress,
    at_spike: Callable[[], None] | None = None,
    critical_users: int = 0,
    honour_retry_after: bool = False,
) -> None:
    files = {
        "SPIKE_EVENTS_CSV": raw_dir / f"{variant}-events.csv",
        "SPIKE_USERS_CSV": raw_dir / f"{variant}-users.csv",
        "SPIKE_META_JSON": raw_dir / f"{variant}-meta.json",
    }
    env = {
        **os.environ,
        "SPIKE_SCHEDULE": schedule.to_json(),
        "SPIKE_HOSTS": ",".join(hosts),
        "SPIKE_CRITICAL_USERS": str(critical_users),
        "SPIKE_HONOUR_RETRY_AFTER": "1" if honour_retry_after else "0",
        **{k: str(v) for k, v in files.items()},
    }
    command = [
        sys.executable, "-m", "locust",
        "-f", str(SPIKE_DIR / "locustfile.py"),
        "--headless", "--host", hosts[0],
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
                    t = time.time() - t0
                    if at_spike is not None and t >= schedule.spike_start:
                        at_spike()
                        at_spike = None
                    progress.maybe_print(t)
                time.sleep(0.1)
        finally:
            _stop(process, LOCUST_STOP_TIMEOUT_S)
    if process.returncode != 0:
        raise VariantFailed(f"locust exited with code {process.returncode}:\n{_tail(log_path)}")
    if t0 is None:
        raise VariantFailed(f"locust never started the load:\n{_tail(log_path)}")


def _packages(python: Path) -> dict[str, str]:
    """Versions of the server stack in ``python``'s environment."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "v = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: v[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(v))\n"
    )
    out = subprocess.run(
        [str(python), "-c", code, *REPORTED_PACKAGES],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    versions: dict[str, str] = json.loads(out)
    return versions


def run_variant(
    variant: Variant,
    schedule: Schedule,
    db: Path,
    file: Path,
    out_dir: Path,
    progress: _Progress,
    profile: bool = False,
    honour_retry_after: bool = False,
) -> VariantResult:
    """Measure one variant; failures are returned, not raised."""
    result = VariantResult(
        config={
            "description": variant.description,
            "app": variant.app,
            "workers": variant.workers,
            "instances": variant.instances,
            "db_capacity": variant.db_capacity,
            "db_shared": variant.db_shared,
            "series": list(variant.series),
            "critical_users": variant.critical_users,
        }
    )
    raw_dir, log_dir = out_dir / RAW_DIR, out_dir / "logs"
    try:
        try:
            python = variant.interpreter(_log)
        except Exception as e:  # whatever preparing it raised: report it, run the others
            raise VariantFailed(f"cannot prepare the interpreter: {e}") from None
        if variant.app is not None:
            result.config["packages"] = _packages(python)
        with (
            tempfile.TemporaryDirectory(prefix="spike-probe-") as probe_dir,
            variant.services(variant) as service_env,
        ):
            probe.create(Path(probe_dir), variant.series)
            env = {
                **os.environ,
                "SPIKE_VARIANT": variant.name,
                "SPIKE_DB": str(db),
                "SPIKE_FILE": str(file),
                probe.PROBE_DIR_ENV: probe_dir,
                **({"SPIKE_APP": variant.app} if variant.app else {}),
                **variant.env,
                **service_env,
            }
            with _servers(variant, python, env, log_dir) as instances:
                _warm_up(instances, variant.workers)
                profiler = _Profiler(variant, instances, out_dir / "profiles") if profile else None
                before = _children_cpu_s()
                pids = [p for i in instances for p in i.app_pids(variant.workers)]
                with _Sampler(Path(probe_dir), raw_dir, variant.name, pids):
                    _run_locust(
                        [i.url for i in instances],
                        schedule,
                        raw_dir,
                        variant.name,
                        log_dir / f"{variant.name}-locust.log",
                        progress,
                        at_spike=(lambda: profiler.start(schedule.spike_s)) if profiler else None,
                        critical_users=variant.critical_users,
                        honour_retry_after=honour_retry_after,
                    )
                result.load_generator_cpu_s = _children_cpu_s() - before
                if profiler is not None:
                    profiler.finish()
                    result.profiler_cpu_s = profiler.cpu_s
                before = _children_cpu_s()
        # The server's CPU includes its start-up and warm-up, a second or so.
        result.server_cpu_s = _children_cpu_s() - before
    except (VariantFailed, OSError, subprocess.SubprocessError) as e:
        result.error = str(e)
    return result


def _environment() -> dict[str, Any]:
    versions = {}
    for package in (*REPORTED_PACKAGES, "locust"):
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
    shutil.rmtree(out_dir / "profiles", ignore_errors=True)
    for pattern in (
        "*-throughput.png",
        "*-latency.png",
        "*-series.png",
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


def _list_variants() -> str:
    lines = []
    for v in variants.VARIANTS.values():
        mark = "*" if v.headline else " "
        lines.append(f"{mark} {v.name:<14} {v.description}")
    return "\n".join([*lines, "(* = headline: run by default)"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short phases: a smoke test of every variant"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report"), help="report directory (default: report)"
    )
    parser.add_argument(
        "--variants",
        default="",
        help=(
            f"comma-separated variants ({', '.join(variants.ALL)}), 'all' or 'headline' "
            f"(default: headline, {','.join(variants.HEADLINE)}; with --quick: all)"
        ),
    )
    parser.add_argument(
        "--profile", action="store_true", help="record the servers with py-spy during the spike"
    )
    parser.add_argument(
        "--honour-retry-after",
        action="store_true",
        help=(
            "every user that gets a 503 waits its Retry-After (1 s without one) before its "
            "next request, in every variant (default: users resend at once)"
        ),
    )
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        print(_list_variants())
        return 0
    try:
        selected = variants.select(args.variants, args.quick)
    except ValueError as e:
        parser.error(str(e))
    schedule = QUICK if args.quick else FULL
    out_dir: Path = args.out.resolve()

    # Stop the children cleanly when the run itself is terminated.
    signal.signal(signal.SIGTERM, _raise_exit)

    client_mode = CLIENT_RETRY_AFTER if args.honour_retry_after else CLIENT_IMMEDIATE
    started = time.monotonic()
    environment = _environment()  # before the load, so the load average shows other work
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean(out_dir)
    db, file = data.ensure_data(_log)
    query_ms = data.time_query(db)
    per_variant = schedule.total_s + OVERHEAD_PER_VARIANT_S
    _log(
        f"spike experiment ({'quick' if args.quick else 'full'}): {len(selected)} variant(s) "
        f"({', '.join(v.name for v in selected)}) x {schedule.total_s:.0f} s, "
        f"clients {client_mode}, "
        f"about {len(selected) * per_variant / 60:.1f} min; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"idle /messages query {query_ms:.0f} ms"
    )

    results: dict[str, VariantResult] = {}
    for index, variant in enumerate(selected):
        label = f"[{index + 1}/{len(selected)} {variant.name}]"
        _log(f"{label} starting server and load")
        progress = _Progress(
            label=label,
            schedule=schedule,
            remaining_after_s=(len(selected) - index - 1) * per_variant,
            interval_s=3.0 if args.quick else 5.0,
            tail=_LiveTail(out_dir / RAW_DIR / f"{variant.name}-events.csv"),
        )
        result = results[variant.name] = run_variant(
            variant,
            schedule,
            db,
            file,
            out_dir,
            progress,
            profile=args.profile,
            honour_retry_after=args.honour_retry_after,
        )
        if result.error:
            _log(f"{label} FAILED: {result.error}")
        else:
            _log(
                f"{label} done: locust used {result.load_generator_cpu_s:.1f} s of CPU, "
                f"the server {result.server_cpu_s:.1f} s"
            )

    run = {
        "mode": "quick" if args.quick else "full",
        "client_mode": client_mode,
        "schedule": json.loads(schedule.to_json()),
        "variants": [v.name for v in selected],
        "baseline": variants.BASELINE,
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
