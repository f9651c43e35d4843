"""Serves one documentation example under uvicorn, for test_docs_examples.py.

    python docs_example_server.py EXAMPLE.py PORT

Imports the example as a module, prints one JSON line on stdout (the
requests the test will make, and the operations the app's OpenAPI schema
declares), then runs its ``app`` under uvicorn on 127.0.0.1:PORT until
interrupted.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.routing import Mount, Route, WebSocketRoute

_PARAM = re.compile(r"\{[^}]+\}")
_METHODS = {"get", "put", "post", "delete", "patch", "options"}
# A value for a parameter of each JSON-schema type (a path parameter, a
# required query or header parameter).
_VALUES = {"integer": 1, "number": 1, "boolean": "true", "string": "1"}


def _value(schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for option in schema.get("anyOf", []):
        if option.get("type") != "null":
            return _value(option)
    return _VALUES.get(schema.get("type", "string"), "1")


def _schema_requests(app: Any) -> Iterator[dict[str, Any]]:
    """One request per operation of the app's OpenAPI schema (FastAPI's own
    /docs, /redoc and /openapi.json are not in it), its path, query and
    header parameters given a value of their type."""
    openapi = getattr(app, "openapi", None)
    if openapi is None:
        return
    for path, operations in openapi().get("paths", {}).items():
        for method, operation in operations.items():
            if method not in _METHODS:
                continue
            values: dict[str, dict[str, Any]] = {"path": {}, "query": {}, "header": {}}
            for parameter in operation.get("parameters", []):
                where = parameter.get("in")
                if where in values and (where == "path" or parameter.get("required")):
                    values[where][parameter["name"]] = _value(parameter.get("schema", {}))
            in_path = values["path"]
            yield {
                "kind": "http",
                "method": method.upper(),
                "declared": path,
                "path": _PARAM.sub(lambda m, v=in_path: str(v.get(m[0][1:-1], 1)), path),
                "query": values["query"],
                "headers": {k: str(v) for k, v in values["header"].items()},
            }


def _walk(routes: list[Any], prefix: str = "") -> Iterator[dict[str, Any]]:
    """The routes OpenAPI does not list: WebSockets, Starlette routes, mounts."""
    for route in routes:
        path = prefix + _PARAM.sub("1", getattr(route, "path", "") or "")
        if type(route).__name__ == "APIRoute" and getattr(route, "include_in_schema", False):
            continue  # in the schema
        if isinstance(route, Mount):
            inner = _inner_routes(route.app)
            if inner:
                yield from _walk(inner, path)
            else:  # an app whose routes are not known (a wrapped one)
                yield {"kind": "http", "method": "GET", "path": path + "/"}
        elif isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            yield {"kind": "websocket", "path": path}
        elif isinstance(route, Route):
            for method in sorted(set(route.methods or {"GET"}) - {"HEAD"}):
                yield {"kind": "http", "method": method, "path": path}
        elif hasattr(route, "original_router"):  # include_router() in newer FastAPI
            context_prefix = getattr(getattr(route, "include_context", None), "prefix", "")
            yield from _walk(list(route.original_router.routes), prefix + context_prefix)
        else:  # some other container of routes
            yield from _walk(_inner_routes(route), path)


def _inner_routes(app: Any) -> list[Any]:
    """The routes of an app, a router, or the app a wrapper (middleware) holds."""
    for _ in range(10):
        routes = getattr(app, "routes", None)
        if routes:
            return list(routes)
        app = getattr(app, "router", None) or getattr(app, "app", None)
        if app is None:
            break
    return []


def _builtin_docs(app: Any) -> set[str]:
    """FastAPI's own /openapi.json, /docs, /docs/oauth2-redirect and /redoc."""
    paths = {getattr(app, name, None) for name in ("openapi_url", "docs_url", "redoc_url")}
    oauth = getattr(app, "swagger_ui_oauth2_redirect_url", None)
    return {path for path in (*paths, oauth) if path}


def requests(app: Any) -> dict[str, Any]:
    """What the test requests: each operation of the OpenAPI schema and each
    route it does not list (but FastAPI's documentation routes); and the
    operations the schema declares, which must all be among them."""
    schema = list(_schema_requests(app))
    docs = _builtin_docs(app)
    others = [r for r in _walk(list(app.routes)) if r["path"] not in docs]
    seen = {(r.get("method"), r["path"]) for r in schema}
    requested = schema + [r for r in others if (r.get("method"), r["path"]) not in seen]
    declared = sorted(f"{r['method']} {r['declared']}" for r in schema)
    return {"requests": requested, "declared": declared}


def main() -> None:
    example, port = Path(sys.argv[1]), int(sys.argv[2])
    sys.path.insert(0, str(example.parent))
    spec = importlib.util.spec_from_file_location(example.stem, example)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[example.stem] = module
    spec.loader.exec_module(module)
    app = module.app
    print(json.dumps(requests(app)), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


if __name__ == "__main__":
    main()
