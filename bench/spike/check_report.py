"""Check that a spike experiment report is complete: ``check_report.py REPORT_DIR``.

Exits non-zero, listing every problem, when a chart (throughput, latency, and
the series chart of a variant that records shared gauges), ``summary.md`` or
``summary.json`` is missing, or when ``summary.json`` lacks a field of the
schema documented in ``report.py`` or a required variant, or a variant lacks
its comparison with the baseline or a gauge it declares. A variant that sends
priority classes (``critical_users``) must also have its classes chart, each
class's figures with requests of both classes in the spike, and the goals of
priority classes (against ``fcl`` when it ran too). Values are not
judged: the numbers depend on the machine, the file layout must not. Both
client modes (``client_mode``: ``immediate``, ``retry_after``) are accepted.

The variants required are those the run was asked for (``raw/run.json``),
or ``--variants``: names, ``all`` or ``headline``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import variants as registry
from report import (
    BASELINE_METRICS,
    CLASS_FIELDS,
    CLASSES,
    CLIENT_MODES,
    CONFIG_FIELDS,
    GOAL_FIELDS,
    GOAL_REFERENCE,
    GOALS,
    PHASE_FIELDS,
    PHASES,
    RATIO_FIELDS,
    RAW_DIR,
    RUN_FILE,
    SCHEMA_VERSION,
    SERIES_PHASE_FIELDS,
    SERIES_STAT_FIELDS,
    TOP_LEVEL_FIELDS,
    VARIANT_FIELDS,
)


def _missing(obj: Any, fields: tuple[str, ...], where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    return [f"{where}: missing field {name!r}" for name in fields if name not in obj]


def _check_series(entry: dict[str, Any], config: Any, where: str) -> list[str]:
    """Every gauge the variant declares was recorded and summarised."""
    declared = config.get("series", []) if isinstance(config, dict) else []
    series = entry.get("series")
    if not isinstance(series, dict):
        return [f"{where}.series: expected an object"]
    problems = []
    for gauge in declared:
        stats = series.get(gauge)
        if stats is None:
            problems.append(f"{where}.series: gauge {gauge!r} was not recorded")
            continue
        problems += _missing(stats, SERIES_STAT_FIELDS, f"{where}.series.{gauge}")
        if isinstance(stats, dict):
            for phase in PHASES:
                problems += _missing(
                    stats.get(phase), SERIES_PHASE_FIELDS, f"{where}.series.{gauge}.{phase}"
                )
            if stats.get("max") is None:
                problems.append(f"{where}.series.{gauge}: no sample")
    return problems


def _check_versus(versus: Any, where: str) -> list[str]:
    if versus is None:
        return [f"{where}: missing although the baseline ran"]
    problems = _missing(versus, PHASES, where)
    if isinstance(versus, dict):
        for phase in PHASES:
            if phase in versus:
                problems += _missing(versus[phase], BASELINE_METRICS, f"{where}.{phase}")
    return problems


def _check_classes(entry: dict[str, Any], reference_ran: bool, where: str) -> list[str]:
    """A variant that sends classes: each class's figures per phase, requests of each
    class in the spike, and every goal, against the reference when it ran."""
    classes = entry.get("classes")
    problems = []
    if not isinstance(classes, dict):
        problems.append(f"{where}.classes: expected an object for a variant with critical users")
        classes = {}
    else:
        problems += _missing(classes, CLASSES, f"{where}.classes")
    for cls in CLASSES:
        phases = classes.get(cls)
        if not isinstance(phases, dict):
            continue
        problems += _missing(phases, PHASES, f"{where}.classes.{cls}")
        for phase in PHASES:
            if isinstance(phases.get(phase), dict):
                problems += _missing(phases[phase], CLASS_FIELDS, f"{where}.classes.{cls}.{phase}")
        spike = phases.get("spike")
        if isinstance(spike, dict) and not spike.get("requests"):
            problems.append(f"{where}.classes.{cls}: no request of this class in the spike")
    goals = entry.get("goals")
    if not isinstance(goals, dict):
        return [*problems, f"{where}.goals: expected an object for a variant with critical users"]
    if reference_ran and goals.get("reference") != GOAL_REFERENCE:
        problems.append(f"{where}.goals: not measured against {GOAL_REFERENCE}, which ran")
    for goal in GOALS:
        problems += _missing(goals.get(goal.key), GOAL_FIELDS, f"{where}.goals.{goal.key}")
    return problems


def _requested(report_dir: Path) -> list[str]:
    """The variants the run was asked for, from ``raw/run.json``."""
    try:
        run = json.loads((report_dir / RAW_DIR / RUN_FILE).read_text(encoding="utf-8"))
        return [str(v) for v in run["variants"]]
    except (OSError, ValueError, KeyError, TypeError):
        return list(registry.HEADLINE)


def check(report_dir: Path, variants: list[str]) -> list[str]:
    """All problems found in ``report_dir``; empty when the report is complete."""
    problems = []
    expected = ["summary.md", "summary.json"]
    if variants:
        expected.append("comparison.png")
    for variant in variants:
        expected += [f"{variant}-throughput.png", f"{variant}-latency.png"]
        known = registry.VARIANTS.get(variant)
        if known is not None and known.series:
            expected.append(f"{variant}-series.png")
        if known is not None and known.critical_users:
            expected.append(f"{variant}-classes.png")
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
    if "client_mode" in summary and summary["client_mode"] not in CLIENT_MODES:
        problems.append(
            f"summary: client_mode {summary['client_mode']!r}, expected one of "
            f"{', '.join(CLIENT_MODES)}"
        )
    entries = summary.get("variants", {})
    for variant in variants:
        if variant not in entries:
            reason = summary.get("failed_variants", {}).get(variant, "not in the report")
            problems.append(f"variant {variant!r} missing: {reason}")
    baseline = summary.get("baseline")
    for variant, entry in entries.items():
        where = f"variants.{variant}"
        problems += _missing(entry, VARIANT_FIELDS, where)
        if not isinstance(entry, dict):
            continue
        problems += _missing(entry.get("ratios"), RATIO_FIELDS, f"{where}.ratios")
        config = entry.get("config")
        problems += _missing(config, CONFIG_FIELDS, f"{where}.config")
        problems += _check_series(entry, config, where)
        if isinstance(config, dict) and config.get("critical_users"):
            problems += _check_classes(entry, GOAL_REFERENCE in entries, where)
        if baseline in entries and variant != baseline:
            problems += _check_versus(entry.get("vs_baseline"), f"{where}.vs_baseline")
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
        default="",
        help=(
            "comma-separated variants that must be in the report, 'all' or 'headline' "
            "(default: those the run was asked for)"
        ),
    )
    args = parser.parse_args(argv)
    if args.variants:
        try:
            variants = [v.name for v in registry.select(args.variants, quick=False)]
        except ValueError as e:
            parser.error(str(e))
    else:
        variants = _requested(args.report_dir)
    problems = check(args.report_dir, variants)
    for problem in problems:
        print(f"check_report: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_report: {args.report_dir} is complete ({', '.join(variants)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
