"""Summarise the py-spy profiles of spike runs: ``profile_summary.py REPORT_DIR [REPORT_DIR ...]``.

``run.py --profile`` records every app process of every variant with
``py-spy record --gil --format raw`` during the spike (``REPORT_DIR/profiles``,
one file of collapsed stacks per process): 100 samples per second of the
thread holding the GIL, that is of Python code running, not of threads
waiting for a core, for the GIL or for I/O. Profiles of several runs add up
(pass their report directories). This prints, per variant:

- all samples by area (the query in worker threads, the event loop, ...);
- the event-loop thread alone, where the Python layer runs: its busy samples
  (the thread not waiting in ``select``) in seconds and per response of the
  spike (from ``summary.json``), split by the innermost frame's area, and the
  code paths that matter for a limiter (its waiting path, the disconnect
  watcher, the rejection path, the 503 response, JSON responses, thread
  dispatch), inclusive;
- the functions with the most samples, inclusive and self.

Percentages are of the samples of the section; µs are sampled time, which
on a loaded machine includes time the process was ready but off the CPU, so
compare variants profiled in the same runs. A frame reads
``function (file:line)``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

DEFAULT_RATE_HZ = 100
"""py-spy's default rate, for profiles without ``profiles/meta.json``."""

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("query (sqlite, in threads)", ("(data.py",)),
    ("limiter package", ("fastapi_concurrency_limiter/",)),
    ("/file reads (anyio files)", ("anyio/_core/_fileio",)),
    ("fastapi", ("fastapi/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("starlette", ("starlette/",)),
    ("uvicorn (HTTP protocol)", ("uvicorn/",)),
    ("anyio (threads)", ("anyio/",)),
    ("asyncio event loop", ("asyncio/",)),
    ("threads (idle pool, stdlib)", ("threading.py", "concurrent/", "queue.py")),
)


LOOP_AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("limiter package", ("fastapi_concurrency_limiter/",)),
    ("fastapi", ("(fastapi/",)),
    ("pydantic", ("(pydantic/", "(pydantic_core/")),
    ("starlette", ("(starlette/",)),
    ("uvicorn + h11 (HTTP)", ("(uvicorn/", "(h11/")),
    ("anyio (thread dispatch)", ("(anyio/",)),
    ("json", ("(json/",)),
    ("asyncio", ("(asyncio/",)),
    ("the app", ("(app.py", "(data.py", "(probe.py")),
)
"""Areas of the event-loop thread's samples, by their innermost frame."""

PATHS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("limiter package, all", ("fastapi_concurrency_limiter/",)),
    (
        "  decorator wrapper (fcl: endpoint; original: wrapper)",
        (
            "_limit.<locals>.endpoint (fastapi_concurrency_limiter/",
            "resources.<locals>.decorator.<locals>.wrapper (fastapi_concurrency_limiter/",
        ),
    ),
    (
        "  waiting (fcl: wait; original: _acquire_all, Semaphore)",
        (
            "wait (fastapi_concurrency_limiter/_waiting.py",
            "_acquire_all (fastapi_concurrency_limiter/limiter.py",
        ),
    ),
    ("  reading the body before waiting (fcl)", ("_read_body (fastapi_concurrency_limiter/",)),
    ("  disconnect watcher task (fcl)", ("_watch_disconnect (fastapi_concurrency_limiter/",)),
    ("  deadline timer (fcl: _LoopTimer)", ("_LoopTimer.",)),
    ("  rejection log (fcl)", ("log_rejection (fastapi_concurrency_limiter/",)),
    ("  ServerBusy construction (fcl)", ("ServerBusy.__init__",)),
    ("asyncio.timeout (original)", ("(asyncio/timeouts.py",)),
    ("asyncio.Semaphore (original)", ("Semaphore.",)),
    ("exception to 503 response (handlers)", ("http_exception_handler (",)),
    (
        "JSON responses (serialize_response, jsonable_encoder, render)",
        (
            "serialize_response (",
            "jsonable_encoder (",
            "JSONResponse.render (",
        ),
    ),
    ("thread dispatch (run_in_threadpool)", ("run_sync_in_worker_thread (",)),
    ("/file reads on the loop (anyio files)", ("(anyio/_core/_fileio",)),
    ("dependency solving (fastapi)", ("solve_dependencies (",)),
    ("uvicorn send (response to socket)", ("RequestResponseCycle.send (",)),
    ("uvicorn receive", ("RequestResponseCycle.receive (",)),
    ("task steps (asyncio Task.__step)", ("Task.__step", "Task.task_wakeup")),
)
"""Code paths of the event-loop thread, inclusive (a sample counts in each that is on its stack)."""

LOOP_MARKER = "_run_once (asyncio/base_events.py"
IDLE_MARKER = "select (selectors.py"


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    if "bench/spike/" in path:
        return path.split("bench/spike/", 1)[1]
    stdlib = re.search(r"lib/python3\.\d+/(.*)", path)
    return stdlib[1] if stdlib else path


def _frames(stack: str) -> list[tuple[str, str]]:
    """``(function, short file)`` of each frame, outermost first; thread labels dropped."""
    frames = []
    for raw in stack.split(";"):
        match = _FRAME.match(raw.strip())
        if match is None:
            continue
        if match["function"].startswith("thread") and not match["file"]:
            continue
        frames.append((match["function"], _short(match["file"])))
    return frames


def _label(frame: tuple[str, str]) -> str:
    return f"{frame[0]} ({frame[1]})"


def _area(frames: list[tuple[str, str]], areas: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    for frame in reversed(frames):
        label = _label(frame)
        for name, markers in areas:
            if any(m in label for m in markers):
                return name
    return "other"


def _spike_responses(report_dirs: list[Path], variant: str) -> float | None:
    """Responses of ``variant`` during the spikes, from each run's ``summary.json``."""
    total = 0.0
    for report_dir in report_dirs:
        try:
            summary = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
            spike = summary["variants"][variant]["phases"]["spike"]
            total += float(spike["responses_per_s"]) * (
                float(spike["end_s"]) - float(spike["start_s"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def _loop_section(
    stacks: list[tuple[list[tuple[str, str]], float]], responses: float | None, top: int
) -> list[str]:
    busy = [
        (frames, n)
        for frames, n in stacks
        if any(LOOP_MARKER in _label(f) for f in frames)
        and not (frames and IDLE_MARKER in _label(frames[-1]))
    ]
    samples = sum(n for _, n in busy)
    if not samples:
        return []
    seconds = samples
    per_response = (
        f", {1e6 * seconds / responses:.0f} µs per response ({responses:.0f} responses)"
        if responses
        else ""
    )
    lines = ["", f"Event-loop thread, busy: {seconds:.2f} s sampled{per_response}", ""]
    areas: Counter[str] = Counter()
    paths: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    for frames, n in busy:
        areas[_area(frames, LOOP_AREAS)] += n
        self_time[_label(frames[-1])] += n
        stack = ";".join(_label(f) for f in frames)
        for name, markers in PATHS:
            if any(m in stack for m in markers):
                paths[name] += n

    def us(n: float) -> str:
        return f"{1e6 * n / responses:.0f}" if responses else "-"

    lines += ["| innermost frame in | % of busy | µs/response |", "| --- | ---: | ---: |"]
    lines += [f"| {a} | {100 * n / samples:.1f} | {us(n)} |" for a, n in areas.most_common()]
    lines += ["", "| code path (inclusive) | % of busy | µs/response |", "| --- | ---: | ---: |"]
    lines += [
        f"| {name} | {100 * paths[name] / samples:.1f} | {us(paths[name])} |"
        for name, _ in PATHS
        if paths[name]
    ]
    lines += [
        "",
        "| event-loop function (self) | % of busy | µs/response |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| `{f}` | {100 * n / samples:.1f} | {us(n)} |" for f, n in self_time.most_common(top)
    ]
    return lines


def _rate(profile: Path) -> float:
    try:
        meta = json.loads((profile.parent / "meta.json").read_text(encoding="utf-8"))
        return float(meta["rate_hz"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_RATE_HZ


def load(paths: list[Path]) -> list[tuple[list[tuple[str, str]], float]]:
    """Every stack with the time it was sampled for (count / rate), in seconds."""
    stacks = []
    for path in paths:
        rate = _rate(path)
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks.append((_frames(stack), int(count) / rate))
    return stacks


def summarise(name: str, paths: list[Path], top: int, responses: float | None) -> str:
    stacks = load(paths)
    total = sum(n for _, n in stacks) or 1
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    for frames, n in stacks:
        areas[_area(frames, AREAS)] += n
        labels = [f"{f} ({file})" for f, file in frames]
        for label in set(labels):
            inclusive[label] += n
        if labels:
            self_time[labels[-1]] += n
    lines = [f"## {name}: {total:.1f} s sampled in {len(paths)} process profile(s)", ""]
    lines += ["| area | % of samples |", "| --- | ---: |"]
    lines += [f"| {a} | {100 * n / total:.1f} |" for a, n in areas.most_common()]
    lines += _loop_section(stacks, responses, top)
    for title, counter in (("inclusive", inclusive), ("self", self_time)):
        lines += ["", f"| function ({title}) | % |", "| --- | ---: |"]
        lines += [f"| `{f}` | {100 * n / total:.1f} |" for f, n in counter.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_dirs", type=Path, nargs="+", metavar="REPORT_DIR")
    parser.add_argument(
        "--variants", default="", help="comma-separated (default: every variant profiled)"
    )
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    args = parser.parse_args(argv)
    by_variant: dict[str, list[Path]] = {}
    dirs_of: dict[str, list[Path]] = {}
    for report_dir in args.report_dirs:
        for path in sorted((report_dir / "profiles").glob("*.txt")):
            name = path.stem.rsplit("-", 1)[0]
            by_variant.setdefault(name, []).append(path)
            if report_dir not in dirs_of.setdefault(name, []):
                dirs_of[name].append(report_dir)
    names = [n for n in args.variants.split(",") if n] or list(by_variant)
    missing = [n for n in names if n not in by_variant]
    if missing or not names:
        print(f"no profiles for {', '.join(missing) or 'any variant'}", file=sys.stderr)
        return 1
    print(
        "\n\n".join(
            summarise(n, by_variant[n], args.top, _spike_responses(dirs_of[n], n)) for n in names
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
