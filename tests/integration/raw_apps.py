"""Raw ASGI apps (no framework) for the integration tests: what a framework frames for an
app (Content-Length, reading WebSocket messages), these leave as a hand-written app may.
Imported by the replicas, so nothing here is pickled."""

from __future__ import annotations

import asyncio
from typing import Any

# path -> (headers, body) of a response sent in one message
RESPONSES = {
    "/raw/unframed": ([(b"content-type", b"text/plain")], b"no length"),
    "/raw/wrong-length": ([(b"content-length", b"100")], b"short"),
    "/raw/chunked": ([(b"Transfer-Encoding", b"chunked")], b"not chunked"),
}


async def raw_app(scope: Any, receive: Any, send: Any) -> None:
    """HTTP: the response of ``RESPONSES`` for its path, in one message. WebSocket: accept,
    then read nothing until the client leaves (its messages pile up before the app)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await asyncio.sleep(3600)
        return
    headers, body = RESPONSES[scope["path"]]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
