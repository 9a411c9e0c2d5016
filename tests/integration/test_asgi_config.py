"""Config changes of an ASGI backend while its connections stay open: a ``reconfigure``
runs between the starts of requests, never waiting for a WebSocket to close."""

from __future__ import annotations

import threading

import httpx
import pytest
from asgi_backends import Configurable
from test_asgi import TIMEOUT, ws_url
from websockets.sync.client import connect

pytestmark = pytest.mark.integration


def test_a_config_change_does_not_wait_for_an_open_websocket(serve_instance: tuple) -> None:
    """With a WebSocket open on the only replica, ``update_backend_config`` returns (it used
    to wait for the socket to close, and every new request waited behind it); the socket
    keeps working and sees the new config, and new requests are served."""
    client, url = serve_instance
    client.create_backend("conf", Configurable, config={"user_config": 1})
    client.create_endpoint("conf", backend="conf", route="/conf")
    with connect(ws_url(url, "/conf/ws"), open_timeout=TIMEOUT) as websocket:
        websocket.send("a")
        assert websocket.recv(timeout=TIMEOUT) == "1:a"
        updating = threading.Thread(
            target=client.update_backend_config, args=("conf", {"user_config": 2}),
            daemon=True)
        updating.start()
        updating.join(TIMEOUT)
        assert not updating.is_alive(), "the config change waited for the WebSocket"
        assert httpx.get(f"{url}/conf/config", timeout=TIMEOUT).json() == {"config": 2}
        websocket.send("b")
        assert websocket.recv(timeout=TIMEOUT) == "2:b"
