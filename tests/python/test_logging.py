"""Rate-limited rejection logs write the summary of a spike's last window."""

from __future__ import annotations

import logging

import pytest

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy, _logging

from .conftest import eventually, held_elsewhere

pytestmark = pytest.mark.anyio


async def test_the_summary_of_the_last_window_is_written_without_a_later_rejection(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_logging, "WINDOW", 0.05)
    db = Resource(1, name="spike-db", max_waiting=0)
    limiter = Limiter(timeout=1, resources=[db])
    caplog.set_level(logging.WARNING, logger="fastapi_concurrency_limiter")
    async with held_elsewhere(limiter, [db]):
        for _ in range(5):  # the spike; nothing is rejected after it
            with pytest.raises(ServerBusy):
                async with limiter.acquire([db]):
                    pass

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "fastapi_concurrency_limiter"]

    await eventually(lambda: len(lines()) == 2)
    assert "turned a request away: reason=queue_full" in lines()[0]
    assert "turned away 4 more requests" in lines()[1] and "queue_full=4" in lines()[1]
