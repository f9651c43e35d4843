"""The benchmarks' ratios beside a committed baseline: a regression guard
that reports, never fails (benchmark machines are noisy).

Each benchmark writes its ratios (ours / the baseline mechanism of the same
run, so that the machine's speed cancels out) to a file of the directory
given here: ``python.json`` (bench/python_bench.py --json), ``engine.json``
(Google Benchmark's --benchmark_out of bench/engine_bench.cc, whose ratios
are computed here the way its own report does) and ``redis.json``
(bench/redis_bench.py --json). ``make bench`` and ``make bench-redis`` write
them under build/bench/.

    python bench/ratios.py report DIR    merges what DIR holds into
                                         DIR/ratios.json and prints each
                                         ratio beside bench/baseline.json's,
                                         marking those more than 25 % above
    python bench/ratios.py baseline DIR  writes DIR/ratios.json's ratios to
                                         bench/baseline.json (make
                                         bench-baseline)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).with_name("baseline.json")
# The targets the project has set for some ratios (printed beside them).
GOALS = {
    "python uncontended @limiter.resources([db]) endpoint call / asyncio.Semaphore": 1.0,
    "python uncontended limiter.acquire([db]) (async with) / asyncio.Semaphore": 1.3,
    "python contended limiter.acquire, Resource(1), 50 tasks (handoff) / asyncio.Semaphore": 1.2,
    "python contended @limiter.resources endpoint, 50 tasks (handoff) / asyncio.Semaphore": 1.2,
    "engine handoff/engine / cv_sem (real)": 1.2,
    "engine uncontended/engine / std::sem (cpu)": 2.0,
    "redis wait for the slot (tight loop) / PING": 1.5,
    "redis wait for a free slot (spaced) / PING": 1.5,
}
# A ratio more than this far above its baseline is marked.
TOLERANCE = 1.25


def engine_ratios(path: Path) -> dict[str, float]:
    """Each engine case of bench/engine_bench.cc divided by the two
    semaphores of its family (medians of the repetitions): CPU time for the
    single-threaded cases, real time for the threaded ones (a blocked
    thread uses no CPU), as the benchmark's own table."""
    runs = json.loads(path.read_text())["benchmarks"]
    times: dict[str, tuple[float, bool]] = {}
    for run in runs:
        if run.get("error_occurred"):
            continue
        if run.get("run_type") == "aggregate" and run.get("aggregate_name") != "median":
            continue
        if run.get("run_type") == "iteration" and run.get("repetitions", 1) > 1:
            continue
        name = run["run_name"]
        # "handoff/engine/real_time/threads:2" -> "handoff/engine"
        base = "/".join(name.split("/")[:2])
        threaded = run.get("threads", 1) > 1
        times[base] = (run["real_time"] if threaded else run["cpu_time"], threaded)
    ratios = {}
    for name, (t, threaded) in sorted(times.items()):
        family, _, case = name.partition("/")
        if not case.startswith("engine"):
            continue
        clock = "real" if threaded else "cpu"
        for ref, label in (("cv_semaphore", "cv_sem"), ("std_counting_semaphore", "std::sem")):
            other = times.get(f"{family}/{ref}")
            if other is not None:
                ratios[f"engine {name} / {label} ({clock})"] = t / other[0]
    return ratios


SOURCES = {
    "python.json": lambda p: json.loads(p.read_text()),
    "engine.json": engine_ratios,
    "redis.json": lambda p: json.loads(p.read_text()),
}


def machine() -> str:
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}, {platform.system()}"
    )


def collect(directory: Path) -> dict[str, Any]:
    ratios: dict[str, float] = {}
    sources = {}
    for name, read in SOURCES.items():
        path = directory / name
        if path.exists():
            ratios.update(read(path))
            stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
            sources[name] = stamp.strftime("%Y-%m-%d %H:%M UTC")
    return {"machine": machine(), "sources": sources, "ratios": ratios}


def report(directory: Path) -> None:
    current = collect(directory)
    (directory / "ratios.json").write_text(json.dumps(current, indent=2) + "\n")
    baseline: dict[str, Any] = {"ratios": {}}
    if BASELINE.exists():
        baseline = json.loads(BASELINE.read_text())
    base = baseline["ratios"]
    print(f"\n== ratios beside the baseline ({BASELINE.name}: {baseline.get('machine', '?')}, "
          f"{baseline.get('date', '?')})")
    print(f"   this run: {current['machine']}; written to {directory / 'ratios.json'}")
    for name, stamp in current["sources"].items():
        print(f"   {name} from {stamp}")
    width = max((len(n) for n in current["ratios"]), default=10)
    print(f"{'ratio':<{width}} {'now':>7} {'baseline':>9} {'goal':>6}")
    marked = 0
    for name, value in current["ratios"].items():
        ref = base.get(name)
        goal = GOALS.get(name)
        goal_text = "-" if goal is None else f"{goal:.2f}"
        mark = ""
        if ref is not None and value > ref * TOLERANCE:
            mark = f"  <-- {100 * (value / ref - 1):.0f} % above the baseline"
            marked += 1
        if ref is None:
            mark = "  (no baseline: add it with make bench-baseline)"
        ref_text = "-" if ref is None else f"{ref:.2f}"
        print(f"{name:<{width}} {value:>7.2f} {ref_text:>9} {goal_text:>6}{mark}")
    for name in base:
        if name not in current["ratios"]:
            print(f"{name:<{width}} {'-':>7} {base[name]:>9.2f}  (not measured in this run)")
    print(f"{marked} ratio(s) more than {100 * (TOLERANCE - 1):.0f} % above the baseline "
          "(a report, not a failure: rerun to tell noise from a regression)")


def write_baseline(directory: Path) -> None:
    current = collect(directory)
    if not current["ratios"]:
        sys.exit(f"no ratios under {directory}: run make bench (and make bench-redis) first")
    baseline = {
        "machine": current["machine"],
        "date": datetime.date.today().isoformat(),
        "note": "ratios of one run of make bench and make bench-redis on that machine; "
        "refresh with make bench-baseline",
        "ratios": {k: round(v, 3) for k, v in current["ratios"].items()},
    }
    BASELINE.write_text(json.dumps(baseline, indent=2) + "\n")
    print(f"wrote {len(baseline['ratios'])} ratios to {BASELINE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["report", "baseline"])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    if args.command == "report":
        report(args.directory)
    else:
        write_baseline(args.directory)


if __name__ == "__main__":
    main()
