"""What the manual (docs/usage.md, docs/observability.md) promises about
rejections and metrics holds."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource
from fastapi_concurrency_limiter._errors import REASONS

DOCS = Path(__file__).parents[2] / "docs"
USAGE = (DOCS / "usage.md").read_text()
OBSERVABILITY = (DOCS / "observability.md").read_text()
pytestmark = pytest.mark.anyio


def test_the_manual_lists_every_rejection_reason() -> None:
    start = USAGE.index("- Every rejection has a reason")
    paragraph = USAGE[start : USAGE.index("\n- ", start + 1)]
    listed = set(re.findall(r"`([a-z_]+)`", paragraph))
    assert set(REASONS) <= listed, set(REASONS) - listed


async def test_the_manual_s_metrics_line_serves_metrics_and_metrics_slash() -> None:
    pytest.importorskip("prometheus_client")
    start = OBSERVABILITY.index("from fastapi_concurrency_limiter.prometheus import metrics_app")
    start = OBSERVABILITY.rindex("\n", 0, start) + 1  # the whole line, with its indent
    snippet = OBSERVABILITY[start : OBSERVABILITY.index("```", start)]
    db = Resource(2, name="readme-metrics-db")
    namespace = {"app": FastAPI(), "limiter": Limiter(timeout=1, resources=[db])}
    exec(textwrap.dedent(snippet), namespace)  # the manual's own lines
    transport = httpx.ASGITransport(app=namespace["app"])
    async with httpx.AsyncClient(
        transport=transport, base_url="http://app", follow_redirects=True
    ) as client:
        direct = await client.get("/metrics", follow_redirects=False)
        assert direct.status_code == 200
        assert 'concurrency_limiter_in_use{resource="readme-metrics-db"} 0.0' in direct.text
        slash = await client.get("/metrics/")
        assert slash.status_code == 200 and "concurrency_limiter_in_use" in slash.text
