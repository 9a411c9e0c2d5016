"""Backends of the crash-recovery tests (test_recovery.py); replicas import them from here.

Each answers with who served the request (replica tag and pid) and the ``user_config`` it
runs, so a test can tell an adopted replica (same tag, same pid) from a restarted one. The
test talks to a blocked constructor through files in a directory it passes as an init
argument: a file is a signal that crosses processes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from starlette.requests import Request

import servekit as serve

# The longest a constructor blocks on a file that never appears (teardown also creates it).
MAX_BLOCK_S = 30.0


def _value(request: Any) -> Any:
    if isinstance(request, Request):
        return request.query_params.get("x")
    return request.data


def _touch(path: str, text: str = "") -> None:
    """Create ``path`` atomically (it appears complete or not at all)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class Whoami:
    """Answers {"name", "tag", "pid", "config", "x"}; ``reconfigure`` keeps the user_config."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def __call__(self, request: Any) -> dict:
        return {"name": self.name, "tag": serve.get_current_replica_tag(),
                "pid": os.getpid(), "config": self.config, "x": _value(request)}


class GatedStart:
    """While ``<directory>/hold`` exists when a replica is constructed, its constructor
    writes ``ctor-waiting-<replica tag>`` (holding its pid) and blocks until
    ``<directory>/release`` exists."""

    def __init__(self, directory: str) -> None:
        tag = serve.get_current_replica_tag()
        if os.path.exists(os.path.join(directory, "hold")):
            _touch(os.path.join(directory, f"ctor-waiting-{tag}"), str(os.getpid()))
            deadline = time.monotonic() + MAX_BLOCK_S
            release = os.path.join(directory, "release")
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)
        _touch(os.path.join(directory, f"ctor-done-{tag}"), str(os.getpid()))

    def __call__(self, request: Any) -> dict:
        time.sleep(0.2)  # so that requests sent together spread over the replicas
        return {"tag": serve.get_current_replica_tag(), "pid": os.getpid()}
