from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from fastapi_concurrency_limiter import Limiter, Resource

app = FastAPI()
feeds = Resource(100, name="feeds", max_waiting=100)
limiter = Limiter(timeout=2, resources=[feeds])


@app.websocket("/feed")
@limiter.resources([feeds])
async def feed(websocket: WebSocket):
    await websocket.accept()       # only once the connection holds its slot
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass                       # the slot is given back when this returns
