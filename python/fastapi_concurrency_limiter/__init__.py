"""Concurrency limiter (bulkhead) for FastAPI, with a C++ engine.

Give each shared resource (a database, a filesystem, a downstream API) a
number of slots; a route takes a slot of each resource it needs before its
handler runs and gives it back after. A request that cannot get its slots in
time is answered at once with HTTP 503 instead of piling onto the overloaded
resource and dragging every other endpoint down with it::

    from fastapi import FastAPI
    from fastapi_concurrency_limiter import Limiter, Resource

    app = FastAPI()
    database_resource = Resource(5)
    limiter = Limiter(timeout=5, resources=[database_resource])

    @app.get("/messages")
    @limiter.resources([database_resource])
    async def read_messages(): ...

The same limiter also limits a whole router
(``APIRouter(dependencies=[Depends(limiter.dependency([...]))])``), any ASGI
app or mount (``limiter.asgi([...])(app)``, no FastAPI needed) and WebSocket
endpoints.
"""

import logging

from ._adaptive import AdaptiveLimit
from ._deadline import deadline_headers, remaining_budget
from ._errors import BUSY_DETAIL, ServerBusy
from ._limiter import Limiter
from ._priority import Priority
from ._resource import Resource
from ._statistics import (
    HistogramSnapshot,
    LimiterStatistics,
    PriorityStatistics,
    ResourceStatistics,
)
from ._trusted import priority_from_header

__all__ = [
    "BUSY_DETAIL",
    "AdaptiveLimit",
    "HistogramSnapshot",
    "Limiter",
    "LimiterStatistics",
    "Priority",
    "PriorityStatistics",
    "Resource",
    "ResourceStatistics",
    "ServerBusy",
    "deadline_headers",
    "priority_from_header",
    "remaining_budget",
]
__version__ = "0.2.0"

# A library's logger: silent unless the application configures logging (no
# "No handlers could be found", no bare lines from logging's last resort).
logging.getLogger(__name__).addHandler(logging.NullHandler())
