"""Charts of the spike experiment (matplotlib, Agg backend: no display needed).

Every chart shares the time axis of the schedule (seconds since the load
started) with the phases marked, so charts of different variants line up.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

import probe
import variants as registry
from schedule import CLIENT_TIMEOUT_S

if TYPE_CHECKING:
    from report import EndpointSeries, VariantData
    from schedule import Schedule

OUTCOME_COLORS = {"ok": "#2ca02c", "503": "#ff7f0e", "timeout": "#d62728", "error": "#9467bd"}
ENDPOINT_COLORS = {"messages": "#1f77b4", "file": "#2ca02c"}
GAUGE_COLORS = {probe.DB_IN_FLIGHT: "#1f77b4", probe.DB_LIMIT: "#ff7f0e"}
CLASS_COLORS = {"critical": "#006d2c", "sheddable": "#9467bd"}
"""The latency lines of the ``/messages`` classes (``report.CLASSES``)."""
USERS_COLOR = "#555555"
CLIENT_TIMEOUT_MS = CLIENT_TIMEOUT_S * 1000
LIMITER_TIMEOUT_MS = 2000
RATIO_FLOOR = 0.05
"""Ratios to the baseline below this (a collapse to zero) are drawn at this height."""
DPI = 110


def _mark_phases(ax: Axes, schedule: Schedule, label: bool) -> None:
    """Shade the spike, draw the phase boundaries and, on top panels, name the phases."""
    ax.axvspan(schedule.spike_start, schedule.drop_start, color="#000000", alpha=0.05, lw=0)
    for x in (schedule.ramp_start, schedule.spike_start, schedule.drop_start, schedule.after_start):
        ax.axvline(x, color="#888888", lw=0.8, ls=":")
    if label:
        names = [
            ("steady", 0.0, schedule.ramp_start),
            ("ramp", schedule.ramp_start, schedule.spike_start),
            ("spike", schedule.spike_start, schedule.drop_start),
            ("after", schedule.after_start, schedule.total_s),
        ]
        for name, start, end in names:
            ax.annotate(
                name,
                xy=((start + end) / 2, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                color="#555555",
            )
    ax.set_xlim(0, schedule.total_s)


def _users_axis(ax: Axes, t: np.ndarray, users: np.ndarray, label: str) -> Line2D:
    """Users on a right-hand axis, behind the data; returns the legend handle."""
    twin = ax.twinx()
    (line,) = twin.step(
        t, users, where="post", color=USERS_COLOR, lw=1.2, alpha=0.8, label=f"{label} (right axis)"
    )
    twin.set_ylabel(label, color=USERS_COLOR)
    twin.set_ylim(0, max(float(users.max()) if users.size else 1.0, 1.0) * 1.15)
    twin.tick_params(axis="y", colors=USERS_COLOR)
    # Keep the data in front of the users.
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    return line


def _outcomes_panel(
    ax: Axes,
    variant: VariantData,
    s: EndpointSeries,
    label: str,
    users: np.ndarray,
    users_label: str,
    top: bool,
) -> None:
    """Responses per second of one series by outcome, stacked, users on the right axis."""
    x = variant.seconds + 0.5
    ax.stackplot(
        x,
        s.ok,
        s.rejected,
        s.timeouts,
        s.errors,
        labels=["200 OK", "503 busy", "client timeout", "other error"],
        colors=[OUTCOME_COLORS[k] for k in ("ok", "503", "timeout", "error")],
        alpha=0.35,
        lw=0,
    )
    ax.plot(x, s.ok, color=OUTCOME_COLORS["ok"], lw=1.8)
    failed = s.timeouts + s.errors
    hit = failed > 0
    ax.plot(
        x[hit],
        (s.ok + s.rejected + failed)[hit],
        "x",
        color=OUTCOME_COLORS["timeout"],
        ms=5,
        label="_nolegend_",
    )
    ax.set_ylabel(label)
    total = s.ok + s.rejected + failed
    ax.set_ylim(0, max(float(total.max()) if total.size else 0.0, 1.0) * 1.25)  # room for legend
    ax.grid(alpha=0.3)
    _mark_phases(ax, variant.schedule, label=top)
    users_line = _users_axis(ax, variant.users_t, users, users_label)
    handles = ax.get_legend_handles_labels()[0] if top else []
    ax.legend(handles=[*handles, users_line], loc="upper left", fontsize=8, ncols=5, framealpha=0.9)


def throughput_chart(variant: VariantData, path: Path) -> None:
    """Responses per second by outcome, one panel per endpoint, users on the right axis."""
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(11, 7.5), constrained_layout=True)
    users = {"messages": variant.messages_users, "file": variant.file_users}
    for i, (ax, key) in enumerate(zip(axes, ("messages", "file"), strict=True)):
        _outcomes_panel(
            ax,
            variant,
            variant.endpoints[key],
            f"/{key} responses per second",
            users[key],
            f"/{key} users",
            top=i == 0,
        )
    axes[-1].set_xlabel("seconds since start")
    fig.suptitle(
        f"{variant.name}: responses per second by outcome (x = seconds with timeouts or errors)"
    )
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def classes_chart(variant: VariantData, path: Path, reference: VariantData | None) -> None:
    """``/messages`` by class: each class's responses per second by outcome, and the
    latency of each class's successes and of the 503s, beside ``reference``'s
    ``/messages`` p99 (``fcl`` in the same run) when it ran."""
    from report import GOAL_REFERENCE, GOALS

    fig, axes = plt.subplots(
        3, 1, sharex=True, figsize=(11, 10), constrained_layout=True, height_ratios=[1, 1, 1.2]
    )
    sheddable_users = variant.messages_users - variant.critical_users
    panels = [
        ("critical", variant.critical_users),
        ("sheddable", sheddable_users),
    ]
    for i, (cls, users) in enumerate(panels):
        _outcomes_panel(
            axes[i],
            variant,
            variant.classes[cls],
            f"{cls} /messages per second",
            users,
            f"{cls} users",
            top=i == 0,
        )
    ax = axes[2]
    x = variant.seconds + 0.5
    for cls, color in CLASS_COLORS.items():
        s = variant.classes[cls]
        # Markers: a few critical users leave seconds without a success, and
        # a second between two gaps would not show as a line.
        ax.plot(x, s.p50_ms, color=color, lw=1.8, marker=".", ms=4, label=f"{cls} p50")
        ax.plot(x, s.p99_ms, color=color, lw=1.0, ls="--", marker=".", ms=3, label=f"{cls} p99")
    rejected_p50 = variant.endpoints["messages"].rejected_p50_ms
    ax.plot(
        x,
        rejected_p50,
        color=OUTCOME_COLORS["503"],
        lw=1.4,
        marker=".",
        ms=4,
        label="503s p50 (every class)",
    )
    if reference is not None:
        ax.plot(
            reference.seconds + 0.5,
            reference.endpoints["messages"].p99_ms,
            color=registry.color(reference.name) or "#333333",
            lw=1.0,
            ls=":",
            label=f"{reference.name} /messages p99",
        )
    target_503 = next(g.target for g in GOALS if g.key == "rejected_p50_ms")
    ax.axhline(
        target_503,
        color=OUTCOME_COLORS["503"],
        lw=0.8,
        ls="-.",
        label=f"goal: 503 p50 {target_503:g} ms",
    )
    ax.axhline(LIMITER_TIMEOUT_MS, color="#555555", lw=0.8, ls="-.", label="limiter timeout (2 s)")
    _latency_axis(ax)
    ax.set_ylabel("latency (ms)")
    _mark_phases(ax, variant.schedule, label=False)
    ax.set_xlabel("seconds since start")
    # Below the panel: the lines span the whole height of a log scale.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncols=4)
    compared = f" ({GOAL_REFERENCE}'s p99 dotted)" if reference is not None else ""
    fig.suptitle(f"{variant.name}: /messages by class, outcomes per second and latency{compared}")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _latency_axis(ax: Axes) -> None:
    ax.set_yscale("log")
    ax.set_ylabel("latency of successes (ms)")
    ax.grid(alpha=0.3, which="both")


def latency_chart(variant: VariantData, path: Path) -> None:
    """p50 and p99 latency of successful requests per second, per endpoint (log scale)."""
    fig, ax = plt.subplots(figsize=(11, 5), constrained_layout=True)
    x = variant.seconds + 0.5
    for key in ("messages", "file"):
        s = variant.endpoints[key]
        color = ENDPOINT_COLORS[key]
        ax.plot(x, s.p50_ms, color=color, lw=1.8, label=f"/{key} p50")
        ax.plot(x, s.p99_ms, color=color, lw=1.0, ls="--", label=f"/{key} p99")
    ax.axhline(
        CLIENT_TIMEOUT_MS,
        color=OUTCOME_COLORS["timeout"],
        lw=0.8,
        ls="-.",
        label="client timeout (6 s)",
    )
    if variant.config.get("db_capacity") is not None:
        ax.axhline(
            LIMITER_TIMEOUT_MS,
            color=OUTCOME_COLORS["503"],
            lw=0.8,
            ls="-.",
            label="limiter timeout (2 s)",
        )
    _latency_axis(ax)
    _mark_phases(ax, variant.schedule, label=True)
    users_line = _users_axis(ax, variant.users_t, variant.messages_users, "/messages users")
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[*handles, users_line], loc="upper left", fontsize=8, ncols=4, framealpha=0.9)
    ax.set_xlabel("seconds since start")
    fig.suptitle(f"{variant.name}: latency of successful requests per second")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _failures(variant: VariantData) -> npt.NDArray[np.float64]:
    """Client timeouts and other errors per second, both endpoints together."""
    m, f = variant.endpoints["messages"], variant.endpoints["file"]
    return m.timeouts + m.errors + f.timeouts + f.errors


def _ratio_bars(ax: Axes, entries: dict[str, Any], baseline: str | None, names: list[str]) -> None:
    """Spike metrics of each variant over the baseline's, as grouped bars around 1."""
    from report import BASELINE_METRICS

    compared = [n for n in names if entries.get(n, {}).get("vs_baseline")]
    if not compared:
        ax.text(
            0.5,
            0.5,
            f"no `{baseline}` variant in this run: nothing to compare with",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="#555555",
        )
        ax.set_axis_off()
        return
    width = 0.8 / len(compared)
    x = np.arange(len(BASELINE_METRICS))
    for i, name in enumerate(compared):
        ratios = entries[name]["vs_baseline"]["spike"]
        values = np.array(
            [np.nan if ratios[m] is None else ratios[m] for m in BASELINE_METRICS], dtype=float
        )
        # Log scale: 0.5 and 2 are the same distance from 1; zeros sit at the floor.
        shown = np.clip(values, RATIO_FLOOR, None)
        bars = ax.bar(
            x + (i - (len(compared) - 1) / 2) * width,
            shown,
            width,
            color=registry.color(name),
            label=name,
        )
        ax.bar_label(
            bars, labels=[f"{v:.2f}" if np.isfinite(v) else "-" for v in values], fontsize=7
        )
    ax.set_yscale("log")
    ax.set_ylim(RATIO_FLOOR, None)
    ax.axhline(1.0, color="#333333", lw=1)
    labels = [
        m.replace("messages", "/messages").replace("file_", "/file ") for m in BASELINE_METRICS
    ]
    ax.set_xticks(x, [label.replace("_", " ") for label in labels], fontsize=8)
    ax.set_ylabel(f"spike value / {baseline}'s (log)")
    ax.set_title(
        f"spike phase, each variant over `{baseline}` in the same run "
        "(ok/s: higher is better; latency: lower is better)",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", fontsize=8, ncols=len(compared))


def comparison_chart(
    variants: list[VariantData],
    path: Path,
    entries: dict[str, Any] | None = None,
    baseline: str | None = None,
) -> None:
    """All variants side by side, and their spike metrics over the baseline's."""
    fig = plt.figure(figsize=(13, 13), constrained_layout=True)
    grid = fig.add_gridspec(4, 2, height_ratios=[1, 1, 1, 0.9])
    top = fig.add_subplot(grid[0, 0])
    axes = np.array(
        [
            [top if (r, c) == (0, 0) else fig.add_subplot(grid[r, c], sharex=top) for c in range(2)]
            for r in range(3)
        ]
    )
    panels: list[tuple[Axes, str, Callable[[VariantData], npt.NDArray[np.float64]], bool]] = [
        (axes[0, 0], "/messages successes per second", lambda v: v.endpoints["messages"].ok, False),
        (axes[0, 1], "/file successes per second", lambda v: v.endpoints["file"].ok, False),
        (axes[1, 0], "/messages p50 latency (ms)", lambda v: v.endpoints["messages"].p50_ms, True),
        (axes[1, 1], "/file p99 latency (ms)", lambda v: v.endpoints["file"].p99_ms, True),
        (axes[2, 0], "/messages 503 per second", lambda v: v.endpoints["messages"].rejected, False),
        (
            axes[2, 1],
            "client timeouts + errors per second (both endpoints)",
            _failures,
            False,
        ),
    ]
    schedule = variants[0].schedule
    for i, (ax, title, metric, log) in enumerate(panels):
        for v in variants:
            ax.plot(v.seconds + 0.5, metric(v), color=registry.color(v.name), lw=1.5, label=v.name)
        ax.set_title(title, fontsize=10, pad=14 if i < 2 else 4)
        if log:
            _latency_axis(ax)
            ax.set_ylabel("ms")
        else:
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        _mark_phases(ax, schedule, label=i < 2)
        if i == 0:
            ax.legend(loc="upper right", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since start")
    _ratio_bars(fig.add_subplot(grid[3, :]), entries or {}, baseline, [v.name for v in variants])
    users = f"{schedule.base_users} -> {schedule.peak_users} -> {schedule.base_users}"
    fig.suptitle(
        f"Spike: /messages users {users}, {schedule.file_users} /file users "
        "(spike shaded; a gap in a latency line: no success that second)"
    )
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def series_chart(variant: VariantData, path: Path) -> None:
    """The shared gauges over time: database queries in flight across all processes, the limit."""
    fig, ax = plt.subplots(figsize=(11, 4.5), constrained_layout=True)
    in_flight = variant.gauges.get(probe.DB_IN_FLIGHT)
    if in_flight is not None:
        color = GAUGE_COLORS[probe.DB_IN_FLIGHT]
        ax.step(
            in_flight.t,
            in_flight.peak,
            where="pre",
            color=color,
            lw=1.4,
            label="queries in flight, peak per 0.1 s (all processes)",
        )
        ax.plot(
            in_flight.t,
            in_flight.value,
            color=color,
            lw=0.6,
            alpha=0.5,
            label="queries in flight, sampled",
        )
    limit = variant.gauges.get(probe.DB_LIMIT)
    if limit is not None:
        ax.step(
            limit.t,
            limit.value,
            where="post",
            color=GAUGE_COLORS[probe.DB_LIMIT],
            lw=1.6,
            label="db resource limit",
        )
    capacity = variant.config.get("db_capacity")
    processes = int(variant.config.get("workers") or 1) * int(variant.config.get("instances") or 1)
    # Host and Redis scope: one limit for all processes (reports from before
    # the field was recorded: known by their app).
    shared = variant.config.get(
        "db_shared", variant.config.get("app") in ("package-host", "package-redis")
    )
    # With a moving limit, the chart is scaled to the limit and the queries
    # in flight: a capacity far above them (an adaptive resource's ceiling)
    # would squash both into a flat line at the bottom.
    moving = limit is not None and limit.value.size > 0
    shown = [float(limit.value.max())] if moving and limit is not None else []
    if in_flight is not None and in_flight.peak.size:
        shown.append(float(in_flight.peak.max()))
    off_chart = moving and capacity is not None and capacity > 2 * max([*shown, 1.0])
    if capacity is not None and off_chart:
        label = f"Resource capacity ({capacity}, off the chart)"
        ax.plot([], [], color="#2ca02c", lw=1, ls="--", label=label)
    elif capacity is not None:
        label = f"Resource capacity ({capacity})"
        if shared and processes > 1:
            both = "both" if processes == 2 else f"all {processes}"
            label = f"Resource capacity: {capacity} across {both} processes"
        ax.axhline(capacity, color="#2ca02c", lw=1, ls="--", label=label)
        if processes > 1 and not shared:
            ax.axhline(
                capacity * processes,
                color="#d62728",
                lw=1,
                ls=":",
                label=f"{capacity} per process x {processes} processes",
            )
    ax.set_ylabel("database queries in flight" + (" / limit" if moving else ""))
    top = max(
        float(in_flight.peak.max()) if in_flight is not None and in_flight.peak.size else 0.0,
        0.0 if off_chart else float(capacity or 0) * (1 if shared else processes),
        *shown,
        1.0,
    )
    ax.set_ylim(0, top * 1.3)
    ax.grid(alpha=0.3)
    _mark_phases(ax, variant.schedule, label=True)
    users_line = _users_axis(ax, variant.users_t, variant.messages_users, "/messages users")
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[*handles, users_line], loc="upper left", fontsize=8, ncols=3, framealpha=0.9)
    ax.set_xlabel("seconds since start")
    fig.suptitle(f"{variant.name}: database queries in flight across all processes")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
