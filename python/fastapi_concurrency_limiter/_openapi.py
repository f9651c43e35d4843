"""Documents the 503 of every limited route in the app's OpenAPI schema."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from ._errors import BUSY_DETAIL

#: Limited endpoint function -> the Retry-After it sends (None: no header).
limited_endpoints: weakref.WeakKeyDictionary[Callable[..., Any], int | None] = (
    weakref.WeakKeyDictionary()
)


def busy_response(retry_after: int | None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": "Server busy: a resource this route needs had no free slot in time. "
        "Retry later.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"detail": {"type": "string", "example": BUSY_DETAIL}},
                    "required": ["detail"],
                },
                "example": {"detail": BUSY_DETAIL},
            }
        },
    }
    if retry_after is not None:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "example": retry_after},
            }
        }
    return response


def document_busy_responses(app: FastAPI) -> None:
    """Adds the 503 response to every limited route of ``app`` when its
    OpenAPI schema is generated (routes added later are covered too)."""
    if getattr(app.openapi, "_documents_busy_responses", False):
        return
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for route in app.routes:
                if isinstance(route, APIRoute) and route.endpoint in limited_endpoints:
                    retry_after = limited_endpoints[route.endpoint]
                    route.responses.setdefault(503, busy_response(retry_after))
        return generate()

    openapi._documents_busy_responses = True  # type: ignore[attr-defined]
    app.openapi = openapi  # type: ignore[method-assign]
