from fastapi import FastAPI

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI()
database_resource = Resource(5)
file_resource = Resource(10)
limiter = Limiter(timeout=5, resources=[database_resource, file_resource])


@app.get("/messages")
@limiter.resources([database_resource])
async def read_messages(): ...


@app.get("/messages-and-file")
@limiter.resources([database_resource, file_resource])   # registration order
async def read_messages_and_file(): ...
