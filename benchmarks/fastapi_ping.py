"""The FastAPI app of the ``asgi`` benchmark scenario: one typed route and a WebSocket echo
(imported by the replica, and served by bare uvicorn for the ceiling)."""

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


@app.get("/ping/{n}")
async def ping(n: int) -> dict:
    return {"n": n}


@app.websocket("/echo")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
