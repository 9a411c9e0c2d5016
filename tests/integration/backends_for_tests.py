"""Backends that replicas import by module path (this directory is on the workers' sys.path).

Import-path backends are named as "backends_for_tests:Echo" or "backends_for_tests.Echo";
the others are passed as objects and pickled by reference to this module.
"""

from __future__ import annotations

import os
import time
from typing import Any

import servekit as serve


def _payload(request: Any) -> Any:
    """The request data of a handle call, or the ``x`` query parameter of an HTTP call."""
    if isinstance(request, serve.ServeRequest):
        return request.data
    return request.query_params.get("x")


def echo_function(request: Any) -> str:
    return f"function:{_payload(request)}"


class Echo:
    """Answers "<prefix>:<data>"; ``prefix`` is its init argument."""

    def __init__(self, prefix: str = "echo") -> None:
        self.prefix = prefix

    def __call__(self, request: Any) -> str:
        return f"{self.prefix}:{_payload(request)}"


class ConstructorError(Exception):
    """Raised by ``FailingConstructor`` so a test can check the type reaches the caller."""


class FailingConstructor:
    def __init__(self, message: str) -> None:
        raise ConstructorError(message)

    def __call__(self, request: Any) -> str:  # never reached
        return "unreachable"


class ReplicaRecorder:
    """Writes a file "<replica tag>" holding its pid into ``directory`` once constructed."""

    def __init__(self, directory: str, delay: float = 0.0) -> None:
        time.sleep(delay)  # a slow constructor: create_backend must wait for it
        self.tag = serve.get_current_replica_tag()
        path = os.path.join(directory, self.tag)
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)  # the file appears complete or not at all

    def __call__(self, request: Any) -> list:
        return [self.tag, os.getpid()]


class ContextReporter:
    """Reports the backend and replica tags seen in ``__init__`` and in a request."""

    def __init__(self) -> None:
        self.in_init = [serve.get_current_backend_tag(), serve.get_current_replica_tag()]

    def __call__(self, request: Any) -> dict:
        return {"init": self.in_init,
                "call": [serve.get_current_backend_tag(), serve.get_current_replica_tag()]}


def connect_and_describe(request: Any) -> dict:
    """Connect to the instance this backend runs in and say what it sees there."""
    client = serve.connect()
    return {"controller_address": client._controller_address,
            "backends": sorted(client.list_backends()),
            "endpoints": sorted(client.list_endpoints())}


def call_other_endpoint(request: Any) -> Any:
    """Call the endpoint named by the request data through a client from serve.connect()."""
    handle = serve.connect().get_handle(request.data)
    return handle.remote("from-inside").result(timeout=10)


async def call_other_endpoint_async(request: Any) -> list:
    """Like ``call_other_endpoint``, with an async handle on the replica's own event loop."""
    handle = serve.connect().get_handle(request.data, sync=False)
    reply = await (await handle.remote("from-async"))
    return [type(handle).__name__, reply]
