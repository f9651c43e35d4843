"""Aggregate the recorded requests of the spike experiment into charts and a summary.

Run by ``run.py`` after the load; run it alone to redraw a report from the raw
data it keeps: ``python bench/spike/report.py REPORT_DIR``.

``summary.json`` schema (version 4: version 3 plus ``client_mode``; version 3:
version 2 plus ``*_503_p50_ms``, ``classes``, ``goals`` and
``config.critical_users``). The field names are stable: CI checks that
every one is present (``check_report.py``); values may be ``null`` where they
cannot be computed, e.g. a latency percentile of a phase without successes::

    {
      "schema_version": 4,
      "mode": "full" | "quick",
      "client_mode": "immediate" (users resend as soon as answered) |
                     "retry_after" (after a 503, users wait its Retry-After, 1 s
                     without one; ``run.py --honour-retry-after``),
      "generated_at": "<ISO 8601>",
      "schedule": {<schedule.Schedule fields>},
      "environment": {"python", "platform", "cpu_count", "load_average", "packages"},
      "messages_query_ms": <median /messages query time on the idle machine>,
      "baseline": "original",
      "failed_variants": {"<variant>": "<reason>"},
      "variants": {
        "<variant>": {
          "config": {"description", "app", "workers", "instances", "db_capacity",
                     "series": [<gauge>, ...], "critical_users",
                     "packages": {<name>: <version>}},
          "requests": <count>,
          "load_generator_cpu_s": <CPU seconds used by locust>,
          "server_cpu_s": <CPU seconds used by the server processes>,
          "profiler_cpu_s": <CPU seconds used by py-spy> | null (without --profile),
          "recovery_s": <seconds after the drop until /messages successes per
                         second are back within 20 % of the steady level> | null,
          "ratios": {
            "file_p99_spike_over_steady",
            "file_goodput_spike_over_steady",
            "messages_goodput_spike_over_steady",
            "messages_p50_spike_over_steady"
          },
          "phases": {
            "before" | "spike" | "after": {
              "start_s", "end_s",
              "messages_ok_per_s", "messages_503_per_s",
              "messages_timeouts", "messages_errors",
              "messages_p50_ms", "messages_p99_ms", "messages_503_p50_ms",
              "file_ok_per_s", "file_503_per_s",
              "file_timeouts", "file_errors",
              "file_p50_ms", "file_p99_ms", "file_503_p50_ms",
              "responses_per_s",
              "server_cpu_ms_per_response", "loop_cpu_ms_per_response"
            }
          },
          "vs_baseline": null (the baseline itself, or no baseline in the run) | {
            "before" | "spike" | "after": {
              "messages_ok_per_s", "messages_p50_ms", "messages_p99_ms",
              "file_ok_per_s", "file_p50_ms", "file_p99_ms",
              "server_cpu_ms_per_response", "loop_cpu_ms_per_response"
            }
          },
          "series": {
            "<gauge>": {"max", "before" | "spike" | "after": {"max", "mean"}}
          },
          "classes": null (no class sent) | {
            "critical" | "sheddable": {
              "before" | "spike" | "after": {
                "requests", "ok_pct", "ok_per_s", "503_per_s", "timeouts", "errors",
                "p50_ms", "p99_ms", "503_p50_ms"
              }
            }
          },
          "goals": null (no class sent) | {
            "reference": "fcl" | null (fcl did not run),
            "critical_ok_pct" | "critical_p99_over_reference" | "rejected_p50_ms" |
            "messages_goodput_over_reference" | "file_p99_over_reference": {
              "description", "compare": ">=" | "<=", "target", "measured",
              "value", "reference_value", "met": true | false | null
            }
          }
        }
      }
    }

``*_503_p50_ms`` is the median latency of the phase's 503s (how long a refused
request waited for its answer). ``classes`` (a variant with ``critical_users``:
``/messages`` requests sent as ``critical`` or ``sheddable``) has each class's
``/messages`` outcomes per phase: ``requests`` answered or timed out,
``ok_pct`` the share of them that succeeded. ``goals`` measures such a variant
against the goals of priority classes, in the spike phase, with ``fcl`` of the
same run as the reference: ``measured`` is the ratio (or the value, for
``critical_ok_pct`` and ``rejected_p50_ms``) compared with ``target``;
``value`` is this variant's figure and ``reference_value`` ``fcl``'s; ``met``
is ``null`` where a figure is missing (no ``fcl`` in the run). A report, not a
verdict: the run goes on and exits 0 whether the goals are met or not.

``vs_baseline`` holds this variant's value over the baseline's, metric by
metric, in the same phase of the same run: above 1 is more for rates and
slower for latencies. ``series`` summarises the shared gauges (``probe.py``)
sampled during the run: ``max`` is the highest value seen (including the
peaks between samples), ``mean`` the mean of the sampled values.

Rates are per second of the phase, counts are totals over the phase, latencies
are of successful requests only (the others are counted, not timed). A request
belongs to the second in which it completed. ``responses_per_s`` counts every
answer and client timeout of both endpoints; ``server_cpu_ms_per_response``
is the CPU time of the app processes in the phase per response, and
``loop_cpu_ms_per_response`` that of their main threads, which run the event
loop (HTTP, routing, the limiter; not the queries and file reads, which run in
worker threads): the cost of the Python layer per request, CPU time rather
than wall time, so it is less disturbed by other load on the machine.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from schedule import Schedule

SCHEMA_VERSION = 4

CLIENT_IMMEDIATE = "immediate"
"""Client mode: every user sends its next request as soon as it has an answer."""
CLIENT_RETRY_AFTER = "retry_after"
"""Client mode: after a 503, a user waits its ``Retry-After`` (1 s without one)."""
CLIENT_MODES = (CLIENT_IMMEDIATE, CLIENT_RETRY_AFTER)

ENDPOINTS = ("messages", "file")
"""Endpoint keys used in field names; the URL path is ``/<key>``."""

PHASES = ("before", "spike", "after")

TOP_LEVEL_FIELDS = (
    "schema_version",
    "mode",
    "client_mode",
    "generated_at",
    "schedule",
    "environment",
    "messages_query_ms",
    "baseline",
    "failed_variants",
    "variants",
)
VARIANT_FIELDS = (
    "config",
    "requests",
    "load_generator_cpu_s",
    "server_cpu_s",
    "profiler_cpu_s",
    "recovery_s",
    "ratios",
    "phases",
    "vs_baseline",
    "series",
    "classes",
    "goals",
)
CONFIG_FIELDS = (
    "description",
    "app",
    "workers",
    "instances",
    "db_capacity",
    "series",
    "critical_users",
)
BASELINE_METRICS = (
    "messages_ok_per_s",
    "messages_p50_ms",
    "messages_p99_ms",
    "file_ok_per_s",
    "file_p50_ms",
    "file_p99_ms",
    "server_cpu_ms_per_response",
    "loop_cpu_ms_per_response",
)
"""The metrics compared with the baseline, in every phase."""
SERIES_STAT_FIELDS = ("max", *PHASES)
SERIES_PHASE_FIELDS = ("max", "mean")
SERIES_FIELDS = ("t", "gauge", "value", "peak")
"""Columns of ``raw/<variant>-series.csv``, written by ``run.py``; ``t`` is Unix seconds."""
CPU_FIELDS = ("t", "loop_cpu_s", "process_cpu_s")
"""Columns of ``raw/<variant>-cpu.csv``: cumulative CPU seconds of the app processes'
main threads and of the whole processes, summed over the processes."""
RATIO_FIELDS = (
    "file_p99_spike_over_steady",
    "file_goodput_spike_over_steady",
    "messages_goodput_spike_over_steady",
    "messages_p50_spike_over_steady",
)
METRICS = ("ok_per_s", "503_per_s", "timeouts", "errors", "p50_ms", "p99_ms", "503_p50_ms")
"""What the report gives of each endpoint in a phase, and of each class."""
PHASE_FIELDS = (
    "start_s",
    "end_s",
    *(f"{endpoint}_{metric}" for endpoint in ENDPOINTS for metric in METRICS),
    "responses_per_s",
    "server_cpu_ms_per_response",
    "loop_cpu_ms_per_response",
)

CLASSES = ("critical", "sheddable")
"""The classes the load generator sends ``/messages`` requests as (``locustfile.py``)."""
CLASS_FIELDS = ("requests", "ok_pct", *METRICS)
GOAL_REFERENCE = "fcl"
"""The goals of priority classes compare a variant with this one, in the same run."""


@dataclass(frozen=True)
class Goal:
    """One goal of priority classes, judged on the spike phase."""

    key: str
    description: str
    compare: str
    """``>=`` or ``<=``: how ``measured`` must compare with ``target``."""
    target: float


GOALS = (
    Goal("critical_ok_pct", "critical `/messages` success (%)", ">=", 99.5),
    Goal(
        "critical_p99_over_reference",
        f"critical `/messages` p99 over `{GOAL_REFERENCE}`'s `/messages` p99",
        "<=",
        0.5,
    ),
    Goal("rejected_p50_ms", "`/messages` 503s answered within, p50 (ms)", "<=", 50.0),
    Goal(
        "messages_goodput_over_reference",
        f"`/messages` goodput (every class) over `{GOAL_REFERENCE}`'s",
        ">=",
        0.95,
    ),
    Goal("file_p99_over_reference", f"`/file` p99 over `{GOAL_REFERENCE}`'s", "<=", 1.0),
)
GOAL_FIELDS = ("description", "compare", "target", "measured", "value", "reference_value", "met")

RECOVERY_TOLERANCE = 0.20
"""Recovered = /messages successes per second within 20 % of the steady level."""

RECOVERY_WINDOW_S = 3
"""The level is judged on a 3 s mean, so one noisy second neither ends nor extends the recovery."""

RAW_DIR = "raw"
RUN_FILE = "run.json"
"""Written by ``run.py`` into the raw directory: mode, schedule, variants, environment."""


@dataclass
class EndpointSeries:
    """Per-second counts and latency percentiles of one endpoint."""

    ok: npt.NDArray[np.float64]
    rejected: npt.NDArray[np.float64]
    timeouts: npt.NDArray[np.float64]
    errors: npt.NDArray[np.float64]
    p50_ms: npt.NDArray[np.float64]
    p99_ms: npt.NDArray[np.float64]
    rejected_p50_ms: npt.NDArray[np.float64]
    """Per second, the median latency of the 503s."""
    # Completion time (s since start) and latency of every success, for phase percentiles.
    ok_t: npt.NDArray[np.float64] = field(repr=False)
    ok_latency_ms: npt.NDArray[np.float64] = field(repr=False)
    # Completion times of the failures, for phase counts, and the 503s' latencies.
    rejected_t: npt.NDArray[np.float64] = field(repr=False)
    rejected_latency_ms: npt.NDArray[np.float64] = field(repr=False)
    timeout_t: npt.NDArray[np.float64] = field(repr=False)
    error_t: npt.NDArray[np.float64] = field(repr=False)


@dataclass
class GaugeSeries:
    """One shared gauge sampled during the run: value at each sample, peak since the previous."""

    t: npt.NDArray[np.float64]
    value: npt.NDArray[np.float64]
    peak: npt.NDArray[np.float64]


@dataclass
class VariantData:
    """Everything recorded for one variant, on the schedule's time axis."""

    name: str
    schedule: Schedule
    seconds: npt.NDArray[np.float64]
    endpoints: dict[str, EndpointSeries]
    users_t: npt.NDArray[np.float64]
    messages_users: npt.NDArray[np.float64]
    file_users: npt.NDArray[np.float64]
    requests: int
    config: dict[str, Any] = field(default_factory=dict)
    gauges: dict[str, GaugeSeries] = field(default_factory=dict)
    # Cumulative CPU seconds of the app processes (main threads, whole) at times cpu_t.
    cpu_t: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    loop_cpu_s: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    process_cpu_s: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    # Completion times of every response and client timeout, both endpoints.
    response_t: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    # /messages by the class its requests were sent as (CLASSES), when any was.
    classes: dict[str, EndpointSeries] = field(default_factory=dict)
    critical_users: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))


def _percentile(values: npt.NDArray[np.float64], q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def _per_second_percentiles(
    t: npt.NDArray[np.float64], latency: npt.NDArray[np.float64], n_seconds: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """p50 and p99 of ``latency`` per second of ``t`` (NaN in a second without any)."""
    p50 = np.full(n_seconds, np.nan)
    p99 = np.full(n_seconds, np.nan)
    second = np.floor(t).astype(int)
    order = np.argsort(second, kind="stable")
    second, sorted_latency = second[order], latency[order]
    bounds = np.searchsorted(second, np.arange(n_seconds + 1))
    for s in range(n_seconds):
        chunk = sorted_latency[bounds[s] : bounds[s + 1]]
        if chunk.size:
            p50[s], p99[s] = np.percentile(chunk, [50, 99])
    return p50, p99


def _series(
    t: npt.NDArray[np.float64],
    outcome: npt.NDArray[np.str_],
    latency: npt.NDArray[np.float64],
    n_seconds: int,
) -> EndpointSeries:
    bins = np.arange(n_seconds + 1, dtype=np.float64)

    def per_second(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        return np.histogram(t[mask], bins=bins)[0].astype(np.float64)

    ok = outcome == "ok"
    rejected = outcome == "rejected"
    p50, p99 = _per_second_percentiles(t[ok], latency[ok], n_seconds)
    rejected_p50, _ = _per_second_percentiles(t[rejected], latency[rejected], n_seconds)
    errors = (outcome == "error") | (outcome == "http_error")
    return EndpointSeries(
        ok=per_second(ok),
        rejected=per_second(rejected),
        timeouts=per_second(outcome == "timeout"),
        errors=per_second(errors),
        p50_ms=p50,
        p99_ms=p99,
        rejected_p50_ms=rejected_p50,
        ok_t=t[ok],
        ok_latency_ms=latency[ok],
        rejected_t=t[rejected],
        rejected_latency_ms=latency[rejected],
        timeout_t=t[outcome == "timeout"],
        error_t=t[errors],
    )


def _load_gauges(path: Path, t0: float) -> dict[str, GaugeSeries]:
    rows: dict[str, list[tuple[float, float, float]]] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rows.setdefault(row["gauge"], []).append(
                    (float(row["t"]) - t0, float(row["value"]), float(row["peak"]))
                )
    gauges = {}
    for name, samples in rows.items():
        t, value, peak = np.asarray(samples, dtype=np.float64).T
        gauges[name] = GaugeSeries(t=t, value=value, peak=peak)
    return gauges


def _load_cpu(path: Path, t0: float) -> npt.NDArray[np.float64]:
    """Rows of (t since start, loop CPU s, process CPU s); empty without the file."""
    if not path.exists():
        return np.zeros((0, 3))
    with path.open(newline="", encoding="utf-8") as f:
        rows = [
            (float(r["t"]) - t0, float(r["loop_cpu_s"]), float(r["process_cpu_s"]))
            for r in csv.DictReader(f)
        ]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def load_variant(
    raw_dir: Path, name: str, schedule: Schedule, config: dict[str, Any] | None = None
) -> VariantData:
    """Read the events, users, meta and series files ``run.py`` recorded for ``name``."""
    meta = json.loads((raw_dir / f"{name}-meta.json").read_text(encoding="utf-8"))
    t0 = float(meta["t0"])
    n_seconds = math.ceil(schedule.total_s)

    columns: dict[str, list[Any]] = {
        "t": [],
        "endpoint": [],
        "outcome": [],
        "latency": [],
        "priority": [],
    }
    with (raw_dir / f"{name}-events.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            columns["t"].append(float(row["t_end"]) - t0)
            columns["endpoint"].append(row["endpoint"].lstrip("/"))
            columns["outcome"].append(row["outcome"])
            columns["latency"].append(float(row["latency_ms"]))
            columns["priority"].append(row.get("priority") or "")  # none before classes
    t = np.asarray(columns["t"], dtype=np.float64)
    endpoint = np.asarray(columns["endpoint"], dtype=np.str_)
    outcome = np.asarray(columns["outcome"], dtype=np.str_)
    latency = np.asarray(columns["latency"], dtype=np.float64)
    priority = np.asarray(columns["priority"], dtype=np.str_)
    inside = (t >= 0) & (t < n_seconds)

    series = {}
    for key in ENDPOINTS:
        mask = inside & (endpoint == key)
        series[key] = _series(t[mask], outcome[mask], latency[mask], n_seconds)
    classes = {}
    if (priority != "").any():
        for cls in CLASSES:
            mask = inside & (endpoint == "messages") & (priority == cls)
            classes[cls] = _series(t[mask], outcome[mask], latency[mask], n_seconds)

    users: dict[str, list[float]] = {"t": [], "messages": [], "file": [], "critical": []}
    with (raw_dir / f"{name}-users.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            users["t"].append(float(row["t"]) - t0)
            users["messages"].append(float(row["messages_users"]))
            users["file"].append(float(row["file_users"]))
            users["critical"].append(float(row.get("critical_users") or 0))

    cpu = _load_cpu(raw_dir / f"{name}-cpu.csv", t0)
    return VariantData(
        name=name,
        schedule=schedule,
        seconds=np.arange(n_seconds, dtype=np.float64),
        endpoints=series,
        users_t=np.asarray(users["t"]),
        messages_users=np.asarray(users["messages"]),
        file_users=np.asarray(users["file"]),
        requests=int(inside.sum()),
        config=config or {},
        gauges=_load_gauges(raw_dir / f"{name}-series.csv", t0),
        cpu_t=cpu[:, 0],
        loop_cpu_s=cpu[:, 1],
        process_cpu_s=cpu[:, 2],
        response_t=t[inside],
        classes=classes,
        critical_users=np.asarray(users["critical"]),
    )


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def _in(times: npt.NDArray[np.float64], start: float, end: float) -> npt.NDArray[np.bool_]:
    return (times >= start) & (times < end)


def phase_metrics(variant: VariantData, start: float, end: float) -> dict[str, float | None]:
    """The PHASE_FIELDS of one window ``[start, end)``."""
    length = max(end - start, 1e-9)
    metrics: dict[str, float | None] = {"start_s": start, "end_s": end}
    for key, s in variant.endpoints.items():
        ok = _in(s.ok_t, start, end)
        latencies = s.ok_latency_ms[ok]
        metrics[f"{key}_ok_per_s"] = _round(ok.sum() / length)
        metrics[f"{key}_503_per_s"] = _round(_in(s.rejected_t, start, end).sum() / length)
        metrics[f"{key}_timeouts"] = int(_in(s.timeout_t, start, end).sum())
        metrics[f"{key}_errors"] = int(_in(s.error_t, start, end).sum())
        metrics[f"{key}_p50_ms"] = _round(_percentile(latencies, 50), 1)
        metrics[f"{key}_p99_ms"] = _round(_percentile(latencies, 99), 1)
        rejected = s.rejected_latency_ms[_in(s.rejected_t, start, end)]
        metrics[f"{key}_503_p50_ms"] = _round(_percentile(rejected, 50), 1)
    responses = int(_in(variant.response_t, start, end).sum())
    metrics["responses_per_s"] = _round(responses / length)
    for key, cumulative in (
        ("server_cpu_ms_per_response", variant.process_cpu_s),
        ("loop_cpu_ms_per_response", variant.loop_cpu_s),
    ):
        value = None
        if responses and variant.cpu_t.size >= 2:
            used = np.interp([start, end], variant.cpu_t, cumulative)
            value = _round(1000 * float(used[1] - used[0]) / responses, 3)
        metrics[key] = value
    return metrics


def class_metrics(s: EndpointSeries, start: float, end: float) -> dict[str, float | None]:
    """The CLASS_FIELDS of one class's ``/messages`` requests in ``[start, end)``."""
    length = max(end - start, 1e-9)
    ok = _in(s.ok_t, start, end)
    rejected = _in(s.rejected_t, start, end)
    timeouts = int(_in(s.timeout_t, start, end).sum())
    errors = int(_in(s.error_t, start, end).sum())
    requests = int(ok.sum() + rejected.sum()) + timeouts + errors
    return {
        "requests": requests,
        "ok_pct": _round(100 * ok.sum() / requests, 2) if requests else None,
        "ok_per_s": _round(ok.sum() / length),
        "503_per_s": _round(rejected.sum() / length),
        "timeouts": timeouts,
        "errors": errors,
        "p50_ms": _round(_percentile(s.ok_latency_ms[ok], 50), 1),
        "p99_ms": _round(_percentile(s.ok_latency_ms[ok], 99), 1),
        "503_p50_ms": _round(_percentile(s.rejected_latency_ms[rejected], 50), 1),
    }


def class_stats(variant: VariantData) -> dict[str, Any] | None:
    """The ``classes`` entry: per class and phase, its ``/messages`` outcomes; ``None``
    when no request was sent with a class."""
    if not variant.classes:
        return None
    return {
        cls: {p.name: class_metrics(s, p.start, p.end) for p in variant.schedule.summary_phases()}
        for cls, s in variant.classes.items()
    }


def _met(measured: float | None, goal: Goal) -> bool | None:
    if measured is None:
        return None
    return bool(measured >= goal.target if goal.compare == ">=" else measured <= goal.target)


def goals(entry: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``goals`` entry of a variant with classes, against ``reference`` (``fcl``'s
    entry in the same run, or ``None``): each of GOALS in the spike phase."""
    classes = entry.get("classes")
    if not classes:
        return None
    spike = entry["phases"]["spike"]
    critical = classes["critical"]["spike"]
    ref = reference["phases"]["spike"] if reference is not None else {}
    figures: dict[str, tuple[float | None, float | None, float | None]] = {
        # measured, value, reference value
        "critical_ok_pct": (critical["ok_pct"], critical["ok_pct"], None),
        "critical_p99_over_reference": (
            _ratio(critical["p99_ms"], ref.get("messages_p99_ms")),
            critical["p99_ms"],
            ref.get("messages_p99_ms"),
        ),
        "rejected_p50_ms": (
            spike["messages_503_p50_ms"],
            spike["messages_503_p50_ms"],
            ref.get("messages_503_p50_ms"),
        ),
        "messages_goodput_over_reference": (
            _ratio(spike["messages_ok_per_s"], ref.get("messages_ok_per_s")),
            spike["messages_ok_per_s"],
            ref.get("messages_ok_per_s"),
        ),
        "file_p99_over_reference": (
            _ratio(spike["file_p99_ms"], ref.get("file_p99_ms")),
            spike["file_p99_ms"],
            ref.get("file_p99_ms"),
        ),
    }
    result: dict[str, Any] = {"reference": GOAL_REFERENCE if reference is not None else None}
    for goal in GOALS:
        measured, value, reference_value = figures[goal.key]
        result[goal.key] = {
            "description": goal.description,
            "compare": goal.compare,
            "target": goal.target,
            "measured": measured,
            "value": value,
            "reference_value": reference_value,
            "met": _met(measured, goal),
        }
    return result


def recovery_seconds(variant: VariantData, steady_ok_per_s: float | None) -> float | None:
    """Seconds from the drop until /messages successes are back near the steady level.

    Walks the seconds after the drop and returns the first one from which the
    mean over the next :data:`RECOVERY_WINDOW_S` seconds (fewer at the very
    end) is within :data:`RECOVERY_TOLERANCE` of the steady level; ``None`` if
    that never happens before the run ends or there is no steady level.
    """
    if not steady_ok_per_s:
        return None
    ok = variant.endpoints["messages"].ok
    first = math.floor(variant.schedule.drop_start)
    for s in range(first, ok.size):
        window = ok[s : s + RECOVERY_WINDOW_S]
        if abs(window.mean() - steady_ok_per_s) <= RECOVERY_TOLERANCE * steady_ok_per_s:
            return float(max(s - variant.schedule.drop_start, 0.0))
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def series_stats(variant: VariantData) -> dict[str, Any]:
    """The ``series`` entry: per gauge, the overall peak and per phase peak and mean."""
    stats: dict[str, Any] = {}
    for name, g in variant.gauges.items():
        entry: dict[str, Any] = {
            "max": _round(float(g.peak.max())) if g.peak.size else None,
        }
        for p in variant.schedule.summary_phases():
            inside = _in(g.t, p.start, p.end)
            entry[p.name] = {
                "max": _round(float(g.peak[inside].max())) if inside.any() else None,
                "mean": _round(float(g.value[inside].mean())) if inside.any() else None,
            }
        stats[name] = entry
    return stats


def versus_baseline(
    entry: dict[str, Any], baseline: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The ``vs_baseline`` entry: each BASELINE_METRICS over the baseline's, per phase."""
    if baseline is None or entry is baseline:
        return None
    return {
        phase: {
            metric: _ratio(entry["phases"][phase][metric], baseline["phases"][phase][metric])
            for metric in BASELINE_METRICS
        }
        for phase in PHASES
    }


def summarize_variant(variant: VariantData, resources: dict[str, Any]) -> dict[str, Any]:
    """The summary.json entry of one variant (VARIANT_FIELDS; ``vs_baseline`` left ``None``)."""
    phases = {
        p.name: phase_metrics(variant, p.start, p.end) for p in variant.schedule.summary_phases()
    }
    before, spike = phases["before"], phases["spike"]
    return {
        # Raw data recorded before classes existed has no critical users.
        "config": {"critical_users": 0, **variant.config},
        "requests": variant.requests,
        "load_generator_cpu_s": _round(resources.get("load_generator_cpu_s")),
        "server_cpu_s": _round(resources.get("server_cpu_s")),
        "profiler_cpu_s": _round(resources.get("profiler_cpu_s")),
        "recovery_s": recovery_seconds(variant, before["messages_ok_per_s"]),
        "ratios": {
            "file_p99_spike_over_steady": _ratio(spike["file_p99_ms"], before["file_p99_ms"]),
            "file_goodput_spike_over_steady": _ratio(
                spike["file_ok_per_s"], before["file_ok_per_s"]
            ),
            "messages_goodput_spike_over_steady": _ratio(
                spike["messages_ok_per_s"], before["messages_ok_per_s"]
            ),
            "messages_p50_spike_over_steady": _ratio(
                spike["messages_p50_ms"], before["messages_p50_ms"]
            ),
        },
        "phases": phases,
        "vs_baseline": None,
        "series": series_stats(variant),
        "classes": class_stats(variant),
        "goals": None,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


PHASE_COLUMNS = ("ok/s", "503/s", "timeouts", "errors", "p50", "p99")
RATIO_COLUMNS = (
    ("msg goodput", "messages_goodput_spike_over_steady"),
    ("msg p50", "messages_p50_spike_over_steady"),
    ("file goodput", "file_goodput_spike_over_steady"),
    ("file p99", "file_p99_spike_over_steady"),
)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(columns: list[str], text_columns: int) -> list[str]:
    rule = ["---"] * text_columns + ["---:"] * (len(columns) - text_columns)
    return [_row(columns), _row(rule)]


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: the phase table, recovery and ratios, and the charts."""
    s = summary["schedule"]
    intro = (
        f"Mode `{summary['mode']}`, generated {summary['generated_at']}. "
        f"`/messages` users {s['base_users']} -> {s['peak_users']} -> {s['base_users']} "
        f"(steady {s['steady_s']:g} s, ramp {s['ramp_s']:g} s, spike {s['spike_s']:g} s, "
        f"drop {s['drop_s']:g} s, after {s['after_s']:g} s), {s['file_users']} `/file` users; "
        f"`/messages` query alone {_fmt(summary['messages_query_ms'])} ms; "
        f"{summary['environment'].get('cpu_count')} CPUs."
    )
    legend = (
        "Rates are per second, timeouts (the client gave up after 6 s) and errors are counts, "
        "latencies (ms) are of successful requests; `503 p50` is the median time a refused "
        "request waited for its 503."
    )
    if summary["client_mode"] == CLIENT_RETRY_AFTER:
        clients = (
            "Clients: after a 503, every user waits its `Retry-After` (1 s without one) before "
            "its next request (`--honour-retry-after`)."
        )
    else:
        clients = (
            "Clients: every user sends its next request as soon as it has an answer, a 503 "
            "included (no `Retry-After` honoured)."
        )
    lines = ["# Spike experiment", "", intro, "", clients, "", legend, ""]
    columns = ["variant", "phase"]
    columns += [f"msg {c}" for c in PHASE_COLUMNS] + ["msg 503 p50"]
    columns += [f"file {c}" for c in PHASE_COLUMNS]
    lines += _header(columns, text_columns=2)
    for name, v in summary["variants"].items():
        for phase in PHASES:
            m = v["phases"][phase]
            cells = [name, phase]
            for key in ENDPOINTS:
                cells += [
                    _fmt(m[f"{key}_ok_per_s"]),
                    _fmt(m[f"{key}_503_per_s"]),
                    _fmt(m[f"{key}_timeouts"]),
                    _fmt(m[f"{key}_errors"]),
                    _fmt(m[f"{key}_p50_ms"], 0),
                    _fmt(m[f"{key}_p99_ms"], 0),
                ]
                if key == "messages":
                    cells.append(_fmt(m.get("messages_503_p50_ms"), 0))
            lines.append(_row(cells))

    ratios_legend = (
        "Ratios are spike over steady (`before`), goodput is successes per second; `-` where a "
        "phase had no success. Recovery: seconds from the drop until `/messages` goodput is back "
        "within 20 % of steady."
    )
    lines += ["", ratios_legend, ""]
    columns = ["variant", "recovery (s)", *(label for label, _ in RATIO_COLUMNS)]
    lines += _header([*columns, "locust CPU (s)", "server CPU (s)"], text_columns=1)
    for name, v in summary["variants"].items():
        recovery = "never" if v["recovery_s"] is None else _fmt(v["recovery_s"], 0)
        ratios = [_fmt(v["ratios"][key], 2) for _, key in RATIO_COLUMNS]
        cpu = [_fmt(v["load_generator_cpu_s"]), _fmt(v["server_cpu_s"])]
        lines.append(_row([name, recovery, *ratios, *cpu]))

    lines += _cpu_table(summary)
    lines += _baseline_table(summary)
    lines += _series_table(summary)
    lines += _classes_table(summary)
    lines += _goals_table(summary)
    if summary["failed_variants"]:
        lines += ["", "Failed variants:", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in summary["failed_variants"].items()]
    lines += ["", "![comparison](comparison.png)", ""]
    for name, v in summary["variants"].items():
        lines += [
            f"![{name} throughput]({name}-throughput.png)",
            f"![{name} latency]({name}-latency.png)",
        ]
        if v["config"].get("series"):
            lines.append(f"![{name} series]({name}-series.png)")
        if v.get("classes"):
            lines.append(f"![{name} classes]({name}-classes.png)")
        lines.append("")
    return "\n".join(lines)


def _classes_table(summary: dict[str, Any]) -> list[str]:
    rows = [(n, v["classes"]) for n, v in summary["variants"].items() if v.get("classes")]
    if not rows:
        return []
    lines = [
        "",
        "`/messages` by the class its requests were sent as: `ok %` is the share of the "
        "phase's requests (answered or timed out) that succeeded; p50 and p99 (ms) are of "
        "successes, `503 p50` of the 503s.",
        "",
    ]
    columns = ["variant", "class", "phase", "requests", "ok %", "ok/s", "503/s", "timeouts"]
    lines += _header([*columns, "errors", "p50", "p99", "503 p50"], text_columns=3)
    for name, classes in rows:
        for cls, phases in classes.items():
            for phase in PHASES:
                m = phases[phase]
                lines.append(
                    _row(
                        [
                            name,
                            cls,
                            phase,
                            _fmt(m["requests"]),
                            _fmt(m["ok_pct"], 2),
                            _fmt(m["ok_per_s"]),
                            _fmt(m["503_per_s"]),
                            _fmt(m["timeouts"]),
                            _fmt(m["errors"]),
                            _fmt(m["p50_ms"], 0),
                            _fmt(m["p99_ms"], 0),
                            _fmt(m["503_p50_ms"], 0),
                        ]
                    )
                )
    return lines


def _goals_table(summary: dict[str, Any]) -> list[str]:
    rows = [(n, v["goals"]) for n, v in summary["variants"].items() if v.get("goals")]
    if not rows:
        return []
    lines = [
        "",
        f"Goals of priority classes, in the spike, against `{GOAL_REFERENCE}` measured in the "
        "same run (`measured`: the ratio, or the value itself; a report of this run on this "
        f"machine, not a pass or fail; `-` without `{GOAL_REFERENCE}` in the run):",
        "",
    ]
    lines += _header(
        ["variant", "goal", "target", "measured", "variant's", f"{GOAL_REFERENCE}'s", "met"],
        text_columns=2,
    )
    for name, entry in rows:
        for goal in GOALS:
            g = entry[goal.key]
            met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
            lines.append(
                _row(
                    [
                        name,
                        g["description"],
                        f"{g['compare']} {g['target']:g}",
                        _fmt(g["measured"], 2),
                        _fmt(g["value"], 1),
                        _fmt(g["reference_value"], 1),
                        met,
                    ]
                )
            )
    return lines


BASELINE_COLUMNS = (
    ("msg ok/s", "messages_ok_per_s"),
    ("msg p50", "messages_p50_ms"),
    ("msg p99", "messages_p99_ms"),
    ("file ok/s", "file_ok_per_s"),
    ("file p50", "file_p50_ms"),
    ("file p99", "file_p99_ms"),
    ("CPU/resp", "server_cpu_ms_per_response"),
    ("loop CPU/resp", "loop_cpu_ms_per_response"),
)


def _baseline_table(summary: dict[str, Any]) -> list[str]:
    baseline = summary.get("baseline")
    compared = {n: v for n, v in summary["variants"].items() if v.get("vs_baseline")}
    if not compared:
        return []
    lines = [
        "",
        f"Against `{baseline}`, measured in the same run: each variant's value over "
        f"`{baseline}`'s in the same phase (ok/s: higher is better; latency: lower is better).",
        "",
    ]
    columns = ["variant", "phase", *(label for label, _ in BASELINE_COLUMNS)]
    lines += _header(columns, text_columns=2)
    for name, v in compared.items():
        for phase in ("before", "spike"):
            ratios = v["vs_baseline"][phase]
            lines.append(_row([name, phase, *(_fmt(ratios[k], 2) for _, k in BASELINE_COLUMNS)]))
    return lines


def _cpu_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Server CPU per response (ms; every answer and client timeout of both endpoints): "
        "the app processes, and their main threads, which run the event loop (HTTP, routing, "
        "the limiter) but not the queries and file reads.",
        "",
    ]
    lines += _header(["variant", "phase", "responses/s", "CPU/resp", "loop CPU/resp"], 2)
    for name, v in summary["variants"].items():
        for phase in PHASES:
            m = v["phases"][phase]
            lines.append(
                _row(
                    [
                        name,
                        phase,
                        _fmt(m["responses_per_s"]),
                        _fmt(m["server_cpu_ms_per_response"], 2),
                        _fmt(m["loop_cpu_ms_per_response"], 3),
                    ]
                )
            )
    return lines


def _series_table(summary: dict[str, Any]) -> list[str]:
    rows = [
        (name, gauge, stats)
        for name, v in summary["variants"].items()
        for gauge, stats in v["series"].items()
    ]
    if not rows:
        return []
    lines = [
        "",
        "Shared gauges, across all processes of a variant (`db_in_flight`: database queries "
        "running; max includes the peaks between samples):",
        "",
    ]
    lines += _header(
        ["variant", "gauge", "processes", "max", "spike max", "spike mean", "steady mean"],
        text_columns=2,
    )
    for name, gauge, stats in rows:
        config = summary["variants"][name]["config"]
        processes = int(config.get("workers") or 1) * int(config.get("instances") or 1)
        lines.append(
            _row(
                [
                    name,
                    gauge,
                    str(processes),
                    _fmt(stats["max"], 0),
                    _fmt(stats["spike"]["max"], 0),
                    _fmt(stats["spike"]["mean"]),
                    _fmt(stats["before"]["mean"]),
                ]
            )
        )
    return lines


def build_report(out_dir: Path) -> dict[str, Any]:
    """Read ``out_dir/raw``, write the charts, summary.json and summary.md; return the summary."""
    import charts  # matplotlib is only needed to draw, not to check a report

    raw_dir = out_dir / RAW_DIR
    run = json.loads((raw_dir / RUN_FILE).read_text(encoding="utf-8"))
    schedule = Schedule(**run["schedule"])
    variants: dict[str, VariantData] = {}
    entries: dict[str, Any] = {}
    for name in run["variants"]:
        status = run["results"].get(name, {})
        if status.get("error"):
            continue
        variants[name] = load_variant(raw_dir, name, schedule, status.get("config"))
        entries[name] = summarize_variant(variants[name], status)
    baseline_name = run.get("baseline")
    baseline = entries.get(baseline_name) if baseline_name else None
    for entry in entries.values():
        entry["vs_baseline"] = versus_baseline(entry, baseline)
        entry["goals"] = goals(entry, entries.get(GOAL_REFERENCE))

    summary = {
        "schema_version": SCHEMA_VERSION,
        "mode": run["mode"],
        # Raw data recorded before the option existed: clients resent at once.
        "client_mode": run.get("client_mode", CLIENT_IMMEDIATE),
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "schedule": run["schedule"],
        "environment": run["environment"],
        "messages_query_ms": _round(run.get("messages_query_ms"), 1),
        "baseline": baseline_name,
        "failed_variants": {
            name: result["error"] for name, result in run["results"].items() if result.get("error")
        },
        "variants": entries,
    }
    for variant in variants.values():
        charts.throughput_chart(variant, out_dir / f"{variant.name}-throughput.png")
        charts.latency_chart(variant, out_dir / f"{variant.name}-latency.png")
        if variant.config.get("series"):
            charts.series_chart(variant, out_dir / f"{variant.name}-series.png")
        if variant.classes:
            charts.classes_chart(
                variant, out_dir / f"{variant.name}-classes.png", variants.get(GOAL_REFERENCE)
            )
    if variants:
        charts.comparison_chart(
            list(variants.values()), out_dir / "comparison.png", entries, baseline_name
        )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {Path(sys.argv[0]).name} REPORT_DIR")
    build_report(Path(sys.argv[1]))
    print((Path(sys.argv[1]) / "summary.md").read_text(encoding="utf-8"))
