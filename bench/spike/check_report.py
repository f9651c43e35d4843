"""Check that a spike experiment report is complete: ``check_report.py REPORT_DIR``.

Exits non-zero, listing every problem, when a chart, ``summary.md`` or
``summary.json`` is missing, or when ``summary.json`` lacks a field of the
schema documented in ``report.py`` or a required variant. Values are not
judged: the numbers depend on the machine, the file layout must not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from report import (
    PHASE_FIELDS,
    PHASES,
    RATIO_FIELDS,
    SCHEMA_VERSION,
    TOP_LEVEL_FIELDS,
    VARIANT_FIELDS,
)

ALL_VARIANTS = ("none", "asyncio", "fcl", "fcl-tuned")


def _missing(obj: Any, fields: tuple[str, ...], where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    return [f"{where}: missing field {name!r}" for name in fields if name not in obj]


def check(report_dir: Path, variants: list[str]) -> list[str]:
    """All problems found in ``report_dir``; empty when the report is complete."""
    problems = []
    expected = ["summary.md", "summary.json"]
    if variants:
        expected.append("comparison.png")
    for variant in variants:
        expected += [f"{variant}-throughput.png", f"{variant}-latency.png"]
    for name in expected:
        path = report_dir / name
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"missing or empty: {path}")

    try:
        summary = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [*problems, f"summary.json unreadable: {e}"]

    problems += _missing(summary, TOP_LEVEL_FIELDS, "summary")
    if summary.get("schema_version") != SCHEMA_VERSION:
        problems.append(
            f"summary: schema_version {summary.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    entries = summary.get("variants", {})
    for variant in variants:
        if variant not in entries:
            reason = summary.get("failed_variants", {}).get(variant, "not in the report")
            problems.append(f"variant {variant!r} missing: {reason}")
    for variant, entry in entries.items():
        where = f"variants.{variant}"
        problems += _missing(entry, VARIANT_FIELDS, where)
        if not isinstance(entry, dict):
            continue
        problems += _missing(entry.get("ratios"), RATIO_FIELDS, f"{where}.ratios")
        phases = entry.get("phases")
        problems += _missing(phases, PHASES, f"{where}.phases")
        if isinstance(phases, dict):
            for phase in PHASES:
                if phase in phases:
                    problems += _missing(phases[phase], PHASE_FIELDS, f"{where}.phases.{phase}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_dir", type=Path)
    parser.add_argument(
        "--variants",
        default=",".join(ALL_VARIANTS),
        help="comma-separated variants that must be in the report (default: all four)",
    )
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    problems = check(args.report_dir, variants)
    for problem in problems:
        print(f"check_report: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_report: {args.report_dir} is complete ({', '.join(variants)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
