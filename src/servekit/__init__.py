"""servekit: serve machine-learning models and Python code behind HTTP and Python handles.

The public names are imported when first used, so that servekit's own processes (the
supervisor, controller, proxy and replicas) load only the modules their role needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from servekit._private import versions

if TYPE_CHECKING:
    from servekit._private.asgi_app import asgi_factory, ingress
    from servekit._private.replica.batched import batch
    from servekit._private.replica.multiplexed import multiplexed
    from servekit.api import (
        Client,
        accept_batch,
        connect,
        get_current_backend_tag,
        get_current_replica_tag,
        get_multiplexed_model_id,
        get_request_id,
        metrics_text,
        start,
    )
    from servekit.config import AutoscalingConfig, BackendConfig, DeploymentMode, HTTPOptions
    from servekit.env import CondaEnv, VirtualEnv
    from servekit.exceptions import RayServeException, ServeError
    from servekit.handle import ServeHandle, ServeResponse, ServeSyncHandle
    from servekit.request import ServeRequest

__version__ = versions.SERVEKIT

# public name -> the module that defines it
_HOMES = {
    "Client": "api", "accept_batch": "api", "connect": "api",
    "get_current_backend_tag": "api", "get_current_replica_tag": "api",
    "get_multiplexed_model_id": "api", "get_request_id": "api", "metrics_text": "api",
    "start": "api",
    "AutoscalingConfig": "config", "BackendConfig": "config", "DeploymentMode": "config",
    "HTTPOptions": "config",
    "CondaEnv": "env", "VirtualEnv": "env",
    "RayServeException": "exceptions", "ServeError": "exceptions",
    "ServeHandle": "handle", "ServeResponse": "handle", "ServeSyncHandle": "handle",
    "ServeRequest": "request",
    "asgi_factory": "_private.asgi_app", "ingress": "_private.asgi_app",
    "batch": "_private.replica.batched", "multiplexed": "_private.replica.multiplexed",
}

__all__ = [
    "AutoscalingConfig",
    "BackendConfig",
    "Client",
    "CondaEnv",
    "DeploymentMode",
    "HTTPOptions",
    "RayServeException",
    "ServeError",
    "ServeHandle",
    "ServeRequest",
    "ServeResponse",
    "ServeSyncHandle",
    "VirtualEnv",
    "__version__",
    "accept_batch",
    "asgi_factory",
    "batch",
    "connect",
    "get_current_backend_tag",
    "get_current_replica_tag",
    "get_multiplexed_model_id",
    "get_request_id",
    "ingress",
    "metrics_text",
    "multiplexed",
    "start",
]
# public submodules, imported when first used as attributes (``serve.exceptions``)
_SUBMODULES = ("api", "config", "env", "exceptions", "handle", "metrics", "request", "types")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"servekit.{name}")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'servekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"servekit.{home}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
