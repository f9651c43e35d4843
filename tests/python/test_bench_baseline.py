"""The regression guard covers what the benchmarks report.

bench/redis_bench.py writes its ratios (RATIOS.update({...})) to the JSON
that bench/ratios.py compares with bench/baseline.json; a ratio missing
from the baseline is never marked, so a regression of it goes unseen.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ratio_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "update"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "RATIOS"
        ):
            for arg in node.args:
                if isinstance(arg, ast.Dict):
                    names |= {k.value for k in arg.keys if isinstance(k, ast.Constant)}
    return names


def test_every_redis_bench_ratio_has_a_baseline() -> None:
    reported = _ratio_names(ROOT / "bench" / "redis_bench.py")
    assert reported, "no RATIOS.update({...}) found in bench/redis_bench.py"
    baseline = json.loads((ROOT / "bench" / "baseline.json").read_text())["ratios"]
    missing = sorted(reported - set(baseline))
    assert not missing, f"reported by make bench-redis, absent from bench/baseline.json: {missing}"
