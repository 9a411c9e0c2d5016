"""An ASGI app on the Ray runtime: requests, streamed bodies and WebSockets pass through the
TCP + TLS data plane as they do locally."""

from __future__ import annotations

import hashlib
from typing import Iterator

import httpx
import pytest
from asgi_backends import items_app
from websockets.sync.client import connect

pytestmark = pytest.mark.integration

RUNTIMES = [pytest.param("ray", marks=pytest.mark.ray)]
TIMEOUT = 60.0


def test_an_app_serves_routes_uploads_and_websockets_on_ray(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("api:v1", items_app)
    client.create_endpoint("api", backend="api:v1", route="/api")
    item = httpx.get(f"{url}/api/items/9", params={"q": "ray"}, timeout=TIMEOUT)
    assert item.json() == {"item_id": 9, "q": "ray", "version": "v1"}
    assert httpx.get(f"{url}/api/items/x", timeout=TIMEOUT).status_code == 422

    chunk = b"r" * 65536
    digest = hashlib.sha256(chunk * 160).hexdigest()

    def body() -> Iterator[bytes]:
        for _ in range(160):  # 10 MiB
            yield chunk

    upload = httpx.post(f"{url}/api/upload", content=body(), timeout=TIMEOUT)
    assert upload.json() == {"size": 160 * 65536, "sha256": digest}

    with connect(url.replace("http://", "ws://") + "/api/echo",
                 open_timeout=TIMEOUT) as websocket:
        for i in range(200):
            websocket.send(str(i))
            assert websocket.recv(timeout=TIMEOUT) == f"v1:{i}"
