from fastapi import APIRouter, Depends, FastAPI, Header
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI()
db = Resource(10, name="db", per_key=3, max_waiting=100)   # no key holds more than 3 of the 10
disk = Resource(4, name="disk", per_key=1, max_waiting=20)
limiter = Limiter(timeout=5, resources=[db, disk])


# Keys must come from authenticated data: these read a header only to stay short.
@app.get("/reports")
@limiter.resources([db], key=lambda request: request.headers.get("x-api-key"))
async def reports():
    return {"reports": []}


async def current_user(authorization: str | None = Header(None)) -> str | None:
    return authorization   # look the user up here


async def tenant(user: str | None = Depends(current_user)) -> str | None:  # uses a dependency
    return None if user is None else f"tenant-of-{user}"


router = APIRouter(dependencies=[Depends(limiter.dependency([db], key=tenant))])


@router.get("/invoices")
async def invoices():
    return {"invoices": []}


app.include_router(router)


async def download(request):
    return PlainTextResponse(f"contents of {request.path_params['name']}")


files = Starlette(routes=[Route("/{name}", download)])
app.mount("/files", limiter.asgi([disk], key=lambda conn: conn.headers.get("x-api-key"))(files))
