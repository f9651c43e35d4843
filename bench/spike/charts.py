"""Charts of the spike experiment (matplotlib, Agg backend: no display needed).

Every chart shares the time axis of the schedule (seconds since the load
started) with the phases marked, so charts of different variants line up.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from schedule import CLIENT_TIMEOUT_S

if TYPE_CHECKING:
    from report import VariantData
    from schedule import Schedule

OUTCOME_COLORS = {"ok": "#2ca02c", "503": "#ff7f0e", "timeout": "#d62728", "error": "#9467bd"}
ENDPOINT_COLORS = {"messages": "#1f77b4", "file": "#2ca02c"}
VARIANT_COLORS = {"none": "#d62728", "asyncio": "#ff7f0e", "fcl": "#1f77b4", "fcl-tuned": "#2ca02c"}
USERS_COLOR = "#555555"
CLIENT_TIMEOUT_MS = CLIENT_TIMEOUT_S * 1000
LIMITER_TIMEOUT_MS = 2000
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


def throughput_chart(variant: VariantData, path: Path) -> None:
    """Responses per second by outcome, one panel per endpoint, users on the right axis."""
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(11, 7.5), constrained_layout=True)
    x = variant.seconds + 0.5
    users = {"messages": variant.messages_users, "file": variant.file_users}
    for i, (ax, key) in enumerate(zip(axes, ("messages", "file"), strict=True)):
        s = variant.endpoints[key]
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
        ax.set_ylabel(f"/{key} responses per second")
        total = s.ok + s.rejected + failed
        ax.set_ylim(
            0, max(float(total.max()) if total.size else 0.0, 1.0) * 1.25
        )  # room for the legend
        ax.grid(alpha=0.3)
        _mark_phases(ax, variant.schedule, label=i == 0)
        users_line = _users_axis(ax, variant.users_t, users[key], f"/{key} users")
        handles = ax.get_legend_handles_labels()[0] if i == 0 else []
        ax.legend(
            handles=[*handles, users_line], loc="upper left", fontsize=8, ncols=5, framealpha=0.9
        )
    axes[-1].set_xlabel("seconds since start")
    fig.suptitle(
        f"{variant.name}: responses per second by outcome (x = seconds with timeouts or errors)"
    )
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
    if variant.name != "none":
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


def comparison_chart(variants: list[VariantData], path: Path) -> None:
    """All variants side by side: goodput, rejections, failures and latency."""
    fig, axes = plt.subplots(3, 2, sharex=True, figsize=(13, 10), constrained_layout=True)
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
            ax.plot(
                v.seconds + 0.5, metric(v), color=VARIANT_COLORS.get(v.name), lw=1.5, label=v.name
            )
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
    users = f"{schedule.base_users} -> {schedule.peak_users} -> {schedule.base_users}"
    fig.suptitle(
        f"Spike: /messages users {users}, {schedule.file_users} /file users "
        "(spike shaded; a gap in a latency line: no success that second)"
    )
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
