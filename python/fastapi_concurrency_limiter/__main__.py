"""Operators' commands for host-scoped resources.

    python -m fastapi_concurrency_limiter status [--json]
    python -m fastapi_concurrency_limiter reset [--force] NAME
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import _core
from ._priority import LABELS


def _snapshot() -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "capacity": r.capacity,
            "limit": r.limit,
            "adaptive": r.adaptive,
            "queue": r.queue.name,
            "reserve": {label: n for label, n in zip(LABELS, r.reserve, strict=True) if n},
            "max_waiting": r.max_waiting,
            "in_use": r.in_use,
            "waiting": r.waiting,
            "repairs": r.repairs,
            "problem": r.problem or None,
            "processes": [
                {
                    "pid": p.pid,
                    "held": p.held,
                    "held_by_class": dict(zip(LABELS, p.held_by_class, strict=True)),
                    "waiting": p.waiting,
                    "alive": p.alive,
                    "other_pid_namespace": p.other_pid_namespace,
                }
                for p in r.processes
            ],
        }
        for r in _core.list_host_resources()
    ]


def _status(as_json: bool) -> int:
    try:
        resources = _snapshot()
    except RuntimeError as e:  # the segment directory itself is unusable
        print(f"status: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(resources, indent=2))
        return 0
    if not resources:
        print("no host resources")
        return 0
    for r in resources:
        if r["problem"] is not None and r["capacity"] == 0:
            print(f"{r['name']}: unreadable ({r['problem']})")
            continue
        if r["problem"] is not None:
            print(f"{r['name']}: capacity {r['capacity']}, busy ({r['problem']})")
            continue
        bound = "unbounded" if r["max_waiting"] is None else f"max {r['max_waiting']}"
        limit = ""
        if r["adaptive"] or r["limit"] != r["capacity"]:
            limit = f", limit {r['limit']}" + (" (adaptive)" if r["adaptive"] else "")
        reserve = ""
        if r["reserve"]:
            reserved = reversed(r["reserve"].items())  # highest class first, as below
            reserve = ", reserve " + ", ".join(f"{c} {n}" for c, n in reserved)
        print(
            f"{r['name']}: capacity {r['capacity']}{limit}{reserve}, in use {r['in_use']}, "
            f"waiting {r['waiting']} ({r['queue']}, {bound})"
        )
        for p in r["processes"]:
            state = "" if p["alive"] else "  (dead, being reclaimed)"
            if p["other_pid_namespace"]:
                state += "  (pid of another PID namespace)"
            held = str(p["held"])
            classes = {c: n for c, n in p["held_by_class"].items() if n}
            if set(classes) - {"critical"}:  # classes in use: say which hold what
                held += " (" + ", ".join(f"{c} {n}" for c, n in reversed(classes.items())) + ")"
            print(f"  pid {p['pid']}: held {held}, waiting {p['waiting']}{state}")
    return 0


def _reset(name: str, force: bool) -> int:
    try:
        _core.remove_host_resource(name, force)
    except (RuntimeError, ValueError) as e:
        print(f"reset refused: {e}", file=sys.stderr)
        return 1
    print(f"removed host resource {name!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastapi_concurrency_limiter",
        description="Inspect and reset this user's host-scoped resources.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="list host resources and their processes")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    reset = commands.add_parser("reset", help="remove a host resource no live process uses")
    reset.add_argument(
        "--force",
        action="store_true",
        help="remove it even while live processes use it (they attach to a new one at "
        "their next request; their waiting requests get 503)",
    )
    reset.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "status":
        return _status(args.json)
    return _reset(args.name, args.force)


if __name__ == "__main__":
    sys.exit(main())
