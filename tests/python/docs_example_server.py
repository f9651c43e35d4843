"""Serves one documentation example under uvicorn, for test_docs_examples.py.

    python docs_example_server.py EXAMPLE.py PORT

Imports the example as a module, prints its routes as one JSON line on
stdout (what the test will request), then runs its ``app`` under uvicorn on
127.0.0.1:PORT until interrupted.
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


def _routes(routes: list[Any], prefix: str = "") -> Iterator[dict[str, Any]]:
    for route in routes:
        path = prefix + _PARAM.sub("1", getattr(route, "path", ""))
        if isinstance(route, Mount):
            inner = route.routes  # [] for an app without routes (a wrapped one)
            if inner:
                yield from _routes(inner, path)
            else:  # the mount itself and a path under it
                yield {"kind": "http", "path": path + "/", "methods": ["GET"]}
                yield {"kind": "http", "path": path + "/1", "methods": ["GET"]}
        elif isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            yield {"kind": "websocket", "path": path}
        elif isinstance(route, Route) or hasattr(route, "methods"):
            methods = sorted(set(getattr(route, "methods", None) or {"GET"}) - {"HEAD"})
            yield {"kind": "http", "path": path, "methods": methods}


def main() -> None:
    example, port = Path(sys.argv[1]), int(sys.argv[2])
    sys.path.insert(0, str(example.parent))
    spec = importlib.util.spec_from_file_location(example.stem, example)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[example.stem] = module
    spec.loader.exec_module(module)
    app = module.app
    print(json.dumps(list(_routes(app.routes))), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


if __name__ == "__main__":
    main()
