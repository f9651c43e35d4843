from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, request_response

from fastapi_concurrency_limiter import Limiter, Resource

disk = Resource(4, name="disk", max_waiting=40)
api = Resource(10, name="api", max_waiting=100)
limiter = Limiter(timeout=2, resources=[disk, api])


async def read_file(request):
    return PlainTextResponse(f"contents of {request.path_params['name']}")


async def report(request):
    return PlainTextResponse("report")


files = Starlette(routes=[Route("/{name}", read_file)])

app = Starlette(routes=[
    Route("/report", limiter.asgi([api])(request_response(report))),  # one route
    Mount("/files", app=limiter.asgi([disk])(files)),                 # a mounted app
])
# or a whole app, as middleware:  app = limiter.asgi([api])(app)
