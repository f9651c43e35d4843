"""Rate-limited rejection logs write the summary of a spike's last window."""

from __future__ import annotations

import io
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


def test_the_package_logger_has_a_null_handler_and_no_handler_of_its_own() -> None:
    handlers = logging.getLogger("fastapi_concurrency_limiter").handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


async def test_records_carry_level_logger_name_and_structured_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_logging, "WINDOW", 0.05)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s resource=%(resource)s | %(message)s")
    )
    records: list[logging.LogRecord] = []
    collect = logging.Handler()
    collect.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(collect)
    monkeypatch.setattr(root, "level", logging.INFO)
    try:
        db = Resource(1, name="structured-db", max_waiting=0)
        limiter = Limiter(timeout=1, resources=[db])
        async with held_elsewhere(limiter, [db]):
            for _ in range(3):
                with pytest.raises(ServerBusy):
                    async with limiter.acquire([db]):
                        pass
        await eventually(lambda: len(records) == 2)
    finally:
        root.removeHandler(handler)
        root.removeHandler(collect)
    first, summary = records
    assert (first.levelname, first.name) == ("WARNING", "fastapi_concurrency_limiter")
    assert (first.resource, first.reason) == ("structured-db", "queue_full")  # type: ignore[attr-defined]
    assert isinstance(first.waited, float)  # type: ignore[attr-defined]
    assert summary.resource == "structured-db"  # type: ignore[attr-defined]
    assert summary.rejected == 2  # type: ignore[attr-defined]
    assert summary.reasons == {"queue_full": 2}  # type: ignore[attr-defined]
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith(
        "WARNING fastapi_concurrency_limiter resource=structured-db | resource 'structured-db'"
    )
