"""FastAPI and Starlette apps the ASGI integration tests serve (imported by the replicas,
so nothing here is pickled)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Request, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from robustness_backends import async_wait_for_file

import servekit as serve


def note(path: str, text: str = "") -> None:
    """Write ``text`` to the file ``path`` (what the tests look for), whole: the file
    appears with its text (a test that waits for it never reads it half-written)."""
    with open(f"{path}.writing", "w") as file:
        file.write(text)
    os.replace(f"{path}.writing", path)


async def sleep_until_cancelled(marker: str) -> None:
    """Note "started" in the file ``marker``, sleep, and note "cancelled" when cancelled."""
    try:
        note(marker, "started")
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        note(marker, "cancelled")
        raise


# ----------------------------------------------------------------- the "items" API


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


def api_key(x_api_key: Optional[str] = Header(default=None)) -> str:
    if x_api_key != "secret":
        raise HTTPException(status_code=401, detail="bad api key")
    return x_api_key


def make_items_app(version: str = "v1") -> FastAPI:
    """A small typed API: path and query parameters, a validated body, a dependency."""
    app = FastAPI(title=f"items {version}")

    @app.get("/items/{item_id}")
    def read_item(item_id: int, q: Optional[str] = None) -> dict:
        return {"item_id": item_id, "q": q, "version": version}

    @app.post("/items")
    async def create_item(item: Item, key: str = Depends(api_key)) -> dict:
        return {"name": item.name, "total": item.price * 2, "tags": item.tags}

    @app.get("/version")
    def get_version(request: Request) -> dict:
        return {"version": version, "root_path": request.scope.get("root_path"),
                "pid": os.getpid()}

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        """Hash a body as it streams in: never held whole."""
        digest, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return {"size": size, "sha256": digest.hexdigest()}

    @app.post("/upload-then-wait")
    async def upload_then_wait(request: Request, marker: str, release: str) -> dict:
        """Read the whole body, note its size in ``marker``, answer once ``release`` exists."""
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        note(marker, str(size))
        await async_wait_for_file(release)
        return {"size": size}

    @app.post("/note-upload")
    async def note_upload(request: Request, notes: str) -> dict:
        """Note the size of the body this version read in ``<notes>/<version>``."""
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        note(os.path.join(notes, version), str(size))
        return {"size": size}

    @app.get("/events")
    async def events(n: int = 3, gap: float = 0.0) -> StreamingResponse:
        async def generate() -> AsyncIterator[str]:
            for i in range(n):
                yield f"data: event {i}\n\n"
                await asyncio.sleep(gap)
        return StreamingResponse(generate(), media_type="text/event-stream")

    @app.get("/gated-events")
    async def gated_events(release: str) -> StreamingResponse:
        """One event, then the next only once the file ``release`` exists."""
        async def generate() -> AsyncIterator[str]:
            yield "data: first\n\n"
            await async_wait_for_file(release)
            yield "data: second\n\n"
        return StreamingResponse(generate(), media_type="text/event-stream")

    @app.get("/slow")
    async def slow(marker: str) -> dict:
        """Sleeps until cancelled; says so in the marker file."""
        await sleep_until_cancelled(marker)
        return {}

    @app.websocket("/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"{version}:{text}")
        except Exception:
            return

    @app.websocket("/never-accepts")
    async def never_accepts(websocket: WebSocket, marker: str) -> None:
        """Never accepts; says in the marker file when it is cancelled."""
        await sleep_until_cancelled(marker)

    @app.websocket("/note-messages")
    async def note_messages(websocket: WebSocket, notes: str) -> None:
        """Echo each message; note them all in ``<notes>/<version>`` once the client left."""
        await websocket.accept()
        seen = []
        try:
            while True:
                text = await websocket.receive_text()
                seen.append(text)
                await websocket.send_text(text)
        except Exception:
            note(os.path.join(notes, version), "\n".join(seen))

    @app.websocket("/pid")
    async def pid(websocket: WebSocket) -> None:
        """Answers each message with the version and the replica's pid."""
        await websocket.accept()
        try:
            while True:
                await websocket.receive_text()
                await websocket.send_json({"version": version, "pid": os.getpid()})
        except Exception:
            return

    return app


items_app = make_items_app("v1")
items_app_v2 = make_items_app("v2")


@serve.asgi_factory
def create_items_app(version: str) -> FastAPI:
    return make_items_app(version)


# ----------------------------------------------------------------- lifespan

def make_lifespan_app(marker_dir: str, fail: bool = False) -> FastAPI:
    """Writes "startup" and "shutdown" files in ``marker_dir``; ``fail``: startup raises."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict]:
        if fail:
            raise RuntimeError("the model file is missing")
        note(os.path.join(marker_dir, f"startup-{os.getpid()}"))
        yield {"model": "loaded at startup"}
        note(os.path.join(marker_dir, f"shutdown-{os.getpid()}"))

    app = FastAPI(lifespan=lifespan)

    @app.get("/model")
    def model(request: Request) -> dict:
        return {"model": request.state.model}

    return app


lifespan_factory = serve.asgi_factory(make_lifespan_app)


# ----------------------------------------------------------------- ingress

ingress_app = FastAPI()


@serve.ingress(ingress_app)
class Doubler:
    """A model loaded in __init__, reached by the app's routes as ``self``."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    @ingress_app.get("/double/{x}")
    def double(self, x: int) -> dict:
        return {"result": x * self.factor}

    @ingress_app.post("/double")
    async def double_item(self, item: Item) -> dict:
        return {"name": item.name, "price": item.price * self.factor}


configurable_app = FastAPI()


@serve.ingress(configurable_app)
class Configurable:
    """An ingress class with a ``user_config`` and a WebSocket that stays open."""

    def __init__(self) -> None:
        self.config = None

    def reconfigure(self, config: object) -> None:
        self.config = config

    @configurable_app.get("/config")
    def read_config(self) -> dict:
        return {"config": self.config}

    @configurable_app.websocket("/ws")
    async def tagged_echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{self.config}:{text}")
