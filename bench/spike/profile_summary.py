"""Summarise the py-spy profiles of a spike run: ``profile_summary.py REPORT_DIR [VARIANT ...]``.

``run.py --profile`` records every app process of every variant with
``py-spy record --format raw`` during the spike (``REPORT_DIR/profiles``, one
file of collapsed stacks per process). This prints, per variant, where the
server's CPU went: samples by area (the query, the limiter package, FastAPI
and Starlette, uvicorn, the event loop, ...), and the functions with the most
samples, inclusive and self, as percentages of all samples of the variant,
so variants can be compared side by side. A frame is ``function (file:line)``;
files are shortened to the part after ``site-packages/`` or the repository.

Areas are matched on the files of a stack's frames, innermost first: a sample
in ``json`` called from FastAPI's serializer counts for FastAPI, a sample in
the package's waiting code for the package.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("query (sqlite, in threads)", ("spike/data.py",)),
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


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    if "bench/spike/" in path:
        return "spike/" + path.split("bench/spike/", 1)[1]
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


def _area(frames: list[tuple[str, str]]) -> str:
    for _function, file in reversed(frames):
        for name, markers in AREAS:
            if any(m in file for m in markers):
                return name
    return "other"


def load(paths: list[Path]) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks.append((_frames(stack), int(count)))
    return stacks


def summarise(name: str, paths: list[Path], top: int) -> str:
    stacks = load(paths)
    total = sum(n for _, n in stacks) or 1
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    for frames, n in stacks:
        areas[_area(frames)] += n
        labels = [f"{f} ({file})" for f, file in frames]
        for label in set(labels):
            inclusive[label] += n
        if labels:
            self_time[labels[-1]] += n
    lines = [f"## {name}: {total} samples from {len(paths)} process(es)", ""]
    lines += ["| area | % of samples |", "| --- | ---: |"]
    lines += [f"| {a} | {100 * n / total:.1f} |" for a, n in areas.most_common()]
    for title, counter in (("inclusive", inclusive), ("self", self_time)):
        lines += ["", f"| function ({title}) | % |", "| --- | ---: |"]
        lines += [f"| `{f}` | {100 * n / total:.1f} |" for f, n in counter.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("variants", nargs="*", help="default: every variant profiled")
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    args = parser.parse_args(argv)
    profiles = sorted((args.report_dir / "profiles").glob("*.txt"))
    by_variant: dict[str, list[Path]] = {}
    for path in profiles:
        by_variant.setdefault(path.stem.rsplit("-", 1)[0], []).append(path)
    names = args.variants or list(by_variant)
    missing = [n for n in names if n not in by_variant]
    if missing or not names:
        print(f"no profiles for {', '.join(missing) or 'any variant'}", file=sys.stderr)
        return 1
    print("\n\n".join(summarise(n, by_variant[n], args.top) for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
